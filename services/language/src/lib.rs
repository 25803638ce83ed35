//! The language service: text generation from a TorchScript causal language model with a KV
//! cache and continuous batching, streamed over `marquee.language.v1.TextGeneration`, plus raw
//! logits over the Open Inference Protocol.
#![forbid(unsafe_code)]

pub mod engine;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod service;
pub mod text;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use marquee_core::config::{ServerSettings, TelemetrySettings, Validate, is_device_name};
use marquee_core::metrics::Metrics;
use marquee_core::serve::{ServeParts, serve};
use marquee_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use marquee_proto::language::text_generation_server::TextGenerationServer;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

/// Service name in metadata, logs and traces.
pub const NAME: &str = "marquee-language";

/// Default of `language.oip_queue_capacity`: OIP calls are single forward passes; 64 waiting
/// is a few seconds of work at most on CPU, beyond which a caller is better told to retry.
pub const DEFAULT_OIP_QUEUE_CAPACITY: usize = 64;

/// Default of `language.oip_max_tokens_per_step`: 8 rows (the most one OIP request may have)
/// of the default model's 256-token context, so every request that was valid before the
/// budget existed still is. Lower it to favour the running streams over raw-logit callers.
pub const DEFAULT_OIP_MAX_TOKENS_PER_STEP: usize = 2048;

/// All settings of the language service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub telemetry: TelemetrySettings,
    pub language: LanguageSettings,
}

/// The model and the scheduler.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanguageSettings {
    /// The model repository (`<repository>/<model>/model.toml`, `<version>/model.pt`).
    pub repository: PathBuf,
    /// The `kind = "causal_lm"` model to serve.
    pub model: String,
    /// Sequences decoded together (KV-cache slots).
    pub max_batch_size: usize,
    /// Token budget of the running batch: the sum of prompt + `max_new_tokens` of every running
    /// sequence stays within it; waiting requests are admitted as it frees.
    pub max_total_tokens: usize,
    /// Requests waiting for admission; beyond it, `RESOURCE_EXHAUSTED` with `RetryInfo`.
    pub queue_capacity: usize,
    /// Newcomers are prefilled at most once every this many decode steps while sequences run:
    /// 1 favours time-to-first-token, larger values favour the running streams' throughput.
    pub decode_steps_per_prefill: usize,
    /// Prompt tokens one prefill may take (bounds how long a prefill stalls running streams).
    pub max_prefill_tokens: usize,
    /// OIP `ModelInfer` calls waiting for the engine; beyond it, `RESOURCE_EXHAUSTED` with
    /// `RetryInfo`.
    pub oip_queue_capacity: usize,
    /// Token positions (rows x tokens) of OIP `ModelInfer` work the engine computes per
    /// iteration, before its decode step: bounds how long raw-logit calls delay the running
    /// streams. A request larger than this is refused (`INVALID_ARGUMENT`); at least the
    /// model's context length.
    pub oip_max_tokens_per_step: usize,
    /// Upper bound of a request's `max_new_tokens`.
    pub max_new_tokens: usize,
    /// `max_new_tokens` when a request sets none.
    pub default_max_new_tokens: usize,
    /// Stop sequences per request, and bytes per stop sequence.
    pub max_stop_sequences: usize,
    pub max_stop_bytes: usize,
    /// Largest prompt accepted, in bytes, checked before tokenizing.
    pub max_prompt_bytes: usize,
    /// Overrides the model's `instance.threads` (libtorch intra-op threads of the engine).
    pub threads: Option<usize>,
    /// Overrides the model's `instance.device` (`cpu`, `cuda`, `cuda:N`).
    pub device: Option<String>,
}

