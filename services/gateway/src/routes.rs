//! The APIs the gateway serves: `marquee.vision.v1.ImageService`, the Open Inference Protocol,
//! `marquee.language.v1.TextGeneration` (streams passed through message by message) and
//! `marquee.recommendation.v1.Recommender`, routed by model name (or, where a request names
//! none, by API) to the backend that serves it. Every call is admitted the same way
//! ([`crate::admission`]) before it is sent.

use std::sync::Arc;

use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use marquee_proto::inference::*;
use marquee_proto::language::text_generation_client::TextGenerationClient;
use marquee_proto::language::text_generation_server::{TextGeneration, TextGenerationServer};
use marquee_proto::language::{
    GenerateRequest, GenerateResponse, GenerateStreamResponse, TokenizeRequest, TokenizeResponse,
};
use marquee_proto::recommendation::recommender_client::RecommenderClient;
use marquee_proto::recommendation::recommender_server::{Recommender, RecommenderServer};
use marquee_proto::recommendation::{
    ForgetUserRequest, ForgetUserResponse, RecommendBatchRequest, RecommendBatchResponse,
    RecommendRequest, RecommendResponse, RecordFeedbackRequest, RecordFeedbackResponse,
    SimilarItemsRequest, SimilarItemsResponse,
};
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::image_service_server::{ImageService, ImageServiceServer};
use marquee_proto::vision::*;
use prost::Message;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::Gateway;
use crate::access::principal;
use crate::admission::Admission;
use crate::backend::outgoing_for;
use crate::batch::{
    ClassifyDispatch, InferDispatch, InferKey, InferPlan, MAX_BATCHED_TOP_K, check_name, send_infer,
};
use crate::config::RouteName;
use crate::error::GatewayError;

/// Backend responses can be as large as a request is allowed to be.
const MAX_BACKEND_MESSAGE: usize = 64 << 20;

/// Every gateway API.
pub fn routes(gw: Arc<Gateway>) -> Routes {
    let max = gw.settings.server.max_message_bytes;
    Routes::new(
        ImageServiceServer::new(VisionRoute { gw: gw.clone() }).max_decoding_message_size(max),
    )
    .add_service(
        GrpcInferenceServiceServer::new(InferenceRoute { gw: gw.clone() })
            .max_decoding_message_size(max),
    )
    .add_service(
        TextGenerationServer::new(LanguageRoute { gw: gw.clone() }).max_decoding_message_size(max),
    )
    .add_service(RecommenderServer::new(RecommendationRoute { gw }).max_decoding_message_size(max))
}

// === impl VisionRoute ===

pub struct VisionRoute {
    gw: Arc<Gateway>,
}

impl VisionRoute {
    async fn classify_inner(
        &self,
        req: Request<ClassifyRequest>,
    ) -> Result<ClassifyResponse, GatewayError> {
        let (call, req) =
            Admission::admit(&self.gw, RouteName::Vision, req, |r| r.model.as_str()).await?;
        let route = &self.gw.settings.routes.vision;
        // A `top_k` past what any model here has classes for goes alone: the backend judges
        // it, and made-up values never become batch keys.
        if route.batching && (1..=MAX_BATCHED_TOP_K).contains(&req.top_k) {
            let (model, top_k) = (req.model.clone(), req.top_k);
            let (labels, model_version) = self
                .gw
                .classify_batches
                .call(
                    (model.clone(), top_k),
                    &req.model,
                    &call.backend,
                    || ClassifyDispatch { model, top_k },
                    req.image.unwrap_or_default(),
                    call.deadline,
                )
                .await?;
            return Ok(ClassifyResponse {
                model: req.model,
                model_version,
                labels,
            });
        }
        call.unary(
            "marquee.vision.v1.ImageService/Classify",
            &req,
            |ch, r| async move { vision_client(ch).classify(r).await },
        )
        .await
        .map(Response::into_inner)
    }
}

#[tonic::async_trait]
impl ImageService for VisionRoute {
    async fn classify(
        &self,
        req: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        Ok(Response::new(self.classify_inner(req).await?))
    }

