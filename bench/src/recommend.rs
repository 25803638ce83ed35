//! `marquee-bench recommend`: the recommender on a synthetic catalogue (the real MovieLens
//! catalogue grown with noisy blends of its item embeddings, same dimension; 200k items by
//! default, `--items 1000000` for the catalogue-scale figures): index build time and memory,
//! single-query top-100 retrieval latency and recall@100 against exact f32 search over a sweep
//! of scan shares, with filters keeping 10% and 1% of items, recall of the engine's whole
//! candidate set; end-to-end `Recommend` over gRPC (k = 20 from 500 candidates, ranked and
//! re-ranked) at a fixed rate and at saturation, against the one-thread unbatched engine in
//! the same run; a new catalogue version going live under load. Every figure is the median of
//! `--runs`. Measuring returns plain figures; [`crate::markdown`] renders them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use marquee_proto::recommendation as pb;
use marquee_recommendation::engine::{RecQuery, ValidFilter, user_embeddings};
use marquee_recommendation::family::Preloaded;
use marquee_recommendation::index::{ItemIndex, Scored, exact_search, recall};
use marquee_recommendation::model::{Matrix, ModelData, read_histories};
use marquee_recommendation::rerank::exposure_stats;
use marquee_recommendation::users::Subject;
use tokio_util::sync::CancellationToken;

use crate::percentile;

/// The start of every recommendation section's heading; the catalogue size follows, so the
/// 200k section of `make bench` and a hand-run 1M section live side by side in one report.
pub(crate) const HEADING: &str = "## Recommendation, ";

/// The heading of the section for a catalogue of `items`.
pub(crate) fn heading(items: usize) -> String {
    format!("{HEADING}{items} items")
}

/// Shares of the catalogue the two filtered retrieval figures keep.
pub(crate) const FILTER_SHARES: [f64; 2] = [0.10, 0.01];

#[derive(Args, Clone)]
pub struct RecommendArgs {
    /// The model repository (with `recommender/`).
    #[arg(long, default_value = "model-repository")]
    pub repo: PathBuf,
    /// Synthetic catalogue size.
    #[arg(long, default_value_t = 200_000)]
    pub items: usize,
    /// Repetitions (catalogue and index built each time); the report shows the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Retrieval queries timed per run and setting (real users' embeddings, cycled).
    #[arg(long, default_value_t = 2000)]
    pub queries: usize,
    /// Queries checked against exact search per run and setting.
    #[arg(long, default_value_t = 200)]
    pub recall_queries: usize,
    /// Seconds of open-loop load at `--rate`.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Requests per second of the fixed-rate load.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Scan shares (`ivf_probe_share`) measured for retrieval; the service's default is
    /// always measured too.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.005,0.01,0.02,0.03,0.05"
    )]
    pub probe: Vec<f64>,
    /// Per-dimension Gaussian noise of synthetic item embeddings.
    #[arg(long, default_value_t = 0.02)]
    pub noise: f32,
    /// Engine worker threads for the end-to-end load.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Closed-loop callers of the saturation load.
    #[arg(long, default_value_t = 16)]
    pub callers: usize,
    /// `ivf_min_scan` for this run (the service's default otherwise): 0 lets small scan
    /// shares show what they cost and find.
    #[arg(long)]
    pub min_scan: Option<usize>,
    /// Retrieval only: no served load, no reload, no fairness (the large scale points).
    #[arg(long)]
    pub retrieval_only: bool,
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
            items: 200_000,
            runs,
            queries: 2000,
            recall_queries: 200,
            seconds: 20.0,
            rate: 100.0,
            probe: vec![0.005, 0.01, 0.02, 0.03, 0.05],
            noise: 0.02,
            workers: 2,
            callers: 16,
            min_scan: None,
            retrieval_only: false,
            out: None,
        }
    }
}

/// Latency percentiles and recall of one retrieval setting in one run.
#[derive(Debug, Clone, Copy, Default)]
struct Point {
    p50_ms: f64,
    p99_ms: f64,
    /// Users' embeddings as queries (`Recommend`).
    recall: f64,
    /// Items' embeddings as queries, the item itself left out (`SimilarItems`).
    recall_items: f64,
}

