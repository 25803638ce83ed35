//! The one server layer stack every Marquee gRPC server runs, outermost first:
//!
//! 1. [`BodyTimeoutLayer`]: a request body that does not arrive in time
//!    (`server.body_read_timeout_ms`) fails the call with `DEADLINE_EXCEEDED`, so a client that
//!    stalls mid-request (slow loris) cannot hold a permit until the call's deadline.
//! 2. [`MessageLimitLayer`]: refuses an oversized request message from its 5-byte gRPC prefix,
//!    before the body is buffered, with `RESOURCE_EXHAUSTED` (tonic's own limit says
//!    OUT_OF_RANGE, which clients do not treat as "too big").
//! 3. [`GrpcTraceLayer`]: one server span per call, parented on the caller's W3C
//!    `traceparent`, plus call counts and latency by method and code. The method label comes
//!    from the closed set in [`crate::methods`], never from the raw path.
//! 4. [`AdmissionLayer`]: a permit per call from one of two pools: open methods (health,
//!    reflection, OIP liveness/readiness) from a small pool of their own
//!    (`server.max_concurrent_open_requests`), everything else from
//!    `server.max_concurrent_requests`. Without a permit a call is refused at once with
//!    `RESOURCE_EXHAUSTED` and `RetryInfo` instead of queueing without bound. The permit is
//!    held by the response body, so a stream counts until it ends or its client leaves.
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use marquee_proto::code_name;

use crate::error::ServeError;
use crate::methods;
use crate::metrics::Metrics;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

// === impl MessageLimit ===

/// A layer that wraps every request body, the same way for every service: what wraps it is
/// a [`WrapBody`]. The message-size limit and the body-read timeout are two of them.
#[derive(Clone)]
pub struct RequestBodyLayer<W> {
    wrap: W,
}

impl<W> RequestBodyLayer<W> {
    pub fn new(wrap: W) -> Self {
        Self { wrap }
    }
}

/// What a [`RequestBodyLayer`] does to one request body (`path` is the gRPC method path).
pub trait WrapBody: Clone {
    fn wrap(&self, path: &str, body: Body) -> Body;
}

impl<S, W: Clone> Layer<S> for RequestBodyLayer<W> {
    type Service = RequestBodyService<S, W>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestBodyService {
            inner,
            wrap: self.wrap.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestBodyService<S, W> {
    inner: S,
    wrap: W,
}

impl<S, W> Service<Request<Body>> for RequestBodyService<S, W>
where
    S: Service<Request<Body>>,
    W: WrapBody,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let body = self.wrap.wrap(parts.uri.path(), body);
        self.inner.call(Request::from_parts(parts, body))
    }
}

/// Refuses request messages larger than `max` bytes with `RESOURCE_EXHAUSTED`.
#[derive(Clone)]
pub struct MessageLimit {
    pub max: usize,
}

/// The message-size limit as a layer.
pub type MessageLimitLayer = RequestBodyLayer<MessageLimit>;

