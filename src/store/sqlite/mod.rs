//! The SQLite store: WAL, one writer thread that group-commits (see
//! [`writer`]), a small pool of sqlx readers and a background checkpointer.

mod anomaly;
pub mod check;
mod digests;
mod escalations;
mod pauses;
mod runs;
pub(super) use runs::{argv_json, not_registered, runs_sql, RunRow, RUN_COLUMNS};
mod tokens;
mod write;
mod writer;

pub use writer::WalTuning;

use crate::app::ports::{
    AuditLog, CardRow, Cards, Change, Changes, Feed, Inserted, KeyHolder, PairedAudit, PairedUser,
    PairingRefused, Pairings, PendingPairing, PolicyData, Pruned, Requests, Store, StoreError,
    StoreResult, StoredGrant, Voted,
};
use crate::domain::audit::{self, AuditEntry, AuditEvent};
use crate::domain::policy::{Effect, Grant, Scope, ToolPattern};
use crate::domain::request::{
    ApprovalRequest, RequestId, State, TransitionError, Vote, VoterRights,
};
use crate::domain::stats::CallRecord;
use crate::domain::trifecta::{self, Guard, ToolTag};
use crate::domain::Risk;
use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{FromRow, Sqlite};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Mutex};
use write::Stored;
use writer::{Msg, Tx};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

use crate::store::error::sqlx as db;

