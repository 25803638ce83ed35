//! The admin HTTP listener: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`.
//! Both probes fail with the reason once a worker thread died (see [`crate::liveness`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::liveness::Liveness;
use crate::metrics::Metrics;

/// Readiness check: `Some(detail)` when ready, `None` when not.
pub type Readiness = Arc<dyn Fn() -> Option<String> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    ready: Readiness,
    liveness: Liveness,
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub fn spawn(
    listener: TcpListener,
    metrics: Metrics,
    ready: Readiness,
    liveness: Liveness,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            metrics,
            ready,
            liveness,
        });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
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
