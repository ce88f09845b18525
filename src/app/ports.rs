//! The persistence ports the use-cases need, owned by the app: split by
//! capability (requests, policy data, pairings, audit log, cards, agent
//! tokens, changes)
//! and composed into [`Store`], which a backend in `src/store` implements.
//! Value types that cross the port live here too. Nothing here does I/O.

use crate::domain::audit::{AuditEntry, AuditEvent};
use crate::domain::policy::{Effect, Grant, Pause, Scope, ToolPattern};
use crate::domain::request::{ApprovalRequest, RequestId, TransitionError, Vote, VoterRights};
use crate::domain::stats::CallRecord;
use crate::domain::trifecta::{Guard, ToolTag};
use crate::domain::Risk;
use async_trait::async_trait;
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

mod anomaly;
pub use anomaly::{Alert, Anomalies, MAX_SEEN_TOOLS_PER_AGENT};

/// A storage failure, by what the caller can do about it. Callers treat
/// every one of these as *deny*; they retry only what
/// [`StoreError::is_retryable`] says may pass (a backend maps its driver's
/// errors into these classes once, in `src/store`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or was busy: locked, busy past the
    /// timeout, an I/O error, a dropped connection. Transient: retry.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The write conflicted with another: a unique violation (`retry:
    /// false`: the same write would conflict again) or a serialization
    /// failure (`retry: true`: run it again).
    #[error("conflicting write: {what}")]
    Conflict { what: String, retry: bool },
    /// The database cannot be written: its file or connection is read-only,
    /// or the disk (or the database's size limit) is full. Not retried by
    /// callers; writes succeed again once an operator fixes it.
    #[error("the database cannot be written: {0}")]
    ReadOnly(String),
    /// A stored value does not parse (unknown enum text, bad JSON, a
    /// damaged page): never read as a default.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The database file was deleted or replaced under the running server;
    /// the store refuses every write from then on.
    #[error("the database file is lost: {0}")]
    FileLost(String),
    /// This store does not offer the operation.
    #[error("not supported by this store: {0}")]
    Unsupported(String),
    /// Anything else the database refused (a statement error, a constraint
    /// other than uniqueness): a bug or a bad setup, not retried.
    #[error("database error: {0}")]
    Failed(String),
}

impl StoreError {
    /// Whether running the same operation again may succeed without anyone
    /// fixing anything: unavailable, or a serialization conflict.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Conflict { retry: true, .. }
        )
    }

    /// An [`StoreError::Unavailable`] from a message.
    pub fn unavailable(what: impl Into<String>) -> StoreError {
        StoreError::Unavailable(what.into().into())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Result of inserting a request.
#[derive(Debug, Clone)]
pub enum Inserted {
    /// Stored as new.
    New(ApprovalRequest),
    /// The agent had already submitted this idempotency key for the same
    /// call (same fingerprint): here is that request.
    Existing(ApprovalRequest),
    /// The agent had already used this idempotency key for a different call
    /// (or before fingerprints were stored): nothing was stored, and the
    /// conflict was audited in the same transaction. Here is the holder.
    Conflict(ApprovalRequest),
    /// The request would wait for a human, but its agent already has `max`
    /// pending requests (counted in the insert's transaction): nothing was
    /// stored.
    TooManyPending { max: usize },
}

/// The request holding an idempotency key, with the fingerprint stored
/// beside the key (`None` for rows from before fingerprints were kept).
#[derive(Debug, Clone)]
pub struct KeyHolder {
    pub request: ApprovalRequest,
    pub fingerprint: Option<String>,
}

/// Result of a vote that the lifecycle accepted.
#[derive(Debug, Clone)]
pub struct Voted {
    /// The request after the vote (terminal if the vote decided it).
    pub request: ApprovalRequest,
    pub have: u32,
    pub need: u32,
}

/// A user Keyturn may act for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairedUser {
    pub user_id: String,
    pub roles: Vec<String>,
    pub display_name: Option<String>,
    pub paired_by: String,
    pub paired_ms: i64,
}

/// How to audit a user paired by a redeemed code (known only inside the
/// transaction that redeems it).
pub type PairedAudit = fn(&PairedUser) -> AuditEvent;

/// A live pairing code (the code itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingPairing {
    pub user_id: String,
    pub display_name: Option<String>,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// Why a pairing code could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingRefused {
    #[error("user {0} is already paired")]
    AlreadyPaired(String),
    #[error("too many live pairing codes ({0}); try again later")]
    TooManyCodes(usize),
}

