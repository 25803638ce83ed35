//! `marquee-bench recommend`: the recommender on a synthetic 1,000,000-item catalogue (the
//! real MovieLens catalogue grown with noisy copies of its item embeddings, same dimension):
//! index build time and memory, retrieval top-100 latency and recall@100 against exact
//! search, end-to-end `Recommend` over gRPC (k = 20 from 500 candidates, ranked and
//! re-ranked) at a fixed 100 requests/s and at saturation; plus exposure fairness on the real
//! catalogue for a fixed set of users with and without re-ranking. Every figure is the
//! median of `--runs`; the targets are the issue's. Measuring returns plain figures;
//! [`crate::markdown`] renders them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use marquee_proto::recommendation as pb;
use marquee_recommendation::engine::{RecQuery, ValidFilter, user_embeddings};
use marquee_recommendation::index::{HnswParams, ItemIndex, exact_search, recall};
use marquee_recommendation::model::{Matrix, ModelData, read_histories};
use marquee_recommendation::rerank::exposure_stats;
use marquee_recommendation::users::Subject;
use tokio_util::sync::CancellationToken;

use crate::percentile;

/// The report section's heading.
pub(crate) const HEADING: &str = "## Recommendation";

#[derive(Args, Clone)]
pub struct RecommendArgs {
    /// The model repository (with `recommender/`).
    #[arg(long, default_value = "model-repository")]
    pub repo: PathBuf,
    /// Synthetic catalogue size.
    #[arg(long, default_value_t = 1_000_000)]
    pub items: usize,
    /// Repetitions (index rebuilt each time); the report shows the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Retrieval queries timed per run (real users' embeddings, cycled).
    #[arg(long, default_value_t = 2000)]
    pub queries: usize,
    /// Queries checked against exact search per run.
    #[arg(long, default_value_t = 200)]
    pub recall_queries: usize,
    /// Seconds of open-loop load at `--rate`.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Requests per second of the fixed-rate load.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// HNSW search lists measured for retrieval (the service uses max(ef, n)).
    #[arg(long, value_delimiter = ',', default_value = "256,512,768")]
    pub ef: Vec<usize>,
    /// Per-dimension Gaussian noise of synthetic item embeddings.
    #[arg(long, default_value_t = 0.02)]
    pub noise: f32,
    /// HNSW build candidate list; 100 rather than the service's 200 keeps a 1M build within
    /// minutes on 2 cores (the served catalogue is small; its build is instant either way).
    #[arg(long, default_value = "100")]
    pub ef_construction: Option<usize>,
    /// Engine worker threads for the end-to-end load.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Report to update: its `## Recommendation` section is replaced (or appended); otherwise
    /// the section is printed.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl RecommendArgs {
    /// The defaults above, for `marquee-bench all`.
    pub fn with_defaults(repo: PathBuf, runs: usize) -> Self {
        Self {
            repo,
            items: 1_000_000,
            runs,
            queries: 2000,
            recall_queries: 200,
            seconds: 20.0,
            rate: 100.0,
            ef: vec![256, 512, 768],
            noise: 0.02,
            ef_construction: Some(100),
            workers: 1,
            out: None,
        }
    }
}

/// Figures of one run.
#[derive(Debug, Clone, Default)]
struct Run {
    build_s: f64,
    index_mib: f64,
    /// Per ef: (p50 ms, p99 ms, recall@100).
    retrieval: Vec<(usize, f64, f64, f64)>,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    e2e_rps: f64,
    e2e_errors: usize,
    saturated_rps: f64,
}

fn rss_mib() -> f64 {
    crate::rss_mib(std::process::id())
}

/// A user's training history as the service holds it at start.
fn training_subject(data: &ModelData, user_index: u32) -> Subject {
    let history: Vec<u32> = data
        .histories
        .get(&user_index)
        .map(|h| h.iter().map(|x| x.0).collect())
        .unwrap_or_default();
    Subject {
        user_index,
        exclude: history.clone(),
        history,
    }
}

