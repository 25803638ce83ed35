//! The model repository every model service stands on: loads every model's newest version,
//! warms it up, marks it READY, and hot-swaps in new versions (or new models) found while
//! serving, without failing a request. What a version *is* (a batched tensor model, a language
//! engine, a recommender) is the service's [`ModelFamily`]; discovery, versions, refusals,
//! health, readiness and draining are the same for every kind and live here once.
//!
//! Layout, like Triton's: `<repo>/<model>/model.toml` and `<repo>/<model>/<version>/…`, where
//! `<version>` is a positive integer and the largest complete one serves. A version directory
//! is complete once the family's marker file (`model.pt`, say) exists, so writers should move
//! a finished version directory into place.
//!
//! A version that fails to load or to warm up is refused once: one log line, one count in
//! `marquee_model_load_failures_total`, and an `UNAVAILABLE` entry with the reason in
//! `RepositoryIndex` (as Triton shows a model that failed to load). It is not tried again until
//! its files change (size or modification time of `model.toml`, the files next to it or in the
//! version directory), and the serving version stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::RepositorySettings;
use crate::error::ServeError;
use crate::liveness::Liveness;
use crate::metrics::Metrics;

/// A kind of model a service serves: which `model.toml` kinds are its, and how one version is
/// loaded. The [`Repository`] does everything else.
pub trait ModelFamily: Send + Sync + 'static {
    /// One loaded, warmed-up version. Dropped when a newer version has replaced it and the
    /// last request holding it has finished: that is where it stops its threads.
    type Model: Send + Sync + 'static;

    /// The `kind` values of `model.toml` this family serves; a `model.toml` without `kind` is a
    /// `classifier`. A repository may hold models of other services: they are skipped.
    fn kinds(&self) -> &'static [&'static str];

    /// The file whose presence makes a version directory complete.
    fn version_marker(&self) -> &'static str {
        "model.pt"
    }

    /// The most models one server of this family serves; more found at start is an error,
    /// more appearing later are not loaded (a warning says so).
    fn max_models(&self) -> usize {
        usize::MAX
    }

    /// Loads and warms up one version; blocking (runs on a blocking thread). The error is the
    /// refusal reason shown in `RepositoryIndex`.
    fn load(&self, at: &LoadContext<'_>) -> Result<Self::Model, String>;

    /// Changes a served model's batch cap at run time (`repository.batching_control`, the
    /// admin port's `POST /batching/{model}/{cap}`): `Some(n)` or `None` for the family's own
    /// choice; returns what is now in force. Families without a batcher refuse.
    fn set_batch_cap(&self, _model: &Self::Model, _cap: Option<usize>) -> Result<String, String> {
        Err("this service does not batch models".into())
    }

    /// What the "model ready" log line says about a version (lanes, batch cap, sizes).
    fn describe(&self, _model: &Self::Model) -> String {
        String::new()
    }

    /// Puts a version in service: `swap` makes it the one requests get. A family whose own
    /// state must change in the same instant (the recommender's users follow its catalogue)
    /// wraps `swap` in its critical section. An error refuses the version, as a failed load.
    fn install(&self, _model: &Self::Model, swap: &mut dyn FnMut()) -> Result<(), String> {
        swap();
        Ok(())
    }
}

/// What [`ModelFamily::load`] is given.
pub struct LoadContext<'a> {
    /// The model's name (its directory name).
    pub name: &'a str,
    /// `<repo>/<model>`: `model.toml` is here.
    pub dir: &'a Path,
    pub version: u64,
    pub settings: &'a RepositorySettings,
    pub metrics: &'a Metrics,
    /// The server's liveness: model threads supervise themselves with it.
    pub liveness: &'a Liveness,
}

impl LoadContext<'_> {
    /// `<repo>/<model>/<version>`.
    pub fn version_dir(&self) -> PathBuf {
        self.dir.join(self.version.to_string())
    }
}

/// A version in service: its name and number, and the family's model (through `Deref`).
pub struct Served<M> {
    pub name: String,
    pub version: u64,
    model: M,
    metrics: Metrics,
}

impl<M> std::ops::Deref for Served<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.model
    }
}

impl<M> Drop for Served<M> {
    fn drop(&mut self) {
        self.metrics
            .model_ready
            .with_label_values(&[&self.name, &self.version.to_string()])
            .set(0);
    }
}

