//! Language metrics, registered in the server's registry next to the core ones. The core's
//! batcher metrics are reused with the same meaning (`queue_depth`, `queue_wait`, `rejected`,
//! `batch_size` = sequences per decode step, `model_ready`), so the batching dashboard and the
//! queue-saturation alert cover this service too.

use std::time::Duration;

use marquee_core::metrics::{Metrics, Registrar, buckets};
use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};

/// What became of an OIP request (the `outcome` label of `marquee_language_oip_requests_total`).
pub const OIP_OUTCOMES: &[&str] = &["computed", "failed", "deadline", "cancelled", "queue_full"];

#[derive(Clone)]
pub struct LanguageMetrics {
    pub core: Metrics,
    /// The model label of every series.
    pub model: String,
    pub generated_tokens: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub ttft: HistogramVec,
    pub inter_token: HistogramVec,
    pub step: HistogramVec,
    pub running: IntGaugeVec,
    pub kv_used: IntGaugeVec,
    pub kv_capacity: IntGaugeVec,
    pub budget_used: IntGaugeVec,
    pub budget_capacity: IntGaugeVec,
    pub finished: IntCounterVec,
    /// OIP requests by outcome (one of [`OIP_OUTCOMES`]).
    pub oip_requests: IntCounterVec,
    /// OIP requests accepted into the queue.
    pub oip_queued: IntCounterVec,
    pub oip_queue_depth: IntGaugeVec,
    pub oip_step_tokens: HistogramVec,
}

impl LanguageMetrics {
    /// The same series, labelled for `model` (the vectors are registered once, by [`Self::new`]).
    pub fn for_model(&self, model: &str) -> Self {
        Self {
            model: model.to_owned(),
            ..self.clone()
        }
    }

    /// Registers the language series in the server's registry (once per server), labelled for
    /// `model`; [`Self::for_model`] gives each further model its handle.
    pub fn new(core: &Metrics, model: &str) -> anyhow::Result<Self> {
        let r = Registrar(&core.registry);
        let counter = |name: &str, help: &str, labels: &[&str]| r.counter_vec(name, help, labels);
        let gauge = |name: &str, help: &str| r.gauge_vec(name, help, &["model"]);
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            r.histogram_vec(name, help, labels, buckets::TOKEN_LATENCY)
        };
        Ok(Self {
            core: core.clone(),
            model: model.to_owned(),
            generated_tokens: counter(
                "marquee_language_generated_tokens_total",
                "Tokens generated.",
                &["model"],
            )?,
            prompt_tokens: counter(
                "marquee_language_prompt_tokens_total",
                "Prompt tokens prefilled.",
                &["model"],
            )?,
            ttft: histogram(
                "marquee_language_time_to_first_token_seconds",
                "From arrival to the first generated token.",
                &["model"],
            )?,
            inter_token: histogram(
                "marquee_language_inter_token_latency_seconds",
                "Between consecutive generated tokens of one sequence.",
                &["model"],
            )?,
            step: histogram(
                "marquee_language_step_seconds",
                "One model step: `prefill` of admitted prompts or `decode` of the running batch.",
                &["model", "phase"],
            )?,
            running: gauge(
                "marquee_language_running_sequences",
                "Sequences in the running batch.",
            )?,
            kv_used: gauge(
                "marquee_language_kv_cache_used_tokens",
                "Token positions held in the KV cache.",
            )?,
            kv_capacity: gauge(
                "marquee_language_kv_cache_capacity_tokens",
                "Token positions the KV cache holds (max batch x context).",
            )?,
            budget_used: gauge(
                "marquee_language_token_budget_used",
                "Prompt + max_new_tokens reserved by running sequences.",
            )?,
            budget_capacity: gauge(
                "marquee_language_token_budget_capacity",
                "`language.max_total_tokens`.",
            )?,
            finished: counter(
                "marquee_language_finished_total",
                "Generations finished, by reason (length, stop, eos).",
                &["model", "reason"],
            )?,
            oip_requests: counter(
                "marquee_language_oip_requests_total",
                "OIP ModelInfer requests by outcome: computed, failed, or dropped before compute (deadline, cancelled, queue_full).",
                &["model", "outcome"],
            )?,
            oip_queued: counter(
                "marquee_language_oip_queued_total",
                "OIP ModelInfer requests accepted into the engine queue.",
                &["model"],
            )?,
            oip_queue_depth: gauge(
                "marquee_language_oip_queue_depth",
                "OIP ModelInfer requests waiting for the engine.",
            )?,
            oip_step_tokens: r.histogram_vec(
                "marquee_language_oip_step_tokens",
                "Token positions (rows x tokens) of OIP requests computed in one engine iteration.",
                &["model"],
                buckets::TOKEN_COUNT,
            )?,
        })
    }

    /// Counts an OIP request's outcome; `outcome` is one of [`OIP_OUTCOMES`].
    pub fn oip_outcome(&self, outcome: &'static str) {
        debug_assert!(OIP_OUTCOMES.contains(&outcome));
        self.oip_requests
            .with_label_values(&[&self.model, outcome])
            .inc();
    }

    /// The engine queue's depth: generation requests (the core gauge) and OIP requests.
    pub fn queue_depths(&self, generations: usize, forwards: usize) {
        self.core
            .queue_depth
            .with_label_values(&[&self.model])
            .set(generations as i64);
        self.oip_queue_depth
            .with_label_values(&[&self.model])
            .set(forwards as i64);
    }

    pub fn rejected(&self, reason: &str) {
        self.core
            .rejected
            .with_label_values(&[&self.model, reason])
            .inc();
    }

    pub fn observe_step(&self, phase: &str, took: Duration, sequences: usize) {
        self.step
            .with_label_values(&[&self.model, phase])
            .observe(took.as_secs_f64());
        let c = &self.core;
        c.compute
            .with_label_values(&[&self.model])
            .observe(took.as_secs_f64());
        c.batches.with_label_values(&[&self.model]).inc();
        c.batch_items
            .with_label_values(&[&self.model])
            .inc_by(sequences as u64);
    }
}
