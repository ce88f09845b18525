//! Leadership among the processes sharing one PostgreSQL database: the one
//! that holds a session advisory lock (`pg_try_advisory_lock`) leads, for as
//! long as the connection that took it lives.
//!
//! The lock is held on a connection of its own (never a pooled one, which
//! could be handed back and reused with the lock still on it). Not leading:
//! try again every second. Leading: `SELECT 1` every second with a
//! two-second limit; any failure flips leadership to `false` at once, drops
//! the connection (which releases the lock, if the server still had it) and
//! starts over. The server is asked to probe the connection with TCP
//! keepalives (sqlx has no client-side setting), so a leader whose host
//! vanished loses the lock within seconds, not at the kernel's default of
//! two hours.
//!
//! The lock's key is derived from the schema the store uses (the URL's
//! `search_path`, else `public`), so stores in different schemas of one
//! database each have their own leader.

use crate::app::ports::StoreResult;
use crate::store::error::sqlx as db;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a follower tries to take the lock.
pub const RETRY: Duration = Duration::from_secs(1);
/// How often the leader checks its connection.
pub const CHECK: Duration = Duration::from_secs(1);
/// How long one check (or one try) may take before it counts as a failure.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The advisory-lock key of the schema `connect` uses.
pub fn key_of(connect: &PgConnectOptions) -> i64 {
    key_for_schema(&schema_of(connect.get_options()))
}

