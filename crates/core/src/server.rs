//! Bootstrap for model services: load the repository, then serve it (with the Open Inference
//! Protocol and per-model health) through [`crate::serve`].

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::config::{RepositorySettings, ServerSettings};
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::oip::OipService;
use crate::repository::Repository;
use crate::serve::{ServeParts, serve};

pub use crate::serve::termination_signal;

/// The shared pieces a model service's handlers use.
pub struct Core {
    pub name: &'static str,
    pub settings: ServerSettings,
    pub metrics: Metrics,
    pub repo: Arc<Repository>,
    health: HealthReporter,
    health_service: HealthServer<HealthService>,
}

/// A started model server.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    pub repo: Arc<Repository>,
    /// Resolves when the server has shut down.
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Core {
    /// Loads and warms up every model. Returns once they are all ready.
    pub async fn load(
        name: &'static str,
        settings: ServerSettings,
        repository: RepositorySettings,
    ) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let (health, health_service) = crate::serve::health();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let repo =
            Repository::open(repository, metrics.clone(), health.clone(), Liveness::new()).await?;
        Ok(Self {
            name,
            settings,
            metrics,
            repo,
            health,
            health_service,
        })
    }

    /// Serves `routes` plus the Open Inference Protocol until `shutdown` is cancelled.
    pub async fn serve(
        self,
        routes: Routes,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Running> {
        self.repo.spawn_watcher(shutdown.clone());
        self.repo.spawn_liveness_watch(shutdown.clone());
        let oip = marquee_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            OipService::new(self.repo.clone(), self.settings.clone(), self.name),
        )
        .max_decoding_message_size(self.settings.max_message_bytes);
        let ready_repo = self.repo.clone();
        let drain_repo = self.repo.clone();
        let parts = ServeParts {
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            health: self.health,
            ready: Arc::new(move || ready_repo.is_ready().then(|| ready_repo.names().join(", "))),
            liveness: self.repo.liveness().clone(),
            on_drain: Box::new(move || Box::pin(async move { drain_repo.start_draining().await })),
        };
        let serving = serve(
            parts,
            self.health_service,
            routes.add_service(oip),
            shutdown,
        )
        .await?;
        Ok(Running {
            grpc_addr: serving.grpc_addr,
            admin_addr: serving.admin_addr,
            metrics: self.metrics,
            repo: self.repo,
            task: serving.task,
        })
    }
}
