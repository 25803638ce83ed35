//! The recommendation service: two-tower retrieval over an HNSW index, filters, a learned
//! ranker, MMR diversity and a long-tail exposure floor, explanations, a durable feedback log
//! for real-time personalisation, and user erasure, over `marquee.recommendation.v1`.
#![forbid(unsafe_code)]

pub mod engine;
pub mod feedback;
pub mod index;
pub mod metrics;
pub mod model;
pub mod privacy;
pub mod rerank;
pub mod service;
pub mod synthetic;
pub mod users;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use marquee_core::config::{RepositorySettings, ServerSettings, TelemetrySettings, Validate};
use marquee_core::metrics::Metrics;
use marquee_core::serve::{ServeParts, serve};
use marquee_proto::recommendation::recommender_server::RecommenderServer;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::engine::{Engine, EngineConfig};
use crate::feedback::FeedbackLog;
use crate::index::HnswParams;
use crate::metrics::RecMetrics;
use crate::model::{Matrix, ModelData};
use crate::privacy::UserKey;
use crate::users::Users;

/// Service name in metadata, logs and traces.
pub const NAME: &str = "marquee-recommendation";

/// All settings of the recommendation service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    /// `path` is the model repository; `threads` overrides the model's intra-op threads.
    pub repository: RepositorySettings,
    pub telemetry: TelemetrySettings,
    pub recommendation: RecommendationSettings,
}

impl Default for Settings {
    fn default() -> Self {
        // Next to vision (8001/9001) and language (8002/9002) on one host.
        let server = ServerSettings {
            grpc_addr: "127.0.0.1:8003".parse().expect("literal address"),
            admin_addr: "127.0.0.1:9003".parse().expect("literal address"),
            ..ServerSettings::default()
        };
        Self {
            server,
            repository: RepositorySettings::default(),
            telemetry: TelemetrySettings::default(),
            recommendation: RecommendationSettings::default(),
        }
    }
}

/// The recommender's own settings (`[recommendation]`, env `MARQUEE__RECOMMENDATION__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecommendationSettings {
    /// Model directory name inside `repository.path`.
    pub model: String,
    /// Where the feedback log (and, by default, the user-id key) live.
    pub state_dir: PathBuf,
    /// Secret key of the user-id hash; default `<state_dir>/user_id.key`, created on first
    /// start. Mount it from a secret in production: losing it orphans the feedback log.
    pub user_id_key_file: Option<PathBuf>,
    /// Candidates retrieved from the index per request (N).
    pub candidates: usize,
    /// Largest `k`.
    pub max_k: usize,
    /// Most requests in one `RecommendBatch`.
    pub max_batch_requests: usize,
    /// Most ids or genres in one filter list, and most recent items in an anonymous context.
    pub max_filter_values: usize,
    /// MMR λ when a request sets none.
    pub default_diversity: f32,
    /// Long-tail share of the k slots when a request sets none.
    pub long_tail_floor: f32,
    /// `hnsw` (approximate, fast) or `exact` (brute force: the reference).
    pub index: String,
    /// HNSW neighbours per node (M).
    pub hnsw_m: usize,
    /// HNSW build candidate list (graph quality).
    pub hnsw_ef_construction: usize,
    /// HNSW search candidate list floor; a search for n items uses at least n.
    pub hnsw_ef_search: usize,
    /// Candidates per ranker forward.
    pub rank_batch: usize,
    /// Engine threads, each with its own model copies.
    pub workers: usize,
    /// Requests waiting for an engine thread before new ones get RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// How far in the future a feedback timestamp may be (clients' clocks drift).
    pub max_clock_skew_ms: u64,
    /// History items named per explanation.
    pub explain_history: usize,
    /// Ranking features named per explanation.
    pub explain_features: usize,
}

