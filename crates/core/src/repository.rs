//! The model repository: loads every model's newest version, warms it up, marks it READY, and
//! hot-swaps in new versions (or new models) found while serving, without failing a request.
//!
//! Layout, like Triton's: `<repo>/<model>/model.toml` and `<repo>/<model>/<version>/model.pt`,
//! where `<version>` is a positive integer and the largest one serves.
//!
//! A version that fails to load or whose warm-up outputs do not match `model.toml` is refused
//! once: one log line, one count in `marquee_model_load_failures_total`, and an `UNAVAILABLE`
//! entry with the reason in `RepositoryIndex` (as Triton shows a model that failed to load).
//! It is not tried again until its files change (size or modification time of `model.toml`,
//! the files next to it or in the version directory), and the serving version stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::batcher::{BatchQueue, Outputs, QueueConfig};
use crate::config::RepositorySettings;
use crate::error::ServeError;
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::model::{ModelSpec, parse_device};
use crate::runner::{LaneConfig, WarmupReport, start_lanes};

/// One loaded, warmed-up model version and its batch queue.
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    pub spec: ModelSpec,
    pub labels: Option<Arc<Vec<String>>>,
    pub warmup: WarmupReport,
    pub lanes: usize,
    queue: Arc<BatchQueue>,
    metrics: Metrics,
}

impl LoadedModel {
    /// Loads `dir/<version>/model.pt`, starts its lanes and warms them up. Blocking: call from
    /// a blocking context.
    pub fn load(
        dir: &Path,
        version: u64,
        settings: &RepositorySettings,
        metrics: &Metrics,
        liveness: &Liveness,
    ) -> Result<Self, String> {
        let spec = ModelSpec::load(dir)?;
        let labels = spec.load_labels(dir)?.map(Arc::new);
        if let (Some(labels), Some(i)) = (&labels, spec.output_index("logits")) {
            let classes = spec.outputs[i].item_len();
            if labels.len() != classes {
                return Err(format!(
                    "model `{}` has {} labels for {classes} classes",
                    spec.name,
                    labels.len()
                ));
            }
        }
        let device_name = settings
            .device
            .clone()
            .unwrap_or_else(|| spec.instance.device.clone());
        let device = parse_device(&device_name)?;
        let lanes = settings.lanes.unwrap_or(spec.instance.lanes);
        let max_batch_size = if settings.batching {
            spec.batching.max_batch_size
        } else {
            1
        };
        let queue = BatchQueue::new(
            QueueConfig {
                model: spec.name.clone(),
                max_batch_size,
                max_queue_delay: Duration::from_micros(spec.batching.max_queue_delay_us),
                queue_capacity: spec.batching.queue_capacity,
                lanes,
                item_len: spec.inputs[0].item_len(),
                output_lens: spec.outputs.iter().map(|o| o.item_len()).collect(),
            },
            metrics.clone(),
        );
        let warmup = start_lanes(
            &LaneConfig {
                model_path: dir.join(version.to_string()).join("model.pt"),
                device,
                lanes,
                threads: settings.threads.unwrap_or(spec.instance.threads),
                input_dims: spec.inputs[0].dims.clone(),
                outputs: spec.outputs.clone(),
                profile: settings.profile_batching && max_batch_size > 1,
                liveness: liveness.clone(),
            },
            &queue,
        )?;
        metrics
            .effective_batch
            .with_label_values(&[&spec.name])
            .set(queue.max_batch() as i64);
        Ok(Self {
            name: spec.name.clone(),
            version,
            spec,
            labels,
            warmup,
            lanes,
            queue,
            metrics: metrics.clone(),
        })
    }

    /// Runs `rows` items (already validated to the input shape) through the batcher. Answers
    /// `DEADLINE_EXCEEDED` at `deadline` even if the item is still queued; the lane then drops it.
    pub async fn infer(
        &self,
        data: Vec<f32>,
        rows: usize,
        deadline: Instant,
    ) -> Result<Vec<Outputs>, ServeError> {
        let rx = self.queue.submit(data, rows, deadline)?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ServeError::Internal(format!(
                "model `{}` lane stopped",
                self.name
            ))),
            Err(_) => Err(ServeError::DeadlineExceeded(format!(
                "deadline expired while model `{}` was busy; the request was not computed",
                self.name
            ))),
        }
    }

    /// The batch cap in force after profiling.
    pub fn max_batch(&self) -> usize {
        self.queue.max_batch()
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // The last reference is gone (replaced by a newer version and no request holds it):
        // let the lanes finish what is queued and exit.
        self.queue.close();
        self.metrics
            .model_ready
            .with_label_values(&[&self.name, &self.version.to_string()])
            .set(0);
    }
}

