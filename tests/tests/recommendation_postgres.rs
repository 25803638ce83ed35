//! The recommender on the PostgreSQL store (issue 12), against a real throwaway cluster
//! (`marquee_e2e::postgres`): replicas that keep no user state of their own, behind a real
//! gateway.
//!
//! - two replicas on one database: feedback through one shapes the other's next
//!   recommendation at once; `ForgetUser` through one leaves nothing of the user through
//!   either, nor in the database's rows; tenants stay apart through the gateway; a replica
//!   with another user-id key is refused;
//! - SIGKILL of a replica during feedback writes: every acknowledged event is committed;
//! - the database stopped under load: `UNAVAILABLE` with `RetryInfo` (passed on by the
//!   gateway, which keeps the replica), then service again without a restart;
//! - retention deletes expired rows at start and while serving.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use marquee_e2e::postgres::{self, Postgres, bytea};
use marquee_e2e::*;
use marquee_proto::recommendation::recommend_request::Subject;
use marquee_proto::recommendation::recommender_client::RecommenderClient;
use marquee_proto::recommendation::{
    AnonymousContext, FeedbackEvent, ForgetUserRequest, RecommendRequest, RecommendResponse,
    RecordFeedbackRequest, SimilarItemsRequest,
};
use marquee_recommendation::privacy::UserKey;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const TOKEN: &str = "gateway-tenant-token-5d1e9a7c";
const A_KEY: &str = "pg-tenant-a-key-7c2e41";
const B_KEY: &str = "pg-tenant-b-key-18f0d3";
/// The user-id key every replica mounts.
const KEY: [u8; 32] = [7; 32];
/// User ids neither the training data nor other tests use.
const USER: i64 = 910_001;
const OTHER: i64 = 910_002;

/// A cluster plus the files every replica reads: connection string, user-id key, tenant token.
struct Shared {
    pg: Postgres,
    dir: tempfile::TempDir,
    url_file: PathBuf,
    key_file: PathBuf,
    token_file: PathBuf,
}

impl Shared {
    fn new() -> Self {
        let pg = Postgres::start();
        let dir = tempfile::tempdir().unwrap();
        let url_file = pg.url_file(dir.path());
        let key_file = dir.path().join("user_id.key");
        std::fs::write(&key_file, KEY).unwrap();
        let token_file = dir.path().join("tenant.token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        Self {
            pg,
            dir,
            url_file,
            key_file,
            token_file,
        }
    }

    /// In-process settings of a replica on this database.
    fn settings(&self, name: &str) -> marquee_recommendation::Settings {
        let mut s = recommendation_settings(&self.dir.path().join(name));
        let r = &mut s.recommendation;
        r.store = marquee_recommendation::StoreKind::Postgres;
        r.postgres.url_file = Some(self.url_file.clone());
        r.user_id_key_file = Some(self.key_file.clone());
        r.tenant_token_file = Some(self.token_file.clone());
        s
    }