impl WrapBody for MessageLimit {
    fn wrap(&self, _path: &str, body: Body) -> Body {
        Body::new(LimitBody {
            inner: body,
            max: self.max,
            prefix: [0; 5],
            have: 0,
            skip: 0,
        })
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
        // Only known methods name a label or a span: a client picks the path freely (any
        // length), and every distinct label value is a new series kept for ever.
        let method = methods::label(req.uri().path());
        let parent = crate::propagation::extract(req.headers());
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %method.trim_start_matches('/'),
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

// === impl Admission ===

/// One pool of call permits and the setting that sizes it (named in the refusal).
#[derive(Clone)]
struct Pool {
    permits: Arc<Semaphore>,
    limit: usize,
    setting: &'static str,
}

impl Pool {
    fn new(limit: usize, setting: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            setting,
        }
    }
}

/// Admits a call only with a permit from its pool, held until the response body has ended (for
/// a stream: its last message and trailers) or the client left. Open methods use their own small pool: an
/// unauthenticated caller can then hold at most that many permits, never the serving ones, and
/// health checks still answer while the server is saturated with work.
#[derive(Clone)]
pub struct AdmissionLayer {
    serving: Pool,
    open: Pool,
}

impl AdmissionLayer {
    pub fn new(max_concurrent: usize, max_concurrent_open: usize) -> Self {
        Self {
            serving: Pool::new(max_concurrent, "server.max_concurrent_requests"),
            open: Pool::new(max_concurrent_open, "server.max_concurrent_open_requests"),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

impl<S> Service<Request<Body>> for Admission<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let pool = if methods::is_open(req.uri().path()) {
            &self.layer.open
        } else {
            &self.layer.serving
        };
        let permit: OwnedSemaphorePermit = match pool.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let status: Status = ServeError::Overloaded {
                    message: format!(
                        "server is at its limit of {} concurrent calls (`{}`); retry shortly",
                        pool.limit, pool.setting
                    ),
                    retry_after: Duration::from_millis(50),
                }
                .into();
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            // The permit travels with the response body: a stream (`GenerateStream`, health
            // `Watch`) holds it until its trailers go out or the client leaves, not only until
            // its headers did, so open streams count against the limit like unary calls.
            Ok(fut.await?.map(|body| {
                Body::new(PermitBody {
                    inner: body,
                    permit: Some(permit),
                })
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body holding its call's admission permit until the body ends (its trailers,
    /// which carry the gRPC status, are handed out), fails, or is dropped.
    struct PermitBody {
        #[pin]
        inner: Body,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Pending => false,
        };
        if ended {
            // Released before the last frame is passed on, so a client that saw its call end
            // finds the permit free for its next one.
            this.permit.take();
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

// === impl BodyTimeout ===

/// Bounds how long a request body may take to arrive: a unary request (one message) must be
/// complete within `timeout` of its headers; a client stream may not go silent for longer than
/// `timeout` between frames. Past it the body fails with `DEADLINE_EXCEEDED`, which ends the
/// call and returns its permit.
#[derive(Clone)]
pub struct BodyTimeout {
    pub timeout: Duration,
}

/// The body-read timeout as a layer.
pub type BodyTimeoutLayer = RequestBodyLayer<BodyTimeout>;

impl WrapBody for BodyTimeout {
    fn wrap(&self, path: &str, body: Body) -> Body {
        let streaming = methods::lookup(path).is_some_and(|m| m.client_streaming);
        Body::new(TimedBody {
            inner: body,
            // The clock starts now, at the request headers, not at the first poll.
            sleep: tokio::time::sleep(self.timeout),
            timeout: self.timeout,
            streaming,
            done: false,
        })
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails once its [`BodyTimeout`] passes.
    struct TimedBody {
        #[pin]
        inner: Body,
        #[pin]
        sleep: Sleep,
        timeout: Duration,
        streaming: bool,
        done: bool,
    }
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut this = self.project();
        if *this.done {
            return this.inner.poll_frame(cx);
        }
        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            match &frame {
                Some(Ok(_)) if *this.streaming => {
                    this.sleep
                        .as_mut()
                        .reset(tokio::time::Instant::now() + *this.timeout);
                }
                Some(Ok(_)) => {}
                _ => *this.done = true,
            }
            return Poll::Ready(frame);
        }
        ready!(this.sleep.poll(cx));
        *this.done = true;
        let ms = this.timeout.as_millis();
        let message = if *this.streaming {
            format!(
                "no request message arrived for {ms} ms (`server.body_read_timeout_ms`); the stream is cut so a stalled client cannot hold server capacity"
            )
        } else {
            format!(
                "the request body did not arrive within {ms} ms (`server.body_read_timeout_ms`); the call is cut so a stalled client cannot hold server capacity"
            )
        };
        Poll::Ready(Some(Err(ServeError::DeadlineExceeded(message).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The layers of [`server_stack`], outermost first.
pub type ServerStack = tower::ServiceBuilder<
    Stack<
        AdmissionLayer,
        Stack<GrpcTraceLayer, Stack<MessageLimitLayer, Stack<BodyTimeoutLayer, Identity>>>,
    >,
>;

/// The limits [`server_stack`] enforces, from `[server]`.
#[derive(Debug, Clone)]
pub struct StackLimits {
    pub max_message_bytes: usize,
    pub max_concurrent_requests: usize,
    pub max_concurrent_open_requests: usize,
    pub body_read_timeout: Duration,
}

impl StackLimits {
    pub fn from_settings(s: &crate::config::ServerSettings) -> Self {
        Self {
            max_message_bytes: s.max_message_bytes,
            max_concurrent_requests: s.max_concurrent_requests,
            max_concurrent_open_requests: s.max_concurrent_open_requests,
            body_read_timeout: Duration::from_millis(s.body_read_timeout_ms),
        }
    }
}

/// The whole stack, for `tonic::transport::Server::layer`.
pub fn server_stack(metrics: Metrics, limits: &StackLimits) -> ServerStack {
    tower::ServiceBuilder::new()
        .layer(BodyTimeoutLayer::new(BodyTimeout {
            timeout: limits.body_read_timeout,
        }))
        .layer(MessageLimitLayer::new(MessageLimit {
            max: limits.max_message_bytes,
        }))
        .layer(GrpcTraceLayer::new(metrics))
        .layer(AdmissionLayer::new(
            limits.max_concurrent_requests,
            limits.max_concurrent_open_requests,
        ))
}
