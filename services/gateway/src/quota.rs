//! Tenant quotas (token-bucket rate and in-flight caps, refused at once with a retry hint) and
//! the weighted fair queue that shares saturated backend capacity between tenants.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marquee_core::ServeError;
use tokio::sync::oneshot;

use crate::config::Tenant;

struct TenantState {
    cfg: Tenant,
    /// (tokens, last refill)
    bucket: Mutex<(f64, Instant)>,
    in_flight: AtomicUsize,
}

/// Per-tenant admission: rate and concurrency.
pub struct Quotas {
    tenants: HashMap<String, Arc<TenantState>>,
}

/// Holds one in-flight slot of a tenant until dropped.
pub struct InFlight {
    state: Arc<TenantState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Quotas {
    pub fn new(tenants: &BTreeMap<String, Tenant>) -> Self {
        let now = Instant::now();
        Self {
            tenants: tenants
                .iter()
                .map(|(name, cfg)| {
                    (
                        name.clone(),
                        Arc::new(TenantState {
                            cfg: cfg.clone(),
                            bucket: Mutex::new((cfg.burst, now)),
                            in_flight: AtomicUsize::new(0),
                        }),
                    )
                })
                .collect(),
        }
    }

    /// Admits one call of `tenant` or refuses it with `RESOURCE_EXHAUSTED` and `RetryInfo`.
    pub fn admit(&self, tenant: &str) -> Result<InFlight, ServeError> {
        let state = self.tenants.get(tenant).ok_or_else(|| {
            ServeError::PermissionDenied(format!(
                "tenant `{tenant}` is not configured on this gateway"
            ))
        })?;
        let cfg = &state.cfg;
        if cfg.rate_per_s > 0.0 {
            let mut b = state.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            b.0 = (b.0 + (now - b.1).as_secs_f64() * cfg.rate_per_s).min(cfg.burst);
            b.1 = now;
            if b.0 < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - b.0) / cfg.rate_per_s);
                return Err(ServeError::Overloaded {
                    message: format!(
                        "tenant `{tenant}` is over its rate of {} calls/s (burst {}); retry in {} ms",
                        cfg.rate_per_s,
                        cfg.burst,
                        wait.as_millis().max(1)
                    ),
                    retry_after: wait,
                });
            }
            b.0 -= 1.0;
        }
        let now = state.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = InFlight {
            state: state.clone(),
        };
        if cfg.max_in_flight > 0 && now > cfg.max_in_flight {
            return Err(ServeError::Overloaded {
                message: format!(
                    "tenant `{tenant}` has {} calls in flight; its limit (`tenants.{tenant}.max_in_flight`) is {}",
                    now - 1,
                    cfg.max_in_flight
                ),
                retry_after: Duration::from_millis(20),
            });
        }
        Ok(slot)
    }

    /// The weight and queue bound of `tenant` for fair queueing.
    pub fn share(&self, tenant: &str) -> (u32, usize) {
        self.tenants
            .get(tenant)
            .map(|s| (s.cfg.weight, s.cfg.max_queued))
            .unwrap_or((1, 1024))
    }
}

// === impl FairQueue ===

struct Waiter {
    tx: oneshot::Sender<()>,
}

struct TenantQueue {
    weight: u32,
    /// Grants left in this tenant's turn of the round.
    credit: u32,
    waiters: VecDeque<Waiter>,
}

struct FqState {
    capacity: usize,
    in_use: usize,
    queues: BTreeMap<String, TenantQueue>,
    /// Tenants with waiters, in round-robin order.
    ring: VecDeque<String>,
}

/// Backend capacity shared by weighted round robin between tenants: when every slot is taken,
/// callers wait in their tenant's queue, and each freed slot goes to the next tenant in turn
/// (a tenant of weight w gets w slots per round). One tenant flooding the gateway therefore
/// waits behind itself, not in front of everyone else.
pub struct FairQueue {
    state: Mutex<FqState>,
}

/// One unit of backend capacity; returned (to the next waiter, in fair order) on drop.
pub struct Slot {
    queue: Arc<FairQueue>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.queue.release();
    }
}

/// A waiter's receiver. If the caller stops waiting (deadline, cancellation) after a slot was
/// granted but before it was taken, the slot is passed on instead of leaking.
struct PendingGrant {
    rx: Option<oneshot::Receiver<()>>,
    queue: Arc<FairQueue>,
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take()
            && rx.try_recv().is_ok()
        {
            self.queue.release();
        }
    }
}

