//! The dynamic batcher: one bounded queue per model version, drained by its lanes.
//!
//! A lane (an OS thread owning one copy of the model) takes whatever is queued, up to the
//! batch cap (only its share when other lanes are idle). It waits up to `max_queue_delay` for more items only when every other lane is
//! busy: with an idle lane there is nothing to gain by holding a lone request back, so batching
//! adds no latency at low load and fills batches at high load. Items whose deadline passed or
//! whose caller left are dropped before compute. A full queue refuses at once with a retry hint.
//!
//! Work goes to the lane that went idle last (each lane sleeps on its own condition variable):
//! at low load one lane keeps serving with its weights and buffers in cache. A shared condition
//! variable wakes waiters in the order they slept, which alternates lanes and runs every
//! forward cold (measured, fashion_cnn one call at a time: 2.5k calls/s with 2 lanes woken in
//! turn, 4.5k with 1 lane).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanContext, TraceContextExt};
use tokio::sync::oneshot;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::ServeError;
use crate::metrics::Metrics;

/// Output tensors of one item: one flat `Vec<f32>` per model output, in output order.
pub type Outputs = Vec<Vec<f32>>;

/// Runs one batch of a model. Implemented over tch by the runner and by fakes in tests.
pub trait Executor: Send + 'static {
    /// `input` holds `rows` items back to back; returns one flat buffer per output holding
    /// `rows` items back to back.
    fn execute(&mut self, input: &[f32], rows: usize) -> Result<Vec<Vec<f32>>, String>;
}

/// One queued request: `rows` items of the model input, back to back.
pub struct Item {
    data: Vec<f32>,
    rows: usize,
    deadline: Instant,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Vec<Outputs>, ServeError>>,
    /// The OpenTelemetry context of the request span that queued this item, captured at
    /// enqueue (the lane thread has no current span), so the batch span can link to it.
    /// Invalid when tracing export is off.
    link: SpanContext,
}

struct State {
    items: VecDeque<Item>,
    rows: usize,
    closed: bool,
    /// Why the queue was closed when a lane died rather than for a swap or shutdown.
    failed: Option<String>,
    /// Lanes waiting for work, in the order they went idle: the last is woken first.
    idle: Vec<usize>,
    /// Lanes holding a partial batch while they wait for more items (`max_queue_delay`).
    collecting: Vec<usize>,
}

/// Batching limits of one model version.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub model: String,
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    pub queue_capacity: usize,
    pub lanes: usize,
    /// Elements per input item.
    pub item_len: usize,
    /// Elements per item of each output.
    pub output_lens: Vec<usize>,
}

/// The queue shared by a model version's request handlers and lanes.
pub struct BatchQueue {
    cfg: QueueConfig,
    state: Mutex<State>,
    /// One per lane (a lane's id is its registration order, modulo their number).
    cvs: Vec<Condvar>,
    registered: AtomicUsize,
    /// Batch cap in force: `max_batch_size`, lowered by warm-up profiling.
    max_batch: AtomicUsize,
    /// Moving average of compute time per item, in ns, for retry hints.
    ns_per_item: AtomicU64,
    metrics: Metrics,
}

