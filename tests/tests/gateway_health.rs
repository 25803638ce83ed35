//! Per-model `grpc.health.v1` at the gateway, answered from its routing table: SERVING while a
//! healthy replica serves the model, NOT_SERVING once none does, NOT_FOUND for a model no
//! backend serves. Real gateway, real vision backend, real gRPC.

use std::time::Duration;

use marquee_e2e::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Longest wait for the gateway to notice a dead backend; its health checks run every 100 ms
/// (`gateway_settings`), so this is only a bound for a stuck test, never a pace.
const NOTICE: Duration = Duration::from_secs(20);

fn asking(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

fn status(r: &HealthCheckResponse) -> ServingStatus {
    ServingStatus::try_from(r.status).expect("a known serving status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_health_follows_the_backend_replicas() {
    let backend = start(fashion_backend_settings()).await;
    let gw = start_gateway(gateway_settings(&[backend.grpc_addr])).await;
    let mut health = HealthClient::new(gw.channel().await);

    // A served model is SERVING as soon as the gateway serves; the whole server too.
    let served = health.check(asking("fashion_cnn")).await.unwrap();
    assert_eq!(status(served.get_ref()), ServingStatus::Serving);
    let server = health.check(asking("")).await.unwrap();
    assert_eq!(status(server.get_ref()), ServingStatus::Serving);

    // A model no backend serves is unknown, for Check and Watch alike.
    let unknown = health.check(asking("no_such_model")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let unknown = health.watch(asking("no_such_model")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // A watcher sees the model's status now, then its change when the only replica goes.
    let mut watch = health
        .watch(asking("fashion_cnn"))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().expect("the current status");
    assert_eq!(status(&first), ServingStatus::Serving);
    backend.shutdown.cancel();
    let next = tokio::time::timeout(NOTICE, watch.message())
        .await
        .expect("the gateway noticed the backend going away")
        .unwrap()
        .expect("the stream goes on");
    assert_eq!(status(&next), ServingStatus::NotServing);

    // Still routed (the gateway remembers the backend's models), so NOT_SERVING, not unknown.
    let down = health.check(asking("fashion_cnn")).await.unwrap();
    assert_eq!(status(down.get_ref()), ServingStatus::NotServing);
    let still_unknown = health.check(asking("no_such_model")).await.unwrap_err();
    assert_eq!(still_unknown.code(), Code::NotFound);
    gw.shutdown.cancel();
}
