//! Prometheus metrics, one registry per server (so servers in one test process do not mix).
//!
//! Names follow `marquee_<area>_<name>_<unit>`; labels are few and bounded (`model`, `method`,
//! `code`): never a user id or free text.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, declared once: 100 µs .. 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Batch-size buckets (items per model execution).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

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
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("valid metric, this is a bug");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric, this is a bug");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)
                .expect("valid metric, this is a bug");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric, this is a bug");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid metric, this is a bug");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric, this is a bug");
            h
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
                LATENCY_BUCKETS,
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
                BATCH_BUCKETS,
            ),
            queue_wait: histogram(
                "marquee_batcher_queue_wait_seconds",
                "Time items waited before compute.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            compute: histogram(
                "marquee_model_compute_seconds",
                "Time of one model execution.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            queue_depth: gauge("marquee_batcher_queue_depth", "Items waiting.", &["model"]),
            rejected: counter(
                "marquee_batcher_rejected_total",
                "Items refused or dropped before compute.",
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
