//! The SQLite store: WAL, one writer connection that group-commits, and a
//! small pool of readers.
//!
//! Writes are queued to one task. It takes every write waiting (up to
//! `max_batch`), runs them in one transaction with their audit entries, and
//! answers each only after the commit: many callers, one fsync.

use super::{
    CardRow, Inserted, PairedUser, PairingRefused, PendingPairing, Pruned, Store, StoreError,
    StoreResult, StoredGrant, Voted,
};
use crate::domain::audit::{self, events, AuditEntry, AuditEvent};
use crate::domain::pairing;
use crate::domain::policy::{Effect, Grant, Scope, ToolPattern};
use crate::domain::request::{
    self, ApprovalRequest, RequestId, State, TransitionError, Vote, VoteEffect,
};
use crate::domain::Risk;
use async_trait::async_trait;
use serde_json::json;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, FromRow, QueryBuilder, Row, Sqlite, Transaction};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Writes waiting for the writer; beyond this, callers wait (backpressure).
const WRITE_QUEUE: usize = 8192;

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

pub struct SqliteStore {
    reads: SqlitePool,
    jobs: mpsc::Sender<Job>,
    writer: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<StoreResult<Reply>>,
}

enum Op {
    Insert(Box<ApprovalRequest>, Vec<AuditEvent>),
    Vote(RequestId, Vote),
    Cancel(RequestId, String, Option<String>, i64),
    TimeOut(RequestId, i64),
    AddGrant(Grant, String, i64),
    RemoveGrant(Scope, ToolPattern, Effect, String, i64),
    SetRisk(String, Option<Risk>, String, i64),
    Pair(PairedUser),
    Unpair(String, String, i64),
    CreateCode {
        user_id: String,
        display_name: Option<String>,
        code_hash: String,
        now_ms: i64,
        expires_ms: i64,
        max_live: usize,
    },
    Redeem(String, String, i64),
    Audit(Vec<AuditEvent>),
    PruneAudit(i64, i64),
    CardTouch(RequestId, u64, i64),
    CardReconcile(u64),
    CardDone(RequestId, u64, i64, String),
    CardRetry(RequestId, i64, i64),
}

enum Reply {
    Inserted(Inserted),
    Voted(Result<Voted, TransitionError>),
    Finished(Result<ApprovalRequest, TransitionError>),
    Bool(bool),
    Unit,
    Code(Result<(), PairingRefused>),
    Redeemed(Option<PairedUser>),
    Pruned(Option<Pruned>),
    Count(u64),
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database at `url`.
    pub async fn open(url: &str, synchronous: &str, max_batch: usize) -> StoreResult<SqliteStore> {
        let sync = match synchronous {
            "full" => SqliteSynchronous::Full,
            _ => SqliteSynchronous::Normal,
        };
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sync)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .pragma("temp_store", "memory");
        // Migrate through a one-connection pool: `Migrator::run` on a bare
        // connection makes the future non-`Send` (sqlx's `Acquire` bound).
        let migrations = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(db)?;
        MIGRATOR
            .run(&migrations)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        migrations.close().await;
        // The writer never checkpoints (that fsyncs on the commit path); a
        // separate connection folds the WAL back in the background.
        let writer =
            SqliteConnection::connect_with(&opts.clone().pragma("wal_autocheckpoint", "0"))
                .await
                .map_err(db)?;
        let checkpointer = SqliteConnection::connect_with(&opts).await.map_err(db)?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.read_only(true))
            .await
            .map_err(db)?;
        let (jobs, rx) = mpsc::channel(WRITE_QUEUE);
        let (stop, stopped) = oneshot::channel();
        let handle = tokio::spawn(async move {
            let ckpt = tokio::spawn(run_checkpointer(checkpointer));
            run_writer(writer, rx, stopped, max_batch.max(1)).await;
            ckpt.abort();
        });
        Ok(SqliteStore {
            reads,
            jobs,
            writer: Mutex::new(Some((stop, handle))),
        })
    }

    async fn write(&self, op: Op) -> StoreResult<Reply> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job { op, reply: tx })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn unexpected() -> StoreError {
    StoreError::Database("writer replied with the wrong kind of answer".into())
}

/// How often the WAL is folded back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

async fn run_checkpointer(mut conn: SqliteConnection) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // PASSIVE never blocks the writer or readers; what it cannot copy
        // now it copies next time.
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

async fn run_writer(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Job>,
    mut stop: oneshot::Receiver<()>,
    max_batch: usize,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(max_batch);
    let mut stopping = false;
    let mut head: Head = None;
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut jobs, max_batch) => n,
            _ = &mut stop, if !stopping => {
                // Refuse new writes, but commit everything already queued.
                stopping = true;
                rx.close();
                continue;
            }
        };
        if n == 0 {
            break;
        }
        // Let handlers that are about to write queue up first: one yield
        // grows the group commit (measured: more calls per commit, fewer commits).
        if jobs.len() < max_batch {
            tokio::task::yield_now().await;
            let room = max_batch - jobs.len();
            if room > 0 {
                while let Ok(job) = rx.try_recv() {
                    jobs.push(job);
                    if jobs.len() >= max_batch {
                        break;
                    }
                }
            }
        }
        write_batch(&mut conn, &mut jobs, &mut head).await;
    }
    // Fold the WAL back into the main file so the database is one file at rest.
    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
    {
        tracing::warn!(error = %e, "final checkpoint failed");
    }
    let _ = conn.close().await;
}

