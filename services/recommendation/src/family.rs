//! The recommender's model family: a `kind = "recommender"` version is its catalogue, towers
//! and ranker on the engine's worker threads (`instance.lanes` of them), plus the users as that
//! version's catalogue sees them (training histories, then the feedback log replayed over
//! them). Loading, hot reload, readiness and drain are the kit's.
//!
//! The users follow the catalogue: item indices differ between versions. A new version's
//! users are built from its training data while the old one serves; at the swap, under the
//! lock every feedback write takes, the log is replayed over them, so the version that goes
//! live has every acknowledged event and no write lands on the old one after it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use marquee_core::ServeError;
use marquee_proto::inference::model_metadata_response::TensorMetadata;
use marquee_proto::inference::{ModelInferRequest, ModelInferResponse};

use marquee_core::repository::{LoadContext, ModelFamily};

use crate::RecommendationSettings;
use crate::engine::{Engine, item_embeddings};
use crate::feedback::FeedbackLog;
use crate::index::ItemIndex;
use crate::metrics::RecMetrics;
use crate::model::{Matrix, ModelData};
use crate::pgstore::PgStore;
use crate::privacy::UserKey;
use crate::users::Users;

/// Engine workers when neither `model.toml` nor the service says: one per core of the 2-core
/// target. With requests batched the runtime's share (decode, encode) is small beside the
/// engine's; one worker left a core idle at saturation (bench/RESULTS.md, "Recommendation").
pub const DEFAULT_LANES: usize = 2;

/// Where feedback and erasures are kept (`recommendation.store`).
pub enum Store {
    /// The feedback log on this replica's disk; each version's users are built from it.
    File {
        log: Mutex<FeedbackLog>,
        path: PathBuf,
    },
    /// One database for every replica; versions hold only the training users, and each
    /// request reads its user's rows.
    Postgres(PgStore),
}

/// The service's own state, which outlives model versions: the user-id key and the store.
pub struct UserState {
    pub key: UserKey,
    pub store: Store,
    /// With it, a tenant header is accepted only from the gateway (`recommendation.
    /// tenant_token_file`).
    pub tenant_token: Option<String>,
    /// The tenant whose users the training histories are (`recommendation.training_tenant`).
    pub training_tenant: String,
}

/// A model given in memory instead of read from its version directory (the bench serves a
/// synthetic catalogue this way); each load takes the next one, as the version it loads.
pub struct Preloaded {
    pub data: ModelData,
    pub item_emb: Matrix,
    pub index: Option<ItemIndex>,
}

pub struct RecFamily {
    settings: RecommendationSettings,
    metrics: RecMetrics,
    state: Arc<UserState>,
    preloaded: Mutex<std::collections::VecDeque<Preloaded>>,
}

impl RecFamily {
    pub fn new(
        settings: RecommendationSettings,
        metrics: RecMetrics,
        state: Arc<UserState>,
        preloaded: Vec<Preloaded>,
    ) -> Self {
        Self {
            settings,
            metrics,
            state,
            preloaded: Mutex::new(preloaded.into()),
        }
    }

    pub fn state(&self) -> &Arc<UserState> {
        &self.state
    }

    pub fn settings(&self) -> &RecommendationSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &RecMetrics {
        &self.metrics
    }
}

/// One loaded version.
pub struct RecModel {
    pub engine: Engine,
    /// Users as this version's catalogue sees them.
    pub users: RwLock<Users>,
}

impl ModelFamily for RecFamily {
    type Model = RecModel;

    fn kinds(&self) -> &'static [&'static str] {
        &["recommender"]
    }

    fn version_marker(&self) -> &'static str {
        // Written last by `models/build_recommender.py`'s publish step.
        "ranker.pt"
    }

    fn max_models(&self) -> usize {
        // One catalogue per service: feedback and erasure name items of one catalogue.
        1
    }

    fn load(&self, at: &LoadContext<'_>) -> Result<RecModel, String> {
        let preloaded = self
            .preloaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        let (data, item_emb, index) = match preloaded {
            Some(mut p) => {
                // The models (TorchScript files) are read from the version being loaded.
                p.data.dir = at.dir.to_path_buf();
                p.data.version = at.version.to_string();
                (p.data, p.item_emb, p.index)
            }
            None => {
                let mut data = ModelData::load_version(at.dir, &at.version.to_string())
                    .map_err(|e| e.to_string())?;
                let emb = item_embeddings(&data).map_err(|e| e.to_string())?;
                // Only the item tower reads the title embeddings (384 floats an item: six
                // times the item embedding); not kept past it.
                data.title_embeddings = Matrix::default();
                (data, emb, None)
            }
        };
        let run = data.instance.resolve(at.settings, DEFAULT_LANES)?;
        let users = Users::from_training(&data, &self.state.key, &self.state.training_tenant);
        let config = self
            .settings
            .engine_config(run.threads, run.lanes, at.liveness.clone());
        let engine = match index {
            Some(index) => {
                Engine::start_with_index(data, item_emb, index, config, self.metrics.clone())
            }
            None => Engine::start(data, item_emb, config, self.metrics.clone()),
        }
        .map_err(|e| e.to_string())?;
        Ok(RecModel {
            engine,
            users: RwLock::new(users),
        })
    }

    fn describe(&self, m: &RecModel) -> String {
        format!(
            "items={} workers={}",
            m.engine.shared.data.catalog.len(),
            m.engine.shared.config.workers
        )
    }

    fn install(&self, model: &RecModel, swap: &mut dyn FnMut()) -> Result<(), String> {
        let Store::File { log, path } = &self.state.store else {
            // The database is read per request: nothing to carry over between versions.
            self.metrics
                .reset_exposure(model.engine.shared.data.catalog.len());
            swap();
            return Ok(());
        };
        let _log = log.lock().unwrap_or_else(|p| p.into_inner());
        let replay =
            crate::feedback::read_all(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
        let catalog = &model.engine.shared.data.catalog;
        let mut users = model.users.write().unwrap_or_else(|p| p.into_inner());
        for r in &replay.records {
            users.apply(r, catalog);
        }
        tracing::info!(
            records = replay.records.len(),
            users = users.len(),
            "feedback log replayed"
        );
        drop(users);
        self.metrics.reset_exposure(catalog.len());
        swap();
        Ok(())
    }
}

