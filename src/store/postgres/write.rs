//! Every PostgreSQL write: the typed functions of the SQLite store's
//! `write` module, mirrored as async functions over the writer's
//! transaction ([`Tx`]). Each reads what it needs inside the transaction
//! (a request it decides on is locked with `SELECT … FOR UPDATE`, so two
//! processes never decide from the same state), lets the domain decide,
//! writes the rows, appends its audit events, marks the request's card due
//! and queues the note other processes hear ([`super::notify`]), all before
//! the batch commits.

use super::notify::Note;
use super::writer::Tx;
use crate::app::ports::{PairedUser, PairingRefused, Pruned, StoreError, StoreResult, Voted};
use crate::domain::audit::{self, SealedEvent};
use crate::domain::decision;
use crate::domain::pairing;
use crate::domain::policy::{Effect, Grant, Scope, ToolPattern};
use crate::domain::request::{
    ApprovalRequest, RequestId, State, TransitionError, Vote, VoterRights,
};
use crate::domain::trifecta::{self, Guard, ToolTag};
use crate::domain::Risk;
use crate::store::error::sqlx as db;
use crate::store::sqlite::RequestRow;
use sqlx::PgConnection;

/// What an insert did (see the SQLite store's `Stored`).
pub(super) enum Stored {
    New,
    Guarded(ApprovalRequest),
    Existing(ApprovalRequest),
    Conflict(ApprovalRequest),
    /// The request would wait for a human, but its agent already has
    /// `max_pending` pending requests: nothing was stored.
    TooManyPending,
}

/// Stores `req` with its sealed `audit` events, unless its idempotency key
/// is taken (checked first, and again by the insert itself: `ON CONFLICT
/// DO NOTHING` on the key, so a submit racing in from another process
/// finds the holder instead of an error); applies the trifecta `guard`;
/// creates its card row if it is pending. A request that would wait for a
/// human takes one of its agent's `max_pending` slots in this transaction,
/// or is not stored ([`Stored::TooManyPending`]; a call the guard escalates
/// is denied instead).
pub(super) async fn insert(
    tx: &mut Tx,
    req: &ApprovalRequest,
    audit: &[SealedEvent],
    guard: Option<&Guard>,
    max_pending: usize,
    cards: Option<u64>,
) -> StoreResult<Stored> {
    let fingerprint = req.idempotency_key.as_ref().map(|_| req.fingerprint());
    if let Some(held) = key_holder(tx, req, fingerprint.as_deref()).await? {
        return Ok(held);
    }
    let caps = guard.map_or(0, |g| trifecta::bits(&g.tags));
    if let Some(g) = guard {
        let history = history(
            tx.conn().await?,
            &req.agent,
            req.user_id.as_deref(),
            g.since_ms,
        )
        .await?;
        if let Some((mut changed, mut events)) = trifecta::guard(req, &history, g) {
            if changed.state == State::Pending
                && !take_slot(tx.conn().await?, &req.agent, max_pending).await?
            {
                // No slot to wait in: an escalated call is denied instead.
                match trifecta::guard_without_slot(req, &history, g, max_pending) {
                    Some(denied) => (changed, events) = denied,
                    None => return Ok(Stored::TooManyPending),
                }
            }
            if !insert_request(tx, &changed, caps, fingerprint.as_deref()).await? {
                let slot = changed.state == State::Pending;
                return taken(tx, req, fingerprint.as_deref(), slot).await;
            }
            tx.audit_events(&events).await?;
            new_card(tx, &changed, cards).await?;
            return Ok(Stored::Guarded(changed));
        }
    }
    if req.state == State::Pending && !take_slot(tx.conn().await?, &req.agent, max_pending).await? {
        return Ok(Stored::TooManyPending);
    }
    if !insert_request(tx, req, caps, fingerprint.as_deref()).await? {
        let slot = req.state == State::Pending;
        return taken(tx, req, fingerprint.as_deref(), slot).await;
    }
    tx.audit(audit).await?;
    new_card(tx, req, cards).await?;
    Ok(Stored::New)
}

