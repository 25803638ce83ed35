//! The admin HTTP listener: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::repository::Repository;

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    repo: Arc<Repository>,
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub fn spawn(
    listener: TcpListener,
    metrics: Metrics,
    repo: Arc<Repository>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, repo });
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

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    if s.repo.is_ready() {
        (
            StatusCode::OK,
            format!("ready: {}\n", s.repo.names().join(", ")),
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
    }
}
