//! The routing table: which backend serves which model (learned from the backends' repository
//! indexes and refreshed), and the per-model `grpc.health.v1` statuses the gateway answers
//! from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use marquee_core::ServeError;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::backend::BackendPool;
use crate::batch::check_name;
use crate::config::BackendKind;

/// A model's place in the table.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    backend: String,
    /// The version the backend reported serving.
    version: String,
}

/// A routable model, for listings and health.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRoute {
    pub model: String,
    pub backend: String,
    /// Whether the backend has a healthy replica to serve it.
    pub ready: bool,
}

/// The backends and the model → backend table.
pub struct RoutingTable {
    backends: BTreeMap<String, Arc<BackendPool>>,
    table: ArcSwap<HashMap<String, Entry>>,
    last_refresh_ms: AtomicU64,
    started: Instant,
    /// Woken when a refresh changed the table.
    changed: Notify,
}

impl RoutingTable {
    pub fn new(backends: BTreeMap<String, Arc<BackendPool>>) -> Self {
        Self {
            backends,
            table: ArcSwap::from_pointee(HashMap::new()),
            last_refresh_ms: AtomicU64::new(0),
            started: Instant::now(),
            changed: Notify::new(),
        }
    }

    /// The backend called `name`.
    pub fn backend(&self, name: &str) -> Option<&Arc<BackendPool>> {
        self.backends.get(name)
    }

    /// Rebuilds the table from every backend's repository index.
    pub async fn refresh(&self) {
        self.last_refresh_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut table = HashMap::new();
        for (name, pool) in &self.backends {
            match pool.models().await {
                Some(models) => {
                    for (model, version) in models {
                        let backend = name.clone();
                        table.insert(model, Entry { backend, version });
                    }
                }
                None => {
                    // Keep what we knew about this backend rather than forget its models.
                    for (m, e) in self.table.load().iter() {
                        if &e.backend == name {
                            table.insert(m.clone(), e.clone());
                        }
                    }
                }
            }
        }
        if **self.table.load() != table {
            self.table.store(Arc::new(table));
            self.changed.notify_one();
        }
    }

    /// Refreshes the table every `every` until `shutdown`.
    pub fn spawn_refresh(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => me.refresh().await,
                }
            }
        });
    }

    /// The backend serving `model`, which must be of `kind` if given. An unknown model triggers
    /// one immediate refresh (at most once a second) before answering NOT_FOUND; a name no
    /// model can have (too long, not visible ASCII) is refused first, so it is never looked up
    /// nor echoed back in a message.
    pub async fn backend_for(
        &self,
        model: &str,
        kind: Option<BackendKind>,
    ) -> Result<Arc<BackendPool>, ServeError> {
        check_name("model", model)?;
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
                });
        }
        let mut name = self.table.load().get(model).map(|e| e.backend.clone());
        if name.is_none()
            && self.started.elapsed().as_millis() as u64
                > self.last_refresh_ms.load(Ordering::Relaxed) + 1_000
        {
            self.refresh().await;
            name = self.table.load().get(model).map(|e| e.backend.clone());
        }
        name.and_then(|n| self.backends.get(&n).cloned())
            .filter(|p| kind.is_none_or(|k| p.cfg.kind == k))
            .ok_or_else(|| ServeError::ModelNotFound {
                model: model.to_string(),
                detail: kind
                    .map(|k| format!(" by any {k:?} backend").to_lowercase())
                    .unwrap_or_default(),
            })
    }

    /// Every routable model, its backend and whether that backend can serve it now, by name.
    pub fn models(&self) -> Vec<ModelRoute> {
        let mut v: Vec<_> = self
            .table
            .load()
            .iter()
            .map(|(model, e)| ModelRoute {
                model: model.clone(),
                backend: e.backend.clone(),
                ready: self
                    .backends
                    .get(&e.backend)
                    .is_some_and(|b| b.healthy_count() > 0),
            })
            .collect();
        v.sort_by(|a, b| (&a.model, &a.backend).cmp(&(&b.model, &b.backend)));
        v
    }

    /// The version of `model` its backend reported serving, if known.
    pub fn served_version(&self, model: &str) -> Option<String> {
        self.table.load().get(model).map(|e| e.version.clone())
    }

    /// Whether every backend has a healthy replica.
    pub fn is_ready(&self) -> bool {
        self.backends.values().all(|b| b.healthy_count() > 0)
    }

    /// Keeps `health`'s per-model statuses equal to the table until `shutdown`: SERVING while
    /// the model's backend has a healthy replica, NOT_SERVING while it has none, and no status
    /// (NOT_FOUND) once no backend lists it. The names are the table's only, never a caller's,
    /// so the set is as bounded as the table. The first report is made before this returns
    /// (a gateway answers for its models as soon as it serves); at shutdown every model turns
    /// NOT_SERVING, as on the model services.
    pub async fn report_health(
        self: &Arc<Self>,
        mut health: HealthReporter,
        shutdown: CancellationToken,
    ) {
        // Subscribed before the first report, so no change after it is missed.
        let mut pools: Vec<watch::Receiver<usize>> =
            self.backends.values().map(|b| b.health_changes()).collect();
        let mut reported = HashMap::new();
        self.report(&mut health, &mut reported).await;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let pool_changed = async {
                    if pools.is_empty() {
                        std::future::pending::<()>().await;
                    }
                    // The senders live as long as `me`: `changed` cannot fail here.
                    let _ = futures::future::select_all(
                        pools.iter_mut().map(|rx| Box::pin(rx.changed())),
                    )
                    .await;
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = me.changed.notified() => {}
                    _ = pool_changed => {}
                }
                me.report(&mut health, &mut reported).await;
            }
            for model in reported.keys() {
                health
                    .set_service_status(model, ServingStatus::NotServing)
                    .await;
            }
        });
    }

    /// Sets the statuses that changed since `reported`, clears those of models no longer
    /// routed, and leaves `reported` equal to the table.
    async fn report(
        &self,
        health: &mut HealthReporter,
        reported: &mut HashMap<String, ServingStatus>,
    ) {
        let now: HashMap<String, ServingStatus> = self
            .models()
            .into_iter()
            // `""` is the whole server's status, set by the serving core.
            .filter(|m| !m.model.is_empty())
            .map(|m| (m.model, serving_status(m.ready)))
            .collect();
        for (model, status) in &now {
            // Only changes: a Watch stream sends every status set, even an unchanged one.
            if reported.get(model) != Some(status) {
                health.set_service_status(model, *status).await;
            }
        }
        for gone in reported.keys().filter(|m| !now.contains_key(*m)) {
            health.clear_service_status(gone).await;
        }
        *reported = now;
    }
}

fn serving_status(ready: bool) -> ServingStatus {
    if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}
