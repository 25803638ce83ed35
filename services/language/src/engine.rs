//! The generation engine: one OS thread owns the TorchScript module, the KV cache and the
//! running batch (continuous, iteration-level batching).
//!
//! Each iteration:
//! 1. sequences whose caller went away or whose deadline passed leave, freeing their cache
//!    slot at once;
//! 2. every `decode_steps_per_prefill` decode steps (or at once when nothing runs), waiting
//!    requests are admitted in arrival order while the batch has a free slot, the token budget
//!    (prompt + `max_new_tokens` of every running sequence against `max_total_tokens`) holds
//!    and the prefill stays within `max_prefill_tokens`; they are prefilled together;
//! 3. one decode step advances every running sequence by one token.
//!
//! Open Inference Protocol calls (raw logits by full recompute) share the loop but not its
//! budget: each iteration computes queued OIP requests in arrival order up to
//! `oip_max_tokens_per_step` token positions, before its decode step, so a burst of them
//! delays each decode step by at most that much compute instead of stalling every stream until
//! the burst is done. An OIP request whose caller left or whose deadline passed is dropped
//! before compute; the OIP queue has its own bound (`oip_queue_capacity`).
//!
//! The cache ([`crate::cache`]) is preallocated for every slot: keys and values for a
//! transformer, a fixed-size state for a recurrent model. Running sequences occupy slots `0..n`
//! contiguously (a leaving sequence's slot is refilled by copying the last one into it), so a
//! decode step passes `narrow` views of the buffers and the module writes in place: no per-step
//! copy or allocation. A request for several sequences (`num_return_sequences`) is prefilled
//! once and its prompt's cache copied into its other slots.
//!
//! Which requests are admitted, which OIP requests run and how slots move are decided by the
//! pure policy in [`crate::scheduler`]; this module applies it to the model. Each prefill and
//! decode step is a span (`lm_prefill`, `lm_decode`) linked to the spans of the requests it
//! serves, as the vision batcher's batches are.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use marquee_core::ServeError;
use marquee_core::liveness::Liveness;
use tch::{CModule, Device, IValue, Kind, Tensor};
use tokio::sync::{mpsc, oneshot};

pub use crate::cache::Shape;
use crate::cache::{Cache, Prefilled};
use crate::metrics::LanguageMetrics;
use crate::model::{Detokenizer, ModelFiles, Vocab};
use crate::sampling::{Rng, Sampler, SamplingParams};
use crate::scheduler::{self, Admission, Candidate, ForwardBudget, Verdict};
use crate::text::{Delta, TextStream};

/// What the engine runs with: the service's scheduler settings (validated by
/// [`crate::Settings`]; what each field means is documented there) and the model's instance.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: crate::LanguageSettings,
    pub threads: usize,
    pub device: Device,
    /// The server's liveness: a panic of the engine thread marks the process dead.
    pub liveness: Liveness,
}

/// One generation request, validated and tokenized.
pub struct Job {
    /// Prompt token ids (BOS first when the model prepends one).
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Independent sequences sampled from the prompt (`num_return_sequences`), >= 1.
    pub sequences: usize,
    /// Sized to hold every event of the request, so the engine never blocks on a slow reader.
    pub events: mpsc::Sender<Event>,
    pub arrived: Instant,
    pub deadline: Instant,
    /// The request's span: the engine's step spans link to it.
    pub span: tracing::Span,
}

impl Job {
    /// Capacity the job's event channel needs: one message per token at most, plus the end, for
    /// every sequence.
    pub fn channel_capacity(params: &SamplingParams, sequences: usize) -> usize {
        sequences * (params.max_new_tokens + 2)
    }

    fn candidate(&self, now: Instant) -> Candidate {
        Candidate {
            sequences: self.sequences,
            prompt_tokens: self.prompt.len(),
            max_new_tokens: self.params.max_new_tokens,
            gone: self.events.is_closed(),
            expired: now >= self.deadline,
        }
    }
}