/// The lock key of one schema: the first 8 bytes of a SHA-256.
pub fn key_for_schema(schema: &str) -> i64 {
    let h = Sha256::digest(format!("keyturn leader\0{schema}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    i64::from_be_bytes(b)
}

/// The first schema of the `search_path` in a connection's `options`
/// (`-c search_path=a,b` or `--search_path=a`), else `public`.
fn schema_of(options: Option<&str>) -> String {
    let found = options.and_then(|o| {
        o.split_whitespace()
            .filter_map(|w| w.trim_start_matches('-').strip_prefix("search_path="))
            .next_back()
            .map(str::to_string)
    });
    found
        .as_deref()
        .and_then(|p| p.split(',').map(|s| s.trim().trim_matches('"')).next())
        .filter(|s| !s.is_empty())
        .unwrap_or("public")
        .to_string()
}

/// A store's leadership, started by the first call of [`Leadership::get`]
/// (so a process that never asks, like `keyturn init`, never takes the
/// lock) and ended by the store's stop token.
#[derive(Default)]
pub struct Leadership {
    cell: OnceLock<watch::Receiver<bool>>,
}

impl Leadership {
    pub fn new() -> Leadership {
        Leadership::default()
    }

    /// Whether this process leads; starts the election on first call.
    /// Must be called inside the tokio runtime.
    pub fn get(
        &self,
        connect: &PgConnectOptions,
        stop: &CancellationToken,
    ) -> watch::Receiver<bool> {
        self.cell
            .get_or_init(|| spawn(connect.clone(), key_of(connect), stop.clone()))
            .clone()
    }
}

/// Starts taking part in the election on `key`. The value starts `false`
/// and is sent once after the first try whatever it found (so a caller can
/// wait for that first answer with `changed()`), then on every change.
pub fn spawn(
    connect: PgConnectOptions,
    key: i64,
    stop: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(run(connect, key, tx, stop));
    rx
}

/// Publishes leadership: the first value always, later ones when they change.
struct Flag {
    tx: watch::Sender<bool>,
    first: bool,
    key: i64,
}

impl Flag {
    fn set(&mut self, lead: bool, why: &str) {
        if std::mem::take(&mut self.first) {
            self.tx.send_replace(lead);
            tracing::info!(key = self.key, leader = lead, "{why}");
            return;
        }
        let changed = self
            .tx
            .send_if_modified(|v| std::mem::replace(v, lead) != lead);
        if changed {
            tracing::info!(key = self.key, leader = lead, "{why}");
        }
    }
}

async fn run(
    connect: PgConnectOptions,
    key: i64,
    tx: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut flag = Flag {
        tx,
        first: true,
        key,
    };
    // Logged once per failing stretch, not every second.
    let mut failing = false;
    'connect: loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            c = tokio::time::timeout(CONNECT_TIMEOUT, lock_connection(&connect)) => c,
        };
        let mut conn = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "cannot connect to compete for leadership; retrying every second");
                }
                flag.set(false, "not leading: the database cannot be reached");
                if sleep_or_stop(RETRY, &stop).await {
                    break;
                }
                continue;
            }
            Err(_) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!("cannot connect to compete for leadership: no answer; retrying every second");
                }
                flag.set(false, "not leading: the database cannot be reached");
                if sleep_or_stop(RETRY, &stop).await {
                    break;
                }
                continue;
            }
        };
        failing = false;
        // Following: try for the lock every second.
        loop {
            let tried = tokio::select! {
                _ = stop.cancelled() => break 'connect,
                t = tokio::time::timeout(CHECK_TIMEOUT, try_lock(&mut conn, key)) => t,
            };
            match tried {
                Ok(Ok(true)) => {
                    flag.set(true, "leadership won: this process runs the Discord bot, the card outbox and the deadline sweep");
                    break;
                }
                Ok(Ok(false)) => {
                    flag.set(false, "following: another process leads");
                    if sleep_or_stop(RETRY, &stop).await {
                        break 'connect;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "trying for leadership failed; reconnecting");
                    flag.set(false, "not leading: the lock's connection failed");
                    drop(conn);
                    if sleep_or_stop(RETRY, &stop).await {
                        break 'connect;
                    }
                    continue 'connect;
                }
                Err(_) => {
                    tracing::warn!(
                        "trying for leadership took over {CHECK_TIMEOUT:?}; reconnecting"
                    );
                    flag.set(false, "not leading: the lock's connection does not answer");
                    drop(conn);
                    if sleep_or_stop(RETRY, &stop).await {
                        break 'connect;
                    }
                    continue 'connect;
                }
            }
        }
        // Leading: the lock lives as long as this connection; check it.
        loop {
            if sleep_or_stop(CHECK, &stop).await {
                flag.set(false, "leadership given up: the store is closing");
                let _ = tokio::time::timeout(CHECK_TIMEOUT, conn.close()).await;
                break 'connect;
            }
            let check = tokio::time::timeout(
                CHECK_TIMEOUT,
                sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut conn),
            )
            .await;
            let why = match check {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {CHECK_TIMEOUT:?}"),
            };
            // At once: whatever this process was doing as leader stops now,
            // before the server has even noticed.
            flag.set(false, "LEADERSHIP LOST: the lock's connection failed");
            tracing::warn!(error = %why, "the connection holding the leadership lock failed; reconnecting");
            drop(conn);
            if sleep_or_stop(RETRY, &stop).await {
                break 'connect;
            }
            continue 'connect;
        }
    }
    flag.set(false, "leadership given up: the store is closing");
}

/// A connection of its own for the lock, whose server side probes the
/// client with TCP keepalives (so a vanished leader's lock is released
/// within seconds).
async fn lock_connection(connect: &PgConnectOptions) -> StoreResult<PgConnection> {
    let mut conn = connect.connect().await.map_err(db)?;
    // Ignored on Unix-socket connections; refused by no server we support,
    // but a refusal only loses the faster release.
    for set in [
        "SET tcp_keepalives_idle = 5",
        "SET tcp_keepalives_interval = 1",
        "SET tcp_keepalives_count = 3",
        "SET tcp_user_timeout = 5000",
    ] {
        if let Err(e) = sqlx::query(set).execute(&mut conn).await {
            tracing::debug!(error = %e, statement = set, "keepalive setting refused");
        }
    }
    Ok(conn)
}

async fn try_lock(conn: &mut PgConnection, key: i64) -> StoreResult<bool> {
    sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await
        .map_err(db)
}

