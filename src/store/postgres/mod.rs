//! The PostgreSQL store: the same ports and behaviour as the SQLite store,
//! for several processes sharing one database.
//!
//! Writes go through one group-committing writer task per store
//! ([`writer`]), each in its own savepoint of the batch's transaction;
//! every transaction that writes locks the audit chain's head row first, so
//! the processes writing one database keep one chain. A write that
//! publishes a change also sends a note ([`notify`]) in its transaction,
//! for the other processes; this process publishes on its [`Feed`] after
//! the commit, as the SQLite store does. Reads use a pool. The URL's
//! `options=-c search_path=NAME` picks the schema (created if missing).

mod anomaly;
mod deferred;
mod digests;
mod escalations;
pub mod leader;
pub mod listen;
pub mod notify;
mod pauses;
mod runs;
#[cfg(test)]
mod testdb;
mod tokens;
mod write;
mod writer;

pub use writer::MAX_SAVEPOINTS;

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
use crate::domain::trifecta::{Guard, ToolTag};
use crate::domain::Risk;
use crate::store::error::sqlx as db;
use crate::store::sqlite::{
    parse_effect, AuditRow, CardDbRow, FactsRow, RequestRow, StatsRow, STATS_SQL, VERIFY_PAGE,
};
use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, FromRow, PgConnection};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Mutex};
use write::Stored;
use writer::{Msg, Tx};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long opening the store waits for PostgreSQL, and how long an
/// operation waits for a pooled connection (then: unavailable).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `cards_due` claims the cards it returns for this store.
pub const CARD_CLAIM: Duration = Duration::from_secs(30);
/// Read connections per store (as the SQLite store's readers: the hot
/// path's reads are served from memory).
const READ_CONNECTIONS: u32 = 4;

/// How to open a [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Most writes committed together (at most [`MAX_SAVEPOINTS`]).
    pub max_batch: usize,
    /// The channel of the Discord card outbox (see the SQLite store's `Options`).
    pub cards: Option<u64>,
    /// How often to re-read what other processes may have changed
    /// (`store.recheck`, see [`listen`]).
    pub recheck: Duration,
}

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            max_batch: 512,
            cards: None,
            recheck: Duration::from_secs(1),
        }
    }
}

pub struct PgStore {
    reads: PgPool,
    jobs: mpsc::Sender<Msg>,
    /// Fires once the writer has answered everything queued and closed.
    shutdown: Mutex<Option<oneshot::Receiver<()>>>,
    feed: Arc<Feed>,
    cards: Option<u64>,
    origin: Arc<str>,
    connect: PgConnectOptions,
    /// Ends the listener and the leadership task when the store closes.
    stop: tokio_util::sync::CancellationToken,
    leadership: leader::Leadership,
}

pub use crate::config::redact_url;