/// A grant as stored, with who added it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredGrant {
    #[serde(flatten)]
    pub grant: Grant,
    pub created_by: String,
    pub created_ms: i64,
}

/// What a retention prune did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Entries deleted.
    pub entries: u64,
    /// The last deleted entry, as the checkpoint records it.
    pub through_seq: i64,
    pub through_hash: String,
}

/// A request's Discord card as the outbox knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRow {
    pub request_id: RequestId,
    pub channel_id: u64,
    /// Set once the card is posted; later changes edit this message.
    pub message_id: Option<u64>,
    /// The request state the posted message shows.
    pub rendered_state: Option<String>,
    /// The version wanted; the card is due while `want > done`.
    pub want: i64,
    pub done: i64,
    /// Failed attempts since the last success.
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub deadline_ms: i64,
}

/// Approval requests: insert, decide, read.
#[async_trait]
pub trait Requests: Send + Sync + 'static {
    /// Stores a new request with its audit events, or returns the request the
    /// agent already submitted under the same idempotency key: as
    /// [`Inserted::Existing`] when its fingerprint
    /// ([`ApprovalRequest::fingerprint`]) matches, else as
    /// [`Inserted::Conflict`], with an `idempotency_conflict` audit entry
    /// written in the same transaction. The check and the insert are one
    /// transaction, so two racing submits with one key cannot both win. A
    /// new pending request gets its card row in that transaction too (see
    /// [`Cards`]), and counts against its agent's pending requests (with no
    /// limit here; see [`Requests::insert_guarded`]).
    async fn insert_request(
        &self,
        req: ApprovalRequest,
        audit: Vec<AuditEvent>,
    ) -> StoreResult<Inserted>;
    /// Applies a vote atomically, deciding on the row read in the same
    /// transaction ([`crate::domain::decision::vote`]): a voter without the
    /// `rights` the request needs is refused there
    /// ([`TransitionError::AdminOnly`], [`TransitionError::SelfApproval`]),
    /// whatever checks the caller made before. The vote and (if it decided
    /// the request) its resolution are audited, and the request's card row,
    /// if it has one, is marked due, all in that transaction.
    async fn vote(
        &self,
        id: RequestId,
        vote: Vote,
        rights: VoterRights,
    ) -> StoreResult<Result<Voted, TransitionError>>;
    /// An approval with edited arguments, atomically: decided on the row
    /// and votes read in the transaction
    /// ([`crate::domain::decision::vote_edited`]: refused if the arguments
    /// changed since `change` was checked, or approvals exist already); the
    /// row takes the edited arguments, hash and run plan and keeps the
    /// submitted ones; the edit, the vote and any resolution are audited
    /// and the card row marked due, in that one transaction.
    async fn vote_edited(
        &self,
        id: RequestId,
        vote: Vote,
        rights: VoterRights,
        change: crate::domain::edit::ArgsChange,
    ) -> StoreResult<Result<Voted, TransitionError>>;
    /// Cancels a pending request (audited, its card row marked due, in one
    /// transaction).
    async fn cancel(
        &self,
        id: RequestId,
        who: String,
        reason: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Result<ApprovalRequest, TransitionError>>;
    /// Times out a pending request whose deadline has passed (audited, its
    /// card row marked due, in one transaction).
    async fn time_out(
        &self,
        id: RequestId,
        now_ms: i64,
    ) -> StoreResult<Result<ApprovalRequest, TransitionError>>;
    async fn get_request(&self, id: RequestId) -> StoreResult<Option<ApprovalRequest>>;
    /// Those of `ids` that are decided (terminal), in one read: what the
    /// waiters re-check after missed changes.
    async fn decided_among(&self, ids: &[RequestId]) -> StoreResult<Vec<ApprovalRequest>> {
        let mut decided = Vec::new();
        for id in ids {
            if let Some(r) = self.get_request(*id).await? {
                if r.state.is_terminal() {
                    decided.push(r);
                }
            }
        }
        Ok(decided)
    }
    /// The request `agent` submitted under `key`, if any, with its fingerprint.
    async fn find_by_idempotency_key(
        &self,
        agent: &str,
        key: &str,
    ) -> StoreResult<Option<KeyHolder>>;
    async fn votes(&self, id: RequestId) -> StoreResult<Vec<Vote>>;
    /// Pending requests, oldest deadline first.
    async fn pending(&self, limit: u32) -> StoreResult<Vec<ApprovalRequest>>;
    /// Pending requests per agent, as counted by the transactions that queue
    /// and decide them (agents with none are left out).
    async fn pending_counts(&self) -> StoreResult<Vec<(String, u64)>>;
    /// Up to `limit` pending requests whose deadline is at or before
    /// `now_ms`, earliest first (through the pending-deadline index): what
    /// the deadline scheduler times out, whoever created them.
    async fn due_deadlines(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<(RequestId, i64)>>;
    /// The earliest deadline of any pending request, if one is pending.
    async fn next_deadline(&self) -> StoreResult<Option<i64>>;
    /// [`Requests::insert_request`] with the lethal-trifecta guard applied in
    /// the same transaction: the store reads the history of the request's
    /// agent and user since `guard.since_ms` (approved and pending tagged
    /// calls, this call's own batch included), applies
    /// [`crate::domain::trifecta::guard`], stores what it returns instead if
    /// anything, and records the call's tags on its row. `Inserted::New`
    /// carries the request as stored.
    ///
    /// A request that waits for a human (as submitted, or as the guard
    /// escalated it) takes one of its agent's `max_pending` slots in the same
    /// transaction, so the limit holds however many processes share the
    /// store. With every slot taken, a pending request is not stored
    /// ([`Inserted::TooManyPending`]) and a call the guard would escalate is
    /// denied by it instead (rule `too_many_pending`). A slot is freed in the
    /// transaction that decides the request.
    async fn insert_guarded(
        &self,
        req: ApprovalRequest,
        audit: Vec<AuditEvent>,
        guard: Option<Guard>,
        max_pending: usize,
    ) -> StoreResult<Inserted>;
    /// The trifecta history of `agent` (and of `user`, any agent) since
    /// `since_ms`: tools of approved or pending calls with their tags, as
    /// [`Requests::insert_guarded`] reads it (for `check`, outside a write).
    /// The default refuses, so the call errors instead of skipping the guard.
    async fn trifecta_history(
        &self,
        agent: &str,
        user: Option<&str>,
        since_ms: i64,
    ) -> StoreResult<Vec<(String, Vec<ToolTag>)>> {
        let _ = (agent, user, since_ms);
        Err(StoreError::Unsupported("the trifecta history".into()))
    }
    /// Up to `limit` requests created at or after `since_ms`, newest first,
    /// with what a usage report needs of each ([`CallRecord`]). The
    /// default refuses (a store without it reports nothing rather than a
    /// wrong figure).
    async fn requests_since(&self, since_ms: i64, limit: u32) -> StoreResult<Vec<CallRecord>> {
        let _ = (since_ms, limit);
        Err(StoreError::Unsupported("usage statistics".into()))
    }
}

/// Grants and tool risks added at run time.
///
/// Each write takes the audit event that records it, built by the caller
/// (`crate::domain::audit::events`), and appends it in the write's own
/// transaction exactly when the write changed something, as each method says.
#[async_trait]
pub trait PolicyData: Send + Sync + 'static {
    /// Adds a grant; `false` if it already existed. `audit` is appended
    /// only when the grant was added.
    async fn add_grant(
        &self,
        grant: Grant,
        by: String,
        now_ms: i64,
        audit: AuditEvent,
    ) -> StoreResult<bool>;
    /// Removes a grant; `false` if there was none. `audit` is appended only
    /// when a grant was removed.
    async fn remove_grant(
        &self,
        scope: Scope,
        tool: ToolPattern,
        effect: Effect,
        audit: AuditEvent,
    ) -> StoreResult<bool>;
    async fn grants(&self) -> StoreResult<Vec<StoredGrant>>;
    /// Stores a time-boxed grant with its `grant_added` audit entry.
    async fn add_timed_grant(
        &self,
        grant: crate::domain::timed::TimedGrant,
        audit: AuditEvent,
    ) -> StoreResult<()>;
    /// Removes a time-boxed grant by id; `false` if there was none. `audit`
    /// is appended only when one was removed.
    async fn remove_timed_grant(&self, id: String, audit: AuditEvent) -> StoreResult<bool>;
    /// Every time-boxed grant, expired ones included (evaluation ignores
    /// them at their instant), oldest first.
    async fn timed_grants(&self) -> StoreResult<Vec<crate::domain::timed::TimedGrant>>;
    /// Sets (or with `None` clears) a tool's risk override. `audit` is
    /// always appended (setting the same risk again is still recorded).
    async fn set_tool_risk(
        &self,
        tool: String,
        risk: Option<Risk>,
        by: String,
        now_ms: i64,
        audit: AuditEvent,
    ) -> StoreResult<()>;
    async fn tool_risks(&self) -> StoreResult<Vec<(String, Risk)>>;
}

