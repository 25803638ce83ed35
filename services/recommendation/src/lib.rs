//! The recommendation service: two-tower retrieval over a partitioned int8 index, filters, a learned
//! ranker, MMR diversity and a long-tail exposure floor, explanations, a durable feedback log
//! for real-time personalisation, and user erasure, over `marquee.recommendation.v1`.
#![forbid(unsafe_code)]

pub mod engine;
pub mod family;
pub mod feedback;
pub mod index;
pub mod metrics;
pub mod model;
pub mod pgstore;
pub mod privacy;
pub mod rerank;
pub mod service;
pub mod synthetic;
pub mod users;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use marquee_core::config::{
    KeysUsed, RepositorySettings, ServerSettings, TelemetrySettings, Validate,
    validate_model_service,
};
use marquee_core::kit::{ModelServer, Running};
use marquee_core::liveness::Liveness;
use marquee_proto::recommendation::recommender_server::RecommenderServer;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::engine::EngineConfig;
use crate::family::{Preloaded, RecFamily, Store, UserState};
use crate::feedback::FeedbackLog;
use crate::index::{IndexParams, IvfParams};
use crate::metrics::RecMetrics;
use crate::model::{Matrix, ModelData};
use crate::privacy::UserKey;

/// Service name in metadata, logs and traces.
pub const NAME: &str = "marquee-recommendation";
/// `--help` of the binary.
pub const ABOUT: &str =
    "Marquee recommendation service: retrieval, ranking, re-ranking, feedback over gRPC";

/// All settings of the recommendation service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    /// The one `kind = "recommender"` model in `path` (or named in `models`) is served;
    /// `lanes` (engine workers), `threads` and `device` override its `[instance]`.
    pub repository: RepositorySettings,
    pub telemetry: TelemetrySettings,
    pub recommendation: RecommendationSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            // Next to vision (8001/9001) and language (8002/9002) on one host.
            server: ServerSettings::on_ports(8003, 9003),
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
    /// Where feedback and erasures are kept: `file` (the feedback log in `state_dir`: one
    /// replica, `make run`) or `postgres` (one database shared by every replica, which then
    /// keep no user state of their own; `[recommendation.postgres]`).
    pub store: StoreKind,
    /// The PostgreSQL store's connection and limits (with `store = "postgres"`).
    pub postgres: pgstore::PostgresSettings,
    /// Where the feedback log (and, by default, the user-id key) live (file store).
    pub state_dir: PathBuf,
    /// Secret key of the user-id hash; default `<state_dir>/user_id.key`, created on first
    /// start. Mount it from a secret in production: losing it orphans the feedback log.
    pub user_id_key_file: Option<PathBuf>,
    /// Users are keyed by (tenant, user id): the tenant the gateway authenticated, sent in
    /// `x-marquee-tenant`, or `default` on a call without it. With this file (the same secret
    /// as the gateway's `backends.<name>.tenant_token_file`), a tenant header is accepted only
    /// with the token the gateway sends beside it; without it, anyone who can reach this
    /// service directly can name a tenant (fine on a private network or a laptop).
    pub tenant_token_file: Option<PathBuf>,
    /// The tenant whose users the training histories are: the model's own users (MovieLens
    /// users in the demo model) belong to this tenant only.
    pub training_tenant: String,
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
    /// `ivf` (partitioned int8 scan, f32 re-scoring: fast at catalogue scale) or `exact`
    /// (brute-force f32: the reference).
    pub index: String,
    /// IVF partitions; 0 picks √items.
    pub ivf_lists: usize,
    /// Share of the catalogue a query reads, nearest partitions first (divided by a filter's
    /// selectivity, so filtered queries see as many matching items).
    pub ivf_probe_share: f64,
    /// A query reads at least this many items (catalogues this small are scanned whole).
    pub ivf_min_scan: usize,
    /// Candidates kept by int8 score and re-scored in f32 (at least 4 × those asked for).
    pub ivf_rescore: usize,
    /// Most queued `Recommend` calls one engine thread serves together (one user-tower and
    /// one ranker forward for all of them).
    pub engine_batch: usize,
    /// Candidates per ranker forward.
    pub rank_batch: usize,
    /// Requests waiting for an engine thread before new ones get RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// How far in the future a feedback timestamp may be (clients' clocks drift).
    pub max_clock_skew_ms: u64,
    /// Retention: feedback older than this many days (by its timestamp) is removed from the
    /// log and from users' histories, at start and every `retention_purge_interval_ms`
    /// (data minimisation). 0 keeps feedback until `ForgetUser`.
    pub retention_days: u64,
    /// How often the retention pass runs while serving.
    pub retention_purge_interval_ms: u64,
    /// History items named per explanation.
    pub explain_history: usize,
    /// Ranking features named per explanation.
    pub explain_features: usize,
}