/// The request already holding `req`'s idempotency key, as an answer.
async fn key_holder(
    tx: &mut Tx,
    req: &ApprovalRequest,
    fingerprint: Option<&str>,
) -> StoreResult<Option<Stored>> {
    let (Some(key), Some(fp)) = (&req.idempotency_key, fingerprint) else {
        return Ok(None);
    };
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        request: RequestRow,
        idempotency_fp: Option<String>,
    }
    let Some(row) = sqlx::query_as::<_, Row>(
        "SELECT * FROM requests WHERE agent = $1 AND idempotency_key = $2",
    )
    .bind(&req.agent)
    .bind(key)
    .fetch_optional(tx.conn().await?)
    .await
    .map_err(db)?
    else {
        return Ok(None);
    };
    let existing = row.request.into_request()?;
    // A row without a fingerprint cannot prove it was this call.
    if row.idempotency_fp.as_deref() == Some(fp) {
        return Ok(Some(Stored::Existing(existing)));
    }
    tx.audit_events(&[decision::idempotency_conflict(req, &existing)])
        .await?;
    Ok(Some(Stored::Conflict(existing)))
}

/// Takes one of `agent`'s `max` pending slots in this transaction: `false`
/// (nothing changed) when all are taken. The row is locked until the
/// commit, so processes queueing for one agent at once count one by one.
async fn take_slot(conn: &mut PgConnection, agent: &str, max: usize) -> StoreResult<bool> {
    if max == 0 {
        return Ok(false);
    }
    let taken: Option<(i64,)> = sqlx::query_as(
        "INSERT INTO agent_pending (agent, pending) VALUES ($1, 1) \
         ON CONFLICT (agent) DO UPDATE SET pending = agent_pending.pending + 1 \
         WHERE agent_pending.pending < $2 RETURNING pending",
    )
    .bind(agent)
    .bind(i64::try_from(max).unwrap_or(i64::MAX))
    .fetch_optional(conn)
    .await
    .map_err(db)?;
    Ok(taken.is_some())
}

/// Gives back a slot of `agent` (its request left `pending`, or was not stored).
async fn free_slot(conn: &mut PgConnection, agent: &str) -> StoreResult<()> {
    sqlx::query("UPDATE agent_pending SET pending = pending - 1 WHERE agent = $1 AND pending > 0")
        .bind(agent)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// The insert found the key taken after all (committed by another process
/// meanwhile): the slot it took goes back, and the answer is the holder.
async fn taken(
    tx: &mut Tx,
    req: &ApprovalRequest,
    fp: Option<&str>,
    slot: bool,
) -> StoreResult<Stored> {
    if slot {
        free_slot(tx.conn().await?, &req.agent).await?;
    }
    key_holder(tx, req, fp)
        .await?
        .ok_or_else(|| StoreError::Conflict {
            what: format!("idempotency key of request {} is taken", req.id),
            retry: true,
        })
}

/// A pending request's card row, due at once; and the note that queues it.
async fn new_card(tx: &mut Tx, req: &ApprovalRequest, cards: Option<u64>) -> StoreResult<()> {
    if req.state != State::Pending {
        return Ok(());
    }
    tx.note(Note::Queued {
        id: req.id.to_string(),
        agent: req.agent.clone(),
        deadline_ms: req.deadline_ms,
    });
    let Some(channel) = cards else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO discord_cards (request_id, channel_id, deadline_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (request_id) DO UPDATE SET want = discord_cards.want + 1, attempts = 0, \
         next_attempt_ms = 0",
    )
    .bind(req.id.to_string())
    .bind(channel as i64)
    .bind(req.deadline_ms)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    Ok(())
}

/// Marks a changed request's card due again, if it has one.
async fn bump_card(tx: &mut Tx, id: RequestId, cards: Option<u64>) -> StoreResult<()> {
    if cards.is_none() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE discord_cards SET want = want + 1, attempts = 0, next_attempt_ms = 0 \
         WHERE request_id = $1",
    )
    .bind(id.to_string())
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    Ok(())
}

