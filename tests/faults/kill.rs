//! SIGKILL one replica mid-load: no idempotent call fails (the gateway retries it on the other
//! replica), the dead replica is ejected, and once restarted (same address) it is re-admitted
//! and serves again.

use std::time::Duration;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_replica_mid_load_fails_no_call_and_the_restarted_replica_is_readmitted() {
    let _one_at_a_time = serial().await;
    let mut c = Cluster::start(replica_env(&marquee_e2e::model_repo(), 0, 0), |_| {}).await;
    let load = c.steady_load().await;
    let at_kill = load.completed();
    c.replicas[1].sigkill();
    let ejected = eventually(Duration::from_secs(10), || async { c.healthy() == 1.0 }).await;
    // The load keeps flowing on one replica.
    let flowed = load.wait_more(at_kill, 200, Duration::from_secs(60)).await;
    let r = &mut c.replicas[1];
    tokio::task::block_in_place(|| r.restart_on_same_port());
    let readmitted = eventually(Duration::from_secs(30), || async {
        c.healthy() == 2.0 && c.replicas[1].served().await >= 20.0
    })
    .await;
    let served_after_restart = c.replicas[1].served().await;
    let outcomes = load.finish().await;
    let s = Stats::of(&outcomes);
    let retries = c.retries();
    report(
        "SIGKILL one of two vision replicas mid-load, then restart it",
        "0 failed idempotent calls (retried on the other replica); replica ejected; re-admitted after restart",
        &format!(
            "calls {}, failed {}, wrong answers {}, retries {retries}, ejected {}, re-admitted {} ({served_after_restart} calls served by the restarted process); codes: {}",
            s.calls,
            s.failed,
            s.wrong,
            yes(ejected),
            yes(readmitted),
            s.codes_text()
        ),
    );
    c.stop();
    assert!(flowed, "the load kept flowing on the surviving replica");
    assert_eq!(s.failed, 0, "no call failed: {:?}", s.examples);
    assert_eq!(s.wrong, 0, "every caller got its own answer");
    assert!(ejected, "the killed replica was ejected");
    assert!(
        readmitted,
        "the restarted replica was re-admitted and served calls"
    );
}
