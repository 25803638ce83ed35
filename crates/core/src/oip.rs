//! The Open Inference Protocol (KServe V2) over the model repository, so Triton and KServe
//! clients work unchanged. Inputs carry a leading batch dimension; a request's rows stay
//! together in one batch with other callers' rows.

use std::sync::Arc;

use marquee_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use marquee_proto::inference::model_infer_response::InferOutputTensor;
use marquee_proto::inference::model_metadata_response::TensorMetadata;
use marquee_proto::inference::*;
use tonic::{Request, Response, Status};

use crate::config::ServerSettings;
use crate::deadline::deadline;
use crate::error::ServeError;
use crate::repository::{LoadedModel, Repository};

/// `GRPCInferenceService` for every model in a repository.
pub struct OipService {
    repo: Arc<Repository>,
    server: ServerSettings,
    name: &'static str,
}

impl OipService {
    pub fn new(repo: Arc<Repository>, server: ServerSettings, name: &'static str) -> Self {
        Self { repo, server, name }
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
impl GrpcInferenceService for OipService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse {
            live: self.repo.liveness().is_alive(),
        }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.repo.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let req = req.into_inner();
        let ready = self.repo.is_ready() && self.repo.get_version(&req.name, &req.version).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: self.name.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let req = req.into_inner();
        let model = self.repo.get_version(&req.name, &req.version)?;
        Ok(Response::new(ModelMetadataResponse {
            name: model.name.clone(),
            versions: vec![model.version.to_string()],
            platform: "pytorch_torchscript".into(),
            inputs: model.spec.inputs.iter().map(tensor_meta).collect(),
            outputs: model.spec.outputs.iter().map(tensor_meta).collect(),
        }))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let only_ready = req.into_inner().ready;
        let ready = self.repo.is_ready();
        let not_ready_reason = match self.repo.liveness().death() {
            Some(death) => format!("server is not live: {death}"),
            None => "server is draining".into(),
        };
        let mut models: Vec<_> = self
            .repo
            .names()
            .into_iter()
            .filter_map(|name| self.repo.get(&name).ok())
            .map(|m| repository_index_response::ModelIndex {
                name: m.name.clone(),
                version: m.version.to_string(),
                state: if ready { "READY" } else { "UNAVAILABLE" }.into(),
                reason: if ready {
                    String::new()
                } else {
                    not_ready_reason.clone()
                },
            })
            .collect();
        // Like Triton, a version that failed to load is listed as UNAVAILABLE with the reason
        // (next to the version still serving), unless the caller asked for ready models only.
        if !only_ready {
            models.extend(self.repo.refused().into_iter().map(|r| {
                repository_index_response::ModelIndex {
                    name: r.model,
                    version: r.version.to_string(),
                    state: "UNAVAILABLE".into(),
                    reason: r.reason,
                }
            }));
        }
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let deadline = deadline(req.metadata(), &self.server);
        let req = req.into_inner();
        let model = self.repo.get_version(&req.model_name, &req.model_version)?;
        let valid = validate_infer(&model, &req)?;
        let rows = model.infer(valid.data, valid.batch, deadline).await?;
        let mut outputs = Vec::with_capacity(valid.outputs.len());
        let mut raw_output_contents = Vec::new();
        for &o in &valid.outputs {
            let spec = &model.spec.outputs[o];
            let mut values = Vec::with_capacity(valid.batch * spec.item_len());
            for row in &rows {
                values.extend_from_slice(&row[o]);
            }
            let mut shape = vec![valid.batch as i64];
            shape.extend_from_slice(&spec.dims);
            let contents = if valid.raw {
                raw_output_contents.push(
                    values
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>()
                        .into(),
                );
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
        Ok(Response::new(ModelInferResponse {
            model_name: model.name.clone(),
            model_version: model.version.to_string(),
            id: req.id,
            parameters: Default::default(),
            outputs,
            raw_output_contents,
        }))
    }
}
