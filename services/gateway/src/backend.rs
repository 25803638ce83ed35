//! Backends: sets of replicas behind one name. Calls go to the less busy of two random healthy
//! replicas (power of two choices over in-flight counts); replicas are ejected while their
//! `grpc.health.v1` check fails or a call to them answers UNAVAILABLE, and restored once the
//! check passes. Idempotent calls that hit UNAVAILABLE are retried on another replica within
//! their route's retry budget, except a request that was in flight on two replicas that died
//! under it (a possible poison request: it is failed, and refused for a while). Capacity is
//! shared between tenants by the fair queue.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use marquee_core::ServeError;
use marquee_proto::inference::RepositoryIndexRequest;
use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint as TonicEndpoint, Identity,
};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::retry::budget::{Budget, TpsBudget};
use tracing::Instrument;

use crate::config::{Backend as BackendConfig, ClientTls, RouteName, Routes};
use crate::error::GatewayError;
use crate::metrics::GatewayMetrics;
use crate::quota::{FairQueue, Quotas, Slot};

/// Calls that are not idempotent: never retried by the gateway after a replica failed
/// mid-call. The caller sees the failure and decides (it knows whether it got an answer).
pub const NOT_RETRIED: &[&str] = &["marquee.recommendation.v1.Recommender/RecordFeedback"];

/// Replicas a request may be in flight on when they die before the gateway stops sending it
/// elsewhere: the first death may be a coincidence (a replica killed under load), a second one
/// under the same request is not, and a third would take down a third replica.
pub const POISON_REPLICAS: usize = 2;

/// How many poison-request fingerprints are remembered (64-bit keyed hashes; 1024 take a few
/// tens of KB). Past it the oldest is forgotten.
pub const POISON_MEMORY_ENTRIES: usize = 1024;

/// How long a request that took down [`POISON_REPLICAS`] replicas is refused at once (without
/// reaching a replica): long enough for the killed replicas to restart and for someone to
/// read the logs.
pub const POISON_MEMORY_TTL: Duration = Duration::from_secs(600);

/// One replica.
pub struct Endpoint {
    pub addr: String,
    channel: Channel,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
}