/// Paired users and pairing codes. Writes take their audit event as
/// [`PolicyData`]'s do, appended in the same transaction when they took effect.
#[async_trait]
pub trait Pairings: Send + Sync + 'static {
    async fn paired_users(&self) -> StoreResult<Vec<PairedUser>>;
    /// Pairs a user directly (admin action); `false` if already paired.
    /// `audit` is appended only when the user was paired.
    async fn pair_user(&self, user: PairedUser, audit: AuditEvent) -> StoreResult<bool>;
    /// Unpairs a user and deletes their pairing code; `false` if they were
    /// not paired. `audit` is appended only when they were.
    async fn unpair_user(&self, user_id: String, audit: AuditEvent) -> StoreResult<bool>;
    /// Stores a pairing code's hash for a user, replacing that user's
    /// earlier code. `audit` is appended only when the code was stored.
    #[allow(clippy::too_many_arguments)]
    async fn create_pairing_code(
        &self,
        user_id: String,
        display_name: Option<String>,
        code_hash: String,
        now_ms: i64,
        expires_ms: i64,
        max_live: usize,
        audit: AuditEvent,
    ) -> StoreResult<Result<(), PairingRefused>>;
    /// Redeems a typed code (compared in constant time against live hashes):
    /// pairs its user and deletes the code. The user is known only inside
    /// the transaction, so the caller passes how to audit it: `audit` of the
    /// user paired is appended when a code matched.
    async fn redeem_pairing_code(
        &self,
        code: String,
        by: String,
        now_ms: i64,
        audit: PairedAudit,
    ) -> StoreResult<Option<PairedUser>>;
    async fn pairing_codes(&self, now_ms: i64) -> StoreResult<Vec<PendingPairing>>;
}

