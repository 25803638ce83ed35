//! Prometheus metrics, one registry per server (so servers in one test process do not mix).
//!
//! Names follow `marquee_<area>_<name>_<unit>`; labels are few and bounded (`model`, `method`,
//! `code`): never a user id or free text.

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every histogram bucket table of every Marquee service, in one place, so a dashboard's
/// quantiles mean the same thing wherever a metric comes from.
pub mod buckets {
    /// Request and queue latency in seconds: 100 µs .. 10 s.
    pub const LATENCY: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    /// Items per model execution or per coalesced call.
    pub const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    /// Token latency in seconds (time to first token, between tokens, one step): 1 ms .. 10 s.
    pub const TOKEN_LATENCY: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0,
    ];
    /// Token positions of work per engine iteration: powers of two, so that a power-of-two
    /// budget is a bucket bound and "never above the budget" reads off one bucket.
    pub const TOKEN_COUNT: &[f64] = &[
        16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    ];
    /// One stage of an in-process pipeline (retrieve, rank, …): 50 µs .. 1 s.
    pub const STAGE: &[f64] = &[
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ];
}

/// Creates metrics and registers them in one registry: the one way every service does it.
#[derive(Clone, Copy)]
pub struct Registrar<'a>(pub &'a Registry);

impl Registrar<'_> {
    /// Registers `metric` and returns it.
    pub fn register<C: Collector + Clone + 'static>(self, metric: C) -> prometheus::Result<C> {
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    pub fn counter(self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.register(IntCounter::new(name, help)?)
    }

    pub fn counter_vec(
        self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        self.register(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    pub fn gauge_vec(
        self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntGaugeVec> {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    /// A histogram with one of the [`buckets`] tables.
    pub fn histogram_vec(
        self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> prometheus::Result<HistogramVec> {
        self.register(HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )?)
    }
}

/// All metrics of one server.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// gRPC calls finished, by method and status code.
    pub grpc_requests: IntCounterVec,
    /// gRPC call latency, by method.
    pub grpc_duration: HistogramVec,
    /// Model executions (forward passes), by model.
    pub batches: IntCounterVec,
    /// Items computed, by model. `items / batches` is the mean batch size.
    pub batch_items: IntCounterVec,
    /// Distribution of items per model execution.
    pub batch_size: HistogramVec,
    /// Time items waited in the queue before compute.
    pub queue_wait: HistogramVec,
    /// Time of one model execution.
    pub compute: HistogramVec,
    /// Items waiting, by model.
    pub queue_depth: IntGaugeVec,
    /// Items refused or dropped before compute, by model and reason
    /// (`queue_full`, `deadline`, `cancelled`).
    pub rejected: IntCounterVec,
    /// 1 while a model version is loaded and warmed up.
    pub model_ready: IntGaugeVec,
    /// Batch cap chosen by warm-up profiling, by model.
    pub effective_batch: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        // Fixed names and labels: registering them can only fail on a bug.
        let r = Registrar(&registry);
        let bug = "valid, unique metric, this is a bug";
        let counter =
            |name: &str, help: &str, labels: &[&str]| r.counter_vec(name, help, labels).expect(bug);
        let gauge =
            |name: &str, help: &str, labels: &[&str]| r.gauge_vec(name, help, labels).expect(bug);
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            r.histogram_vec(name, help, labels, buckets).expect(bug)
        };
        Self {
            grpc_requests: counter(
                "marquee_grpc_requests_total",
                "gRPC calls finished.",
                &["method", "code"],
            ),
            grpc_duration: histogram(
                "marquee_grpc_request_duration_seconds",
                "gRPC call latency until the response headers (streams: until the first message).",
                &["method"],
                buckets::LATENCY,
            ),
            batches: counter(
                "marquee_batcher_batches_total",
                "Model executions.",
                &["model"],
            ),
            batch_items: counter("marquee_batcher_items_total", "Items computed.", &["model"]),
            batch_size: histogram(
                "marquee_batcher_batch_size",
                "Items per model execution.",
                &["model"],
                buckets::BATCH,
            ),
            queue_wait: histogram(
                "marquee_batcher_queue_wait_seconds",
                "Time items waited before compute.",
                &["model"],
                buckets::LATENCY,
            ),
            compute: histogram(
                "marquee_model_compute_seconds",
                "Time of one model execution.",
                &["model"],
                buckets::LATENCY,
            ),
            queue_depth: gauge("marquee_batcher_queue_depth", "Items waiting.", &["model"]),
            rejected: counter(
                "marquee_batcher_rejected_total",
                "Items refused, dropped before compute, or failed for lack of memory (`out_of_memory`).",
                &["model", "reason"],
            ),
            model_ready: gauge(
                "marquee_model_ready",
                "1 while a model version is ready.",
                &["model", "version"],
            ),
            effective_batch: gauge(
                "marquee_batcher_effective_max_batch",
                "Batch cap chosen by warm-up profiling.",
                &["model"],
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail, this is a bug");
        String::from_utf8(buf).expect("prometheus text is UTF-8, this is a bug")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