/// `recommendation.store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    File,
    Postgres,
}

impl Default for RecommendationSettings {
    fn default() -> Self {
        Self {
            store: StoreKind::File,
            postgres: pgstore::PostgresSettings::default(),
            state_dir: PathBuf::from("var/recommendation"),
            user_id_key_file: None,
            tenant_token_file: None,
            training_tenant: marquee_core::tenant::DEFAULT_TENANT.into(),
            // The pipeline: k = 20 from 500 candidates; also what metrics.json measured.
            candidates: 500,
            max_k: 100,
            max_batch_requests: 64,
            max_filter_values: 1000,
            // Mild diversity by default: visibly varied lists at little relevance cost.
            default_diversity: 0.3,
            // One slot in five for the long tail unless a request says otherwise.
            long_tail_floor: 0.2,
            index: "ivf".into(),
            // Measured at 1M items (bench/RESULTS.md, "Recommendation"): recall@100 and
            // p99 of these defaults.
            ivf_lists: 0,
            ivf_probe_share: IvfParams::default().probe_share,
            ivf_min_scan: IvfParams::default().min_scan,
            ivf_rescore: IvfParams::default().rescore,
            engine_batch: 16,
            // Rows per ranker forward: a batch of 16 requests × 500 candidates in two.
            rank_batch: 4096,
            queue_capacity: 256,
            max_clock_skew_ms: 300_000,
            retention_days: 0,
            // Hourly: feedback outlives its retention by at most an hour.
            retention_purge_interval_ms: 3_600_000,
            explain_history: 3,
            explain_features: 5,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        validate_model_service(
            "recommendation",
            KeysUsed {
                lanes: true,
                batching: false,
            },
            (&self.server, &self.repository, &self.telemetry),
            errors,
        );
        let r = &self.recommendation;
        let mut at_least_1 = |name: &str, v: usize| {
            if v == 0 {
                errors.push(format!("`recommendation.{name}` must be at least 1, got 0"));
            }
        };
        at_least_1("candidates", r.candidates);
        at_least_1("max_k", r.max_k);
        at_least_1("max_batch_requests", r.max_batch_requests);
        at_least_1("rank_batch", r.rank_batch);
        at_least_1("queue_capacity", r.queue_capacity);
        at_least_1("ivf_rescore", r.ivf_rescore);
        at_least_1("engine_batch", r.engine_batch);
        if r.retention_purge_interval_ms == 0 {
            errors.push(
                "`recommendation.retention_purge_interval_ms` must be at least 1, got 0".into(),
            );
        }
        // 100 years: past it the cutoff arithmetic is meaningless, and so is the setting.
        if r.retention_days > 36_500 {
            errors.push(format!(
                "`recommendation.retention_days` must be at most 36500 (0 keeps feedback), got {}",
                r.retention_days
            ));
        }
        if !(r.ivf_probe_share > 0.0 && r.ivf_probe_share <= 1.0) {
            errors.push(format!(
                "`recommendation.ivf_probe_share` must be in (0, 1], got {}",
                r.ivf_probe_share
            ));
        }
        // Bounds on what the build allocates from configuration (k-means samples 64 points
        // per list; a list per item or more is no index).
        if r.ivf_lists > 65_536 {
            errors.push(format!(
                "`recommendation.ivf_lists` must be at most 65536 (0 = √items), got {}",
                r.ivf_lists
            ));
        }
        if r.ivf_rescore > 100_000 {
            errors.push(format!(
                "`recommendation.ivf_rescore` must be at most 100000, got {}",
                r.ivf_rescore
            ));
        }
        if r.engine_batch > 256 {
            errors.push(format!(
                "`recommendation.engine_batch` must be at most 256, got {}",
                r.engine_batch
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
        if let Some(Err(e)) = r
            .tenant_token_file
            .as_deref()
            .map(marquee_core::tenant::read_token_file)
        {
            errors.push(format!("`recommendation.tenant_token_file`: {e}"));
        }
        let t = &r.training_tenant;
        if t.is_empty()
            || t.len() > marquee_core::tenant::MAX_TENANT_BYTES
            || !t.bytes().all(|b| b.is_ascii_graphic())
        {
            errors.push(format!(
                "`recommendation.training_tenant` must be 1..={} visible ASCII characters, got `{t}`",
                marquee_core::tenant::MAX_TENANT_BYTES
            ));
        }
        if r.store == StoreKind::Postgres {
            r.postgres.validate(errors);
            // Replicas must share one key; a key created per pod would split every user.
            match &r.user_id_key_file {
                None => errors.push(
                    "`recommendation.user_id_key_file` is required with `recommendation.store = \"postgres\"`: \
                     every replica must hash user ids with the same key (mount one Secret)"
                        .into(),
                ),
                Some(p) if !p.is_file() => errors.push(format!(
                    "`recommendation.user_id_key_file`: `{}` does not exist (with the postgres store it is read, never created)",
                    p.display()
                )),
                Some(_) => {}
            }
        }
        if !matches!(r.index.as_str(), "ivf" | "exact") {
            errors.push(format!(
                "`recommendation.index` must be `ivf` or `exact`, got `{}`",
                r.index
            ));
        }
    }
}

impl RecommendationSettings {
    /// The engine's configuration: `workers` engine threads (the model's lanes) of `threads`
    /// intra-op threads each, reporting to `liveness`.
    /// The index the settings describe.
    pub fn index_params(&self) -> IndexParams {
        if self.index == "exact" {
            return IndexParams::Exact;
        }
        IndexParams::Ivf(IvfParams {
            lists: self.ivf_lists,
            probe_share: self.ivf_probe_share,
            min_scan: self.ivf_min_scan,
            rescore: self.ivf_rescore,
        })
    }

    pub fn engine_config(
        &self,
        threads: usize,
        workers: usize,
        liveness: Liveness,
    ) -> EngineConfig {
        EngineConfig {
            candidates: self.candidates,
            rank_batch: self.rank_batch,
            workers: workers.max(1),
            threads: threads.max(1),
            queue_capacity: self.queue_capacity,
            index: self.index_params(),
            batch: self.engine_batch,
            explain_history: self.explain_history,
            explain_features: self.explain_features,
            liveness,
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

marquee_core::service_settings!(Settings);

/// The recommendation service's model server.
pub type RecommendationServer = ModelServer<RecFamily>;

/// The model directory the settings serve: the one named in `repository.models`, else
/// `recommender` (tools and benches that read a model outside the server use this).
pub fn model_dir(settings: &Settings) -> PathBuf {
    let name = settings
        .repository
        .models
        .first()
        .map_or("recommender", String::as_str);
    settings.repository.path.join(name)
}

/// Loads the newest version of the model directory and computes the item embeddings
/// (blocking; for tools and benches: the server loads through its repository).
pub fn load_model(settings: &Settings) -> anyhow::Result<(ModelData, Matrix)> {
    let data = ModelData::load(&model_dir(settings))?;
    let emb = engine::item_embeddings(&data)?;
    Ok((data, emb))
}

/// Loads the model, replays the feedback log and starts serving; returns once ready.
pub async fn start(
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running<RecFamily>> {
    start_with(settings, Vec::new(), shutdown).await
}

/// As [`start`], with the models given in memory: the model data, item embeddings and
/// optionally the index already built (the bench serves synthetic catalogues this way; an
/// index must have been built with the settings' `index` choice). The first load takes the
/// first part, a hot reload the next; the repository still names the model and its versions.
pub async fn start_with_parts(
    settings: Settings,
    parts: Vec<Preloaded>,
    shutdown: CancellationToken,
) -> anyhow::Result<Running<RecFamily>> {
    start_with(settings, parts, shutdown).await
}

async fn start_with(
    settings: Settings,
    preloaded: Vec<Preloaded>,
    shutdown: CancellationToken,
) -> anyhow::Result<Running<RecFamily>> {
    let rec = settings.recommendation.clone();
    // Key and store outlive model versions; the file store's open reads and fsyncs: off the
    // runtime.
    let state = tokio::task::spawn_blocking(move || {
        let key = match rec.store {
            StoreKind::File => UserKey::load_or_create(&rec.key_path()),
            // Shared by every replica: read, never created (validated at start).
            StoreKind::Postgres => UserKey::load(&rec.key_path()),
        }
        .map_err(|e| anyhow::anyhow!("`{}`: {e}", rec.key_path().display()))?;
        let tenant_token = rec
            .tenant_token_file
            .as_deref()
            .map(marquee_core::tenant::read_token_file)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        if rec.store == StoreKind::Postgres {
            return Ok::<_, anyhow::Error>((key, tenant_token, None, 0, 0));
        }
        let (mut log, replay) = FeedbackLog::open(&rec.log_path())
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", rec.log_path().display()))?;
        // Retention before anything is loaded from the log: expired feedback is never served.
        let purged_at_start = match family::retention_cutoff(&rec, family::now_ms()) {
            Some(cutoff) => log
                .purge_before(cutoff)
                .map_err(|e| anyhow::anyhow!("`{}`: retention: {e}", rec.log_path().display()))?,
            None => 0,
        };
        let store = Store::File {
            log: Mutex::new(log),
            path: rec.log_path(),
        };
        Ok((
            key,
            tenant_token,
            Some(store),
            replay.dropped_bytes,
            purged_at_start,
        ))
    })
    .await??;
    let (key, tenant_token, store, dropped_bytes, mut purged_at_start) = state;
    let rec = &settings.recommendation;
    let store = match store {
        Some(file) => file,
        None => {
            let db = pgstore::PgStore::open(&rec.postgres, &key).await?;
            // As with the file store: expired feedback is never served.
            if let Some(cutoff) = family::retention_cutoff(rec, family::now_ms()) {
                purged_at_start = db.purge_before(cutoff).await?;
            }
            Store::Postgres(db)
        }
    };
    let state = Arc::new(UserState {
        key,
        store,
        tenant_token,
        training_tenant: rec.training_tenant.clone(),
    });
    let rec = settings.recommendation.clone();
    let kit = RecommendationServer::load(
        NAME,
        settings.server.clone(),
        settings.repository.clone(),
        move |metrics| {
            let rec_metrics = RecMetrics::new(&metrics.registry, 0)?;
            if dropped_bytes > 0 {
                tracing::warn!(
                    bytes = dropped_bytes,
                    "feedback log had a torn or corrupt tail; cut off at the last good record"
                );
                rec_metrics.log_dropped_bytes.inc_by(dropped_bytes);
            }
            rec_metrics.purged.inc_by(purged_at_start);
            Ok(RecFamily::new(rec, rec_metrics, state, preloaded))
        },
    )
    .await?;
    if settings.recommendation.retention_days > 0 {
        family::spawn_retention(kit.repo.clone(), shutdown.clone());
    }
    let api = service::Recommender::new(kit.repo.clone());
    let api =
        RecommenderServer::new(api).max_decoding_message_size(settings.server.max_message_bytes);
    kit.serve_api(api, shutdown).await
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
        let refused = marquee_core::config::load_from::<Settings, _>(
            None,
            env(&[("MARQUEE__REPOSITORY__BATCHING", "false")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            refused.contains("`repository.batching` is not used by the recommendation service"),
            "{refused}"
        );
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
        // The index and batch sizes that the build and the engine allocate from are bounded.
        let err = marquee_core::config::load_from::<Settings, _>(
            None,
            env(&[
                ("MARQUEE__RECOMMENDATION__IVF_LISTS", "1000000"),
                ("MARQUEE__RECOMMENDATION__IVF_PROBE_SHARE", "0"),
                ("MARQUEE__RECOMMENDATION__IVF_RESCORE", "100000000"),
                ("MARQUEE__RECOMMENDATION__ENGINE_BATCH", "100000"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 4, "{text}");
        for what in [
            "`recommendation.ivf_lists` must be at most 65536",
            "`recommendation.ivf_probe_share` must be in (0, 1], got 0",
            "`recommendation.ivf_rescore` must be at most 100000, got 100000000",
            "`recommendation.engine_batch` must be at most 256, got 100000",
        ] {
            assert!(text.contains(what), "{what} not in {text}");
        }
        // The database store needs its connection string and a shared key, both as files.
        let err = marquee_core::config::load_from::<Settings, _>(
            None,
            env(&[("MARQUEE__RECOMMENDATION__STORE", "postgres")]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 2, "{text}");
        assert!(
            text.contains("`recommendation.postgres.url_file` is required"),
            "{text}"
        );
        assert!(
            text.contains("`recommendation.user_id_key_file` is required"),
            "{text}"
        );
        let url = dir.path().join("url");
        std::fs::write(&url, "host=127.0.0.1 port=5432 user=marquee").unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, [1u8; 32]).unwrap();
        let postgres = [
            ("MARQUEE__RECOMMENDATION__STORE", "postgres"),
            (
                "MARQUEE__RECOMMENDATION__POSTGRES__URL_FILE",
                url.to_str().unwrap(),
            ),
            (
                "MARQUEE__RECOMMENDATION__USER_ID_KEY_FILE",
                key.to_str().unwrap(),
            ),
        ];
        let ok: Settings = marquee_core::config::load_from(None, env(&postgres)).unwrap();
        assert_eq!(ok.recommendation.store, StoreKind::Postgres);
        std::fs::write(&url, "not a connection string ===").unwrap();
        let err = marquee_core::config::load_from::<Settings, _>(None, env(&postgres))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a connection string"), "{err}");
        assert!(
            !err.contains("==="),
            "the connection string is never echoed: {err}"
        );
    }
}
