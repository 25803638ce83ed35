//! The language service: text generation from a TorchScript causal language model with a KV
//! cache and continuous batching, streamed over `marquee.language.v1.TextGeneration`, plus raw
//! logits over the Open Inference Protocol.
#![forbid(unsafe_code)]

pub mod cache;
pub mod engine;
pub mod family;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod text;
pub mod validate;

use marquee_core::config::{
    KeysUsed, RepositorySettings, ServerSettings, TelemetrySettings, Validate,
    validate_model_service,
};
use marquee_core::kit::{ModelServer, Running};
use marquee_proto::language::text_generation_server::TextGenerationServer;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::family::LanguageFamily;

/// Service name in metadata, logs and traces.
pub const NAME: &str = "marquee-language";
/// `--help` of the binary.
pub const ABOUT: &str = "Marquee language service: streamed text generation over gRPC";

/// Default of `language.oip_queue_capacity`: OIP calls are single forward passes; 64 waiting
/// is a few seconds of work at most on CPU, beyond which a caller is better told to retry.
pub const DEFAULT_OIP_QUEUE_CAPACITY: usize = 64;

/// Default of `language.oip_max_tokens_per_step`: 8 rows (the most one OIP request may have)
/// of the default model's 256-token context, so every request that was valid before the
/// budget existed still is. Lower it to favour the running streams over raw-logit callers.
pub const DEFAULT_OIP_MAX_TOKENS_PER_STEP: usize = 2048;

/// All settings of the language service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    /// Every `kind = "causal_lm"` model in `path` (or those in `models`) is served, each by its
    /// own engine; `threads` and `device` override each model's `[instance]`.
    pub repository: RepositorySettings,
    pub telemetry: TelemetrySettings,
    pub language: LanguageSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            // Next to the gateway (8000/9000) and vision (8001/9001) on one host.
            server: ServerSettings::on_ports(8002, 9002),
            repository: RepositorySettings::default(),
            telemetry: TelemetrySettings::default(),
            language: LanguageSettings::default(),
        }
    }
}

/// The scheduler of each model's engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanguageSettings {
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
    /// Most sequences one request may ask for (`num_return_sequences`); each takes a cache
    /// slot, so at most `max_batch_size`.
    pub max_return_sequences: usize,
    /// The model a request with an empty `model` field gets. Empty: the repository's only
    /// causal LM (a request without a model name is refused when there are several).
    pub default_model: String,
}

impl Default for LanguageSettings {
    fn default() -> Self {
        Self {
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
            max_return_sequences: 8,
            default_model: String::new(),
        }
    }
}

impl Validate for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        validate_model_service(
            "language",
            KeysUsed {
                lanes: false,
                batching: false,
            },
            (&self.server, &self.repository, &self.telemetry),
            errors,
        );
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
            ("max_return_sequences", l.max_return_sequences),
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
        if l.max_return_sequences > l.max_batch_size {
            errors.push(format!(
                "`language.max_return_sequences` ({}) must be <= `language.max_batch_size` ({}): each sequence takes a cache slot",
                l.max_return_sequences, l.max_batch_size
            ));
        }
        if l.max_prompt_bytes > self.server.max_message_bytes {
            errors.push(format!(
                "`language.max_prompt_bytes` ({}) must be <= `server.max_message_bytes` ({})",
                l.max_prompt_bytes, self.server.max_message_bytes
            ));
        }
    }
}

marquee_core::service_settings!(Settings);

/// The language service's model server.
pub type LanguageServer = ModelServer<LanguageFamily>;

/// Loads and warms up every model, then serves until `shutdown`.
pub async fn start(
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running<LanguageFamily>> {
    let language = settings.language.clone();
    let kit = LanguageServer::load(
        NAME,
        settings.server.clone(),
        settings.repository.clone(),
        |metrics| LanguageFamily::new(language, metrics),
    )
    .await?;
    let api = service::TextApi::new(
        kit.repo.clone(),
        settings.server.clone(),
        &settings.language,
    );
    let api =
        TextGenerationServer::new(api).max_decoding_message_size(settings.server.max_message_bytes);
    kit.serve_api(api, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oip_share_settings_must_be_positive() {
        let mut s = Settings::default();
        s.repository.path = std::env::temp_dir();
        s.language.oip_queue_capacity = 0;
        s.language.oip_max_tokens_per_step = 0;
        s.language.max_return_sequences = 0;
        let mut errors = Vec::new();
        s.validate(&mut errors);
        for key in [
            "oip_queue_capacity",
            "oip_max_tokens_per_step",
            "max_return_sequences",
        ] {
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains(&format!("`language.{key}` must be at least 1"))),
                "{errors:?}"
            );
        }
        let mut wide = Settings::default();
        wide.repository.path = std::env::temp_dir();
        wide.language.max_return_sequences = wide.language.max_batch_size + 1;
        let mut errors = Vec::new();
        wide.validate(&mut errors);
        assert!(
            errors.iter().any(|e| e.contains(
                "`language.max_return_sequences` (33) must be <= `language.max_batch_size` (32)"
            )),
            "{errors:?}"
        );
        let mut errors = Vec::new();
        let mut ok = Settings::default();
        ok.repository.path = std::env::temp_dir();
        ok.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }
}