/// The hash-chained audit log.
#[async_trait]
pub trait AuditLog: Send + Sync + 'static {
    async fn append_audit(&self, events: Vec<AuditEvent>) -> StoreResult<()>;
    /// The newest `n` entries, oldest first.
    async fn audit_tail(&self, n: u32) -> StoreResult<Vec<AuditEntry>>;
    /// Entries with `seq > after`, oldest first.
    async fn audit_after(&self, after: i64, limit: u32) -> StoreResult<Vec<AuditEntry>>;
    /// The chain head `(seq, hash)` as recorded at the last commit.
    async fn audit_head(&self) -> StoreResult<(i64, String)>;
    /// Verifies the whole audit chain against its recorded head, and every
    /// request row against the chain, all from one consistent snapshot (a
    /// write committed meanwhile is simply not seen). `Ok((entries,
    /// requests))` or the first break. The default refuses, so a store that
    /// cannot take a snapshot never reports a false "ok" or a false break.
    async fn audit_verify(&self) -> StoreResult<Result<(u64, u64), crate::domain::audit::Break>> {
        Err(StoreError::Unsupported(
            "verifying the audit log from one snapshot".into(),
        ))
    }
    /// Deletes the oldest entries (the longest prefix of the log older than
    /// `cutoff_ms`) and, in the same transaction, appends a checkpoint that
    /// names the last one deleted. `None` when nothing was old enough.
    /// The default refuses (keeping entries is the safe failure).
    async fn prune_audit(&self, cutoff_ms: i64, now_ms: i64) -> StoreResult<Option<Pruned>> {
        let _ = (cutoff_ms, now_ms);
        Err(StoreError::Unsupported("pruning the audit log".into()))
    }
}

