//! The recommendation pipeline on dedicated OS threads (never the async runtime): user tower →
//! retrieval with the filters applied inside the scan → ranker → MMR diversity → long-tail
//! floor → top-k, with explanations by embedding neighbours and gradient × input through tch
//! autograd.
//!
//! A cloneable [`Engine`] handle sends jobs over a bounded queue to worker threads; each worker
//! owns its own TorchScript modules. A worker takes what is queued (up to `batch` requests,
//! its share when other workers are idle) and serves it together: one user-tower forward and
//! one ranker forward (in `rank_batch`-row chunks) for all of them, so a forward's fixed cost
//! is paid once per batch rather than per call. Retrieval, re-ranking and explanations stay
//! per request. The shared, read-only part ([`Shared`]) holds the catalogue, features, item
//! embeddings and the index.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use marquee_core::liveness::Liveness;
use tch::{CModule, Device, Kind, Tensor};
use tokio::sync::oneshot;

use crate::index::{IndexParams, ItemIndex, Scored, dot};
use crate::metrics::RecMetrics;
use crate::model::{Matrix, ModelData};
use crate::rerank::{Candidate, genre_jaccard, long_tail_floor, mmr};
use crate::users::Subject;

/// Engine errors (converted to `ServeError` by the service).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the recommendation queue is full ({0} waiting)")]
    Overloaded(usize),
    #[error("the engine stopped")]
    Stopped,
    #[error("model failure: {0}")]
    Model(String),
}

impl From<tch::TchError> for EngineError {
    fn from(e: tch::TchError) -> Self {
        Self::Model(e.to_string())
    }
}

/// How the engine runs; from `[recommendation]` in the settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Candidates retrieved from the index (N).
    pub candidates: usize,
    /// Candidates per ranker forward.
    pub rank_batch: usize,
    /// Worker threads, each with its own model copies.
    pub workers: usize,
    /// libtorch intra-op threads per worker.
    pub threads: usize,
    /// Jobs waiting beyond the running ones before new requests are refused.
    pub queue_capacity: usize,
    /// How the item index is built and searched.
    pub index: IndexParams,
    /// Most `Recommend` jobs one worker serves together.
    pub batch: usize,
    /// History items named per explanation.
    pub explain_history: usize,
    /// Ranking features named per explanation.
    pub explain_features: usize,
    /// The server's liveness: a worker that panics marks the process dead (the service sets
    /// the one it serves with; a fresh one otherwise).
    pub liveness: Liveness,
}

/// Filters in their checked form.
#[derive(Debug, Clone, Default)]
pub struct ValidFilter {
    pub exclude_items: HashSet<u32>,
    pub exclude_genres: u64,
    /// Any of these (0 = no requirement).
    pub require_genres: u64,
    pub min_year: Option<i32>,
    pub max_year: Option<i32>,
}

impl ValidFilter {
    /// Whether this filter keeps every item.
    pub fn is_empty(&self) -> bool {
        self.exclude_items.is_empty()
            && self.exclude_genres == 0
            && self.require_genres == 0
            && self.min_year.is_none()
            && self.max_year.is_none()
    }

    fn pass(&self, data: &ModelData, idx: u32) -> bool {
        let item = &data.catalog.items[idx as usize];
        if self.exclude_items.contains(&idx) || item.genres & self.exclude_genres != 0 {
            return false;
        }
        if self.require_genres != 0 && item.genres & self.require_genres == 0 {
            return false;
        }
        let known = item.year != 0;
        if self.min_year.is_some_and(|y| !known || item.year < y)
            || self.max_year.is_some_and(|y| !known || item.year > y)
        {
            return false;
        }
        true
    }
}

/// A checked `Recommend`.
#[derive(Debug, Clone)]
pub struct RecQuery {
    pub subject: Subject,
    pub k: usize,
    pub filter: ValidFilter,
    /// MMR λ in [0, 1].
    pub diversity: f32,
    /// Long-tail share of the k slots in [0, 1].
    pub long_tail_floor: f32,
    pub explain: bool,
}

/// A checked `SimilarItems`.
#[derive(Debug, Clone)]
pub struct SimilarQuery {
    pub item: u32,
    pub k: usize,
    pub filter: ValidFilter,
}