/// The first schema of a `-c search_path=…` in the connect options, if any.
fn search_path_schema(opts: &PgConnectOptions) -> Option<String> {
    let options = opts.get_options()?;
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let setting = match w {
            "-c" => words.next()?,
            w => match w.strip_prefix("-c") {
                Some(s) => s,
                None => continue,
            },
        };
        let Some(path) = setting
            .strip_prefix("search_path=")
            .or_else(|| setting.strip_prefix("search-path="))
        else {
            continue;
        };
        let first = path.split(',').next()?.trim().trim_matches('"');
        return (!first.is_empty() && first != "$user").then(|| first.to_string());
    }
    None
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PgStore {
    /// Connects (within [`CONNECT_TIMEOUT`]), creates the search_path's
    /// schema if the URL names one that is missing, migrates, and starts
    /// the writer.
    pub async fn open(url: &str, options: &PgOptions) -> StoreResult<PgStore> {
        let shown = redact_url(url);
        let origin: Arc<str> = uuid::Uuid::new_v4().to_string().into();
        let mut connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Failed(format!("bad store URL {shown}: {e}")))?;
        if connect.get_application_name().is_none() {
            // One name per store, so an operator (or a test) can find its sessions.
            connect = connect.application_name(&format!("keyturn-{}", &origin[..8]));
        }
        let mut setup = match tokio::time::timeout(CONNECT_TIMEOUT, connect.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(StoreError::unavailable(format!(
                    "cannot connect to PostgreSQL at {shown}: {e}"
                )))
            }
            Err(_) => {
                return Err(StoreError::unavailable(format!(
                    "cannot connect to PostgreSQL at {shown}: no answer within {CONNECT_TIMEOUT:?}"
                )))
            }
        };
        if let Some(schema) = search_path_schema(&connect) {
            create_schema(&mut setup, &schema).await?;
        }
        let _ = setup.close().await;
        let pool = |n| {
            PgPoolOptions::new()
                .max_connections(n)
                .acquire_timeout(CONNECT_TIMEOUT)
                // A connection is pinged when it goes back to the pool
                // (dropped there if dead): not again on the way out.
                .test_before_acquire(false)
                .connect_lazy_with(connect.clone())
        };
        let writes = pool(writer::WRITE_CONNECTIONS);
        MIGRATOR
            .run(&writes)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        let reads = pool(READ_CONNECTIONS);
        let writer = writer::start(writes, origin.clone(), options.max_batch);
        let store = PgStore {
            reads,
            jobs: writer.jobs,
            shutdown: Mutex::new(Some(writer.done)),
            feed: Arc::new(Feed::default()),
            cards: options.cards,
            origin,
            connect,
            stop: tokio_util::sync::CancellationToken::new(),
            leadership: leader::Leadership::new(),
        };
        // Other processes' changes, heard from here on.
        let reads = store.reads.clone();
        let load: listen::Load = Arc::new(move |id| {
            let reads = reads.clone();
            Box::pin(async move {
                sqlx::query_as::<_, RequestRow>("SELECT * FROM requests WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&reads)
                    .await
                    .map_err(db)?
                    .map(RequestRow::into_request)
                    .transpose()
            })
        });
        let listen = listen::Listen {
            connect: store.connect.clone(),
            origin: store.origin.to_string(),
            feed: store.feed.clone(),
            recheck: options.recheck,
            load,
        };
        listen::start(listen, store.stop.clone()).await?;
        Ok(store)
    }

    /// This store's origin: the id its notes carry, so the process that
    /// sent a note can ignore it (it published the change already).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The feed this store publishes on after each commit, shareable with
    /// a task that publishes what other processes committed.
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// How this store connects (application_name and schema included).
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.connect
    }

    /// The read pool.
    pub fn reads(&self) -> &PgPool {
        &self.reads
    }

    /// Runs one typed write on the writer and answers once it has committed.
    async fn write<A, F>(&self, write: F) -> StoreResult<A>
    where
        A: Send + 'static,
        F: for<'t> FnMut(&'t mut Tx) -> BoxFuture<'t, StoreResult<A>> + Send + 'static,
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

/// `CREATE SCHEMA IF NOT EXISTS`, tolerating another process creating it
/// at the same moment.
async fn create_schema(conn: &mut PgConnection, schema: &str) -> StoreResult<()> {
    match sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", ident(schema)))
        .execute(conn)
        .await
    {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(d)) if matches!(d.code().as_deref(), Some("23505" | "42P06")) => {
            Ok(())
        }
        Err(e) => Err(db(e)),
    }
}

type VoteRow = (String, Option<String>, bool, Option<String>, i64);