/// The Discord card outbox (one row per request that has a card).
///
/// Rows follow their requests inside the store: when the store was opened
/// with a card channel, inserting a pending request creates its row (due at
/// once) and a vote, cancel or timeout of a request with a row marks it due
/// again, each in the transaction of the request's change.
#[async_trait]
pub trait Cards: Send + Sync + 'static {
    /// When an outbox starts (after a restart, or on winning leadership):
    /// adds a row for every pending request without one, marks due every
    /// card whose message shows a stale state, and releases the claims an
    /// earlier outbox held (see [`Cards::cards_due`]). Returns how many rows
    /// were added or marked due.
    async fn card_reconcile(&self, channel_id: u64) -> StoreResult<u64>;
    /// Due cards (`want > done`, `next_attempt_ms <= now_ms`), oldest
    /// deadline first. A store several processes share claims the cards it
    /// returns for a while, so no two outboxes get the same card.
    async fn cards_due(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<CardRow>>;
    /// How many cards wait to be posted or edited (`want > done`), due now
    /// or later: the outbox backlog, for metrics.
    async fn cards_backlog(&self) -> StoreResult<u64>;
    /// The earliest retry time among due cards, if any.
    async fn card_next_attempt(&self) -> StoreResult<Option<i64>>;
    async fn card(&self, request_id: RequestId) -> StoreResult<Option<CardRow>>;
    /// Records a successful post or edit of version `version`.
    async fn card_done(
        &self,
        request_id: RequestId,
        message_id: u64,
        version: i64,
        rendered_state: String,
    ) -> StoreResult<()>;
    /// Makes every waiting card (retry time after `now_ms`) due at once:
    /// Discord answers again, so nothing should sit out its backoff.
    /// Returns how many cards were waiting.
    async fn cards_retry_now(&self, now_ms: i64) -> StoreResult<u64>;
    /// Records a failed attempt; the card is retried at `next_attempt_ms`.
    async fn card_retry_later(
        &self,
        request_id: RequestId,
        attempts: i64,
        next_attempt_ms: i64,
    ) -> StoreResult<()>;
}

/// An agent's bearer token as stored: never its secret, only the secret's
/// SHA-256 (see [`crate::domain::token`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentToken {
    /// Public and random: listed, logged, named by `token revoke`.
    pub id: String,
    pub agent: String,
    /// SHA-256 of the secret, hex. Not serialized: never listed.
    #[serde(skip)]
    pub secret_hash: String,
    pub created_ms: i64,
    pub created_by: String,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

/// Agents' bearer tokens (connections over TCP). Kept in the store so that
/// processes sharing it see the same tokens and a revoke acts everywhere.
/// Writes take their audit event, appended in the same transaction, and
/// publish [`Change::PolicyChanged`] after commit (live connections re-check
/// their token on it). The defaults refuse, so a store without tokens
/// admits nobody over TCP (fail closed).
#[async_trait]
pub trait AgentTokens: Send + Sync + 'static {
    /// Stores a new token. With `others_expire_ms` (a rotation), every other
    /// live token of the same agent that would outlive it expires then, in
    /// the same transaction. Returns how many other tokens were shortened.
    async fn issue_token(
        &self,
        token: AgentToken,
        others_expire_ms: Option<i64>,
        audit: AuditEvent,
    ) -> StoreResult<u64> {
        let _ = (token, others_expire_ms, audit);
        Err(StoreError::Unsupported("agent tokens".into()))
    }
    /// Revokes a token at `now_ms`; `false` if there is no such token or it
    /// was already revoked. `audit` is appended only when it was revoked.
    async fn revoke_token(&self, id: String, now_ms: i64, audit: AuditEvent) -> StoreResult<bool> {
        let _ = (id, now_ms, audit);
        Err(StoreError::Unsupported("agent tokens".into()))
    }
    /// The token with this id, live or not.
    async fn token(&self, id: &str) -> StoreResult<Option<AgentToken>> {
        let _ = id;
        Err(StoreError::Unsupported("agent tokens".into()))
    }
    /// Every token, oldest first.
    async fn tokens(&self) -> StoreResult<Vec<AgentToken>> {
        Err(StoreError::Unsupported("agent tokens".into()))
    }
}

/// The kill switch: agents paused (and the global pause, under
/// [`crate::domain::policy::ALL_AGENTS`]). Kept in the store so that it
/// survives a restart and every process sharing the store denies alike:
/// writes append their audit event in the same transaction and publish
/// [`Change::PolicyChanged`] after commit (the policy view holds the set).
#[async_trait]
pub trait AgentPauses: Send + Sync + 'static {
    /// Pauses `pause.agent`; `false` (nothing written, nothing audited) if
    /// it was already paused: the pause in force keeps its author and time.
    async fn pause_agent(&self, pause: Pause, audit: AuditEvent) -> StoreResult<bool>;
    /// Lifts the pause of `agent`; `false` if it was not paused. `audit` is
    /// appended only when a pause was lifted.
    async fn resume_agent(&self, agent: String, audit: AuditEvent) -> StoreResult<bool>;
    /// Every pause in force, oldest first.
    async fn pauses(&self) -> StoreResult<Vec<Pause>>;
}