impl Default for LanguageSettings {
    fn default() -> Self {
        Self {
            repository: PathBuf::from("model-repository"),
            model: "gpt_reviews".into(),
            max_batch_size: 32,
            // 32 sequences of the whole 256-token context.
            max_total_tokens: 8192,
            queue_capacity: 128,
            decode_steps_per_prefill: 4,
            max_prefill_tokens: 2048,
            oip_queue_capacity: DEFAULT_OIP_QUEUE_CAPACITY,
            oip_max_tokens_per_step: DEFAULT_OIP_MAX_TOKENS_PER_STEP,
            max_new_tokens: 256,
            default_max_new_tokens: 64,
            max_stop_sequences: 4,
            max_stop_bytes: 64,
            max_prompt_bytes: 16 << 10,
            threads: None,
            device: None,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        self.server.validate(errors);
        self.telemetry.validate(errors);
        let l = &self.language;
        for (key, value) in [
            ("max_batch_size", l.max_batch_size),
            ("max_total_tokens", l.max_total_tokens),
            ("queue_capacity", l.queue_capacity),
            ("decode_steps_per_prefill", l.decode_steps_per_prefill),
            ("max_prefill_tokens", l.max_prefill_tokens),
            ("oip_queue_capacity", l.oip_queue_capacity),
            ("oip_max_tokens_per_step", l.oip_max_tokens_per_step),
            ("max_new_tokens", l.max_new_tokens),
            ("default_max_new_tokens", l.default_max_new_tokens),
            ("max_stop_bytes", l.max_stop_bytes),
            ("max_prompt_bytes", l.max_prompt_bytes),
        ] {
            if value == 0 {
                errors.push(format!("`language.{key}` must be at least 1, got 0"));
            }
        }
        if l.default_max_new_tokens > l.max_new_tokens {
            errors.push(format!(
                "`language.default_max_new_tokens` ({}) must be <= `language.max_new_tokens` ({})",
                l.default_max_new_tokens, l.max_new_tokens
            ));
        }
        if l.max_prompt_bytes > self.server.max_message_bytes {
            errors.push(format!(
                "`language.max_prompt_bytes` ({}) must be <= `server.max_message_bytes` ({})",
                l.max_prompt_bytes, self.server.max_message_bytes
            ));
        }
        if l.model.is_empty() {
            errors.push("`language.model` must name a model".into());
        }
        if l.threads == Some(0) {
            errors.push("`language.threads` must be at least 1, got 0".into());
        }
        if let Some(d) = &l.device
            && !is_device_name(d)
        {
            errors.push(format!(
                "`language.device` must be `cpu`, `cuda` or `cuda:N`, got `{d}`"
            ));
        }
    }
}

/// A started language server.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    /// Resolves when the server has shut down.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Loads and warms up the model, then serves until `shutdown`.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let l = settings.language.clone();
    let files = model::ModelFiles::find(&l.repository, &l.model)?;
    let spec = files.manifest.language.clone();
    // Checks that need the model's context.
    if l.max_prefill_tokens < spec.context_length {
        anyhow::bail!(
            "`language.max_prefill_tokens` ({}) must be >= the model's context_length ({}), or a long prompt could never be admitted",
            l.max_prefill_tokens,
            spec.context_length
        );
    }
    if l.oip_max_tokens_per_step < spec.context_length {
        anyhow::bail!(
            "`language.oip_max_tokens_per_step` ({}) must be >= the model's context_length ({}), or a one-row full-context OIP request could never run",
            l.oip_max_tokens_per_step,
            spec.context_length
        );
    }
    if l.max_total_tokens < spec.context_length {
        anyhow::bail!(
            "`language.max_total_tokens` ({}) must be >= the model's context_length ({})",
            l.max_total_tokens,
            spec.context_length
        );
    }
    let device_name = l
        .device
        .clone()
        .unwrap_or_else(|| files.manifest.instance.device.clone());
    let device = marquee_core::model::parse_device(&device_name).map_err(anyhow::Error::msg)?;
    let metrics = Metrics::new();
    let liveness = marquee_core::liveness::Liveness::new();
    let lm = metrics::LanguageMetrics::new(&metrics, &l.model)?;
    let (health, health_service) = marquee_core::serve::health();
    health
        .set_service_status(&l.model, ServingStatus::NotServing)
        .await;
    let tokenizer_path = files.tokenizer.clone();
    let vocab_size = spec.vocab_size;
    let vocab = Arc::new(
        tokio::task::spawn_blocking(move || model::Vocab::load(&tokenizer_path, vocab_size))
            .await??,
    );
    let cfg = engine::EngineConfig {
        max_batch: l.max_batch_size,
        max_total_tokens: l.max_total_tokens,
        queue_capacity: l.queue_capacity,
        decode_steps_per_prefill: l.decode_steps_per_prefill,
        max_prefill_tokens: l.max_prefill_tokens,
        oip_queue_capacity: l.oip_queue_capacity,
        oip_max_tokens_per_step: l.oip_max_tokens_per_step,
        threads: l.threads.unwrap_or(files.manifest.instance.threads),
        device,
        liveness: liveness.clone(),
    };
    let (engine_files, engine_vocab, engine_lm) = (files.clone(), vocab.clone(), lm.clone());
    let engine = Arc::new(
        tokio::task::spawn_blocking(move || {
            engine::Engine::start(&engine_files, engine_vocab, cfg, engine_lm)
        })
        .await??,
    );
    lm.kv_capacity
        .with_label_values(&[&l.model])
        .set((l.max_batch_size * spec.context_length) as i64);
    lm.budget_capacity
        .with_label_values(&[&l.model])
        .set(l.max_total_tokens as i64);
    metrics
        .model_ready
        .with_label_values(&[&l.model, &files.version.to_string()])
        .set(1);
    tracing::info!(model = %l.model, version = files.version, context = spec.context_length, "model ready");