pub fn run(a: RecommendArgs) -> anyhow::Result<()> {
    crate::language::write_section(a.out.as_deref(), HEADING, &section(&a)?)
}

/// Runs the benchmark and returns the Markdown section ([`crate::markdown`]).
pub fn section(a: &RecommendArgs) -> anyhow::Result<String> {
    Ok(crate::markdown::recommendation_section(&measure(a)?))
}

/// Runs the benchmark into plain figures.
pub(crate) fn measure(a: &RecommendArgs) -> anyhow::Result<RecommendFigures> {
    let settings = {
        let mut s = marquee_recommendation::Settings::default();
        s.repository.path = a.repo.clone();
        s.repository.threads = Some(1);
        s.server.grpc_addr = "127.0.0.1:0".parse()?;
        s.server.admin_addr = "127.0.0.1:0".parse()?;
        s.repository.lanes = Some(a.workers);
        s
    };
    eprintln!("== recommender: loading the model");
    let (data, emb) = marquee_recommendation::load_model(&settings)?;
    let mut users: Vec<(i64, u32)> = data.users.iter().map(|(&id, &ix)| (id, ix)).collect();
    users.sort_unstable();
    let subjects: Vec<Subject> = users
        .iter()
        .map(|&(_, ix)| training_subject(&data, ix))
        .collect();
    let queries = user_embeddings(&data, &subjects)?;

    let fairness = fairness(&settings, &data, &emb)?;

    let rec = &settings.recommendation;
    let params = HnswParams {
        m: rec.hnsw_m,
        ef_construction: a.ef_construction.unwrap_or(rec.hnsw_ef_construction),
        ef_search: rec.hnsw_ef_search,
    };
    let mut runs = Vec::new();
    for run in 0..a.runs {
        eprintln!(
            "== run {}/{}: growing the catalogue to {}",
            run + 1,
            a.runs,
            a.items
        );
        let (big, big_emb) = marquee_recommendation::synthetic::expand(
            &data,
            &emb,
            a.items,
            a.noise,
            0x5eed + run as u64,
        );
        let before = rss_mib();
        let t = Instant::now();
        let index = ItemIndex::build(&big_emb, Some(params));
        let build_s = t.elapsed().as_secs_f64();
        let index_mib = rss_mib() - before;
        eprintln!("   index built in {build_s:.1} s, +{index_mib:.0} MiB");
        let mut retrieval = Vec::new();
        for &ef in &a.ef {
            retrieval.push(retrieval_run(a, &index, &big_emb, &queries, ef));
            let r = retrieval.last().expect("pushed");
            eprintln!(
                "   ef={ef}: p50 {:.3} ms p99 {:.3} ms recall@100 {:.4}",
                r.1, r.2, r.3
            );
        }
        let e2e = end_to_end(a, &settings, big, big_emb, index, &users)?;
        eprintln!(
            "   e2e at {} req/s: p50 {:.2} ms p99 {:.2} ms, {:.1} req/s, {} errors; saturated {:.0} req/s",
            a.rate, e2e.0, e2e.1, e2e.2, e2e.3, e2e.4
        );
        runs.push(Run {
            build_s,
            index_mib,
            retrieval,
            e2e_p50_ms: e2e.0,
            e2e_p99_ms: e2e.1,
            e2e_rps: e2e.2,
            e2e_errors: e2e.3,
            saturated_rps: e2e.4,
        });
    }
    Ok(figures(a, &settings, &runs, fairness))
}

