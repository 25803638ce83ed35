//! Backends: sets of replicas behind one name. Calls go to the less busy of two random healthy
//! replicas (power of two choices over in-flight counts); replicas are ejected while their
//! `grpc.health.v1` check fails or a call to them answers UNAVAILABLE, and restored once the
//! check passes. Idempotent calls that hit UNAVAILABLE are retried on another replica within a
//! retry budget. Capacity is shared between tenants by the fair queue.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use marquee_core::ServeError;
use marquee_proto::inference::RepositoryIndexRequest;
use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use opentelemetry::propagation::Injector;
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
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{Backend as BackendConfig, ClientTls};
use crate::error::GatewayError;
use crate::metrics::GatewayMetrics;
use crate::quota::{FairQueue, Quotas, Slot};

/// Calls that are not idempotent: never retried by the gateway after a replica failed
/// mid-call. The caller sees the failure and decides (it knows whether it got an answer).
pub const NOT_RETRIED: &[&str] = &["marquee.recommendation.v1.Recommender/RecordFeedback"];

/// One replica.
pub struct Endpoint {
    pub addr: String,
    channel: Channel,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
}

/// The rustls client configuration of a backend's `tls` settings.
fn client_tls(tls: &ClientTls) -> Result<ClientTlsConfig, String> {
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("`{}`: {e}", p.display()));
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
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    fair: Arc<FairQueue>,
    budget: TpsBudget,
    metrics: GatewayMetrics,
}

impl BackendPool {
    pub fn new(
        name: &str,
        cfg: &BackendConfig,
        retry_percent: f32,
        metrics: GatewayMetrics,
    ) -> Result<Arc<Self>, String> {
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|a| Endpoint::new(a, cfg.tls.as_ref()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let pool = Arc::new(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            fair: FairQueue::new(endpoints.len().max(1) * cfg.max_in_flight_per_endpoint),
            endpoints: ArcSwap::from_pointee(endpoints),
            // Retries may add `retry_percent`% to recent traffic, with a floor of 10/s so a
            // replica dying under light load is still retried.
            budget: TpsBudget::new(Duration::from_secs(10), 10, retry_percent / 100.0),
            metrics,
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

    fn update_gauges(&self) {
        self.metrics
            .endpoints_healthy
            .with_label_values(&[&self.name])
            .set(self.healthy_count() as i64);
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
    ) -> Result<Slot, GatewayError> {
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
            ))
            .into()),
        }
    }

    /// Runs a unary call `f(channel, remaining time)` on a replica, retrying on another replica
    /// when the answer is UNAVAILABLE (and the retry budget allows), unless the method is in
    /// [`NOT_RETRIED`].
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
        self.budget.deposit();
        let mut tried: Vec<String> = Vec::new();
        loop {
            let Some(ep) = self.pick(&tried) else {
                let total = self.endpoints.load().len();
                return Err(GatewayError::Unavailable(format!(
                    "backend `{}` has no healthy replica ({total} known, {} tried for this call)",
                    self.name,
                    tried.len()
                )));
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
                    // A write lost mid-call may have been applied (and fsync'd): sending it again
                    // could apply it twice, so only idempotent calls are retried here.
                    if !NOT_RETRIED.contains(&method) && self.budget.withdraw() {
                        self.metrics.retries.with_label_values(&[&self.name]).inc();
                        continue;
                    }
                    return Err(GatewayError::Backend(s));
                }
                Err(s) => return Err(GatewayError::Backend(s)),
            }
        }
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
/// UNKNOWN "transport error" (a replica killed with calls in flight).
fn replica_failed(s: &Status) -> bool {
    s.code() == Code::Unavailable
        || (s.code() == Code::Unknown && s.message().starts_with("transport error"))
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// A backend request carrying the remaining deadline and the current trace context (W3C
/// `traceparent`), so the backend's spans join the caller's trace.
pub fn outgoing<T>(message: T, remaining: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(remaining);
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
    });
    req
}
