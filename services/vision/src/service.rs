//! `marquee.vision.v1.ImageService`: requests are validated into model-ready tensors (decoding
//! on blocking workers), then run through the model's batcher alongside other callers.

use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use marquee_core::ServeError;
use marquee_core::config::ServerSettings;
use marquee_core::deadline::deadline;
use marquee_core::repository::{Repository, Served};
use marquee_core::tensor::{LoadedModel, TensorFamily};
use marquee_proto::common::ItemError;
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::image_service_server::ImageService;
use marquee_proto::vision::*;
use tonic::{Request, Response, Status};

use crate::VisionSettings;
use crate::decode::{DecodeError, DecodePool, Ticket};
use crate::preprocess::{ImageLimits, to_tensor};

/// A served version of a tensor model.
type Model = Served<LoadedModel>;

pub struct Vision {
    repo: Arc<Repository<TensorFamily>>,
    server: ServerSettings,
    settings: VisionSettings,
    decoders: DecodePool,
}

impl Vision {
    pub fn new(
        repo: Arc<Repository<TensorFamily>>,
        server: ServerSettings,
        settings: VisionSettings,
        decoders: DecodePool,
    ) -> Self {
        Self {
            repo,
            server,
            settings,
            decoders,
        }
    }

    fn limits(&self) -> ImageLimits {
        ImageLimits {
            max_bytes: self.settings.max_image_bytes,
            max_pixels: self.settings.max_pixels,
            max_aspect_ratio: self.settings.max_aspect_ratio,
        }
    }

