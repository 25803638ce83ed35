//! Server bootstrap shared by every model service: load the repository, bind the gRPC and
//! admin listeners, serve with health, reflection, the Open Inference Protocol and the standard
//! layer stack, and shut down gracefully.
//!
//! Shutdown order: readiness flips to NOT_SERVING (health and `/readyz`), the server keeps
//! serving for `drain_delay_ms` so load balancers notice, then the listener closes and
//! in-flight calls get up to `shutdown_grace_ms` to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{RepositorySettings, ServerSettings};
use crate::metrics::Metrics;
use crate::oip::OipService;
use crate::repository::Repository;

/// The shared pieces a service's handlers use.
pub struct Core {
    pub name: &'static str,
    pub settings: ServerSettings,
    pub metrics: Metrics,
    pub repo: Arc<Repository>,
    health: HealthReporter,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

/// A started server.
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
        let health = HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let repo = Repository::open(repository, metrics.clone(), health.clone()).await?;
        Ok(Self {
            name,
            settings,
            metrics,
            repo,
            health,
            health_service,
        })
    }

    /// Binds both listeners and serves `routes` (plus health, reflection and the Open
    /// Inference Protocol) until `shutdown` is cancelled.
    pub async fn serve(
        self,
        routes: Routes,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Running> {
        let grpc = TcpListener::bind(self.settings.grpc_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot bind `server.grpc_addr` {}: {e}",
                    self.settings.grpc_addr
                )
            })?;
        let admin = TcpListener::bind(self.settings.admin_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot bind `server.admin_addr` {}: {e}",
                    self.settings.admin_addr
                )
            })?;
        let grpc_addr = grpc.local_addr()?;
        let admin_addr = admin.local_addr()?;

        let admin_shutdown = CancellationToken::new();
        crate::admin::spawn(
            admin,
            self.metrics.clone(),
            self.repo.clone(),
            admin_shutdown.clone(),
        );
        self.repo.spawn_watcher(shutdown.clone());

        let max_msg = self.settings.max_message_bytes;
        let oip = marquee_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            OipService::new(self.repo.clone(), self.settings.clone(), self.name),
        )
        .max_decoding_message_size(max_msg);
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(marquee_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        // grpcurl 1.8 speaks only v1alpha reflection.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(marquee_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let routes = routes
            .add_service(oip)
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        self.health
            .set_service_status("", ServingStatus::Serving)
            .await;
        let stack = crate::layers::server_stack(
            self.metrics.clone(),
            max_msg,
            self.settings.max_concurrent_requests,
        );
        let settings = self.settings.clone();
        let repo = self.repo.clone();
        let health = self.health.clone();
        let drain_signal = shutdown.clone();
        let signal = async move {
            drain_signal.cancelled().await;
            tracing::info!("shutdown: reporting NOT_SERVING");
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            repo.start_draining().await;
            tokio::time::sleep(Duration::from_millis(settings.drain_delay_ms)).await;
            tracing::info!("shutdown: closing the listener, finishing in-flight calls");
        };
        // Small responses must not wait for Nagle + delayed ACK (measured: a 40 ms p99 floor).
        let incoming = TcpIncoming::from(grpc)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let server = tonic::transport::Server::builder()
            // Image tensors are hundreds of KiB: windows that hold a whole request avoid
            // stalling on WINDOW_UPDATE round trips mid-message.
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .timeout(Duration::from_millis(self.settings.max_timeout_ms))
            .layer(stack)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, signal);
        let grace =
            Duration::from_millis(self.settings.drain_delay_ms + self.settings.shutdown_grace_ms);
        let task = tokio::spawn(async move {
            let result = tokio::select! {
                r = server => r.map_err(anyhow::Error::from),
                _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                    tracing::warn!("shutdown grace period over; abandoning in-flight calls");
                    Ok(())
                }
            };
            admin_shutdown.cancel();
            tracing::info!("shutdown complete");
            result
        });
        Ok(Running {
            grpc_addr,
            admin_addr,
            metrics: self.metrics,
            repo: self.repo,
            task,
        })
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix, this is a bug");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