/// Why one item was recommended.
#[derive(Debug, Clone, Default)]
pub struct Explained {
    /// History item indices with their cosine similarity, nearest first.
    pub because_of: Vec<(u32, f32)>,
    /// Feature name and gradient × input, largest magnitude first.
    pub features: Vec<(String, f32)>,
}

/// One output item.
#[derive(Debug, Clone)]
pub struct OutItem {
    pub index: u32,
    pub score: f32,
    pub retrieval: f32,
    pub explanation: Option<Explained>,
}

/// A recommendation list.
#[derive(Debug, Clone, Default)]
pub struct RecOutput {
    pub items: Vec<OutItem>,
    pub cold_start: bool,
    pub retrieved: usize,
    pub ranked: usize,
}

/// Read-only state every worker shares.
pub struct Shared {
    pub data: ModelData,
    /// Unit-norm item embeddings, row = item index, row 0 zeros.
    pub item_emb: Matrix,
    pub index: ItemIndex,
    pub config: EngineConfig,
    pub metrics: RecMetrics,
    /// Ranking feature names in input column order (explanations).
    feature_names: Vec<String>,
    /// Jobs in the queue, not yet taken by a worker (how a worker sizes its share).
    queued: AtomicUsize,
}

enum Job {
    Recommend {
        query: Box<RecQuery>,
        span: tracing::Span,
        reply: oneshot::Sender<Result<RecOutput, EngineError>>,
    },
    Similar {
        query: SimilarQuery,
        span: tracing::Span,
        reply: oneshot::Sender<Result<Vec<OutItem>, EngineError>>,
    },
}

/// Handle to the worker threads; cloning is cheap.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    pub shared: Arc<Shared>,
    capacity: usize,
}

/// Items per item-tower forward at start: the activations of a whole large catalogue in one
/// forward would be gigabytes; chunks bound them whatever the catalogue's size.
const ITEM_TOWER_CHUNK: usize = 65_536;

/// Computes every item's embedding with the item tower (forwards of at most
/// [`ITEM_TOWER_CHUNK`] items, no gradients).
pub fn item_embeddings(data: &ModelData) -> Result<Matrix, EngineError> {
    let module = load(&data.file("item_tower.pt"))?;
    let n = data.catalog.items.len();
    let d = data.spec.embedding_dim;
    let mut emb = Matrix {
        rows: n,
        cols: d,
        data: Vec::with_capacity(n * d),
    };
    let rows = |m: &Matrix, from: usize, len: usize| {
        Tensor::from_slice(&m.data[from * m.cols..(from + len) * m.cols])
            .view([len as i64, m.cols as i64])
    };
    let mut from = 0;
    while from < n {
        let len = ITEM_TOWER_CHUNK.min(n - from);
        let idx = Tensor::from_slice(&(from as i64..(from + len) as i64).collect::<Vec<_>>());
        let inputs = [
            idx,
            rows(&data.item_features, from, len),
            rows(&data.title_embeddings, from, len),
        ];
        let out = tensor_matrix(&tch::no_grad(|| module.forward_ts(&inputs))?)?;
        if out.cols != d || out.rows != len {
            return Err(EngineError::Model(format!(
                "item tower returned [{}, {}] for {len} items, model.toml says {d} dimensions",
                out.rows, out.cols
            )));
        }
        emb.data.extend(out.data);
        from += len;
    }
    // Row 0 is padding: it must never score.
    emb.data[..d].fill(0.0);
    Ok(emb)
}

/// User embeddings for `subjects` with a freshly loaded user tower (tests and the bench use
/// them as retrieval queries; the service computes them on its workers).
pub fn user_embeddings(data: &ModelData, subjects: &[Subject]) -> Result<Matrix, EngineError> {
    let tower = load(&data.file("user_tower.pt"))?;
    let mut out = Matrix {
        rows: subjects.len(),
        cols: data.spec.embedding_dim,
        data: Vec::with_capacity(subjects.len() * data.spec.embedding_dim),
    };
    for chunk in subjects.chunks(256) {
        let refs: Vec<&Subject> = chunk.iter().collect();
        for row in user_tower_forward(&tower, data, &refs)? {
            out.data.extend(row);
        }
    }
    Ok(out)
}

