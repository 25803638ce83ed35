//! `marquee-bench stores`: the recommender's two feedback stores side by side, in one run on
//! one machine: `RecordFeedback` throughput (closed loop, `--writers` callers) with its
//! latency, then `Recommend` p50/p99 at a fixed rate for the users who just gave feedback (so
//! the PostgreSQL store reads real rows), on the real catalogue. The database is a throwaway
//! cluster on loopback (the tests' harness, Debian's `postgresql`), `synchronous_commit = on`
//! and `fsync = on` like production. Each run measures both stores, in alternating order; the
//! report shows medians and the median of the same-run ratios.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use marquee_proto::recommendation as pb;
use marquee_recommendation::StoreKind;
use tokio_util::sync::CancellationToken;

use crate::{median, percentile};

/// The report section's heading.
// Not a prefix of another section's heading: `replace_section` finds the first match.
pub(crate) const HEADING: &str = "## Feedback stores";

#[derive(Args, Clone)]
pub struct StoresArgs {
    /// The model repository (with `recommender/`).
    #[arg(long, default_value = "model-repository")]
    pub repo: PathBuf,
    /// Repetitions (each measures both stores); the report shows medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds of each phase (feedback, then recommendations).
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Concurrent `RecordFeedback` callers.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// Distinct users the feedback goes to (and the recommendations are for).
    #[arg(long, default_value_t = 500)]
    pub users: usize,
    /// `Recommend` requests per second (open loop).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Report to update: its section is replaced (or appended); otherwise it is printed.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl StoresArgs {
    /// The defaults above, for `marquee-bench all`.
    pub fn with_defaults(repo: PathBuf, runs: usize) -> Self {
        Self {
            repo,
            runs,
            seconds: 8.0,
            writers: 8,
            users: 500,
            rate: 50.0,
            out: None,
        }
    }
}

/// One store in one run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StoreRun {
    pub(crate) feedback_per_s: f64,
    pub(crate) feedback_p50_ms: f64,
    pub(crate) feedback_p99_ms: f64,
    pub(crate) feedback_errors: usize,
    pub(crate) recommend_p50_ms: f64,
    pub(crate) recommend_p99_ms: f64,
    pub(crate) recommend_rps: f64,
    pub(crate) recommend_errors: usize,
}

/// What the section renders.
#[derive(Debug, Clone)]
pub(crate) struct StoresFigures {
    pub(crate) runs: usize,
    pub(crate) seconds: f64,
    pub(crate) writers: usize,
    pub(crate) users: usize,
    pub(crate) rate: f64,
    /// Median latency of one 42-byte append + `fdatasync` in the bench's scratch folder: the
    /// file store's serial floor per event (it appends and syncs under one lock).
    pub(crate) fdatasync_us: f64,
    /// Medians over runs: file, postgres.
    pub(crate) file: StoreRun,
    pub(crate) postgres: StoreRun,
    /// Medians of the same-run ratios postgres / file: feedback throughput, Recommend p50, p99.
    pub(crate) ratio_feedback: f64,
    pub(crate) ratio_p50: f64,
    pub(crate) ratio_p99: f64,
}

pub fn run(a: StoresArgs) -> anyhow::Result<()> {
    crate::language::write_section(a.out.as_deref(), HEADING, &section(&a)?)
}

/// Runs the benchmark and returns the Markdown section.
pub fn section(a: &StoresArgs) -> anyhow::Result<String> {
    Ok(crate::markdown::stores_section(&measure(a)?))
}

