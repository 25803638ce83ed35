//! Recommendation metrics on the server's registry: pipeline stage latency, cold starts,
//! feedback, forgotten users, and the exposure measures over every served list (catalogue
//! coverage, Gini of item exposure, long-tail share), computed when Prometheus scrapes.
//! No label ever carries a user or item id.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use marquee_core::metrics::{Registrar, buckets};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, HistogramVec, IntCounter, IntCounterVec, Registry};

use crate::engine::OutItem;
use crate::model::ModelData;
use crate::rerank::{ExposureStats, exposure_stats};

/// Served exposure counts.
#[derive(Default)]
struct Exposure {
    counts: Vec<u64>,
    long_tail_slots: u64,
    slots: u64,
}

/// Every recommendation metric.
#[derive(Clone)]
pub struct RecMetrics {
    stages: HistogramVec,
    /// Requests one engine thread served together (one user-tower and ranker forward).
    pub batch_requests: prometheus::Histogram,
    pub exact_fallbacks: IntCounter,
    pub cold_starts: IntCounter,
    pub served_items: IntCounter,
    pub feedback: IntCounterVec,
    pub forgotten: IntCounter,
    pub log_dropped_bytes: IntCounter,
    /// Feedback records removed by retention (`recommendation.retention_days`).
    pub purged: IntCounter,
    /// Feedback-log writes refused, by `error`: `write` (failed and cut off again),
    /// `unavailable` (refused until a repair or reopen succeeds), `compact` (ForgetUser).
    pub log_errors: IntCounterVec,
    /// Database calls that failed (nothing acknowledged), by `op`: record, read, forget.
    pub database_errors: IntCounterVec,
    exposure: Arc<Mutex<Exposure>>,
}

/// Computes the exposure gauges at scrape time (a Gini over the catalogue is a sort: cheap
/// per scrape, too dear per request on a large catalogue).
struct ExposureCollector {
    exposure: Arc<Mutex<Exposure>>,
    coverage: Gauge,
    gini: Gauge,
    long_tail: Gauge,
    descs: Vec<Desc>,
}

impl Collector for ExposureCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = {
            let e = self.exposure.lock().unwrap_or_else(|p| p.into_inner());
            exposure_stats(&e.counts, e.long_tail_slots, e.slots)
        };
        self.coverage.set(stats.coverage);
        self.gini.set(stats.gini);
        self.long_tail.set(stats.long_tail_share);
        let mut out = self.coverage.collect();
        out.extend(self.gini.collect());
        out.extend(self.long_tail.collect());
        out
    }
}

