//! The PostgreSQL store (`recommendation.store = "postgres"`): feedback and erasures in one
//! database shared by every replica, so replicas hold no user state of their own.
//!
//! Through `tokio-postgres` with a `deadpool-postgres` pool: the maintained async client of the
//! tokio ecosystem, with prepared statements cached per connection and no compile-time
//! database (sqlx's checked queries want one at build time, or an offline query cache to keep
//! in step; four statements do not earn that).
//!
//! - **Nothing cached per replica.** `Recommend` for a user reads that user's rows (newest
//!   `max_history`) in one indexed query, so feedback through one replica shapes the next
//!   recommendation of every other at once, and an erasure leaves no copy anywhere to purge.
//! - **Acknowledged means committed**: every session runs with `synchronous_commit = on`
//!   whatever the server's default, so an acknowledged event is in the WAL on disk (and on the
//!   synchronous standbys the server names) before the reply.
//! - **The database down** is `UNAVAILABLE` with `RetryInfo` and an `ErrorInfo` saying the
//!   dependency failed (so the gateway neither ejects the replica nor retries elsewhere: every
//!   replica shares the database). The pool drops broken connections and opens new ones on
//!   the next call, so service resumes by itself.
//! - **Migrations** run at start inside one transaction holding an advisory lock: replicas
//!   starting together apply each migration once, in order; a later start finds them applied.
//! - **TLS** (rustls) when `postgres.ca_file` names the CA that signs the database's
//!   certificate: required then, verified, never fallen back from.
//! - **One user-id key** for all replicas: the database keeps a fingerprint of the key that
//!   first wrote to it and a replica with another key refuses to start (its pseudonyms would
//!   split every user in two).

use std::path::Path;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::feedback::{EventKind, Record};
use crate::privacy::{UserHash, UserKey};

/// `[recommendation.postgres]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    /// A file holding the connection string (`postgres://user:password@host:5432/db` or
    /// `host=… user=…`): mounted from a Secret, so the password is never in the config or the
    /// environment.
    pub url_file: Option<std::path::PathBuf>,
    /// Connections per replica.
    pub pool_size: usize,
    /// Longest wait for a connection or one statement before the call gets `UNAVAILABLE`.
    pub timeout_ms: u64,
    /// How long a start waits for the database before it gives up (exit), e.g. while the
    /// database's own pod starts.
    pub start_timeout_ms: u64,
    /// Most feedback rows of one user read per `Recommend` (the newest): a user with a
    /// million events costs one bounded query, not a million rows.
    pub max_history: usize,
    /// PEM file of the CA certificates that may sign the database's certificate. With it the
    /// connection is TLS (rustls), always: the server's certificate and name are verified and
    /// a server without TLS is refused, never fallen back from. Without it the connection is
    /// plain TCP, and a connection string asking for `sslmode=require` is refused at start.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url_file: None,
            pool_size: 8,
            timeout_ms: 2_000,
            start_timeout_ms: 30_000,
            max_history: 10_000,
            ca_file: None,
        }
    }
}

impl PostgresSettings {
    pub fn validate(&self, errors: &mut Vec<String>) {
        match &self.url_file {
            None => errors.push(
                "`recommendation.postgres.url_file` is required with `recommendation.store = \"postgres\"`"
                    .into(),
            ),
            Some(p) => match read_url(p) {
                Err(e) => errors.push(format!("`recommendation.postgres.url_file`: {e}")),
                Ok(c) => match (c.get_ssl_mode(), &self.ca_file) {
                    (SslMode::Require, None) => errors.push(
                        "the connection string asks for `sslmode=require`: set \
                         `recommendation.postgres.ca_file` to the CA that signed the database's \
                         certificate (it is verified, never trusted blindly)"
                            .into(),
                    ),
                    (SslMode::Disable, Some(_)) => errors.push(
                        "the connection string says `sslmode=disable` but \
                         `recommendation.postgres.ca_file` is set: remove one"
                            .into(),
                    ),
                    _ => {}
                },
            },
        }
        if let Some(Err(e)) = self.ca_file.as_deref().map(tls_config) {
            errors.push(format!("`recommendation.postgres.ca_file`: {e}"));
        }
        for (name, v) in [
            ("pool_size", self.pool_size),
            ("max_history", self.max_history),
            ("timeout_ms", self.timeout_ms as usize),
        ] {
            if v == 0 {
                errors.push(format!(
                    "`recommendation.postgres.{name}` must be at least 1, got 0"
                ));
            }
        }
    }
}

