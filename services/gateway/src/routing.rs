//! The routing table: which backend serves which model, learned from the backends' repository
//! indexes and refreshed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use marquee_core::ServeError;
use tokio_util::sync::CancellationToken;

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
}

impl RoutingTable {
    pub fn new(backends: BTreeMap<String, Arc<BackendPool>>) -> Self {
        Self {
            backends,
            table: ArcSwap::from_pointee(HashMap::new()),
            last_refresh_ms: AtomicU64::new(0),
            started: Instant::now(),
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
        self.table.store(Arc::new(table));
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
}