    /// Queue places for the encoded images among `inputs`, in order (`None` for tensors), all
    /// admitted or the call refused.
    fn admit<'a>(
        &self,
        inputs: impl Iterator<Item = Option<&'a ImageInput>> + Clone,
    ) -> Result<Vec<Option<Ticket>>, ServeError> {
        let encoded = |i: Option<&ImageInput>| {
            matches!(i.and_then(|i| i.source.as_ref()), Some(Source::Encoded(_)))
        };
        let mut tickets = self
            .decoders
            .admit(inputs.clone().filter(|i| encoded(*i)).count())?;
        Ok(inputs
            .map(|i| if encoded(i) { tickets.pop() } else { None })
            .collect())
    }

    /// Turns one `ImageInput` into the model's input tensor; an encoded image needs its
    /// `ticket` from [`Self::admit`].
    async fn prepare(
        &self,
        model: &Arc<Model>,
        input: Option<ImageInput>,
        field: &str,
        ticket: Option<Ticket>,
        deadline: Instant,
    ) -> Result<Vec<f32>, ServeError> {
        let source = input.and_then(|i| i.source).ok_or_else(|| {
            ServeError::invalid(
                field,
                format!("`{field}` is required: set `encoded` or `tensor`"),
            )
        })?;
        let spec = &model.spec.inputs[0];
        match source {
            Source::Tensor(t) => {
                let field = format!("{field}.tensor");
                if t.shape != spec.dims {
                    return Err(ServeError::invalid(
                        format!("{field}.shape"),
                        format!(
                            "`{field}.shape` must be {:?} for model `{}`, got {:?}",
                            spec.dims, model.name, t.shape
                        ),
                    ));
                }
                let n = spec.item_len();
                let data: Vec<f32> = match (t.float_data.is_empty(), t.raw_data.is_empty()) {
                    (false, true) => t.float_data,
                    (true, false) if t.raw_data.len() == n * 4 => t
                        .raw_data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    (true, false) => {
                        return Err(ServeError::invalid(
                            format!("{field}.raw_data"),
                            format!(
                                "`{field}.raw_data` must be {} bytes (f32 × {n}), got {}",
                                n * 4,
                                t.raw_data.len()
                            ),
                        ));
                    }
                    _ => {
                        return Err(ServeError::invalid(
                            field.clone(),
                            format!(
                                "set exactly one of `{field}.float_data` and `{field}.raw_data`"
                            ),
                        ));
                    }
                };
                if data.len() != n {
                    return Err(ServeError::invalid(
                        format!("{field}.float_data"),
                        format!(
                            "`{field}.float_data` must have {n} values, got {}",
                            data.len()
                        ),
                    ));
                }
                if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                    return Err(ServeError::invalid(
                        format!("{field}.float_data"),
                        format!(
                            "`{field}` element {i} is {}; tensors must be finite",
                            data[i]
                        ),
                    ));
                }
                Ok(data)
            }
            Source::Encoded(bytes) => {
                let field = format!("{field}.encoded");
                let Some(pre) = model.spec.preprocess.clone() else {
                    return Err(ServeError::FailedPrecondition(format!(
                        "model `{}` has no `preprocess` section, so it takes tensors, not encoded images",
                        model.name
                    )));
                };
                let ticket = ticket.expect("encoded images are admitted first, this is a bug");
                let limits = self.limits();
                // Decoding is CPU-heavy: it runs on the decode pool's workers, off the runtime.
                let decoded = self
                    .decoders
                    .run(ticket, deadline, move |keep_going| {
                        to_tensor(&bytes, limits, &pre, keep_going)
                    })
                    .await;
                decoded.map_err(|e| match e {
                    DecodeError::Image(e) => {
                        let message = format!("`{field}` {e}");
                        if e.is_size_limit() {
                            ServeError::TooLarge { field, message }
                        } else {
                            ServeError::InvalidArgument { field, message }
                        }
                    }
                    DecodeError::DeadlineExceeded => ServeError::DeadlineExceeded(format!(
                        "the deadline passed before `{field}` was decoded"
                    )),
                    // Only seen by a caller that is gone; said plainly for the logs.
                    DecodeError::Cancelled => ServeError::unavailable(format!(
                        "the call ended before `{field}` was decoded"
                    )),
                    DecodeError::Panicked(detail) => {
                        ServeError::Internal(format!("decoding `{field}`: {detail}"))
                    }
                })
            }
        }
    }

    fn top_k(&self, model: &Model, top_k: u32) -> Result<(usize, usize), ServeError> {
        let logits = model.spec.output_index("logits").ok_or_else(|| {
            ServeError::FailedPrecondition(format!(
                "model `{}` has no `logits` output, so it cannot classify",
                model.name
            ))
        })?;
        let classes = model.spec.outputs[logits].item_len();
        if top_k == 0 || top_k as usize > classes {
            return Err(ServeError::invalid(
                "top_k",
                format!(
                    "`top_k` must be in 1..={classes} for model `{}`, got {top_k}",
                    model.name
                ),
            ));
        }
        Ok((logits, top_k as usize))
    }

    async fn classify_one(
        &self,
        model: &Arc<Model>,
        input: Option<ImageInput>,
        field: &str,
        (logits, k): (usize, usize),
        ticket: Option<Ticket>,
        deadline: Instant,
    ) -> Result<Vec<Label>, ServeError> {
        let data = self.prepare(model, input, field, ticket, deadline).await?;
        let out = model.infer(data, 1, deadline).await?;
        Ok(top_labels(
            &out[0][logits],
            k,
            model.labels.as_deref().map(Vec::as_slice),
        ))
    }
}

/// Softmax over `logits`, the `k` most likely classes first.
pub fn top_labels(logits: &[f32], k: usize, names: Option<&[String]>) -> Vec<Label> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |a, b| exp[*b].total_cmp(&exp[*a]));
    idx.truncate(k);
    idx.sort_by(|a, b| exp[*b].total_cmp(&exp[*a]));
    idx.into_iter()
        .map(|i| Label {
            index: i as u32,
            name: names
                .and_then(|n| n.get(i))
                .cloned()
                .unwrap_or_else(|| i.to_string()),
            score: exp[i] / sum,
        })
        .collect()
}