/// A vote, decided on the row (locked) and votes read here.
pub(super) async fn vote(
    tx: &mut Tx,
    id: RequestId,
    vote: &Vote,
    rights: VoterRights,
    cards: Option<u64>,
    change: Option<&crate::domain::edit::ArgsChange>,
) -> StoreResult<Result<Voted, TransitionError>> {
    let Some(req) = load_locked(tx.conn().await?, id).await? else {
        return Ok(Err(TransitionError::NotFound));
    };
    let earlier = super::load_votes(tx.conn().await?, id).await.map_err(db)?;
    let decided = match change {
        Some(c) => decision::vote_edited(req, &earlier, vote, rights, c),
        None => decision::vote(req, &earlier, vote, rights),
    };
    let w = match decided {
        Ok(w) => w,
        Err(e) => return Ok(Err(e)),
    };
    if let (Some(edit), Some(_)) = (&w.request.edit, change) {
        let r = &w.request;
        let n = sqlx::query(
            "UPDATE requests SET args = $1, args_hash = $2, run_plan = $3, original_args = $4, \
             original_args_hash = $5, edited_by = $6, edited_ms = $7 \
             WHERE id = $8 AND state = 'pending' AND original_args_hash IS NULL",
        )
        .bind(r.args.to_string())
        .bind(&r.args_hash)
        .bind(crate::store::sqlite::run_plan_json(r)?)
        .bind(edit.original_args.to_string())
        .bind(&edit.original_args_hash)
        .bind(&edit.by)
        .bind(edit.at_ms)
        .bind(id.to_string())
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected();
        if n != 1 {
            return Ok(Err(TransitionError::ArgsChanged));
        }
    }
    sqlx::query(
        "INSERT INTO votes (request_id, voter, name, approve, reason, at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id.to_string())
    .bind(&vote.voter)
    .bind(&vote.name)
    .bind(vote.approve)
    .bind(&vote.reason)
    .bind(vote.at_ms)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    if w.request.state.is_terminal() {
        resolve(tx.conn().await?, &w.request, None).await?;
        tx.note(Note::Resolved { id: id.to_string() });
    } else {
        tx.note(Note::Voted { id: id.to_string() });
    }
    tx.audit_events(&w.events).await?;
    bump_card(tx, id, cards).await?;
    Ok(Ok(Voted {
        request: w.request,
        have: w.have,
        need: w.need,
    }))
}

/// Cancels a pending request.
pub(super) async fn cancel(
    tx: &mut Tx,
    id: RequestId,
    who: &str,
    reason: Option<String>,
    now_ms: i64,
    cards: Option<u64>,
) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
    finish(tx, id, cards, None, |r| {
        decision::cancel(r, who, reason, now_ms)
    })
    .await
}

/// Times out a pending request whose deadline has passed: the update is
/// conditional on the deadline too, so of processes sweeping at once
/// exactly one wins.
pub(super) async fn time_out(
    tx: &mut Tx,
    id: RequestId,
    now_ms: i64,
    cards: Option<u64>,
) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
    finish(tx, id, cards, Some(now_ms), |r| {
        decision::time_out(r, now_ms)
    })
    .await
}

type Finished = Result<(ApprovalRequest, audit::AuditEvent), TransitionError>;

async fn finish(
    tx: &mut Tx,
    id: RequestId,
    cards: Option<u64>,
    due_by: Option<i64>,
    transition: impl FnOnce(ApprovalRequest) -> Finished,
) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
    let Some(req) = load_locked(tx.conn().await?, id).await? else {
        return Ok(Err(TransitionError::NotFound));
    };
    let (req, event) = match transition(req) {
        Ok(done) => done,
        Err(e) => return Ok(Err(e)),
    };
    resolve(tx.conn().await?, &req, due_by).await?;
    tx.note(Note::Resolved { id: id.to_string() });
    tx.audit_events(&[event]).await?;
    bump_card(tx, id, cards).await?;
    Ok(Ok(req))
}

pub(super) async fn add_grant(
    tx: &mut Tx,
    g: &Grant,
    by: &str,
    now_ms: i64,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO grants (scope, tool, effect, created_by, created_ms) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(g.scope.to_string())
    .bind(g.tool.as_str())
    .bind(effect_str(g.effect))
    .bind(by)
    .bind(now_ms)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?
    .rows_affected()
        == 1;
    policy_changed(tx, done, audit).await?;
    Ok(done)
}