pub struct SqliteStore {
    reads: SqlitePool,
    jobs: mpsc::Sender<Msg>,
    /// Fires once the writer has committed everything queued and closed.
    shutdown: Mutex<Option<oneshot::Receiver<()>>>,
    /// The writer's check of the database file (failed once it is lost).
    guard: Arc<writer::FileGuard>,
    /// Changes, published after each commit.
    feed: Feed,
    /// The Discord channel cards are posted in, when the store keeps cards.
    cards: Option<u64>,
}

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct Options {
    /// SQLite `synchronous`: `full`, else `normal`.
    pub synchronous: String,
    /// Most writes committed together.
    pub max_batch: usize,
    pub wal: WalTuning,
    /// The channel of the Discord card outbox: when set, the store creates
    /// and bumps card rows in the transactions that change requests (see
    /// [`Cards`]). `None` when Discord is not configured.
    pub cards: Option<u64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            synchronous: "normal".into(),
            max_batch: 512,
            wal: WalTuning::default(),
            cards: None,
        }
    }
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database at `url`.
    pub async fn open(url: &str, synchronous: &str, max_batch: usize) -> StoreResult<SqliteStore> {
        Self::open_tuned(url, synchronous, max_batch, WalTuning::default()).await
    }

    /// [`SqliteStore::open`] with the WAL's checkpoint settings spelled out.
    pub async fn open_tuned(
        url: &str,
        synchronous: &str,
        max_batch: usize,
        wal: WalTuning,
    ) -> StoreResult<SqliteStore> {
        let options = Options {
            synchronous: synchronous.into(),
            max_batch,
            wal,
            cards: None,
        };
        Self::open_with(url, &options).await
    }

    /// Opens (creating if missing) and migrates the database at `url`.
    pub async fn open_with(url: &str, options: &Options) -> StoreResult<SqliteStore> {
        let (max_batch, wal) = (options.max_batch, options.wal);
        let full = options.synchronous == "full";
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
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
        let writer = writer::start(opts.get_filename(), full, max_batch, wal)?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.read_only(true))
            .await
            .map_err(db)?;
        Ok(SqliteStore {
            reads,
            jobs: writer.jobs,
            shutdown: Mutex::new(Some(writer.done)),
            guard: writer.guard,
            feed: Feed::default(),
            cards: options.cards,
        })
    }

    /// The feed this store publishes on after each commit. Also the hook
    /// for changes committed elsewhere (another process on the same
    /// database, a PostgreSQL `LISTEN` later): publish them here and this
    /// process's subscribers follow them.
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// Runs one typed write (a function of [`write`]) on the writer thread
    /// and answers once it has committed. The caller publishes its change
    /// after this returns, so never before the commit.
    async fn write<A, F>(&self, write: F) -> StoreResult<A>
    where
        A: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> StoreResult<A> + Send + 'static,
    {
        let (job, answer) = writer::job(write);
        self.jobs
            .send(Msg::Job(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn publish(&self, change: Change) {
        self.feed.publish(change);
    }

    fn policy_changed(&self, changed: bool) {
        if changed {
            self.publish(Change::PolicyChanged);
        }
    }

    /// Publishes a decided request (vote, cancel, timeout).
    fn resolved(&self, r: &ApprovalRequest) {
        self.publish(Change::Resolved(Arc::new(r.clone())));
    }

    fn queued(&self, r: &ApprovalRequest) {
        if r.state == State::Pending {
            self.publish(Change::Queued {
                id: r.id,
                agent: r.agent.clone(),
                deadline_ms: r.deadline_ms,
            });
        }
    }
}

/// Rows per page when verifying the audit log.
pub(super) const VERIFY_PAGE: i64 = 5000;

pub(super) type FactsRow = (String, String, String, String, String, Option<String>, i64);

/// Rows per capability and scope the trifecta history reads (newest first):
/// enough to name the tools, bounded however busy the agent is.
const HISTORY_ROWS: usize = 20;

/// The history query for one capability bit and one scope column (`agent`
/// or `user_id`). Its WHERE repeats the partial index's (migration 0007)
/// word for word, so SQLite seeks that index.
pub(super) fn history_sql(column: &str, bit: i64) -> String {
    format!(
        "SELECT tool, agent, state FROM requests WHERE {column} = ?1 AND created_ms >= ?2 \
         AND (caps & {bit}) != 0 AND state IN ('approved', 'pending') \
         ORDER BY created_ms DESC LIMIT {HISTORY_ROWS}"
    )
}

/// Turns history rows `(tool, agent, state)` of one tag into what
/// [`trifecta::check`] takes, naming another agent's or a pending call.
pub(super) fn history_entry(
    agent: &str,
    tag: ToolTag,
    row: (String, String, String),
) -> (String, Vec<ToolTag>) {
    let (tool, by, state) = row;
    let mut label = if by == agent {
        tool
    } else {
        format!("{tool} by agent `{by}`")
    };
    if state == "pending" {
        label.push_str(" (pending)");
    }
    (label, vec![tag])
}

/// What a usage report reads of a request; the same SQL on both backends
/// (through `requests_created` in SQLite, a bounded scan in PostgreSQL).
pub(super) const STATS_SQL: &str = "SELECT state, decided_by, decided_who, tool, agent, rule, \
     created_ms, decided_ms FROM requests WHERE created_ms >= $1 \
     ORDER BY created_ms DESC LIMIT $2";

/// One row of [`STATS_SQL`].
#[derive(FromRow)]
pub(super) struct StatsRow {
    state: String,
    decided_by: Option<String>,
    decided_who: Option<String>,
    tool: String,
    agent: String,
    rule: String,
    created_ms: i64,
    decided_ms: Option<i64>,
}

impl StatsRow {
    /// The record, or [`StoreError::Corrupt`] for an unknown state or decider.
    pub(super) fn into_record(self) -> StoreResult<CallRecord> {
        Ok(CallRecord {
            state: self.state.parse().map_err(StoreError::Corrupt)?,
            decided_by: self
                .decided_by
                .map(|d| d.parse())
                .transpose()
                .map_err(StoreError::Corrupt)?,
            decided_who: self.decided_who,
            tool: self.tool,
            agent: self.agent,
            rule: self.rule,
            created_ms: self.created_ms,
            decided_ms: self.decided_ms,
        })
    }
}

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

#[derive(FromRow)]
pub(super) struct RequestRow {
    pub(super) id: String,
    pub(super) agent: String,
    pub(super) tool: String,
    pub(super) args: String,
    pub(super) args_hash: String,
    pub(super) user_id: Option<String>,
    pub(super) channel_id: Option<String>,
    pub(super) justification: String,
    pub(super) task_id: Option<String>,
    pub(super) idempotency_key: Option<String>,
    pub(super) risk: String,
    pub(super) approvals_required: i64,
    pub(super) admin_only: bool,
    pub(super) rule: String,
    pub(super) rule_detail: String,
    pub(super) flags: String,
    pub(super) created_ms: i64,
    pub(super) deadline_ms: i64,
    pub(super) state: String,
    pub(super) decided_by: Option<String>,
    pub(super) decided_who: Option<String>,
    pub(super) decided_reason: Option<String>,
    pub(super) decided_ms: Option<i64>,
    pub(super) requester_uid: Option<i64>,
    /// The run plan of a run-tool's request, as JSON (migration 0010).
    pub(super) run_plan: Option<String>,
    /// The call as submitted, when an approver edited it (migration 0014).
    pub(super) original_args: Option<String>,
    pub(super) original_args_hash: Option<String>,
    pub(super) edited_by: Option<String>,
    pub(super) edited_ms: Option<i64>,
}

/// A request's run plan as stored in its `run_plan` column (JSON), `None`
/// for a request of a tool Keyturn does not run.
pub(super) fn run_plan_json(r: &ApprovalRequest) -> StoreResult<Option<String>> {
    r.run
        .as_ref()
        .map(|plan| {
            serde_json::to_string(plan).map_err(|e| {
                StoreError::Failed(format!("request {}: cannot store its run plan: {e}", r.id))
            })
        })
        .transpose()
}

fn corrupt(what: String) -> StoreError {
    StoreError::Corrupt(what)
}

/// A grant's `effect` column: `allow` or `deny`, anything else corrupt
/// (never read as allow).
pub(super) fn parse_effect(text: &str) -> StoreResult<Effect> {
    match text {
        "allow" => Ok(Effect::Allow),
        "deny" => Ok(Effect::Deny),
        other => Err(corrupt(format!("unknown grant effect `{other}`"))),
    }
}

impl RequestRow {
    pub(super) fn into_request(self) -> StoreResult<ApprovalRequest> {
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
            requester_uid: self
                .requester_uid
                .map(|u| {
                    u32::try_from(u)
                        .map_err(|_| corrupt(format!("request {}: bad requester_uid {u}", self.id)))
                })
                .transpose()?,
            run: self
                .run_plan
                .as_deref()
                .map(|text| {
                    serde_json::from_str(text)
                        .map_err(|e| corrupt(format!("request {}: bad run plan: {e}", self.id)))
                })
                .transpose()?,
            edit: match (
                self.original_args,
                self.original_args_hash,
                self.edited_by,
                self.edited_ms,
            ) {
                (None, None, None, None) => None,
                (Some(args), Some(hash), Some(by), Some(at_ms)) => {
                    Some(crate::domain::request::ArgsEdit {
                        original_args: serde_json::from_str(&args).map_err(|e| {
                            corrupt(format!("request {}: bad original args: {e}", self.id))
                        })?,
                        original_args_hash: hash,
                        by,
                        at_ms,
                    })
                }
                _ => {
                    return Err(corrupt(format!(
                        "request {}: its edit is half recorded",
                        self.id
                    )))
                }
            },
        })
    }
}

