//! The gateway: one front door for every Marquee API, with auth, tenant quotas, routing by
//! model, cross-client batching, balancing over replicas and retries. It links no libtorch.
#![forbid(unsafe_code)]

pub mod access;
pub mod auth;
pub mod backend;
pub mod batch;
pub mod config;
pub mod error;
pub mod metrics;
pub mod quota;
pub mod routes;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use marquee_core::ServeError;
use marquee_core::metrics::Metrics;
use marquee_core::serve::{ServeParts, serve};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::BackendPool;
use crate::config::{BackendKind, Route, Settings};
use crate::error::GatewayError;

/// Service name in metadata, logs and traces.
pub const NAME: &str = "marquee-gateway";

/// Shared state of the gateway's handlers.
pub struct Gateway {
    pub settings: Settings,
    pub backends: BTreeMap<String, Arc<BackendPool>>,
    /// Model name → (backend name, version served), from the backends' repository indexes.
    table: ArcSwap<HashMap<String, (String, String)>>,
    last_refresh_ms: AtomicU64,
    started: Instant,
    pub quotas: Arc<quota::Quotas>,
    /// `Classify` coalescers by backend and (model, top_k).
    pub classify_batches: batch::Coalescers<(String, u32), batch::ClassifyDispatch>,
    /// `ModelInfer` coalescers by backend and input layout.
    pub infer_batches: batch::Coalescers<batch::InferKey, batch::InferDispatch>,
    pub metrics: metrics::GatewayMetrics,
}

impl Gateway {
    /// Rebuilds the model table from every backend's repository index.
    pub async fn refresh_models(&self) {
        self.last_refresh_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut table = HashMap::new();
        for (name, pool) in &self.backends {
            match pool.models().await {
                Some(models) => {
                    for (m, version) in models {
                        table.insert(m, (name.clone(), version));
                    }
                }
                None => {
                    // Keep what we knew about this backend rather than forget its models.
                    for (m, (b, v)) in self.table.load().iter() {
                        if b == name {
                            table.insert(m.clone(), (b.clone(), v.clone()));
                        }
                    }
                }
            }
        }
        self.table.store(Arc::new(table));
    }

    /// The backend serving `model`, which must be of `kind` if given. An unknown model triggers
    /// one immediate refresh (at most once a second) before answering NOT_FOUND; a name no
    /// model can have (too long, not visible ASCII) is refused first, so it is never looked up
    /// nor echoed back in a message.
    pub async fn backend_for(
        &self,
        model: &str,
        kind: Option<BackendKind>,
    ) -> Result<Arc<BackendPool>, GatewayError> {
        batch::check_name("model", model)?;
        // APIs whose requests may leave the model unset (language) or have none
        // (recommendation) go to the first backend of their kind.
        if model.is_empty()
            && let Some(k) = kind
        {
            return self
                .backends
                .values()
                .find(|p| p.cfg.kind == k)
                .cloned()
                .ok_or_else(|| {
                    ServeError::unavailable(
                        format!("no {k:?} backend is configured on this gateway").to_lowercase(),
                    )
                    .into()
                });
        }
        let mut name = self.table.load().get(model).map(|(b, _)| b.clone());
        if name.is_none()
            && self.started.elapsed().as_millis() as u64
                > self.last_refresh_ms.load(Ordering::Relaxed) + 1_000
        {
            self.refresh_models().await;
            name = self.table.load().get(model).map(|(b, _)| b.clone());
        }
        let pool = name
            .and_then(|n| self.backends.get(&n).cloned())
            .filter(|p| kind.is_none_or(|k| p.cfg.kind == k))
            .ok_or_else(|| ServeError::ModelNotFound {
                model: model.to_string(),
                detail: kind
                    .map(|k| format!(" by any {k:?} backend").to_lowercase())
                    .unwrap_or_default(),
            })?;
        Ok(pool)
    }

    /// Every routable model and its backend.
    pub fn models(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .table
            .load()
            .iter()
            .map(|(m, (b, _))| (m.clone(), b.clone()))
            .collect();
        v.sort();
        v
    }

    /// The version of `model` its backend reported serving, if known.
    pub fn served_version(&self, model: &str) -> Option<String> {
        self.table.load().get(model).map(|(_, v)| v.clone())
    }

    /// Whether every backend has a healthy replica.
    pub fn is_ready(&self) -> bool {
        self.backends.values().all(|b| b.healthy_count() > 0)
    }
}

/// When a call through `route` must be answered: the client's `grpc-timeout` capped at the
/// route's maximum, or the route's default; minus the same margin the backends use.
pub fn deadline(metadata: &tonic::metadata::MetadataMap, route: &Route) -> Instant {
    let max = Duration::from_millis(route.max_timeout_ms);
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(marquee_core::deadline::parse_grpc_timeout)
        .map(|t| t.min(max))
        .unwrap_or(Duration::from_millis(route.default_timeout_ms));
    let margin = (timeout / 10).min(Duration::from_millis(20));
    Instant::now() + timeout - margin
}

/// Refuses a request over the route's size limit.
pub fn check_size(route_name: &str, route: &Route, len: usize) -> Result<(), GatewayError> {
    if len > route.max_request_bytes {
        return Err(ServeError::TooLarge {
            field: "request".into(),
            message: format!(
                "request is {len} bytes; the limit for this route (`routes.{route_name}.max_request_bytes`) is {} bytes",
                route.max_request_bytes
            ),
        }
        .into());
    }
    Ok(())
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
    let gateway = Arc::new(Gateway {
        classify_batches: batch::Coalescers::new(settings.routes.vision.clone(), gm.clone()),
        infer_batches: batch::Coalescers::new(settings.routes.inference.clone(), gm.clone()),
        settings: settings.clone(),
        backends,
        table: ArcSwap::from_pointee(HashMap::new()),
        last_refresh_ms: AtomicU64::new(0),
        started: Instant::now(),
        quotas: quotas.clone(),
        metrics: gm.clone(),
    });
    gateway.refresh_models().await;
    let refresher = gateway.clone();
    let stop = shutdown.clone();
    let every = settings
        .backends
        .values()
        .map(|b| b.models_refresh_ms)
        .min()
        .unwrap_or(5_000)
        .max(100);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(every));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => refresher.refresh_models().await,
            }
        }
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
    let ready_gw = gateway.clone();
    let parts = ServeParts {
        settings: settings.server.clone(),
        metrics: metrics.clone(),
        health,
        ready: Arc::new(move || {
            ready_gw.is_ready().then(|| {
                ready_gw
                    .models()
                    .into_iter()
                    .map(|(m, b)| format!("{m}@{b}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        }),
        // No worker threads of its own: the gateway's liveness never fails.
        liveness: marquee_core::liveness::Liveness::new(),
        on_drain: Box::new(|| Box::pin(async {})),
    };
    let serving = serve(
        parts,
        health_service,
        tonic::service::Routes::from(routes),
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