pub(super) async fn remove_grant(
    tx: &mut Tx,
    scope: &Scope,
    tool: &ToolPattern,
    effect: Effect,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM grants WHERE scope = $1 AND tool = $2 AND effect = $3")
        .bind(scope.to_string())
        .bind(tool.as_str())
        .bind(effect_str(effect))
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected()
        == 1;
    policy_changed(tx, done, audit).await?;
    Ok(done)
}

pub(super) async fn set_tool_risk(
    tx: &mut Tx,
    tool: &str,
    risk: Option<Risk>,
    by: &str,
    now_ms: i64,
    audit: &SealedEvent,
) -> StoreResult<()> {
    match risk {
        Some(r) => sqlx::query(
            "INSERT INTO tool_risks (tool, risk, set_by, set_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tool) DO UPDATE SET risk = excluded.risk, set_by = excluded.set_by, \
             set_ms = excluded.set_ms",
        )
        .bind(tool)
        .bind(r.as_str())
        .bind(by)
        .bind(now_ms),
        None => sqlx::query("DELETE FROM tool_risks WHERE tool = $1").bind(tool),
    }
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    policy_changed(tx, true, audit).await
}

/// A policy write that took effect: its audit entry and its note.
async fn policy_changed(tx: &mut Tx, done: bool, audit: &SealedEvent) -> StoreResult<()> {
    if done {
        tx.audit(std::slice::from_ref(audit)).await?;
        tx.note(Note::PolicyChanged);
    }
    Ok(())
}

pub(super) async fn pair_user(
    tx: &mut Tx,
    u: &PairedUser,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = insert_paired(tx.conn().await?, u).await?;
    policy_changed(tx, done, audit).await?;
    Ok(done)
}

pub(super) async fn unpair_user(
    tx: &mut Tx,
    user_id: &str,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM paired_users WHERE user_id = $1")
        .bind(user_id)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected()
        == 1;
    sqlx::query("DELETE FROM pairing_codes WHERE user_id = $1")
        .bind(user_id)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?;
    policy_changed(tx, done, audit).await?;
    Ok(done)
}

/// A pairing code's hash for a user (see `Pairings::create_pairing_code`).
pub(super) struct NewCode {
    pub user_id: String,
    pub display_name: Option<String>,
    pub code_hash: String,
    pub now_ms: i64,
    pub expires_ms: i64,
    pub max_live: usize,
}

