//! The language service's model family: a `kind = "causal_lm"` version is its engine (one
//! thread owning the module, the KV cache and the running batch), its tokenizer and the limits
//! derived from its `model.toml`. Loading, hot reload, readiness and drain are the kit's.

use std::sync::Arc;
use std::time::Instant;

use marquee_core::ServeError;
use marquee_core::metrics::Metrics;
use marquee_core::oip::OipModel;
use marquee_core::repository::{LoadContext, ModelFamily};
use marquee_proto::inference::model_infer_response::InferOutputTensor;
use marquee_proto::inference::model_metadata_response::TensorMetadata;
use marquee_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};

use crate::LanguageSettings;
use crate::engine::{Engine, EngineConfig};
use crate::metrics::LanguageMetrics;
use crate::model::{ModelFiles, Vocab};
use crate::validate::Limits;

/// Causal language models, each served by its own engine with the service's scheduler settings.
pub struct LanguageFamily {
    settings: LanguageSettings,
    metrics: LanguageMetrics,
}

impl LanguageFamily {
    /// Registers the language metrics in the server's registry.
    pub fn new(settings: LanguageSettings, metrics: &Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            metrics: LanguageMetrics::new(metrics, "")?,
            settings,
        })
    }
}

/// One loaded version: its engine, tokenizer and limits.
pub struct LanguageModel {
    pub engine: Arc<Engine>,
    pub vocab: Arc<Vocab>,
    /// The token put before every prompt, when the model has one (`prepend_bos`).
    pub bos: Option<u32>,
    pub limits: Limits,
}

impl ModelFamily for LanguageFamily {
    type Model = LanguageModel;

    fn kinds(&self) -> &'static [&'static str] {
        &["causal_lm"]
    }

    fn load(&self, at: &LoadContext<'_>) -> Result<LanguageModel, String> {
        let files = ModelFiles::read(at.dir, at.version)?;
        let spec = files.manifest.language.clone();
        check_fits(&self.settings, spec.context_length)?;
        let run = files.manifest.instance.resolve(at.settings, 1)?;
        if run.lanes != 1 {
            return Err(format!(
                "`instance.lanes` is {}: the language engine is one lane per model (its KV cache and batch live on one thread)",
                run.lanes
            ));
        }
        let vocab =
            Arc::new(Vocab::load(&files.tokenizer, spec.vocab_size).map_err(|e| format!("{e:#}"))?);
        let l = &self.settings;
        let metrics = self.metrics.for_model(at.name);
        let cfg = EngineConfig {
            scheduler: l.clone(),
            threads: run.threads,
            device: run.device,
            liveness: at.liveness.clone(),
        };
        let engine = Engine::start(&files, vocab.clone(), cfg, metrics.clone())
            .map_err(|e| format!("{e:#}"))?;
        metrics
            .kv_capacity
            .with_label_values(&[at.name])
            .set((l.max_batch_size * spec.context_length) as i64);
        metrics
            .budget_capacity
            .with_label_values(&[at.name])
            .set(l.max_total_tokens as i64);
        Ok(LanguageModel {
            engine: Arc::new(engine),
            vocab,
            bos: spec.prepend_bos.then_some(spec.bos_token_id),
            limits: Limits {
                context_length: spec.context_length,
                max_new_tokens: l.max_new_tokens.min(spec.context_length - 1),
                default_max_new_tokens: l.default_max_new_tokens,
                max_stop_sequences: l.max_stop_sequences,
                max_stop_bytes: l.max_stop_bytes,
                max_return_sequences: l.max_return_sequences,
            },
        })
    }

    fn describe(&self, m: &LanguageModel) -> String {
        format!(
            "context={} vocab={} architecture={:?} bos={}",
            m.limits.context_length,
            m.engine.shape.vocab,
            m.engine.shape.architecture,
            m.bos.map_or("none".into(), |b| b.to_string())
        )
    }
}

/// The scheduler settings that must hold for a model's context: checked per version, so a
/// version that does not fit is refused with the reason instead of misbehaving.
fn check_fits(l: &LanguageSettings, context: usize) -> Result<(), String> {
    for (key, value, why) in [
        (
            "max_prefill_tokens",
            l.max_prefill_tokens,
            "or a long prompt could never be admitted",
        ),
        (
            "oip_max_tokens_per_step",
            l.oip_max_tokens_per_step,
            "or a one-row full-context OIP request could never run",
        ),
        (
            "max_total_tokens",
            l.max_total_tokens,
            "or a full-context sequence could never run",
        ),
    ] {
        if value < context {
            return Err(format!(
                "`language.{key}` ({value}) must be >= the model's context_length ({context}), {why}"
            ));
        }
    }
    Ok(())
}