fn median_of(runs: &[StoreRun], f: impl Fn(&StoreRun) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

fn medians(runs: &[StoreRun]) -> StoreRun {
    StoreRun {
        feedback_per_s: median_of(runs, |r| r.feedback_per_s),
        feedback_p50_ms: median_of(runs, |r| r.feedback_p50_ms),
        feedback_p99_ms: median_of(runs, |r| r.feedback_p99_ms),
        feedback_errors: runs.iter().map(|r| r.feedback_errors).sum(),
        recommend_p50_ms: median_of(runs, |r| r.recommend_p50_ms),
        recommend_p99_ms: median_of(runs, |r| r.recommend_p99_ms),
        recommend_rps: median_of(runs, |r| r.recommend_rps),
        recommend_errors: runs.iter().map(|r| r.recommend_errors).sum(),
    }
}

pub(crate) fn measure(a: &StoresArgs) -> anyhow::Result<StoresFigures> {
    let pg = marquee_e2e::postgres::Postgres::start();
    let scratch = tempfile::tempdir()?;
    let url_file = pg.url_file(scratch.path());
    let key_file = scratch.path().join("user_id.key");
    std::fs::write(&key_file, [0x5a; 32])?;
    let items = catalogue_items(&a.repo)?;
    let fdatasync_us = fdatasync_latency_us(scratch.path())?;
    eprintln!("== fdatasync of a small append here: {fdatasync_us:.0} µs (median)");
    let (mut file, mut postgres) = (Vec::new(), Vec::new());
    for run in 0..a.runs {
        // Alternate which store goes first: neither always meets a warmer page cache.
        let order = if run % 2 == 0 {
            [StoreKind::File, StoreKind::Postgres]
        } else {
            [StoreKind::Postgres, StoreKind::File]
        };
        for store in order {
            let state_dir = scratch.path().join(format!("state-{run}-{store:?}"));
            let mut s = marquee_recommendation::Settings::default();
            s.repository.path = a.repo.clone();
            s.repository.threads = Some(1);
            s.repository.lanes = Some(1);
            s.repository.poll_interval_ms = 0;
            s.server.grpc_addr = "127.0.0.1:0".parse()?;
            s.server.admin_addr = "127.0.0.1:0".parse()?;
            s.recommendation.state_dir = state_dir;
            s.recommendation.store = store;
            if store == StoreKind::Postgres {
                s.recommendation.postgres.url_file = Some(url_file.clone());
                s.recommendation.user_id_key_file = Some(key_file.clone());
                // Each run starts from empty tables, as the file store starts from no log.
                pg.query(
                    "DO $$ BEGIN IF to_regclass('marquee_feedback') IS NOT NULL THEN \
                     TRUNCATE marquee_feedback, marquee_forgotten; END IF; END $$",
                );
            }
            eprintln!("== stores run {}/{}: {store:?}", run + 1, a.runs);
            let r = one(a, s, &items, run)?;
            eprintln!(
                "   RecordFeedback {:.0}/s (p50 {:.2} ms, p99 {:.2} ms, {} errors); Recommend at {}/s: p50 {:.2} ms, p99 {:.2} ms ({:.1}/s, {} errors)",
                r.feedback_per_s,
                r.feedback_p50_ms,
                r.feedback_p99_ms,
                r.feedback_errors,
                a.rate,
                r.recommend_p50_ms,
                r.recommend_p99_ms,
                r.recommend_rps,
                r.recommend_errors
            );
            match store {
                StoreKind::File => file.push(r),
                StoreKind::Postgres => postgres.push(r),
            }
        }
    }
    let ratios = |f: fn(&StoreRun) -> f64| {
        median(
            file.iter()
                .zip(&postgres)
                .map(|(fi, pg)| f(pg) / f(fi))
                .collect(),
        )
    };
    Ok(StoresFigures {
        runs: a.runs,
        seconds: a.seconds,
        writers: a.writers,
        users: a.users,
        rate: a.rate,
        fdatasync_us,
        ratio_feedback: ratios(|r| r.feedback_per_s),
        ratio_p50: ratios(|r| r.recommend_p50_ms),
        ratio_p99: ratios(|r| r.recommend_p99_ms),
        file: medians(&file),
        postgres: medians(&postgres),
    })
}

/// Median of 500 appends of one feedback record's size, each followed by `fdatasync`.
fn fdatasync_latency_us(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("fdatasync.probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let mut lat = Vec::with_capacity(500);
    for _ in 0..500 {
        let t = Instant::now();
        f.write_all(&[0u8; 42])?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    std::fs::remove_file(&path)?;
    Ok(median(lat))
}

/// Catalogue item ids, in a fixed order.
fn catalogue_items(repo: &Path) -> anyhow::Result<Vec<i64>> {
    let data = marquee_recommendation::model::ModelData::load(&repo.join("recommender"))?;
    let mut ids: Vec<i64> = data.catalog.by_id.keys().copied().collect();
    ids.sort_unstable();
    Ok(ids)
}

/// One store: start a recommender on it, the feedback phase, the recommendation phase.
fn one(
    a: &StoresArgs,
    settings: marquee_recommendation::Settings,
    items: &[i64],
    run: usize,
) -> anyhow::Result<StoreRun> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let items = Arc::new(items.to_vec());
    // Users no model knows, distinct per run: every history is this run's feedback.
    let first_user = 8_000_000 + (run as i64) * 1_000_000;
    let users = a.users as i64;
    let out = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let running = marquee_recommendation::start(settings, shutdown.clone()).await?;
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", running.grpc_addr))?
            .connect()
            .await?;
        let client = pb::recommender_client::RecommenderClient::new(ch);

        // Feedback: closed loop, each writer cycling through users and items.
        let phase = Duration::from_secs_f64(a.seconds);
        let start = Instant::now();
        let mut writers = Vec::new();
        for w in 0..a.writers {
            let (mut c, items) = (client.clone(), items.clone());
            writers.push(tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0usize);
                let mut n = w;
                while start.elapsed() < phase {
                    let r = pb::RecordFeedbackRequest {
                        user_id: first_user + (n as i64 % users),
                        item_id: items[(n * 7919) % items.len()],
                        event: pb::FeedbackEvent::Watch as i32,
                        timestamp_ms: 0,
                    };
                    let t = Instant::now();
                    match c.record_feedback(r).await {
                        Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => errors += 1,
                    }
                    n += 7;
                }
                (lat, errors)
            }));
        }
        let (mut fb_lat, mut fb_errors) = (Vec::new(), 0);
        for w in writers {
            let (lat, errors) = w.await?;
            fb_lat.extend(lat);
            fb_errors += errors;
        }
        let fb_elapsed = start.elapsed().as_secs_f64();
        fb_lat.sort_by(f64::total_cmp);

        // Recommend: open loop at the fixed rate for those users.
        let load =
            crate::recommend::open_loop(&client, a.rate, a.seconds, |n| pb::RecommendRequest {
                subject: Some(pb::recommend_request::Subject::UserId(
                    first_user + (n as i64 * 31 % users),
                )),
                k: 20,
                ..Default::default()
            })
            .await?;
        shutdown.cancel();
        let _ = running.task.await;
        Ok::<_, anyhow::Error>(StoreRun {
            feedback_per_s: fb_lat.len() as f64 / fb_elapsed,
            feedback_p50_ms: percentile(&fb_lat, 0.5),
            feedback_p99_ms: percentile(&fb_lat, 0.99),
            feedback_errors: fb_errors,
            recommend_p50_ms: percentile(&load.latencies_ms, 0.5),
            recommend_p99_ms: percentile(&load.latencies_ms, 0.99),
            recommend_rps: load.latencies_ms.len() as f64 / load.elapsed_s,
            recommend_errors: load.errors,
        })
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    out
}