/// The seed of sequence `index` of a request: the request's own for the first, so one sequence
/// is exactly a request without `num_return_sequences`; a fixed derivation for the others, so
/// each reports a seed that reproduces it alone.
pub fn sequence_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        seed
    } else {
        Rng::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Length,
    Stop,
    Eos,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Eos => "eos",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Summary {
    /// Which of the request's sequences ended.
    pub index: usize,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub seed: u64,
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
    pub mean_inter_token: Duration,
}

/// What the engine tells a request, in order per sequence: any number of `Tokens`, then one
/// `Finished`; or a `Failed`, which ends the whole request.
#[derive(Debug)]
pub enum Event {
    Tokens {
        /// The sequence (`0..num_return_sequences`).
        index: usize,
        text: String,
        ids: Vec<u32>,
        logprobs: Vec<f32>,
    },
    Finished(Summary),
    Failed(ServeError),
}

/// Full-recompute logits for raw token ids (the OIP path and the cache-free reference).
struct ForwardJob {
    ids: Vec<i64>,
    batch: usize,
    len: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<f32>, ServeError>>,
}

impl ForwardJob {
    /// Token positions the full recompute runs over: its share of the step budget.
    fn tokens(&self) -> usize {
        self.batch * self.len
    }
}

enum Work {
    Generate(Job),
    Forward(ForwardJob),
}

/// Generation and OIP work in one arrival-ordered queue (so a failing engine answers both
/// alike), bounded separately: `forwards` counts the `Work::Forward` items.
struct Queue {
    items: VecDeque<Work>,
    forwards: usize,
    closed: bool,
}

impl Queue {
    fn generations(&self) -> usize {
        // Saturating: a failed engine empties `items` without recounting.
        self.items.len().saturating_sub(self.forwards)
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// Handle to the engine thread. Dropping the last handle lets the thread finish what runs and
/// exit.
pub struct Engine {
    shared: Arc<Shared>,
    cfg: EngineConfig,
    pub shape: Shape,
    metrics: LanguageMetrics,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.closed = true;
        }
        self.shared.wake.notify_all();
    }
}

impl Engine {
    /// Loads the module on a new thread, warms it up, and returns once it is ready.
    pub fn start(
        files: &ModelFiles,
        vocab: Arc<Vocab>,
        cfg: EngineConfig,
        metrics: LanguageMetrics,
    ) -> anyhow::Result<Self> {
        let spec = &files.manifest.language;
        let shape = Shape {
            architecture: spec.architecture,
            layers: spec.num_layers,
            heads: spec.num_heads,
            head_dim: spec.head_dim,
            state_size: spec.state_size,
            context: spec.context_length,
            vocab: spec.vocab_size,
            eos: spec.eos_token_id,
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                forwards: 0,
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let weights = files.weights.clone();
        let thread_shared = shared.clone();
        let thread_cfg = cfg.clone();
        let thread_metrics = metrics.clone();
        let model = files.manifest.name.clone();
        std::thread::Builder::new()
            .name(format!("lm-{}", files.manifest.name))
            .spawn(move || {
                tch::set_num_threads(thread_cfg.threads as i32);
                let _guard = tch::no_grad_guard();
                let setup = Worker::new(
                    &weights,
                    shape,
                    thread_cfg,
                    vocab,
                    thread_shared,
                    thread_metrics,
                );
                match setup {
                    Ok(mut worker) => {
                        let _ = ready_tx.send(Ok(()));
                        let shared = worker.shared.clone();
                        let liveness = worker.cfg.liveness.clone();
                        if liveness.supervise(&model, || worker.run()).is_none() {
                            // A bug or a libtorch failure (logged once, and the server now fails
                            // liveness and readiness): the running sequences' senders are gone
                            // with the worker (their callers get an error); refuse the queued
                            // and future requests instead of leaving them waiting.
                            let queued = shared
                                .queue
                                .lock()
                                .map(|mut q| {
                                    q.closed = true;
                                    std::mem::take(&mut q.items)
                                })
                                .unwrap_or_default();
                            for work in queued {
                                let error =
                                    ServeError::Internal("the language engine failed".into());
                                match work {
                                    Work::Generate(job) => {
                                        let _ = job.events.try_send(Event::Failed(error));
                                    }
                                    Work::Forward(f) => {
                                        let _ = f.reply.send(Err(error));
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the engine thread died while loading the model"))??;
        Ok(Self {
            shared,
            cfg,
            shape,
            metrics,
        })
    }

    /// False once any worker of this server died (the engine thread panicked).
    pub fn is_alive(&self) -> bool {
        self.cfg.liveness.is_alive()
    }

    /// False once the engine thread has failed (or the engine is shutting down).
    pub fn is_serving(&self) -> bool {
        self.shared.queue.lock().map(|q| !q.closed).unwrap_or(false)
    }

    /// The admission limits of the scheduler settings.
    fn limits(&self) -> scheduler::Limits {
        limits(&self.cfg.scheduler)
    }

    /// Queues a generation; refused at once when the queue is full, or when it could never be
    /// admitted even into an empty batch.
    pub fn submit(&self, job: Job) -> Result<(), ServeError> {
        scheduler::could_ever_fit(self.limits(), &job.candidate(Instant::now()))
            .map_err(|e| ServeError::invalid("parameters.num_return_sequences", e))?;
        self.push(Work::Generate(job))
    }

    /// The most token positions (rows x tokens) one OIP request may ask for.
    pub fn oip_max_tokens(&self) -> usize {
        self.cfg.scheduler.oip_max_tokens_per_step
    }

    /// Full-recompute logits `[batch, len, vocab]` for `ids` (`batch * len` token ids, at most
    /// [`Self::oip_max_tokens`]). Dropped unanswered if the caller goes away first (dropping
    /// this future), refused with `DEADLINE_EXCEEDED` if `deadline` passes before compute.
    pub async fn forward(
        &self,
        ids: Vec<i64>,
        batch: usize,
        len: usize,
        deadline: Instant,
    ) -> Result<Vec<f32>, ServeError> {
        debug_assert!(batch * len <= self.cfg.scheduler.oip_max_tokens_per_step);
        if Instant::now() >= deadline {
            self.metrics.oip_outcome("deadline");
            return Err(ServeError::DeadlineExceeded(
                "the deadline passed before the request reached the engine".into(),
            ));
        }
        let (reply, rx) = oneshot::channel();
        self.push(Work::Forward(ForwardJob {
            ids,
            batch,
            len,
            deadline,
            reply,
        }))?;
        rx.await
            .map_err(|_| ServeError::unavailable("the language engine stopped"))?
    }

    fn push(&self, work: Work) -> Result<(), ServeError> {
        let mut q = self
            .shared
            .queue
            .lock()
            .map_err(|_| ServeError::Internal("engine queue poisoned".into()))?;
        if q.closed {
            return Err(ServeError::unavailable(
                "the language engine is shutting down",
            ));
        }
        let full = match &work {
            Work::Generate(_) if q.generations() >= self.cfg.scheduler.queue_capacity => {
                Some(format!(
                    "the generation queue is full ({} requests waiting, `language.queue_capacity` = {}); retry later",
                    q.generations(),
                    self.cfg.scheduler.queue_capacity
                ))
            }
            Work::Forward(_) if q.forwards >= self.cfg.scheduler.oip_queue_capacity => {
                self.metrics.oip_outcome("queue_full");
                Some(format!(
                    "the OIP queue is full ({} requests waiting, `language.oip_queue_capacity` = {}); retry later",
                    q.forwards, self.cfg.scheduler.oip_queue_capacity
                ))
            }
            _ => None,
        };
        if let Some(message) = full {
            self.metrics
                .core
                .rejected
                .with_label_values(&[&self.metrics.model, "queue_full"])
                .inc();
            return Err(ServeError::Overloaded {
                message,
                retry_after: Duration::from_millis(200),
            });
        }
        if matches!(work, Work::Forward(_)) {
            q.forwards += 1;
            self.metrics
                .oip_queued
                .with_label_values(&[&self.metrics.model])
                .inc();
        }
        q.items.push_back(work);
        self.metrics.queue_depths(q.generations(), q.forwards);
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }
}

/// A running sequence in cache slot `i` (its index in `Worker::running`).
struct Seq {
    /// Its index among the request's sequences.
    index: usize,
    prompt_tokens: usize,
    events: mpsc::Sender<Event>,
    arrived: Instant,
    deadline: Instant,
    span: tracing::Span,
    sampler: Sampler,
    detok: Detokenizer,
    text: TextStream,
    generated: usize,
    /// Positions whose keys/values are in the cache.
    cached: usize,
    /// The newest token, fed to the next decode step.
    last: u32,
    pending_ids: Vec<u32>,
    pending_logprobs: Vec<f32>,
    admitted: Instant,
    first_token: Option<Instant>,
    last_token: Instant,
    /// Finished (or its caller is gone); removed after the step.
    done: bool,
}

struct Worker {
    module: CModule,
    shape: Shape,
    cfg: EngineConfig,
    vocab: Arc<Vocab>,
    shared: Arc<Shared>,
    metrics: LanguageMetrics,
    cache: Cache,
    running: Vec<Seq>,
    /// Token budget held by running sequences.
    used_tokens: usize,
}

impl Worker {
    fn new(
        weights: &std::path::Path,
        shape: Shape,
        cfg: EngineConfig,
        vocab: Arc<Vocab>,
        shared: Arc<Shared>,
        metrics: LanguageMetrics,
    ) -> anyhow::Result<Self> {
        let mut module = CModule::load_on_device(weights, cfg.device)
            .map_err(|e| anyhow::anyhow!("cannot load `{}`: {e}", weights.display()))?;
        module.set_eval();
        let cache = Cache::new(&shape, cfg.scheduler.max_batch_size, cfg.device)
            .map_err(anyhow::Error::msg)?;
        tracing::info!(
            cache_mib = cache.bytes() >> 20,
            architecture = ?shape.architecture,
            "language cache allocated"
        );
        let mut worker = Self {
            module,
            shape,
            cfg,
            vocab,
            shared,
            metrics,
            cache,
            running: Vec::new(),
            used_tokens: 0,
        };
        worker.warm_up()?;
        Ok(worker)
    }

    /// Runs prefill and decode at a few shapes so that TorchScript's profiling executor has
    /// optimised them before the first request, and checks the module's output shapes.
    fn warm_up(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let widest = self.cfg.scheduler.max_batch_size.min(4);
        for (batch, len) in [(1usize, 4usize), (2.min(widest), 8), (1, 16), (widest, 8)] {
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|b| (0..len - b % 2).map(|i| (i % 7 + 1) as u32).collect())
                .collect();
            let slots: Vec<Vec<usize>> = (0..batch).map(|b| vec![b]).collect();
            let logits = self
                .prefill_into(&prompts, &slots)
                .map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                logits.len() == batch * self.shape.vocab,
                "prefill returned {} logits for {batch} prompts, expected {} (vocab_size {})",
                logits.len(),
                batch * self.shape.vocab,
                self.shape.vocab
            );
            let mut positions: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
            for _ in 0..4 {
                let tokens = vec![1i64; batch];
                let logits = self
                    .decode(&tokens, &positions)
                    .map_err(anyhow::Error::msg)?;
                anyhow::ensure!(
                    logits.len() == batch * self.shape.vocab,
                    "decode returned {} logits for {batch} sequences",
                    logits.len()
                );
                positions.iter_mut().for_each(|p| *p += 1);
            }
        }
        let probe = self
            .forward_logits(&[1, 2, 3], 1, 3)
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            probe.len() == 3 * self.shape.vocab,
            "forward returned {} logits for 3 tokens",
            probe.len()
        );
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "language model warmed up"
        );
        Ok(())
    }

    fn run(&mut self) {
        let mut steps_since_prefill = usize::MAX;
        loop {
            self.reap();
            let admit_now = self.running.is_empty()
                || steps_since_prefill >= self.cfg.scheduler.decode_steps_per_prefill;
            let (jobs, forwards, closed) = self.take_work(admit_now);
            self.run_forwards(forwards);
            if !jobs.is_empty() {
                self.admit(jobs);
                steps_since_prefill = 0;
            }
            if !self.running.is_empty() {
                self.step();
                steps_since_prefill = steps_since_prefill.saturating_add(1);
            } else if closed {
                return;
            }
        }
    }

    /// Takes this iteration's share of OIP work (arrival order, within
    /// `oip_max_tokens_per_step`) and, when `admit` is set, the generation jobs that fit (the
    /// policy is [`crate::scheduler`]'s); drops work whose caller left or whose deadline passed
    /// wherever it waits; blocks while there is nothing at all to do.
    fn take_work(&mut self, admit: bool) -> (Vec<Job>, Vec<ForwardJob>, bool) {
        let Ok(mut q) = self.shared.queue.lock() else {
            return (Vec::new(), Vec::new(), true);
        };
        while self.running.is_empty() && q.items.is_empty() && !q.closed {
            q = match self.shared.wake.wait(q) {
                Ok(q) => q,
                Err(_) => return (Vec::new(), Vec::new(), true),
            };
        }
        let now = Instant::now();
        let mut forwards = Vec::new();
        let mut forward_budget = ForwardBudget::new(self.cfg.scheduler.oip_max_tokens_per_step);
        let mut jobs = Vec::new();
        let mut admission = Admission::new(
            limits(&self.cfg.scheduler),
            self.running.len(),
            self.used_tokens,
            admit,
        );
        let mut kept = VecDeque::with_capacity(q.items.len());
        let mut kept_forwards = 0usize;
        while let Some(work) = q.items.pop_front() {
            match work {
                Work::Forward(f) => {
                    let Some(f) = self.screen_forward(f, now) else {
                        continue;
                    };
                    if forward_budget.take(f.tokens()) {
                        forwards.push(f);
                    } else {
                        kept_forwards += 1;
                        kept.push_back(Work::Forward(f));
                    }
                }
                Work::Generate(job) => match admission.consider(&job.candidate(Instant::now())) {
                    Verdict::Admit => jobs.push(job),
                    Verdict::Wait => kept.push_back(Work::Generate(job)),
                    Verdict::Cancelled => self.metrics.rejected("cancelled"),
                    Verdict::Expired => {
                        self.metrics.rejected("deadline");
                        let _ = job
                            .events
                            .try_send(Event::Failed(ServeError::DeadlineExceeded(
                                "the deadline passed while the request waited for a slot".into(),
                            )));
                    }
                },
            }
        }
        q.items = kept;
        q.forwards = kept_forwards;
        self.metrics.queue_depths(q.generations(), q.forwards);
        (jobs, forwards, q.closed)
    }

    /// Drops OIP work that must not be computed: its caller left (the reply channel is
    /// closed: cancelled, or the transport's deadline dropped the call) or its deadline passed.
    fn screen_forward(&self, f: ForwardJob, now: Instant) -> Option<ForwardJob> {
        if f.reply.is_closed() {
            self.metrics.oip_outcome("cancelled");
            self.metrics.rejected("cancelled");
            return None;
        }
        if now >= f.deadline {
            self.metrics.oip_outcome("deadline");
            self.metrics.rejected("deadline");
            let _ = f.reply.send(Err(ServeError::DeadlineExceeded(
                "the deadline passed while the request waited in the OIP queue".into(),
            )));
            return None;
        }
        Some(f)
    }

    /// Computes this iteration's OIP requests one by one, each checked again just before its
    /// compute (the ones before it took time).
    fn run_forwards(&mut self, forwards: Vec<ForwardJob>) {
        if forwards.is_empty() {
            return;
        }
        let started = Instant::now();
        let (mut computed, mut tokens) = (0usize, 0usize);
        for f in forwards {
            let Some(f) = self.screen_forward(f, Instant::now()) else {
                continue;
            };
            let out = self.forward_logits(&f.ids, f.batch, f.len);
            self.metrics
                .oip_outcome(if out.is_ok() { "computed" } else { "failed" });
            computed += 1;
            tokens += f.tokens();
            let _ = f.reply.send(out);
        }
        if computed > 0 {
            self.metrics
                .observe_step("oip", started.elapsed(), computed);
            self.metrics
                .oip_step_tokens
                .with_label_values(&[&self.metrics.model])
                .observe(tokens as f64);
        }
    }

    /// Removes sequences whose caller cancelled or whose deadline passed.
    /// A request's sequences leave together; it is counted, and told, once.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut told: Vec<mpsc::Sender<Event>> = Vec::new();
        for i in (0..self.running.len()).rev() {
            let seq = &self.running[i];
            let gone = seq.events.is_closed();
            if !gone && now < seq.deadline {
                continue;
            }
            if !told.iter().any(|t| t.same_channel(&seq.events)) {
                told.push(seq.events.clone());
                if gone {
                    self.metrics.rejected("cancelled");
                } else {
                    self.metrics.rejected("deadline");
                    let _ = seq
                        .events
                        .try_send(Event::Failed(ServeError::DeadlineExceeded(format!(
                            "the deadline passed after {} generated tokens",
                            seq.generated
                        ))));
                }
            }
            self.remove(i);
        }
    }

    /// Frees slot `i`, moving the last sequence into it so slots stay contiguous.
    fn remove(&mut self, i: usize) {
        if let Some(last) = scheduler::vacate(i, self.running.len()) {
            let len = self.running[last].cached.max(1);
            self.cache.copy_slot(last, i, len);
        }
        let seq = self.running.swap_remove(i);
        self.used_tokens -= seq.prompt_tokens + seq.sampler.params().max_new_tokens;
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.running
            .with_label_values(&[&m.model])
            .set(self.running.len() as i64);
        let cached: usize = self.running.iter().map(|s| s.cached).sum();
        m.kv_used.with_label_values(&[&m.model]).set(cached as i64);
        m.budget_used
            .with_label_values(&[&m.model])
            .set(self.used_tokens as i64);
    }

    /// Prefills `jobs` (one row each) into the next free slots, copies each prompt's cache into
    /// the slots of its other sequences, and samples each sequence's first token.
    fn admit(&mut self, jobs: Vec<Job>) {
        let now = Instant::now();
        let mut next = self.running.len();
        let slots: Vec<Vec<usize>> = jobs
            .iter()
            .map(|j| {
                let s = (next..next + j.sequences).collect();
                next += j.sequences;
                s
            })
            .collect();
        let prompts: Vec<Vec<u32>> = jobs.iter().map(|j| j.prompt.clone()).collect();
        let span = tracing::info_span!(
            "lm_prefill",
            requests = jobs.len(),
            sequences = next - self.running.len(),
            prompt_tokens = prompts.iter().map(Vec::len).sum::<usize>(),
        );
        for job in &jobs {
            marquee_core::telemetry::link(&span, &job.span);
        }
        let started = Instant::now();
        let result = span.in_scope(|| self.prefill_into(&prompts, &slots));
        drop(span);
        self.metrics
            .observe_step("prefill", started.elapsed(), jobs.len());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for job in jobs {
                    let _ = job
                        .events
                        .try_send(Event::Failed(ServeError::model_failure(e.clone())));
                }
                return;
            }
        };
        for job in &jobs {
            self.metrics
                .core
                .queue_wait
                .with_label_values(&[&self.metrics.model])
                .observe(now.duration_since(job.arrived).as_secs_f64());
            self.metrics
                .prompt_tokens
                .with_label_values(&[&self.metrics.model])
                .inc_by(job.prompt.len() as u64);
        }
        let vocab = self.shape.vocab;
        for (row, job) in jobs.into_iter().enumerate() {
            for (index, &slot) in slots[row].iter().enumerate() {
                let params = SamplingParams {
                    seed: sequence_seed(job.params.seed, index),
                    ..job.params.clone()
                };
                let sampler = Sampler::new(params, &job.prompt, vocab, self.shape.eos);
                self.used_tokens += job.prompt.len() + job.params.max_new_tokens;
                debug_assert_eq!(slot, self.running.len());
                self.running.push(Seq {
                    index,
                    prompt_tokens: job.prompt.len(),
                    events: job.events.clone(),
                    arrived: job.arrived,
                    deadline: job.deadline,
                    span: job.span.clone(),
                    sampler,
                    detok: Detokenizer::new(&job.prompt),
                    text: TextStream::new(job.params.stop.clone()),
                    generated: 0,
                    cached: job.prompt.len(),
                    last: 0,
                    pending_ids: Vec::new(),
                    pending_logprobs: Vec::new(),
                    admitted: now,
                    first_token: None,
                    last_token: now,
                    done: false,
                });
                let mut logits_row = logits[row * vocab..(row + 1) * vocab].to_vec();
                self.advance(slot, &mut logits_row);
            }
        }
        self.finish_done();
        self.update_gauges();
    }

    /// One decode step for every running sequence.
    fn step(&mut self) {
        let tokens: Vec<i64> = self.running.iter().map(|s| i64::from(s.last)).collect();
        let positions: Vec<i64> = self.running.iter().map(|s| s.cached as i64).collect();
        let span = tracing::info_span!("lm_decode", sequences = tokens.len());
        for seq in self.running.iter().filter(|s| s.index == 0) {
            marquee_core::telemetry::link(&span, &seq.span);
        }
        let started = Instant::now();
        let result = span.in_scope(|| self.decode(&tokens, &positions));
        drop(span);
        self.metrics
            .observe_step("decode", started.elapsed(), tokens.len());
        match result {
            Ok(logits) => {
                let vocab = self.shape.vocab;
                for slot in 0..self.running.len() {
                    self.running[slot].cached += 1;
                    let mut row = logits[slot * vocab..(slot + 1) * vocab].to_vec();
                    self.advance(slot, &mut row);
                }
            }
            Err(e) => {
                for seq in &self.running {
                    let _ = seq
                        .events
                        .try_send(Event::Failed(ServeError::model_failure(e.clone())));
                }
                while !self.running.is_empty() {
                    self.remove(self.running.len() - 1);
                }
            }
        }
        self.finish_done();
        self.update_gauges();
    }

    /// Samples the next token of the sequence in `slot` from its logits, emits what text is
    /// safe to emit, and marks the sequence `done` when it finishes.
    fn advance(&mut self, slot: usize, row: &mut [f32]) {
        let now = Instant::now();
        let seq = &mut self.running[slot];
        let (token, logprob) = seq.sampler.next(row);
        seq.generated += 1;
        let m = &self.metrics;
        match seq.first_token {
            None => {
                seq.first_token = Some(now);
                m.ttft
                    .with_label_values(&[&m.model])
                    .observe(now.duration_since(seq.arrived).as_secs_f64());
            }
            Some(_) => m
                .inter_token
                .with_label_values(&[&m.model])
                .observe(now.duration_since(seq.last_token).as_secs_f64()),
        }
        seq.last_token = now;
        m.generated_tokens.with_label_values(&[&m.model]).inc();
        seq.last = token;
        let (text, finish) = if token == self.shape.eos {
            // Text the decoder still held (an incomplete character) ends the output.
            let rest = seq.detok.finish(&self.vocab);
            match seq.text.push(rest.as_bytes()) {
                Delta::Stopped(s) => (s, Some(Finish::Stop)),
                Delta::Text(mut s) => {
                    s.push_str(&seq.text.finish());
                    (s, Some(Finish::Eos))
                }
            }
        } else {
            seq.pending_ids.push(token);
            if seq.sampler.params().return_logprobs {
                seq.pending_logprobs.push(logprob);
            }
            let last = seq.generated >= seq.sampler.params().max_new_tokens;
            let mut fresh = seq.detok.push(&self.vocab, token);
            if last {
                fresh.push_str(&seq.detok.finish(&self.vocab));
            }
            match seq.text.push(fresh.as_bytes()) {
                Delta::Stopped(s) => (s, Some(Finish::Stop)),
                Delta::Text(mut s) => {
                    if last {
                        s.push_str(&seq.text.finish());
                        (s, Some(Finish::Length))
                    } else {
                        (s, None)
                    }
                }
            }
        };
        // An end with nothing left to say (an end-of-sequence token, which is not sent) sends no
        // empty message: the summary follows directly.
        if !text.is_empty() || (finish.is_some() && !seq.pending_ids.is_empty()) {
            let event = Event::Tokens {
                index: seq.index,
                text,
                ids: std::mem::take(&mut seq.pending_ids),
                logprobs: std::mem::take(&mut seq.pending_logprobs),
            };
            if seq.events.try_send(event).is_err() {
                // The caller is gone (the channel is sized so it is never full).
                seq.done = true;
                m.rejected("cancelled");
                return;
            }
        }
        if let Some(finish) = finish {
            let first = seq.first_token.unwrap_or(now);
            let after_first = seq.generated.saturating_sub(1).max(1) as u32;
            let summary = Summary {
                index: seq.index,
                finish,
                prompt_tokens: seq.prompt_tokens,
                generated_tokens: seq.generated,
                seed: seq.sampler.params().seed,
                queue: seq.admitted.duration_since(seq.arrived),
                time_to_first_token: first.duration_since(seq.arrived),
                total: now.duration_since(seq.arrived),
                mean_inter_token: now.duration_since(first) / after_first,
            };
            m.finished
                .with_label_values(&[&m.model, finish.as_str()])
                .inc();
            let _ = seq.events.try_send(Event::Finished(summary));
            seq.done = true;
        }
    }

    fn finish_done(&mut self) {
        for i in (0..self.running.len()).rev() {
            if self.running[i].done {
                self.remove(i);
            }
        }
    }

    /// Runs `prefill` on right-padded prompts and stores row `b`'s cache in every slot of
    /// `slots[b]`. Returns the logits at each prompt's last token.
    fn prefill_into(
        &mut self,
        prompts: &[Vec<u32>],
        slots: &[Vec<usize>],
    ) -> Result<Vec<f32>, String> {
        let batch = prompts.len();
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![0i64; batch * len];
        let mut mask = vec![0i64; batch * len];
        let mut positions = vec![0i64; batch * len];
        for (b, p) in prompts.iter().enumerate() {
            for (t, &id) in p.iter().enumerate() {
                ids[b * len + t] = i64::from(id);
                mask[b * len + t] = 1;
                positions[b * len + t] = t as i64;
            }
        }
        let device = self.cfg.device;
        let shape = [batch as i64, len as i64];
        let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        let out = self
            .module
            .method_is(
                "prefill",
                &[
                    IValue::Tensor(tensor(&ids)),
                    IValue::Tensor(tensor(&mask)),
                    IValue::Tensor(tensor(&positions)),
                ],
            )
            .map_err(|e| format!("prefill failed: {e}"))?;
        let (logits, state): (Tensor, Prefilled) =
            self.cache.parse_prefill(&self.shape, out, batch)?;
        for (b, p) in prompts.iter().enumerate() {
            let Some((&first, rest)) = slots[b].split_first() else {
                continue;
            };
            self.cache.store(&state, b, first, p.len());
            for &slot in rest {
                self.cache.copy_slot(first, slot, p.len());
            }
        }
        to_vec(&logits)
    }

    /// One `decode` over slots `0..tokens.len()`.
    fn decode(&mut self, tokens: &[i64], positions: &[i64]) -> Result<Vec<f32>, String> {
        let n = tokens.len();
        let span = positions.iter().copied().max().unwrap_or(0) as usize + 1;
        let device = self.cfg.device;
        let mut args = vec![
            IValue::Tensor(Tensor::from_slice(tokens).to_device(device)),
            IValue::Tensor(Tensor::from_slice(positions).to_device(device)),
        ];
        args.extend(self.cache.views(n, span));
        let out = self
            .module
            .method_is("decode", &args)
            .map_err(|e| format!("decode failed: {e}"))?;
        let IValue::Tensor(logits) = out else {
            return Err("decode must return a logits tensor".into());
        };
        self.metrics
            .core
            .batch_size
            .with_label_values(&[&self.metrics.model])
            .observe(n as f64);
        to_vec(&logits)
    }

    fn forward_logits(
        &mut self,
        ids: &[i64],
        batch: usize,
        len: usize,
    ) -> Result<Vec<f32>, ServeError> {
        let input = Tensor::from_slice(ids)
            .view([batch as i64, len as i64])
            .to_device(self.cfg.device);
        let out = self
            .module
            .forward_ts(&[input])
            .map_err(|e| ServeError::Internal(format!("forward failed: {e}")))?;
        to_vec(&out).map_err(ServeError::Internal)
    }
}

/// The scheduler's admission limits from the settings.
fn limits(l: &crate::LanguageSettings) -> scheduler::Limits {
    scheduler::Limits {
        max_batch: l.max_batch_size,
        max_total_tokens: l.max_total_tokens,
        max_prefill_tokens: l.max_prefill_tokens,
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, String> {
    let flat = t
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view([-1]);
    Vec::<f32>::try_from(&flat).map_err(|e| format!("cannot read logits: {e}"))
}
