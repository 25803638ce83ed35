//! The admin HTTP listener: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`.
//! Both probes fail with the reason once a worker thread died (see [`crate::liveness`]).
//! With `repository.batching_control` (off by default: this port is not authenticated),
//! `POST /batching/{model}/{cap}` sets a model's batch cap at run time.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::liveness::Liveness;
use crate::metrics::Metrics;

/// Readiness check: `Some(detail)` when ready, `None` when not.
pub type Readiness = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Sets a model's batch cap at run time: `(model, Some(cap) or None for the model's own)`.
pub type BatchControl = Arc<dyn Fn(&str, Option<usize>) -> Result<String, String> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    ready: Readiness,
    liveness: Liveness,
    batching: Option<BatchControl>,
}

/// Admin connections open at once. Probes and scrapes use one or two each; past this a new
/// connection is closed at once, so a flood of idle connections cannot exhaust the process's
/// file descriptors.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Longest an admin connection stays open, whatever it does: a scrape or a probe takes
/// milliseconds, and a keep-alive client simply reconnects.
pub const ADMIN_CONNECTION_MAX: Duration = Duration::from_secs(300);

/// Serves the admin endpoints on `listener` until `shutdown`. Each connection must send its
/// request headers within `header_read_timeout` (`server.body_read_timeout_ms`), the same
/// slow-loris bound as the gRPC listener's request bodies: `axum::serve` has no such timer.
pub fn spawn(
    listener: TcpListener,
    metrics: Metrics,
    ready: Readiness,
    liveness: Liveness,
    batching: Option<BatchControl>,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/batching/{model}/{cap}", post(set_batching))
        .with_state(AdminState {
            metrics,
            ready,
            liveness,
            batching,
        });
    let connections = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                continue; // Dropping the stream closes it.
            };
            let service = TowerToHyperService::new(app.clone());
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::timeout(ADMIN_CONNECTION_MAX, connection) => {}
                }
                drop(permit);
            });
        }
    });
}

async fn metrics_text(State(s): State<AdminState>) -> ([(&'static str, &'static str); 1], String) {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AdminState>) -> (StatusCode, String) {
    match s.liveness.death() {
        None => (StatusCode::OK, "ok\n".into()),
        Some(death) => (StatusCode::SERVICE_UNAVAILABLE, format!("dead: {death}\n")),
    }
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    if let Some(death) = s.liveness.death() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {death}\n"),
        );
    }
    match (s.ready)() {
        Some(detail) => (StatusCode::OK, format!("ready: {detail}\n")),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
    }
}

/// `POST /batching/{model}/{cap}`: `cap` is a number (1 turns batching off) or `auto` (the
/// model's own choice). 404 unless `repository.batching_control` is on.
async fn set_batching(
    State(s): State<AdminState>,
    Path((model, cap)): Path<(String, String)>,
) -> (StatusCode, String) {
    let Some(control) = s.batching else {
        return (
            StatusCode::NOT_FOUND,
            "run-time batch caps are off (`repository.batching_control`)\n".into(),
        );
    };
    let cap = match cap.as_str() {
        "auto" => None,
        n => match n.parse::<usize>() {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("cap must be a number >= 1 or `auto`, got `{cap}`\n"),
                );
            }
        },
    };
    match control(&model, cap) {
        Ok(now) => (StatusCode::OK, now + "\n"),
        Err(e) => (StatusCode::NOT_FOUND, e + "\n"),
    }
}
