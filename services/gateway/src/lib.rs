//! The gateway: one front door for every Marquee API, with auth, tenant quotas, routing by
//! model, cross-client batching, balancing over replicas and retries. It links no libtorch.
#![forbid(unsafe_code)]

pub mod access;
pub mod admission;
pub mod auth;
pub mod backend;
pub mod batch;
pub mod config;
pub mod error;
pub mod metrics;
pub mod quota;
pub mod routes;
pub mod routing;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use marquee_core::metrics::Metrics;
use marquee_core::serve::{ServeParts, serve};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::BackendPool;
use crate::config::Settings;
use crate::routing::RoutingTable;

/// Service name in metadata, logs and traces.
pub const NAME: &str = "marquee-gateway";

/// Shared state of the gateway's handlers.
pub struct Gateway {
    pub settings: Settings,
    /// The backends and which models each serves.
    pub routing: Arc<RoutingTable>,
    pub quotas: Arc<quota::Quotas>,
    /// `Classify` coalescers by backend and (model, top_k).
    pub classify_batches: batch::Coalescers<(String, u32), batch::ClassifyDispatch>,
    /// `ModelInfer` coalescers by backend and input layout.
    pub infer_batches: batch::Coalescers<batch::InferKey, batch::InferDispatch>,
    pub metrics: metrics::GatewayMetrics,
}

/// A started gateway.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    pub gateway: Arc<Gateway>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Connects to the backends, learns their models, and starts serving.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let metrics = Metrics::new();
    let gm = metrics::GatewayMetrics::register(&metrics.registry);
    let auth = auth::Authenticator::new(&settings.auth, &settings.tenants)
        .map_err(|e| anyhow::anyhow!("invalid auth configuration:\n  - {}", e.join("\n  - ")))?;
    let mut backends = BTreeMap::new();
    for (name, cfg) in &settings.backends {
        let pool = BackendPool::new(name, cfg, &settings.routes, gm.clone())
            .map_err(anyhow::Error::msg)?;
        pool.spawn_maintenance(shutdown.clone());
        backends.insert(name.clone(), pool);
    }
    let quotas = Arc::new(quota::Quotas::new(&settings.tenants));
    let routing = Arc::new(RoutingTable::new(backends));
    routing.refresh().await;
    let every = settings
        .backends
        .values()
        .map(|b| b.models_refresh_ms)
        .min()
        .unwrap_or(5_000)
        .max(100);
    routing.spawn_refresh(Duration::from_millis(every), shutdown.clone());
    let gateway = Arc::new(Gateway {
        classify_batches: batch::Coalescers::new(settings.routes.vision.clone(), gm.clone()),
        infer_batches: batch::Coalescers::new(settings.routes.inference.clone(), gm.clone()),
        settings: settings.clone(),
        routing: routing.clone(),
        quotas: quotas.clone(),
        metrics: gm.clone(),
    });
    // Batch keys unused for `batch_key_idle_ms` are dropped; sweeping at half that keeps an
    // idle key at most 1.5 times as long.
    let sweeper = gateway.clone();
    let stop = shutdown.clone();
    let idle = settings
        .routes
        .vision
        .batch_key_idle_ms
        .min(settings.routes.inference.batch_key_idle_ms);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis((idle / 2).max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    sweeper.classify_batches.sweep();
                    sweeper.infer_batches.sweep();
                }
            }
        }
    });

    let routes = routes::routes(gateway.clone())
        .into_axum_router()
        .layer(access::AccessLayer::new(Arc::new(auth), quotas, gm));
    let (health, health_service) = marquee_core::serve::health();
    routing
        .report_health(health.clone(), shutdown.clone())
        .await;
    let parts = ServeParts {
        settings: settings.server.clone(),
        metrics: metrics.clone(),
        health,
        ready: Arc::new(move || {
            routing.is_ready().then(|| {
                routing
                    .models()
                    .into_iter()
                    .map(|m| format!("{}@{}", m.model, m.backend))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        }),
        // No worker threads of its own: the gateway's liveness never fails.
        liveness: marquee_core::liveness::Liveness::new(),
        batching: None,
        on_drain: Box::new(|| Box::pin(async {})),
    };
    let served = [
        marquee_proto::vision::image_service_server::SERVICE_NAME,
        marquee_proto::language::text_generation_server::SERVICE_NAME,
        marquee_proto::recommendation::recommender_server::SERVICE_NAME,
        marquee_proto::inference::grpc_inference_service_server::SERVICE_NAME,
    ];
    let serving = serve(
        parts,
        health_service,
        marquee_core::serve::Services::from_routes(tonic::service::Routes::from(routes), &served),
        shutdown,
    )
    .await?;
    Ok(Running {
        grpc_addr: serving.grpc_addr,
        admin_addr: serving.admin_addr,
        metrics,
        gateway,
        task: serving.task,
    })
}