/// OIP input and output of a causal LM: `input_ids` (INT64, `[batch, tokens]`) in, `logits`
/// (FP32, `[batch, tokens, vocab]`) out, by full recompute without the KV cache.
const INPUT: &str = "input_ids";
const OUTPUT: &str = "logits";
/// Rows per OIP request: full-recompute logits are `batch x tokens x vocab` floats.
const OIP_MAX_BATCH: usize = 8;

impl LanguageModel {
    fn ids(
        &self,
        name: &str,
        req: &ModelInferRequest,
    ) -> Result<(Vec<i64>, usize, usize), ServeError> {
        let [input] = req.inputs.as_slice() else {
            return Err(ServeError::invalid(
                "inputs",
                format!(
                    "`inputs`: model `{}` takes exactly 1 input (`{INPUT}`), got {}",
                    name,
                    req.inputs.len()
                ),
            ));
        };
        if input.name != INPUT || input.datatype != "INT64" {
            return Err(ServeError::invalid(
                "inputs[0]",
                format!(
                    "`inputs[0]` must be `{INPUT}` of datatype INT64, got `{}` of {}",
                    input.name, input.datatype
                ),
            ));
        }
        let ctx = self.limits.context_length;
        let shape_ok = input.shape.len() == 2
            && (1..=OIP_MAX_BATCH as i64).contains(&input.shape[0])
            && (1..=ctx as i64).contains(&input.shape[1]);
        if !shape_ok {
            return Err(ServeError::invalid(
                "inputs[0].shape",
                format!(
                    "`inputs[0].shape` must be [batch, tokens] with batch in 1..={OIP_MAX_BATCH} and tokens in 1..={ctx}, got {:?}",
                    input.shape
                ),
            ));
        }
        let (batch, len) = (input.shape[0] as usize, input.shape[1] as usize);
        let budget = self.engine.oip_max_tokens();
        if batch * len > budget {
            return Err(ServeError::invalid(
                "inputs[0].shape",
                format!(
                    "`inputs[0].shape` {:?} asks for {} token positions; at most {budget} per request (`language.oip_max_tokens_per_step`)",
                    input.shape,
                    batch * len
                ),
            ));
        }
        let ids: Vec<i64> = if let Some(raw) = req.raw_input_contents.first() {
            if raw.len() != batch * len * 8 {
                return Err(ServeError::invalid(
                    "raw_input_contents[0]",
                    format!(
                        "`raw_input_contents[0]` must hold {} bytes (INT64 x {batch} x {len}), got {}",
                        batch * len * 8,
                        raw.len()
                    ),
                ));
            }
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        } else {
            input
                .contents
                .as_ref()
                .map(|c| c.int64_contents.clone())
                .unwrap_or_default()
        };
        if ids.len() != batch * len {
            return Err(ServeError::invalid(
                "inputs[0].contents",
                format!(
                    "`inputs[0].contents.int64_contents` must hold {} values for shape {:?}, got {}",
                    batch * len,
                    input.shape,
                    ids.len()
                ),
            ));
        }
        let vocab = self.engine.shape.vocab as i64;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(ServeError::invalid(
                "inputs[0].contents",
                format!("token ids must be in 0..{vocab}, got {bad}"),
            ));
        }
        Ok((ids, batch, len))
    }
}

#[tonic::async_trait]
impl OipModel for LanguageModel {
    fn inputs(&self) -> Vec<TensorMetadata> {
        vec![TensorMetadata {
            name: INPUT.into(),
            datatype: "INT64".into(),
            shape: vec![-1, -1],
        }]
    }

    fn outputs(&self) -> Vec<TensorMetadata> {
        vec![TensorMetadata {
            name: OUTPUT.into(),
            datatype: "FP32".into(),
            shape: vec![-1, -1, self.engine.shape.vocab as i64],
        }]
    }

    async fn model_infer(
        &self,
        req: ModelInferRequest,
        deadline: Instant,
    ) -> Result<ModelInferResponse, ServeError> {
        let (ids, batch, len) = self.ids(&req.model_name, &req)?;
        let logits = self.engine.forward(ids, batch, len, deadline).await?;
        let vocab = self.engine.shape.vocab as i64;
        let raw = !req.raw_input_contents.is_empty();
        let (contents, raw_output_contents) = if raw {
            (None, vec![marquee_core::oip::f32_le_bytes(&logits).into()])
        } else {
            (
                Some(InferTensorContents {
                    fp32_contents: logits,
                    ..Default::default()
                }),
                Vec::new(),
            )
        };
        Ok(ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: OUTPUT.into(),
                datatype: "FP32".into(),
                shape: vec![batch as i64, len as i64, vocab],
                parameters: Default::default(),
                contents,
            }],
            raw_output_contents,
            ..Default::default()
        })
    }
}
