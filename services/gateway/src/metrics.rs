//! Gateway metrics, registered in the server's registry. Tenant labels come from config only.

use marquee_core::metrics::{Registrar, buckets};
use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec, Registry};

#[derive(Clone)]
pub struct GatewayMetrics {
    /// Calls by route (gRPC method), tenant and code.
    pub requests: IntCounterVec,
    /// Calls to backends by backend and code.
    pub backend_requests: IntCounterVec,
    /// Retries on another replica, by backend and route.
    pub retries: IntCounterVec,
    /// Possible poison requests by backend and outcome: `failed` (it was in flight on
    /// replicas that died, and was not sent further) or `refused` (the same request again).
    pub poison_requests: IntCounterVec,
    /// Healthy replicas by backend.
    pub endpoints_healthy: IntGaugeVec,
    /// Credential failures by reason.
    pub auth_failures: IntCounterVec,
    /// Items per coalesced backend call, by route.
    pub batch_size: HistogramVec,
    /// Batch keys held, by route (bounded by `routes.<route>.max_batch_keys`).
    pub batch_keys: IntGaugeVec,
}

impl GatewayMetrics {
    pub fn register(registry: &Registry) -> Self {
        // Fixed names and labels: registering them can only fail on a bug.
        let r = Registrar(registry);
        let bug = "valid, unique metric, this is a bug";
        let counter =
            |name: &str, help: &str, labels: &[&str]| r.counter_vec(name, help, labels).expect(bug);
        let gauge = r
            .gauge_vec(
                "marquee_gateway_endpoints_healthy",
                "Healthy replicas.",
                &["backend"],
            )
            .expect(bug);
        let batch_size = r
            .histogram_vec(
                "marquee_gateway_batch_size",
                "Items per coalesced backend call.",
                &["route"],
                buckets::BATCH,
            )
            .expect(bug);
        let batch_keys = r
            .gauge_vec(
                "marquee_gateway_batch_keys",
                "Batch keys (model and call shape) held by the cross-client batcher.",
                &["route"],
            )
            .expect(bug);
        Self {
            requests: counter(
                "marquee_gateway_requests_total",
                "Calls by route, tenant and code.",
                &["route", "tenant", "code"],
            ),
            backend_requests: counter(
                "marquee_gateway_backend_requests_total",
                "Backend calls by backend and code.",
                &["backend", "code"],
            ),
            retries: counter(
                "marquee_gateway_retries_total",
                "Retries on another replica.",
                &["backend", "route"],
            ),
            poison_requests: counter(
                "marquee_gateway_poison_requests_total",
                "Requests not retried further because the replicas they reached died under them (failed), or refused because the same request did before (refused).",
                &["backend", "outcome"],
            ),
            endpoints_healthy: gauge,
            auth_failures: counter(
                "marquee_gateway_auth_failures_total",
                "Refused credentials by reason.",
                &["reason"],
            ),
            batch_size,
            batch_keys,
        }
    }
}
