//! Fault suite: feedback writes (`RecordFeedback`) against the real recommendation binary with
//! a full disk (`RLIMIT_FSIZE` mid-record) and with SIGKILL mid-load: no acknowledged event is
//! ever lost, verified after a restart (issue 10, item 11).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use marquee_e2e::*;
use tonic::Code;

use marquee_e2e::state::{command_with_file_limit, run_to_exit, set_file_size_limit};
use marquee_proto::recommendation as pb;
use marquee_proto::recommendation::recommender_client::RecommenderClient;
use tonic::transport::Channel;

/// Log header, and one feedback record (8-byte frame head + 34-byte payload).
const LOG_HEADER: u64 = 8;
const RECORD: u64 = 42;

fn rec_env(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "MARQUEE__REPOSITORY__PATH",
            model_repo().display().to_string(),
        ),
        ("MARQUEE__REPOSITORY__THREADS", "1".to_string()),
        (
            "MARQUEE__RECOMMENDATION__STATE_DIR",
            dir.display().to_string(),
        ),
    ]
}

/// Catalogue item ids to give feedback on.
fn catalogue_items(n: usize) -> Vec<i64> {
    let data = marquee_recommendation::model::ModelData::load(&model_repo().join("recommender"))
        .expect("recommender built");
    let mut ids: Vec<i64> = data.catalog.by_id.keys().copied().collect();
    ids.sort_unstable();
    ids.truncate(n);
    ids
}

async fn rec_client(addr: std::net::SocketAddr) -> RecommenderClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("recommender accepts connections");
    RecommenderClient::new(ch)
}

fn watch(user_id: i64, item_id: i64) -> pb::RecordFeedbackRequest {
    pb::RecordFeedbackRequest {
        user_id,
        item_id,
        event: pb::FeedbackEvent::Watch as i32,
        timestamp_ms: 0,
    }
}

/// A user's history length as the service holds it: the `history_length` of one more event.
/// Test users are not training users, so it is their replayed feedback + 1.
async fn history_after_one_more(c: &mut RecommenderClient<Channel>, user: i64, item: i64) -> u32 {
    c.record_feedback(watch(user, item))
        .await
        .expect("feedback accepted after the restart")
        .into_inner()
        .history_length
}

async fn admin_metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The real binary with a file-size limit that ends mid-record (a full disk): events are
/// refused with UNAVAILABLE once the log is full, the disk is then freed, more events are
/// acknowledged, a user is forgotten (compaction), more events follow, then SIGKILL. After a
/// restart every acknowledged event is in the users' histories (also those acknowledged after
/// the first failure), the forgotten user's are not, and the log had no torn tail to cut.
#[test]
fn a_full_disk_mid_record_loses_no_acknowledged_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let items = catalogue_items(50);
    let (a, b, gone) = (9_100_001i64, 9_100_002i64, 9_100_003i64);
    let mut child = ChildServer::spawn(command_with_file_limit(
        "marquee-recommendation",
        &rec_env(dir.path()),
        None,
    ));
    // Room for 20 whole records and 17 bytes of the 21st.
    set_file_size_limit(child.child.id(), Some(LOG_HEADER + 20 * RECORD + 17));
    let rt = runtime();
    let acked: std::collections::HashMap<i64, u32> = rt.block_on(async {
        let mut c = rec_client(child.grpc_addr).await;
        let mut acked = std::collections::HashMap::new();
        // The forgotten user's events come first, so compaction has something to remove.
        for (n, user) in [gone, gone, a, b].into_iter().cycle().enumerate().take(200) {
            match c.record_feedback(watch(user, items[n % items.len()])).await {
                Ok(_) => *acked.entry(user).or_insert(0) += 1,
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "a full disk: {e:?}");
                    break;
                }
            }
        }
        assert_eq!(acked.values().sum::<u32>(), 20, "20 records fit: {acked:?}");
        // Still full: refused again, and nothing of these is kept either.
        for &item in &items[..5] {
            let e = c.record_feedback(watch(a, item)).await.unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        }
        // The operator frees the disk: events after the failures are acknowledged.
        set_file_size_limit(child.child.id(), None);
        for n in 0..30 {
            let user = if n % 2 == 0 { a } else { b };
            c.record_feedback(watch(user, items[n % items.len()]))
                .await
                .expect("the disk has room again");
            *acked.entry(user).or_insert(0) += 1;
        }
        // A compaction, then more events.
        c.forget_user(pb::ForgetUserRequest { user_id: gone })
            .await
            .expect("forget");
        acked.remove(&gone);
        for &item in &items[..10] {
            c.record_feedback(watch(a, item))
                .await
                .expect("after compaction");
            *acked.entry(a).or_insert(0) += 1;
        }
        assert!(
            admin_metric(
                child.admin_addr,
                "marquee_recommendation_feedback_log_errors_total"
            )
            .await
                >= 6.0
        );
        acked
    });
    child.kill();
    rt.shutdown_background();

    let child = ChildServer::start("marquee-recommendation", &rec_env(dir.path()));
    let rt = runtime();
    rt.block_on(async {
        assert_eq!(
            admin_metric(
                child.admin_addr,
                "marquee_recommendation_feedback_log_dropped_bytes_total"
            )
            .await,
            0.0,
            "no partial record was left in the log"
        );
        let mut c = rec_client(child.grpc_addr).await;
        for user in [a, b] {
            assert_eq!(
                history_after_one_more(&mut c, user, items[0]).await,
                acked[&user] + 1,
                "user {user}: every acknowledged event replayed, nothing else"
            );
        }
        assert_eq!(
            history_after_one_more(&mut c, gone, items[0]).await,
            1,
            "the forgotten user stays forgotten"
        );
    });
}