#[derive(FromRow)]
pub(super) struct CardDbRow {
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
    pub(super) fn into_card(self) -> StoreResult<CardRow> {
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
pub(super) struct AuditRow {
    pub(super) seq: i64,
    at_ms: i64,
    kind: String,
    actor: String,
    request_id: Option<String>,
    detail: String,
    prev_hash: String,
    hash: String,
}

impl AuditRow {
    pub(super) fn into_entry(self) -> AuditEntry {
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
impl Requests for SqliteStore {
    async fn insert_request(
        &self,
        req: ApprovalRequest,
        audit: Vec<AuditEvent>,
    ) -> StoreResult<Inserted> {
        self.insert_guarded(req, audit, None, usize::MAX).await
    }
    async fn vote(
        &self,
        id: RequestId,
        vote: Vote,
        rights: VoterRights,
    ) -> StoreResult<Result<Voted, TransitionError>> {
        let cards = self.cards;
        let v = self
            .write(move |tx| write::vote(tx, id, &vote, rights, cards, None))
            .await?;
        match &v {
            Ok(v) if v.request.state.is_terminal() => self.resolved(&v.request),
            Ok(v) => self.publish(Change::Voted { id: v.request.id }),
            Err(_) => {}
        }
        Ok(v)
    }
    async fn vote_edited(
        &self,
        id: RequestId,
        vote: Vote,
        rights: VoterRights,
        change: crate::domain::edit::ArgsChange,
    ) -> StoreResult<Result<Voted, TransitionError>> {
        let cards = self.cards;
        let v = self
            .write(move |tx| write::vote(tx, id, &vote, rights, cards, Some(&change)))
            .await?;
        match &v {
            Ok(v) if v.request.state.is_terminal() => self.resolved(&v.request),
            Ok(v) => self.publish(Change::Voted { id: v.request.id }),
            Err(_) => {}
        }
        Ok(v)
    }
    async fn cancel(
        &self,
        id: RequestId,
        who: String,
        reason: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
        let cards = self.cards;
        let r = self
            .write(move |tx| write::cancel(tx, id, &who, reason.clone(), now_ms, cards))
            .await?;
        if let Ok(r) = &r {
            self.resolved(r);
        }
        Ok(r)
    }
    async fn time_out(
        &self,
        id: RequestId,
        now_ms: i64,
    ) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
        let cards = self.cards;
        let r = self
            .write(move |tx| write::time_out(tx, id, now_ms, cards))
            .await?;
        if let Ok(r) = &r {
            self.resolved(r);
        }
        Ok(r)
    }
    async fn get_request(&self, id: RequestId) -> StoreResult<Option<ApprovalRequest>> {
        sqlx::query_as::<_, RequestRow>("SELECT * FROM requests WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(db)?
            .map(RequestRow::into_request)
            .transpose()
    }
    async fn find_by_idempotency_key(
        &self,
        agent: &str,
        key: &str,
    ) -> StoreResult<Option<KeyHolder>> {
        #[derive(FromRow)]
        struct Row {
            #[sqlx(flatten)]
            request: RequestRow,
            idempotency_fp: Option<String>,
        }
        let Some(row) = sqlx::query_as::<_, Row>(
            "SELECT * FROM requests WHERE agent = $1 AND idempotency_key = $2",
        )
        .bind(agent)
        .bind(key)
        .fetch_optional(&self.reads)
        .await
        .map_err(db)?
        else {
            return Ok(None);
        };
        Ok(Some(KeyHolder {
            request: row.request.into_request()?,
            fingerprint: row.idempotency_fp,
        }))
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
        .map(RequestRow::into_request)
        .collect()
    }
    async fn due_deadlines(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<(RequestId, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, deadline_ms FROM requests INDEXED BY requests_pending_deadline \
             WHERE state = 'pending' AND deadline_ms <= $1 ORDER BY deadline_ms LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit as i64)
        .fetch_all(&self.reads)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(id, d)| Ok((id.parse().map_err(StoreError::Corrupt)?, d)))
            .collect()
    }
    async fn next_deadline(&self) -> StoreResult<Option<i64>> {
        let (d,): (Option<i64>,) = sqlx::query_as(
            "SELECT MIN(deadline_ms) FROM requests INDEXED BY requests_pending_deadline \
             WHERE state = 'pending'",
        )
        .fetch_one(&self.reads)
        .await
        .map_err(db)?;
        Ok(d)
    }
    async fn pending_counts(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT agent, pending FROM agent_pending WHERE pending > 0")
                .fetch_all(&self.reads)
                .await
                .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(a, n)| (a, n.max(0) as u64))
            .collect())
    }
    async fn insert_guarded(
        &self,
        req: ApprovalRequest,
        audit: Vec<AuditEvent>,
        guard: Option<Guard>,
        max_pending: usize,
    ) -> StoreResult<Inserted> {
        let sealed: Vec<_> = audit.iter().map(AuditEvent::seal).collect();
        let req = Arc::new(req);
        let mine = req.clone();
        let cards = self.cards;
        let stored = self
            .write(move |tx| write::insert(tx, &mine, &sealed, guard.as_ref(), max_pending, cards))
            .await?;
        Ok(match stored {
            // The writer has dropped its handle by now, so this rarely copies.
            Stored::New => {
                let r = Arc::try_unwrap(req).unwrap_or_else(|shared| (*shared).clone());
                self.queued(&r);
                Inserted::New(r)
            }
            Stored::Guarded(r) => {
                self.queued(&r);
                Inserted::New(r)
            }
            Stored::Existing(r) => Inserted::Existing(r),
            Stored::Conflict(r) => Inserted::Conflict(r),
            Stored::TooManyPending => Inserted::TooManyPending { max: max_pending },
        })
    }
    async fn trifecta_history(
        &self,
        agent: &str,
        user: Option<&str>,
        since_ms: i64,
    ) -> StoreResult<Vec<(String, Vec<ToolTag>)>> {
        let mut out = Vec::new();
        for tag in trifecta::ALL_TAGS {
            for (column, key) in [("agent", Some(agent)), ("user_id", user)] {
                let Some(key) = key else { continue };
                let rows: Vec<(String, String, String)> =
                    sqlx::query_as(&history_sql(column, tag.bit()))
                        .bind(key)
                        .bind(since_ms)
                        .fetch_all(&self.reads)
                        .await
                        .map_err(db)?;
                out.extend(rows.into_iter().map(|r| history_entry(agent, tag, r)));
            }
        }
        Ok(out)
    }
    async fn requests_since(&self, since_ms: i64, limit: u32) -> StoreResult<Vec<CallRecord>> {
        sqlx::query_as::<_, StatsRow>(STATS_SQL)
            .bind(since_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(db)?
            .into_iter()
            .map(StatsRow::into_record)
            .collect()
    }
}

#[async_trait]
impl PolicyData for SqliteStore {
    async fn add_grant(
        &self,
        grant: Grant,
        by: String,
        now_ms: i64,
        audit: AuditEvent,
    ) -> StoreResult<bool> {
        let audit = audit.seal();
        let done = self
            .write(move |tx| write::add_grant(tx, &grant, &by, now_ms, &audit))
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn remove_grant(
        &self,
        scope: Scope,
        tool: ToolPattern,
        effect: Effect,
        audit: AuditEvent,
    ) -> StoreResult<bool> {
        let audit = audit.seal();
        let done = self
            .write(move |tx| write::remove_grant(tx, &scope, &tool, effect, &audit))
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn add_timed_grant(
        &self,
        grant: crate::domain::timed::TimedGrant,
        audit: AuditEvent,
    ) -> StoreResult<()> {
        let audit = audit.seal();
        self.write(move |tx| write::add_timed_grant(tx, &grant, &audit))
            .await?;
        self.policy_changed(true);
        Ok(())
    }
    async fn remove_timed_grant(&self, id: String, audit: AuditEvent) -> StoreResult<bool> {
        let audit = audit.seal();
        let done = self
            .write(move |tx| write::remove_timed_grant(tx, &id, &audit))
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn timed_grants(&self) -> StoreResult<Vec<crate::domain::timed::TimedGrant>> {
        sqlx::query_as::<_, crate::store::timed::TimedRow>(crate::store::timed::SELECT)
            .fetch_all(&self.reads)
            .await
            .map_err(db)?
            .into_iter()
            .map(crate::store::timed::TimedRow::into_grant)
            .collect()
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
                        effect: parse_effect(&effect)?,
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
        audit: AuditEvent,
    ) -> StoreResult<()> {
        let audit = audit.seal();
        self.write(move |tx| write::set_tool_risk(tx, &tool, risk, &by, now_ms, &audit))
            .await?;
        self.policy_changed(true);
        Ok(())
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
}

#[async_trait]
impl Pairings for SqliteStore {
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
    async fn pair_user(&self, user: PairedUser, audit: AuditEvent) -> StoreResult<bool> {
        let audit = audit.seal();
        let done = self
            .write(move |tx| write::pair_user(tx, &user, &audit))
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn unpair_user(&self, user_id: String, audit: AuditEvent) -> StoreResult<bool> {
        let audit = audit.seal();
        let done = self
            .write(move |tx| write::unpair_user(tx, &user_id, &audit))
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn create_pairing_code(
        &self,
        user_id: String,
        display_name: Option<String>,
        code_hash: String,
        now_ms: i64,
        expires_ms: i64,
        max_live: usize,
        audit: AuditEvent,
    ) -> StoreResult<Result<(), PairingRefused>> {
        let audit = audit.seal();
        let code = write::NewCode {
            user_id,
            display_name,
            code_hash,
            now_ms,
            expires_ms,
            max_live,
        };
        self.write(move |tx| write::create_pairing_code(tx, &code, &audit))
            .await
    }
    async fn redeem_pairing_code(
        &self,
        code: String,
        by: String,
        now_ms: i64,
        audit: PairedAudit,
    ) -> StoreResult<Option<PairedUser>> {
        let user = self
            .write(move |tx| write::redeem_pairing_code(tx, &code, &by, now_ms, audit))
            .await?;
        self.policy_changed(user.is_some());
        Ok(user)
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
}

#[async_trait]
impl AuditLog for SqliteStore {
    async fn append_audit(&self, events: Vec<AuditEvent>) -> StoreResult<()> {
        let sealed: Vec<_> = events.iter().map(AuditEvent::seal).collect();
        self.write(move |tx| write::append_audit(tx, &sealed)).await
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
    async fn audit_verify(&self) -> StoreResult<Result<(u64, u64), audit::Break>> {
        // One read transaction: in WAL mode every statement in it sees the
        // database as of its first read, so rows appended while the walk
        // runs are neither half-seen nor mistaken for deleted ones.
        let mut tx = self.reads.begin().await.map_err(db)?;
        let (head_seq, head_hash): (i64, String) =
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
        let mut walk = audit::ChainVerifier::new();
        let mut ledger = audit::RequestLedger::new();
        let mut after = 0;
        loop {
            let page: Vec<AuditRow> =
                sqlx::query_as("SELECT * FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(VERIFY_PAGE)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for row in page {
                let e = row.into_entry();
                if let Err(b) = walk.push(&e) {
                    return Ok(Err(b));
                }
                ledger.push(&e);
            }
        }
        let entries = match walk.finish().and_then(|n| {
            walk.check_head(head_seq, &head_hash)?;
            Ok(n)
        }) {
            Ok(n) => n,
            Err(b) => return Ok(Err(b)),
        };
        let mut after = String::new();
        loop {
            let page: Vec<FactsRow> = sqlx::query_as(
                "SELECT id, agent, tool, args_hash, state, decided_by, created_ms FROM requests \
                 WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(&after)
            .bind(VERIFY_PAGE)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            let Some(last) = page.last() else { break };
            after = last.0.clone();
            for (id, agent, tool, args_hash, state, decided_by, created_ms) in page {
                let facts = audit::RequestFacts {
                    id,
                    agent,
                    tool,
                    args_hash,
                    state,
                    decided_by,
                    created_ms,
                };
                if let Err(b) = ledger.check(&facts) {
                    return Ok(Err(b));
                }
            }
        }
        tx.rollback().await.map_err(db)?;
        Ok(ledger.finish().map(|requests| (entries, requests)))
    }
    async fn prune_audit(&self, cutoff_ms: i64, now_ms: i64) -> StoreResult<Option<Pruned>> {
        self.write(move |tx| write::prune_audit(tx, cutoff_ms, now_ms))
            .await
    }
}

#[async_trait]
impl Cards for SqliteStore {
    async fn card_reconcile(&self, channel_id: u64) -> StoreResult<u64> {
        let n = self
            .write(move |tx| write::card_reconcile(tx, channel_id))
            .await?;
        if n > 0 {
            self.publish(Change::CardsDue);
        }
        Ok(n)
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
    async fn cards_backlog(&self) -> StoreResult<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM discord_cards WHERE want > done")
            .fetch_one(&self.reads)
            .await
            .map_err(db)?;
        Ok(n.max(0) as u64)
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
        self.write(move |tx| write::card_done(tx, request_id, message_id, version, &rendered_state))
            .await
    }
    async fn cards_retry_now(&self, now_ms: i64) -> StoreResult<u64> {
        let n = self
            .write(move |tx| write::cards_retry_now(tx, now_ms))
            .await?;
        if n > 0 {
            self.publish(Change::CardsDue);
        }
        Ok(n)
    }
    async fn card_retry_later(
        &self,
        request_id: RequestId,
        attempts: i64,
        next_attempt_ms: i64,
    ) -> StoreResult<()> {
        self.write(move |tx| write::card_retry_later(tx, request_id, attempts, next_attempt_ms))
            .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn write_failure(&self) -> Option<String> {
        self.guard.lost().map(|e| e.to_string())
    }
    async fn close(&self) {
        // Readers first, so the writer's final checkpoint is not blocked by
        // them; the writer commits what is queued, checkpoints and closes.
        self.reads.close().await;
        if let Some(written) = self.shutdown.lock().await.take() {
            let _ = self.jobs.send(Msg::Stop).await;
            let _ = written.await;
        }
    }
}

impl Changes for SqliteStore {
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.feed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RequestRow {
        RequestRow {
            id: "00000000-0000-0000-0000-000000000001".into(),
            agent: "a".into(),
            tool: "t".into(),
            args: "{}".into(),
            args_hash: "h".into(),
            user_id: None,
            channel_id: None,
            justification: String::new(),
            task_id: None,
            idempotency_key: None,
            risk: "high".into(),
            approvals_required: 1,
            admin_only: false,
            rule: "r".into(),
            rule_detail: String::new(),
            flags: "[]".into(),
            created_ms: 0,
            deadline_ms: 1,
            state: "approved".into(),
            decided_by: Some("human".into()),
            decided_who: None,
            decided_reason: None,
            decided_ms: None,
            requester_uid: None,
            run_plan: None,
            original_args: None,
            original_args_hash: None,
            edited_by: None,
            edited_ms: None,
        }
    }

    #[test]
    fn a_grant_effect_is_allow_or_deny_and_nothing_else_is_allow() {
        assert_eq!(parse_effect("allow").unwrap(), Effect::Allow);
        assert_eq!(parse_effect("deny").unwrap(), Effect::Deny);
        for bad in ["", "Allow", "DENY", "allow ", "maybe"] {
            assert!(
                matches!(parse_effect(bad), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_enum_column_of_a_request_parses_fail_closed() {
        assert!(row().into_request().is_ok());
        type Spoil = fn(&mut RequestRow);
        let spoiled: [(&str, Spoil); 8] = [
            ("state", |r| r.state = "approved ".into()),
            ("state", |r| r.state = "allowed".into()),
            ("risk", |r| r.risk = "none".into()),
            ("decided_by", |r| r.decided_by = Some("admin".into())),
            ("flags", |r| r.flags = "{}".into()),
            ("requester_uid", |r| r.requester_uid = Some(-1)),
            ("run_plan", |r| r.run_plan = Some("{}".into())),
            ("run_plan", |r| r.run_plan = Some("null".into())),
        ];
        for (what, spoil) in spoiled {
            let mut r = row();
            spoil(&mut r);
            assert!(
                matches!(r.into_request(), Err(StoreError::Corrupt(_))),
                "a bad {what} must be corrupt"
            );
        }
    }
}