/// Figures of one run.
#[derive(Debug, Clone, Default)]
struct Run {
    build_s: f64,
    index_mib: f64,
    rss_mib: f64,
    /// The whole process with the catalogue, its vectors and the index in memory.
    process_mib: f64,
    exact: Point,
    /// Per probe share (sorted, deduplicated).
    sweep: Vec<Point>,
    /// At the service's probe share: recall@500 (the engine's candidate count).
    candidates: Point,
    /// At the service's probe share, per [`FILTER_SHARES`].
    filtered: Vec<Point>,
    e2e: Option<E2e>,
}

/// The served figures of one run.
#[derive(Debug, Clone, Copy, Default)]
struct E2e {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
    errors: usize,
    saturated_rps: f64,
    /// One engine thread, no batching, same index and catalogue.
    serial_rps: f64,
    /// A second catalogue going live under load: seconds from publishing to serving it,
    /// calls made meanwhile and how many failed.
    reload_s: f64,
    reload_calls: usize,
    reload_failed: usize,
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
    crate::language::write_section(a.out.as_deref(), &heading(a.items), &section(&a)?)
}

/// Runs the benchmark and returns the Markdown section ([`crate::markdown`]).
pub fn section(a: &RecommendArgs) -> anyhow::Result<String> {
    Ok(crate::markdown::recommendation_section(&measure(a)?))
}

/// Keeps about `share` of the items, independently of their embeddings (a hash of the index).
fn keep_share(share: f64) -> impl Fn(u32) -> bool {
    let cut = (share * 1_000_000.0) as u64;
    move |i: u32| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 1_000_000 < cut
}

/// The probe shares measured: the requested ones and the service's, sorted.
fn probes(a: &RecommendArgs, default: f64) -> Vec<f64> {
    let mut p = a.probe.clone();
    p.push(default);
    p.sort_by(f64::total_cmp);
    p.dedup();
    p
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
        if let Some(m) = a.min_scan {
            s.recommendation.ivf_min_scan = m;
        }
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

    let fairness = if a.retrieval_only {
        None
    } else {
        Some(fairness(&settings, &data, &emb)?)
    };
    let rec = &settings.recommendation;
    let params = rec.index_params();
    let default_probe = rec.ivf_probe_share;
    let probes = probes(a, default_probe);
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
        let index = ItemIndex::build(&big_emb, params)?;
        let build_s = t.elapsed().as_secs_f64();
        let rss = rss_mib() - before;
        let index_mib = index.heap_bytes() as f64 / (1 << 20) as f64;
        let process_mib = rss_mib();
        eprintln!(
            "   index built in {build_s:.2} s: {} lists, {index_mib:.1} MiB (RSS +{rss:.0} MiB, process {process_mib:.0} MiB)",
            index.lists()
        );
        let top100 = reference(a, &big_emb, &queries, 100, None);
        let exact = Point {
            p50_ms: percentile(&top100.lat_ms, 0.5),
            p99_ms: percentile(&top100.lat_ms, 0.99),
            recall: 1.0,
            recall_items: 1.0,
        };
        eprintln!(
            "   exact f32: p50 {:.3} ms p99 {:.3} ms",
            exact.p50_ms, exact.p99_ms
        );
        let rescore = rec.ivf_rescore;
        let mut sweep = Vec::new();
        for &p in &probes {
            let pt = point(a, &index, p, rescore, &big_emb, &queries, &top100, None);
            eprintln!(
                "   probe {p}: p50 {:.3} ms p99 {:.3} ms recall@100 {:.4} (items as queries {:.4})",
                pt.p50_ms, pt.p99_ms, pt.recall, pt.recall_items
            );
            sweep.push(pt);
        }
        let candidates = point(
            a,
            &index,
            default_probe,
            rescore,
            &big_emb,
            &queries,
            &reference(a, &big_emb, &queries, rec.candidates, None),
            None,
        );
        eprintln!(
            "   top-{} at the default: p50 {:.3} ms p99 {:.3} ms recall {:.4}",
            rec.candidates, candidates.p50_ms, candidates.p99_ms, candidates.recall
        );
        let mut filtered = Vec::new();
        for share in FILTER_SHARES {
            let keep = keep_share(share);
            let pt = point(
                a,
                &index,
                default_probe,
                rescore,
                &big_emb,
                &queries,
                &reference(a, &big_emb, &queries, 100, Some(&keep)),
                Some(&keep),
            );
            eprintln!(
                "   filter keeping {share}: p50 {:.3} ms p99 {:.3} ms recall@100 {:.4} (items {:.4})",
                pt.p50_ms, pt.p99_ms, pt.recall, pt.recall_items
            );
            filtered.push(pt);
        }
        let e2e = if a.retrieval_only {
            None
        } else {
            Some(end_to_end(
                a,
                &settings,
                (&data, &emb),
                big,
                big_emb,
                index,
                &users,
            )?)
        };
        runs.push(Run {
            build_s,
            index_mib,
            rss_mib: rss,
            process_mib,
            exact,
            sweep,
            candidates,
            filtered,
            e2e,
        });
    }
    Ok(figures(a, &settings, &probes, &runs, fairness))
}

