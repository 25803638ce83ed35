//! The gRPC + admin server every Marquee binary runs (model services and the gateway alike):
//! health, reflection (v1 and v1alpha), the standard layer stack, and graceful shutdown.
//!
//! Shutdown order: readiness flips to NOT_SERVING (health and `/readyz`), the server keeps
//! serving for `drain_delay_ms` so load balancers notice, then the listener closes and
//! in-flight calls get up to `shutdown_grace_ms` to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use std::convert::Infallible;
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::admin::Readiness;
use crate::config::{EXIT_CONFIG, ServerSettings, TelemetrySettings, Validate};
use crate::liveness::Liveness;
use crate::metrics::Metrics;

/// Work to do when shutdown begins, before the drain delay.
pub type OnDrain = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Everything [`serve`] needs besides the service routes.
pub struct ServeParts {
    pub settings: ServerSettings,
    pub metrics: Metrics,
    pub health: HealthReporter,
    pub ready: Readiness,
    /// The workers' liveness: once one dies, `/healthz` and `/readyz` fail and gRPC health
    /// reports NOT_SERVING for `""` and the worker's model.
    pub liveness: Liveness,
    /// Run-time batch caps on the admin port (`repository.batching_control`); `None`: off.
    pub batching: Option<crate::admin::BatchControl>,
    pub on_drain: OnDrain,
}

/// A started server.
pub struct Serving {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Resolves when the server has shut down.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// A tonic-generated gRPC service, as a server's routes take it.
pub trait GrpcService:
    tower::Service<
        http::Request<tonic::body::Body>,
        Error = Infallible,
        Response: axum::response::IntoResponse,
        Future: Send + 'static,
    > + tonic::server::NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Error = Infallible,
            Response: axum::response::IntoResponse,
            Future: Send + 'static,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The gRPC services a server answers, and their names: reflection advertises exactly these
/// (plus health and reflection), so a client never discovers a service that would answer
/// UNIMPLEMENTED.
#[derive(Default)]
pub struct Services {
    routes: Routes,
    names: Vec<&'static str>,
}

impl Services {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tonic service.
    pub fn add_service<S: GrpcService>(mut self, svc: S) -> Self {
        self.names.push(S::NAME);
        self.routes = self.routes.add_service(svc);
        self
    }

    /// Routes built elsewhere (the gateway wraps its services in its access layer), serving
    /// the services named `names`.
    pub fn from_routes(routes: Routes, names: &[&'static str]) -> Self {
        Self {
            routes,
            names: names.to_vec(),
        }
    }

    /// The fully qualified names of the services added.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

/// A health reporter and the service answering from it.
pub fn health() -> (HealthReporter, HealthServer<HealthService>) {
    let reporter = HealthReporter::new();
    let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    (reporter, service)
}

/// Binds both listeners and serves `routes` plus health and reflection until `shutdown`.
pub async fn serve(
    parts: ServeParts,
    health_service: HealthServer<HealthService>,
    services: Services,
    shutdown: CancellationToken,
) -> anyhow::Result<Serving> {
    let Services { routes, names } = services;
    let ServeParts {
        settings,
        metrics,
        health,
        ready,
        liveness,
        batching,
        on_drain,
    } = parts;
    let grpc = TcpListener::bind(settings.grpc_addr).await.map_err(|e| {
        anyhow::anyhow!("cannot bind `server.grpc_addr` {}: {e}", settings.grpc_addr)
    })?;
    let admin = TcpListener::bind(settings.admin_addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot bind `server.admin_addr` {}: {e}",
            settings.admin_addr
        )
    })?;
    let grpc_addr = grpc.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let admin_shutdown = CancellationToken::new();
    crate::admin::spawn(
        admin,
        metrics.clone(),
        ready,
        liveness.clone(),
        batching,
        Duration::from_millis(settings.body_read_timeout_ms),
        admin_shutdown.clone(),
    );

    // Only what this server answers: the descriptor sets hold every Marquee service.
    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(marquee_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name(REFLECTION_V1)
            .with_service_name(REFLECTION_V1ALPHA);
        for name in &names {
            b = b.with_service_name(*name);
        }
        b
    };
    let reflection_v1 = reflection().build_v1()?;
    // grpcurl 1.8 speaks only v1alpha reflection.
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let routes = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    health.set_service_status("", ServingStatus::Serving).await;
    // A dead worker must turn the probes and the balancers' checks red for good: without this
    // the gateway ejects the replica on its failed calls and restores it on the next SERVING
    // health check, every interval, and Kubernetes never restarts it.
    let dead_health = health.clone();
    let dead_stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            death = liveness.died() => {
                dead_health.set_service_status("", ServingStatus::NotServing).await;
                dead_health.set_service_status(&death.model, ServingStatus::NotServing).await;
            }
            _ = dead_stop.cancelled() => {}
        }
    });
    let stack = crate::layers::server_stack(
        metrics.clone(),
        &crate::layers::StackLimits::from_settings(&settings),
    );
    let drain_signal = shutdown.clone();
    let drain_delay = Duration::from_millis(settings.drain_delay_ms);
    let signal = async move {
        drain_signal.cancelled().await;
        tracing::info!("shutdown: reporting NOT_SERVING");
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        on_drain().await;
        tokio::time::sleep(drain_delay).await;
        tracing::info!("shutdown: closing the listener, finishing in-flight calls");
    };
    // Small responses must not wait for Nagle + delayed ACK (measured: a 40 ms p99 floor).
    let incoming = TcpIncoming::from(grpc)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &settings.tls {
        builder = builder.tls_config(server_tls(tls)?)?;
    }
    let server = builder
        // Image tensors are hundreds of KiB: windows that hold a whole request avoid stalling
        // on WINDOW_UPDATE round trips mid-message.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .timeout(Duration::from_millis(settings.max_timeout_ms))
        // hyper has no HTTP/2 header timeout: pings find peers that stopped answering (or stall
        // mid-header-block), and closing the connection ends every call it held.
        .http2_keepalive_interval(
            (settings.http2_keepalive_interval_ms > 0)
                .then(|| Duration::from_millis(settings.http2_keepalive_interval_ms)),
        )
        .layer(stack)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = Duration::from_millis(settings.drain_delay_ms + settings.shutdown_grace_ms);
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
    Ok(Serving {
        grpc_addr,
        admin_addr,
        task,
    })
}

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// A PEM file named in the configuration (a certificate, a key, a CA); the error names it.
pub fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("`{}`: {e}", path.display()))
}

