//! Batched tensor models (`kind = "classifier"` or `"tensor"`): the vision service's family.
//! A version is its lanes (model copies on their own threads) behind one dynamic batcher.

use std::sync::Arc;
use std::time::{Duration, Instant};

use marquee_proto::inference::model_infer_response::InferOutputTensor;
use marquee_proto::inference::model_metadata_response::TensorMetadata;
use marquee_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};

use crate::batcher::{BatchQueue, Outputs, QueueConfig};
use crate::error::ServeError;
use crate::model::ModelSpec;
use crate::oip::OipModel;
use crate::repository::{LoadContext, ModelFamily};
use crate::runner::{LaneConfig, WarmupReport, start_lanes};

/// Lanes per model when neither `model.toml` nor the service says.
pub const DEFAULT_LANES: usize = 2;

/// Models with a batched `forward` over FP32 tensors.
pub struct TensorFamily;

impl ModelFamily for TensorFamily {
    type Model = LoadedModel;

    fn kinds(&self) -> &'static [&'static str] {
        &["classifier", "tensor"]
    }

    fn load(&self, at: &LoadContext<'_>) -> Result<LoadedModel, String> {
        LoadedModel::load(at)
    }

    fn set_batch_cap(&self, m: &LoadedModel, cap: Option<usize>) -> Result<String, String> {
        Ok(m.set_batch_cap(cap))
    }

    fn describe(&self, m: &LoadedModel) -> String {
        format!(
            "lanes={} max_batch={} warmup_ms={}",
            m.lanes,
            m.max_batch(),
            m.warmup.took.as_millis()
        )
    }
}

/// One loaded, warmed-up tensor model version and its batch queue.
pub struct LoadedModel {
    pub spec: ModelSpec,
    pub labels: Option<Arc<Vec<String>>>,
    pub warmup: WarmupReport,
    pub lanes: usize,
    queue: Arc<BatchQueue>,
    metrics: crate::metrics::Metrics,
}

impl LoadedModel {
    /// Loads `<version>/model.pt`, starts its lanes and warms them up. Blocking.
    pub fn load(at: &LoadContext<'_>) -> Result<Self, String> {
        let (dir, settings) = (at.dir, at.settings);
        let spec = ModelSpec::load(dir)?;
        let labels = spec.load_labels(dir)?.map(Arc::new);
        if let (Some(labels), Some(i)) = (&labels, spec.output_index("logits")) {
            let classes = spec.outputs[i].item_len();
            if labels.len() != classes {
                return Err(format!(
                    "model `{}` has {} labels for {classes} classes",
                    spec.name,
                    labels.len()
                ));
            }
        }
        let run = spec.instance.resolve(settings, DEFAULT_LANES)?;
        let max_batch_size = if settings.batching() {
            spec.batching.max_batch_size
        } else {
            1
        };
        let queue = BatchQueue::new(
            QueueConfig {
                model: spec.name.clone(),
                max_batch_size,
                max_queue_delay: Duration::from_micros(spec.batching.max_queue_delay_us),
                queue_capacity: spec.batching.queue_capacity,
                lanes: run.lanes,
                item_len: spec.inputs[0].item_len(),
                output_lens: spec.outputs.iter().map(|o| o.item_len()).collect(),
            },
            at.metrics.clone(),
        );
        let warmup = start_lanes(
            &LaneConfig {
                model_path: at.version_dir().join("model.pt"),
                device: run.device,
                lanes: run.lanes,
                threads: run.threads,
                nice: settings.lane_nice(),
                input_dims: spec.inputs[0].dims.clone(),
                outputs: spec.outputs.clone(),
                profile: settings.profile_batching() && max_batch_size > 1,
                liveness: at.liveness.clone(),
            },
            &queue,
        )?;
        at.metrics
            .effective_batch
            .with_label_values(&[&spec.name])
            .set(queue.max_batch() as i64);
        Ok(Self {
            spec,
            labels,
            warmup,
            lanes: run.lanes,
            queue,
            metrics: at.metrics.clone(),
        })
    }

