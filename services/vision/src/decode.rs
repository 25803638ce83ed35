//! The decode pool: a fixed number of workers turning encoded images into tensors, with a
//! bounded queue in front, that only works for callers still waiting.
//!
//! Before it, every image went to tokio's blocking pool, whose queue has no bound and whose
//! tasks cannot be cancelled: 50 `ClassifyBatch` calls of large PNGs with a 100 ms deadline
//! kept the decoders busy for minutes on work nobody would read. Now:
//! - a call is admitted only if all its images fit the queue (`vision.decode_queue`), else it
//!   is refused at once with `RESOURCE_EXHAUSTED` and `RetryInfo`;
//! - an image waits for one of `vision.decode_workers` permits, and stops waiting when its
//!   deadline passes or its call is dropped (the client left or timed out);
//! - a worker checks, before the decode and between its steps, that the call is still there
//!   and its deadline not passed, and stops otherwise.
//!
//! Metrics (closed label sets): `marquee_vision_decode_queue_depth`,
//! `marquee_vision_decode_workers_busy`, `marquee_vision_decodes_started_total`, and
//! `marquee_vision_decodes_total{outcome}` with `outcome` one of [`Outcome`]'s labels.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use marquee_core::ServeError;
use marquee_core::metrics::Registrar;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::preprocess::ImageError;

/// What a refused caller is told to wait: about one decode of a large photo.
pub const RETRY_AFTER: Duration = Duration::from_millis(100);

/// How an image left the pool: the `outcome` label of `marquee_vision_decodes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Decoded into a tensor.
    Ok,
    /// Decoded far enough to be refused (limits, corrupt data).
    Refused,
    /// Not admitted: the queue was full.
    QueueFull,
    /// Skipped or stopped because its deadline passed.
    Deadline,
    /// Skipped or stopped because its call was dropped.
    Cancelled,
    /// The decoder panicked (a bug in a codec); the worker survived.
    Panicked,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Self::Ok,
        Self::Refused,
        Self::QueueFull,
        Self::Deadline,
        Self::Cancelled,
        Self::Panicked,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::QueueFull => "queue_full",
            Self::Deadline => "deadline",
            Self::Cancelled => "cancelled",
            Self::Panicked => "panicked",
        }
    }
}

/// Why an admitted image produced no tensor.
#[derive(Debug)]
pub enum DecodeError {
    Image(ImageError),
    DeadlineExceeded,
    Cancelled,
    Panicked(String),
}

#[derive(Clone)]
struct DecodeMetrics {
    queue_depth: IntGauge,
    busy: IntGauge,
    started: IntCounter,
    outcomes: IntCounterVec,
}

impl DecodeMetrics {
    fn register(registry: &Registry) -> Self {
        // Fixed names and labels: registering them can only fail on a bug.
        let r = Registrar(registry);
        let bug = "valid, unique metric, this is a bug";
        let gauge = |name: &str, help: &str| r.register(IntGauge::new(name, help)?);
        let queue_depth = gauge(
            "marquee_vision_decode_queue_depth",
            "Images admitted and waiting for a decode worker.",
        )
        .expect(bug);
        let busy = gauge(
            "marquee_vision_decode_workers_busy",
            "Decode workers decoding an image.",
        )
        .expect(bug);
        let started = r
            .counter(
                "marquee_vision_decodes_started_total",
                "Images whose decode a worker began.",
            )
            .expect(bug);
        let outcomes = r
            .counter_vec(
                "marquee_vision_decodes_total",
                "Images that left the decode pool, by outcome.",
                &["outcome"],
            )
            .expect(bug);
        // Every label value exists from the start, so a dashboard sees zeros, not gaps.
        for o in Outcome::ALL {
            outcomes.with_label_values(&[o.label()]);
        }
        Self {
            queue_depth,
            busy,
            started,
            outcomes,
        }
    }

    fn count(&self, outcome: Outcome, n: u64) {
        self.outcomes
            .with_label_values(&[outcome.label()])
            .inc_by(n);
    }
}

