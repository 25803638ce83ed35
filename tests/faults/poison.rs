//! A poison image mid-load (issue 10, item 2): only that call fails, with INVALID_ARGUMENT,
//! and both replicas stay up and keep serving.
//!
//! On a decoder without an aspect-ratio bound the replica that gets it aborts ("memory
//! allocation of 65536000000 bytes failed"), the gateway retries it on the other replica,
//! which aborts too, and every caller then gets UNAVAILABLE.

use std::time::Duration;

use marquee_e2e::*;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::*;
use crate::png::poison_png;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_image_mid_load_fails_only_its_own_call_and_both_replicas_stay_up() {
    let _one_at_a_time = serial().await;
    let env = replica_env_serving(&model_repo(), &[MODEL, POISON_MODEL], 0, 0);
    let mut c = Cluster::start(env, |_| {}).await;
    let load = c.steady_load().await;
    let mut client = ImageServiceClient::new(c.gw.channel().await);
    let mut poison_req = classify_request(poison_png());
    poison_req.model = POISON_MODEL.into();
    let mut req = with_key(poison_req, ACME_KEY);
    req.set_timeout(Duration::from_secs(30));
    let poison = client.classify(req).await;
    let (poison_code, poison_message) = match &poison {
        Ok(r) => (Code::Ok, format!("answered {:?}", r.get_ref().labels)),
        Err(e) => (e.code(), e.message().to_string()),
    };
    let at = load.completed();
    let flowed = load.wait_more(at, 200, Duration::from_secs(60)).await;
    let outcomes = load.finish().await;
    let s = Stats::of(&outcomes);
    // Both replicas: still running, still SERVING, and answering a normal call directly.
    let mut replica_state = Vec::new();
    let mut all_up = true;
    for r in c.replicas.iter_mut() {
        let alive = r.is_alive();
        let mut serving = false;
        if alive {
            let ch = r.channel().await;
            serving = HealthClient::new(ch.clone())
                .check(HealthCheckRequest::default())
                .await
                .is_ok_and(|h| h.into_inner().status == ServingStatus::Serving as i32)
                && ImageServiceClient::new(ch)
                    .classify(classify_request(c.inputs.pngs[0].clone()))
                    .await
                    .is_ok();
        }
        all_up &= alive && serving;
        let (name, how) = (r.name, r.describe());
        replica_state.push(format!(
            "{name} {how}{}",
            if serving { " and serving" } else { "" }
        ));
    }
    let healthy = eventually(Duration::from_secs(5), || async { c.healthy() == 2.0 }).await;
    report(
        "Poison image (1×16,000,000 greyscale PNG, 31 KB, to `efficientnet_lite0`) through the gateway mid-load",
        "that call alone fails with INVALID_ARGUMENT; 0 other calls fail; both replicas stay up",
        &format!(
            "poison call {} ({}); other calls {}, failed {}; replicas: {}; gateway sees {} healthy; codes: {}; first failures: {:?}",
            code_name(poison_code),
            truncate(&poison_message, 160),
            s.calls,
            s.failed,
            replica_state.join(", "),
            c.healthy(),
            s.codes_text(),
            s.examples.iter().take(2).collect::<Vec<_>>()
        ),
    );
    c.stop();
    assert_eq!(
        poison_code,
        Code::InvalidArgument,
        "the poison image is refused: {poison_message}"
    );
    assert!(all_up, "both replicas stay up: {replica_state:?}");
    assert!(healthy, "the gateway keeps both replicas");
    assert!(flowed, "the load kept flowing");
    assert_eq!(s.failed, 0, "no other call failed: {:?}", s.examples);
    assert_eq!(s.wrong, 0, "every caller got its own answer");
}