pub(super) async fn load_votes(
    conn: impl sqlx::PgExecutor<'_>,
    id: RequestId,
) -> Result<Vec<Vote>, sqlx::Error> {
    let rows: Vec<VoteRow> = sqlx::query_as(
        "SELECT voter, name, approve, reason, at_ms FROM votes WHERE request_id = $1 \
         ORDER BY at_ms, voter",
    )
    .bind(id.to_string())
    .fetch_all(conn)
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

#[async_trait]
impl Requests for PgStore {
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
        let vote = Arc::new(vote);
        let v = self
            .write(move |tx| {
                let vote = vote.clone();
                Box::pin(async move { write::vote(tx, id, &vote, rights, cards, None).await })
            })
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
        let vote = Arc::new(vote);
        let change = Arc::new(change);
        let v = self
            .write(move |tx| {
                let vote = vote.clone();
                let change = change.clone();
                Box::pin(
                    async move { write::vote(tx, id, &vote, rights, cards, Some(&change)).await },
                )
            })
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
            .write(move |tx| {
                let (who, reason) = (who.clone(), reason.clone());
                Box::pin(async move { write::cancel(tx, id, &who, reason, now_ms, cards).await })
            })
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
            .write(move |tx| Box::pin(write::time_out(tx, id, now_ms, cards)))
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
    async fn decided_among(&self, ids: &[RequestId]) -> StoreResult<Vec<ApprovalRequest>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        sqlx::query_as::<_, RequestRow>(
            "SELECT * FROM requests WHERE id = ANY($1) AND state <> 'pending'",
        )
        .bind(ids)
        .fetch_all(&self.reads)
        .await
        .map_err(db)?
        .into_iter()
        .map(RequestRow::into_request)
        .filter(|r| !matches!(r, Ok(r) if !r.state.is_terminal()))
        .collect()
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
            "SELECT id, deadline_ms FROM requests \
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
        let (d,): (Option<i64>,) =
            sqlx::query_as("SELECT MIN(deadline_ms) FROM requests WHERE state = 'pending'")
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
        let sealed: Arc<[audit::SealedEvent]> = audit.iter().map(AuditEvent::seal).collect();
        let req = Arc::new(req);
        let mine = req.clone();
        let guard = guard.map(Arc::new);
        let cards = self.cards;
        let stored = self
            .write(move |tx| {
                let (req, sealed, guard) = (mine.clone(), sealed.clone(), guard.clone());
                Box::pin(async move {
                    write::insert(tx, &req, &sealed, guard.as_deref(), max_pending, cards).await
                })
            })
            .await?;
        Ok(match stored {
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
        let mut conn = self.reads.acquire().await.map_err(db)?;
        write::history(&mut conn, agent, user, since_ms).await
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
impl PolicyData for PgStore {
    async fn add_grant(
        &self,
        grant: Grant,
        by: String,
        now_ms: i64,
        audit: AuditEvent,
    ) -> StoreResult<bool> {
        let audit = Arc::new(audit.seal());
        let (grant, by) = (Arc::new(grant), Arc::new(by));
        let done = self
            .write(move |tx| {
                let (grant, by, audit) = (grant.clone(), by.clone(), audit.clone());
                Box::pin(async move { write::add_grant(tx, &grant, &by, now_ms, &audit).await })
            })
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
        let audit = Arc::new(audit.seal());
        let (scope, tool) = (Arc::new(scope), Arc::new(tool));
        let done = self
            .write(move |tx| {
                let (scope, tool, audit) = (scope.clone(), tool.clone(), audit.clone());
                Box::pin(
                    async move { write::remove_grant(tx, &scope, &tool, effect, &audit).await },
                )
            })
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn add_timed_grant(
        &self,
        grant: crate::domain::timed::TimedGrant,
        audit: AuditEvent,
    ) -> StoreResult<()> {
        let audit = Arc::new(audit.seal());
        let grant = Arc::new(grant);
        self.write(move |tx| {
            let (grant, audit) = (grant.clone(), audit.clone());
            Box::pin(async move { write::add_timed_grant(tx, &grant, &audit).await })
        })
        .await?;
        self.policy_changed(true);
        Ok(())
    }
    async fn remove_timed_grant(&self, id: String, audit: AuditEvent) -> StoreResult<bool> {
        let audit = Arc::new(audit.seal());
        let id = Arc::new(id);
        let done = self
            .write(move |tx| {
                let (id, audit) = (id.clone(), audit.clone());
                Box::pin(async move { write::remove_timed_grant(tx, &id, &audit).await })
            })
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
            "SELECT scope, tool, effect, created_by, created_ms FROM grants \
             ORDER BY scope COLLATE \"C\", tool COLLATE \"C\"",
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
        let audit = Arc::new(audit.seal());
        let (tool, by) = (Arc::new(tool), Arc::new(by));
        self.write(move |tx| {
            let (tool, by, audit) = (tool.clone(), by.clone(), audit.clone());
            Box::pin(
                async move { write::set_tool_risk(tx, &tool, risk, &by, now_ms, &audit).await },
            )
        })
        .await?;
        self.policy_changed(true);
        Ok(())
    }
    async fn tool_risks(&self) -> StoreResult<Vec<(String, Risk)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT tool, risk FROM tool_risks ORDER BY tool COLLATE \"C\"")
                .fetch_all(&self.reads)
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|(t, r)| Ok((t, r.parse().map_err(StoreError::Corrupt)?)))
            .collect()
    }
}

#[async_trait]
impl Pairings for PgStore {
    async fn paired_users(&self) -> StoreResult<Vec<PairedUser>> {
        let rows: Vec<(String, String, Option<String>, String, i64)> = sqlx::query_as(
            "SELECT user_id, roles, display_name, paired_by, paired_ms FROM paired_users \
             ORDER BY paired_ms",
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
        let audit = Arc::new(audit.seal());
        let user = Arc::new(user);
        let done = self
            .write(move |tx| {
                let (user, audit) = (user.clone(), audit.clone());
                Box::pin(async move { write::pair_user(tx, &user, &audit).await })
            })
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn unpair_user(&self, user_id: String, audit: AuditEvent) -> StoreResult<bool> {
        let audit = Arc::new(audit.seal());
        let user_id = Arc::new(user_id);
        let done = self
            .write(move |tx| {
                let (user_id, audit) = (user_id.clone(), audit.clone());
                Box::pin(async move { write::unpair_user(tx, &user_id, &audit).await })
            })
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
        let audit = Arc::new(audit.seal());
        let code = Arc::new(write::NewCode {
            user_id,
            display_name,
            code_hash,
            now_ms,
            expires_ms,
            max_live,
        });
        self.write(move |tx| {
            let (code, audit) = (code.clone(), audit.clone());
            Box::pin(async move { write::create_pairing_code(tx, &code, &audit).await })
        })
        .await
    }
    async fn redeem_pairing_code(
        &self,
        code: String,
        by: String,
        now_ms: i64,
        audit: PairedAudit,
    ) -> StoreResult<Option<PairedUser>> {
        let (code, by) = (Arc::new(code), Arc::new(by));
        let user = self
            .write(move |tx| {
                let (code, by) = (code.clone(), by.clone());
                Box::pin(
                    async move { write::redeem_pairing_code(tx, &code, &by, now_ms, audit).await },
                )
            })
            .await?;
        self.policy_changed(user.is_some());
        Ok(user)
    }
    async fn pairing_codes(&self, now_ms: i64) -> StoreResult<Vec<PendingPairing>> {
        let rows: Vec<(String, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT user_id, display_name, created_ms, expires_ms FROM pairing_codes \
             WHERE expires_ms > $1 ORDER BY created_ms",
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
impl AuditLog for PgStore {
    async fn append_audit(&self, events: Vec<AuditEvent>) -> StoreResult<()> {
        let sealed: Arc<[audit::SealedEvent]> = events.iter().map(AuditEvent::seal).collect();
        self.write(move |tx| {
            let sealed = sealed.clone();
            Box::pin(async move { write::append_audit(tx, &sealed).await })
        })
        .await
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
        // One snapshot for the whole walk: rows appended meanwhile (by any
        // process) are neither half-seen nor mistaken for deleted ones.
        let mut tx = self.reads.begin().await.map_err(db)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
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
        self.write(move |tx| Box::pin(write::prune_audit(tx, cutoff_ms, now_ms)))
            .await
    }
}

#[async_trait]
impl Cards for PgStore {
    async fn card_reconcile(&self, channel_id: u64) -> StoreResult<u64> {
        let n = self
            .write(move |tx| Box::pin(write::card_reconcile(tx, channel_id)))
            .await?;
        if n > 0 {
            self.publish(Change::CardsDue);
        }
        Ok(n)
    }
    /// Claims the due cards it returns for this store for [`CARD_CLAIM`]
    /// (`FOR UPDATE SKIP LOCKED`, and a claim another store holds until it
    /// expires is skipped), so two processes draining the outbox never get
    /// the same card. Posting or failing a card clears its claim.
    async fn cards_due(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<CardRow>> {
        let until = now_ms.saturating_add(CARD_CLAIM.as_millis() as i64);
        let mut cards: Vec<CardRow> = sqlx::query_as::<_, CardDbRow>(
            "UPDATE discord_cards c SET claimed_by = $3, claim_until_ms = $4 \
             FROM (SELECT request_id FROM discord_cards \
                   WHERE want > done AND next_attempt_ms <= $1 \
                   AND (claimed_by IS NULL OR claimed_by = $3 OR claim_until_ms <= $1) \
                   ORDER BY deadline_ms, request_id LIMIT $2 \
                   FOR UPDATE SKIP LOCKED) due \
             WHERE c.request_id = due.request_id RETURNING c.*",
        )
        .bind(now_ms)
        .bind(limit as i64)
        .bind(&*self.origin)
        .bind(until)
        .fetch_all(&self.reads)
        .await
        .map_err(db)?
        .into_iter()
        .map(CardDbRow::into_card)
        .collect::<StoreResult<_>>()?;
        cards.sort_by(|a, b| {
            (a.deadline_ms, a.request_id.to_string())
                .cmp(&(b.deadline_ms, b.request_id.to_string()))
        });
        Ok(cards)
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
        let rendered_state = Arc::new(rendered_state);
        self.write(move |tx| {
            let state = rendered_state.clone();
            Box::pin(
                async move { write::card_done(tx, request_id, message_id, version, &state).await },
            )
        })
        .await
    }
    async fn cards_retry_now(&self, now_ms: i64) -> StoreResult<u64> {
        let n = self
            .write(move |tx| Box::pin(write::cards_retry_now(tx, now_ms)))
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
        self.write(move |tx| {
            Box::pin(write::card_retry_later(
                tx,
                request_id,
                attempts,
                next_attempt_ms,
            ))
        })
        .await
    }
}

#[async_trait]
impl Store for PgStore {
    fn leadership(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leadership.get(&self.connect, &self.stop)
    }

    async fn close(&self) {
        self.stop.cancel();
        self.reads.close().await;
        if let Some(written) = self.shutdown.lock().await.take() {
            let _ = self.jobs.send(Msg::Stop).await;
            let _ = written.await;
        }
    }
}

impl Changes for PgStore {
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.feed.subscribe()
    }
}

/// Drops the schema `url`'s `search_path` names, CASCADE (for `keyturn
/// bench`, which works in a schema of its own). Refuses a URL that names none.
pub async fn drop_schema(url: &str) -> StoreResult<()> {
    let shown = redact_url(url);
    let connect = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Failed(format!("bad store URL {shown}: {e}")))?;
    let schema = search_path_schema(&connect)
        .ok_or_else(|| StoreError::Failed(format!("{shown} names no schema to drop")))?;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, connect.connect())
        .await
        .map_err(|_| StoreError::unavailable(format!("no answer from {shown}")))?
        .map_err(db)?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", ident(&schema)))
        .execute(&mut conn)
        .await
        .map_err(db)?;
    let _ = conn.close().await;
    Ok(())
}

/// `keyturn db check` on PostgreSQL: connects (within [`CONNECT_TIMEOUT`]),
/// checks that every migration of this build is applied (and unchanged),
/// and reads every pending request in full, as listing and expiring them
/// does. Read-only: it never creates, migrates or writes anything.
pub async fn check(url: &str) -> crate::store::check::Report {
    let mut report = crate::store::check::Report::default();
    let shown = redact_url(url);
    let connect = match PgConnectOptions::from_str(url) {
        Ok(c) => c,
        Err(e) => {
            report.problems.push(format!("bad store URL {shown}: {e}"));
            return report;
        }
    };
    let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, connect.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            report
                .problems
                .push(format!("cannot connect to PostgreSQL at {shown}: {e}"));
            report.unreachable = true;
            return report;
        }
        Err(_) => {
            report.problems.push(format!(
                "cannot connect to PostgreSQL at {shown}: no answer within {CONNECT_TIMEOUT:?}"
            ));
            report.unreachable = true;
            return report;
        }
    };
    let applied: Result<Vec<(i64, bool, Vec<u8>)>, _> =
        sqlx::query_as("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await;
    match applied {
        Ok(applied) => {
            for m in MIGRATOR.iter() {
                match applied.iter().find(|(v, ..)| *v == m.version) {
                    Some((_, true, sum)) if sum[..] == m.checksum[..] => {}
                    Some((_, true, _)) => report.problems.push(format!(
                        "migration {} ({}) was changed after it was applied",
                        m.version, m.description
                    )),
                    Some((_, false, _)) => report.problems.push(format!(
                        "migration {} ({}) failed part-way",
                        m.version, m.description
                    )),
                    None => report.problems.push(format!(
                        "migration {} ({}) is not applied (run `keyturn init`)",
                        m.version, m.description
                    )),
                }
            }
        }
        Err(e) => report.problems.push(format!(
            "cannot read the applied migrations (run `keyturn init`): {e}"
        )),
    }
    if report.ok() {
        let rows = sqlx::query_as::<_, RequestRow>(
            "SELECT * FROM requests WHERE state = 'pending' ORDER BY deadline_ms",
        )
        .fetch_all(&mut conn)
        .await;
        match rows {
            Ok(rows) => {
                let n = rows.len() as u64;
                for r in rows {
                    if let Err(e) = r.into_request() {
                        if (report.problems.len() as u32) < crate::store::check::MAX_PROBLEMS {
                            report.problems.push(e.to_string());
                        }
                    }
                }
                report.pending = Some(n);
            }
            Err(e) => report
                .problems
                .push(format!("cannot read the pending requests: {e}")),
        }
    }
    let _ = conn.close().await;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_without_its_password() {
        let cases = [
            (
                "postgres://keyturn:s3cret@db.internal:5432/k",
                "postgres://keyturn:***@db.internal:5432/k",
            ),
            (
                "postgresql://u:p%40ss@h/k?options=-c%20search_path%3Dx",
                "postgresql://u:***@h/k?options=-c%20search_path%3Dx",
            ),
            ("postgres://u@h/k", "postgres://u@h/k"),
            (
                "postgres://h/k?user=u&password=pw",
                "postgres://h/k?user=u&password=***",
            ),
            ("postgres://u:a@b@h/k", "postgres://u:***@h/k"),
            ("postgres://h", "postgres://h"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn the_schema_comes_from_the_search_path_option() {
        let schema = |url: &str| search_path_schema(&PgConnectOptions::from_str(url).unwrap());
        assert_eq!(
            schema("postgres://h/k?options=-c%20search_path%3Dkt_1").as_deref(),
            Some("kt_1")
        );
        assert_eq!(
            schema("postgres://h/k?options=-csearch_path%3Da,public").as_deref(),
            Some("a")
        );
        assert_eq!(schema("postgres://h/k"), None);
        assert_eq!(schema("postgres://h/k?options=-c%20geqo%3Doff"), None);
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }
}
