//! The `marquee.recommendation.v1.Recommender` handlers: parse each request into a checked
//! query (every bad field named with its limit and value), look the user up by keyed hash, run
//! the engine, and turn [`RecError`] into a `Status` in one place.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use marquee_core::ServeError;
use marquee_proto::common::ItemError;
use marquee_proto::recommendation as pb;
use marquee_proto::recommendation::recommender_server::Recommender as RecommenderApi;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use marquee_core::repository::{Repository, Served};

use crate::RecommendationSettings;
use crate::engine::{EngineError, OutItem, RecOutput, RecQuery, SimilarQuery, ValidFilter};
use crate::family::{RecFamily, RecModel, Store, UserState, now_ms};
use crate::feedback::{EventKind, LogError, Record};
use crate::model::Catalog;
use crate::pgstore::StoreError;
use crate::privacy::UserHash;
use crate::users::Subject;

/// The catalogue of a version.
fn catalog(m: &Model) -> &Catalog {
    &m.engine.shared.data.catalog
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RecError {
    /// A field is wrong; the message names it, the limit and the value received.
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// Ids that are not in the catalogue, all listed.
    #[error("{message}")]
    NotFound { field: String, message: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The kit's answer (no model serving, draining).
    #[error(transparent)]
    Serve(ServeError),
    /// Writing or compacting the feedback log failed; nothing was acknowledged.
    #[error(transparent)]
    Feedback(#[from] LogError),
    /// The feedback database did not take or give the data; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task writing the feedback log failed (a bug).
    #[error("feedback log: {0}")]
    Log(String),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> RecError {
    RecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl RecError {
    /// The request field this error is about, if any.
    fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. } | Self::NotFound { field, .. } => field,
            _ => "",
        }
    }

    fn prefixed(self, prefix: &str) -> Self {
        match self {
            Self::Invalid { field, message } => Self::Invalid {
                field: format!("{prefix}{field}"),
                message,
            },
            Self::NotFound { field, message } => Self::NotFound {
                field: format!("{prefix}{field}"),
                message,
            },
            e => e,
        }
    }
}

/// The one conversion of recommendation errors into gRPC statuses.
impl From<RecError> for Status {
    fn from(e: RecError) -> Self {
        match e {
            RecError::Invalid { field, message } => {
                ServeError::InvalidArgument { field, message }.into()
            }
            RecError::NotFound { field, message } => ServeError::NotFound {
                resource: "item".into(),
                field,
                message,
            }
            .into(),
            RecError::Engine(EngineError::Overloaded(n)) => ServeError::Overloaded {
                message: format!("the recommendation queue is full ({n} waiting); retry later"),
                retry_after: Duration::from_millis(50),
            }
            .into(),
            RecError::Engine(EngineError::Stopped) => {
                ServeError::unavailable("the recommender is shutting down").into()
            }
            RecError::Engine(EngineError::Model(m)) => ServeError::Internal(m).into(),
            RecError::Serve(e) => e.into(),
            RecError::Feedback(e) => {
                // A full or failing disk is the operator's to fix and the caller's to retry:
                // UNAVAILABLE, and nothing was acknowledged that a restart would not replay.
                tracing::warn!(error = %e, "feedback log refused a write");
                ServeError::unavailable(e.to_string()).into()
            }
            RecError::Store(StoreError::Unavailable(m)) => {
                tracing::warn!(error = %m, "feedback database unavailable");
                // Every replica shares the database: the gateway passes this on as it is.
                ServeError::DependencyUnavailable {
                    dependency: "postgres".into(),
                    message: format!("the feedback database is unavailable; retry later ({m})"),
                    retry_after: DATABASE_RETRY,
                }
                .into()
            }
            RecError::Store(e @ StoreError::Failed(_)) => {
                ServeError::Internal(e.to_string()).into()
            }
            RecError::Log(m) => ServeError::Internal(format!("feedback log: {m}")).into(),
        }
    }
}

/// When a client should try again after the database failed: a restart or failover takes
/// seconds, and a tighter loop of retries from every client only adds to its recovery load.
const DATABASE_RETRY: Duration = Duration::from_secs(1);

/// The handlers, over the repository's one recommender model and the service's user state.
#[derive(Clone)]
pub struct Recommender {
    repo: Arc<Repository<RecFamily>>,
}

/// A served version of the recommender.
type Model = Served<RecModel>;

fn unit_interval(field: &str, v: Option<f32>, default: f32) -> Result<f32, RecError> {
    match v {
        None => Ok(default),
        Some(x) if (0.0..=1.0).contains(&x) => Ok(x),
        Some(x) => Err(invalid(
            field,
            format!("`{field}` must be in [0, 1], got {x}"),
        )),
    }
}

/// Catalogue indices of `ids`, or NOT_FOUND listing every unknown id.
fn item_indices(catalog: &Catalog, field: &str, ids: &[i64]) -> Result<Vec<u32>, RecError> {
    let mut out = Vec::with_capacity(ids.len());
    let mut unknown = Vec::new();
    for &id in ids {
        match catalog.index_of(id) {
            Some(i) => out.push(i),
            None => unknown.push(id),
        }
    }
    if unknown.is_empty() {
        Ok(out)
    } else {
        Err(RecError::NotFound {
            field: field.into(),
            message: format!(
                "`{field}`: {} item id(s) not in the catalogue: {unknown:?}",
                unknown.len()
            ),
        })
    }
}

impl Recommender {
    pub fn new(repo: Arc<Repository<RecFamily>>) -> Self {
        Self { repo }
    }

    /// The version serving now; a request keeps the one it started with.
    pub fn model(&self) -> Result<Arc<Model>, RecError> {
        self.repo.only().map_err(RecError::Serve)
    }

    /// The caller's tenant: set by the gateway, `default` on a direct call; refused when a
    /// tenant token is configured and the header did not come with it.
    fn tenant<T>(&self, request: &Request<T>) -> Result<String, RecError> {
        marquee_core::tenant::of_call(request.metadata(), self.state().tenant_token.as_deref())
            .map_err(RecError::Serve)
    }

    /// The pseudonym of `user_id` in `tenant`'s user space.
    fn user(&self, tenant: &str, user_id: i64) -> UserHash {
        self.state().key.hash_for(tenant, user_id)
    }

    fn settings(&self) -> &RecommendationSettings {
        self.repo.family().settings()
    }

    fn state(&self) -> &Arc<UserState> {
        self.repo.family().state()
    }

    fn check_k(&self, field: &str, k: u32) -> Result<usize, RecError> {
        let max = self.settings().max_k;
        if k == 0 || k as usize > max {
            return Err(invalid(
                field,
                format!("`{field}` must be in 1..={max}, got {k}"),
            ));
        }
        Ok(k as usize)
    }

    fn check_filter(&self, m: &Model, f: Option<&pb::Filter>) -> Result<ValidFilter, RecError> {
        let Some(f) = f else {
            return Ok(ValidFilter::default());
        };
        let max = self.settings().max_filter_values;
        let counts = [
            ("filter.exclude_item_ids", f.exclude_item_ids.len()),
            ("filter.exclude_genres", f.exclude_genres.len()),
            ("filter.require_genres", f.require_genres.len()),
        ];
        for (field, n) in counts {
            if n > max {
                return Err(invalid(
                    field,
                    format!("`{field}` holds at most {max} values, got {n}"),
                ));
            }
        }
        let genres = |field: &str, names: &[String]| -> Result<u64, RecError> {
            let mut mask = 0;
            for (i, name) in names.iter().enumerate() {
                match catalog(m).genre_bit(name) {
                    Some(b) => mask |= b,
                    None => {
                        return Err(invalid(
                            format!("{field}[{i}]"),
                            format!(
                                "`{field}[{i}]` must be one of the model's genres ({}), got `{name}`",
                                catalog(m).genre_names.join(", ")
                            ),
                        ));
                    }
                }
            }
            Ok(mask)
        };
        let exclude_genres = genres("filter.exclude_genres", &f.exclude_genres)?;
        let require_genres = genres("filter.require_genres", &f.require_genres)?;
        if let (Some(lo), Some(hi)) = (f.min_year, f.max_year)
            && lo > hi
        {
            return Err(invalid(
                "filter.min_year",
                format!("`filter.min_year` ({lo}) must not exceed `filter.max_year` ({hi})"),
            ));
        }
        if require_genres & exclude_genres == require_genres && require_genres != 0 {
            return Err(invalid(
                "filter.require_genres",
                "`filter.require_genres` are all in `filter.exclude_genres`: no item can pass",
            ));
        }
        let exclude_items: HashSet<u32> =
            item_indices(catalog(m), "filter.exclude_item_ids", &f.exclude_item_ids)?
                .into_iter()
                .collect();
        Ok(ValidFilter {
            exclude_items,
            exclude_genres,
            require_genres,
            min_year: f.min_year,
            max_year: f.max_year,
        })
    }

    /// Parses a `RecommendRequest` and looks its subject up.
    fn check_recommend(&self, m: &Model, r: &pb::RecommendRequest) -> Result<RecQuery, RecError> {
        let k = self.check_k("k", r.k)?;
        let settings = self.settings();
        let diversity = unit_interval("diversity", r.diversity, settings.default_diversity)?;
        let long_tail_floor = unit_interval(
            "long_tail_floor",
            r.long_tail_floor,
            settings.long_tail_floor,
        )?;
        let filter = self.check_filter(m, r.filter.as_ref())?;
        let subject = match &r.subject {
            // Looked up after the request checked out (`user_subject`): with the database it
            // is a query, and a bad request should not cost one.
            Some(pb::recommend_request::Subject::UserId(_)) => Subject::default(),
            Some(pb::recommend_request::Subject::Anonymous(ctx)) => {
                let max = self.settings().max_filter_values;
                if ctx.recent_item_ids.len() > max {
                    return Err(invalid(
                        "anonymous.recent_item_ids",
                        format!(
                            "`anonymous.recent_item_ids` holds at most {max} ids, got {}",
                            ctx.recent_item_ids.len()
                        ),
                    ));
                }
                Subject::anonymous(item_indices(
                    catalog(m),
                    "anonymous.recent_item_ids",
                    &ctx.recent_item_ids,
                )?)
            }
            None => Subject::default(),
        };
        Ok(RecQuery {
            subject,
            k,
            filter,
            diversity,
            long_tail_floor,
            explain: r.explain,
        })
    }

    /// The engine's view of a user: this version's users (file store), or the version's
    /// training state overlaid with the user's rows in the database, read now (no copy kept).
    async fn user_subject(&self, m: &Model, user: UserHash) -> Result<Subject, RecError> {
        let users = || m.users.read().unwrap_or_else(|p| p.into_inner());
        match &self.state().store {
            Store::File { .. } => Ok(users().subject(user)),
            Store::Postgres(db) => {
                let rows = db.user(user).await.inspect_err(|_| {
                    let metrics = self.repo.family().metrics();
                    metrics.database_errors.with_label_values(&["read"]).inc()
                })?;
                Ok(users().subject_with(user, &rows, catalog(m)))
            }
        }
    }

    fn item_message(&self, m: &Model, it: &OutItem) -> pb::RecommendedItem {
        let cat = catalog(m);
        let item = &cat.items[it.index as usize];
        pb::RecommendedItem {
            item_id: item.item_id,
            title: item.title.clone(),
            year: item.year,
            genres: cat.genre_list(item.genres),
            score: it.score,
            retrieval_score: it.retrieval,
            long_tail: item.long_tail,
            explanation: it.explanation.as_ref().map(|e| pb::Explanation {
                because_of: e
                    .because_of
                    .iter()
                    .map(|&(h, sim)| pb::HistoryContribution {
                        item_id: cat.items[h as usize].item_id,
                        title: cat.items[h as usize].title.clone(),
                        similarity: sim,
                    })
                    .collect(),
                features: e
                    .features
                    .iter()
                    .map(|(n, c)| pb::FeatureContribution {
                        name: n.clone(),
                        contribution: *c,
                    })
                    .collect(),
            }),
        }
    }

    fn response(&self, m: &Model, out: RecOutput) -> pb::RecommendResponse {
        pb::RecommendResponse {
            items: out.items.iter().map(|i| self.item_message(m, i)).collect(),
            cold_start: out.cold_start,
            candidates_retrieved: out.retrieved as u32,
            candidates_ranked: out.ranked as u32,
            model_version: m.engine.shared.data.version.clone(),
        }
    }

    /// One `Recommend`, with the user id only as a keyed hash in the span.
    pub async fn recommend_one(
        &self,
        tenant: &str,
        r: &pb::RecommendRequest,
    ) -> Result<pb::RecommendResponse, RecError> {
        let user = match &r.subject {
            Some(pb::recommend_request::Subject::UserId(id)) => self.user(tenant, *id).to_string(),
            Some(pb::recommend_request::Subject::Anonymous(_)) => "anonymous".into(),
            None => "none".into(),
        };
        let span = tracing::debug_span!("recommend", user = %user, k = r.k);
        async {
            let m = self.model()?;
            let mut q = self.check_recommend(&m, r)?;
            if let Some(pb::recommend_request::Subject::UserId(id)) = &r.subject {
                q.subject = self.user_subject(&m, self.user(tenant, *id)).await?;
            }
            let out = m.engine.recommend(q).await?;
            Ok(self.response(&m, out))
        }
        .instrument(span)
        .await
    }

    fn check_feedback(
        &self,
        m: &Model,
        tenant: &str,
        r: &pb::RecordFeedbackRequest,
    ) -> Result<Record, RecError> {
        let event = u8::try_from(r.event)
            .ok()
            .and_then(EventKind::from_u8)
            .ok_or_else(|| {
                invalid(
                    "event",
                    format!(
                        "`event` must be one of FEEDBACK_EVENT_CLICK (1), _WATCH (2), _LIKE (3), \
                         _DISLIKE (4), got {}",
                        r.event
                    ),
                )
            })?;
        let now = now_ms();
        let skew = self.settings().max_clock_skew_ms as i64;
        let timestamp_ms = match r.timestamp_ms {
            0 => now,
            t if t < 0 => {
                return Err(invalid(
                    "timestamp_ms",
                    format!("`timestamp_ms` must be >= 0 (0 = now), got {t}"),
                ));
            }
            t if t > now + skew => {
                return Err(invalid(
                    "timestamp_ms",
                    format!(
                        "`timestamp_ms` must be at most now + {skew} ms ({}), got {t} ({} ms in the future)",
                        now + skew,
                        t - now
                    ),
                ));
            }
            t => t,
        };
        item_indices(catalog(m), "item_id", &[r.item_id])?;
        Ok(Record::Feedback {
            user: self.user(tenant, r.user_id),
            item_id: r.item_id,
            event,
            timestamp_ms,
        })
    }
}

fn count_log_error(metrics: &crate::metrics::RecMetrics, e: &LogError) {
    let kind = match e {
        LogError::Write(_) => "write",
        LogError::Unavailable(_) => "unavailable",
        LogError::Compact(_) => "compact",
    };
    metrics.log_errors.with_label_values(&[kind]).inc();
}

#[tonic::async_trait]
impl RecommenderApi for Recommender {
    async fn recommend(
        &self,
        request: Request<pb::RecommendRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let tenant = self.tenant(&request)?;
        Ok(Response::new(
            self.recommend_one(&tenant, request.get_ref()).await?,
        ))
    }

    async fn recommend_batch(
        &self,
        request: Request<pb::RecommendBatchRequest>,
    ) -> Result<Response<pb::RecommendBatchResponse>, Status> {
        let reqs = &request.get_ref().requests;
        let max = self.settings().max_batch_requests;
        if reqs.len() > max {
            return Err(invalid(
                "requests",
                format!(
                    "`requests` holds at most {max} requests, got {}",
                    reqs.len()
                ),
            )
            .into());
        }
        // Concurrently: the engine queue spreads them over the workers.
        let tenant = self.tenant(&request)?;
        let results =
            futures::future::join_all(reqs.iter().map(|r| self.recommend_one(&tenant, r))).await;
        let mut items = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            let result = match r {
                Ok(resp) => pb::recommend_batch_item::Result::Response(resp),
                Err(e @ RecError::Engine(_))
                | Err(e @ RecError::Serve(_))
                | Err(e @ RecError::Log(_))
                | Err(e @ RecError::Store(_))
                | Err(e @ RecError::Feedback(_)) => {
                    // Server-side trouble fails the whole call, as it would each request.
                    return Err(e.into());
                }
                Err(e) => {
                    let e = e.prefixed(&format!("requests[{i}]."));
                    let code = match &e {
                        RecError::NotFound { .. } => Code::NotFound,
                        _ => Code::InvalidArgument,
                    };
                    pb::recommend_batch_item::Result::Error(ItemError {
                        code: code as i32,
                        field: e.field().to_string(),
                        message: e.to_string(),
                    })
                }
            };
            items.push(pb::RecommendBatchItem {
                result: Some(result),
            });
        }
        Ok(Response::new(pb::RecommendBatchResponse { items }))
    }

    async fn similar_items(
        &self,
        request: Request<pb::SimilarItemsRequest>,
    ) -> Result<Response<pb::SimilarItemsResponse>, Status> {
        let r = request.get_ref();
        let m = self.model()?;
        let k = self.check_k("k", r.k)?;
        let item = item_indices(catalog(&m), "item_id", &[r.item_id])?[0];
        let filter = self.check_filter(&m, r.filter.as_ref())?;
        let out = m
            .engine
            .similar(SimilarQuery { item, k, filter })
            .await
            .map_err(RecError::from)?;
        Ok(Response::new(pb::SimilarItemsResponse {
            items: out.iter().map(|i| self.item_message(&m, i)).collect(),
            model_version: m.engine.shared.data.version.clone(),
        }))
    }

    async fn record_feedback(
        &self,
        request: Request<pb::RecordFeedbackRequest>,
    ) -> Result<Response<pb::RecordFeedbackResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let model = self.model()?;
        let record = self.check_feedback(&model, &tenant, request.get_ref())?;
        let event_name = match &record {
            Record::Feedback { event, .. } => event.name(),
            Record::Forget { .. } => "forget",
        };
        let span = tracing::debug_span!("record_feedback", user = %record.user());
        let metrics = self.repo.family().metrics();
        let (sequence, history) = match &self.state().store {
            Store::Postgres(db) => {
                let user = record.user();
                let done = db
                    .record(&record)
                    .instrument(span)
                    .await
                    .inspect_err(|_| metrics.database_errors.with_label_values(&["record"]).inc())
                    .map_err(RecError::from)?;
                // The training history counts while the user was never forgotten.
                let training = if done.forgotten {
                    0
                } else {
                    model
                        .users
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .history_len(user)
                };
                (done.sequence, done.positives as usize + training)
            }
            Store::File { .. } => {
                drop(model);
                self.record_in_log(record, span).await?
            }
        };
        metrics.feedback.with_label_values(&[event_name]).inc();
        Ok(Response::new(pb::RecordFeedbackResponse {
            sequence,
            history_length: history as u32,
        }))
    }

    async fn forget_user(
        &self,
        request: Request<pb::ForgetUserRequest>,
    ) -> Result<Response<pb::ForgetUserResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let user = self.user(&tenant, request.get_ref().user_id);
        let span = tracing::info_span!("forget_user", user = %user);
        let metrics = self.repo.family().metrics();
        let (removed_rows, removed_history) = match &self.state().store {
            Store::Postgres(db) => {
                let done = db
                    .forget(user, now_ms())
                    .instrument(span.clone())
                    .await
                    .inspect_err(|_| metrics.database_errors.with_label_values(&["forget"]).inc())
                    .map_err(RecError::from)?;
                let training = if done.already {
                    0
                } else {
                    self.model()?
                        .users
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .history_len(user)
                };
                span.in_scope(|| tracing::info!(rows = done.rows, "user forgotten"));
                (done.rows, done.rows as usize + training)
            }
            Store::File { .. } => self.forget_in_log(user, span).await?,
        };
        metrics.forgotten.inc();
        Ok(Response::new(pb::ForgetUserResponse {
            history_removed: removed_history as u32,
            log_records_removed: removed_rows,
        }))
    }
}