    /// Sets the batch cap at run time (`repository.batching_control`): `Some(n)` caps batches
    /// at `n` (1: batching off; at most `max_batch_size`), `None` restores warm-up's choice.
    /// Takes effect from the next batch a lane forms; nothing queued or running is disturbed.
    pub fn set_batch_cap(&self, cap: Option<usize>) -> String {
        let before = self.queue.max_batch();
        // Warm-up's choice (profiled, or `max_batch_size`) is what `auto` restores.
        self.queue
            .set_max_batch(cap.unwrap_or(self.warmup.best_batch));
        let now = self.queue.max_batch();
        self.metrics
            .effective_batch
            .with_label_values(&[&self.spec.name])
            .set(now as i64);
        tracing::info!(model = %self.spec.name, before, now, "batch cap set at run time");
        format!(
            "{}: max_batch {now} (was {before}; warm-up chose {}, max_batch_size {})",
            self.spec.name,
            self.warmup.best_batch,
            self.queue.config().max_batch_size
        )
    }

    /// Runs `rows` items (already validated to the input shape) through the batcher. Answers
    /// `DEADLINE_EXCEEDED` at `deadline` even if the item is still queued; the lane then drops it.
    pub async fn infer(
        &self,
        data: Vec<f32>,
        rows: usize,
        deadline: Instant,
    ) -> Result<Vec<Outputs>, ServeError> {
        let rx = self.queue.submit(data, rows, deadline)?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ServeError::Internal(format!(
                "model `{}` lane stopped",
                self.spec.name
            ))),
            Err(_) => Err(ServeError::DeadlineExceeded(format!(
                "deadline expired while model `{}` was busy; the request was not computed",
                self.spec.name
            ))),
        }
    }

    /// The batch cap in force after profiling.
    pub fn max_batch(&self) -> usize {
        self.queue.max_batch()
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // The last reference is gone (replaced by a newer version and no request holds it):
        // let the lanes finish what is queued and exit.
        self.queue.close();
    }
}

/// A validated `ModelInferRequest`: the input rows as f32, and which outputs to return.
pub struct ValidInfer {
    pub data: Vec<f32>,
    pub batch: usize,
    pub outputs: Vec<usize>,
    pub raw: bool,
}