/// Every model this server serves, swapped atomically as versions change.
pub struct Repository<F: ModelFamily> {
    family: F,
    settings: RepositorySettings,
    models: ArcSwap<HashMap<String, Arc<Served<F::Model>>>>,
    metrics: Metrics,
    health: HealthReporter,
    draining: AtomicBool,
    liveness: Liveness,
    /// The newest version of a model that was refused, by model: skipped until its files change.
    refused: Mutex<HashMap<String, Refused>>,
    /// Versions refused by hot reload, by model (each counted once, not once per poll).
    load_failures: IntCounterVec,
    /// Repository scans done by the hot-reload watcher.
    polls: IntCounter,
}

/// A version hot reload refused, and the state of its files when it was tried.
#[derive(Debug, Clone)]
struct Refused {
    version: u64,
    files: Fingerprint,
    reason: String,
}

/// Size and modification time of every file a version is loaded from.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// What `RepositoryIndex` shows of a refused version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedVersion {
    pub model: String,
    pub version: u64,
    pub reason: String,
}

impl<F: ModelFamily> Repository<F> {
    /// Loads every model's newest version. Fails if any model cannot be served, so a broken
    /// deployment never reports ready.
    pub async fn open(
        family: F,
        settings: RepositorySettings,
        metrics: Metrics,
        health: HealthReporter,
        liveness: Liveness,
    ) -> anyhow::Result<Arc<Self>> {
        // Registered here rather than in `Metrics`: only servers with a repository have them.
        let r = crate::metrics::Registrar(&metrics.registry);
        let load_failures = r.counter_vec(
            "marquee_model_load_failures_total",
            "Model versions refused by hot reload (load or warm-up failed), each counted once.",
            &["model"],
        )?;
        let polls = r.counter(
            "marquee_model_repository_polls_total",
            "Scans of the model repository for new versions.",
        )?;
        let repo = Arc::new(Self {
            family,
            settings,
            models: ArcSwap::from_pointee(HashMap::new()),
            metrics,
            health,
            draining: AtomicBool::new(false),
            liveness,
            refused: Mutex::new(HashMap::new()),
            load_failures,
            polls,
        });
        let found = repo.scan()?;
        for wanted in &repo.settings.models {
            if !found.iter().any(|(name, _, _)| name == wanted) {
                anyhow::bail!(
                    "model `{wanted}` from `repository.models` has no version under `{}`",
                    repo.settings.path.display()
                );
            }
        }
        if found.is_empty() {
            anyhow::bail!(
                "no `{}` model with a complete version found under `{}`",
                repo.family.kinds().join("`/`"),
                repo.settings.path.display()
            );
        }
        let most = repo.family.max_models();
        if found.len() > most {
            anyhow::bail!(
                "this service serves at most {most} model(s); `{}` holds {}: {}; name the one to serve in `repository.models`",
                repo.settings.path.display(),
                found.len(),
                found
                    .iter()
                    .map(|(n, _, _)| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for (name, dir, version) in found {
            repo.health
                .set_service_status(&name, ServingStatus::NotServing)
                .await;
            repo.load_version(name, dir, version)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        Ok(repo)
    }

    async fn load_version(
        self: &Arc<Self>,
        name: String,
        dir: PathBuf,
        version: u64,
    ) -> Result<(), String> {
        let repo = self.clone();
        let load_name = name.clone();
        let model = tokio::task::spawn_blocking(move || {
            repo.family.load(&LoadContext {
                name: &load_name,
                dir: &dir,
                version,
                settings: &repo.settings,
                metrics: &repo.metrics,
                liveness: &repo.liveness,
            })
        })
        .await
        .map_err(|e| format!("model loader panicked: {e}"))??;
        crate::alloc::release_free_memory();
        let detail = self.family.describe(&model);
        let served = Arc::new(Served {
            name: name.clone(),
            version,
            model,
            metrics: self.metrics.clone(),
        });
        self.family.install(&served, &mut || {
            let mut map = HashMap::clone(&self.models.load());
            map.insert(name.clone(), served.clone());
            self.models.store(Arc::new(map));
        })?;
        tracing::info!(model = %name, version, detail = %detail, "model ready");
        self.metrics
            .model_ready
            .with_label_values(&[&name, &version.to_string()])
            .set(1);
        // A dead process stays NOT_SERVING: a new version does not make it trustworthy again.
        if !self.draining.load(Ordering::Relaxed) && self.liveness.is_alive() {
            self.health
                .set_service_status(&name, ServingStatus::Serving)
                .await;
        }
        Ok(())
    }

    /// Sets `name`'s batch cap at run time (see [`ModelFamily::set_batch_cap`]).
    pub fn set_batch_cap(&self, name: &str, cap: Option<usize>) -> Result<String, String> {
        let served = self.get(name).map_err(|e| e.to_string())?;
        self.family.set_batch_cap(&served, cap)
    }

    /// The family this repository loads.
    pub fn family(&self) -> &F {
        &self.family
    }

    /// The repository settings in force.
    pub fn settings(&self) -> &RepositorySettings {
        &self.settings
    }

    /// The only model served, for requests that name none: with several served, the caller
    /// must say which.
    pub fn only(&self) -> Result<Arc<Served<F::Model>>, ServeError> {
        let models = self.models.load();
        let mut all = models.values();
        match (all.next(), all.next()) {
            (Some(m), None) => Ok(m.clone()),
            _ => Err(ServeError::invalid(
                "model",
                format!(
                    "`model` must be set: this service serves {}",
                    self.quoted_names()
                ),
            )),
        }
    }

    /// The named model, or the only one when `name` is empty.
    pub fn get_or_only(&self, name: &str) -> Result<Arc<Served<F::Model>>, ServeError> {
        if name.is_empty() {
            self.only()
        } else {
            self.get(name)
        }
    }

    /// The serving version of `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Served<F::Model>>, ServeError> {
        self.models
            .load()
            .get(name)
            .cloned()
            .ok_or_else(|| ServeError::ModelNotFound {
                model: name.to_string(),
                detail: format!("; this service serves {}", self.quoted_names()),
            })
    }

    /// The serving version of `name`, checked against a requested version (empty = newest).
    pub fn get_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<Served<F::Model>>, ServeError> {
        let model = self.get(name)?;
        if !version.is_empty() && version != model.version.to_string() {
            return Err(ServeError::ModelNotFound {
                model: name.to_string(),
                detail: format!(
                    " at version `{version}` (serving version {})",
                    model.version
                ),
            });
        }
        Ok(model)
    }

    /// The served models' names, quoted, for messages.
    fn quoted_names(&self) -> String {
        self.names()
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Names of every served model, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.models.load().keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether requests should still be sent here.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
            && self.liveness.is_alive()
            && !self.models.load().is_empty()
    }

    /// The liveness of this server's lanes.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Versions hot reload refused that are still the newest on disk, sorted by model.
    pub fn refused(&self) -> Vec<RefusedVersion> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<RefusedVersion> = refused
            .iter()
            .map(|(model, r)| RefusedVersion {
                model: model.clone(),
                version: r.version,
                reason: r.reason.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.model.cmp(&b.model));
        v
    }

    /// Reports every model NOT_SERVING once a lane died, until `shutdown`. (The server-wide
    /// status and the dead lane's model are flipped by [`crate::serve`]; the other models on
    /// this process go with them, as OIP `ModelReady` does.)
    pub fn spawn_liveness_watch(self: &Arc<Self>, shutdown: CancellationToken) {
        let repo = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = repo.liveness.died() => {
                    for name in repo.names() {
                        repo.health
                            .set_service_status(&name, ServingStatus::NotServing)
                            .await;
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }

    /// Reports every model NOT_SERVING (shutdown has begun).
    pub async fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        for name in self.names() {
            self.health
                .set_service_status(&name, ServingStatus::NotServing)
                .await;
        }
    }

    /// Polls the repository for new versions and models until `shutdown`.
    pub fn spawn_watcher(self: &Arc<Self>, shutdown: CancellationToken) {
        if self.settings.poll_interval_ms == 0 {
            return;
        }
        let repo = self.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(repo.settings.poll_interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => repo.reload_changed().await,
                }
            }
        });
    }

    /// Loads any version newer than the serving one (and any new model). A version that fails
    /// to load is refused once (logged, counted, shown in `RepositoryIndex`) and not tried
    /// again until its files change; the old one keeps serving.
    pub async fn reload_changed(self: &Arc<Self>) {
        self.polls.inc();
        let found = match self.scan() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "repository scan failed");
                return;
            }
        };
        // A refusal is about one version: forget it once that version is gone or superseded.
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, r| found.iter().any(|(n, _, v)| n == name && *v == r.version));
        for (name, dir, version) in found {
            let current = self.models.load().get(&name).map(|m| m.version);
            if current.is_some_and(|v| v >= version) {
                continue;
            }
            if current.is_none() && self.models.load().len() >= self.family.max_models() {
                // Once per poll would flood the log; the index shows the model is not served.
                tracing::debug!(model = %name, "not loaded: this service serves no more models");
                continue;
            }
            let files = fingerprint(&dir, version);
            let unchanged = self
                .refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .is_some_and(|r| r.version == version && r.files == files);
            if unchanged {
                continue;
            }
            tracing::info!(model = %name, version, previous = ?current, "loading new version");
            match self.load_version(name.clone(), dir, version).await {
                Ok(()) => {
                    self.refused
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                }
                Err(reason) => {
                    tracing::error!(
                        model = %name, version, error = %reason,
                        "new version refused; keeping the serving one, not retrying until its files change"
                    );
                    self.load_failures.with_label_values(&[&name]).inc();
                    self.refused
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            name,
                            Refused {
                                version,
                                files,
                                reason,
                            },
                        );
                }
            }
        }
    }
}