impl Recommender {
    /// Appends to the file store's log (fsync'd), then applies the event to the serving
    /// version's users, both under the log lock; returns (sequence, history length).
    async fn record_in_log(
        &self,
        record: Record,
        span: tracing::Span,
    ) -> Result<(u64, usize), RecError> {
        let (state, repo) = (self.state().clone(), self.repo.clone());
        let metrics = self.repo.family().metrics().clone();
        // fsync blocks: off the async runtime.
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let Store::File { log, .. } = &state.store else {
                return Err(RecError::Log("not the file store".into()));
            };
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            let seq = log
                .append(&record)
                .inspect_err(|e| count_log_error(&metrics, e))?;
            // Under the log lock: memory applies events in log order, to the version serving
            // now (a new version replays the log under this lock before it goes live).
            let m = repo.only().map_err(RecError::Serve)?;
            let len = m
                .users
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .apply(&record, catalog(&m));
            Ok((seq, len))
        })
        .await
        .map_err(|e| RecError::Log(format!("writer task failed: {e}")))?
    }

    /// Compacts the user out of the file store's log and out of the serving version's users;
    /// returns (log records removed, history entries removed).
    async fn forget_in_log(
        &self,
        user: UserHash,
        span: tracing::Span,
    ) -> Result<(u64, usize), RecError> {
        let (state, repo) = (self.state().clone(), self.repo.clone());
        let metrics = self.repo.family().metrics().clone();
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let Store::File { log, .. } = &state.store else {
                return Err(RecError::Log("not the file store".into()));
            };
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            let removed = log
                .forget(user)
                .inspect_err(|e| count_log_error(&metrics, e))?;
            let m = repo.only().map_err(RecError::Serve)?;
            let mem = m
                .users
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .forget(user);
            tracing::info!(log_records = removed, history = mem, "user forgotten");
            Ok((removed, mem))
        })
        .await
        .map_err(|e| RecError::Log(format!("compaction task failed: {e}")))?
    }
}