/// The rustls client configuration of a backend's `tls` settings.
fn client_tls(tls: &ClientTls) -> Result<ClientTlsConfig, String> {
    let read = marquee_core::serve::read_pem;
    let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file)?));
    if let Some(domain) = &tls.domain {
        cfg = cfg.domain_name(domain.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        cfg = cfg.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(cfg)
}

impl Endpoint {
    fn new(addr: &str, tls: Option<&ClientTls>) -> Result<Self, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = TonicEndpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("endpoint `{addr}`: {e}"))?;
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(client_tls(tls)?)
                .map_err(|e| format!("endpoint `{addr}`: {e}"))?;
        }
        let channel = endpoint
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(1))
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_lazy();
        Ok(Self {
            addr: addr.to_string(),
            channel,
            in_flight: AtomicUsize::new(0),
            // Optimistic until the first health check says otherwise.
            healthy: AtomicBool::new(true),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

struct InFlightGuard<'a>(&'a AtomicUsize);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend: its replicas, their health, and the capacity shared between tenants.
pub struct BackendPool {
    pub name: String,
    pub cfg: BackendConfig,
    /// Sent with the caller's tenant (`backends.<name>.tenant_token_file`).
    pub tenant_token: Option<String>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    fair: Arc<FairQueue>,
    /// One retry budget per route (indexed by `RouteName as usize`): a backend serving both
    /// `ImageService` and OIP calls spends each route's retries from that route's budget.
    budgets: [TpsBudget; 4],
    poison: PoisonMemory,
    metrics: GatewayMetrics,
    /// The number of healthy replicas, sent when it changes: the routing table's per-model
    /// health follows it.
    healthy: tokio::sync::watch::Sender<usize>,
}

impl BackendPool {
    pub fn new(
        name: &str,
        cfg: &BackendConfig,
        routes: &Routes,
        metrics: GatewayMetrics,
    ) -> Result<Arc<Self>, String> {
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|a| Endpoint::new(a, cfg.tls.as_ref()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let tenant_token = cfg
            .tenant_token_file
            .as_deref()
            .map(marquee_core::tenant::read_token_file)
            .transpose()?;
        let pool = Arc::new(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            tenant_token,
            fair: FairQueue::new(endpoints.len().max(1) * cfg.max_in_flight_per_endpoint),
            endpoints: ArcSwap::from_pointee(endpoints),
            budgets: RouteName::ALL.map(|r| retry_budget(routes.get(r).retry_budget_percent)),
            poison: PoisonMemory::default(),
            metrics,
            healthy: tokio::sync::watch::Sender::new(0),
        });
        pool.update_gauges();
        Ok(pool)
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    pub fn healthy_count(&self) -> usize {
        self.endpoints
            .load()
            .iter()
            .filter(|e| e.is_healthy())
            .count()
    }

    /// Follows [`healthy_count`](Self::healthy_count) as replicas are ejected, restored, added
    /// or removed.
    pub fn health_changes(&self) -> tokio::sync::watch::Receiver<usize> {
        self.healthy.subscribe()
    }

    fn update_gauges(&self) {
        let healthy = self.healthy_count();
        self.metrics
            .endpoints_healthy
            .with_label_values(&[&self.name])
            .set(healthy as i64);
        self.healthy
            .send_if_modified(|n| std::mem::replace(n, healthy) != healthy);
    }

    /// The less busy of two random healthy replicas not yet tried.
    fn pick(&self, tried: &[String]) -> Option<Arc<Endpoint>> {
        let eps = self.endpoints.load();
        let candidates: Vec<&Arc<Endpoint>> = eps
            .iter()
            .filter(|e| e.is_healthy() && !tried.contains(&e.addr))
            .collect();
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let (x, y) = (candidates[a], candidates[b]);
                Some(
                    if x.in_flight.load(Ordering::Relaxed) <= y.in_flight.load(Ordering::Relaxed) {
                        x.clone()
                    } else {
                        y.clone()
                    },
                )
            }
        }
    }

    /// Waits (fairly, by tenant) for backend capacity, bounded by `deadline`.
    pub async fn admit(
        &self,
        quotas: &Quotas,
        tenant: &str,
        deadline: Instant,
    ) -> Result<Slot, ServeError> {
        let (weight, max_queued) = quotas.share(tenant);
        match tokio::time::timeout_at(
            deadline.into(),
            self.fair.acquire(tenant, weight, max_queued),
        )
        .await
        {
            Ok(slot) => slot,
            Err(_) => Err(ServeError::DeadlineExceeded(format!(
                "deadline expired while backend `{}` was saturated; the call was not sent",
                self.name
            ))),
        }
    }

    /// Runs a unary call `f(channel, remaining time)` on a replica, retrying on another replica
    /// when the answer is UNAVAILABLE (and the route's retry budget allows), unless the method
    /// is in [`NOT_RETRIED`] or the call was in flight on [`POISON_REPLICAS`] replicas that
    /// died under it.
    pub async fn call<T, F, Fut>(
        &self,
        method: &'static str,
        deadline: Instant,
        f: F,
    ) -> Result<T, GatewayError>
    where
        F: Fn(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_inner(method, deadline, None, f).await
    }

    /// [`call`](Self::call) for one caller's `request`: a request that took down
    /// [`POISON_REPLICAS`] replicas is remembered (a keyed hash of its bytes) and the same
    /// request is refused at once for [`POISON_MEMORY_TTL`], without reaching a replica.
    pub async fn call_remembering<R, T, F, Fut>(
        &self,
        method: &'static str,
        deadline: Instant,
        request: &R,
        f: F,
    ) -> Result<T, GatewayError>
    where
        R: prost::Message,
        F: Fn(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let bytes = || request.encode_to_vec();
        self.call_inner(method, deadline, Some(&bytes), f).await
    }

    async fn call_inner<T, F, Fut>(
        &self,
        method: &'static str,
        deadline: Instant,
        request: Option<&(dyn Fn() -> Vec<u8> + Sync)>,
        f: F,
    ) -> Result<T, GatewayError>
    where
        F: Fn(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let route = RouteName::of_method(method);
        let budget = &self.budgets[route as usize];
        budget.deposit();
        // Hashed only when something is remembered, or when the request turns out poisonous.
        let fingerprint =
            |bytes: &(dyn Fn() -> Vec<u8> + Sync)| self.poison.hasher.hash_one((method, bytes()));
        if let Some(bytes) = request
            && !self.poison.is_empty()
            && let Some(age) = self.poison.remembered(fingerprint(bytes))
        {
            self.count_poison("refused");
            return Err(ServeError::Aborted(format!(
                "refused without sending it: the same request took down {POISON_REPLICAS} replicas of backend `{}` {} s ago (possible poison request)",
                self.name,
                age.as_secs()
            ))
            .into());
        }
        let mut tried: Vec<String> = Vec::new();
        let mut died_under_it = 0;
        loop {
            let Some(ep) = self.pick(&tried) else {
                let total = self.endpoints.load().len();
                return Err(ServeError::unavailable(format!(
                    "backend `{}` has no healthy replica ({total} known, {} tried for this call)",
                    self.name,
                    tried.len()
                ))
                .into());
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ServeError::DeadlineExceeded(format!(
                    "deadline expired before calling backend `{}`",
                    self.name
                ))
                .into());
            }
            ep.in_flight.fetch_add(1, Ordering::Relaxed);
            let _guard = InFlightGuard(&ep.in_flight);
            let span = tracing::info_span!("grpc.client", otel.name = method, otel.kind = "client", peer = %ep.addr);
            // `f` builds the request (and injects `traceparent`) when called: inside the client
            // span, so the backend's server span is its child, not the gateway server span's.
            let result = span
                .in_scope(|| f(ep.channel.clone(), deadline - now))
                .instrument(span.clone())
                .await;
            let code = result.as_ref().err().map(Status::code).unwrap_or(Code::Ok);
            self.metrics
                .backend_requests
                .with_label_values(&[&self.name, marquee_core::layers::code_name(code)])
                .inc();
            match result {
                Ok(v) => return Ok(v),
                Err(s) if replica_failed(&s) => {
                    // Eject now; the health check restores the replica once it answers again.
                    if ep.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(backend = %self.name, endpoint = %ep.addr, "ejecting replica after UNAVAILABLE");
                        self.update_gauges();
                    }
                    tried.push(ep.addr.clone());
                    if died_mid_call(&s) {
                        died_under_it += 1;
                    }
                    if died_under_it >= POISON_REPLICAS {
                        self.count_poison("failed");
                        if let Some(bytes) = request {
                            self.poison.remember(fingerprint(bytes));
                        }
                        tracing::error!(backend = %self.name, method, replicas = died_under_it, "not retrying a request whose replicas failed mid-call (possible poison request)");
                        return Err(ServeError::Aborted(format!(
                            "not retried further: the {died_under_it} replicas of backend `{}` it reached failed mid-call (possible poison request); the last one said: {}",
                            self.name,
                            s.message()
                        ))
                        .into());
                    }
                    // A write lost mid-call may have been applied (and fsync'd): sending it again
                    // could apply it twice, so only idempotent calls are retried here.
                    if !NOT_RETRIED.contains(&method) && budget.withdraw() {
                        self.metrics
                            .retries
                            .with_label_values(&[&self.name, route.as_str()])
                            .inc();
                        continue;
                    }
                    return Err(GatewayError::Backend(s));
                }
                Err(s) => return Err(GatewayError::Backend(s)),
            }
        }
    }

    fn count_poison(&self, outcome: &'static str) {
        self.metrics
            .poison_requests
            .with_label_values(&[&self.name, outcome])
            .inc();
    }

    /// Health-checks every replica each `health_interval_ms` and re-resolves DNS each
    /// `resolve_interval_ms`, until `shutdown`.
    pub fn spawn_maintenance(self: &Arc<Self>, shutdown: CancellationToken) {
        let pool = self.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(pool.cfg.health_interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => pool.check_health().await,
                }
            }
        });
        if let Some(dns) = self.cfg.dns.clone() {
            let pool = self.clone();
            tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(Duration::from_millis(pool.cfg.resolve_interval_ms));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => pool.resolve(&dns).await,
                    }
                }
            });
        }
    }

    async fn check_health(&self) {
        let eps = self.endpoints.load_full();
        let timeout = Duration::from_millis(self.cfg.health_interval_ms.clamp(100, 2_000));
        let checks = eps.iter().map(|ep| async move {
            let mut client = HealthClient::new(ep.channel.clone());
            let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
            req.set_timeout(timeout);
            let serving = matches!(
                tokio::time::timeout(timeout, client.check(req)).await,
                Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
            );
            let was = ep.healthy.swap(serving, Ordering::Relaxed);
            if was != serving {
                tracing::info!(backend = %self.name, endpoint = %ep.addr, serving, "replica health changed");
            }
        });
        futures::future::join_all(checks).await;
        self.update_gauges();
    }

    async fn resolve(&self, dns: &str) {
        let addrs: Vec<String> = match tokio::net::lookup_host(dns).await {
            Ok(a) => a.map(|a| a.to_string()).collect(),
            Err(e) => {
                tracing::warn!(backend = %self.name, %dns, error = %e, "DNS resolution failed; keeping the known replicas");
                return;
            }
        };
        let current = self.endpoints.load_full();
        let known: HashMap<&str, &Arc<Endpoint>> =
            current.iter().map(|e| (e.addr.as_str(), e)).collect();
        if addrs.len() == current.len() && addrs.iter().all(|a| known.contains_key(a.as_str())) {
            return;
        }
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .filter_map(|a| {
                known
                    .get(a.as_str())
                    .map(|e| (*e).clone())
                    .or_else(|| Endpoint::new(a, self.cfg.tls.as_ref()).ok().map(Arc::new))
            })
            .collect();
        tracing::info!(backend = %self.name, replicas = next.len(), "replica set changed");
        self.fair
            .set_capacity(next.len().max(1) * self.cfg.max_in_flight_per_endpoint);
        self.endpoints.store(Arc::new(next));
        self.update_gauges();
    }

    /// The models the replicas serve and their versions (from Triton's `RepositoryIndex`),
    /// from the first replica that answers.
    pub async fn models(&self) -> Option<Vec<(String, String)>> {
        for ep in self.endpoints.load_full().iter().filter(|e| e.is_healthy()) {
            let mut client = GrpcInferenceServiceClient::new(ep.channel.clone());
            let mut req = tonic::Request::new(RepositoryIndexRequest {
                repository_name: String::new(),
                ready: true,
            });
            req.set_timeout(Duration::from_secs(2));
            if let Ok(r) = client.repository_index(req).await {
                return Some(
                    r.into_inner()
                        .models
                        .into_iter()
                        .map(|m| (m.name, m.version))
                        .collect(),
                );
            }
        }
        None
    }
}