/// The rustls configuration of `server.tls`.
fn server_tls(tls: &crate::config::ServerTls) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |p: &std::path::Path| read_pem(p).map_err(|e| anyhow::anyhow!("`server.tls`: {e}"));
    let identity =
        tonic::transport::Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
    let mut cfg = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(cfg)
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when the
/// future is first polled, so a signal that arrives right after the call is not missed (and
/// does not kill the process with the default action).
pub fn termination_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix, this is a bug");
        let mut int = signal(SignalKind::interrupt())
            .expect("installing a SIGINT handler cannot fail on unix, this is a bug");
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What a service's `start` reports back to [`run_binary`].
pub type Started = Serving;

/// A service's settings as the bootstrap needs them.
pub trait ServiceSettings:
    Default + Serialize + DeserializeOwned + Validate + Send + 'static
{
    fn server(&self) -> &ServerSettings;
    fn telemetry(&self) -> &TelemetrySettings;
}

/// Implements [`ServiceSettings`] for a settings struct with `server` and `telemetry` fields.
#[macro_export]
macro_rules! service_settings {
    ($settings:ty) => {
        impl $crate::serve::ServiceSettings for $settings {
            fn server(&self) -> &$crate::config::ServerSettings {
                &self.server
            }
            fn telemetry(&self) -> &$crate::config::TelemetrySettings {
                &self.telemetry
            }
        }
    };
}

/// The whole `main` of a Marquee service binary: `--config FILE` (or `MARQUEE_CONFIG`), the
/// layered config (exit 64 with every problem listed when it is invalid), the allocator
/// tuning, then [`run_binary`]. Exits the process.
pub fn main<S, F, Fut>(name: &'static str, about: &'static str, start: F) -> !
where
    S: ServiceSettings,
    F: FnOnce(S, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<Serving>>,
{
    let args = clap::Command::new(name)
        .version(env!("CARGO_PKG_VERSION"))
        .about(about)
        .arg(
            clap::Arg::new("config")
                .long("config")
                .env("MARQUEE_CONFIG")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML config file; `MARQUEE__SECTION__KEY` env vars override it."),
        )
        .get_matches();
    let settings: S =
        match crate::config::load(args.get_one::<PathBuf>("config").map(|p| p.as_path())) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(EXIT_CONFIG);
            }
        };
    // Before any model thread allocates: see `alloc` for the measured effect.
    crate::alloc::tune_allocator();
    let (server, telemetry) = (settings.server().clone(), settings.telemetry().clone());
    let code = run_binary(name, &server, &telemetry, |shutdown| {
        start(settings, shutdown)
    });
    std::process::exit(code);
}

/// The body of every Marquee binary after its config is loaded: builds the runtime, initialises
/// telemetry, starts the service, prints the one `NAME listening grpc=… admin=…` line scripts and
/// tests read, waits for SIGTERM or Ctrl-C, drains, and returns the exit code.
pub fn run_binary<F, Fut>(
    name: &'static str,
    server: &ServerSettings,
    telemetry: &crate::config::TelemetrySettings,
    start: F,
) -> i32
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<Started>>,
{
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if server.worker_threads > 0 {
        runtime.worker_threads(server.worker_threads);
    }
    runtime.max_blocking_threads(server.blocking_threads.max(1));
    let runtime = runtime
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(async {
        let _telemetry = match crate::telemetry::init(telemetry, name) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("telemetry: {e}");
                return crate::config::EXIT_CONFIG;
            }
        };
        let shutdown = CancellationToken::new();
        let running = match start(shutdown.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("start failed: {e:#}");
                return 1;
            }
        };
        // Handlers first, then the line that tells scripts and tests they may signal us.
        let stop = termination_signal();
        println!(
            "{name} listening grpc={} admin={}",
            running.grpc_addr, running.admin_addr
        );
        stop.await;
        shutdown.cancel();
        match running.task.await {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                tracing::error!("server failed: {e:#}");
                1
            }
            Err(e) => {
                tracing::error!("server task panicked: {e}");
                1
            }
        }
    })
}