/// A change committed to the store, published after its commit (never
/// before), for whatever in this process follows the store: waiters, the
/// deadline scheduler, the policy view and the card outbox.
/// A run as the process registry records it (see [`Runs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// A UUID (v7), also the id `keyturn kill` takes.
    pub id: String,
    pub request_id: RequestId,
    pub agent: String,
    pub tool: String,
    /// The argv as shown (secrets masked).
    pub argv: Vec<String>,
    pub profile: crate::domain::run::Profile,
    /// The process (group leader) id; `None` until started or if it never did.
    pub pid: Option<i64>,
    /// The host and the Keyturn process that started it: after a restart,
    /// runs left `running` by a dead Keyturn on this host are `interrupted`.
    pub host: String,
    pub server_pid: i64,
    /// Who approved the request (or `policy`).
    pub approved_by: String,
    pub started_ms: i64,
    pub deadline_ms: i64,
    pub state: crate::domain::run::RunState,
    pub ended_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// SHA-256 (hex) of everything the process wrote to each stream.
    pub stdout_sha256: Option<String>,
    pub stderr_sha256: Option<String>,
    /// Who asked for a kill (`keyturn kill`, the card's Kill button).
    pub kill_requested_by: Option<String>,
}

/// Why a run could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunRefused {
    /// A request runs at most once.
    #[error("request {request_id} has already been run (run {run_id})")]
    AlreadyRun { request_id: String, run_id: String },
}

/// The process registry: every run Keyturn starts, with its outcome. Each
/// write appends its audit event in the same transaction and marks the
/// request's card due (the card shows the run).
#[async_trait]
pub trait Runs: Send + Sync + 'static {
    /// Registers a run about to start (state `running`). A request runs at
    /// most once: a second run of the same request is refused, in the same
    /// transaction.
    async fn run_started(
        &self,
        run: RunRecord,
        audit: AuditEvent,
    ) -> StoreResult<Result<(), RunRefused>> {
        let _ = (run, audit);
        Err(StoreError::Unsupported("runs".into()))
    }
    /// Records how a run ended (`state`, `ended_ms`, exit code, signal,
    /// hashes, `pid` taken from `run`) and audits it.
    async fn run_ended(&self, run: RunRecord, audit: AuditEvent) -> StoreResult<()> {
        let _ = (run, audit);
        Err(StoreError::Unsupported("runs".into()))
    }
    /// Records the pid once the process started (no audit: `run_started`
    /// carries it when known), and marks the request's card due so it
    /// shows the pid.
    async fn run_pid(&self, id: &str, pid: i64) -> StoreResult<()> {
        let _ = (id, pid);
        Err(StoreError::Unsupported("runs".into()))
    }
    /// Marks a kill as asked for (and audits it), so the process running it,
    /// on whichever replica, kills it: published as [`Change::KillRun`].
    /// `false` if no such run is running.
    async fn request_kill(&self, id: &str, by: String, audit: AuditEvent) -> StoreResult<bool> {
        let _ = (id, by, audit);
        Err(StoreError::Unsupported("runs".into()))
    }
    async fn run(&self, id: &str) -> StoreResult<Option<RunRecord>> {
        let _ = id;
        Err(StoreError::Unsupported("runs".into()))
    }
    async fn run_of_request(&self, request_id: RequestId) -> StoreResult<Option<RunRecord>> {
        let _ = request_id;
        Err(StoreError::Unsupported("runs".into()))
    }
    /// Newest first; only `running` ones with `running_only`.
    async fn runs(&self, running_only: bool, limit: u32) -> StoreResult<Vec<RunRecord>> {
        let _ = (running_only, limit);
        Err(StoreError::Unsupported("runs".into()))
    }
}

#[derive(Debug, Clone)]
pub enum Change {
    /// A request now waits for a human, until `deadline_ms`.
    Queued {
        id: RequestId,
        agent: String,
        deadline_ms: i64,
    },
    /// A vote was recorded and the request still waits.
    Voted { id: RequestId },
    /// A request reached its terminal state (vote, cancel or timeout)
    /// through this process.
    Resolved(Arc<ApprovalRequest>),
    /// Another process sharing the store decided a request: this process
    /// wakes its waiters and updates its card, but counts it in no metric
    /// (the deciding process does, so replicas' figures add up).
    DecidedElsewhere(Arc<ApprovalRequest>),
    /// Grants, tool risks or paired users changed.
    PolicyChanged,
    /// Cards were marked due (a request changed, or a retry was brought forward).
    CardsDue,
    /// A kill of this run was asked for (`Runs::request_kill`), here or by
    /// another process sharing the store: whichever process runs it kills it.
    KillRun { run_id: String },
    /// Changes committed by another process may have been missed (the
    /// connection that hears them dropped and came back), or it is time for
    /// the periodic re-check of a shared store: every subscriber re-reads
    /// what it follows from the store, as after `Lagged`.
    Resync,
}