pub(super) async fn create_pairing_code(
    tx: &mut Tx,
    c: &NewCode,
    audit: &SealedEvent,
) -> StoreResult<Result<(), PairingRefused>> {
    let paired: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM paired_users WHERE user_id = $1")
        .bind(&c.user_id)
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(db)?;
    if paired.is_some() {
        return Ok(Err(PairingRefused::AlreadyPaired(c.user_id.clone())));
    }
    sqlx::query("DELETE FROM pairing_codes WHERE expires_ms <= $1 OR user_id = $2")
        .bind(c.now_ms)
        .bind(&c.user_id)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?;
    let (live,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM pairing_codes")
        .fetch_one(tx.conn().await?)
        .await
        .map_err(db)?;
    if live as usize >= c.max_live {
        return Ok(Err(PairingRefused::TooManyCodes(c.max_live)));
    }
    sqlx::query(
        "INSERT INTO pairing_codes (code_hash, user_id, display_name, created_ms, expires_ms) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&c.code_hash)
    .bind(&c.user_id)
    .bind(&c.display_name)
    .bind(c.now_ms)
    .bind(c.expires_ms)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    tx.audit(std::slice::from_ref(audit)).await?;
    Ok(Ok(()))
}

pub(super) async fn redeem_pairing_code(
    tx: &mut Tx,
    code: &str,
    by: &str,
    now_ms: i64,
    audit: fn(&PairedUser) -> audit::AuditEvent,
) -> StoreResult<Option<PairedUser>> {
    let live: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT code_hash, user_id, display_name FROM pairing_codes WHERE expires_ms > $1 \
         FOR UPDATE",
    )
    .bind(now_ms)
    .fetch_all(tx.conn().await?)
    .await
    .map_err(db)?;
    // Compare against every live hash in constant time; no early exit.
    let mut found = None;
    for (hash, user_id, name) in live {
        if pairing::matches(code, &hash) {
            found = Some((hash, user_id, name));
        }
    }
    let Some((hash, user_id, display_name)) = found else {
        return Ok(None);
    };
    sqlx::query("DELETE FROM pairing_codes WHERE code_hash = $1")
        .bind(&hash)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?;
    let user = PairedUser {
        user_id,
        roles: vec![],
        display_name,
        paired_by: by.to_string(),
        paired_ms: now_ms,
    };
    insert_paired(tx.conn().await?, &user).await?;
    tx.audit_events(&[audit(&user)]).await?;
    tx.note(Note::PolicyChanged);
    Ok(Some(user))
}

pub(super) async fn append_audit(tx: &mut Tx, events: &[SealedEvent]) -> StoreResult<()> {
    tx.audit(events).await
}

/// Deletes the oldest prefix of the log older than `cutoff` and appends
/// the checkpoint that accounts for it.
pub(super) async fn prune_audit(tx: &mut Tx, cutoff: i64, now: i64) -> StoreResult<Option<Pruned>> {
    let (young,): (Option<i64>,) = sqlx::query_as("SELECT MIN(seq) FROM audit WHERE at_ms >= $1")
        .bind(cutoff)
        .fetch_one(tx.conn().await?)
        .await
        .map_err(db)?;
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit WHERE seq < $1 ORDER BY seq DESC LIMIT 1")
            .bind(young.unwrap_or(i64::MAX))
            .fetch_optional(tx.conn().await?)
            .await
            .map_err(db)?;
    let Some((through_seq, through_hash)) = last else {
        return Ok(None);
    };
    let entries = sqlx::query("DELETE FROM audit WHERE seq <= $1")
        .bind(through_seq)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected();
    tx.audit_events(&[audit::checkpoint(
        now,
        (through_seq, &through_hash),
        entries,
        cutoff,
    )])
    .await?;
    Ok(Some(Pruned {
        entries,
        through_seq,
        through_hash,
    }))
}

pub(super) async fn card_reconcile(tx: &mut Tx, channel: u64) -> StoreResult<u64> {
    // Run when an outbox starts (this process just began to lead): claims
    // left by an earlier leader (killed, or stepped down mid-batch) are
    // released, so its cards are due now rather than when the claims expire.
    sqlx::query(
        "UPDATE discord_cards SET claimed_by = NULL, claim_until_ms = NULL \
         WHERE claimed_by IS NOT NULL",
    )
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    let added = sqlx::query(
        "INSERT INTO discord_cards (request_id, channel_id, deadline_ms) \
         SELECT id, $1, deadline_ms FROM requests r WHERE r.state = 'pending' \
         AND NOT EXISTS (SELECT 1 FROM discord_cards c WHERE c.request_id = r.id) \
         AND NOT EXISTS (SELECT 1 FROM discord_digest_members m WHERE m.request_id = r.id) \
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(channel as i64)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?
    .rows_affected();
    let stale = sqlx::query(
        "UPDATE discord_cards SET want = done + 1, attempts = 0, next_attempt_ms = 0 \
         WHERE want <= done AND rendered_state IS DISTINCT FROM \
         (SELECT state FROM requests r WHERE r.id = discord_cards.request_id)",
    )
    .execute(tx.conn().await?)
    .await
    .map_err(db)?
    .rows_affected();
    let n = added + stale;
    if n > 0 {
        tx.note(Note::CardsDue);
    }
    Ok(n)
}

pub(super) async fn card_done(
    tx: &mut Tx,
    id: RequestId,
    message: u64,
    version: i64,
    state: &str,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE discord_cards SET message_id = $1, done = GREATEST(done, $2), rendered_state = $3, \
         attempts = 0, next_attempt_ms = 0, claimed_by = NULL, claim_until_ms = NULL \
         WHERE request_id = $4",
    )
    .bind(message as i64)
    .bind(version)
    .bind(state)
    .bind(id.to_string())
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    Ok(())
}

/// Every waiting card due now (Discord answered again).
pub(super) async fn cards_retry_now(tx: &mut Tx, now: i64) -> StoreResult<u64> {
    let n = sqlx::query(
        "UPDATE discord_cards SET next_attempt_ms = 0 WHERE want > done AND next_attempt_ms > $1",
    )
    .bind(now)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?
    .rows_affected();
    if n > 0 {
        tx.note(Note::CardsDue);
    }
    Ok(n)
}

pub(super) async fn card_retry_later(
    tx: &mut Tx,
    id: RequestId,
    attempts: i64,
    next: i64,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE discord_cards SET attempts = $1, next_attempt_ms = $2, claimed_by = NULL, \
         claim_until_ms = NULL WHERE request_id = $3",
    )
    .bind(attempts)
    .bind(next)
    .bind(id.to_string())
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    Ok(())
}