    /// The environment of a replica binary on this database, with `key_file`.
    fn env(&self, name: &str, key_file: &Path) -> Vec<(&'static str, String)> {
        let path = |p: &Path| p.display().to_string();
        vec![
            ("MARQUEE__REPOSITORY__PATH", path(&model_repo())),
            ("MARQUEE__REPOSITORY__THREADS", "1".into()),
            ("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "0".into()),
            (
                "MARQUEE__RECOMMENDATION__STATE_DIR",
                path(&self.dir.path().join(name)),
            ),
            ("MARQUEE__RECOMMENDATION__STORE", "postgres".into()),
            (
                "MARQUEE__RECOMMENDATION__POSTGRES__URL_FILE",
                path(&self.url_file),
            ),
            ("MARQUEE__RECOMMENDATION__USER_ID_KEY_FILE", path(key_file)),
            (
                "MARQUEE__RECOMMENDATION__TENANT_TOKEN_FILE",
                path(&self.token_file),
            ),
        ]
    }

    /// Starts a replica binary (a child process, so it can be SIGKILLed).
    fn child(&self, name: &str) -> ChildServer {
        ChildServer::start("marquee-recommendation", &self.env(name, &self.key_file))
    }

    /// Feedback rows and tombstones in the database for `user_id` of `tenant`.
    fn rows(&self, tenant: &str, user_id: i64) -> (i64, i64) {
        let key = bytea(
            &UserKey::from_bytes(KEY.to_vec())
                .hash_for(tenant, user_id)
                .0,
        );
        (
            self.pg.count(&format!(
                "SELECT count(*) FROM marquee_feedback WHERE user_key = {key}"
            )),
            self.pg.count(&format!(
                "SELECT count(*) FROM marquee_forgotten WHERE user_key = {key}"
            )),
        )
    }
}

async fn client(addr: std::net::SocketAddr) -> RecommenderClient<Channel> {
    RecommenderClient::new(lifecycle::channel(addr).await)
}

/// A direct call as `tenant` (with the gateway's token), or as the default tenant.
fn as_tenant<T>(message: T, tenant: Option<&str>) -> tonic::Request<T> {
    match tenant {
        Some(t) => with_tenant(message, t, Some(TOKEN)),
        None => tonic::Request::new(message),
    }
}

fn like(user_id: i64, item_id: i64) -> RecordFeedbackRequest {
    RecordFeedbackRequest {
        user_id,
        item_id,
        event: FeedbackEvent::Like as i32,
        timestamp_ms: 0,
    }
}

async fn recommend(
    c: &mut RecommenderClient<Channel>,
    tenant: Option<&str>,
    user_id: i64,
) -> RecommendResponse {
    c.recommend(as_tenant(explained(user_id), tenant))
        .await
        .expect("recommend")
        .into_inner()
}

/// The smallest training user id.
fn training_user() -> i64 {
    let data =
        marquee_recommendation::model::ModelData::load(&model_repo().join("recommender")).unwrap();
    *data.users.keys().min().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database_share_feedback_erasure_and_tenants() {
    let db = Arc::new(Shared::new());
    // Both replicas start at once on an empty database: the migrations run once.
    let starting: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let db = db.clone();
            std::thread::spawn(move || db.child(name))
        })
        .collect();
    let replicas: Vec<ChildServer> = starting.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        db.pg
            .query("SELECT string_agg(version::text, ',') FROM marquee_schema"),
        "1",
        "each migration applied once"
    );
    let mut a = client(replicas[0].grpc_addr).await;
    let mut b = client(replicas[1].grpc_addr).await;

    // Feedback through replica a shapes replica b's very next recommendation.
    let cold = recommend(&mut b, Some("a"), USER).await;
    assert!(cold.cold_start);
    let liked: Vec<i64> = cold.items.iter().take(5).map(|i| i.item_id).collect();
    for (n, &item) in liked.iter().enumerate() {
        let r = a
            .record_feedback(as_tenant(like(USER, item), Some("a")))
            .await
            .expect("feedback through replica a")
            .into_inner();
        assert_eq!(r.history_length, n as u32 + 1);
    }
    let warm = recommend(&mut b, Some("a"), USER).await;
    assert!(!warm.cold_start, "replica b sees a's feedback at once");
    let named = history_named(&warm);
    assert!(
        !named.is_empty() && named.iter().all(|i| liked.contains(i)),
        "b's explanations name the likes recorded through a: {named:?} of {liked:?}"
    );
    assert!(
        warm.items.iter().all(|i| !liked.contains(&i.item_id)),
        "liked items are not recommended again"
    );
    for &item in &liked[..2] {
        b.record_feedback(as_tenant(like(OTHER, item), Some("a")))
            .await
            .unwrap();
    }

    // Through a gateway in front of both: tenant b's user of the same id is another user.
    let addrs: Vec<_> = replicas.iter().map(|r| r.grpc_addr).collect();
    let gs = tenant_gateway_settings(&addrs, &db.token_file, &[(A_KEY, "a"), (B_KEY, "b")]);
    let gw = start_gateway(gs).await;
    let mut via = RecommenderClient::new(gw.channel().await);
    for _ in 0..4 {
        // Several calls: the gateway spreads them over both replicas.
        let for_b = via
            .recommend(with_key(explained(USER), B_KEY))
            .await
            .unwrap()
            .into_inner();
        assert!(for_b.cold_start && history_named(&for_b).is_empty());
        let for_a = via
            .recommend(with_key(explained(USER), A_KEY))
            .await
            .unwrap()
            .into_inner();
        assert!(!for_a.cold_start, "tenant a's user through the gateway");
    }
    let b_user = via
        .record_feedback(with_key(like(USER, liked[0]), B_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b_user.history_length, 1, "tenant b's user starts afresh");
    assert_eq!(db.rows("b", USER), (1, 0));

    // ForgetUser through replica b: nothing of the user through either replica, nor in the
    // database; the other user and the other tenant's user of the same id are untouched.
    assert_eq!(db.rows("a", USER), (5, 0));
    let forgot = b
        .forget_user(as_tenant(ForgetUserRequest { user_id: USER }, Some("a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((forgot.history_removed, forgot.log_records_removed), (5, 5));
    for c in [&mut a, &mut b] {
        let after = recommend(c, Some("a"), USER).await;
        assert!(after.cold_start, "forgotten everywhere");
        assert!(history_named(&after).is_empty());
    }
    assert_eq!(db.rows("a", USER), (0, 1), "rows deleted, tombstone kept");
    assert_eq!(db.rows("a", OTHER), (2, 0));
    assert_eq!(db.rows("b", USER), (1, 0));

    // A training user forgotten through one replica has no training history on the other.
    let trained = training_user();
    assert!(!recommend(&mut a, None, trained).await.cold_start);
    let forgot = b
        .forget_user(as_tenant(ForgetUserRequest { user_id: trained }, None))
        .await
        .unwrap()
        .into_inner();
    assert!(forgot.history_removed > 0, "the training history counted");
    assert!(recommend(&mut a, None, trained).await.cold_start);

    // A replica with another user-id key would split every user: refused at start.
    let other_key = db.dir.path().join("other.key");
    std::fs::write(&other_key, [9u8; 32]).unwrap();
    let stderr_path = db.dir.path().join("refused.stderr");
    let mut cmd = std::process::Command::new(workspace_binary("marquee-recommendation"));
    cmd.envs(db.env("c", &other_key))
        .env("MARQUEE__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("MARQUEE__SERVER__ADMIN_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let status = state::run_to_exit(cmd, Duration::from_secs(60));
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!status.success(), "started with another key: {stderr}");
    assert!(
        stderr.contains("keyed by another user-id key"),
        "the refusal says why: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_feedback_writes_loses_no_acknowledged_event() {
    const WRITERS: i64 = 4;
    let db = Shared::new();
    let mut replica = db.child("a");
    let items: Vec<i64> = {
        let mut c = client(replica.grpc_addr).await;
        recommend(&mut c, None, USER)
            .await
            .items
            .iter()
            .map(|i| i.item_id)
            .collect()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (addr, items, stop) = (replica.grpc_addr, items.clone(), stop.clone());
            tokio::spawn(async move {
                let mut c = client(addr).await;
                let mut acked = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let item = items[n % items.len()];
                    match c.record_feedback(like(USER + w, item)).await {
                        Ok(r) => acked.push(r.into_inner().sequence as i64),
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect();
    let written = || db.pg.count("SELECT count(*) FROM marquee_feedback");
    wait_until("200 events committed", Duration::from_secs(60), || async {
        (written() >= 200).then_some(())
    })
    .await;
    replica.kill();
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(
        acked.len() >= 150,
        "{} acknowledged before the kill",
        acked.len()
    );
    let stored: HashSet<i64> = db
        .pg
        .query("SELECT seq FROM marquee_feedback")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|s| !stored.contains(s))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged but not in the database: {lost:?}"
    );

    // A replica started afterwards serves every writer's history.
    let next = db.child("b");
    let mut c = client(next.grpc_addr).await;
    for w in 0..WRITERS {
        assert!(!recommend(&mut c, None, USER + w).await.cold_start);
    }
}

/// The details a client acts on when the database is down: UNAVAILABLE, `RetryInfo`, and an
/// `ErrorInfo` naming the dependency.
fn assert_database_down(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    assert!(
        status
            .message()
            .contains("feedback database is unavailable"),
        "{what}: {}",
        status.message()
    );
    let retry = status
        .get_details_retry_info()
        .unwrap_or_else(|| panic!("{what}: RetryInfo in {status:?}"));
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)), "{what}");
    assert!(
        marquee_core::error::is_dependency_unavailable(status),
        "{what}: ErrorInfo {:?}",
        status.get_details_error_info()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stopped_under_load_gives_clear_statuses_then_recovers_without_restart() {
    let db = Shared::new();
    let mut settings = db.settings("a");
    settings.recommendation.postgres.timeout_ms = 1_000;
    let rec = start_recommendation(settings).await;
    let mut direct = rec.client().await;
    let gs = tenant_gateway_settings(
        &[rec.grpc_addr],
        &db.token_file,
        &[(A_KEY, "a"), (B_KEY, "b")],
    );
    let gw = start_gateway(gs).await;
    let mut via = RecommenderClient::new(gw.channel().await);
    let key = A_KEY;
    let t = Some("a");
    let items: Vec<i64> = recommend(&mut direct, t, USER)
        .await
        .items
        .iter()
        .map(|i| i.item_id)
        .collect();
    for &item in &items[..3] {
        direct
            .record_feedback(as_tenant(like(USER, item), t))
            .await
            .unwrap();
    }

    // Steady feedback for OTHER through the gateway: every answer is OK or the database's
    // UNAVAILABLE (a gateway that ejected the replica would answer "no healthy replica").
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (mut via, stop, items) = (via.clone(), stop.clone(), items.clone());
        tokio::spawn(async move {
            let (mut acked, mut codes) = (0u32, Vec::new());
            for n in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let r = via
                    .record_feedback(with_key(like(OTHER, items[n % items.len()]), key))
                    .await;
                match r {
                    Ok(_) => acked += 1,
                    Err(s) => codes.push(s),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, codes)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.pg.stop_server();

    // Whatever needs the database says so, with when to retry, directly and via the gateway.
    let s = direct
        .record_feedback(as_tenant(like(USER, items[4]), t))
        .await
        .unwrap_err();
    assert_database_down(&s, "RecordFeedback");
    let s = direct
        .recommend(as_tenant(explained(USER), t))
        .await
        .unwrap_err();
    assert_database_down(&s, "Recommend for a user");
    let s = direct
        .forget_user(as_tenant(ForgetUserRequest { user_id: USER }, t))
        .await
        .unwrap_err();
    assert_database_down(&s, "ForgetUser");
    let s = via
        .record_feedback(with_key(like(USER, items[4]), key))
        .await
        .unwrap_err();
    assert_database_down(&s, "RecordFeedback through the gateway");
    // What needs no user state is still served, and the replica stays ready.
    let anonymous = direct
        .recommend(RecommendRequest {
            subject: Some(Subject::Anonymous(AnonymousContext {
                recent_item_ids: items[..2].to_vec(),
            })),
            k: 5,
            ..Default::default()
        })
        .await
        .expect("anonymous recommendations need no database");
    assert_eq!(anonymous.into_inner().items.len(), 5);
    direct
        .similar_items(SimilarItemsRequest {
            item_id: items[0],
            k: 5,
            ..Default::default()
        })
        .await
        .expect("similar items need no database");
    assert_eq!(http_get(rec.admin_addr, "/readyz").await.0, 200);
    assert!(
        rec.metric(
            "marquee_recommendation_database_errors_total",
            &[("op", "record")]
        ) >= 1.0
    );

    // The database returns: service resumes by itself, nothing acknowledged was lost.
    db.pg.start_server();
    let recovered = wait_until("feedback accepted again", Duration::from_secs(30), || {
        let mut via = via.clone();
        let item = items[4];
        async move {
            via.record_feedback(with_key(like(USER, item), key))
                .await
                .ok()
                .map(|r| r.into_inner().history_length)
        }
    })
    .await;
    assert_eq!(
        recovered, 4,
        "the 3 likes from before the outage, and this one"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, codes) = load.await.unwrap();
    assert!(!codes.is_empty(), "the load met the outage");
    for s in &codes {
        assert_database_down(s, "RecordFeedback through the gateway under load");
    }
    let (rows, _) = db.rows("a", OTHER);
    assert!(
        rows >= acked as i64,
        "{acked} acknowledged through the outage, {rows} in the database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_expired_rows_at_start_and_while_serving() {
    const DAY_MS: i64 = 86_400_000;
    let db = Shared::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let at = |user_id, item_id, timestamp_ms| RecordFeedbackRequest {
        user_id,
        item_id,
        event: FeedbackEvent::Watch as i32,
        timestamp_ms,
    };

    // Without retention: 3 events 40 days old and 2 of today are all kept.
    let rec = start_recommendation(db.settings("a")).await;
    let mut c = rec.client().await;
    let items: Vec<i64> = recommend(&mut c, None, USER)
        .await
        .items
        .iter()
        .map(|i| i.item_id)
        .collect();
    for (n, &item) in items[..5].iter().enumerate() {
        let t = if n < 3 { now - 40 * DAY_MS } else { now };
        c.record_feedback(at(USER, item, t)).await.unwrap();
    }
    assert_eq!(db.rows("default", USER).0, 5);
    rec.shutdown.cancel();

    // With a 30-day retention: the old rows are gone at start, before anything is served.
    let mut s = db.settings("b");
    s.recommendation.retention_days = 30;
    s.recommendation.retention_purge_interval_ms = 100;
    let rec = start_recommendation(s).await;
    assert_eq!(db.rows("default", USER).0, 2);
    assert_eq!(
        rec.metric("marquee_recommendation_feedback_purged_total", &[]),
        3.0
    );
    let mut c = rec.client().await;

    // An expired event recorded while serving is deleted by the periodic pass.
    c.record_feedback(at(USER, items[5], now - 40 * DAY_MS))
        .await
        .unwrap();
    wait_until(
        "the periodic retention pass",
        Duration::from_secs(30),
        || async { (db.rows("default", USER).0 == 2).then_some(()) },
    )
    .await;
    assert_eq!(
        rec.metric("marquee_recommendation_feedback_purged_total", &[]),
        4.0
    );
    let next = c
        .record_feedback(at(USER, items[6], now))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.history_length, 3, "the two recent events and this one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified_and_never_falls_back() {
    use marquee_core::config::Validate;
    let pg = Postgres::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("postgres.url");
    std::fs::write(&url_file, format!("{} sslmode=require", pg.url())).unwrap();
    let key_file = dir.path().join("user_id.key");
    std::fs::write(&key_file, KEY).unwrap();
    let settings = |ca_file: Option<PathBuf>| {
        let mut s = recommendation_settings(&dir.path().join("state"));
        let r = &mut s.recommendation;
        r.store = marquee_recommendation::StoreKind::Postgres;
        r.postgres.url_file = Some(url_file.clone());
        r.postgres.ca_file = ca_file;
        r.user_id_key_file = Some(key_file.clone());
        s
    };

    // sslmode=require without a CA to verify the server by is refused, naming the key.
    let mut errors = Vec::new();
    settings(None).validate(&mut errors);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`recommendation.postgres.ca_file`")),
        "{errors:?}"
    );

    // A CA that did not sign the server's certificate: the handshake fails verification, and
    // the start gives up instead of connecting anyway.
    let other_ca = postgres::make_certificates(&dir.path().join("other"));
    let mut s = settings(Some(other_ca));
    s.recommendation.postgres.start_timeout_ms = 1_500;
    let refused = marquee_recommendation::start(s, tokio_util::sync::CancellationToken::new())
        .await
        .err()
        .expect("an unverifiable server is refused");
    let refused = format!("{refused:#}");
    assert!(refused.contains("invalid peer certificate"), "{refused}");

    // The server's CA: every connection the replica holds is TLS.
    let rec = start_recommendation(settings(Some(pg.ca_file().to_path_buf()))).await;
    let mut c = rec.client().await;
    let item = recommend(&mut c, None, USER).await.items[0].item_id;
    let r = c
        .record_feedback(like(USER, item))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.history_length, 1);
    let count = |ssl: bool| {
        pg.count(&format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'marquee-recommendation' AND s.ssl = {ssl}"
        ))
    };
    assert!(count(true) >= 1, "the replica's connections use TLS");
    assert_eq!(count(false), 0, "no plain connection");
}
