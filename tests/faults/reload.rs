//! Hot reload of a new model version mid-load: no call fails, responses switch to the new
//! version and never mix.
//!
//! Each replica polls the shared repository and swaps versions on its own, so through the
//! gateway a caller may see version 1 and 2 interleaved while one replica has switched and the
//! other not yet. "Never mix" is therefore checked where it is defined:
//! - per replica: a task calling each replica directly sees 1…1 2…2, never 1 after a 2;
//! - through the gateway: once both replicas have switched (each confirmed by a direct call
//!   answering 2), every call sent afterwards answers 2;
//! - per response: each carries one version, and its numbers are exactly this caller's own
//!   result (logits bit-for-bit within 1e-4 of the reference, the right top label), so no
//!   response is stitched from rows computed by different versions or for other callers.

use std::time::{Duration, Instant};

use marquee_e2e::*;
use marquee_proto::vision::image_service_client::ImageServiceClient;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_version_mid_load_fails_no_call_and_responses_switch_without_mixing() {
    let _one_at_a_time = serial().await;
    let repo = temp_repo(&[MODEL]);
    let c = Cluster::start(replica_env(repo.path(), 100, 0), |_| {}).await;
    let mut targets = c.gateway_targets(4).await;
    for r in &c.replicas {
        targets.push((r.name.to_string(), r.channel().await));
    }
    let load = Load::start(targets, c.inputs.clone(), Duration::from_secs(120));
    assert!(
        c.wait_all_served(20.0, Duration::from_secs(30)).await,
        "both replicas serve version 1 before the new version arrives"
    );
    // Version 2 appears atomically: a finished directory moved into place.
    let model_dir = repo.path().join(MODEL);
    let staging = model_dir.join(".2-staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(model_dir.join("1/model.pt"), staging.join("model.pt")).unwrap();
    let dropped_in = Instant::now();
    std::fs::rename(&staging, model_dir.join("2")).unwrap();
    let switched = eventually(Duration::from_secs(60), || async {
        for r in &c.replicas {
            if !r.serves_version("2").await {
                return false;
            }
        }
        true
    })
    .await;
    // The gauge is set just before the swap: a direct call answering 2 proves each replica
    // has swapped before `all_switched` is taken.
    for r in &c.replicas {
        let v = ImageServiceClient::new(r.channel().await);
        assert!(
            eventually(Duration::from_secs(10), || {
                let mut v = v.clone();
                let req = classify_request(c.inputs.pngs[0].clone());
                async move {
                    v.classify(req)
                        .await
                        .is_ok_and(|r| r.into_inner().model_version == "2")
                }
            })
            .await,
            "replica {} answers version 2",
            r.name
        );
    }
    let all_switched = Instant::now();
    let switch_took = all_switched - dropped_in;
    let at_switch = load.completed();
    let flowed = load
        .wait_more(at_switch, 200, Duration::from_secs(60))
        .await;
    let outcomes = load.finish().await;
    let s = Stats::of(&outcomes);

    let odd_versions = outcomes
        .iter()
        .filter(|o| o.code == tonic::Code::Ok && o.model_version != "1" && o.model_version != "2")
        .count();
    // Per replica: the sequence of each direct task never goes back from 2 to 1.
    let mut replica_back_to_1 = 0;
    let mut replica_saw_2 = Vec::new();
    for r in &c.replicas {
        let seq: Vec<&str> = outcomes
            .iter()
            .filter(|o| o.target == r.name && o.code == tonic::Code::Ok)
            .map(|o| o.model_version.as_str())
            .collect();
        if let Some(first2) = seq.iter().position(|v| *v == "2") {
            replica_back_to_1 += seq[first2..].iter().filter(|v| **v == "1").count();
            replica_saw_2.push(r.name);
        }
    }
    // Through the gateway.
    let gw: Vec<&Outcome> = outcomes.iter().filter(|o| o.target == "gateway").collect();
    let gw_v2 = gw.iter().filter(|o| o.model_version == "2").count();
    let gw_after: Vec<&&Outcome> = gw.iter().filter(|o| o.sent >= all_switched).collect();
    let gw_v1_after_switch = gw_after.iter().filter(|o| o.model_version == "1").count();
    let first_gw_v2 = gw
        .iter()
        .filter(|o| o.model_version == "2")
        .map(|o| o.sent)
        .min();
    let interleaved = first_gw_v2.map_or(0, |t| {
        gw.iter()
            .filter(|o| o.sent > t && o.sent < all_switched && o.model_version == "1")
            .count()
    });
    let mut v1_still_ready = 0.0;
    for r in &c.replicas {
        if let Some(t) = r.metrics().await {
            v1_still_ready += sample_sum(
                &t,
                "marquee_model_ready",
                &[("model", MODEL), ("version", "1")],
            );
        }
    }
    report(
        "Hot reload of model version 2 mid-load (two replicas, each swapping on its own)",
        "0 failed calls; responses switch to version 2; per replica never back to 1; through the gateway only 2 once both replicas switched; every response is the caller's own result",
        &format!(
            "calls {} ({} through the gateway, {} at version 2), failed {}, wrong answers {}, versions other than 1/2: {odd_versions}; both replicas on 2 after {:.1} s; direct per-replica sequences going back to 1: {replica_back_to_1}; gateway calls sent after both switched: {} of which at version 1: {gw_v1_after_switch}; version-1 answers between the first version-2 answer and both switching (replicas switch independently): {interleaved}; codes: {}",
            s.calls,
            gw.len(),
            gw_v2,
            s.failed,
            s.wrong,
            switch_took.as_secs_f64(),
            gw_after.len(),
            s.codes_text()
        ),
    );
    c.stop();
    assert!(switched, "both replicas loaded version 2");
    assert!(flowed, "the load kept flowing after the switch");
    assert_eq!(s.failed, 0, "no call failed: {:?}", s.examples);
    assert_eq!(s.wrong, 0, "every response is the caller's own result");
    assert_eq!(odd_versions, 0, "every response names version 1 or 2");
    assert_eq!(replica_saw_2.len(), 2, "each replica's direct caller saw 2");
    assert_eq!(replica_back_to_1, 0, "no replica went back to version 1");
    assert!(gw_v2 > 0, "responses through the gateway switched to 2");
    assert!(!gw_after.is_empty(), "calls were sent after the switch");
    assert_eq!(
        gw_v1_after_switch, 0,
        "once both replicas switched, no call answered version 1"
    );
    assert_eq!(
        v1_still_ready, 0.0,
        "version 1 is unloaded on both replicas"
    );
}