/// The size and modification time of `model.toml` and the files beside it, and of every file
/// in the version directory: a refused version is tried again once any of them changes.
fn fingerprint(dir: &Path, version: u64) -> Fingerprint {
    let mut files = Vec::new();
    for d in [dir.to_path_buf(), dir.join(version.to_string())] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                files.push((entry.path(), meta.len(), meta.modified().ok()));
            }
        }
    }
    files.sort();
    files
}

/// The `kind` a `model.toml` declares; none means `classifier`. An unreadable or unparsable
/// file counts as ours, so the loader reports it with its path instead of skipping it.
fn declared_kind(manifest: &Path) -> Option<String> {
    let text = std::fs::read_to_string(manifest).ok()?;
    let table = text.parse::<toml::Table>().ok()?;
    Some(
        table
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("classifier")
            .to_owned(),
    )
}

impl<F: ModelFamily> Repository<F> {
    /// `(name, dir, newest complete version)` of each model directory of this family's kinds.
    fn scan(&self) -> anyhow::Result<Vec<(String, PathBuf, u64)>> {
        let (root, only) = (&self.settings.path, &self.settings.models);
        let marker = self.family.version_marker();
        let mut found = Vec::new();
        let entries = std::fs::read_dir(root)
            .map_err(|e| anyhow::anyhow!("cannot read repository `{}`: {e}", root.display()))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let manifest = dir.join("model.toml");
            if !manifest.is_file() || (!only.is_empty() && !only.contains(&name)) {
                continue;
            }
            if declared_kind(&manifest).is_some_and(|k| !self.family.kinds().contains(&k.as_str()))
            {
                continue;
            }
            let newest = std::fs::read_dir(&dir)?
                .flatten()
                .filter_map(|v| {
                    let version: u64 = v.file_name().to_str()?.parse().ok()?;
                    (version > 0 && v.path().join(marker).is_file()).then_some(version)
                })
                .max();
            if let Some(version) = newest {
                found.push((name, dir, version));
            }
        }
        found.sort();
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_fingerprint_changes_with_its_files_and_model_toml_only() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        std::fs::create_dir_all(model.join("2")).unwrap();
        std::fs::create_dir_all(model.join("1")).unwrap();
        std::fs::write(model.join("model.toml"), "name = 'm'").unwrap();
        std::fs::write(model.join("2/model.pt"), "bad").unwrap();
        let before = fingerprint(&model, 2);
        assert_eq!(before.len(), 2, "model.toml and the version's model.pt");
        std::fs::write(model.join("1/model.pt"), "another version").unwrap();
        assert_eq!(
            fingerprint(&model, 2),
            before,
            "other versions do not count"
        );
        std::fs::write(model.join("2/model.pt"), "fixed model").unwrap();
        assert_ne!(fingerprint(&model, 2), before, "a replaced model.pt counts");
        let after = fingerprint(&model, 2);
        std::fs::write(model.join("model.toml"), "name = 'm' # fixed").unwrap();
        assert_ne!(fingerprint(&model, 2), after, "an edited model.toml counts");
    }
}