    let limits = validate::Limits {
        context_length: spec.context_length,
        max_new_tokens: l.max_new_tokens.min(spec.context_length - 1),
        default_max_new_tokens: l.default_max_new_tokens,
        max_stop_sequences: l.max_stop_sequences,
        max_stop_bytes: l.max_stop_bytes,
    };
    let language = Arc::new(service::Language::new(
        engine,
        vocab,
        l.model.clone(),
        files.version,
        spec.bos_token_id,
        limits,
        settings.server.clone(),
        l.max_prompt_bytes,
    ));
    let max = settings.server.max_message_bytes;
    let routes = tonic::service::Routes::new(
        TextGenerationServer::new(service::TextApi(language.clone()))
            .max_decoding_message_size(max),
    )
    .add_service(
        GrpcInferenceServiceServer::new(service::LanguageOip(language.clone()))
            .max_decoding_message_size(max),
    );
    health
        .set_service_status(&l.model, ServingStatus::Serving)
        .await;
    let drain_health = health.clone();
    let drain_model = l.model.clone();
    let ready_model = l.model.clone();
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ready_flag = draining.clone();
    let ready_engine = language.engine.clone();
    let parts = ServeParts {
        settings: settings.server.clone(),
        metrics: metrics.clone(),
        health,
        ready: Arc::new(move || {
            (!ready_flag.load(std::sync::atomic::Ordering::Relaxed) && ready_engine.is_serving())
                .then(|| ready_model.clone())
        }),
        liveness,
        on_drain: Box::new(move || {
            Box::pin(async move {
                draining.store(true, std::sync::atomic::Ordering::Relaxed);
                drain_health
                    .set_service_status(&drain_model, ServingStatus::NotServing)
                    .await;
            })
        }),
    };
    let serving = serve(parts, health_service, routes, shutdown).await?;
    Ok(Running {
        grpc_addr: serving.grpc_addr,
        admin_addr: serving.admin_addr,
        metrics,
        task: serving.task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oip_share_settings_must_be_positive() {
        let mut s = Settings::default();
        s.language.oip_queue_capacity = 0;
        s.language.oip_max_tokens_per_step = 0;
        let mut errors = Vec::new();
        s.validate(&mut errors);
        for key in ["oip_queue_capacity", "oip_max_tokens_per_step"] {
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains(&format!("`language.{key}` must be at least 1"))),
                "{errors:?}"
            );
        }
        let mut errors = Vec::new();
        Settings::default().validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }
}