/// Whether a status says the replica (not the request) failed, so an idempotent call may go
/// to another one: UNAVAILABLE, or the connection dying mid-call, which tonic reports as
/// UNKNOWN "transport error" or, when hyper gives up the call as the connection closes, as
/// CANCELLED "operation was canceled" with hyper's error behind it (seen once in ~10 runs of
/// the SIGKILL fault case). A caller that cancels drops the call instead and never sees a
/// status; the gateway's own per-attempt timeout is CANCELLED "Timeout expired", not this.
/// A replica's answer that a dependency all replicas share is down (the recommender's
/// database) is not the replica failing: it is passed on, with its `RetryInfo`, and the
/// replica stays in rotation (ejecting every replica would turn a clear status into "no
/// healthy replica", and would outlast the outage by a health-check period).
fn replica_failed(s: &Status) -> bool {
    (s.code() == Code::Unavailable && !marquee_core::error::is_dependency_unavailable(s))
        || (s.code() == Code::Unknown && s.message().starts_with("transport error"))
        || (s.code() == Code::Cancelled
            && s.message() == "operation was canceled"
            && std::error::Error::source(s).is_some())
}

/// Whether the replica's connection broke while the call was in flight (the replica died or
/// was cut off after the request was sent), as opposed to an answer the replica gave (a
/// status without a transport error behind it) or a connection that could not be made (the
/// request never left: safe to send elsewhere, within the retry budget). A stream the replica
/// refused before processing it (HTTP/2 `REFUSED_STREAM`) did not run there either.
fn died_mid_call(s: &Status) -> bool {
    let Some(source) = std::error::Error::source(s) else {
        return false;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return false;
        }
        cause = e.source();
    }
    !s.message().contains("refused stream")
}