/// Every model this server serves, swapped atomically as versions change.
pub struct Repository {
    settings: RepositorySettings,
    models: ArcSwap<HashMap<String, Arc<LoadedModel>>>,
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

impl Repository {
    /// Loads every model's newest version. Fails if any model cannot be served, so a broken
    /// deployment never reports ready.
    pub async fn open(
        settings: RepositorySettings,
        metrics: Metrics,
        health: HealthReporter,
        liveness: Liveness,
    ) -> anyhow::Result<Arc<Self>> {
        // Registered here rather than in `Metrics`: only servers with a repository have them.
        let load_failures = IntCounterVec::new(
            Opts::new(
                "marquee_model_load_failures_total",
                "Model versions refused by hot reload (load or warm-up failed), each counted once.",
            ),
            &["model"],
        )?;
        let polls = IntCounter::new(
            "marquee_model_repository_polls_total",
            "Scans of the model repository for new versions.",
        )?;
        metrics.registry.register(Box::new(load_failures.clone()))?;
        metrics.registry.register(Box::new(polls.clone()))?;
        let repo = Arc::new(Self {
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
        let found = scan(&repo.settings.path, &repo.settings.models)?;
        for wanted in &repo.settings.models {
            if !found.iter().any(|(name, _, _)| name == wanted) {
                anyhow::bail!(
                    "model `{wanted}` from `repository.models` has no version under `{}`",
                    repo.settings.path.display()
                );
            }
        }
        if found.is_empty() {
            anyhow::bail!("no models found under `{}`", repo.settings.path.display());
        }
        for (name, dir, version) in found {
            repo.health
                .set_service_status(&name, ServingStatus::NotServing)
                .await;
            repo.load_version(dir, version)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        Ok(repo)
    }

    async fn load_version(&self, dir: PathBuf, version: u64) -> Result<(), String> {
        let settings = self.settings.clone();
        let metrics = self.metrics.clone();
        let liveness = self.liveness.clone();
        let model = tokio::task::spawn_blocking(move || {
            LoadedModel::load(&dir, version, &settings, &metrics, &liveness)
        })
        .await
        .map_err(|e| format!("model loader panicked: {e}"))??;
        crate::alloc::release_free_memory();
        let name = model.name.clone();
        tracing::info!(
            model = %name, version,
            lanes = model.lanes,
            max_batch = model.max_batch(),
            warmup_ms = model.warmup.took.as_millis() as u64,
            "model ready"
        );
        self.metrics
            .model_ready
            .with_label_values(&[&name, &version.to_string()])
            .set(1);
        let mut map = HashMap::clone(&self.models.load());
        map.insert(name.clone(), Arc::new(model));
        self.models.store(Arc::new(map));
        // A dead process stays NOT_SERVING: a new version does not make it trustworthy again.
        if !self.draining.load(Ordering::Relaxed) && self.liveness.is_alive() {
            self.health
                .set_service_status(&name, ServingStatus::Serving)
                .await;
        }
        Ok(())
    }

    /// The serving version of `name`.
    pub fn get(&self, name: &str) -> Result<Arc<LoadedModel>, ServeError> {
        self.models
            .load()
            .get(name)
            .cloned()
            .ok_or_else(|| ServeError::ModelNotFound {
                model: name.to_string(),
                detail: String::new(),
            })
    }

    /// The serving version of `name`, checked against a requested version (empty = newest).
    pub fn get_version(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, ServeError> {
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
    pub async fn reload_changed(&self) {
        self.polls.inc();
        let found = match scan(&self.settings.path, &self.settings.models) {
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
            match self.load_version(dir, version).await {
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

/// Models this loader serves: a `forward` over batched tensors. A repository also holds models
/// other services own (`kind = "causal_lm"`, `"recommender"`), which need their own runtime.
const TENSOR_KINDS: &[&str] = &["classifier", "tensor"];

/// Whether `model.toml` declares a kind this loader serves; no `kind` means `classifier`.
fn is_tensor_model(manifest: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(manifest) else {
        return true; // unreadable: let the loader report it with its path
    };
    match text.parse::<toml::Table>() {
        Ok(table) => match table.get("kind").and_then(|k| k.as_str()) {
            Some(kind) => TENSOR_KINDS.contains(&kind),
            None => true,
        },
        Err(_) => true,
    }
}

/// `(name, dir, newest version)` of each model directory that has a `model.toml` and at least
/// one complete version. A version directory counts once its `model.pt` exists, so writers
/// should move a finished version directory into place.
fn scan(root: &Path, only: &[String]) -> anyhow::Result<Vec<(String, PathBuf, u64)>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(root)
        .map_err(|e| anyhow::anyhow!("cannot read repository `{}`: {e}", root.display()))?;
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !dir.join("model.toml").is_file() || (!only.is_empty() && !only.contains(&name)) {
            continue;
        }
        if !is_tensor_model(&dir.join("model.toml")) {
            continue;
        }
        let newest = std::fs::read_dir(&dir)?
            .flatten()
            .filter_map(|v| {
                let version: u64 = v.file_name().to_str()?.parse().ok()?;
                (version > 0 && v.path().join("model.pt").is_file()).then_some(version)
            })
            .max();
        if let Some(version) = newest {
            found.push((name, dir, version));
        }
    }
    found.sort();
    Ok(found)
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