    async fn classify_batch(
        &self,
        req: Request<ClassifyBatchRequest>,
    ) -> Result<Response<ClassifyBatchResponse>, Status> {
        let (call, req) =
            Admission::admit(&self.gw, RouteName::Vision, req, |r| r.model.as_str()).await?;
        let method = "marquee.vision.v1.ImageService/ClassifyBatch";
        Ok(call
            .unary(method, &req, |ch, r| async move {
                vision_client(ch).classify_batch(r).await
            })
            .await?)
    }

    async fn embed(&self, req: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let (call, req) =
            Admission::admit(&self.gw, RouteName::Vision, req, |r| r.model.as_str()).await?;
        let method = "marquee.vision.v1.ImageService/Embed";
        Ok(call
            .unary(method, &req, |ch, r| async move {
                vision_client(ch).embed(r).await
            })
            .await?)
    }
}

fn vision_client(ch: Channel) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(ch).max_decoding_message_size(MAX_BACKEND_MESSAGE)
}

fn oip_client(ch: Channel) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(ch).max_decoding_message_size(MAX_BACKEND_MESSAGE)
}

// === impl InferenceRoute ===

pub struct InferenceRoute {
    gw: Arc<Gateway>,
}

impl InferenceRoute {
    /// Routes a per-model OIP call to the model's backend.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        req: Request<Req>,
        model: fn(&Req) -> &str,
        method: &'static str,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Message + Clone,
        F: Fn(GrpcInferenceServiceClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        let (admitted, req) = Admission::admit(&self.gw, RouteName::Inference, req, model).await?;
        Ok(admitted
            .unary(method, &req, |ch, r| call(oip_client(ch), r))
            .await?)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceRoute {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.gw.routing.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let known = self.gw.routing.backend_for(&req.get_ref().name, None).await;
        match known {
            Ok(_) => {
                self.forward(
                    req,
                    |r| r.name.as_str(),
                    "inference.GRPCInferenceService/ModelReady",
                    |mut c, r| async move { c.model_ready(r).await },
                )
                .await
            }
            // Readiness of an unknown model is a plain "no", as on the backends.
            Err(_) => Ok(Response::new(ModelReadyResponse { ready: false })),
        }
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: crate::NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.forward(
            req,
            |r| r.name.as_str(),
            "inference.GRPCInferenceService/ModelMetadata",
            |mut c, r| async move { c.model_metadata(r).await },
        )
        .await
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let route = &self.gw.settings.routes.inference;
        if !route.batching {
            return self
                .forward(
                    req,
                    |r| r.model_name.as_str(),
                    "inference.GRPCInferenceService/ModelInfer",
                    |mut c, r| async move { c.model_infer(r).await },
                )
                .await;
        }
        let (call, req) = Admission::begin(&self.gw, RouteName::Inference, req)?;
        check_name("model_name", &req.model_name)?;
        let call = call.route(&req.model_name).await?;
        // Checked before a fair slot is taken: a request whose payload does not match its
        // shape is refused alone and never joins a batch.
        let served = self.gw.routing.served_version(&req.model_name);
        let plan = InferKey::plan(req, route, served.as_deref())?;
        let call = call.slot().await?;
        let (backend, deadline) = (&call.backend, call.deadline);
        let resp = match plan {
            InferPlan::Batch(key, item) => {
                let model = key.model.clone();
                self.gw
                    .infer_batches
                    .call(key, &model, backend, || InferDispatch, item, deadline)
                    .await?
            }
            InferPlan::Alone(req) => send_infer(backend, req, deadline).await?,
        };
        Ok(Response::new(resp))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        principal(&req)?;
        let models = self
            .gw
            .routing
            .models()
            .into_iter()
            .map(|m| repository_index_response::ModelIndex {
                name: m.model,
                version: String::new(),
                state: if m.ready { "READY" } else { "UNAVAILABLE" }.into(),
                reason: if m.ready {
                    String::new()
                } else {
                    format!("backend `{}` has no healthy replica", m.backend)
                },
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }
}

// === impl LanguageRoute ===

pub struct LanguageRoute {
    gw: Arc<Gateway>,
}

fn language_client(ch: Channel) -> TextGenerationClient<Channel> {
    TextGenerationClient::new(ch).max_decoding_message_size(MAX_BACKEND_MESSAGE)
}

type StreamBox<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TextGeneration for LanguageRoute {
    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let (call, req) =
            Admission::admit(&self.gw, RouteName::Language, req, |r| r.model.as_str()).await?;
        let method = "marquee.language.v1.TextGeneration/Generate";
        Ok(call
            .unary(method, &req, |ch, r| async move {
                language_client(ch).generate(r).await
            })
            .await?)
    }

    type GenerateStreamStream = StreamBox<GenerateStreamResponse>;

    /// Passes the backend's stream through message by message. The fair slot is held until
    /// the stream ends, and a client that goes away drops the backend stream, which cancels
    /// the generation there.
    async fn generate_stream(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (call, req) =
            Admission::admit(&self.gw, RouteName::Language, req, |r| r.model.as_str()).await?;
        let upstream = call
            .backend
            .call(
                "marquee.language.v1.TextGeneration/GenerateStream",
                call.deadline,
                |ch, t| {
                    let r = outgoing_for(req.clone(), t, &call.tenant, &call.backend);
                    async move { language_client(ch).generate_stream(r).await }
                },
            )
            .await?
            .into_inner();
        let stream = futures::StreamExt::map(upstream, move |m| {
            let _held = &call.slot;
            m
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        req: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let (call, req) =
            Admission::admit(&self.gw, RouteName::Language, req, |r| r.model.as_str()).await?;
        let method = "marquee.language.v1.TextGeneration/Tokenize";
        Ok(call
            .unary(method, &req, |ch, r| async move {
                language_client(ch).tokenize(r).await
            })
            .await?)
    }
}

// === impl RecommendationRoute ===

pub struct RecommendationRoute {
    gw: Arc<Gateway>,
}

fn recommender_client(ch: Channel) -> RecommenderClient<Channel> {
    RecommenderClient::new(ch).max_decoding_message_size(MAX_BACKEND_MESSAGE)
}

/// Scope of the recommendation calls that change state (feedback, forgetting a user).
const RECOMMENDATION_WRITE: &str = "recommendation:write";

/// The recommender serves one model per backend; its requests name none.
macro_rules! recommend_call {
    ($self:ident, $req:ident, $method:literal, $rpc:ident) => {{
        let (call, req) =
            Admission::admit(&$self.gw, RouteName::Recommendation, $req, |_| "").await?;
        let method = concat!("marquee.recommendation.v1.Recommender/", $method);
        Ok(call
            .unary(method, &req, |ch, r| async move {
                recommender_client(ch).$rpc(r).await
            })
            .await?)
    }};
}

#[tonic::async_trait]
impl Recommender for RecommendationRoute {
    async fn recommend(
        &self,
        req: Request<RecommendRequest>,
    ) -> Result<Response<RecommendResponse>, Status> {
        recommend_call!(self, req, "Recommend", recommend)
    }

    async fn recommend_batch(
        &self,
        req: Request<RecommendBatchRequest>,
    ) -> Result<Response<RecommendBatchResponse>, Status> {
        recommend_call!(self, req, "RecommendBatch", recommend_batch)
    }

    async fn similar_items(
        &self,
        req: Request<SimilarItemsRequest>,
    ) -> Result<Response<SimilarItemsResponse>, Status> {
        recommend_call!(self, req, "SimilarItems", similar_items)
    }

    async fn record_feedback(
        &self,
        req: Request<RecordFeedbackRequest>,
    ) -> Result<Response<RecordFeedbackResponse>, Status> {
        principal(&req)?.require(RECOMMENDATION_WRITE)?;
        recommend_call!(self, req, "RecordFeedback", record_feedback)
    }

    async fn forget_user(
        &self,
        req: Request<ForgetUserRequest>,
    ) -> Result<Response<ForgetUserResponse>, Status> {
        principal(&req)?.require(RECOMMENDATION_WRITE)?;
        recommend_call!(self, req, "ForgetUser", forget_user)
    }
}