fn load(path: &std::path::Path) -> Result<CModule, EngineError> {
    let mut m = CModule::load_on_device(path, Device::Cpu)
        .map_err(|e| EngineError::Model(format!("`{}`: {e}", path.display())))?;
    m.set_eval();
    Ok(m)
}

fn tensor_matrix(t: &Tensor) -> Result<Matrix, EngineError> {
    let size = t.size();
    if size.len() != 2 {
        return Err(EngineError::Model(format!(
            "expected a 2-D output, got {size:?}"
        )));
    }
    let data = Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1))?;
    Ok(Matrix {
        rows: size[0] as usize,
        cols: size[1] as usize,
        data,
    })
}

/// Rows of `m` for `idx`, as a `[len, cols]` tensor.
fn gather(m: &Matrix, idx: &[u32]) -> Tensor {
    let mut v = Vec::with_capacity(idx.len() * m.cols);
    for &i in idx {
        v.extend_from_slice(m.row(i as usize));
    }
    Tensor::from_slice(&v).view([idx.len() as i64, m.cols as i64])
}

impl Engine {
    /// Builds the index over `item_emb` and starts the workers; returns once every worker has
    /// loaded its models and served a warm-up request. Blocking: call from a blocking thread.
    pub fn start(
        data: ModelData,
        item_emb: Matrix,
        config: EngineConfig,
        metrics: RecMetrics,
    ) -> Result<Self, EngineError> {
        let t0 = Instant::now();
        let index = ItemIndex::build(&item_emb, config.index)?;
        tracing::info!(
            items = item_emb.rows.saturating_sub(1),
            approximate = index.is_approximate(),
            lists = index.lists(),
            index_mib = index.heap_bytes() as f64 / (1 << 20) as f64,
            seconds = t0.elapsed().as_secs_f64(),
            "item index built"
        );
        Self::start_with_index(data, item_emb, index, config, metrics)
    }

    /// As [`Engine::start`] with an index built beforehand over `item_emb` (the bench times
    /// and measures the build on its own).
    pub fn start_with_index(
        data: ModelData,
        item_emb: Matrix,
        index: ItemIndex,
        config: EngineConfig,
        metrics: RecMetrics,
    ) -> Result<Self, EngineError> {
        let spec = &data.spec;
        let mut feature_names = vec!["user_embedding".to_string(), "item_embedding".into()];
        feature_names.extend(spec.user_feature_names.iter().cloned());
        feature_names.extend(spec.item_feature_names.iter().cloned());
        feature_names.extend(spec.genres.iter().map(|g| format!("genre_profile:{g}")));
        let shared = Arc::new(Shared {
            data,
            item_emb,
            index,
            feature_names,
            metrics,
            config: config.clone(),
            queued: AtomicUsize::new(0),
        });
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(config.queue_capacity);
        let rx = Arc::new(Mutex::new(rx));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for w in 0..config.workers.max(1) {
            let (shared, rx, ready) = (shared.clone(), rx.clone(), ready_tx.clone());
            std::thread::Builder::new()
                .name(format!("rec-engine-{w}"))
                .spawn(move || worker(shared, rx, ready))
                .map_err(|e| EngineError::Model(format!("spawning a worker: {e}")))?;
        }
        drop(ready_tx);
        for _ in 0..config.workers.max(1) {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(EngineError::Stopped),
            }
        }
        Ok(Self {
            tx,
            shared,
            capacity: config.queue_capacity,
        })
    }

    fn submit(&self, job: Job) -> Result<(), EngineError> {
        // A dead worker flips liveness before its thread lets go of the queue: refuse at once
        // (retryable UNAVAILABLE) instead of queueing a job nobody will take.
        if !self.shared.config.liveness.is_alive() {
            return Err(EngineError::Stopped);
        }
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(job).map_err(|e| {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => EngineError::Overloaded(self.capacity),
                TrySendError::Disconnected(_) => EngineError::Stopped,
            }
        })
    }

    /// Runs the pipeline for one query.
    pub async fn recommend(&self, query: RecQuery) -> Result<RecOutput, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Recommend {
            query: Box::new(query),
            span: tracing::Span::current(),
            reply,
        })?;
        rx.await.map_err(|_| worker_died())?
    }

    /// The items nearest to one item.
    pub async fn similar(&self, query: SimilarQuery) -> Result<Vec<OutItem>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Similar {
            query,
            span: tracing::Span::current(),
            reply,
        })?;
        rx.await.map_err(|_| worker_died())?
    }
}