/// Sleeps; `true` when stopped meanwhile.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdb::Schema;
    use super::*;
    use std::time::Instant;

    const WITHIN: Duration = Duration::from_secs(10);

    #[test]
    fn the_key_follows_the_schema() {
        assert_eq!(schema_of(None), "public");
        assert_eq!(schema_of(Some("-c geqo=off")), "public");
        assert_eq!(schema_of(Some("-c search_path=kt_a")), "kt_a");
        assert_eq!(schema_of(Some("--search_path=kt_b,public")), "kt_b");
        assert_eq!(schema_of(Some("-c search_path=\"Mixed\"")), "Mixed");
        assert_ne!(key_for_schema("kt_a"), key_for_schema("kt_b"));
        let a: PgConnectOptions = "postgres://h/db?options=-c%20search_path%3Dkt_a"
            .parse()
            .unwrap();
        assert_eq!(key_of(&a), key_for_schema("kt_a"));
        let plain: PgConnectOptions = "postgres://h/db".parse().unwrap();
        assert_eq!(key_of(&plain), key_for_schema("public"));
    }

    /// Waits for the first answer of each, then for `want` of `rx`.
    async fn until(rx: &mut watch::Receiver<bool>, want: bool) {
        tokio::time::timeout(WITHIN, rx.wait_for(|v| *v == want))
            .await
            .expect("within 10 s")
            .expect("the election runs");
    }

    async fn terminate_lock_holder(s: &Schema, key: i64) -> i64 {
        let mut c = s.connect().await;
        // A bigint advisory key is stored as its high and low halves.
        sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted \
             AND classid = ($1 >> 32)::bit(32)::int::oid AND objid = ($1 & 4294967295)::bit(32)::int::oid \
             AND objsubid = 1) t",
        )
        .bind(key)
        .fetch_one(&mut c)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn one_leader_per_schema_and_a_takeover_when_it_goes() {
        let Some(s) = Schema::new().await else { return };
        let Some(other_schema) = Schema::new().await else {
            return;
        };
        let key = key_of(&s.options());
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let mut a = spawn(s.options(), key, stop_a.clone());
        tokio::time::timeout(WITHIN, a.changed())
            .await
            .unwrap()
            .unwrap();
        let mut b = spawn(s.options(), key, stop_b.clone());
        tokio::time::timeout(WITHIN, b.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(*a.borrow() ^ *b.borrow(), "exactly one leads");
        assert!(*a.borrow(), "the first to try leads");
        // Another schema has its own leader.
        let stop_c = CancellationToken::new();
        let mut c = Leadership::new().get(&other_schema.options(), &stop_c);
        until(&mut c, true).await;

        // The leader's lock connection is killed: it flips to false, and
        // one of the two leads again (the one that tries first).
        let killed_at = Instant::now();
        assert_eq!(terminate_lock_holder(&s, key).await, 1);
        until(&mut a, false).await;
        eprintln!(
            "leader's backend terminated: it stopped leading after {:?}",
            killed_at.elapsed()
        );
        tokio::time::timeout(WITHIN, async {
            loop {
                if *a.borrow() || *b.borrow() {
                    break;
                }
                tokio::select! {
                    _ = a.changed() => {}
                    _ = b.changed() => {}
                }
            }
        })
        .await
        .expect("a leader again within 10 s");
        eprintln!(
            "a leader again {:?} after the backend was terminated",
            killed_at.elapsed()
        );
        assert!(*a.borrow() ^ *b.borrow(), "exactly one leads");

        // The leader goes away for good: the other takes over.
        let (gone_stop, mut gone, mut heir) = if *a.borrow() {
            (stop_a.clone(), a.clone(), b.clone())
        } else {
            (stop_b.clone(), b.clone(), a.clone())
        };
        let gone_at = Instant::now();
        gone_stop.cancel();
        until(&mut gone, false).await;
        until(&mut heir, true).await;
        eprintln!("takeover after the leader stopped: {:?}", gone_at.elapsed());
        stop_a.cancel();
        stop_b.cancel();
        stop_c.cancel();
        until(&mut c, false).await;
    }
}