/// Exact f32 answers the recall of every setting is measured against, computed once per
/// `k` and filter (at 5M items one exact search takes ~150 ms).
struct Reference {
    k: usize,
    /// Per recall query: users' embeddings, then items' (the item itself left out).
    users: Vec<Vec<Scored>>,
    items: Vec<(usize, Vec<Scored>)>,
    /// Exact search latencies of the user queries, sorted.
    lat_ms: Vec<f64>,
}

fn reference(
    a: &RecommendArgs,
    emb: &Matrix,
    queries: &Matrix,
    k: usize,
    keep: Option<&dyn Fn(u32) -> bool>,
) -> Reference {
    let n = a.recall_queries.clamp(1, queries.rows);
    let mut lat_ms = Vec::with_capacity(n);
    let users = (0..n)
        .map(|q| {
            let t = Instant::now();
            let out = exact_search(emb, queries.row(q), k, |i| keep.is_none_or(|f| f(i)));
            lat_ms.push(t.elapsed().as_secs_f64() * 1e3);
            out
        })
        .collect();
    lat_ms.sort_by(f64::total_cmp);
    // Items as queries, spread over real and synthetic items.
    let items = emb.rows - 1;
    let items = (0..n)
        .map(|q| {
            let item = 1 + (q * 4_999) % items;
            let pass = |i: u32| i as usize != item && keep.is_none_or(|f| f(i));
            (item, exact_search(emb, emb.row(item), k, pass))
        })
        .collect();
    Reference {
        k,
        users,
        items,
        lat_ms,
    }
}