/// A route's retry budget: `percent` % of the route's calls over the last 10 s, with a floor of
/// 10 retries/s so a replica dying under light load is still retried; 0 % turns retries off.
fn retry_budget(percent: f32) -> TpsBudget {
    let floor = if percent > 0.0 { 10 } else { 0 };
    TpsBudget::new(Duration::from_secs(10), floor, percent / 100.0)
}

// === impl PoisonMemory ===

/// Fingerprints of requests that took replicas down, bounded and expiring.
#[derive(Default)]
struct PoisonMemory {
    /// Keyed per process, so no one can craft a request that collides with another's.
    hasher: RandomState,
    /// Fingerprint → when it was remembered.
    entries: Mutex<HashMap<u64, Instant>>,
}

impl PoisonMemory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// How long ago `fp` was remembered, if it still is.
    fn remembered(&self, fp: u64) -> Option<Duration> {
        let mut entries = self.lock();
        let age = entries.get(&fp)?.elapsed();
        if age < POISON_MEMORY_TTL {
            Some(age)
        } else {
            entries.remove(&fp);
            None
        }
    }

    fn remember(&self, fp: u64) {
        let mut entries = self.lock();
        if entries.len() >= POISON_MEMORY_ENTRIES {
            entries.retain(|_, at| at.elapsed() < POISON_MEMORY_TTL);
        }
        if entries.len() >= POISON_MEMORY_ENTRIES
            && let Some(oldest) = entries.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
        {
            entries.remove(&oldest);
        }
        entries.insert(fp, Instant::now());
    }
}