/// The reply of an accepted job was dropped unanswered: the worker died (panicked) with it.
/// `INTERNAL`, not `UNAVAILABLE`: a request that killed a worker must not be retried onto the
/// next replica.
fn worker_died() -> EngineError {
    EngineError::Model("the recommendation worker died computing this request".into())
}

/// A worker's own model copies.
struct Models {
    user_tower: CModule,
    ranker: CModule,
}

fn worker(
    shared: Arc<Shared>,
    rx: Arc<Mutex<Receiver<Job>>>,
    ready: std::sync::mpsc::Sender<Result<(), EngineError>>,
) {
    tch::set_num_threads(shared.config.threads as i32);
    let models = match (|| {
        Ok::<_, EngineError>(Models {
            user_tower: load(&shared.data.file("user_tower.pt"))?,
            ranker: load(&shared.data.file("ranker.pt"))?,
        })
    })() {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // Warm-up: the first forward of a TorchScript module optimises the graph (slow); pay it
    // before reporting ready, with explanations so the autograd path is warm too.
    let warm = RecQuery {
        subject: Subject::default(),
        k: 10,
        filter: ValidFilter::default(),
        diversity: 0.3,
        long_tail_floor: 0.2,
        explain: true,
    };
    for _ in 0..2 {
        if let Err(e) = run_recommend(&models, &shared, &warm) {
            let _ = ready.send(Err(e));
            return;
        }
    }
    let _ = ready.send(Ok(()));
    let model = shared
        .data
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A panic here (a bug, or libtorch failing on a model output) ends this worker: the server
    // then fails liveness and readiness until it is restarted, instead of looking healthy with
    // fewer (or no) workers.
    let liveness = shared.config.liveness.clone();
    liveness.supervise(&model, || serve_jobs(&models, &shared, &rx));
}

/// A worker's loop until every [`Engine`] handle is gone: take what is queued (its share),
/// serve it together.
fn serve_jobs(models: &Models, shared: &Shared, rx: &Mutex<Receiver<Job>>) {
    let workers = shared.config.workers.max(1);
    let most = shared.config.batch.max(1);
    let mut jobs = Vec::with_capacity(most);
    loop {
        {
            // The lock is held only while taking jobs, never while computing.
            let Ok(guard) = rx.lock() else { return };
            let Ok(first) = guard.recv() else { return };
            jobs.push(first);
            // This worker's share of what waits: the other workers take the rest, so a burst
            // is spread over every core instead of queueing behind one batch.
            let waiting = shared.queued.load(Ordering::Relaxed).saturating_sub(1);
            let take = most.min(1 + waiting / workers);
            while jobs.len() < take {
                match guard.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        shared.queued.fetch_sub(jobs.len(), Ordering::Relaxed);
        let mut batch = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            match job {
                Job::Recommend { query, span, reply } => {
                    if !reply.is_closed() {
                        batch.push((query, span, reply));
                    } // Else the caller left: do not compute for nobody.
                }
                Job::Similar { query, span, reply } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let _enter = span.enter();
                    let _ = reply.send(Ok(run_similar(shared, &query)));
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let queries: Vec<&RecQuery> = batch.iter().map(|b| b.0.as_ref()).collect();
        let spans: Vec<&tracing::Span> = batch.iter().map(|b| &b.1).collect();
        let results = run_recommend_batch(models, shared, &queries, &spans);
        for ((_, _, reply), result) in batch.into_iter().zip(results) {
            if let Ok(out) = &result {
                shared
                    .metrics
                    .record_served(&shared.data, &out.items, out.cold_start);
            }
            let _ = reply.send(result);
        }
    }
}

/// Genre profile of a history: per genre, the fraction of history items that have it.
pub fn genre_profile(data: &ModelData, history: &[u32]) -> Vec<f32> {
    let g = data.spec.genres.len();
    let mut p = vec![0.0f32; g];
    if history.is_empty() {
        return p;
    }
    for &i in history {
        let mask = data.catalog.items[i as usize].genres;
        for (j, v) in p.iter_mut().enumerate() {
            if mask & (1 << j) != 0 {
                *v += 1.0;
            }
        }
    }
    p.iter_mut().for_each(|v| *v /= history.len() as f32);
    p
}

/// One user-tower forward for `subjects`: one embedding per subject, in order.
fn user_tower_forward(
    tower: &CModule,
    data: &ModelData,
    subjects: &[&Subject],
) -> Result<Vec<Vec<f32>>, EngineError> {
    let h = data.spec.history_length;
    let b = subjects.len();
    let mut window = vec![0i64; b * h];
    let mut users = Vec::with_capacity(b);
    for (row, s) in window.chunks_exact_mut(h).zip(subjects) {
        let recent = &s.history[s.history.len().saturating_sub(h)..];
        for (slot, &item) in row[h - recent.len()..].iter_mut().zip(recent) {
            *slot = item as i64;
        }
        users.push(s.user_index);
    }
    let user = Tensor::from_slice(&users.iter().map(|&u| u as i64).collect::<Vec<_>>());
    let hist = Tensor::from_slice(&window).view([b as i64, h as i64]);
    let uf = gather(&data.user_features, &users);
    let out = tch::no_grad(|| tower.forward_ts(&[user, hist, uf]))?;
    let out = tensor_matrix(&out)?;
    if out.rows != b || out.cols != data.spec.embedding_dim {
        return Err(EngineError::Model(format!(
            "user tower returned [{}, {}] for {b} users of {} dimensions",
            out.rows, out.cols, data.spec.embedding_dim
        )));
    }
    Ok((0..b).map(|r| out.row(r).to_vec()).collect())
}

/// One request between the batched stages.
struct Pending<'a> {
    q: &'a RecQuery,
    span: &'a tracing::Span,
    user: Vec<f32>,
    profile: Vec<f32>,
    cands: Vec<Scored>,
}

/// One request alone (the warm-up).
fn run_recommend(models: &Models, shared: &Shared, q: &RecQuery) -> Result<RecOutput, EngineError> {
    let span = tracing::Span::current();
    run_recommend_batch(models, shared, &[q], &[&span])
        .pop()
        .unwrap_or(Err(EngineError::Stopped))
}

/// The pipeline for several requests: user tower and ranker batched, the rest per request
/// under its own span. One result per query, in order.
fn run_recommend_batch(
    models: &Models,
    shared: &Shared,
    queries: &[&RecQuery],
    spans: &[&tracing::Span],
) -> Vec<Result<RecOutput, EngineError>> {
    let m = &shared.metrics;
    m.batch_requests.observe(queries.len() as f64);
    // One batch serves requests of many traces: a root span linked to each of them (as the
    // vision batcher's), not the child of any one.
    let batch_span = tracing::info_span!("recommend_batch", requests = queries.len());
    for s in spans {
        marquee_core::telemetry::link(&batch_span, s);
    }
    let failed = |e: &EngineError| -> Vec<Result<RecOutput, EngineError>> {
        queries
            .iter()
            .map(|_| Err(EngineError::Model(e.to_string())))
            .collect()
    };

    let t = Instant::now();
    let subjects: Vec<&Subject> = queries.iter().map(|q| &q.subject).collect();
    let users = match batch_span
        .in_scope(|| user_tower_forward(&models.user_tower, &shared.data, &subjects))
    {
        Ok(u) => u,
        Err(e) => return failed(&e),
    };
    let tower = t.elapsed();

    let mut pending: Vec<Pending<'_>> = Vec::with_capacity(queries.len());
    for ((q, span), user) in queries.iter().zip(spans).zip(users) {
        let _enter = span.enter();
        let t = Instant::now();
        let cands = retrieve(shared, q, &user);
        m.stage_took("retrieve", tower + t.elapsed());
        pending.push(Pending {
            q,
            span,
            profile: genre_profile(&shared.data, &q.subject.history),
            user,
            cands,
        });
    }

    let t = Instant::now();
    let rows: Vec<(RankUser<'_>, u32)> = pending
        .iter()
        .flat_map(|p| {
            let who = RankUser {
                user: &p.user,
                user_index: p.q.subject.user_index,
                profile: &p.profile,
            };
            p.cands.iter().map(move |c| (who, c.0))
        })
        .collect();
    let scores = match batch_span.in_scope(|| rank(models, shared, &rows)) {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    let ranked_in = t.elapsed();

    let mut at = 0;
    pending
        .into_iter()
        .map(|p| {
            let _enter = p.span.enter();
            m.stage_took("rank", ranked_in);
            let scores = &scores[at..at + p.cands.len()];
            at += p.cands.len();
            finish(models, shared, &p, scores)
        })
        .collect()
}

/// The candidates of one request: its N nearest items that pass its filters and exclusions.
/// The filter runs inside the scan, so a restrictive one still yields N when N exist.
fn retrieve(shared: &Shared, q: &RecQuery, user: &[f32]) -> Vec<Scored> {
    let data = &shared.data;
    let exclude: HashSet<u32> = q.subject.exclude.iter().copied().collect();
    let open = q.filter.is_empty();
    let keep = |i: u32| !exclude.contains(&i) && (open || q.filter.pass(data, i));
    let keep: Option<&dyn Fn(u32) -> bool> = if open && exclude.is_empty() {
        None
    } else {
        Some(&keep)
    };
    // A history excluded drops a few items of many: only a real filter is sampled for its
    // share (which widens the scan).
    let (cands, stats) = shared.index.search_with(
        &shared.item_emb,
        user,
        shared.config.candidates,
        keep,
        !open,
    );
    if stats.full_scan && keep.is_some() && shared.index.is_approximate() {
        shared.metrics.exact_fallbacks.inc();
    }
    cands
}

/// Re-ranking and explanations of one ranked request.
fn finish(
    models: &Models,
    shared: &Shared,
    p: &Pending<'_>,
    scores: &[f32],
) -> Result<RecOutput, EngineError> {
    let data = &shared.data;
    let m = &shared.metrics;
    let (q, cands) = (p.q, &p.cands);
    let t = Instant::now();
    let ranked: Vec<Candidate> = cands
        .iter()
        .zip(scores)
        .map(|(c, &s)| Candidate {
            index: c.0,
            score: s,
            long_tail: data.catalog.items[c.0 as usize].long_tail,
        })
        .collect();
    let sim = |a: usize, b: usize| {
        let (ia, ib) = (ranked[a].index as usize, ranked[b].index as usize);
        0.5 * dot(shared.item_emb.row(ia), shared.item_emb.row(ib))
            + 0.5 * genre_jaccard(data.catalog.items[ia].genres, data.catalog.items[ib].genres)
    };
    let mut chosen = mmr(&ranked, q.k, q.diversity, sim);
    long_tail_floor(&ranked, &mut chosen, q.long_tail_floor);
    m.stage("rerank", t);

    let mut items: Vec<OutItem> = chosen
        .iter()
        .map(|&c| OutItem {
            index: ranked[c].index,
            score: ranked[c].score,
            retrieval: cands[c].1,
            explanation: None,
        })
        .collect();
    if q.explain && !items.is_empty() {
        let t = Instant::now();
        let who = RankUser {
            user: &p.user,
            user_index: q.subject.user_index,
            profile: &p.profile,
        };
        explain(models, shared, who, &q.subject, &mut items)?;
        m.stage("explain", t);
    }
    Ok(RecOutput {
        items,
        cold_start: q.subject.is_cold(),
        retrieved: cands.len(),
        ranked: cands.len(),
    })
}

/// The user side of a ranker row.
#[derive(Clone, Copy)]
struct RankUser<'a> {
    user: &'a [f32],
    user_index: u32,
    profile: &'a [f32],
}

/// Ranker inputs for `rows` (each row: whose, which item).
fn ranker_inputs(shared: &Shared, rows: &[(RankUser<'_>, u32)]) -> [Tensor; 5] {
    let data = &shared.data;
    let b = rows.len();
    let (d, fu, fi) = (
        shared.item_emb.cols,
        data.user_features.cols,
        data.item_features.cols,
    );
    let g = rows.first().map_or(0, |r| r.0.profile.len());
    let (mut ue, mut ie, mut uf, mut itf, mut gp) = (
        Vec::with_capacity(b * d),
        Vec::with_capacity(b * d),
        Vec::with_capacity(b * fu),
        Vec::with_capacity(b * fi),
        Vec::with_capacity(b * g),
    );
    for (who, item) in rows {
        ue.extend_from_slice(who.user);
        ie.extend_from_slice(shared.item_emb.row(*item as usize));
        uf.extend_from_slice(data.user_features.row(who.user_index as usize));
        itf.extend_from_slice(data.item_features.row(*item as usize));
        gp.extend_from_slice(who.profile);
    }
    let t = |v: &[f32], cols: usize| Tensor::from_slice(v).view([b as i64, cols as i64]);
    [t(&ue, d), t(&ie, d), t(&uf, fu), t(&itf, fi), t(&gp, g)]
}

/// Ranker scores for `rows`, in forwards of at most `rank_batch` rows.
fn rank(
    models: &Models,
    shared: &Shared,
    rows: &[(RankUser<'_>, u32)],
) -> Result<Vec<f32>, EngineError> {
    let mut scores = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(shared.config.rank_batch.max(1)) {
        let inputs = ranker_inputs(shared, chunk);
        let out = tch::no_grad(|| models.ranker.forward_ts(&inputs))?;
        scores.extend(Vec::<f32>::try_from(&out.flatten(0, -1))?);
    }
    if scores.len() != rows.len() {
        return Err(EngineError::Model(format!(
            "ranker returned {} scores for {} candidates",
            scores.len(),
            rows.len()
        )));
    }
    Ok(scores)
}

/// Fills `explanation` of every item: nearest history items, and gradient × input of the
/// ranker score per input column (embeddings summed over their dimensions).
fn explain(
    models: &Models,
    shared: &Shared,
    who: RankUser<'_>,
    subject: &Subject,
    items: &mut [OutItem],
) -> Result<(), EngineError> {
    let cfg = &shared.config;
    let rows: Vec<(RankUser<'_>, u32)> = items.iter().map(|i| (who, i.index)).collect();
    let inputs = ranker_inputs(shared, &rows);
    let n = rows.len();
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.set_requires_grad(true)).collect();
    let out = models.ranker.forward_ts(&inputs)?;
    let grads = Tensor::f_run_backward(&[out.sum(Kind::Float)], &inputs, false, false)?;
    // Per row, one value per named feature: [user_emb, item_emb, user cols.., item cols.., genres..].
    let mut columns: Vec<Vec<f32>> = Vec::with_capacity(5);
    for (x, g) in inputs.iter().zip(&grads) {
        let gx = (x.detach() * g).to_kind(Kind::Float);
        columns.push(Vec::<f32>::try_from(&gx.flatten(0, -1))?);
    }
    let width = |k: usize| columns[k].len() / n.max(1);
    let mut history: Vec<u32> = subject.history.clone();
    history.sort_unstable();
    history.dedup();
    for (r, item) in items.iter_mut().enumerate() {
        let mut feats: Vec<(String, f32)> = Vec::with_capacity(shared.feature_names.len());
        let mut name = shared.feature_names.iter();
        for (k, col) in columns.iter().enumerate() {
            let w = width(k);
            let row = &col[r * w..(r + 1) * w];
            if k < 2 {
                let n = name.next().cloned().unwrap_or_default();
                feats.push((n, row.iter().sum()));
            } else {
                for &v in row {
                    feats.push((name.next().cloned().unwrap_or_default(), v));
                }
            }
        }
        feats.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        feats.truncate(cfg.explain_features);
        let emb = shared.item_emb.row(item.index as usize);
        let mut because: Vec<(u32, f32)> = history
            .iter()
            .map(|&h| (h, dot(emb, shared.item_emb.row(h as usize))))
            .collect();
        because.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        because.truncate(cfg.explain_history);
        item.explanation = Some(Explained {
            because_of: because,
            features: feats,
        });
    }
    Ok(())
}

fn run_similar(shared: &Shared, q: &SimilarQuery) -> Vec<OutItem> {
    let data = &shared.data;
    let query = shared.item_emb.row(q.item as usize).to_vec();
    let open = q.filter.is_empty();
    let keep = |i: u32| i != q.item && (open || q.filter.pass(data, i));
    // Leaving out the query item alone is no filter to sample (as a history in `retrieve`).
    shared
        .index
        .search_with(&shared.item_emb, &query, q.k, Some(&keep), !open)
        .0
        .into_iter()
        .map(|(i, s)| OutItem {
            index: i,
            score: s,
            retrieval: s,
            explanation: None,
        })
        .collect()
}