impl Default for RecommendationSettings {
    fn default() -> Self {
        Self {
            model: "recommender".into(),
            state_dir: PathBuf::from("var/recommendation"),
            user_id_key_file: None,
            // The pipeline: k = 20 from 500 candidates; also what metrics.json measured.
            candidates: 500,
            max_k: 100,
            max_batch_requests: 64,
            max_filter_values: 1000,
            // Mild diversity by default: visibly varied lists at little relevance cost.
            default_diversity: 0.3,
            // One slot in five for the long tail unless a request says otherwise.
            long_tail_floor: 0.2,
            index: "hnsw".into(),
            hnsw_m: 16,
            hnsw_ef_construction: 200,
            hnsw_ef_search: 128,
            rank_batch: 512,
            // Two cores: one engine thread leaves the other to the runtime and the log.
            workers: 1,
            queue_capacity: 256,
            max_clock_skew_ms: 300_000,
            explain_history: 3,
            explain_features: 5,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        self.server.validate(errors);
        self.repository.validate(errors);
        self.telemetry.validate(errors);
        let r = &self.recommendation;
        let dir = self.repository.path.join(&r.model);
        if self.repository.path.is_dir() && !dir.join("model.toml").is_file() {
            errors.push(format!(
                "`recommendation.model`: `{}/model.toml` does not exist (run `make models`)",
                dir.display()
            ));
        }
        let mut at_least_1 = |name: &str, v: usize| {
            if v == 0 {
                errors.push(format!("`recommendation.{name}` must be at least 1, got 0"));
            }
        };
        at_least_1("candidates", r.candidates);
        at_least_1("max_k", r.max_k);
        at_least_1("max_batch_requests", r.max_batch_requests);
        at_least_1("rank_batch", r.rank_batch);
        at_least_1("workers", r.workers);
        at_least_1("queue_capacity", r.queue_capacity);
        at_least_1("hnsw_ef_search", r.hnsw_ef_search);
        at_least_1("hnsw_ef_construction", r.hnsw_ef_construction);
        if !(2..=256).contains(&r.hnsw_m) {
            errors.push(format!(
                "`recommendation.hnsw_m` must be in 2..=256, got {}",
                r.hnsw_m
            ));
        }
        if r.max_k > r.candidates {
            errors.push(format!(
                "`recommendation.max_k` ({}) must not exceed `recommendation.candidates` ({})",
                r.max_k, r.candidates
            ));
        }
        for (name, v) in [
            ("default_diversity", r.default_diversity),
            ("long_tail_floor", r.long_tail_floor),
        ] {
            if !(0.0..=1.0).contains(&v) {
                errors.push(format!(
                    "`recommendation.{name}` must be in [0, 1], got {v}"
                ));
            }
        }
        if !matches!(r.index.as_str(), "hnsw" | "exact") {
            errors.push(format!(
                "`recommendation.index` must be `hnsw` or `exact`, got `{}`",
                r.index
            ));
        }
    }
}

impl RecommendationSettings {
    /// The engine's configuration; `threads` from the repository override or the model.
    pub fn engine_config(&self, threads: usize) -> EngineConfig {
        EngineConfig {
            candidates: self.candidates,
            rank_batch: self.rank_batch,
            workers: self.workers,
            threads: threads.max(1),
            queue_capacity: self.queue_capacity,
            hnsw: (self.index == "hnsw").then_some(HnswParams {
                m: self.hnsw_m,
                ef_construction: self.hnsw_ef_construction,
                ef_search: self.hnsw_ef_search,
            }),
            explain_history: self.explain_history,
            explain_features: self.explain_features,
            liveness: marquee_core::liveness::Liveness::new(),
        }
    }

    /// The user-id key file in use.
    pub fn key_path(&self) -> PathBuf {
        self.user_id_key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("user_id.key"))
    }

    /// The feedback log file.
    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("feedback.log")
    }
}

/// A started recommendation server.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    /// The service state (tests and the bench read the engine through it).
    pub service: service::Recommender,
    /// Resolves when the server has shut down.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Loads the model directory and computes the item embeddings (blocking).
pub fn load_model(settings: &Settings) -> anyhow::Result<(ModelData, Matrix)> {
    let dir = settings
        .repository
        .path
        .join(&settings.recommendation.model);
    let data = ModelData::load(&dir)?;
    let emb = engine::item_embeddings(&data)?;
    Ok((data, emb))
}

/// Loads the model, replays the feedback log and starts serving; returns once ready.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let s = settings.clone();
    let (data, emb) = tokio::task::spawn_blocking(move || load_model(&s)).await??;
    start_with_model(settings, data, emb, shutdown).await
}

/// As [`start`], with the model data and item embeddings given (the bench serves a synthetic
/// catalogue this way).
pub async fn start_with_model(
    settings: Settings,
    data: ModelData,
    item_emb: Matrix,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    start_with_parts(settings, data, item_emb, None, shutdown).await
}