struct Inner {
    workers: Arc<Semaphore>,
    worker_count: usize,
    queue_limit: usize,
    waiting: AtomicUsize,
    metrics: DecodeMetrics,
}

/// A cloneable handle to the pool.
#[derive(Clone)]
pub struct DecodePool {
    inner: Arc<Inner>,
}

/// One admitted image's place in the queue, held until a worker takes it (or the call ends).
pub struct Ticket {
    inner: Arc<Inner>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.inner.waiting.fetch_sub(1, Ordering::AcqRel);
        self.inner.metrics.queue_depth.dec();
    }
}

/// Counts an image `cancelled` if its waiting future is dropped before a worker took it.
struct Waiting<'a> {
    metrics: &'a DecodeMetrics,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.count(Outcome::Cancelled, 1);
        }
    }
}

/// Marks a worker busy for as long as it lives (also when the decoder panics).
struct Busy<'a>(&'a IntGauge);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl DecodePool {
    /// `workers` decodes at a time, at most `queue` images waiting; metrics go to `registry`.
    pub fn new(workers: usize, queue: usize, registry: &Registry) -> Self {
        Self {
            inner: Arc::new(Inner {
                workers: Arc::new(Semaphore::new(workers)),
                worker_count: workers,
                queue_limit: queue,
                waiting: AtomicUsize::new(0),
                metrics: DecodeMetrics::register(registry),
            }),
        }
    }

    /// Admits a call's `n` images into the queue, all or none: a batch is not half-served
    /// because the queue filled up between its images.
    pub fn admit(&self, n: usize) -> Result<Vec<Ticket>, ServeError> {
        let inner = &self.inner;
        let mut waiting = inner.waiting.load(Ordering::Acquire);
        loop {
            if waiting + n > inner.queue_limit {
                inner.metrics.count(Outcome::QueueFull, n as u64);
                return Err(ServeError::Overloaded {
                    message: format!(
                        "the image decode queue is full: {waiting} images wait for {} decode workers and this call brings {n}; the limit (`vision.decode_queue`) is {}",
                        inner.worker_count, inner.queue_limit
                    ),
                    retry_after: RETRY_AFTER,
                });
            }
            match inner.waiting.compare_exchange_weak(
                waiting,
                waiting + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => waiting = now,
            }
        }
        inner.metrics.queue_depth.add(n as i64);
        Ok((0..n)
            .map(|_| Ticket {
                inner: inner.clone(),
            })
            .collect())
    }