async fn write_batch(conn: &mut SqliteConnection, jobs: &mut Vec<Job>, head: &mut Head) {
    {
        let ops: Vec<&Op> = jobs.iter().map(|j| &j.op).collect();
        let started = std::time::Instant::now();
        match run_batch(conn, &ops, head).await {
            Ok(replies) => {
                tracing::trace!(
                    batch = ops.len(),
                    micros = started.elapsed().as_micros() as u64,
                    "committed"
                );
                for (job, reply) in jobs.drain(..).zip(replies) {
                    let _ = job.reply.send(Ok(reply));
                }
            }
            Err(e) if jobs.len() == 1 => {
                tracing::error!(error = %e, "store write failed");
                if let Some(job) = jobs.pop() {
                    let _ = job.reply.send(Err(db(e)));
                }
            }
            Err(e) => {
                // One bad write must not fail its neighbours: retry each alone.
                tracing::warn!(error = %e, batch = jobs.len(), "batch failed; retrying writes one by one");
                for job in jobs.drain(..) {
                    let r = run_batch(conn, &[&job.op], head).await;
                    let r = r
                        .map_err(db)
                        .and_then(|mut v| v.pop().ok_or_else(unexpected));
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "store write failed");
                    }
                    let _ = job.reply.send(r);
                }
            }
        }
    }
}

/// The audit chain head as of the last commit, known only to the writer
/// (the one connection that appends), so a batch need not read it back.
type Head = Option<(i64, String)>;

async fn run_batch(
    conn: &mut SqliteConnection,
    ops: &[&Op],
    head: &mut Head,
) -> Result<Vec<Reply>, sqlx::Error> {
    let known = head.take();
    let result = run_batch_inner(conn, ops, known.clone()).await;
    match result {
        Ok((replies, new_head)) => {
            *head = new_head.or(known);
            Ok(replies)
        }
        // Rolled back: read the head from the database next time.
        Err(e) => Err(e),
    }
}

async fn run_batch_inner(
    conn: &mut SqliteConnection,
    ops: &[&Op],
    head: Head,
) -> Result<(Vec<Reply>, Head), sqlx::Error> {
    let mut tx = conn.begin().await?;
    let mut replies = Vec::with_capacity(ops.len());
    let mut audit_events = Vec::new();
    // New requests without an idempotency key are inserted together at the
    // end: nobody can refer to them before this batch's replies go out.
    let mut new_rows: Vec<&ApprovalRequest> = Vec::new();
    for op in ops {
        if let Op::Insert(req, audit) = op {
            if req.idempotency_key.is_none() {
                new_rows.push(req);
                audit_events.extend(audit.iter().cloned());
                replies.push(Reply::Inserted(Inserted::New((**req).clone())));
                continue;
            }
        }
        replies.push(exec(&mut tx, op, &mut audit_events).await?);
    }
    // 23 columns a row; SQLite allows 32766 bound parameters.
    for chunk in new_rows.chunks(1000) {
        insert_requests(&mut tx, chunk).await?;
    }
    let mut new_head = None;
    if !audit_events.is_empty() {
        new_head = Some(append_audit(&mut tx, audit_events, head).await?);
    }
    tx.commit().await?;
    Ok((replies, new_head))
}

type Tx<'a> = Transaction<'a, Sqlite>;