/// The recommender in the Open Inference Protocol: discoverable (`RepositoryIndex`,
/// `ModelReady`, `ModelMetadata`) like every served model, so the gateway and operators see it;
/// it takes no tensors, so `ModelInfer` is refused with the API to use instead.
#[tonic::async_trait]
impl marquee_core::oip::OipModel for RecModel {
    fn platform(&self) -> &'static str {
        "marquee_recommender"
    }

    fn inputs(&self) -> Vec<TensorMetadata> {
        Vec::new()
    }

    fn outputs(&self) -> Vec<TensorMetadata> {
        Vec::new()
    }

    async fn model_infer(
        &self,
        req: ModelInferRequest,
        _deadline: Instant,
    ) -> Result<ModelInferResponse, ServeError> {
        Err(ServeError::FailedPrecondition(format!(
            "model `{}` takes no tensors: call marquee.recommendation.v1.Recommender",
            req.model_name
        )))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The oldest feedback timestamp retention keeps at `now_ms`, or `None` when retention is off.
pub fn retention_cutoff(settings: &RecommendationSettings, now_ms: i64) -> Option<i64> {
    (settings.retention_days > 0)
        .then(|| now_ms.saturating_sub(settings.retention_days as i64 * 86_400_000))
}

/// One retention pass at `now_ms` (blocking): removes expired feedback from the log, then
/// rebuilds the serving version's users from its training data and the log. Under the lock
/// every feedback write and every version swap takes, so the users that serve afterwards are
/// exactly training + the log as it now is.
pub fn purge_expired(
    repo: &marquee_core::repository::Repository<RecFamily>,
    now_ms: i64,
) -> Result<u64, String> {
    let family = repo.family();
    let Some(cutoff) = retention_cutoff(&family.settings, now_ms) else {
        return Ok(0);
    };
    let state = &family.state;
    let Store::File { log, path } = &state.store else {
        return Ok(0);
    };
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    let removed = log.purge_before(cutoff).map_err(|e| e.to_string())?;
    if removed == 0 {
        return Ok(0);
    }
    let model = repo.only().map_err(|e| e.to_string())?;
    let data = &model.engine.shared.data;
    let mut users = Users::from_training(data, &state.key, &state.training_tenant);
    let replay =
        crate::feedback::read_all(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    for r in &replay.records {
        users.apply(r, &data.catalog);
    }
    *model.users.write().unwrap_or_else(|p| p.into_inner()) = users;
    drop(log);
    family.metrics.purged.inc_by(removed);
    tracing::info!(removed, "retention: expired feedback removed");
    Ok(removed)
}

/// Runs a retention pass every `retention_purge_interval_ms` until `shutdown`: [`purge_expired`]
/// on the file store, one `DELETE` on the database.
pub fn spawn_retention(
    repo: Arc<marquee_core::repository::Repository<RecFamily>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let every =
        std::time::Duration::from_millis(repo.family().settings.retention_purge_interval_ms);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let family = repo.family();
            if let (Store::Postgres(db), Some(cutoff)) = (
                &family.state.store,
                retention_cutoff(&family.settings, now_ms()),
            ) {
                // Every replica runs it; a pass after another's deletes nothing.
                match db.purge_before(cutoff).await {
                    Ok(removed) => {
                        family.metrics.purged.inc_by(removed);
                        if removed > 0 {
                            tracing::info!(removed, "retention: expired feedback removed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "retention pass failed; retrying at the next one")
                    }
                }
                continue;
            }
            let repo = repo.clone();
            // A log rewrite fsyncs: off the runtime. A failure is logged and retried next time.
            match tokio::task::spawn_blocking(move || purge_expired(&repo, now_ms())).await {
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "retention pass failed; retrying at the next one")
                }
                Err(e) => tracing::error!(error = %e, "retention pass panicked"),
                Ok(Ok(_)) => {}
            }
        }
    });
}