/// How many changes a slow subscriber may fall behind before it is told it
/// lagged (and must then re-read what it follows from the store).
pub const CHANGE_BACKLOG: usize = 4096;

/// The change feed: subscribe to hear every change committed from now on.
/// A subscriber that lags (`RecvError::Lagged`) missed changes and must
/// re-read its state from the store.
pub trait Changes: Send + Sync + 'static {
    fn subscribe(&self) -> broadcast::Receiver<Change>;
}

/// An in-process feed, for a backend to publish into after each commit.
pub struct Feed {
    tx: broadcast::Sender<Change>,
}

impl Default for Feed {
    fn default() -> Feed {
        Feed {
            tx: broadcast::channel(CHANGE_BACKLOG).0,
        }
    }
}

impl Feed {
    /// Publishes a committed change (dropped when nobody listens).
    pub fn publish(&self, change: Change) {
        let _ = self.tx.send(change);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }
}

/// Every persistence port, as one backend implements them.
#[async_trait]
pub trait Store:
    Requests
    + PolicyData
    + Pairings
    + AuditLog
    + Cards
    + AgentTokens
    + AgentPauses
    + Runs
    + Escalations
    + Changes
    + Anomalies
    + super::digests::Digests
{
    /// Why writes are refused for good (the database file was deleted or
    /// replaced under the server), if they are; `None` while writable.
    /// Costs nothing: it reads the writer's last finding, not the disk.
    fn write_failure(&self) -> Option<String> {
        None
    }
    /// Whether this process leads the processes sharing the store: the
    /// leader alone runs the Discord connection, the card outbox, the
    /// deadline sweep and audit retention. The value flips to `false` the
    /// moment leadership is lost (and back once it is won again). A store
    /// only one process can use always leads.
    fn leadership(&self) -> watch::Receiver<bool> {
        watch::channel(true).1
    }
    /// Flushes and closes.
    async fn close(&self);
}

/// A run ready to start: the exact argv, and everything the sandbox needs.
/// Credential values are in `env` and `files` and nowhere else.
#[derive(Clone)]
pub struct Job {
    pub run_id: String,
    pub argv: Vec<String>,
    pub spec: crate::domain::run::RunSpec,
    /// The full environment inside (already scrubbed and declared).
    pub env: Vec<(String, String)>,
    /// Files to place inside the sandbox (path inside, content), mode 0400.
    pub files: Vec<(String, Vec<u8>)>,
    /// Paths hidden inside besides the spec's (Keyturn's database, config,
    /// sockets).
    pub hidden: Vec<String>,
    pub max_output_bytes: usize,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("run_id", &self.run_id)
            .field("argv", &self.argv)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// How a run's process ended, as the executor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// `Exited`, `Killed`, `TimedOut` (never `Running`/`Interrupted`).
    pub state: crate::domain::run::RunState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    /// The first `max_output_bytes` of each stream, the total written, and
    /// the SHA-256 (hex) of all of it.
    pub stdout: Vec<u8>,
    pub stdout_size: u64,
    pub stdout_sha256: String,
    pub stderr: Vec<u8>,
    pub stderr_size: u64,
    pub stderr_sha256: String,
}

/// A started run: its pid, a way to kill it, and its end.
pub struct Started {
    pub pid: u32,
    pub kill: KillSwitch,
    pub finished: tokio::sync::oneshot::Receiver<Finished>,
}

/// Kills a run's whole process group (SIGTERM, then SIGKILL after the
/// grace); the run then ends as `Killed`. Cloneable, idempotent.
#[derive(Clone)]
pub struct KillSwitch(pub Arc<dyn Fn() + Send + Sync>);

impl KillSwitch {
    pub fn kill(&self) {
        (self.0)()
    }
}

/// Why a run did not start. The text is safe to show (no credential).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExecError(pub String);