async fn exec(tx: &mut Tx<'_>, op: &Op, ev: &mut Vec<AuditEvent>) -> Result<Reply, sqlx::Error> {
    Ok(match op {
        Op::Insert(req, audit) => {
            if let Some(key) = &req.idempotency_key {
                let existing = sqlx::query_as::<_, RequestRow>(
                    "SELECT * FROM requests WHERE agent = $1 AND idempotency_key = $2",
                )
                .bind(&req.agent)
                .bind(key)
                .fetch_optional(&mut **tx)
                .await?;
                if let Some(row) = existing {
                    return Ok(Reply::Inserted(Inserted::Existing(row.into_request()?)));
                }
            }
            insert_requests(tx, &[req]).await?;
            ev.extend(audit.iter().cloned());
            Reply::Inserted(Inserted::New((**req).clone()))
        }
        Op::Vote(id, vote) => {
            let Some(mut req) = load(tx, *id).await? else {
                return Ok(Reply::Voted(Err(TransitionError::NotFound)));
            };
            let earlier = load_votes(&mut **tx, *id).await?;
            let effect = match request::apply_vote(&req, &earlier, vote) {
                Ok(e) => e,
                Err(e) => return Ok(Reply::Voted(Err(e))),
            };
            sqlx::query(
                "INSERT INTO votes (request_id, voter, name, approve, reason, at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id.to_string())
            .bind(&vote.voter)
            .bind(&vote.name)
            .bind(vote.approve)
            .bind(&vote.reason)
            .bind(vote.at_ms)
            .execute(&mut **tx)
            .await?;
            ev.push(events::vote(&req, vote));
            let (have, need) = match effect {
                VoteEffect::Recorded { have, need } => (have, need),
                VoteEffect::Resolved(res) => {
                    req.resolve(&res);
                    resolve(tx, &req).await?;
                    ev.push(events::resolved(&req));
                    let need = req.approvals_required.max(1);
                    (if vote.approve { need } else { 0 }, need)
                }
            };
            Reply::Voted(Ok(Voted {
                request: req,
                have,
                need,
            }))
        }
        Op::Cancel(id, who, reason, now) => {
            finish(tx, *id, ev, |r| {
                request::cancel(r, who, reason.clone(), *now)
            })
            .await?
        }
        Op::TimeOut(id, now) => finish(tx, *id, ev, |r| request::time_out(r, *now)).await?,
        Op::AddGrant(g, by, now) => {
            let done = sqlx::query(
                "INSERT INTO grants (scope, tool, effect, created_by, created_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(g.scope.to_string())
            .bind(g.tool.as_str())
            .bind(effect_str(g.effect))
            .bind(by)
            .bind(now)
            .execute(&mut **tx)
            .await?
            .rows_affected()
                == 1;
            if done {
                ev.push(events::admin(
                    *now,
                    "grant_added",
                    by,
                    json!({"scope": g.scope, "tool": g.tool, "effect": g.effect}),
                ));
            }
            Reply::Bool(done)
        }
        Op::RemoveGrant(scope, tool, effect, by, now) => {
            let done =
                sqlx::query("DELETE FROM grants WHERE scope = $1 AND tool = $2 AND effect = $3")
                    .bind(scope.to_string())
                    .bind(tool.as_str())
                    .bind(effect_str(*effect))
                    .execute(&mut **tx)
                    .await?
                    .rows_affected()
                    == 1;
            if done {
                ev.push(events::admin(
                    *now,
                    "grant_removed",
                    by,
                    json!({"scope": scope, "tool": tool, "effect": effect}),
                ));
            }
            Reply::Bool(done)
        }
        Op::SetRisk(tool, risk, by, now) => {
            match risk {
                Some(r) => {
                    sqlx::query(
                        "INSERT INTO tool_risks (tool, risk, set_by, set_ms) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (tool) DO UPDATE SET risk = excluded.risk, set_by = excluded.set_by, set_ms = excluded.set_ms",
                    )
                    .bind(tool)
                    .bind(r.as_str())
                    .bind(by)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM tool_risks WHERE tool = $1")
                        .bind(tool)
                        .execute(&mut **tx)
                        .await?;
                }
            }
            ev.push(events::admin(
                *now,
                "risk_set",
                by,
                json!({"tool": tool, "risk": risk}),
            ));
            Reply::Unit
        }
        Op::Pair(u) => {
            let done = insert_paired(tx, u).await?;
            if done {
                ev.push(events::admin(
                    u.paired_ms,
                    "user_paired",
                    &u.paired_by,
                    json!({"user_id": u.user_id, "roles": u.roles}),
                ));
            }
            Reply::Bool(done)
        }
        Op::Unpair(user_id, by, now) => {
            let done = sqlx::query("DELETE FROM paired_users WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut **tx)
                .await?
                .rows_affected()
                == 1;
            sqlx::query("DELETE FROM pairing_codes WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut **tx)
                .await?;
            if done {
                ev.push(events::admin(
                    *now,
                    "pairing_revoked",
                    by,
                    json!({"user_id": user_id}),
                ));
            }
            Reply::Bool(done)
        }
        Op::CreateCode {
            user_id,
            display_name,
            code_hash,
            now_ms,
            expires_ms,
            max_live,
        } => {
            let paired: Option<(String,)> =
                sqlx::query_as("SELECT user_id FROM paired_users WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(&mut **tx)
                    .await?;
            if paired.is_some() {
                return Ok(Reply::Code(Err(PairingRefused::AlreadyPaired(
                    user_id.clone(),
                ))));
            }
            sqlx::query("DELETE FROM pairing_codes WHERE expires_ms <= $1 OR user_id = $2")
                .bind(now_ms)
                .bind(user_id)
                .execute(&mut **tx)
                .await?;
            let live: i64 = sqlx::query("SELECT COUNT(*) FROM pairing_codes")
                .fetch_one(&mut **tx)
                .await?
                .try_get(0)?;
            if live as usize >= *max_live {
                return Ok(Reply::Code(Err(PairingRefused::TooManyCodes(*max_live))));
            }
            sqlx::query(
                "INSERT INTO pairing_codes (code_hash, user_id, display_name, created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(code_hash)
            .bind(user_id)
            .bind(display_name)
            .bind(now_ms)
            .bind(expires_ms)
            .execute(&mut **tx)
            .await?;
            ev.push(events::admin(
                *now_ms,
                "pairing_requested",
                &format!("user:{user_id}"),
                json!({"user_id": user_id, "expires_ms": expires_ms}),
            ));
            Reply::Code(Ok(()))
        }
        Op::Redeem(code, by, now) => {
            let live: Vec<(String, String, Option<String>)> = sqlx::query_as(
                "SELECT code_hash, user_id, display_name FROM pairing_codes WHERE expires_ms > $1",
            )
            .bind(now)
            .fetch_all(&mut **tx)
            .await?;
            // Compare against every live hash in constant time; no early exit.
            let mut found = None;
            for (hash, user_id, name) in live {
                if pairing::matches(code, &hash) {
                    found = Some((hash, user_id, name));
                }
            }
            let Some((hash, user_id, display_name)) = found else {
                return Ok(Reply::Redeemed(None));
            };
            sqlx::query("DELETE FROM pairing_codes WHERE code_hash = $1")
                .bind(&hash)
                .execute(&mut **tx)
                .await?;
            let user = PairedUser {
                user_id,
                roles: vec![],
                display_name,
                paired_by: by.clone(),
                paired_ms: *now,
            };
            insert_paired(tx, &user).await?;
            ev.push(events::admin(
                *now,
                "pairing_approved",
                by,
                json!({"user_id": user.user_id}),
            ));
            Reply::Redeemed(Some(user))
        }
        Op::Audit(list) => {
            ev.extend(list.iter().cloned());
            Reply::Unit
        }
        Op::PruneAudit(cutoff, now) => Reply::Pruned(prune_audit(tx, ev, *cutoff, *now).await?),
        Op::CardTouch(id, channel, deadline) => {
            sqlx::query(
                "INSERT INTO discord_cards (request_id, channel_id, deadline_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (request_id) DO UPDATE SET want = want + 1, attempts = 0, next_attempt_ms = 0",
            )
            .bind(id.to_string())
            .bind(*channel as i64)
            .bind(deadline)
            .execute(&mut **tx)
            .await?;
            Reply::Unit
        }
        Op::CardReconcile(channel) => {
            let added = sqlx::query(
                "INSERT INTO discord_cards (request_id, channel_id, deadline_ms) \
                 SELECT id, $1, deadline_ms FROM requests r WHERE r.state = 'pending' \
                 AND NOT EXISTS (SELECT 1 FROM discord_cards c WHERE c.request_id = r.id)",
            )
            .bind(*channel as i64)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            let stale = sqlx::query(
                "UPDATE discord_cards SET want = done + 1, attempts = 0, next_attempt_ms = 0 \
                 WHERE want <= done AND rendered_state IS NOT \
                 (SELECT state FROM requests r WHERE r.id = discord_cards.request_id)",
            )
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Reply::Count(added + stale)
        }
        Op::CardDone(id, message, version, state) => {
            sqlx::query(
                "UPDATE discord_cards SET message_id = $1, done = MAX(done, $2), rendered_state = $3, \
                 attempts = 0, next_attempt_ms = 0 WHERE request_id = $4",
            )
            .bind(*message as i64)
            .bind(version)
            .bind(state)
            .bind(id.to_string())
            .execute(&mut **tx)
            .await?;
            Reply::Unit
        }
        Op::CardRetry(id, attempts, next) => {
            sqlx::query(
                "UPDATE discord_cards SET attempts = $1, next_attempt_ms = $2 WHERE request_id = $3",
            )
            .bind(attempts)
            .bind(next)
            .bind(id.to_string())
            .execute(&mut **tx)
            .await?;
            Reply::Unit
        }
    })
}

/// Deletes the oldest prefix of the log older than `cutoff` and queues the
/// checkpoint that accounts for it (appended with this batch's events).
async fn prune_audit(
    tx: &mut Tx<'_>,
    ev: &mut Vec<AuditEvent>,
    cutoff: i64,
    now: i64,
) -> Result<Option<Pruned>, sqlx::Error> {
    // The prefix ends just before the first entry that is young enough.
    let (young,): (Option<i64>,) = sqlx::query_as("SELECT MIN(seq) FROM audit WHERE at_ms >= $1")
        .bind(cutoff)
        .fetch_one(&mut **tx)
        .await?;
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit WHERE seq < $1 ORDER BY seq DESC LIMIT 1")
            .bind(young.unwrap_or(i64::MAX))
            .fetch_optional(&mut **tx)
            .await?;
    let Some((through_seq, through_hash)) = last else {
        return Ok(None);
    };
    let entries = sqlx::query("DELETE FROM audit WHERE seq <= $1")
        .bind(through_seq)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    ev.push(audit::checkpoint(
        now,
        (through_seq, &through_hash),
        entries,
        cutoff,
    ));
    Ok(Some(Pruned {
        entries,
        through_seq,
        through_hash,
    }))
}

async fn finish(
    tx: &mut Tx<'_>,
    id: RequestId,
    ev: &mut Vec<AuditEvent>,
    transition: impl FnOnce(&ApprovalRequest) -> Result<request::Resolution, TransitionError>,
) -> Result<Reply, sqlx::Error> {
    let Some(mut req) = load(tx, id).await? else {
        return Ok(Reply::Finished(Err(TransitionError::NotFound)));
    };
    match transition(&req) {
        Ok(res) => {
            req.resolve(&res);
            resolve(tx, &req).await?;
            ev.push(events::resolved(&req));
            Ok(Reply::Finished(Ok(req)))
        }
        Err(e) => Ok(Reply::Finished(Err(e))),
    }
}

async fn insert_paired(tx: &mut Tx<'_>, u: &PairedUser) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO paired_users (user_id, roles, display_name, paired_by, paired_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(&u.user_id)
    .bind(serde_json::to_string(&u.roles).unwrap_or_else(|_| "[]".into()))
    .bind(&u.display_name)
    .bind(&u.paired_by)
    .bind(u.paired_ms)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

fn effect_str(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}

async fn insert_requests(tx: &mut Tx<'_>, rows: &[&ApprovalRequest]) -> Result<(), sqlx::Error> {
    let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
        "INSERT INTO requests (id, agent, tool, args, args_hash, user_id, channel_id, justification, \
         task_id, idempotency_key, risk, approvals_required, admin_only, rule, rule_detail, flags, \
         created_ms, deadline_ms, state, decided_by, decided_who, decided_reason, decided_ms) ",
    );
    qb.push_values(rows, |mut b, r| {
        b.push_bind(r.id.to_string())
            .push_bind(&r.agent)
            .push_bind(&r.tool)
            .push_bind(r.args.to_string())
            .push_bind(&r.args_hash)
            .push_bind(&r.user_id)
            .push_bind(&r.channel_id)
            .push_bind(&r.justification)
            .push_bind(&r.task_id)
            .push_bind(&r.idempotency_key)
            .push_bind(r.risk.as_str())
            .push_bind(r.approvals_required as i64)
            .push_bind(r.admin_only)
            .push_bind(&r.rule)
            .push_bind(&r.rule_detail)
            .push_bind(serde_json::Value::Array(r.flags.clone()).to_string())
            .push_bind(r.created_ms)
            .push_bind(r.deadline_ms)
            .push_bind(r.state.as_str())
            .push_bind(r.decided_by.map(|d| d.as_str()))
            .push_bind(&r.decided_who)
            .push_bind(&r.decided_reason)
            .push_bind(r.decided_ms);
    });
    qb.build().execute(&mut **tx).await?;
    Ok(())
}

/// The conditional update that makes exactly one terminal state win.
async fn resolve(tx: &mut Tx<'_>, r: &ApprovalRequest) -> Result<(), sqlx::Error> {
    let n = sqlx::query(
        "UPDATE requests SET state = $1, decided_by = $2, decided_who = $3, decided_reason = $4, decided_ms = $5 \
         WHERE id = $6 AND state = 'pending'",
    )
    .bind(r.state.as_str())
    .bind(r.decided_by.map(|d| d.as_str()))
    .bind(&r.decided_who)
    .bind(&r.decided_reason)
    .bind(r.decided_ms)
    .bind(r.id.to_string())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if n != 1 {
        // Cannot happen with one writer; if it does, refuse rather than report a win.
        return Err(sqlx::Error::Protocol(format!(
            "request {} was no longer pending",
            r.id
        )));
    }
    Ok(())
}

async fn load(tx: &mut Tx<'_>, id: RequestId) -> Result<Option<ApprovalRequest>, sqlx::Error> {
    sqlx::query_as::<_, RequestRow>("SELECT * FROM requests WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .map(RequestRow::into_request)
        .transpose()
}

/// A `votes` row: voter, name, approve, reason, at_ms.
type VoteRow = (String, Option<String>, bool, Option<String>, i64);

async fn load_votes<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    ex: E,
    id: RequestId,
) -> Result<Vec<Vote>, sqlx::Error> {
    let rows: Vec<VoteRow> = sqlx::query_as(
        "SELECT voter, name, approve, reason, at_ms FROM votes WHERE request_id = $1 ORDER BY at_ms, voter",
    )
    .bind(id.to_string())
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(voter, name, approve, reason, at_ms)| Vote {
            voter,
            name,
            approve,
            reason,
            at_ms,
        })
        .collect())
}

/// Links and inserts `list` after the chain head; returns the new head.
async fn append_audit(
    tx: &mut Tx<'_>,
    list: Vec<AuditEvent>,
    head: Head,
) -> Result<(i64, String), sqlx::Error> {
    let (seq, hash): (i64, String) = match head {
        Some(h) => h,
        None => {
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(&mut **tx)
                .await?
        }
    };
    let entries = audit::link(seq, &hash, list);
    // SQLite allows 32766 bound parameters; 8 per row.
    for chunk in entries.chunks(2000) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO audit (seq, at_ms, kind, actor, request_id, detail, prev_hash, hash) ",
        );
        qb.push_values(chunk, |mut b, e| {
            b.push_bind(e.seq)
                .push_bind(e.event.at_ms)
                .push_bind(&e.event.kind)
                .push_bind(&e.event.actor)
                .push_bind(&e.event.request_id)
                .push_bind(e.event.detail.to_string())
                .push_bind(&e.prev_hash)
                .push_bind(&e.hash);
        });
        qb.build().execute(&mut **tx).await?;
    }
    let Some(last) = entries.last() else {
        return Ok((seq, hash));
    };
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(last.seq)
        .bind(&last.hash)
        .execute(&mut **tx)
        .await?;
    Ok((last.seq, last.hash.clone()))
}

#[derive(FromRow)]
struct RequestRow {
    id: String,
    agent: String,
    tool: String,
    args: String,
    args_hash: String,
    user_id: Option<String>,
    channel_id: Option<String>,
    justification: String,
    task_id: Option<String>,
    idempotency_key: Option<String>,
    risk: String,
    approvals_required: i64,
    admin_only: bool,
    rule: String,
    rule_detail: String,
    flags: String,
    created_ms: i64,
    deadline_ms: i64,
    state: String,
    decided_by: Option<String>,
    decided_who: Option<String>,
    decided_reason: Option<String>,
    decided_ms: Option<i64>,
}

fn corrupt(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

impl RequestRow {
    fn into_request(self) -> Result<ApprovalRequest, sqlx::Error> {
        let flags = match serde_json::from_str(&self.flags) {
            Ok(serde_json::Value::Array(a)) => a,
            _ => return Err(corrupt(format!("request {}: bad flags", self.id))),
        };
        Ok(ApprovalRequest {
            id: self.id.parse().map_err(corrupt)?,
            agent: self.agent,
            tool: self.tool,
            args: serde_json::from_str(&self.args)
                .map_err(|e| corrupt(format!("request {}: bad args: {e}", self.id)))?,
            args_hash: self.args_hash,
            user_id: self.user_id,
            channel_id: self.channel_id,
            justification: self.justification,
            task_id: self.task_id,
            idempotency_key: self.idempotency_key,
            risk: self.risk.parse().map_err(corrupt)?,
            approvals_required: self.approvals_required.clamp(1, 100) as u32,
            admin_only: self.admin_only,
            rule: self.rule,
            rule_detail: self.rule_detail,
            flags,
            created_ms: self.created_ms,
            deadline_ms: self.deadline_ms,
            state: self.state.parse::<State>().map_err(corrupt)?,
            decided_by: self
                .decided_by
                .map(|d| d.parse())
                .transpose()
                .map_err(corrupt)?,
            decided_who: self.decided_who,
            decided_reason: self.decided_reason,
            decided_ms: self.decided_ms,
        })
    }
}

#[derive(FromRow)]
struct CardDbRow {
    request_id: String,
    channel_id: i64,
    message_id: Option<i64>,
    rendered_state: Option<String>,
    want: i64,
    done: i64,
    attempts: i64,
    next_attempt_ms: i64,
    deadline_ms: i64,
}

impl CardDbRow {
    fn into_card(self) -> StoreResult<CardRow> {
        Ok(CardRow {
            request_id: self.request_id.parse().map_err(StoreError::Corrupt)?,
            channel_id: self.channel_id as u64,
            message_id: self.message_id.map(|m| m as u64),
            rendered_state: self.rendered_state,
            want: self.want,
            done: self.done,
            attempts: self.attempts,
            next_attempt_ms: self.next_attempt_ms,
            deadline_ms: self.deadline_ms,
        })
    }
}

#[derive(FromRow)]
struct AuditRow {
    seq: i64,
    at_ms: i64,
    kind: String,
    actor: String,
    request_id: Option<String>,
    detail: String,
    prev_hash: String,
    hash: String,
}

impl AuditRow {
    fn into_entry(self) -> AuditEntry {
        AuditEntry {
            seq: self.seq,
            event: AuditEvent {
                at_ms: self.at_ms,
                kind: self.kind,
                actor: self.actor,
                request_id: self.request_id,
                // A detail that no longer parses is kept as text so verify names the row.
                detail: serde_json::from_str(&self.detail)
                    .unwrap_or(serde_json::Value::String(self.detail)),
            },
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_request(
        &self,
        req: ApprovalRequest,
        audit: Vec<AuditEvent>,
    ) -> StoreResult<Inserted> {
        match self.write(Op::Insert(Box::new(req), audit)).await? {
            Reply::Inserted(i) => Ok(i),
            _ => Err(unexpected()),
        }
    }

    async fn vote(&self, id: RequestId, vote: Vote) -> StoreResult<Result<Voted, TransitionError>> {
        match self.write(Op::Vote(id, vote)).await? {
            Reply::Voted(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }

    async fn cancel(
        &self,
        id: RequestId,
        who: String,
        reason: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
        match self.write(Op::Cancel(id, who, reason, now_ms)).await? {
            Reply::Finished(f) => Ok(f),
            _ => Err(unexpected()),
        }
    }

    async fn time_out(
        &self,
        id: RequestId,
        now_ms: i64,
    ) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
        match self.write(Op::TimeOut(id, now_ms)).await? {
            Reply::Finished(f) => Ok(f),
            _ => Err(unexpected()),
        }
    }

    async fn get_request(&self, id: RequestId) -> StoreResult<Option<ApprovalRequest>> {
        sqlx::query_as::<_, RequestRow>("SELECT * FROM requests WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(db)?
            .map(|r| {
                r.into_request()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .transpose()
    }

    async fn find_by_idempotency_key(
        &self,
        agent: &str,
        key: &str,
    ) -> StoreResult<Option<ApprovalRequest>> {
        sqlx::query_as::<_, RequestRow>(
            "SELECT * FROM requests WHERE agent = $1 AND idempotency_key = $2",
        )
        .bind(agent)
        .bind(key)
        .fetch_optional(&self.reads)
        .await
        .map_err(db)?
        .map(|r| {
            r.into_request()
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .transpose()
    }

    async fn votes(&self, id: RequestId) -> StoreResult<Vec<Vote>> {
        load_votes(&self.reads, id).await.map_err(db)
    }

    async fn pending(&self, limit: u32) -> StoreResult<Vec<ApprovalRequest>> {
        sqlx::query_as::<_, RequestRow>(
            "SELECT * FROM requests WHERE state = 'pending' ORDER BY deadline_ms, id LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.reads)
        .await
        .map_err(db)?
        .into_iter()
        .map(|r| {
            r.into_request()
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .collect()
    }

    async fn pending_deadlines(&self) -> StoreResult<Vec<(RequestId, i64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, deadline_ms FROM requests WHERE state = 'pending'")
                .fetch_all(&self.reads)
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|(id, d)| Ok((id.parse().map_err(StoreError::Corrupt)?, d)))
            .collect()
    }

    async fn pending_counts(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT agent, COUNT(*) FROM requests WHERE state = 'pending' GROUP BY agent",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(a, n)| (a, n.max(0) as u64))
            .collect())
    }

    async fn approved_task_tools(&self, agent: &str, task_id: &str) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT tool FROM requests WHERE agent = $1 AND task_id = $2 AND state = 'approved' ORDER BY tool",
        )
        .bind(agent)
        .bind(task_id)
        .fetch_all(&self.reads)
        .await
        .map_err(db)?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    async fn add_grant(&self, grant: Grant, by: String, now_ms: i64) -> StoreResult<bool> {
        match self.write(Op::AddGrant(grant, by, now_ms)).await? {
            Reply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    async fn remove_grant(
        &self,
        scope: Scope,
        tool: ToolPattern,
        effect: Effect,
        by: String,
        now_ms: i64,
    ) -> StoreResult<bool> {
        match self
            .write(Op::RemoveGrant(scope, tool, effect, by, now_ms))
            .await?
        {
            Reply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    async fn grants(&self) -> StoreResult<Vec<StoredGrant>> {
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT scope, tool, effect, created_by, created_ms FROM grants ORDER BY scope, tool",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(scope, tool, effect, created_by, created_ms)| {
                Ok(StoredGrant {
                    grant: Grant {
                        scope: scope.parse().map_err(StoreError::Corrupt)?,
                        tool: tool.parse().map_err(StoreError::Corrupt)?,
                        effect: if effect == "deny" {
                            Effect::Deny
                        } else {
                            Effect::Allow
                        },
                        source: "store".into(),
                    },
                    created_by,
                    created_ms,
                })
            })
            .collect()
    }

    async fn set_tool_risk(
        &self,
        tool: String,
        risk: Option<Risk>,
        by: String,
        now_ms: i64,
    ) -> StoreResult<()> {
        match self.write(Op::SetRisk(tool, risk, by, now_ms)).await? {
            Reply::Unit => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn tool_risks(&self) -> StoreResult<Vec<(String, Risk)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT tool, risk FROM tool_risks ORDER BY tool")
                .fetch_all(&self.reads)
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|(t, r)| Ok((t, r.parse().map_err(StoreError::Corrupt)?)))
            .collect()
    }

    async fn paired_users(&self) -> StoreResult<Vec<PairedUser>> {
        let rows: Vec<(String, String, Option<String>, String, i64)> = sqlx::query_as(
            "SELECT user_id, roles, display_name, paired_by, paired_ms FROM paired_users ORDER BY paired_ms",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(user_id, roles, display_name, paired_by, paired_ms)| {
                Ok(PairedUser {
                    roles: serde_json::from_str(&roles)
                        .map_err(|e| StoreError::Corrupt(format!("roles of {user_id}: {e}")))?,
                    user_id,
                    display_name,
                    paired_by,
                    paired_ms,
                })
            })
            .collect()
    }

    async fn pair_user(&self, user: PairedUser) -> StoreResult<bool> {
        match self.write(Op::Pair(user)).await? {
            Reply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    async fn unpair_user(&self, user_id: String, by: String, now_ms: i64) -> StoreResult<bool> {
        match self.write(Op::Unpair(user_id, by, now_ms)).await? {
            Reply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    async fn create_pairing_code(
        &self,
        user_id: String,
        display_name: Option<String>,
        code_hash: String,
        now_ms: i64,
        expires_ms: i64,
        max_live: usize,
    ) -> StoreResult<Result<(), PairingRefused>> {
        match self
            .write(Op::CreateCode {
                user_id,
                display_name,
                code_hash,
                now_ms,
                expires_ms,
                max_live,
            })
            .await?
        {
            Reply::Code(c) => Ok(c),
            _ => Err(unexpected()),
        }
    }

    async fn redeem_pairing_code(
        &self,
        code: String,
        by: String,
        now_ms: i64,
    ) -> StoreResult<Option<PairedUser>> {
        match self.write(Op::Redeem(code, by, now_ms)).await? {
            Reply::Redeemed(u) => Ok(u),
            _ => Err(unexpected()),
        }
    }

    async fn pairing_codes(&self, now_ms: i64) -> StoreResult<Vec<PendingPairing>> {
        let rows: Vec<(String, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT user_id, display_name, created_ms, expires_ms FROM pairing_codes WHERE expires_ms > $1 ORDER BY created_ms",
        )
        .bind(now_ms)
        .fetch_all(&self.reads)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(
                |(user_id, display_name, created_ms, expires_ms)| PendingPairing {
                    user_id,
                    display_name,
                    created_ms,
                    expires_ms,
                },
            )
            .collect())
    }

    async fn append_audit(&self, events: Vec<AuditEvent>) -> StoreResult<()> {
        match self.write(Op::Audit(events)).await? {
            Reply::Unit => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn audit_tail(&self, n: u32) -> StoreResult<Vec<AuditEntry>> {
        let mut rows: Vec<AuditEntry> =
            sqlx::query_as::<_, AuditRow>("SELECT * FROM audit ORDER BY seq DESC LIMIT $1")
                .bind(n as i64)
                .fetch_all(&self.reads)
                .await
                .map_err(db)?
                .into_iter()
                .map(AuditRow::into_entry)
                .collect();
        rows.reverse();
        Ok(rows)
    }

    async fn audit_after(&self, after: i64, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        Ok(sqlx::query_as::<_, AuditRow>(
            "SELECT * FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.reads)
        .await
        .map_err(db)?
        .into_iter()
        .map(AuditRow::into_entry)
        .collect())
    }

    async fn audit_head(&self) -> StoreResult<(i64, String)> {
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.reads)
            .await
            .map_err(db)
    }

    async fn prune_audit(&self, cutoff_ms: i64, now_ms: i64) -> StoreResult<Option<Pruned>> {
        match self.write(Op::PruneAudit(cutoff_ms, now_ms)).await? {
            Reply::Pruned(p) => Ok(p),
            _ => Err(unexpected()),
        }
    }

    async fn card_touch(
        &self,
        request_id: RequestId,
        channel_id: u64,
        deadline_ms: i64,
    ) -> StoreResult<()> {
        match self
            .write(Op::CardTouch(request_id, channel_id, deadline_ms))
            .await?
        {
            Reply::Unit => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn card_reconcile(&self, channel_id: u64) -> StoreResult<u64> {
        match self.write(Op::CardReconcile(channel_id)).await? {
            Reply::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    async fn cards_due(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<CardRow>> {
        sqlx::query_as::<_, CardDbRow>(
            "SELECT * FROM discord_cards WHERE want > done AND next_attempt_ms <= $1 \
             ORDER BY deadline_ms, request_id LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit as i64)
        .fetch_all(&self.reads)
        .await
        .map_err(db)?
        .into_iter()
        .map(CardDbRow::into_card)
        .collect()
    }

    async fn card_next_attempt(&self) -> StoreResult<Option<i64>> {
        let (next,): (Option<i64>,) =
            sqlx::query_as("SELECT MIN(next_attempt_ms) FROM discord_cards WHERE want > done")
                .fetch_one(&self.reads)
                .await
                .map_err(db)?;
        Ok(next)
    }

    async fn card(&self, request_id: RequestId) -> StoreResult<Option<CardRow>> {
        sqlx::query_as::<_, CardDbRow>("SELECT * FROM discord_cards WHERE request_id = $1")
            .bind(request_id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(db)?
            .map(CardDbRow::into_card)
            .transpose()
    }

    async fn card_done(
        &self,
        request_id: RequestId,
        message_id: u64,
        version: i64,
        rendered_state: String,
    ) -> StoreResult<()> {
        match self
            .write(Op::CardDone(
                request_id,
                message_id,
                version,
                rendered_state,
            ))
            .await?
        {
            Reply::Unit => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn card_retry_later(
        &self,
        request_id: RequestId,
        attempts: i64,
        next_attempt_ms: i64,
    ) -> StoreResult<()> {
        match self
            .write(Op::CardRetry(request_id, attempts, next_attempt_ms))
            .await?
        {
            Reply::Unit => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn close(&self) {
        // Readers first, so the writer's final checkpoint is not blocked by
        // them; the writer commits what is queued, checkpoints and closes.
        self.reads.close().await;
        if let Some((stop, handle)) = self.writer.lock().await.take() {
            let _ = stop.send(());
            let _ = handle.await;
        }
    }
}