    /// Runs `job` on a decode worker once one is free, if the caller is still there and
    /// `deadline` has not passed. `job` gets a `keep_going` check to call between its steps.
    ///
    /// Dropping the returned future (the call ended) withdraws the image from the queue, or,
    /// if a worker already has it, tells the worker to stop at its next check.
    pub async fn run<T, F>(
        &self,
        ticket: Ticket,
        deadline: Instant,
        job: F,
    ) -> Result<T, DecodeError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Fn() -> bool) -> Result<T, ImageError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let mut waiting = Waiting {
            metrics: &self.inner.metrics,
            armed: true,
        };
        let permit =
            match tokio::time::timeout_at(deadline.into(), inner.workers.clone().acquire_owned())
                .await
            {
                Ok(permit) => permit.expect("the decode semaphore is never closed, this is a bug"),
                Err(_) => {
                    waiting.armed = false;
                    inner.metrics.count(Outcome::Deadline, 1);
                    return Err(DecodeError::DeadlineExceeded);
                }
            };
        // From here the worker task accounts for the image, even if this future is dropped.
        waiting.armed = false;
        drop(ticket);
        let gone = CancellationToken::new();
        let _cancel_on_drop = gone.clone().drop_guard();
        let task = tokio::task::spawn_blocking(move || {
            // The permit lives as long as the work, not as long as the caller: a dropped call
            // must not let another decode start while this one still runs.
            let _permit = permit;
            let metrics = &inner.metrics;
            let stopped = || {
                if Instant::now() >= deadline {
                    Outcome::Deadline
                } else {
                    Outcome::Cancelled
                }
            };
            let keep_going = || !gone.is_cancelled() && Instant::now() < deadline;
            // The call may have ended while this task waited for a thread.
            if !keep_going() {
                let o = stopped();
                metrics.count(o, 1);
                return Err(o);
            }
            metrics.started.inc();
            metrics.busy.inc();
            let _busy = Busy(&metrics.busy);
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&keep_going)));
            let outcome = match &result {
                Ok(Ok(_)) => Outcome::Ok,
                Ok(Err(ImageError::Abandoned)) => stopped(),
                Ok(Err(_)) => Outcome::Refused,
                Err(_) => Outcome::Panicked,
            };
            metrics.count(outcome, 1);
            match result {
                Ok(r) => Ok(r),
                Err(_) => Err(Outcome::Panicked),
            }
        });
        match task.await {
            Ok(Ok(Ok(t))) => Ok(t),
            Ok(Ok(Err(ImageError::Abandoned)))
            | Ok(Err(Outcome::Deadline | Outcome::Cancelled)) => {
                if Instant::now() >= deadline {
                    Err(DecodeError::DeadlineExceeded)
                } else {
                    Err(DecodeError::Cancelled)
                }
            }
            Ok(Ok(Err(e))) => Err(DecodeError::Image(e)),
            Ok(Err(_)) => Err(DecodeError::Panicked("the image decoder panicked".into())),
            Err(e) => Err(DecodeError::Panicked(format!("decode task failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(registry: &Registry, name: &str, outcome: Option<&str>) -> f64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| outcome.is_none_or(|o| m.get_label().iter().any(|l| l.value() == o)))
            .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
            .sum()
    }

    #[tokio::test]
    async fn a_full_queue_refuses_the_whole_call_with_retry_info() {
        let registry = Registry::new();
        let pool = DecodePool::new(1, 4, &registry);
        let held = pool.admit(3).unwrap();
        let err = pool.admit(2).err().expect("3 + 2 > 4");
        assert!(matches!(
            err,
            ServeError::Overloaded {
                retry_after: RETRY_AFTER,
                ..
            }
        ));
        assert!(err.to_string().contains("`vision.decode_queue`"), "{err}");
        assert_eq!(
            value(&registry, "marquee_vision_decode_queue_depth", None),
            3.0
        );
        drop(held);
        assert_eq!(
            value(&registry, "marquee_vision_decode_queue_depth", None),
            0.0
        );
        assert_eq!(pool.admit(4).unwrap().len(), 4);
        assert_eq!(
            value(
                &registry,
                "marquee_vision_decodes_total",
                Some("queue_full")
            ),
            2.0
        );
    }

    #[tokio::test]
    async fn an_expired_deadline_skips_the_work() {
        let registry = Registry::new();
        let pool = DecodePool::new(1, 4, &registry);
        let ticket = pool.admit(1).unwrap().pop().unwrap();
        let past = Instant::now() - Duration::from_millis(1);
        let r = pool
            .run(ticket, past, |_| -> Result<(), ImageError> {
                panic!("must not run")
            })
            .await;
        assert!(matches!(r, Err(DecodeError::DeadlineExceeded)), "{r:?}");
        assert_eq!(
            value(&registry, "marquee_vision_decodes_started_total", None),
            0.0
        );
        assert_eq!(
            value(&registry, "marquee_vision_decodes_total", Some("deadline")),
            1.0
        );
    }

    #[tokio::test]
    async fn a_panicking_decoder_is_contained() {
        let registry = Registry::new();
        let pool = DecodePool::new(1, 4, &registry);
        let ticket = pool.admit(1).unwrap().pop().unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        let r = pool
            .run(ticket, later, |_| -> Result<(), ImageError> {
                panic!("codec bug")
            })
            .await;
        assert!(matches!(r, Err(DecodeError::Panicked(_))), "{r:?}");
        assert_eq!(
            value(&registry, "marquee_vision_decode_workers_busy", None),
            0.0
        );
        // The worker's permit came back.
        let ticket = pool.admit(1).unwrap().pop().unwrap();
        assert_eq!(pool.run(ticket, later, |_| Ok(7)).await.unwrap(), 7);
    }
}
