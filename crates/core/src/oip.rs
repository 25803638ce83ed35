//! The Open Inference Protocol (KServe V2) over a model repository, so Triton and KServe
//! clients work unchanged. Discovery (liveness, readiness, metadata, the repository index) is
//! the same for every model family and answered here from the repository; inference is the
//! family's [`OipModel`].

use std::sync::Arc;
use std::time::Instant;

use marquee_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use marquee_proto::inference::model_metadata_response::TensorMetadata;
use marquee_proto::inference::*;
use tonic::{Request, Response, Status};

use crate::config::ServerSettings;
use crate::deadline::deadline;
use crate::error::ServeError;
use crate::repository::{ModelFamily, Repository};

/// A model version that answers `ModelInfer`.
#[tonic::async_trait]
pub trait OipModel: Send + Sync + 'static {
    /// `ModelMetadata.platform`.
    fn platform(&self) -> &'static str {
        "pytorch_torchscript"
    }
    /// `ModelMetadata.inputs`.
    fn inputs(&self) -> Vec<TensorMetadata>;
    /// `ModelMetadata.outputs`.
    fn outputs(&self) -> Vec<TensorMetadata>;
    /// Validates and computes one request. The caller fills in `model_name`, `model_version`
    /// and `id`.
    async fn model_infer(
        &self,
        req: ModelInferRequest,
        deadline: Instant,
    ) -> Result<ModelInferResponse, ServeError>;
}

/// `GRPCInferenceService` for every model in a repository.
pub struct OipService<F: ModelFamily> {
    repo: Arc<Repository<F>>,
    server: ServerSettings,
    name: &'static str,
}

impl<F: ModelFamily> OipService<F> {
    pub fn new(repo: Arc<Repository<F>>, server: ServerSettings, name: &'static str) -> Self {
        Self { repo, server, name }
    }
}

#[tonic::async_trait]
impl<F: ModelFamily> GrpcInferenceService for OipService<F>
where
    F::Model: OipModel,
{
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
            platform: model.platform().into(),
            inputs: model.inputs(),
            outputs: model.outputs(),
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
        let id = req.id.clone();
        let out = model.model_infer(req, deadline).await?;
        Ok(Response::new(ModelInferResponse {
            model_name: model.name.clone(),
            model_version: model.version.to_string(),
            id,
            ..out
        }))
    }
}

/// FP32 values as the little-endian bytes of `raw_output_contents`: one copy on little-endian
/// machines (all we ship for), where a per-value `to_le_bytes` iterator costs tens of
/// milliseconds for a language model's 2 MiB of logits in a debug build, on the async runtime.
pub fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::cast_slice::<f32, u8>(values).to_vec()
    }
    #[cfg(not(target_endian = "little"))]
    {
        let mut out = Vec::with_capacity(values.len() * 4);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod wire_tests {
    #[test]
    fn fp32_raw_contents_are_little_endian() {
        let v = [1.0f32, -2.5, f32::MIN_POSITIVE];
        let expected: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(super::f32_le_bytes(&v), expected);
    }
}