impl FairQueue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(FqState {
                capacity,
                in_use: 0,
                queues: BTreeMap::new(),
                ring: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the capacity (replicas came or went).
    pub fn set_capacity(self: &Arc<Self>, capacity: usize) {
        let grow = {
            let mut st = self.lock();
            let grow = capacity.saturating_sub(st.capacity);
            st.capacity = capacity;
            grow
        };
        for _ in 0..grow {
            // Hand the new slots to waiters, if any.
            if !self.grant_next_waiter() {
                break;
            }
        }
    }

    /// Waits for a slot in `tenant`'s turn. Refuses at once when the tenant's queue is full.
    pub async fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        weight: u32,
        max_queued: usize,
    ) -> Result<Slot, ServeError> {
        let rx = {
            let mut st = self.lock();
            if st.in_use < st.capacity && st.ring.is_empty() {
                st.in_use += 1;
                return Ok(Slot {
                    queue: self.clone(),
                });
            }
            let q = st
                .queues
                .entry(tenant.to_string())
                .or_insert_with(|| TenantQueue {
                    weight,
                    credit: weight,
                    waiters: VecDeque::new(),
                });
            if q.waiters.len() >= max_queued {
                return Err(ServeError::Overloaded {
                    message: format!(
                        "backend is saturated and tenant `{tenant}` already has {} calls waiting (`tenants.{tenant}.max_queued`)",
                        q.waiters.len()
                    ),
                    retry_after: Duration::from_millis(50),
                });
            }
            let (tx, rx) = oneshot::channel();
            q.waiters.push_back(Waiter { tx });
            if q.waiters.len() == 1 {
                st.ring.push_back(tenant.to_string());
            }
            rx
        };
        let mut pending = PendingGrant {
            rx: Some(rx),
            queue: self.clone(),
        };
        let rx = pending.rx.as_mut().expect("set above, this is a bug");
        match rx.await {
            Ok(()) => {
                pending.rx = None;
                Ok(Slot {
                    queue: self.clone(),
                })
            }
            Err(_) => Err(ServeError::unavailable("backend queue closed")),
        }
    }

    /// Number of callers waiting, for metrics.
    pub fn waiting(&self) -> usize {
        self.lock().queues.values().map(|q| q.waiters.len()).sum()
    }

    fn release(&self) {
        let mut st = self.lock();
        st.in_use -= 1;
        drop(st);
        self.grant_next_waiter();
    }

    /// Gives a free slot to the next waiter in weighted round-robin order. Returns whether one
    /// was given.
    fn grant_next_waiter(&self) -> bool {
        let mut st = self.lock();
        while st.in_use < st.capacity {
            let Some(tenant) = st.ring.front().cloned() else {
                return false;
            };
            let q = st
                .queues
                .get_mut(&tenant)
                .expect("ring tenants have queues, this is a bug");
            let Some(w) = q.waiters.pop_front() else {
                st.ring.pop_front();
                continue;
            };
            q.credit -= 1;
            let empty = q.waiters.is_empty();
            if q.credit == 0 || empty {
                q.credit = q.weight;
                st.ring.pop_front();
                if !empty {
                    st.ring.push_back(tenant);
                }
            }
            // A waiter that gave up (deadline, cancelled) leaves its slot to the next one.
            if w.tx.send(()).is_ok() {
                st.in_use += 1;
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_refuses_with_a_retry_hint_then_refills() {
        let mut t = BTreeMap::new();
        t.insert(
            "a".to_string(),
            Tenant {
                rate_per_s: 100.0,
                burst: 2.0,
                ..Tenant::default()
            },
        );
        let q = Quotas::new(&t);
        let _a = q.admit("a").unwrap();
        let _b = q.admit("a").unwrap();
        match q.admit("a") {
            Err(ServeError::Overloaded {
                message,
                retry_after,
            }) => {
                assert!(
                    message.contains("over its rate of 100 calls/s"),
                    "{message}"
                );
                assert!(retry_after <= Duration::from_millis(10));
            }
            _ => panic!("third call in a burst of 2 must be refused"),
        }
        std::thread::sleep(Duration::from_millis(15));
        assert!(q.admit("a").is_ok(), "a token refilled");
        assert!(matches!(
            q.admit("nobody"),
            Err(ServeError::PermissionDenied(_))
        ));
    }

    #[test]
    fn in_flight_cap_is_released_on_drop() {
        let mut t = BTreeMap::new();
        t.insert(
            "a".to_string(),
            Tenant {
                max_in_flight: 1,
                ..Tenant::default()
            },
        );
        let q = Quotas::new(&t);
        let first = q.admit("a").unwrap();
        assert!(matches!(q.admit("a"), Err(ServeError::Overloaded { .. })));
        drop(first);
        assert!(q.admit("a").is_ok());
    }

    #[tokio::test]
    async fn a_flooding_tenant_waits_behind_itself() {
        let fq = FairQueue::new(1);
        let held = fq.acquire("noisy", 1, 100).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, tenant) in ["noisy", "noisy", "noisy", "quiet", "noisy"]
            .iter()
            .enumerate()
        {
            let (fq2, order) = (fq.clone(), order.clone());
            let tenant = tenant.to_string();
            tasks.push(tokio::spawn(async move {
                let slot = fq2.acquire(&tenant, 1, 100).await.unwrap();
                order.lock().unwrap().push(tenant);
                drop(slot);
            }));
            // Queue them in a known order.
            while fq.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order[..2],
            ["noisy", "quiet"],
            "quiet is served second, not fifth: {order:?}"
        );
    }

    #[tokio::test]
    async fn a_full_tenant_queue_is_refused() {
        let fq = FairQueue::new(1);
        let _held = fq.acquire("a", 1, 1).await.unwrap();
        let fq2 = fq.clone();
        let _waiting = tokio::spawn(async move { fq2.acquire("a", 1, 1).await.map(|_| ()) });
        while fq.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            fq.acquire("a", 1, 1).await,
            Err(ServeError::Overloaded { .. })
        ));
    }
}