impl RecMetrics {
    /// Creates the metrics and registers them on `registry`; `num_items` sizes the exposure
    /// counts.
    pub fn new(registry: &Registry, num_items: usize) -> anyhow::Result<Self> {
        let r = Registrar(registry);
        let counter = |name: &str, help: &str| r.counter(name, help);
        let stages = r.histogram_vec(
            "marquee_recommendation_stage_seconds",
            "Time of one pipeline stage (retrieve: user tower and the filtered scan; rank, rerank, explain).",
            &["stage"],
            buckets::STAGE,
        )?;
        let batch_requests = r
            .histogram_vec(
                "marquee_recommendation_engine_batch_requests",
                "Requests one engine thread served together (one user-tower and one ranker forward).",
                &[],
                buckets::BATCH,
            )?
            .with_label_values(&[] as &[&str]);
        let feedback = r.counter_vec(
            "marquee_recommendation_feedback_events_total",
            "Feedback events recorded durably, by event type.",
            &["event"],
        )?;
        let log_errors = r.counter_vec(
            "marquee_recommendation_feedback_log_errors_total",
            "Feedback-log operations that failed (nothing acknowledged), by error: write, unavailable, compact.",
            &["error"],
        )?;
        let database_errors = r.counter_vec(
            "marquee_recommendation_database_errors_total",
            "Feedback-database calls that failed (nothing acknowledged), by op: record, read, forget.",
            &["op"],
        )?;
        // Exported at 0 from the start (a closed set): alerts on its rate see a series before
        // the first failure.
        for op in ["record", "read", "forget"] {
            database_errors.with_label_values(&[op]);
        }
        let exposure = Arc::new(Mutex::new(Exposure {
            counts: vec![0; num_items + 1],
            ..Exposure::default()
        }));
        let coverage = Gauge::new(
            "marquee_recommendation_catalog_coverage_ratio",
            "Distinct items served since start / catalogue size.",
        )?;
        let gini = Gauge::new(
            "marquee_recommendation_exposure_gini",
            "Gini coefficient of item exposure over the catalogue since start (0 = equal).",
        )?;
        let long_tail = Gauge::new(
            "marquee_recommendation_long_tail_share_ratio",
            "Share of served recommendation slots that went to long-tail items.",
        )?;
        let descs = [&coverage, &gini, &long_tail]
            .iter()
            .flat_map(|g| g.desc().into_iter().cloned())
            .collect();
        registry.register(Box::new(ExposureCollector {
            exposure: exposure.clone(),
            coverage,
            gini,
            long_tail,
            descs,
        }))?;
        Ok(Self {
            stages,
            batch_requests,
            exact_fallbacks: counter(
                "marquee_recommendation_exact_fallback_total",
                "Filtered retrievals that read the whole catalogue (a filter keeping few items: exact by construction).",
            )?,
            cold_starts: counter(
                "marquee_recommendation_cold_start_total",
                "Recommendations served to subjects without history.",
            )?,
            served_items: counter(
                "marquee_recommendation_served_items_total",
                "Items returned by Recommend.",
            )?,
            feedback,
            forgotten: counter(
                "marquee_recommendation_users_forgotten_total",
                "ForgetUser calls completed.",
            )?,
            purged: counter(
                "marquee_recommendation_feedback_purged_total",
                "Feedback records removed because they were older than the retention period.",
            )?,
            log_dropped_bytes: counter(
                "marquee_recommendation_feedback_log_dropped_bytes_total",
                "Bytes of torn or corrupt feedback-log tail cut off at start.",
            )?,
            log_errors,
            database_errors,
            exposure,
        })
    }

    /// Starts the exposure measures over again for a catalogue of `num_items` (a new model
    /// version: item indices of the old catalogue mean nothing in the new one).
    pub fn reset_exposure(&self, num_items: usize) {
        let mut e = self.exposure.lock().unwrap_or_else(|p| p.into_inner());
        *e = Exposure {
            counts: vec![0; num_items + 1],
            ..Exposure::default()
        };
    }

    /// A registry of its own (tools and benches).
    pub fn standalone(num_items: usize) -> Self {
        Self::new(&Registry::new(), num_items).expect("fresh registry, this is a bug")
    }

    /// Observes the time since `start` for `stage`.
    pub fn stage(&self, stage: &str, start: Instant) {
        self.stage_took(stage, start.elapsed());
    }

    /// Records a stage's duration measured elsewhere (a batched stage: what each of its
    /// requests waited).
    pub fn stage_took(&self, stage: &str, took: std::time::Duration) {
        self.stages
            .with_label_values(&[stage])
            .observe(took.as_secs_f64());
    }

    /// Counts one served list.
    pub fn record_served(&self, data: &ModelData, items: &[OutItem], cold: bool) {
        if cold {
            self.cold_starts.inc();
        }
        self.served_items.inc_by(items.len() as u64);
        let mut e = self.exposure.lock().unwrap_or_else(|p| p.into_inner());
        for it in items {
            if let Some(c) = e.counts.get_mut(it.index as usize) {
                *c += 1;
            }
            if data.catalog.items[it.index as usize].long_tail {
                e.long_tail_slots += 1;
            }
            e.slots += 1;
        }
    }

    /// The exposure measures now.
    pub fn exposure(&self) -> ExposureStats {
        let e = self.exposure.lock().unwrap_or_else(|p| p.into_inner());
        exposure_stats(&e.counts, e.long_tail_slots, e.slots)
    }
}