/// As [`start_with_model`], optionally with the item index already built over `item_emb`
/// (it must have been built with the same `recommendation.index` choice).
pub async fn start_with_parts(
    settings: Settings,
    data: ModelData,
    item_emb: Matrix,
    index: Option<index::ItemIndex>,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let metrics = Metrics::new();
    let liveness = marquee_core::liveness::Liveness::new();
    let (health, health_service) = marquee_core::serve::health();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let rec = settings.recommendation.clone();
    let engine_liveness = liveness.clone();
    let threads = settings.repository.threads.or(data.threads).unwrap_or(1);
    let registry = metrics.registry.clone();
    let recommender = tokio::task::spawn_blocking(move || {
        let rec_metrics = RecMetrics::new(&registry, data.catalog.len())?;
        let key = UserKey::load_or_create(&rec.key_path())
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", rec.key_path().display()))?;
        let mut users = Users::from_training(&data, &key);
        let (log, replay) = FeedbackLog::open(&rec.log_path())
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", rec.log_path().display()))?;
        if replay.dropped_bytes > 0 {
            tracing::warn!(
                bytes = replay.dropped_bytes,
                "feedback log had a torn or corrupt tail; cut off at the last good record"
            );
            rec_metrics.log_dropped_bytes.inc_by(replay.dropped_bytes);
        }
        for r in &replay.records {
            users.apply(r, &data.catalog);
        }
        tracing::info!(
            records = replay.records.len(),
            users = users.len(),
            "feedback log replayed"
        );
        let config = EngineConfig {
            liveness: engine_liveness,
            ..rec.engine_config(threads)
        };
        let engine = match index {
            Some(index) => Engine::start_with_index(data, item_emb, index, config, rec_metrics)?,
            None => Engine::start(data, item_emb, config, rec_metrics)?,
        };
        Ok::<_, anyhow::Error>(service::Recommender::new(engine, users, log, key, rec))
    })
    .await??;
    let model = settings.recommendation.model.clone();
    health
        .set_service_status(&model, ServingStatus::Serving)
        .await;
    let svc = RecommenderServer::new(recommender.clone())
        .max_decoding_message_size(settings.server.max_message_bytes);
    let ready = Arc::new(AtomicBool::new(true));
    let (ready_read, ready_drain) = (ready.clone(), ready);
    let drain_health = health.clone();
    let parts = ServeParts {
        settings: settings.server.clone(),
        metrics: metrics.clone(),
        health,
        ready: Arc::new(move || ready_read.load(Ordering::Relaxed).then(|| model.clone())),
        liveness,
        on_drain: Box::new(move || {
            Box::pin(async move {
                ready_drain.store(false, Ordering::Relaxed);
                drain_health
                    .set_service_status(&settings.recommendation.model, ServingStatus::NotServing)
                    .await;
            })
        }),
    };
    let serving = serve(
        parts,
        health_service,
        tonic::service::Routes::new(svc),
        shutdown,
    )
    .await?;
    Ok(Running {
        grpc_addr: serving.grpc_addr,
        admin_addr: serving.admin_addr,
        metrics,
        service: recommender,
        task: serving.task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_all_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("recommender")).unwrap();
        std::fs::write(dir.path().join("recommender/model.toml"), "").unwrap();
        let env = |extra: &[(&str, &str)]| {
            let mut v = vec![(
                "MARQUEE__REPOSITORY__PATH".to_string(),
                dir.path().display().to_string(),
            )];
            v.extend(extra.iter().map(|(k, x)| (k.to_string(), x.to_string())));
            v
        };
        let ok: Settings = marquee_core::config::load_from(None, env(&[])).unwrap();
        assert_eq!(ok.recommendation.candidates, 500);
        assert_eq!(ok.server.grpc_addr.port(), 8003);
        let err = marquee_core::config::load_from::<Settings, _>(
            None,
            env(&[
                ("MARQUEE__RECOMMENDATION__DEFAULT_DIVERSITY", "1.5"),
                ("MARQUEE__RECOMMENDATION__INDEX", "faiss"),
                ("MARQUEE__RECOMMENDATION__MAX_K", "1000"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("`recommendation.default_diversity` must be in [0, 1], got 1.5"));
        assert!(text.contains("got `faiss`"));
        assert!(text.contains("`recommendation.max_k` (1000)"));
    }
}
