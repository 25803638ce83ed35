//! The gateway's own layer, inside the standard stack: authenticates the caller, applies the
//! tenant's quota, hands the principal to the handlers, and writes the access log and per-tenant
//! metrics. Health, reflection and OIP liveness/readiness are open; everything else needs a
//! credential. Credentials and payloads are never logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use marquee_core::ServeError;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::auth::Authenticator;
use crate::metrics::GatewayMetrics;
use crate::quota::{InFlight, Quotas};

/// Paths anyone may call: probes and discovery. The same set has its own concurrency pool in
/// the core stack (`server.max_concurrent_open_requests`), so open calls cannot take the
/// serving capacity.
fn is_open(path: &str) -> bool {
    marquee_core::methods::is_open(path)
}

#[derive(Clone)]
pub struct AccessLayer {
    auth: Arc<Authenticator>,
    quotas: Arc<Quotas>,
    metrics: GatewayMetrics,
}

impl AccessLayer {
    pub fn new(auth: Arc<Authenticator>, quotas: Arc<Quotas>, metrics: GatewayMetrics) -> Self {
        Self {
            auth,
            quotas,
            metrics,
        }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Access {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    layer: AccessLayer,
}

impl<S, B, RB> Service<Request<B>> for Access<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<HoldingBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        if is_open(path) {
            let fut = self.inner.call(req);
            return Box::pin(async move { Ok(fut.await?.map(HoldingBody::new)) });
        }
        // Labels and logs name only known methods: the raw path is the caller's free choice.
        let path = marquee_core::methods::label(path);
        let l = &self.layer;
        let principal = match l.auth.authenticate(req.headers()) {
            Ok(p) => p,
            Err(e) => {
                let reason = if e.code() == Code::PermissionDenied {
                    "unknown_tenant"
                } else {
                    "invalid"
                };
                l.metrics.auth_failures.with_label_values(&[reason]).inc();
                tracing::info!(method = %path, code = ?e.code(), "refused: {e}");
                let status: Status = e.into();
                return Box::pin(async move { Ok(status.into_http::<RB>().map(HoldingBody::new)) });
            }
        };
        let in_flight = match l.quotas.admit(&principal.tenant) {
            Ok(slot) => slot,
            Err(e) => {
                l.metrics
                    .requests
                    .with_label_values(&[path, &principal.tenant, "RESOURCE_EXHAUSTED"])
                    .inc();
                tracing::info!(method = %path, tenant = %principal.tenant, "refused: {e}");
                let status: Status = e.into();
                return Box::pin(async move { Ok(status.into_http::<RB>().map(HoldingBody::new)) });
            }
        };
        req.extensions_mut().insert(principal.clone());
        let metrics = l.metrics.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
                    .map(Code::from_i32)
                    .unwrap_or(Code::Ok),
                Err(_) => Code::Unknown,
            };
            let route = path;
            let code_name = marquee_core::layers::code_name(code);
            metrics
                .requests
                .with_label_values(&[route, &principal.tenant, code_name])
                .inc();
            tracing::info!(
                target: "marquee_gateway::access",
                method = %route,
                tenant = %principal.tenant,
                via = principal.via,
                code = code_name,
                micros = started.elapsed().as_micros() as u64,
            );
            // The tenant's in-flight slot travels with the response body: a stream
            // (`GenerateStream`) counts against `max_in_flight` until its last message, not
            // only until its headers went out.
            result.map(|r| r.map(|b| HoldingBody::holding(b, in_flight)))
        })
    }
}

// === impl HoldingBody ===

/// A response body that holds the caller's tenant in-flight slot until the body has ended
/// (its trailers, which carry the gRPC status, are handed out) or is dropped (the client went
/// away).
pub struct HoldingBody<B> {
    inner: B,
    held: Option<InFlight>,
}

impl<B> HoldingBody<B> {
    fn new(inner: B) -> Self {
        Self { inner, held: None }
    }

    fn holding(inner: B, in_flight: InFlight) -> Self {
        Self {
            inner,
            held: Some(in_flight),
        }
    }
}

impl<B> http_body::Body for HoldingBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        // Released before the last frame is passed on, so a client that saw the end of its
        // call finds the slot free for its next one.
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            this.held = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The principal the access layer attached to this call.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Arc<crate::auth::Principal>, ServeError> {
    req.extensions()
        .get::<Arc<crate::auth::Principal>>()
        .cloned()
        .ok_or_else(|| ServeError::Unauthenticated("no credentials".into()))
}