/// Checks a request against the model's declared input and turns it into rows.
pub fn validate_infer(
    model: &LoadedModel,
    req: &ModelInferRequest,
) -> Result<ValidInfer, ServeError> {
    let spec = &model.spec;
    let want = &spec.inputs[0];
    if req.inputs.len() != 1 {
        return Err(ServeError::invalid(
            "inputs",
            format!(
                "`inputs`: model `{}` takes exactly 1 input (`{}`), got {}",
                spec.name,
                want.name,
                req.inputs.len()
            ),
        ));
    }
    let input = &req.inputs[0];
    if input.name != want.name {
        return Err(ServeError::invalid(
            "inputs[0].name",
            format!(
                "`inputs[0].name`: model `{}` has no input `{}`; its input is `{}`",
                spec.name, input.name, want.name
            ),
        ));
    }
    if input.datatype != want.datatype {
        return Err(ServeError::invalid(
            "inputs[0].datatype",
            format!(
                "`inputs[0].datatype`: input `{}` must be `{}`, got `{}`",
                want.name, want.datatype, input.datatype
            ),
        ));
    }
    let max_batch = spec.batching.max_batch_size;
    let shape_ok = input.shape.len() == want.dims.len() + 1 && input.shape[1..] == want.dims[..];
    if !shape_ok || input.shape[0] < 1 {
        return Err(ServeError::invalid(
            "inputs[0].shape",
            format!(
                "`inputs[0].shape`: input `{}` must have shape [batch, {}] with batch in 1..={max_batch}, got {:?}",
                want.name,
                want.dims
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                input.shape
            ),
        ));
    }
    let batch = input.shape[0] as usize;
    if batch > max_batch {
        return Err(ServeError::invalid(
            "inputs[0].shape",
            format!(
                "`inputs[0].shape`: batch dimension is {batch}; model `{}` takes at most {max_batch} (`batching.max_batch_size`)",
                spec.name
            ),
        ));
    }
    let n = batch * want.item_len();
    let raw = !req.raw_input_contents.is_empty();
    let data: Vec<f32> = if raw {
        if input.contents.is_some() {
            return Err(ServeError::invalid(
                "inputs[0].contents",
                "`inputs[0].contents`: set either `raw_input_contents` or `inputs[0].contents`, not both",
            ));
        }
        if req.raw_input_contents.len() != 1 {
            return Err(ServeError::invalid(
                "raw_input_contents",
                format!(
                    "`raw_input_contents`: expected 1 raw input, got {}",
                    req.raw_input_contents.len()
                ),
            ));
        }
        let bytes = &req.raw_input_contents[0];
        if bytes.len() != n * 4 {
            return Err(ServeError::invalid(
                "raw_input_contents[0]",
                format!(
                    "`raw_input_contents[0]`: shape {:?} of FP32 needs {} bytes, got {}",
                    input.shape,
                    n * 4,
                    bytes.len()
                ),
            ));
        }
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        let values = input
            .contents
            .as_ref()
            .map(|c| c.fp32_contents.as_slice())
            .unwrap_or_default();
        if values.len() != n {
            return Err(ServeError::invalid(
                "inputs[0].contents.fp32_contents",
                format!(
                    "`inputs[0].contents.fp32_contents`: shape {:?} needs {n} values, got {}",
                    input.shape,
                    values.len()
                ),
            ));
        }
        values.to_vec()
    };
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(ServeError::invalid(
            "inputs[0]",
            format!(
                "`inputs[0]` element {i} is {}; inputs must be finite",
                data[i]
            ),
        ));
    }
    let outputs = if req.outputs.is_empty() {
        (0..spec.outputs.len()).collect()
    } else {
        req.outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                spec.output_index(&o.name).ok_or_else(|| {
                    ServeError::invalid(
                        format!("outputs[{i}].name"),
                        format!(
                            "`outputs[{i}].name`: model `{}` has no output `{}`; outputs are {}",
                            spec.name,
                            o.name,
                            spec.outputs
                                .iter()
                                .map(|o| format!("`{}`", o.name))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()?
    };
    Ok(ValidInfer {
        data,
        batch,
        outputs,
        raw,
    })
}

fn tensor_meta(t: &crate::model::TensorSpec) -> TensorMetadata {
    let mut shape = vec![-1];
    shape.extend_from_slice(&t.dims);
    TensorMetadata {
        name: t.name.clone(),
        datatype: t.datatype.clone(),
        shape,
    }
}

#[tonic::async_trait]
impl OipModel for LoadedModel {
    fn inputs(&self) -> Vec<TensorMetadata> {
        self.spec.inputs.iter().map(tensor_meta).collect()
    }

    fn outputs(&self) -> Vec<TensorMetadata> {
        self.spec.outputs.iter().map(tensor_meta).collect()
    }

    async fn model_infer(
        &self,
        req: ModelInferRequest,
        deadline: Instant,
    ) -> Result<ModelInferResponse, ServeError> {
        let valid = validate_infer(self, &req)?;
        let rows = self.infer(valid.data, valid.batch, deadline).await?;
        let mut outputs = Vec::with_capacity(valid.outputs.len());
        let mut raw_output_contents = Vec::new();
        for &o in &valid.outputs {
            let spec = &self.spec.outputs[o];
            let mut values = Vec::with_capacity(valid.batch * spec.item_len());
            for row in &rows {
                values.extend_from_slice(&row[o]);
            }
            let mut shape = vec![valid.batch as i64];
            shape.extend_from_slice(&spec.dims);
            let contents = if valid.raw {
                raw_output_contents.push(crate::oip::f32_le_bytes(&values).into());
                None
            } else {
                Some(InferTensorContents {
                    fp32_contents: values,
                    ..Default::default()
                })
            };
            outputs.push(InferOutputTensor {
                name: spec.name.clone(),
                datatype: spec.datatype.clone(),
                shape,
                parameters: Default::default(),
                contents,
            });
        }
        Ok(ModelInferResponse {
            outputs,
            raw_output_contents,
            ..Default::default()
        })
    }
}
