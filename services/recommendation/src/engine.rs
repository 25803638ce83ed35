//! The recommendation pipeline on dedicated OS threads (never the async runtime): user tower →
//! ANN retrieval → filters → ranker in batches → MMR diversity → long-tail floor → top-k,
//! with explanations by embedding neighbours and gradient × input through tch autograd.
//!
//! A cloneable [`Engine`] handle sends jobs over a bounded queue to worker threads; each worker
//! owns its own TorchScript modules. The shared, read-only part ([`Shared`]) holds the
//! catalogue, features, item embeddings and the index.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use marquee_core::liveness::Liveness;
use tch::{CModule, Device, Kind, Tensor};
use tokio::sync::oneshot;

use crate::index::{HnswParams, ItemIndex, Scored, dot, exact_search};
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
    /// `None`: exact search only.
    pub hnsw: Option<HnswParams>,
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

/// Computes every item's embedding with the item tower (one forward, no gradients).
pub fn item_embeddings(data: &ModelData) -> Result<Matrix, EngineError> {
    let module = load(&data.file("item_tower.pt"))?;
    let n = data.catalog.items.len();
    let idx = Tensor::from_slice(&(0..n as i64).collect::<Vec<_>>());
    let f = matrix_tensor(&data.item_features);
    let t = matrix_tensor(&data.title_embeddings);
    let out = tch::no_grad(|| module.forward_ts(&[idx, f, t]))?;
    let mut emb = tensor_matrix(&out)?;
    if emb.cols != data.spec.embedding_dim {
        return Err(EngineError::Model(format!(
            "item tower returned {} dimensions, model.toml says {}",
            emb.cols, data.spec.embedding_dim
        )));
    }
    // Row 0 is padding: it must never score.
    emb.data[..emb.cols].fill(0.0);
    Ok(emb)
}

/// User embeddings for `subjects` with a freshly loaded user tower (tests and the bench use
/// them as retrieval queries; the service computes them on its workers).
pub fn user_embeddings(data: &ModelData, subjects: &[Subject]) -> Result<Matrix, EngineError> {
    let models = Models {
        user_tower: load(&data.file("user_tower.pt"))?,
        ranker: load(&data.file("ranker.pt"))?,
    };
    let mut out = Matrix {
        rows: subjects.len(),
        cols: data.spec.embedding_dim,
        data: Vec::with_capacity(subjects.len() * data.spec.embedding_dim),
    };
    for s in subjects {
        out.data.extend(user_embedding_with(&models, data, s)?);
    }
    Ok(out)
}

fn load(path: &std::path::Path) -> Result<CModule, EngineError> {
    let mut m = CModule::load_on_device(path, Device::Cpu)
        .map_err(|e| EngineError::Model(format!("`{}`: {e}", path.display())))?;
    m.set_eval();
    Ok(m)
}