/// One retrieval setting: single-thread top-k latency percentiles over `--queries`, and mean
/// recall@k against the exact answers (with the same filter).
#[allow(clippy::too_many_arguments)]
fn point(
    a: &RecommendArgs,
    index: &ItemIndex,
    probe: f64,
    rescore: usize,
    emb: &Matrix,
    queries: &Matrix,
    reference: &Reference,
    keep: Option<&dyn Fn(u32) -> bool>,
) -> Point {
    let k = reference.k;
    let view = index.with_scan(probe, rescore);
    let mut lat = Vec::with_capacity(a.queries);
    for q in 0..a.queries {
        let query = queries.row(q % queries.rows);
        let t = Instant::now();
        let out = view.search_stats(emb, query, k, keep);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    lat.sort_by(f64::total_cmp);
    let mut total = 0.0;
    for (q, exact) in reference.users.iter().enumerate() {
        total += recall(&view.search_stats(emb, queries.row(q), k, keep).0, exact);
    }
    let mut total_items = 0.0;
    for (item, exact) in &reference.items {
        let pass = |i: u32| i as usize != *item && keep.is_none_or(|f| f(i));
        total_items += recall(
            &view.search_stats(emb, emb.row(*item), k, Some(&pass)).0,
            exact,
        );
    }
    Point {
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        recall: total / reference.users.len() as f64,
        recall_items: total_items / reference.items.len() as f64,
    }
}

/// A `Recommend` for the n-th user (cycled).
fn request(users: &[i64], n: usize) -> pb::RecommendRequest {
    pb::RecommendRequest {
        subject: Some(pb::recommend_request::Subject::UserId(
            users[n % users.len()],
        )),
        k: 20,
        ..Default::default()
    }
}

/// `callers` closed-loop callers for `secs`: completed calls per second.
async fn saturate(
    client: &pb::recommender_client::RecommenderClient<tonic::transport::Channel>,
    users: &[i64],
    callers: usize,
    secs: f64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..callers {
        let mut c = client.clone();
        let users = users.to_vec();
        workers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while start.elapsed().as_secs_f64() < secs {
                if c.recommend(request(&users, w * 131 + n)).await.is_ok() {
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
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// A temporary model repository holding the served model's newest version as version 1
/// (linked, not copied), so the bench can publish a version 2 into it.
fn reload_repo(
    settings: &marquee_recommendation::Settings,
    data: &ModelData,
) -> anyhow::Result<PathBuf> {
    let repo = tempfile_dir("repo")?;
    let model = repo.join("recommender");
    std::fs::create_dir_all(&model)?;
    let src = marquee_recommendation::model_dir(settings);
    std::fs::copy(src.join("model.toml"), model.join("model.toml"))?;
    std::os::unix::fs::symlink(
        std::fs::canonicalize(src.join(&data.version))?,
        model.join("1"),
    )?;
    Ok(repo)
}

/// Serves the big catalogue over gRPC and loads it: the fixed-rate load, the saturated
/// throughput (then the same with one unbatched engine thread), and a second catalogue of the
/// same size going live under load.
fn end_to_end(
    a: &RecommendArgs,
    settings: &marquee_recommendation::Settings,
    real: (&ModelData, &Matrix),
    data: ModelData,
    emb: Matrix,
    index: ItemIndex,
    users: &[(i64, u32)],
) -> anyhow::Result<E2e> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let users: Vec<i64> = users.iter().map(|u| u.0).collect();
    let serial_index = index.clone();
    // Version 2: another synthetic catalogue of the same size, built while version 1 serves
    // (its index is built by the service at load, as a real new version's is).
    let (v2, v2_emb) =
        marquee_recommendation::synthetic::expand(real.0, real.1, a.items, a.noise, 0xbeef);
    let out = rt.block_on(async {
        let serial = {
            let mut s = settings.clone();
            s.repository.lanes = Some(1);
            s.recommendation.engine_batch = 1;
            let state = tempfile_dir("serial")?;
            s.recommendation.state_dir = state.clone();
            let shutdown = CancellationToken::new();
            let running = marquee_recommendation::start_with_parts(
                s,
                vec![Preloaded {
                    data: data.clone(),
                    item_emb: emb.clone(),
                    index: Some(serial_index),
                }],
                shutdown.clone(),
            )
            .await?;
            let client = connect(running.grpc_addr).await?;
            for n in 0..20 {
                client.clone().recommend(request(&users, n)).await?;
            }
            let rps = saturate(&client, &users, a.callers, 5.0).await?;
            shutdown.cancel();
            let _ = running.task.await;
            let _ = std::fs::remove_dir_all(&state);
            rps
        };
        eprintln!("   one engine thread, unbatched: saturated {serial:.0} req/s");

        let repo = reload_repo(settings, &data)?;
        let state = tempfile_dir("state")?;
        let mut s = settings.clone();
        s.repository.path = repo.clone();
        s.recommendation.state_dir = state.clone();
        let mut v2 = v2;
        v2.version = "2".into();
        let shutdown = CancellationToken::new();
        let running = marquee_recommendation::start_with_parts(
            s,
            vec![
                Preloaded {
                    data,
                    item_emb: emb,
                    index: Some(index),
                },
                Preloaded {
                    data: v2,
                    item_emb: v2_emb,
                    index: None,
                },
            ],
            shutdown.clone(),
        )
        .await?;
        let client = connect(running.grpc_addr).await?;
        for n in 0..20 {
            client.clone().recommend(request(&users, n)).await?;
        }
        let load = open_loop(&client, a.rate, a.seconds, |n| request(&users, n + 1000)).await?;
        let sat = saturate(&client, &users, a.callers, 5.0).await?;
        eprintln!(
            "   at {} req/s: p50 {:.2} ms p99 {:.2} ms, {:.1} req/s, {} errors; saturated {sat:.0} req/s",
            a.rate,
            percentile(&load.latencies_ms, 0.5),
            percentile(&load.latencies_ms, 0.99),
            load.latencies_ms.len() as f64 / load.elapsed_s,
            load.errors
        );
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

        // Reload under load: callers at the fixed rate's pace until version 2 answers.
        let (calls, failed, on_v2) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut callers = Vec::new();
        for w in 0..4usize {
            let (mut c, users) = (client.clone(), users.clone());
            let (calls, failed, on_v2) = (calls.clone(), failed.clone(), on_v2.clone());
            callers.push(tokio::spawn(async move {
                let mut n = 0;
                while !on_v2.load(Ordering::Relaxed) {
                    n += 1;
                    calls.fetch_add(1, Ordering::Relaxed);
                    match c.recommend(request(&users, w * 977 + n)).await {
                        Ok(r) if r.get_ref().model_version == "2" => {
                            on_v2.store(true, Ordering::Relaxed)
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("   call failed during the reload: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let published = Instant::now();
        publish_version_2(&repo)?;
        let repo_handle = running.repo.clone();
        let refused = async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(r) = repo_handle.refused().into_iter().next() {
                    return r;
                }
            }
        };
        let reload = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(600), futures::future::join_all(callers)) => {
                r.map_err(|_| anyhow::anyhow!("version 2 did not go live within 10 minutes"))?
            }
            r = refused => anyhow::bail!("version 2 was refused: {r:?}"),
        };
        for r in reload {
            r?;
        }
        let reload_s = published.elapsed().as_secs_f64();
        eprintln!(
            "   version 2 live {reload_s:.1} s after publishing: {} calls, {} failed",
            calls.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
        shutdown.cancel();
        let _ = running.task.await;
        let _ = std::fs::remove_dir_all(&state);
        let _ = std::fs::remove_dir_all(&repo);
        Ok::<_, anyhow::Error>(E2e {
            p50_ms: percentile(&load.latencies_ms, 0.5),
            p99_ms: percentile(&load.latencies_ms, 0.99),
            rps: load.latencies_ms.len() as f64 / load.elapsed_s,
            errors: load.errors,
            saturated_rps: sat,
            serial_rps: serial,
            reload_s,
            reload_calls: calls.load(Ordering::Relaxed),
            reload_failed: failed.load(Ordering::Relaxed),
        })
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    out
}

/// Version 2 of the temporary repository: the same model files (the catalogue it serves is
/// the preloaded synthetic one), published as the repository watcher expects.
fn publish_version_2(repo: &Path) -> anyhow::Result<()> {
    let model = repo.join("recommender");
    let target = std::fs::read_link(model.join("1"))?;
    std::os::unix::fs::symlink(target, model.join("2"))?;
    Ok(())
}

async fn connect(
    addr: std::net::SocketAddr,
) -> anyhow::Result<pb::recommender_client::RecommenderClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(pb::recommender_client::RecommenderClient::new(ch))
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

fn tempfile_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("marquee-bench-rec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
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

/// One retrieval setting's figures, each the median over the runs.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Retrieval {
    /// Share of the catalogue scanned (before a filter's correction).
    pub(crate) probe: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Mean recall against exact f32 search, users' embeddings as queries.
    pub(crate) recall: f64,
    /// The same with items' embeddings as queries (`SimilarItems`).
    pub(crate) recall_items: f64,
}

/// The served figures, each the median over the runs.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Served {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Achieved requests per second at the offered rate.
    pub(crate) rps: f64,
    /// Failed calls, summed over the runs.
    pub(crate) errors: usize,
    pub(crate) saturated_rps: f64,
    /// One engine thread, unbatched, same run.
    pub(crate) serial_rps: f64,
    pub(crate) reload_s: f64,
    /// Calls during the reloads and failed ones, summed over the runs.
    pub(crate) reload_calls: usize,
    pub(crate) reload_failed: usize,
}

/// The recommender's figures (each the median over the runs unless said otherwise) and the
/// settings they were measured with.
#[derive(Clone, Debug)]
pub(crate) struct RecommendFigures {
    /// Synthetic catalogue size.
    pub(crate) items: usize,
    /// Per-dimension Gaussian noise of synthetic item embeddings.
    pub(crate) noise: f32,
    /// Partitions of the built index.
    pub(crate) lists: usize,
    /// The service's scan share and re-scored candidates.
    pub(crate) probe: f64,
    pub(crate) rescore: usize,
    /// Runs measured (catalogue and index built each time).
    pub(crate) runs: usize,
    pub(crate) cores: usize,
    /// The service's candidate count, default MMR λ and long-tail floor.
    pub(crate) candidates: usize,
    pub(crate) diversity: f32,
    pub(crate) long_tail_floor: f32,
    /// Offered requests per second of the open-loop load.
    pub(crate) rate: f64,
    /// Engine worker threads, requests per engine batch and saturation callers.
    pub(crate) workers: usize,
    pub(crate) batch: usize,
    pub(crate) callers: usize,
    pub(crate) build_s: f64,
    /// What the index holds beyond the f32 vectors (codes, ids, centroids).
    pub(crate) index_mib: f64,
    /// RSS growth during the first build (temporaries included).
    pub(crate) rss_mib: f64,
    /// Process RSS with the catalogue, vectors and index in memory (and the bench's own
    /// copy of the real model and its query embeddings).
    pub(crate) process_mib: f64,
    pub(crate) exact: Retrieval,
    /// Top-100, one per measured scan share, ascending.
    pub(crate) sweep: Vec<Retrieval>,
    /// Top-`candidates` at the service's scan share.
    pub(crate) candidate_set: Retrieval,
    /// Top-100 at the service's scan share with filters keeping [`FILTER_SHARES`].
    pub(crate) filtered: Vec<(f64, Retrieval)>,
    pub(crate) served: Option<Served>,
    pub(crate) fairness: Option<Fairness>,
}

/// The runs' medians and the settings they ran with.
fn figures(
    a: &RecommendArgs,
    settings: &marquee_recommendation::Settings,
    probes: &[f64],
    runs: &[Run],
    fairness: Option<Fairness>,
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
    let retrieval = |probe: f64, f: &dyn Fn(&Run) -> Point| Retrieval {
        probe,
        p50_ms: med(&|r| f(r).p50_ms),
        p99_ms: med(&|r| f(r).p99_ms),
        recall: med(&|r| f(r).recall),
        recall_items: med(&|r| f(r).recall_items),
    };
    let served = runs.iter().all(|r| r.e2e.is_some()).then(|| {
        let e = |f: &dyn Fn(&E2e) -> f64| med(&|r| r.e2e.map_or(f64::NAN, |e| f(&e)));
        let sum =
            |f: &dyn Fn(&E2e) -> usize| runs.iter().filter_map(|r| r.e2e).map(|e| f(&e)).sum();
        Served {
            p50_ms: e(&|e| e.p50_ms),
            p99_ms: e(&|e| e.p99_ms),
            rps: e(&|e| e.rps),
            errors: sum(&|e| e.errors),
            saturated_rps: e(&|e| e.saturated_rps),
            serial_rps: e(&|e| e.serial_rps),
            reload_s: e(&|e| e.reload_s),
            reload_calls: sum(&|e| e.reload_calls),
            reload_failed: sum(&|e| e.reload_failed),
        }
    });
    let lists = if rec.ivf_lists == 0 {
        ((a.items as f64).sqrt().round() as usize).max(1)
    } else {
        rec.ivf_lists
    };
    RecommendFigures {
        items: a.items,
        noise: a.noise,
        lists,
        probe: rec.ivf_probe_share,
        rescore: rec.ivf_rescore,
        runs: runs.len(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        candidates: rec.candidates,
        diversity: rec.default_diversity,
        long_tail_floor: rec.long_tail_floor,
        rate: a.rate,
        workers: a.workers,
        batch: rec.engine_batch,
        callers: a.callers,
        build_s: med(&|r| r.build_s),
        index_mib: med(&|r| r.index_mib),
        rss_mib: runs.first().map_or(f64::NAN, |r| r.rss_mib),
        process_mib: med(&|r| r.process_mib),
        exact: retrieval(1.0, &|r| r.exact),
        sweep: probes
            .iter()
            .enumerate()
            .map(|(i, &p)| retrieval(p, &|r| r.sweep[i]))
            .collect(),
        candidate_set: retrieval(rec.ivf_probe_share, &|r| r.candidates),
        filtered: FILTER_SHARES
            .iter()
            .enumerate()
            .map(|(i, &share)| (share, retrieval(rec.ivf_probe_share, &|r| r.filtered[i])))
            .collect(),
        served,
        fairness,
    }
}
