//! SIGTERM one replica mid-load: it reports NOT_SERVING, the gateway stops sending it calls
//! (health check every 100 ms, inside the replica's 500 ms drain delay), in-flight calls
//! finish, it exits 0, and no call fails.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Longer than the gateway's health interval in these tests (100 ms) plus its check timeout,
/// so the gateway has ejected the replica before its listener closes.
const DRAIN_DELAY_MS: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_replica_mid_load_drains_it_without_failing_a_call() {
    let _one_at_a_time = serial().await;
    let mut c = Cluster::start(
        replica_env(&marquee_e2e::model_repo(), 0, DRAIN_DELAY_MS),
        |_| {},
    )
    .await;
    let load = c.steady_load().await;
    let at_term = load.completed();
    let termed = Instant::now();
    c.replicas[1].sigterm();
    let ejected = eventually(Duration::from_secs(10), || async { c.healthy() == 1.0 }).await;
    let exit = c.replicas[1].wait_exit(Duration::from_secs(60)).await;
    let exit_after = termed.elapsed();
    let flowed = load.wait_more(at_term, 200, Duration::from_secs(60)).await;
    let outcomes = load.finish().await;
    let s = Stats::of(&outcomes);
    let exit_text = c.replicas[1].describe();
    report(
        "SIGTERM (drain) one of two vision replicas mid-load",
        "0 failed calls; replica NOT_SERVING, ejected, exits 0 after finishing in-flight calls",
        &format!(
            "calls {}, failed {}, wrong answers {}, retries {}, ejected {}, replica {exit_text} {:.1} s after SIGTERM (drain delay {DRAIN_DELAY_MS} ms); codes: {}",
            s.calls,
            s.failed,
            s.wrong,
            c.retries(),
            yes(ejected),
            exit_after.as_secs_f64(),
            s.codes_text()
        ),
    );
    c.stop();
    assert!(flowed, "the load kept flowing on the other replica");
    assert_eq!(s.failed, 0, "no call failed: {:?}", s.examples);
    assert_eq!(s.wrong, 0, "every caller got its own answer");
    assert!(ejected, "the draining replica was ejected");
    assert!(
        exit.is_some_and(|e| e.success()),
        "the drained replica exited cleanly: {exit_text}"
    );
}