/// Reads and parses the connection string (never echoed: it holds a password).
fn read_url(path: &Path) -> Result<tokio_postgres::Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("`{}` is empty", path.display()));
    }
    text.parse::<tokio_postgres::Config>()
        .map_err(|e| format!("`{}` is not a connection string: {e}", path.display()))
}

/// A rustls client that trusts exactly the CA certificates in `ca_file` (ring provider, TLS 1.2
/// and 1.3).
fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("`{}`: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("`{}`: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("`{}`: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("`{}` holds no PEM certificate", ca_file.display()));
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Why the store did not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached, or did not answer within `timeout_ms`: nothing was
    /// acknowledged; the call may be retried.
    #[error("the feedback database is unavailable: {0}")]
    Unavailable(String),
    /// The database refused a statement for another reason (a bug or a broken schema).
    #[error("the feedback database refused the statement: {0}")]
    Failed(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let transient = match e.code() {
            // No SQLSTATE: the connection broke, closed or could not be made.
            None => true,
            Some(c) => {
                let class = &c.code()[..2];
                // 08 connection exception, 53 insufficient resources, 57 operator intervention
                // (admin shutdown, crash shutdown, cannot connect now), 40 serialization or
                // deadlock: all pass, none is the request's fault.
                matches!(class, "08" | "53" | "57" | "40")
                    || *c == SqlState::READ_ONLY_SQL_TRANSACTION
            }
        };
        let text = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => {
                // The cause is behind: "error performing TLS handshake" says nothing of why.
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                text
            }
        };
        if transient {
            Self::Unavailable(text)
        } else {
            Self::Failed(text)
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

/// One user's rows: the newest `max_history` events, oldest first, and whether the user was
/// forgotten (their training history is personal data too, and stays dropped).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UserRows {
    pub events: Vec<Record>,
    pub forgotten: bool,
}

/// What `RecordFeedback` committed.
#[derive(Debug, Clone, Copy)]
pub struct Recorded {
    /// The event's sequence number in the database (increasing, shared by all replicas).
    pub sequence: u64,
    /// The user's positive events in the database, this one included (at most
    /// `max_history`).
    pub positives: u64,
    pub forgotten: bool,
}

/// What `ForgetUser` removed.
#[derive(Debug, Clone, Copy)]
pub struct Forgotten {
    /// Feedback rows deleted.
    pub rows: u64,
    /// Whether the user had been forgotten before (their training history was already gone).
    pub already: bool,
}

/// The schema, one migration per entry, applied in order and never edited once released (a
/// change is a new entry).
const MIGRATIONS: &[&str] = &[
    // 1: feedback by pseudonym (never the raw id), erasure tombstones, and the key fingerprint.
    "CREATE TABLE marquee_feedback (
         seq      bigserial PRIMARY KEY,
         user_key bytea     NOT NULL,
         item_id  bigint    NOT NULL,
         event    smallint  NOT NULL,
         ts_ms    bigint    NOT NULL
     );
     CREATE INDEX marquee_feedback_user ON marquee_feedback (user_key, seq);
     CREATE INDEX marquee_feedback_ts ON marquee_feedback (ts_ms);
     CREATE TABLE marquee_forgotten (
         user_key bytea  PRIMARY KEY,
         at_ms    bigint NOT NULL
     );
     CREATE TABLE marquee_meta (
         name  text  PRIMARY KEY,
         value bytea NOT NULL
     );",
];

/// Key of the advisory lock migrations hold (any constant no other application uses).
const MIGRATION_LOCK: i64 = 0x4d51_5245_4331; // "MQREC1"

/// Column `i` of `row`: a type that does not match is a bug in this file, answered as
/// `INTERNAL`, never a panic in a handler.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, StoreError> {
    row.try_get(i)
        .map_err(|e| StoreError::Failed(format!("column {i}: {e}")))
}