#[tonic::async_trait]
impl ImageService for Vision {
    async fn classify(
        &self,
        req: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        let deadline = deadline(req.metadata(), &self.server);
        let req = req.into_inner();
        let model = self.repo.get(&req.model)?;
        let k = self.top_k(&model, req.top_k)?;
        let ticket = self
            .admit(std::iter::once(req.image.as_ref()))?
            .pop()
            .flatten();
        let labels = self
            .classify_one(&model, req.image, "image", k, ticket, deadline)
            .await?;
        Ok(Response::new(ClassifyResponse {
            model: model.name.clone(),
            model_version: model.version.to_string(),
            labels,
        }))
    }

    async fn classify_batch(
        &self,
        req: Request<ClassifyBatchRequest>,
    ) -> Result<Response<ClassifyBatchResponse>, Status> {
        let deadline = deadline(req.metadata(), &self.server);
        let req = req.into_inner();
        let model = self.repo.get(&req.model)?;
        let k = self.top_k(&model, req.top_k)?;
        let max = self.settings.max_batch_items;
        if req.images.is_empty() || req.images.len() > max {
            return Err(ServeError::invalid(
                "images",
                format!(
                    "`images` must hold 1..={max} images (`vision.max_batch_items`), got {}",
                    req.images.len()
                ),
            )
            .into());
        }
        let tickets = self.admit(req.images.iter().map(Some))?;
        // Each image is its own queue item, so the lanes batch them with everyone else's.
        let calls = req
            .images
            .into_iter()
            .zip(tickets)
            .enumerate()
            .map(|(i, (img, ticket))| {
                let model = &model;
                async move {
                    let field = format!("images[{i}]");
                    match self
                        .classify_one(model, Some(img), &field, k, ticket, deadline)
                        .await
                    {
                        Ok(labels) => ClassifyBatchItem {
                            result: Some(classify_batch_item::Result::Classification(
                                Classification { labels },
                            )),
                        },
                        Err(e) => ClassifyBatchItem {
                            result: Some(classify_batch_item::Result::Error(ItemError {
                                code: e.code() as i32,
                                field: e.field().unwrap_or_default().to_string(),
                                message: e.public_message(),
                            })),
                        },
                    }
                }
            });
        let items = join_all(calls).await;
        Ok(Response::new(ClassifyBatchResponse {
            model: model.name.clone(),
            model_version: model.version.to_string(),
            items,
        }))
    }

    async fn embed(&self, req: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let deadline = deadline(req.metadata(), &self.server);
        let req = req.into_inner();
        let model = self.repo.get(&req.model)?;
        let idx = model.spec.output_index("embedding").ok_or_else(|| {
            ServeError::FailedPrecondition(format!(
                "model `{}` has no `embedding` output",
                model.name
            ))
        })?;
        let ticket = self
            .admit(std::iter::once(req.image.as_ref()))?
            .pop()
            .flatten();
        let data = self
            .prepare(&model, req.image, "image", ticket, deadline)
            .await?;
        let mut out = model.infer(data, 1, deadline).await?;
        let mut embedding = std::mem::take(&mut out[0][idx]);
        if req.normalize {
            let norm = embedding
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt()
                .max(f32::MIN_POSITIVE);
            embedding.iter_mut().for_each(|v| *v /= norm);
        }
        Ok(Response::new(EmbedResponse {
            model: model.name.clone(),
            model_version: model.version.to_string(),
            embedding,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_labels_are_sorted_probabilities() {
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let labels = top_labels(&[1.0, 3.0, 2.0, -1.0], 2, Some(&names));
        assert_eq!(
            labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert!(labels[0].score > labels[1].score);
        let all: f32 = top_labels(&[1.0, 3.0, 2.0, -1.0], 4, None)
            .iter()
            .map(|l| l.score)
            .sum();
        assert!((all - 1.0).abs() < 1e-5);
    }
}
