//! The one server layer stack every Marquee gRPC server runs, outermost first:
//!
//! 1. [`MessageLimitLayer`]: refuses an oversized request message from its 5-byte gRPC prefix,
//!    before the body is buffered, with `RESOURCE_EXHAUSTED` (tonic's own limit says
//!    OUT_OF_RANGE, which clients do not treat as "too big").
//! 2. [`GrpcTraceLayer`]: one server span per call, parented on the caller's W3C
//!    `traceparent`, plus call counts and latency by method and code.
//! 3. [`OverloadLayer`] over tower's load shed over a global concurrency limit: past
//!    `max_concurrent_requests` calls are refused at once with `RESOURCE_EXHAUSTED` and
//!    `RetryInfo` instead of queueing without bound.
//!
//! Deadlines are enforced by tonic (the client's `grpc-timeout`, capped by the server's
//! maximum) and, per request, by the batcher.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use opentelemetry::propagation::Extractor;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::layer::util::{Identity, Stack};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use marquee_proto::code_name;

use crate::error::ServeError;
use crate::metrics::Metrics;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

// === impl MessageLimit ===

/// Refuses request messages larger than `max` bytes with `RESOURCE_EXHAUSTED`.
#[derive(Clone)]
pub struct MessageLimitLayer {
    max: usize,
}

impl MessageLimitLayer {
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit {
            inner,
            max: self.max,
        }
    }
}

#[derive(Clone)]
pub struct MessageLimit<S> {
    inner: S,
    max: usize,
}

impl<S> Service<Request<Body>> for MessageLimit<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let max = self.max;
        self.inner.call(req.map(|body| {
            Body::new(LimitBody {
                inner: body,
                max,
                prefix: [0; 5],
                have: 0,
                skip: 0,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// Watches gRPC length prefixes as frames stream by; errors as soon as one declares a
    /// message over the limit. The error is a `Status`, which tonic's decoder passes through.
    struct LimitBody {
        #[pin]
        inner: Body,
        max: usize,
        prefix: [u8; 5],
        have: usize,
        skip: usize,
    }
}

impl http_body::Body for LimitBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let frame = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        if let Some(data) = frame.data_ref() {
            let mut pos = 0;
            while pos < data.len() {
                if *this.skip > 0 {
                    let n = (*this.skip).min(data.len() - pos);
                    *this.skip -= n;
                    pos += n;
                    continue;
                }
                this.prefix[*this.have] = data[pos];
                *this.have += 1;
                pos += 1;
                if *this.have == 5 {
                    *this.have = 0;
                    let len = u32::from_be_bytes([
                        this.prefix[1],
                        this.prefix[2],
                        this.prefix[3],
                        this.prefix[4],
                    ]) as usize;
                    if len > *this.max {
                        let err = ServeError::TooLarge {
                            field: "request".into(),
                            message: format!(
                                "request message is {len} bytes; the limit (`server.max_message_bytes`) is {} bytes",
                                this.max
                            ),
                        };
                        return Poll::Ready(Some(Err(err.into())));
                    }
                    *this.skip = len;
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// === impl GrpcTrace ===

/// A server span and metrics per gRPC call.
#[derive(Clone)]
pub struct GrpcTraceLayer {
    metrics: Metrics,
}

impl GrpcTraceLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcTrace<S> {
    inner: S,
    metrics: Metrics,
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

impl<S, B> Service<Request<Body>> for GrpcTrace<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        let record_span = span.clone();
        Box::pin(
            async move {
                let result = fut.await;
                let code = match &result {
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(Code::from_i32)
                        .unwrap_or(Code::Ok),
                    Err(_) => Code::Unknown,
                };
                record_span.record("rpc.grpc.status_code", code as i32);
                // Unknown paths answer UNIMPLEMENTED; label them together so clients cannot
                // mint label values.
                let method = if code == Code::Unimplemented {
                    "unknown"
                } else {
                    path.as_str()
                };
                metrics
                    .grpc_requests
                    .with_label_values(&[method, code_name(code)])
                    .inc();
                metrics
                    .grpc_duration
                    .with_label_values(&[method])
                    .observe(started.elapsed().as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}

// === impl Overload ===

/// Turns tower's `Overloaded` (from load shed) into a `RESOURCE_EXHAUSTED` response.
#[derive(Clone)]
pub struct OverloadLayer {
    limit: usize,
}

impl OverloadLayer {
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for OverloadLayer {
    type Service = Overload<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Overload {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Clone)]
pub struct Overload<S> {
    inner: S,
    limit: usize,
}

impl<S> Service<Request<Body>> for Overload<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = tower::BoxError;
    type Future = BoxFuture<Result<Response<Body>, tower::BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let limit = self.limit;
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await.map_err(Into::into) {
                Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
                    let status: Status = ServeError::Overloaded {
                        message: format!(
                            "server is at its limit of {limit} concurrent calls (`server.max_concurrent_requests`); retry shortly"
                        ),
                        retry_after: Duration::from_millis(50),
                    }
                    .into();
                    Ok(status.into_http())
                }
                other => other,
            }
        })
    }
}

/// The layers of [`server_stack`], outermost first.
pub type ServerStack = tower::ServiceBuilder<
    Stack<
        GlobalConcurrencyLimitLayer,
        Stack<
            LoadShedLayer,
            Stack<OverloadLayer, Stack<GrpcTraceLayer, Stack<MessageLimitLayer, Identity>>>,
        >,
    >,
>;

/// The whole stack, for `tonic::transport::Server::layer`.
pub fn server_stack(
    metrics: Metrics,
    max_message_bytes: usize,
    max_concurrent: usize,
) -> ServerStack {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(max_concurrent));
    tower::ServiceBuilder::new()
        .layer(MessageLimitLayer::new(max_message_bytes))
        .layer(GrpcTraceLayer::new(metrics))
        .layer(OverloadLayer::new(max_concurrent))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(semaphore))
}