/// The shared store.
pub struct PgStore {
    pool: Pool,
    timeout: Duration,
    max_history: i64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore(..)")
    }
}

impl PgStore {
    /// Connects, migrates and checks the key fingerprint, retrying while the database is
    /// unavailable for up to `start_timeout_ms`.
    pub async fn open(settings: &PostgresSettings, key: &UserKey) -> anyhow::Result<Self> {
        let path = settings
            .url_file
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("`recommendation.postgres.url_file` is not set"))?;
        let mut config = read_url(path).map_err(anyhow::Error::msg)?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        config
            .connect_timeout(timeout)
            // Acknowledged means committed: whatever the server's or role's default.
            .options("-c synchronous_commit=on")
            .application_name(crate::NAME);
        let recycling = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &settings.ca_file {
            Some(ca) => {
                // TLS or nothing: `prefer` would fall back to plain TCP against a server
                // without TLS.
                config.ssl_mode(SslMode::Require);
                let tls = tls_config(ca).map_err(anyhow::Error::msg)?;
                Manager::from_config(config, MakeRustlsConnect::new(tls), recycling)
            }
            None => Manager::from_config(config, NoTls, recycling),
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()?;
        let store = Self {
            pool,
            timeout,
            max_history: settings.max_history as i64,
        };
        let give_up =
            tokio::time::Instant::now() + Duration::from_millis(settings.start_timeout_ms);
        loop {
            match store.migrate(key).await {
                Ok(applied) => {
                    tracing::info!(applied, "feedback database ready");
                    return Ok(store);
                }
                Err(StoreError::Unavailable(e)) if tokio::time::Instant::now() < give_up => {
                    tracing::warn!(error = %e, "feedback database not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs `f` with a pooled connection, bounded by `timeout_ms` as a whole.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, StoreError>,
    {
        let work = async {
            let mut client = self.pool.get().await?;
            f(&mut client).await
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )))
            })
    }

    /// Applies the migrations not yet applied, and records or checks the key fingerprint;
    /// returns how many migrations ran.
    async fn migrate(&self, key: &UserKey) -> Result<usize, StoreError> {
        let fingerprint = key.fingerprint();
        // Migrations may take longer than one call's timeout: no `with` here.
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Serialises replicas that start together; released at commit or rollback.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS marquee_schema (
                 version    integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let current: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM marquee_schema", &[])
            .await?
            .try_get(0)?;
        let mut applied = 0;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO marquee_schema (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )
            .await?;
            applied += 1;
        }
        tx.execute(
            "INSERT INTO marquee_meta (name, value) VALUES ('user_id_key', $1)
             ON CONFLICT (name) DO NOTHING",
            &[&fingerprint.as_slice()],
        )
        .await?;
        let stored: Vec<u8> = tx
            .query_one(
                "SELECT value FROM marquee_meta WHERE name = 'user_id_key'",
                &[],
            )
            .await?
            .try_get(0)?;
        tx.commit().await?;
        if stored != fingerprint {
            return Err(StoreError::Failed(
                "the database holds feedback keyed by another user-id key: every replica must \
                 mount the same `recommendation.user_id_key_file` (a new key would split every \
                 user in two)"
                    .into(),
            ));
        }
        Ok(applied)
    }

    /// Commits one feedback event.
    pub async fn record(&self, record: &Record) -> Result<Recorded, StoreError> {
        let Record::Feedback {
            user,
            item_id,
            event,
            timestamp_ms,
        } = record
        else {
            return Err(StoreError::Failed("not a feedback event".into()));
        };
        let max = self.max_history;
        let row = self
            .with(async |c| {
                let st = c
                    .prepare_cached(
                        "WITH ins AS (
                             INSERT INTO marquee_feedback (user_key, item_id, event, ts_ms)
                             VALUES ($1, $2, $3, $4) RETURNING seq
                         )
                         SELECT (SELECT seq FROM ins),
                                (SELECT count(*) FROM (SELECT 1 FROM marquee_feedback
                                    WHERE user_key = $1 AND event <> 4 LIMIT $5) AS p),
                                EXISTS (SELECT 1 FROM marquee_forgotten WHERE user_key = $1)",
                    )
                    .await?;
                Ok(c.query_one(
                    &st,
                    &[
                        &user.0.as_slice(),
                        item_id,
                        &(*event as i16),
                        timestamp_ms,
                        &max,
                    ],
                )
                .await?)
            })
            .await?;
        let seq: i64 = col(&row, 0)?;
        // The count ran on the statement's snapshot, before the insert.
        let earlier: i64 = col(&row, 1)?;
        Ok(Recorded {
            sequence: seq as u64,
            positives: earlier as u64 + u64::from(event.is_positive()),
            forgotten: col(&row, 2)?,
        })
    }