/// A backend request carrying the remaining deadline and the current trace context (W3C
/// `traceparent`), so the backend's spans join the caller's trace.
pub fn outgoing<T>(message: T, remaining: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(remaining);
    marquee_core::propagation::inject(req.metadata_mut());
    req
}

/// As [`outgoing`], for one caller's call: with the tenant the gateway authenticated (and the
/// backend's tenant token), so backends that keep per-user state key it by tenant. Built
/// afresh, the request carries nothing the client sent in its metadata.
pub fn outgoing_for<T>(
    message: T,
    remaining: Duration,
    tenant: &str,
    backend: &BackendPool,
) -> tonic::Request<T> {
    let mut req = outgoing(message, remaining);
    marquee_core::tenant::forward(req.metadata_mut(), tenant, backend.tenant_token.as_deref());
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_memory_is_bounded_and_forgets_the_oldest() {
        let m = PoisonMemory::default();
        assert!(m.is_empty());
        for fp in 0..POISON_MEMORY_ENTRIES as u64 + 10 {
            m.remember(fp);
        }
        assert_eq!(m.lock().len(), POISON_MEMORY_ENTRIES);
        assert!(m.remembered(0).is_none(), "the oldest was evicted");
        assert!(m.remembered(POISON_MEMORY_ENTRIES as u64 + 9).is_some());
    }

    #[test]
    fn a_connection_never_made_is_not_a_death_mid_call() {
        let refused = Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        ))));
        assert_eq!(refused.code(), Code::Unavailable);
        assert!(replica_failed(&refused) && !died_mid_call(&refused));
        let reset: Box<dyn std::error::Error + Send + Sync> =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let reset = Status::from_error(reset);
        assert!(died_mid_call(&reset), "{reset:?}");
        // The replica's own answer, with no broken connection behind it.
        assert!(!died_mid_call(&Status::unavailable("draining")));
        let database: Status = marquee_core::ServeError::DependencyUnavailable {
            dependency: "postgres".into(),
            message: "down".into(),
            retry_after: std::time::Duration::from_secs(1),
        }
        .into();
        assert!(
            !replica_failed(&database),
            "a shared dependency is not the replica"
        );
    }

    #[test]
    fn zero_percent_means_no_retries_and_each_route_has_its_budget() {
        assert!(!retry_budget(0.0).withdraw());
        assert!(retry_budget(20.0).withdraw(), "the floor of 10/s");
        assert_eq!(
            RouteName::of_method("inference.GRPCInferenceService/ModelInfer"),
            RouteName::Inference
        );
        assert_eq!(
            RouteName::of_method("marquee.vision.v1.ImageService/Classify"),
            RouteName::Vision
        );
        assert_eq!(
            RouteName::of_method("marquee.language.v1.TextGeneration/GenerateStream"),
            RouteName::Language
        );
    }
}