/// Four concurrent writers while the disk fills up mid-record, is freed again, and the process
/// is SIGKILLed mid-load: after a restart each user's history holds every acknowledged event
/// (and at most the one in flight per writer when the kill came).
#[test]
fn sigkill_mid_load_after_a_full_disk_loses_no_acknowledged_feedback() {
    const WRITERS: i64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let items = catalogue_items(50);
    let mut child = ChildServer::spawn(command_with_file_limit(
        "marquee-recommendation",
        &rec_env(dir.path()),
        None,
    ));
    set_file_size_limit(child.child.id(), Some(LOG_HEADER + 30 * RECORD + 29));
    let rt = runtime();
    let user = |w: i64| 9_200_000 + w;
    let acked: Vec<u32> = rt.block_on(async {
        let acked: Arc<Vec<AtomicUsize>> =
            Arc::new((0..WRITERS).map(|_| AtomicUsize::new(0)).collect());
        let refused = Arc::new(AtomicUsize::new(0));
        for w in 0..WRITERS {
            let (acked, refused, items) = (acked.clone(), refused.clone(), items.clone());
            let mut c = rec_client(child.grpc_addr).await;
            tokio::spawn(async move {
                for n in 0.. {
                    match c
                        .record_feedback(watch(user(w), items[n % items.len()]))
                        .await
                    {
                        Ok(_) => {
                            acked[w as usize].fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) if e.code() == Code::Unavailable => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(_) => return, // the server was killed
                    }
                }
            });
        }
        let total = |a: &[AtomicUsize]| a.iter().map(|n| n.load(Ordering::SeqCst)).sum::<usize>();
        wait_until(
            "refusals on the full disk",
            Duration::from_secs(60),
            || async { (refused.load(Ordering::SeqCst) >= 20).then_some(()) },
        )
        .await;
        assert_eq!(total(&acked), 30, "exactly the whole records that fit");
        set_file_size_limit(child.child.id(), None);
        wait_until(
            "writes after the disk was freed",
            Duration::from_secs(60),
            || async { (total(&acked) >= 130).then_some(()) },
        )
        .await;
        // SIGKILL with the writers still going.
        child.kill();
        acked
            .iter()
            .map(|n| n.load(Ordering::SeqCst) as u32)
            .collect()
    });
    rt.shutdown_background();

    let child = ChildServer::start("marquee-recommendation", &rec_env(dir.path()));
    let rt = runtime();
    rt.block_on(async {
        let mut c = rec_client(child.grpc_addr).await;
        for w in 0..WRITERS {
            let h = history_after_one_more(&mut c, user(w), items[0]).await;
            let n = acked[w as usize];
            assert!(
                h > n && h <= n + 2,
                "writer {w}: {n} events acknowledged, {} replayed",
                h - 1
            );
        }
    });
}

/// The user-id key is created atomically: a start that cannot write it whole (a file-size
/// limit below the key's 32 bytes) fails and leaves no key file behind, so the next start
/// creates a whole key instead of refusing a short one.
#[test]
fn a_key_file_that_cannot_be_written_whole_is_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let status = run_to_exit(
        command_with_file_limit("marquee-recommendation", &rec_env(dir.path()), Some(10)),
        Duration::from_secs(60),
    );
    assert!(!status.success(), "the start must fail without a key");
    let key = dir.path().join("user_id.key");
    assert!(!key.exists(), "no partial key file");
    assert!(!dir.path().join("user_id.key.tmp").exists());
    let child = ChildServer::start("marquee-recommendation", &rec_env(dir.path()));
    assert_eq!(std::fs::read(&key).unwrap().len(), 32);
    drop(child);
}