    /// The user's newest `max_history` events (oldest first) and whether they were forgotten.
    pub async fn user(&self, user: UserHash) -> Result<UserRows, StoreError> {
        let max = self.max_history;
        let rows = self
            .with(async |c| {
                let st = c
                    .prepare_cached(
                        "SELECT seq, item_id, event, ts_ms FROM marquee_feedback
                         WHERE user_key = $1 ORDER BY seq DESC LIMIT $2",
                    )
                    .await?;
                let forgotten = c
                    .prepare_cached("SELECT 1 FROM marquee_forgotten WHERE user_key = $1")
                    .await?;
                // Both on one connection, pipelined: one round trip.
                let key = user.0.as_slice();
                let (newest, of_user): (&[&(dyn ToSql + Sync)], &[&(dyn ToSql + Sync)]) =
                    (&[&key, &max], &[&key]);
                let (rows, tomb) =
                    futures::try_join!(c.query(&st, newest), c.query(&forgotten, of_user))?;
                Ok((rows, !tomb.is_empty()))
            })
            .await?;
        let (rows, forgotten) = rows;
        let mut out = UserRows {
            events: Vec::with_capacity(rows.len()),
            forgotten,
        };
        // Newest first from the query (the limit keeps the newest); oldest first for the tower.
        for r in rows.iter().rev() {
            let event: i16 = col(r, 2)?;
            let Some(event) = u8::try_from(event).ok().and_then(EventKind::from_u8) else {
                continue;
            };
            out.events.push(Record::Feedback {
                user,
                item_id: col(r, 1)?,
                event,
                timestamp_ms: col(r, 3)?,
            });
        }
        Ok(out)
    }

    /// Deletes every event of the user and leaves a tombstone, in one transaction.
    pub async fn forget(&self, user: UserHash, now_ms: i64) -> Result<Forgotten, StoreError> {
        self.with(async |c| {
            let tx = c.transaction().await?;
            let rows = tx
                .execute(
                    "DELETE FROM marquee_feedback WHERE user_key = $1",
                    &[&user.0.as_slice()],
                )
                .await?;
            let already = tx
                .execute(
                    "UPDATE marquee_forgotten SET at_ms = $2 WHERE user_key = $1",
                    &[&user.0.as_slice(), &now_ms],
                )
                .await?
                > 0;
            if !already {
                tx.execute(
                    "INSERT INTO marquee_forgotten (user_key, at_ms) VALUES ($1, $2)
                     ON CONFLICT (user_key) DO NOTHING",
                    &[&user.0.as_slice(), &now_ms],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(Forgotten { rows, already })
        })
        .await
    }

    /// Deletes feedback older than `cutoff_ms` (retention); returns how many rows.
    pub async fn purge_before(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        self.with(async |c| {
            Ok(c.execute(
                "DELETE FROM marquee_feedback WHERE ts_ms < $1",
                &[&cutoff_ms],
            )
            .await?)
        })
        .await
    }
}