impl BatchQueue {
    pub fn new(cfg: QueueConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            max_batch: AtomicUsize::new(cfg.max_batch_size),
            cvs: (0..cfg.lanes.max(1)).map(|_| Condvar::new()).collect(),
            cfg,
            state: Mutex::new(State {
                items: VecDeque::new(),
                rows: 0,
                closed: false,
                failed: None,
                idle: Vec::new(),
                collecting: Vec::new(),
            }),
            registered: AtomicUsize::new(0),
            ns_per_item: AtomicU64::new(1_000_000),
            metrics,
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Caps batches at `n` items (from warm-up profiling).
    pub fn set_max_batch(&self, n: usize) {
        self.max_batch
            .store(n.clamp(1, self.cfg.max_batch_size), Ordering::Relaxed);
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A lane that panicked mid-batch leaves the queue consistent (items are popped before
        // compute), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `rows` items and returns the receiver of their outputs. Refuses at once when the
    /// queue is full or closed.
    pub fn submit(
        &self,
        data: Vec<f32>,
        rows: usize,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Result<Vec<Outputs>, ServeError>>, ServeError> {
        debug_assert_eq!(
            data.len(),
            rows * self.cfg.item_len,
            "validated before queueing"
        );
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if st.closed {
            return Err(ServeError::unavailable(match &st.failed {
                Some(why) => format!(
                    "model `{}` is out of service on this replica ({why}); retry on another",
                    self.cfg.model
                ),
                None => format!(
                    "model `{}` is shutting down or being replaced; retry",
                    self.cfg.model
                ),
            }));
        }
        if st.rows + rows > self.cfg.queue_capacity {
            let queued = st.rows;
            drop(st);
            self.metrics
                .rejected
                .with_label_values(&[&self.cfg.model, "queue_full"])
                .inc();
            let per_item = Duration::from_nanos(self.ns_per_item.load(Ordering::Relaxed));
            let retry_after = (per_item * queued as u32 / self.cfg.lanes.max(1) as u32)
                .clamp(Duration::from_millis(5), Duration::from_secs(5));
            return Err(ServeError::Overloaded {
                message: format!(
                    "model `{}` queue is full: {queued} items queued, capacity (`batching.queue_capacity`) is {}, this request adds {rows}",
                    self.cfg.model, self.cfg.queue_capacity
                ),
                retry_after,
            });
        }
        st.rows += rows;
        st.items.push_back(Item {
            data,
            rows,
            deadline,
            enqueued: Instant::now(),
            reply: tx,
            link: tracing::Span::current()
                .context()
                .span()
                .span_context()
                .clone(),
        });
        self.metrics
            .queue_depth
            .with_label_values(&[&self.cfg.model])
            .set(st.rows as i64);
        self.wake_for_work(&st);
        drop(st);
        Ok(rx)
    }

    /// Wakes the lane that went idle last, or, with none idle, the lanes collecting a batch.
    fn wake_for_work(&self, st: &State) {
        if let Some(&lane) = st.idle.last() {
            self.cvs[lane].notify_one();
        } else {
            for &lane in &st.collecting {
                self.cvs[lane].notify_one();
            }
        }
    }

    fn wake_all(&self) {
        for cv in &self.cvs {
            cv.notify_all();
        }
    }

    /// This lane's id: registration order, modulo the configured lanes (lanes beyond them share
    /// a condition variable, still correct, only not last-idle-first among themselves).
    fn register_lane(&self) -> usize {
        self.registered.fetch_add(1, Ordering::Relaxed) % self.cvs.len()
    }

    /// Stops accepting items; lanes finish what is queued, then exit.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake_all();
    }

    /// Closes the queue because a lane died: new requests are refused at once with `why`
    /// instead of waiting for lanes that may never come; the surviving lanes drain what is
    /// queued.
    pub fn fail(&self, why: String) {
        let mut st = self.lock();
        st.closed = true;
        st.failed.get_or_insert(why);
        drop(st);
        self.wake_all();
    }

    /// Blocks lane `lane` until a batch is available; `None` once closed and drained.
    fn next_batch(&self, lane: usize) -> Option<Vec<Item>> {
        let mut st = self.lock();
        st.idle.push(lane);
        let stop_idling = |st: &mut State| {
            if let Some(i) = st.idle.iter().rposition(|&l| l == lane) {
                st.idle.remove(i);
            }
        };
        while st.items.is_empty() {
            if st.closed {
                stop_idling(&mut st);
                return None;
            }
            st = self.cvs[lane].wait(st).unwrap_or_else(|p| p.into_inner());
        }
        stop_idling(&mut st);
        let idle_lanes = st.idle.len();
        let max = self.max_batch();
        let mut batch = Vec::new();
        let mut rows = 0;
        // With other lanes idle, split what is queued between them instead of running it all
        // on this lane while they wait (measured: at c=8 on fashion_cnn, taking everything ran
        // 7.3k calls/s against 7.8k for one item per lane).
        let share = st.rows.div_ceil(idle_lanes + 1).clamp(1, max);
        take(&mut st, &mut batch, &mut rows, share);
        // Waiting only pays when no other lane could run these items right now.
        if rows < max && !self.cfg.max_queue_delay.is_zero() && idle_lanes == 0 {
            let until = batch[0].enqueued + self.cfg.max_queue_delay;
            st.collecting.push(lane);
            while rows < max && !st.closed {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                st = self.cvs[lane]
                    .wait_timeout(st, until - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                take(&mut st, &mut batch, &mut rows, max);
            }
            if let Some(i) = st.collecting.iter().position(|&l| l == lane) {
                st.collecting.remove(i);
            }
        }
        st.rows -= rows;
        self.metrics
            .queue_depth
            .with_label_values(&[&self.cfg.model])
            .set(st.rows as i64);
        if !st.items.is_empty() {
            // More work than this batch takes: hand it to another lane.
            self.wake_for_work(&st);
        }
        Some(batch)
    }

    fn record_compute(&self, rows: usize, took: Duration) {
        let per_item = took.as_nanos() as u64 / rows.max(1) as u64;
        let old = self.ns_per_item.load(Ordering::Relaxed);
        self.ns_per_item
            .store((old * 7 + per_item) / 8, Ordering::Relaxed);
    }
}

fn take(st: &mut State, batch: &mut Vec<Item>, rows: &mut usize, max: usize) {
    while let Some(front) = st.items.front() {
        if !batch.is_empty() && *rows + front.rows > max {
            break;
        }
        *rows += front.rows;
        batch.push(st.items.pop_front().expect("front exists, this is a bug"));
    }
}

/// Serves batches from `queue` with `exec` until the queue is closed and drained. Runs on a
/// dedicated OS thread, never on the async runtime.
pub fn run_lane<E: Executor>(queue: &BatchQueue, exec: &mut E) {
    let cfg = queue.config().clone();
    let m = &queue.metrics;
    let model = [cfg.model.as_str()];
    let mut input = Vec::new();
    let lane = queue.register_lane();
    while let Some(batch) = queue.next_batch(lane) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for item in batch {
            if item.reply.is_closed() {
                m.rejected
                    .with_label_values(&[&cfg.model, "cancelled"])
                    .inc();
            } else if item.deadline <= now {
                m.rejected
                    .with_label_values(&[&cfg.model, "deadline"])
                    .inc();
                let waited = now - item.enqueued;
                let _ = item.reply.send(Err(ServeError::DeadlineExceeded(format!(
                    "deadline expired after {} ms in the `{}` queue; the request was not computed",
                    waited.as_millis(),
                    cfg.model
                ))));
            } else {
                m.queue_wait
                    .with_label_values(&model)
                    .observe((now - item.enqueued).as_secs_f64());
                live.push(item);
            }
        }
        if live.is_empty() {
            continue;
        }
        let rows: usize = live.iter().map(|i| i.rows).sum();
        // One batch serves many requests, possibly of many traces: it is a root span with an
        // OpenTelemetry link to each request span rather than the child of any one of them.
        let span = tracing::info_span!("batch", model = %cfg.model, rows, items = live.len());
        for item in &live {
            if item.link.is_valid() {
                span.add_link(item.link.clone());
            }
        }
        let _enter = span.enter();
        input.clear();
        for item in &live {
            input.extend_from_slice(&item.data);
        }
        let started = Instant::now();
        let result = exec.execute(&input, rows);
        let took = started.elapsed();
        m.compute
            .with_label_values(&model)
            .observe(took.as_secs_f64());
        m.batches.with_label_values(&model).inc();
        m.batch_items.with_label_values(&model).inc_by(rows as u64);
        m.batch_size.with_label_values(&model).observe(rows as f64);
        queue.record_compute(rows, took);
        match result.and_then(|outs| check_outputs(&cfg, outs, rows)) {
            Ok(outs) => {
                let mut offset = 0;
                for item in live {
                    let per_item: Vec<Outputs> = (0..item.rows)
                        .map(|r| {
                            outs.iter()
                                .zip(&cfg.output_lens)
                                .map(|(o, len)| {
                                    o[(offset + r) * len..(offset + r + 1) * len].to_vec()
                                })
                                .collect()
                        })
                        .collect();
                    offset += item.rows;
                    let _ = item.reply.send(Ok(per_item));
                }
            }
            Err(e) if crate::error::is_out_of_memory(&e) => {
                // The batch did not fit in the memory left (a GPU shared with other work, a
                // fragmented cache): the callers may retry, the lane carries on.
                m.rejected
                    .with_label_values(&[&cfg.model, "out_of_memory"])
                    .inc_by(live.len() as u64);
                tracing::warn!(model = %cfg.model, rows, error = %e, "a batch ran out of memory");
                for item in live {
                    let _ = item.reply.send(Err(ServeError::model_failure(format!(
                        "model `{}`, a batch of {rows}: {e}",
                        cfg.model
                    ))));
                }
            }
            Err(e) => {
                for item in live {
                    let _ = item.reply.send(Err(ServeError::Internal(format!(
                        "model `{}` failed on a batch of {rows}: {e}",
                        cfg.model
                    ))));
                }
            }
        }
    }
}

fn check_outputs(
    cfg: &QueueConfig,
    outs: Vec<Vec<f32>>,
    rows: usize,
) -> Result<Vec<Vec<f32>>, String> {
    if outs.len() != cfg.output_lens.len() {
        return Err(format!(
            "model returned {} outputs, model.toml declares {}",
            outs.len(),
            cfg.output_lens.len()
        ));
    }
    for (i, (o, len)) in outs.iter().zip(&cfg.output_lens).enumerate() {
        if o.len() != rows * len {
            return Err(format!(
                "output {i} has {} values, expected {rows} × {len}",
                o.len()
            ));
        }
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Doubles its input; reports each batch size; optionally blocks until released.
    struct Fake {
        sizes: mpsc::Sender<usize>,
        gate: Option<mpsc::Receiver<()>>,
    }

    impl Executor for Fake {
        fn execute(&mut self, input: &[f32], rows: usize) -> Result<Vec<Vec<f32>>, String> {
            if let Some(g) = &self.gate {
                g.recv().map_err(|e| e.to_string())?;
            }
            self.sizes.send(rows).unwrap();
            Ok(vec![input.iter().map(|x| x * 2.0).collect()])
        }
    }

    fn cfg(max_batch: usize, delay_ms: u64, capacity: usize, lanes: usize) -> QueueConfig {
        QueueConfig {
            model: "fake".into(),
            max_batch_size: max_batch,
            max_queue_delay: Duration::from_millis(delay_ms),
            queue_capacity: capacity,
            lanes,
            item_len: 2,
            output_lens: vec![2],
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn queued_items_form_one_batch_and_each_gets_its_own_answer() {
        let q = BatchQueue::new(cfg(8, 0, 64, 1), Metrics::new());
        let rxs: Vec<_> = (0..5)
            .map(|i| q.submit(vec![i as f32, 10.0 + i as f32], 1, far()).unwrap())
            .collect();
        let (tx, sizes) = mpsc::channel();
        let lane_q = q.clone();
        let lane = std::thread::spawn(move || {
            run_lane(
                &lane_q,
                &mut Fake {
                    sizes: tx,
                    gate: None,
                },
            )
        });
        for (i, rx) in rxs.into_iter().enumerate() {
            let out = rx.await.unwrap().unwrap();
            assert_eq!(
                out,
                vec![vec![vec![i as f32 * 2.0, (10.0 + i as f32) * 2.0]]]
            );
        }
        assert_eq!(
            sizes.recv().unwrap(),
            5,
            "all five queued items ran as one batch"
        );
        q.close();
        lane.join().unwrap();
    }

    #[tokio::test]
    async fn batches_never_exceed_the_cap_and_multi_row_items_stay_whole() {
        let q = BatchQueue::new(cfg(4, 0, 64, 1), Metrics::new());
        q.set_max_batch(3);
        let rx_a = q.submit(vec![0.0; 4], 2, far()).unwrap();
        let rx_b = q.submit(vec![1.0; 4], 2, far()).unwrap();
        let (tx, sizes) = mpsc::channel();
        let lane_q = q.clone();
        let lane = std::thread::spawn(move || {
            run_lane(
                &lane_q,
                &mut Fake {
                    sizes: tx,
                    gate: None,
                },
            )
        });
        assert_eq!(rx_a.await.unwrap().unwrap().len(), 2);
        assert_eq!(rx_b.await.unwrap().unwrap()[1], vec![vec![2.0, 2.0]]);
        assert_eq!(
            (sizes.recv().unwrap(), sizes.recv().unwrap()),
            (2, 2),
            "2+2 > cap 3: two batches"
        );
        q.close();
        lane.join().unwrap();
    }

    #[tokio::test]
    async fn full_queue_is_refused_with_a_retry_hint() {
        let q = BatchQueue::new(cfg(4, 0, 3, 1), Metrics::new());
        let _a = q.submit(vec![0.0; 4], 2, far()).unwrap();
        let err = q.submit(vec![0.0; 4], 2, far()).unwrap_err();
        match err {
            ServeError::Overloaded {
                message,
                retry_after,
            } => {
                assert!(
                    message.contains("capacity (`batching.queue_capacity`) is 3"),
                    "{message}"
                );
                assert!(retry_after >= Duration::from_millis(5));
            }
            other => panic!("expected Overloaded, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn expired_and_abandoned_items_are_never_computed() {
        let q = BatchQueue::new(cfg(8, 0, 64, 1), Metrics::new());
        let expired = q.submit(vec![0.0; 2], 1, Instant::now()).unwrap();
        let abandoned = q.submit(vec![0.0; 2], 1, far()).unwrap();
        drop(abandoned);
        let kept = q.submit(vec![3.0; 2], 1, far()).unwrap();
        let (tx, sizes) = mpsc::channel();
        let lane_q = q.clone();
        let lane = std::thread::spawn(move || {
            run_lane(
                &lane_q,
                &mut Fake {
                    sizes: tx,
                    gate: None,
                },
            )
        });
        assert!(matches!(
            expired.await.unwrap(),
            Err(ServeError::DeadlineExceeded(_))
        ));
        assert_eq!(kept.await.unwrap().unwrap(), vec![vec![vec![6.0, 6.0]]]);
        assert_eq!(sizes.recv().unwrap(), 1, "only the live item was computed");
        let m = &q.metrics;
        assert_eq!(m.rejected.with_label_values(&["fake", "deadline"]).get(), 1);
        assert_eq!(
            m.rejected.with_label_values(&["fake", "cancelled"]).get(),
            1
        );
        q.close();
        lane.join().unwrap();
    }

    #[tokio::test]
    async fn a_busy_lane_lets_the_queue_fill_a_batch_within_the_delay() {
        let q = BatchQueue::new(cfg(4, 200, 64, 1), Metrics::new());
        let (tx, sizes) = mpsc::channel();
        let lane_q = q.clone();
        let lane = std::thread::spawn(move || {
            run_lane(
                &lane_q,
                &mut Fake {
                    sizes: tx,
                    gate: None,
                },
            )
        });
        // The single lane is the only lane, so it waits up to 200 ms for the batch to fill.
        let rxs: Vec<_> = (0..4)
            .map(|_| q.submit(vec![1.0; 2], 1, far()).unwrap())
            .collect();
        for rx in rxs {
            rx.await.unwrap().unwrap();
        }
        assert_eq!(
            sizes.recv().unwrap(),
            4,
            "the lane waited and took all four"
        );
        q.close();
        lane.join().unwrap();
    }

    /// Fails every batch of more than one row the way libtorch's allocator does.
    struct Starved;

    impl Executor for Starved {
        fn execute(&mut self, input: &[f32], rows: usize) -> Result<Vec<Vec<f32>>, String> {
            if rows > 1 {
                return Err(format!(
                    "CUDA out of memory. Tried to allocate {} GiB.",
                    rows * 8
                ));
            }
            Ok(vec![input.to_vec()])
        }
    }

    #[tokio::test]
    async fn out_of_memory_is_resource_exhausted_and_the_lane_carries_on() {
        let metrics = Metrics::new();
        let q = BatchQueue::new(cfg(8, 0, 64, 1), metrics.clone());
        let rx = q.submit(vec![1.0; 4], 2, far()).unwrap();
        let lane = {
            let q = q.clone();
            std::thread::spawn(move || run_lane(&q, &mut Starved))
        };
        let err = rx.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(err.to_string().contains("out of memory"), "{err}");
        // The same lane still answers what fits.
        let ok = q.submit(vec![3.0, 4.0], 1, far()).unwrap().await.unwrap();
        assert_eq!(ok.unwrap(), vec![vec![vec![3.0, 4.0]]]);
        assert_eq!(
            metrics
                .rejected
                .with_label_values(&["fake", "out_of_memory"])
                .get(),
            1
        );
        q.close();
        lane.join().unwrap();
    }

    /// Answers each row with the id of the thread (lane) that ran it.
    struct WhichLane(Arc<Mutex<Vec<std::thread::ThreadId>>>);

    impl Executor for WhichLane {
        fn execute(&mut self, input: &[f32], rows: usize) -> Result<Vec<Vec<f32>>, String> {
            self.0.lock().unwrap().push(std::thread::current().id());
            Ok(vec![input[..rows * 2].to_vec()])
        }
    }

    #[tokio::test]
    async fn one_call_at_a_time_stays_on_the_lane_that_went_idle_last() {
        let q = BatchQueue::new(cfg(8, 0, 64, 2), Metrics::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let lanes: Vec<_> = (0..2)
            .map(|_| {
                let (q, seen) = (q.clone(), seen.clone());
                std::thread::spawn(move || run_lane(&q, &mut WhichLane(seen)))
            })
            .collect();
        // Both lanes asleep before the first call.
        while q.lock().idle.len() < 2 {
            std::thread::yield_now();
        }
        for i in 0..20 {
            let rx = q.submit(vec![i as f32, 0.0], 1, far()).unwrap();
            rx.await.unwrap().unwrap();
            // The lane that answered is idle again before the next call, as between the calls
            // of a client that waits for each answer.
            while q.lock().idle.len() < 2 {
                std::thread::yield_now();
            }
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 20);
        assert!(
            seen.iter().all(|t| *t == seen[0]),
            "every call ran on the warm lane, none alternated: {seen:?}"
        );
        q.close();
        for l in lanes {
            l.join().unwrap();
        }
    }

    #[tokio::test]
    async fn closing_drains_what_was_queued() {
        let q = BatchQueue::new(cfg(2, 0, 64, 1), Metrics::new());
        let (gate_tx, gate_rx) = mpsc::channel();
        let rxs: Vec<_> = (0..3)
            .map(|_| q.submit(vec![1.0; 2], 1, far()).unwrap())
            .collect();
        q.close();
        assert!(matches!(
            q.submit(vec![1.0; 2], 1, far()),
            Err(ServeError::Unavailable { .. })
        ));
        let (tx, _sizes) = mpsc::channel();
        let lane_q = q.clone();
        let lane = std::thread::spawn(move || {
            run_lane(
                &lane_q,
                &mut Fake {
                    sizes: tx,
                    gate: Some(gate_rx),
                },
            )
        });
        gate_tx.send(()).unwrap();
        gate_tx.send(()).unwrap();
        for rx in rxs {
            assert!(
                rx.await.unwrap().is_ok(),
                "queued work finishes after close"
            );
        }
        lane.join().unwrap();
    }
}