/// One ef: single-thread top-100 latency percentiles and mean recall@100 vs exact search.
fn retrieval_run(
    a: &RecommendArgs,
    index: &ItemIndex,
    emb: &Matrix,
    queries: &Matrix,
    ef: usize,
) -> (usize, f64, f64, f64) {
    let index = index.with_ef_search(ef);
    let mut lat = Vec::with_capacity(a.queries);
    for q in 0..a.queries {
        let query = queries.row(q % queries.rows);
        let t = Instant::now();
        let out = index.search(emb, query, 100);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    lat.sort_by(f64::total_cmp);
    let n = a.recall_queries.min(queries.rows);
    let mut total = 0.0;
    for q in 0..n {
        let query = queries.row(q);
        total += recall(
            &index.search(emb, query, 100),
            &exact_search(emb, query, 100, |_| true),
        );
    }
    (
        ef,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        total / n as f64,
    )
}

/// Serves the big catalogue over gRPC and loads it: (p50 ms, p99 ms, achieved req/s, errors)
/// at the fixed rate, then the saturated closed-loop throughput.
fn end_to_end(
    a: &RecommendArgs,
    settings: &marquee_recommendation::Settings,
    data: ModelData,
    emb: Matrix,
    index: ItemIndex,
    users: &[(i64, u32)],
) -> anyhow::Result<(f64, f64, f64, usize, f64)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let state = tempfile_dir()?;
    let mut settings = settings.clone();
    settings.recommendation.state_dir = state.clone();
    let users: Vec<i64> = users.iter().map(|u| u.0).collect();
    let out = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let running = marquee_recommendation::start_with_parts(
            settings,
            data,
            emb,
            Some(index),
            shutdown.clone(),
        )
        .await?;
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", running.grpc_addr))?
            .connect()
            .await?;
        let client = pb::recommender_client::RecommenderClient::new(ch);
        let req = |n: usize| pb::RecommendRequest {
            subject: Some(pb::recommend_request::Subject::UserId(
                users[n % users.len()],
            )),
            k: 20,
            ..Default::default()
        };
        // Warm the connection and the engine.
        for n in 0..20 {
            client.clone().recommend(req(n)).await?;
        }
        let load = open_loop(&client, a.rate, a.seconds, |n| req(n + 1000)).await?;
        let (lat, errors, elapsed) = (load.latencies_ms, load.errors, load.elapsed_s);
        // Saturation: 8 closed-loop callers for a few seconds.
        let sat_secs = 5.0;
        let sat_start = Instant::now();
        let mut workers = Vec::new();
        for w in 0..8usize {
            let mut c = client.clone();
            let users = users.clone();
            workers.push(tokio::spawn(async move {
                let mut n = 0usize;
                while sat_start.elapsed().as_secs_f64() < sat_secs {
                    let r = pb::RecommendRequest {
                        subject: Some(pb::recommend_request::Subject::UserId(
                            users[(w * 131 + n) % users.len()],
                        )),
                        k: 20,
                        ..Default::default()
                    };
                    if c.recommend(r).await.is_ok() {
                        n += 1;
                    }
                }
                n
            }));
        }
        let mut done = 0;
        for w in workers {
            done += w.await?;
        }
        let sat = done as f64 / sat_start.elapsed().as_secs_f64();
        // Where the engine's time goes (mean per request over the whole load).
        for f in running.metrics.registry.gather() {
            if f.name() == "marquee_recommendation_stage_seconds" {
                for m in f.get_metric() {
                    let h = m.get_histogram();
                    let stage = m.get_label().first().map(|l| l.value()).unwrap_or("");
                    eprintln!(
                        "   stage {stage}: mean {:.3} ms over {}",
                        h.get_sample_sum() * 1e3 / h.get_sample_count().max(1) as f64,
                        h.get_sample_count()
                    );
                }
            }
        }
        shutdown.cancel();
        let _ = running.task.await;
        Ok::<_, anyhow::Error>((
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.len() as f64 / elapsed,
            errors,
            sat,
        ))
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&state);
    out
}

/// What an open-loop `Recommend` load measured.
pub(crate) struct OpenLoop {
    /// Latencies of the calls that succeeded, from each call's slot, sorted.
    pub(crate) latencies_ms: Vec<f64>,
    pub(crate) errors: usize,
    pub(crate) elapsed_s: f64,
}