/// Runs jobs in the sandbox their spec names (`src/sandbox`).
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Resolves a path slot's (lexically checked, absolute) value through
    /// the file system: symlinks followed; the result must be under one of
    /// `roots` (themselves resolved), and exist unless `!must_exist` (then
    /// its parent must). Returns the resolved path, or the rule broken.
    fn resolve_path(
        &self,
        path: &str,
        roots: &[String],
        must_exist: bool,
    ) -> Result<String, String>;
    /// Starts a job; returns once the process runs (or could not start).
    /// The timeout (the spec's) is the executor's: on it the process
    /// group gets SIGTERM, then SIGKILL, and the run ends `TimedOut`.
    async fn start(&self, job: Job) -> Result<Started, ExecError>;
    /// Kills what is left of a run a previous Keyturn process on this host
    /// started (found `running` at start-up), if `pid` is still that run's
    /// process group. Best effort.
    /// Processes of the run found by its id anywhere on the host (by the
    /// `KEYTURN_RUN_ID` every run's environment carries) are killed too.
    fn kill_leftover(&self, run_id: &str, pid: i64, started_ms: i64);
    /// Whether a process with this pid exists on this host (a Keyturn
    /// process that left runs behind is gone when it does not).
    fn process_exists(&self, pid: i64) -> bool;
}

/// A credential's value as fetched, with the auth profile it came from.
#[derive(Clone)]
pub struct Fetched {
    pub profile: String,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fetched({}, [hidden])", self.profile)
    }
}

/// One credential as `keyturn credentials status` shows it: names only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CredentialStatus {
    pub name: String,
    /// The profile in use.
    pub active: String,
    pub profiles: Vec<ProfileStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProfileStatus {
    pub name: String,
    /// Consecutive failures.
    pub failures: u32,
    /// Set aside after `fail_after` failures.
    pub set_aside: bool,
    /// The last read failed (the error is in the server log).
    pub unreadable: bool,
}

/// The credential broker (`src/sandbox/credentials.rs`): reads credentials
/// from their sources, fails over between auth profiles, and tells the
/// masker every value it holds.
#[async_trait]
pub trait Credentials: Send + Sync + 'static {
    /// The active profile's value.
    async fn fetch(&self, name: &str) -> Result<Fetched, ExecError>;
    /// What a run that used `profile` of `name` did: a failure (declared
    /// exit code or output pattern) counts toward failover, a success
    /// resets the count.
    fn report(&self, name: &str, profile: &str, exit_code: Option<i32>, output: &[u8]);
    /// Every value currently held (all profiles), for the masker.
    fn values(&self) -> Vec<Vec<u8>>;
    fn status(&self) -> Vec<CredentialStatus>;
    /// Puts every set-aside profile of `name` back (`false`: unknown name).
    fn reset(&self, name: &str) -> bool;
    /// Re-reads every source (SIGHUP, or a file that changed).
    async fn reload(&self);
}

/// One escalation step fired for a request (see
/// [`crate::domain::escalation`]), as claimed in the store before anyone
/// is pinged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EscalationRecord {
    pub request_id: RequestId,
    /// The step's index in its risk level's ladder.
    pub step: u32,
    /// `reping`, `ping_role`, `dm` or `last_warning`.
    pub action: String,
    /// Exactly whom the step pings.
    pub targets: crate::domain::escalation::Targets,
    /// When the step was claimed (it fired).
    pub claimed_ms: i64,
    /// When its message(s) reached Discord; `None` until then.
    pub sent_ms: Option<i64>,
}

/// The escalation ladder's memory: each (request, step) is claimed once,
/// durably, before anyone is pinged, so no step pings twice across a
/// restart or a change of leader. The defaults refuse (no escalation
/// rather than a repeated one).
#[async_trait]
pub trait Escalations: Send + Sync + 'static {
    /// Claims a step of a request that is still pending: stores the record,
    /// appends `audit` and marks the request's card due (it shows the
    /// escalation), in one transaction. `false` (nothing written) when the
    /// step was already claimed or the request is no longer pending.
    async fn claim_escalation(
        &self,
        record: EscalationRecord,
        audit: AuditEvent,
    ) -> StoreResult<bool> {
        let _ = (record, audit);
        Err(StoreError::Unsupported("escalations".into()))
    }
    /// Records that a claimed step's message(s) reached Discord.
    async fn escalation_sent(
        &self,
        request_id: RequestId,
        step: u32,
        sent_ms: i64,
    ) -> StoreResult<()> {
        let _ = (request_id, step, sent_ms);
        Err(StoreError::Unsupported("escalations".into()))
    }
    /// The steps fired for a request, in step order.
    async fn escalations_of(&self, request_id: RequestId) -> StoreResult<Vec<EscalationRecord>> {
        let _ = request_id;
        Err(StoreError::Unsupported("escalations".into()))
    }
    /// Up to `limit` steps fired for requests still pending, oldest claim
    /// first: what the escalation worker resumes from.
    async fn pending_escalations(&self, limit: u32) -> StoreResult<Vec<EscalationRecord>> {
        let _ = limit;
        Err(StoreError::Unsupported("escalations".into()))
    }
}
