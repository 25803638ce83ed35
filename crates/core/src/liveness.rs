//! Liveness of a service's worker threads: vision lanes, the language engine, recommendation
//! workers. Each worker runs its serving loop under [`Liveness::supervise`]; a worker that
//! panics marks the whole process dead, once, with the reason.
//!
//! A dead process fails liveness (`/healthz` 503, OIP `ServerLive` false) so the orchestrator
//! restarts it, and fails readiness (`grpc.health.v1` NOT_SERVING for `""` and the model,
//! `/readyz` 503, OIP `ServerReady`/`ModelReady` false) so balancers stop sending it calls and
//! do not restore it on the next health check. Death is final for the process: a thread that
//! panicked mid-batch may have left libtorch or the engine's state half-updated, and a restart
//! is the one recovery that is sure to be clean (what Kubernetes liveness probes are for).

use std::any::Any;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use tokio::sync::watch;

/// Why the process stopped being live: the first worker that died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// The worker's thread name, e.g. `lane-fashion_cnn-0`.
    pub worker: String,
    /// The model the worker served (its per-model health turns NOT_SERVING too).
    pub model: String,
    /// What happened, e.g. `panicked: index out of bounds`.
    pub reason: String,
}

impl fmt::Display for Death {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "worker `{}` of model `{}` {}",
            self.worker, self.model, self.reason
        )
    }
}

/// Shared liveness of one server's workers; cloning is cheap.
#[derive(Clone)]
pub struct Liveness {
    state: Arc<watch::Sender<Option<Death>>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Liveness")
            .field("death", &*self.state.borrow())
            .finish()
    }
}

impl Liveness {
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(None)),
        }
    }

    /// False once any worker died.
    pub fn is_alive(&self) -> bool {
        self.state.borrow().is_none()
    }

    /// The first worker death, if any.
    pub fn death(&self) -> Option<Death> {
        self.state.borrow().clone()
    }

    /// Marks the process dead. Only the first death is kept and logged: the others follow from
    /// it (or from the restart it asks for), and one clear line beats a cascade.
    pub fn fail(&self, death: Death) {
        let mut first = None;
        self.state.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            first = Some(death.clone());
            *state = Some(death);
            true
        });
        if let Some(d) = first {
            tracing::error!(
                worker = %d.worker,
                model = %d.model,
                reason = %d.reason,
                "a worker thread died: liveness fails and the server reports NOT_SERVING until it is restarted"
            );
        }
    }

    /// Resolves once a worker has died (at once if one already has).
    pub async fn died(&self) -> Death {
        let mut rx = self.state.subscribe();
        loop {
            if let Some(d) = rx.borrow_and_update().clone() {
                return d;
            }
            if rx.changed().await.is_err() {
                // Unreachable while `self` holds the sender; wait forever rather than spin.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs a worker's serving loop `body` on the current thread. If it panics, the process is
    /// marked dead with the panic message and `None` is returned so the caller can refuse what
    /// is still queued; a loop that returns is a normal exit (its queue was closed).
    pub fn supervise<T>(&self, model: &str, body: impl FnOnce() -> T) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(body)) {
            Ok(v) => Some(v),
            Err(payload) => {
                let worker = std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_string();
                self.fail(Death {
                    worker,
                    model: model.to_string(),
                    reason: format!("panicked: {}", panic_message(payload.as_ref())),
                });
                None
            }
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_panic_is_kept_and_later_ones_do_not_replace_it() {
        let live = Liveness::new();
        assert!(live.is_alive());
        assert_eq!(
            live.supervise("m", || 7),
            Some(7),
            "a normal exit is not a death"
        );
        assert!(live.is_alive());
        let worker = live.clone();
        std::thread::Builder::new()
            .name("lane-m-0".into())
            .spawn(move || worker.supervise("m", || panic!("bad output {}", 3)))
            .unwrap()
            .join()
            .unwrap();
        let death = live.died().await;
        assert_eq!(death.worker, "lane-m-0");
        assert_eq!(death.reason, "panicked: bad output 3");
        live.supervise("other", || panic!("second"));
        assert_eq!(
            live.death(),
            Some(death),
            "the first death stays the reason"
        );
        assert!(!live.is_alive());
    }
}