/// `rate` × `seconds` `Recommend` calls, call n due at its slot n / rate whatever the earlier
/// ones do; latency counts from the slot, so a stall shows up in the percentiles instead of
/// silently lowering the rate.
pub(crate) async fn open_loop(
    client: &pb::recommender_client::RecommenderClient<tonic::transport::Channel>,
    rate: f64,
    seconds: f64,
    request: impl Fn(usize) -> pb::RecommendRequest,
) -> anyhow::Result<OpenLoop> {
    let total = (seconds * rate) as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total);
    for n in 0..total {
        let due = start + period * n as u32;
        tokio::time::sleep_until(due).await;
        let (mut c, r) = (client.clone(), request(n));
        handles.push(tokio::spawn(async move {
            let ok = c.recommend(r).await.is_ok();
            (due.elapsed().as_secs_f64() * 1e3, ok)
        }));
    }
    let (mut latencies_ms, mut errors) = (Vec::with_capacity(total), 0);
    for h in handles {
        let (ms, ok) = h.await?;
        if ok {
            latencies_ms.push(ms);
        } else {
            errors += 1;
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    Ok(OpenLoop {
        latencies_ms,
        errors,
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("marquee-bench-rec-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Exposure and accuracy on the real catalogue for every user, k = 10: relevance only vs the
/// default re-ranking (MMR λ and the long-tail floor from the settings).
#[derive(Clone, Debug)]
pub(crate) struct Fairness {
    pub(crate) users: usize,
    pub(crate) rows: Vec<ExposureRow>,
}

/// One re-ranking configuration's exposure over every user's list.
#[derive(Clone, Debug)]
pub(crate) struct ExposureRow {
    /// What the lists are (e.g. "relevance only (λ = 0, no floor)").
    pub(crate) lists: String,
    pub(crate) coverage: f64,
    pub(crate) gini: f64,
    pub(crate) long_tail_share: f64,
    /// Mean held-out recall@10 over the users with a held-out history.
    pub(crate) recall_at_10: f64,
}

fn fairness(
    settings: &marquee_recommendation::Settings,
    data: &ModelData,
    emb: &Matrix,
) -> anyhow::Result<Fairness> {
    eprintln!("== exposure fairness on the real catalogue");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let holdout = read_histories(&data.file("holdout.json"))?;
    let rec = settings.recommendation.clone();
    let engine = marquee_recommendation::engine::Engine::start(
        data.clone(),
        emb.clone(),
        rec.engine_config(1, 1, marquee_core::liveness::Liveness::new()),
        marquee_recommendation::metrics::RecMetrics::standalone(data.catalog.len()),
    )?;
    let mut users: Vec<u32> = data.users.values().copied().collect();
    users.sort_unstable();
    let mut rows = Vec::new();
    let configs = [
        ("relevance only (λ = 0, no floor)", 0.0, 0.0),
        (
            "re-ranked (service defaults)",
            rec.default_diversity,
            rec.long_tail_floor,
        ),
        ("re-ranked (λ = 0.5, floor 0.3)", 0.5, 0.3),
    ];
    for (name, lambda, floor) in configs {
        let mut counts = vec![0u64; data.catalog.len() + 1];
        let (mut tail, mut slots) = (0u64, 0u64);
        let mut recall_sum = 0.0;
        let mut n_recall = 0usize;
        for &u in &users {
            let q = RecQuery {
                subject: training_subject(data, u),
                k: 10,
                filter: ValidFilter::default(),
                diversity: lambda,
                long_tail_floor: floor,
                explain: false,
            };
            let out = rt.block_on(engine.recommend(q))?;
            for it in &out.items {
                counts[it.index as usize] += 1;
                slots += 1;
                if data.catalog.items[it.index as usize].long_tail {
                    tail += 1;
                }
            }
            if let Some(h) = holdout.get(&u).filter(|h| !h.is_empty()) {
                let held: std::collections::HashSet<u32> = h.iter().map(|x| x.0).collect();
                let hits = out.items.iter().filter(|i| held.contains(&i.index)).count();
                recall_sum += hits as f64 / held.len() as f64;
                n_recall += 1;
            }
        }
        let s = exposure_stats(&counts, tail, slots);
        rows.push(ExposureRow {
            lists: name.to_string(),
            coverage: s.coverage,
            gini: s.gini,
            long_tail_share: s.long_tail_share,
            recall_at_10: recall_sum / n_recall.max(1) as f64,
        });
    }
    Ok(Fairness {
        users: users.len(),
        rows,
    })
}

/// Retrieval top-100 at one ef, each figure the median over the runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Retrieval {
    pub(crate) ef: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Mean recall@100 against exact search.
    pub(crate) recall: f64,
}

/// The recommender's figures (each the median over the runs unless said otherwise) and the
/// settings they were measured with.
#[derive(Clone, Debug)]
pub(crate) struct RecommendFigures {
    /// Synthetic catalogue size.
    pub(crate) items: usize,
    /// Per-dimension Gaussian noise of synthetic item embeddings.
    pub(crate) noise: f32,
    pub(crate) hnsw_m: usize,
    pub(crate) ef_construction: usize,
    /// Runs measured (index rebuilt each time).
    pub(crate) runs: usize,
    pub(crate) cores: usize,
    /// The service's candidate count, default MMR λ and long-tail floor.
    pub(crate) candidates: usize,
    pub(crate) diversity: f32,
    pub(crate) long_tail_floor: f32,
    /// Offered requests per second of the open-loop load.
    pub(crate) rate: f64,
    /// Engine worker threads for the end-to-end load.
    pub(crate) workers: usize,
    pub(crate) build_s: f64,
    /// RSS growth during the first build only: later runs reuse pages the previous index freed,
    /// so their growth understates.
    pub(crate) index_mib: f64,
    /// One per measured ef, in the order given.
    pub(crate) retrieval: Vec<Retrieval>,
    pub(crate) e2e_p50_ms: f64,
    pub(crate) e2e_p99_ms: f64,
    /// Achieved requests per second at `rate` offered.
    pub(crate) e2e_rps: f64,
    /// Failed calls, summed over the runs.
    pub(crate) e2e_errors: usize,
    pub(crate) saturated_rps: f64,
    pub(crate) fairness: Fairness,
}

/// The runs' medians and the settings they ran with.
fn figures(
    a: &RecommendArgs,
    settings: &marquee_recommendation::Settings,
    runs: &[Run],
    fairness: Fairness,
) -> RecommendFigures {
    let rec = &settings.recommendation;
    // The middle value, or the mean of the two middle values for an even count.
    let med = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    RecommendFigures {
        items: a.items,
        noise: a.noise,
        hnsw_m: rec.hnsw_m,
        ef_construction: a.ef_construction.unwrap_or(rec.hnsw_ef_construction),
        runs: runs.len(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        candidates: rec.candidates,
        diversity: rec.default_diversity,
        long_tail_floor: rec.long_tail_floor,
        rate: a.rate,
        workers: a.workers,
        build_s: med(&|r| r.build_s),
        index_mib: runs.first().map_or(f64::NAN, |r| r.index_mib),
        retrieval: a
            .ef
            .iter()
            .enumerate()
            .map(|(i, &ef)| Retrieval {
                ef,
                p50_ms: med(&|r| r.retrieval[i].1),
                p99_ms: med(&|r| r.retrieval[i].2),
                recall: med(&|r| r.retrieval[i].3),
            })
            .collect(),
        e2e_p50_ms: med(&|r| r.e2e_p50_ms),
        e2e_p99_ms: med(&|r| r.e2e_p99_ms),
        e2e_rps: med(&|r| r.e2e_rps),
        e2e_errors: runs.iter().map(|r| r.e2e_errors).sum::<usize>(),
        saturated_rps: med(&|r| r.saturated_rps),
        fairness,
    }
}