fn matrix_tensor(m: &Matrix) -> Tensor {
    Tensor::from_slice(&m.data).view([m.rows as i64, m.cols as i64])
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
        let index = ItemIndex::build(&item_emb, config.hnsw);
        tracing::info!(
            items = item_emb.rows.saturating_sub(1),
            approximate = index.is_approximate(),
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
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => EngineError::Overloaded(self.capacity),
            TrySendError::Disconnected(_) => EngineError::Stopped,
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

/// A worker's loop: one job at a time until every [`Engine`] handle is gone.
fn serve_jobs(models: &Models, shared: &Shared, rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, never while computing.
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        match job {
            Job::Recommend { query, span, reply } => {
                if reply.is_closed() {
                    continue; // The caller left: do not compute for nobody.
                }
                let _enter = span.enter();
                let result = run_recommend(models, shared, &query);
                if let Ok(out) = &result {
                    shared
                        .metrics
                        .record_served(&shared.data, &out.items, out.cold_start);
                }
                let _ = reply.send(result);
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

/// The user embedding for a subject.
fn user_embedding(models: &Models, shared: &Shared, s: &Subject) -> Result<Vec<f32>, EngineError> {
    user_embedding_with(models, &shared.data, s)
}

fn user_embedding_with(
    models: &Models,
    data: &ModelData,
    s: &Subject,
) -> Result<Vec<f32>, EngineError> {
    let h = data.spec.history_length;
    let mut window = vec![0i64; h];
    let recent = &s.history[s.history.len().saturating_sub(h)..];
    for (slot, &item) in window[h - recent.len()..].iter_mut().zip(recent) {
        *slot = item as i64;
    }
    let user = Tensor::from_slice(&[s.user_index as i64]);
    let hist = Tensor::from_slice(&window).view([1, h as i64]);
    let uf = gather(&data.user_features, &[s.user_index]);
    let out = tch::no_grad(|| models.user_tower.forward_ts(&[user, hist, uf]))?;
    Ok(Vec::<f32>::try_from(&out.flatten(0, -1))?)
}

fn run_recommend(models: &Models, shared: &Shared, q: &RecQuery) -> Result<RecOutput, EngineError> {
    let data = &shared.data;
    let cfg = &shared.config;
    let m = &shared.metrics;
    let n_items = data.catalog.len();

    let t = Instant::now();
    let user = user_embedding(models, shared, &q.subject)?;
    // Retrieve N plus the items the filters will surely drop, so N survive when possible.
    let exclude: HashSet<u32> = q.subject.exclude.iter().copied().collect();
    let fetch = (cfg.candidates + exclude.len() + q.filter.exclude_items.len()).min(n_items);
    let retrieved = shared.index.search(&shared.item_emb, &user, fetch);
    m.stage("retrieve", t);

    let t = Instant::now();
    let keep = |i: u32| !exclude.contains(&i) && q.filter.pass(data, i);
    let mut cands: Vec<Scored> = retrieved.iter().copied().filter(|s| keep(s.0)).collect();
    if cands.len() < q.k && fetch < n_items {
        // Restrictive filters: the neighbourhood holds too few matches, so scan everything.
        cands = exact_search(&shared.item_emb, &user, cfg.candidates, keep);
        m.exact_fallbacks.inc();
    }
    cands.truncate(cfg.candidates);
    m.stage("filter", t);

    let t = Instant::now();
    let profile = genre_profile(data, &q.subject.history);
    let scores = rank(
        models,
        shared,
        &user,
        q.subject.user_index,
        &profile,
        &cands,
    )?;
    m.stage("rank", t);

    let t = Instant::now();
    let ranked: Vec<Candidate> = cands
        .iter()
        .zip(&scores)
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
        explain(models, shared, &user, &q.subject, &profile, &mut items)?;
        m.stage("explain", t);
    }
    Ok(RecOutput {
        items,
        cold_start: q.subject.is_cold(),
        retrieved: retrieved.len(),
        ranked: cands.len(),
    })
}

/// Ranker inputs for `items` (same user on every row).
fn ranker_inputs(
    shared: &Shared,
    user: &[f32],
    user_index: u32,
    profile: &[f32],
    items: &[u32],
) -> [Tensor; 5] {
    let b = items.len() as i64;
    let d = user.len() as i64;
    let ue = Tensor::from_slice(user)
        .view([1, d])
        .expand([b, d], true)
        .contiguous();
    let ie = gather(&shared.item_emb, items);
    let uf = gather(&shared.data.user_features, &[user_index])
        .expand([b, shared.data.user_features.cols as i64], true)
        .contiguous();
    let itf = gather(&shared.data.item_features, items);
    let gp = Tensor::from_slice(profile)
        .view([1, profile.len() as i64])
        .expand([b, profile.len() as i64], true)
        .contiguous();
    [ue, ie, uf, itf, gp]
}

fn rank(
    models: &Models,
    shared: &Shared,
    user: &[f32],
    user_index: u32,
    profile: &[f32],
    cands: &[Scored],
) -> Result<Vec<f32>, EngineError> {
    let mut scores = Vec::with_capacity(cands.len());
    let idx: Vec<u32> = cands.iter().map(|c| c.0).collect();
    for chunk in idx.chunks(shared.config.rank_batch.max(1)) {
        let inputs = ranker_inputs(shared, user, user_index, profile, chunk);
        let out = tch::no_grad(|| models.ranker.forward_ts(&inputs))?;
        scores.extend(Vec::<f32>::try_from(&out.flatten(0, -1))?);
    }
    if scores.len() != cands.len() {
        return Err(EngineError::Model(format!(
            "ranker returned {} scores for {} candidates",
            scores.len(),
            cands.len()
        )));
    }
    Ok(scores)
}

/// Fills `explanation` of every item: nearest history items, and gradient × input of the
/// ranker score per input column (embeddings summed over their dimensions).
fn explain(
    models: &Models,
    shared: &Shared,
    user: &[f32],
    subject: &Subject,
    profile: &[f32],
    items: &mut [OutItem],
) -> Result<(), EngineError> {
    let cfg = &shared.config;
    let idx: Vec<u32> = items.iter().map(|i| i.index).collect();
    let inputs = ranker_inputs(shared, user, subject.user_index, profile, &idx);
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.set_requires_grad(true)).collect();
    let out = models.ranker.forward_ts(&inputs)?;
    let grads = Tensor::f_run_backward(&[out.sum(Kind::Float)], &inputs, false, false)?;
    // Per row, one value per named feature: [user_emb, item_emb, user cols.., item cols.., genres..].
    let mut columns: Vec<Vec<f32>> = Vec::with_capacity(5);
    for (x, g) in inputs.iter().zip(&grads) {
        let gx = (x.detach() * g).to_kind(Kind::Float);
        columns.push(Vec::<f32>::try_from(&gx.flatten(0, -1))?);
    }
    let width = |k: usize| columns[k].len() / idx.len().max(1);
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
    let keep = |i: u32| i != q.item && q.filter.pass(data, i);
    let fetch = (q.k + 1 + q.filter.exclude_items.len()).min(data.catalog.len());
    let mut found: Vec<Scored> = shared
        .index
        .search(&shared.item_emb, &query, fetch)
        .into_iter()
        .filter(|s| keep(s.0))
        .collect();
    if found.len() < q.k && fetch < data.catalog.len() {
        found = exact_search(&shared.item_emb, &query, q.k, keep);
    }
    found.truncate(q.k);
    found
        .into_iter()
        .map(|(i, s)| OutItem {
            index: i,
            score: s,
            retrieval: s,
            explanation: None,
        })
        .collect()
}
