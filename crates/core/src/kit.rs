//! The model-service kit: what every Marquee model service (vision, language, recommendation)
//! is built from. A service supplies a [`ModelFamily`] (how to load one version of its kind of
//! model) and its gRPC services; the kit owns the rest, the same for every service:
//!
//! - the [`Repository`]: discovery, the newest version of each model, hot reload without a
//!   failed call, refusals shown once, per-model `grpc.health.v1` status;
//! - readiness (`/readyz`, health `""`, OIP `ServerReady`) and liveness (`/healthz`, OIP
//!   `ServerLive`) from the repository and the model threads' supervision;
//! - drain: on shutdown every model reports NOT_SERVING at once, then [`crate::serve`]'s drain
//!   delay and grace period;
//! - the Open Inference Protocol's discovery RPCs, and `ModelInfer` through the family's
//!   [`OipModel`] when it has one;
//! - the admin port, metrics, reflection of exactly the services served, and the binary's
//!   `main` ([`crate::serve::main`]).

use std::net::SocketAddr;
use std::sync::Arc;

use marquee_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::config::{RepositorySettings, ServerSettings};
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::oip::{OipModel, OipService};
use crate::repository::{ModelFamily, Repository};
use crate::serve::{GrpcService, ServeParts, Services, Serving, serve};

/// A model service with its models loaded, not yet listening.
pub struct ModelServer<F: ModelFamily> {
    pub name: &'static str,
    pub settings: ServerSettings,
    pub metrics: Metrics,
    pub repo: Arc<Repository<F>>,
    health: HealthReporter,
    health_service: HealthServer<HealthService>,
}

/// A started model service.
pub struct Running<F: ModelFamily> {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    pub repo: Arc<Repository<F>>,
    /// Resolves when the server has shut down.
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl<F: ModelFamily> From<Running<F>> for Serving {
    fn from(r: Running<F>) -> Self {
        Serving {
            grpc_addr: r.grpc_addr,
            admin_addr: r.admin_addr,
            task: r.task,
        }
    }
}

impl<F: ModelFamily> ModelServer<F> {
    /// Builds the family (with the server's metrics registry, for its own metrics), then loads
    /// and warms up every model. Returns once they are all ready; fails if any cannot serve.
    pub async fn load(
        name: &'static str,
        settings: ServerSettings,
        repository: RepositorySettings,
        family: impl FnOnce(&Metrics) -> anyhow::Result<F>,
    ) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let family = family(&metrics)?;
        let (health, health_service) = crate::serve::health();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let repo = Repository::open(
            family,
            repository,
            metrics.clone(),
            health.clone(),
            Liveness::new(),
        )
        .await?;
        Ok(Self {
            name,
            settings,
            metrics,
            repo,
            health,
            health_service,
        })
    }

    /// The Open Inference Protocol over this server's models, for [`Self::serve`]'s services.
    pub fn oip(&self) -> GrpcInferenceServiceServer<OipService<F>>
    where
        F::Model: OipModel,
    {
        GrpcInferenceServiceServer::new(OipService::new(
            self.repo.clone(),
            self.settings.clone(),
            self.name,
        ))
        .max_decoding_message_size(self.settings.max_message_bytes)
    }

    /// Serves the service's own gRPC `api` and the Open Inference Protocol (plus health and
    /// reflection) until `shutdown` is cancelled: what every model service serves. tonic's own
    /// decoding limit is raised to `server.max_message_bytes` (the layer stack enforces that
    /// limit with the right status before a body is buffered).
    pub async fn serve_api(
        self,
        api: impl GrpcService,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Running<F>>
    where
        F::Model: OipModel,
    {
        let services = Services::new().add_service(api).add_service(self.oip());
        self.serve(services, shutdown).await
    }

    /// Serves `services` (plus health and reflection) until `shutdown` is cancelled.
    pub async fn serve(
        self,
        services: Services,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Running<F>> {
        self.repo.spawn_watcher(shutdown.clone());
        self.repo.spawn_liveness_watch(shutdown.clone());
        let ready_repo = self.repo.clone();
        let drain_repo = self.repo.clone();
        let parts = ServeParts {
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            health: self.health,
            ready: Arc::new(move || ready_repo.is_ready().then(|| ready_repo.names().join(", "))),
            liveness: self.repo.liveness().clone(),
            batching: self.repo.settings().batching_control().then(|| {
                let repo = self.repo.clone();
                let control: crate::admin::BatchControl =
                    Arc::new(move |model, cap| repo.set_batch_cap(model, cap));
                control
            }),
            on_drain: Box::new(move || Box::pin(async move { drain_repo.start_draining().await })),
        };
        let serving = serve(parts, self.health_service, services, shutdown).await?;
        Ok(Running {
            grpc_addr: serving.grpc_addr,
            admin_addr: serving.admin_addr,
            metrics: self.metrics,
            repo: self.repo,
            task: serving.task,
        })
    }
}