async fn insert_paired(conn: &mut PgConnection, u: &PairedUser) -> StoreResult<bool> {
    let roles = serde_json::to_string(&u.roles).unwrap_or_else(|_| "[]".into());
    Ok(sqlx::query(
        "INSERT INTO paired_users (user_id, roles, display_name, paired_by, paired_ms) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(&u.user_id)
    .bind(roles)
    .bind(&u.display_name)
    .bind(&u.paired_by)
    .bind(u.paired_ms)
    .execute(conn)
    .await
    .map_err(db)?
    .rows_affected()
        == 1)
}

fn effect_str(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}

/// Rows per capability and scope the trifecta history reads (as SQLite).
const HISTORY_ROWS: usize = 20;

/// The trifecta history of `agent` (and `user`) since `since_ms`, in one
/// statement: one branch per capability and scope, each through its
/// partial index, in the order the SQLite store reads them.
pub(super) async fn history(
    conn: &mut PgConnection,
    agent: &str,
    user: Option<&str>,
    since_ms: i64,
) -> StoreResult<Vec<(String, Vec<ToolTag>)>> {
    let mut branches = Vec::new();
    for (t, tag) in trifecta::ALL_TAGS.iter().enumerate() {
        for (s, (column, param)) in [("agent", "$1"), ("user_id", "$2")].iter().enumerate() {
            let bit = tag.bit();
            branches.push(format!(
                "(SELECT {ord} AS ord, {bit}::bigint AS bit, tool, agent, state, created_ms \
                 FROM requests WHERE {column} = {param} AND created_ms >= $3 \
                 AND (caps & {bit}) != 0 AND state IN ('approved', 'pending') \
                 ORDER BY created_ms DESC LIMIT {HISTORY_ROWS})",
                ord = t * 2 + s,
            ));
        }
    }
    let sql = format!(
        "SELECT bit, tool, agent, state FROM ({}) h ORDER BY ord, created_ms DESC",
        branches.join(" UNION ALL ")
    );
    let rows: Vec<(i64, String, String, String)> = sqlx::query_as(&sql)
        .bind(agent)
        .bind(user)
        .bind(since_ms)
        .fetch_all(conn)
        .await
        .map_err(db)?;
    rows.into_iter()
        .map(|(bit, tool, by, state)| {
            let tag = trifecta::ALL_TAGS
                .into_iter()
                .find(|t| t.bit() == bit)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown capability bit {bit}")))?;
            Ok(crate::store::sqlite::history_entry(
                agent,
                tag,
                (tool, by, state),
            ))
        })
        .collect()
}

/// Inserts the request row; `false` when its idempotency key was taken
/// (nothing stored). A request id stored twice is a unique violation.
/// Without a key nothing else can conflict: the row goes with the batch's
/// other rows (see [`super::deferred`]), and a violation fails the write then.
async fn insert_request(
    tx: &mut Tx,
    r: &ApprovalRequest,
    caps: i64,
    idempotency_fp: Option<&str>,
) -> StoreResult<bool> {
    if r.idempotency_key.is_none() {
        tx.insert_request(r, caps);
        return Ok(true);
    }
    let flags = serde_json::Value::Array(r.flags.clone()).to_string();
    let run_plan = crate::store::sqlite::run_plan_json(r)?;
    let n = sqlx::query(
        "INSERT INTO requests (id, agent, tool, args, args_hash, user_id, channel_id, justification, \
         task_id, idempotency_key, risk, approvals_required, admin_only, rule, rule_detail, flags, \
         created_ms, deadline_ms, state, decided_by, decided_who, decided_reason, decided_ms, \
         requester_uid, caps, idempotency_fp, run_plan) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
         $19, $20, $21, $22, $23, $24, $25, $26, $27) \
         ON CONFLICT (agent, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
    )
    .bind(r.id.to_string())
    .bind(&r.agent)
    .bind(&r.tool)
    .bind(r.args.to_string())
    .bind(&r.args_hash)
    .bind(&r.user_id)
    .bind(&r.channel_id)
    .bind(&r.justification)
    .bind(&r.task_id)
    .bind(&r.idempotency_key)
    .bind(r.risk.as_str())
    .bind(r.approvals_required as i64)
    .bind(r.admin_only)
    .bind(&r.rule)
    .bind(&r.rule_detail)
    .bind(flags)
    .bind(r.created_ms)
    .bind(r.deadline_ms)
    .bind(r.state.as_str())
    .bind(r.decided_by.map(|d| d.as_str()))
    .bind(&r.decided_who)
    .bind(&r.decided_reason)
    .bind(r.decided_ms)
    .bind(r.requester_uid.map(i64::from))
    .bind(caps)
    .bind(idempotency_fp)
    .bind(run_plan)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?
    .rows_affected();
    Ok(n == 1)
}

/// The conditional update that makes exactly one terminal state win (for a
/// timeout, only once the deadline is due at `due_by`).
async fn resolve(
    conn: &mut PgConnection,
    r: &ApprovalRequest,
    due_by: Option<i64>,
) -> StoreResult<()> {
    let n = sqlx::query(
        "UPDATE requests SET state = $1, decided_by = $2, decided_who = $3, decided_reason = $4, \
         decided_ms = $5 WHERE id = $6 AND state = 'pending' \
         AND ($7::bigint IS NULL OR deadline_ms <= $7)",
    )
    .bind(r.state.as_str())
    .bind(r.decided_by.map(|d| d.as_str()))
    .bind(&r.decided_who)
    .bind(&r.decided_reason)
    .bind(r.decided_ms)
    .bind(r.id.to_string())
    .bind(due_by)
    .execute(&mut *conn)
    .await
    .map_err(db)?
    .rows_affected();
    if n != 1 {
        // The row is locked, so this cannot happen; if it does, refuse
        // rather than report a win.
        return Err(StoreError::Conflict {
            what: format!("request {} was no longer pending", r.id),
            retry: false,
        });
    }
    // The request left `pending`: its agent's slot is free.
    free_slot(conn, &r.agent).await
}

/// The request row, locked until the transaction ends.
async fn load_locked(
    conn: &mut PgConnection,
    id: RequestId,
) -> StoreResult<Option<ApprovalRequest>> {
    sqlx::query_as::<_, RequestRow>("SELECT * FROM requests WHERE id = $1 FOR UPDATE")
        .bind(id.to_string())
        .fetch_optional(conn)
        .await
        .map_err(db)?
        .map(RequestRow::into_request)
        .transpose()
}

pub(super) async fn add_timed_grant(
    tx: &mut Tx,
    g: &crate::domain::timed::TimedGrant,
    audit: &SealedEvent,
) -> StoreResult<()> {
    sqlx::query(crate::store::timed::INSERT)
        .bind(&g.id)
        .bind(&g.agent)
        .bind(&g.tool)
        .bind(g.kind.as_str())
        .bind(&g.user_id)
        .bind(&g.args_hash)
        .bind(g.expires_ms)
        .bind(&g.created_by)
        .bind(g.created_ms)
        .bind(&g.origin_request)
        .bind(i64::from(g.by_admin))
        .execute(tx.conn().await?)
        .await
        .map_err(db)?;
    policy_changed(tx, true, audit).await
}

pub(super) async fn remove_timed_grant(
    tx: &mut Tx,
    id: &str,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = sqlx::query(crate::store::timed::DELETE)
        .bind(id)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected()
        == 1;
    policy_changed(tx, done, audit).await?;
    Ok(done)
}
