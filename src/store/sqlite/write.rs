//! Every write, one plain typed function over the writer's transaction
//! ([`Tx`]): what a PostgreSQL backend mirrors. A function reads what it
//! needs inside the transaction, lets the domain decide
//! ([`crate::domain::decision`], [`crate::domain::trifecta`]), writes the
//! rows, appends the audit events it was given (or the domain made), and
//! marks the request's card due, all before the batch commits. The writer
//! ([`super::writer`]) runs them in group commits and answers after commit.

use super::writer::Tx;
use super::RequestRow;
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
use rusqlite::{params, OptionalExtension, Transaction};

/// What an insert did (the caller keeps its own request, so a plain new
/// row is answered without a copy).
pub(super) enum Stored {
    /// Stored as the caller sent it.
    New,
    /// Stored as the trifecta guard changed it.
    Guarded(ApprovalRequest),
    /// The agent had already submitted this idempotency key for this call.
    Existing(ApprovalRequest),
    /// The key was used for a different call: refused and audited.
    Conflict(ApprovalRequest),
    /// The request would wait for a human, but its agent already has
    /// `max_pending` pending requests: nothing was stored.
    TooManyPending,
}

/// Stores `req` with its sealed `audit` events, unless its idempotency key
/// is taken; applies the trifecta `guard`; creates its card row in
/// `cards` (the card channel, when the store has one) if it is pending. A
/// request that would wait for a human takes one of its agent's
/// `max_pending` slots in this transaction, or is not stored
/// ([`Stored::TooManyPending`]; a call the guard escalates is denied instead).
pub(super) fn insert(
    tx: &mut Tx<'_>,
    req: &ApprovalRequest,
    audit: &[SealedEvent],
    guard: Option<&Guard>,
    max_pending: usize,
    cards: Option<u64>,
) -> StoreResult<Stored> {
    // Looked up and inserted in one write transaction by the one writer: a
    // concurrent submit with the same key sees this row.
    let fingerprint = req.idempotency_key.as_ref().map(|_| req.fingerprint());
    if let (Some(key), Some(fp)) = (&req.idempotency_key, &fingerprint) {
        let existing = tx
            .prepare_cached("SELECT * FROM requests WHERE agent = ?1 AND idempotency_key = ?2")?
            .query_row(params![req.agent, key], |r| {
                Ok((
                    request_row(r)?,
                    r.get::<_, Option<String>>("idempotency_fp")?,
                ))
            })
            .optional()?;
        if let Some((row, stored)) = existing {
            let existing = row.into_request()?;
            // A row without a fingerprint cannot prove it was this call.
            if stored.as_deref() == Some(fp.as_str()) {
                return Ok(Stored::Existing(existing));
            }
            tx.audit_events(&[decision::idempotency_conflict(req, &existing)])?;
            return Ok(Stored::Conflict(existing));
        }
    }
    let caps = guard.map_or(0, |g| trifecta::bits(&g.tags));
    if let Some(g) = guard {
        // Read and decided in this transaction: a call stored earlier in
        // the same batch is already in the history.
        let history = trifecta_history(tx, req, g.since_ms)?;
        if let Some((mut changed, mut events)) = trifecta::guard(req, &history, g) {
            if changed.state == State::Pending && !take_slot(tx, &req.agent, max_pending)? {
                // No slot to wait in: an escalated call is denied instead.
                match trifecta::guard_without_slot(req, &history, g, max_pending) {
                    Some(denied) => (changed, events) = denied,
                    None => return Ok(Stored::TooManyPending),
                }
            }
            insert_request(tx, &changed, caps, fingerprint.as_deref())?;
            tx.audit_events(&events)?;
            new_card(tx, &changed, cards)?;
            return Ok(Stored::Guarded(changed));
        }
    }
    if req.state == State::Pending && !take_slot(tx, &req.agent, max_pending)? {
        return Ok(Stored::TooManyPending);
    }
    insert_request(tx, req, caps, fingerprint.as_deref())?;
    tx.audit(audit)?;
    new_card(tx, req, cards)?;
    Ok(Stored::New)
}

/// Takes one of `agent`'s `max` pending slots in this transaction: `false`
/// (nothing changed) when all are taken. The count is a row per agent, so
/// the check reads one row however many requests are pending.
fn take_slot(tx: &Transaction<'_>, agent: &str, max: usize) -> StoreResult<bool> {
    if max == 0 {
        return Ok(false);
    }
    let taken = tx
        .prepare_cached(
            "INSERT INTO agent_pending (agent, pending) VALUES (?1, 1) \
             ON CONFLICT (agent) DO UPDATE SET pending = pending + 1 WHERE pending < ?2 \
             RETURNING pending",
        )?
        .query_row(
            params![agent, i64::try_from(max).unwrap_or(i64::MAX)],
            |_| Ok(()),
        )
        .optional()?;
    Ok(taken.is_some())
}

/// A pending request's card row, due at once.
fn new_card(tx: &Tx<'_>, req: &ApprovalRequest, cards: Option<u64>) -> StoreResult<()> {
    let Some(channel) = cards.filter(|_| req.state == State::Pending) else {
        return Ok(());
    };
    tx.prepare_cached(
        "INSERT INTO discord_cards (request_id, channel_id, deadline_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (request_id) DO UPDATE SET want = want + 1, attempts = 0, next_attempt_ms = 0",
    )?
    .execute(params![req.id.to_string(), channel as i64, req.deadline_ms])?;
    Ok(())
}

/// Marks a changed request's card due again, if it has one (only when the
/// store keeps cards: without a channel nothing reads them, and the
/// reconcile at the next start with one catches up).
fn bump_card(tx: &Tx<'_>, id: RequestId, cards: Option<u64>) -> StoreResult<()> {
    if cards.is_none() {
        return Ok(());
    }
    tx.prepare_cached(
        "UPDATE discord_cards SET want = want + 1, attempts = 0, next_attempt_ms = 0 \
         WHERE request_id = ?1",
    )?
    .execute(params![id.to_string()])?;
    Ok(())
}

/// A vote, decided on the row and votes read here ([`decision::vote`]).
pub(super) fn vote(
    tx: &mut Tx<'_>,
    id: RequestId,
    vote: &Vote,
    rights: VoterRights,
    cards: Option<u64>,
    change: Option<&crate::domain::edit::ArgsChange>,
) -> StoreResult<Result<Voted, TransitionError>> {
    let Some(req) = load(tx, id)? else {
        return Ok(Err(TransitionError::NotFound));
    };
    let earlier = load_votes(tx, id)?;
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
        let n = tx
            .prepare_cached(
                "UPDATE requests SET args = ?1, args_hash = ?2, run_plan = ?3, original_args = ?4, \
                 original_args_hash = ?5, edited_by = ?6, edited_ms = ?7 \
                 WHERE id = ?8 AND state = 'pending' AND original_args_hash IS NULL",
            )?
            .execute(params![
                r.args.to_string(),
                r.args_hash,
                super::run_plan_json(r)?,
                edit.original_args.to_string(),
                edit.original_args_hash,
                edit.by,
                edit.at_ms,
                id.to_string(),
            ])?;
        if n != 1 {
            return Ok(Err(TransitionError::ArgsChanged));
        }
    }
    tx.prepare_cached(
        "INSERT INTO votes (request_id, voter, name, approve, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id.to_string(), vote.voter, vote.name, vote.approve, vote.reason, vote.at_ms])?;
    if w.request.state.is_terminal() {
        resolve(tx, &w.request)?;
    }
    tx.audit_events(&w.events)?;
    bump_card(tx, id, cards)?;
    Ok(Ok(Voted {
        request: w.request,
        have: w.have,
        need: w.need,
    }))
}

/// Cancels a pending request.
pub(super) fn cancel(
    tx: &mut Tx<'_>,
    id: RequestId,
    who: &str,
    reason: Option<String>,
    now_ms: i64,
    cards: Option<u64>,
) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
    finish(tx, id, cards, |r| decision::cancel(r, who, reason, now_ms))
}

/// Times out a pending request whose deadline has passed.
pub(super) fn time_out(
    tx: &mut Tx<'_>,
    id: RequestId,
    now_ms: i64,
    cards: Option<u64>,
) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
    finish(tx, id, cards, |r| decision::time_out(r, now_ms))
}

type Finished = Result<(ApprovalRequest, audit::AuditEvent), TransitionError>;

fn finish(
    tx: &mut Tx<'_>,
    id: RequestId,
    cards: Option<u64>,
    transition: impl FnOnce(ApprovalRequest) -> Finished,
) -> StoreResult<Result<ApprovalRequest, TransitionError>> {
    let Some(req) = load(tx, id)? else {
        return Ok(Err(TransitionError::NotFound));
    };
    let (req, event) = match transition(req) {
        Ok(done) => done,
        Err(e) => return Ok(Err(e)),
    };
    resolve(tx, &req)?;
    tx.audit_events(&[event])?;
    bump_card(tx, id, cards)?;
    Ok(Ok(req))
}

pub(super) fn add_grant(
    tx: &mut Tx<'_>,
    g: &Grant,
    by: &str,
    now_ms: i64,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = tx
        .prepare_cached(
            "INSERT INTO grants (scope, tool, effect, created_by, created_ms) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )?
        .execute(params![g.scope.to_string(), g.tool.as_str(), effect_str(g.effect), by, now_ms])?
        == 1;
    if done {
        tx.audit(std::slice::from_ref(audit))?;
    }
    Ok(done)
}

pub(super) fn remove_grant(
    tx: &mut Tx<'_>,
    scope: &Scope,
    tool: &ToolPattern,
    effect: Effect,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = tx
        .prepare_cached("DELETE FROM grants WHERE scope = ?1 AND tool = ?2 AND effect = ?3")?
        .execute(params![
            scope.to_string(),
            tool.as_str(),
            effect_str(effect)
        ])?
        == 1;
    if done {
        tx.audit(std::slice::from_ref(audit))?;
    }
    Ok(done)
}

pub(super) fn set_tool_risk(
    tx: &mut Tx<'_>,
    tool: &str,
    risk: Option<Risk>,
    by: &str,
    now_ms: i64,
    audit: &SealedEvent,
) -> StoreResult<()> {
    match risk {
        Some(r) => {
            tx.prepare_cached(
                "INSERT INTO tool_risks (tool, risk, set_by, set_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (tool) DO UPDATE SET risk = excluded.risk, set_by = excluded.set_by, set_ms = excluded.set_ms",
            )?
            .execute(params![tool, r.as_str(), by, now_ms])?;
        }
        None => {
            tx.prepare_cached("DELETE FROM tool_risks WHERE tool = ?1")?
                .execute(params![tool])?;
        }
    }
    tx.audit(std::slice::from_ref(audit))
}

pub(super) fn pair_user(tx: &mut Tx<'_>, u: &PairedUser, audit: &SealedEvent) -> StoreResult<bool> {
    let done = insert_paired(tx, u)?;
    if done {
        tx.audit(std::slice::from_ref(audit))?;
    }
    Ok(done)
}

pub(super) fn unpair_user(
    tx: &mut Tx<'_>,
    user_id: &str,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = tx
        .prepare_cached("DELETE FROM paired_users WHERE user_id = ?1")?
        .execute(params![user_id])?
        == 1;
    tx.prepare_cached("DELETE FROM pairing_codes WHERE user_id = ?1")?
        .execute(params![user_id])?;
    if done {
        tx.audit(std::slice::from_ref(audit))?;
    }
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

pub(super) fn create_pairing_code(
    tx: &mut Tx<'_>,
    c: &NewCode,
    audit: &SealedEvent,
) -> StoreResult<Result<(), PairingRefused>> {
    let paired = tx
        .prepare_cached("SELECT 1 FROM paired_users WHERE user_id = ?1")?
        .exists(params![c.user_id])?;
    if paired {
        return Ok(Err(PairingRefused::AlreadyPaired(c.user_id.clone())));
    }
    tx.prepare_cached("DELETE FROM pairing_codes WHERE expires_ms <= ?1 OR user_id = ?2")?
        .execute(params![c.now_ms, c.user_id])?;
    let live: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM pairing_codes")?
        .query_row([], |r| r.get(0))?;
    if live as usize >= c.max_live {
        return Ok(Err(PairingRefused::TooManyCodes(c.max_live)));
    }
    tx.prepare_cached(
        "INSERT INTO pairing_codes (code_hash, user_id, display_name, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![c.code_hash, c.user_id, c.display_name, c.now_ms, c.expires_ms])?;
    tx.audit(std::slice::from_ref(audit))?;
    Ok(Ok(()))
}

pub(super) fn redeem_pairing_code(
    tx: &mut Tx<'_>,
    code: &str,
    by: &str,
    now_ms: i64,
    audit: fn(&PairedUser) -> audit::AuditEvent,
) -> StoreResult<Option<PairedUser>> {
    let live: Vec<(String, String, Option<String>)> = tx
        .prepare_cached(
            "SELECT code_hash, user_id, display_name FROM pairing_codes WHERE expires_ms > ?1",
        )?
        .query_map(params![now_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
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
    tx.prepare_cached("DELETE FROM pairing_codes WHERE code_hash = ?1")?
        .execute(params![hash])?;
    let user = PairedUser {
        user_id,
        roles: vec![],
        display_name,
        paired_by: by.to_string(),
        paired_ms: now_ms,
    };
    insert_paired(tx, &user)?;
    tx.audit_events(&[audit(&user)])?;
    Ok(Some(user))
}

pub(super) fn append_audit(tx: &mut Tx<'_>, events: &[SealedEvent]) -> StoreResult<()> {
    tx.audit(events)
}

/// Deletes the oldest prefix of the log older than `cutoff` and appends
/// the checkpoint that accounts for it.
pub(super) fn prune_audit(tx: &mut Tx<'_>, cutoff: i64, now: i64) -> StoreResult<Option<Pruned>> {
    // The prefix ends just before the first entry that is young enough.
    let young: Option<i64> = tx
        .prepare_cached("SELECT MIN(seq) FROM audit WHERE at_ms >= ?1")?
        .query_row(params![cutoff], |r| r.get(0))?;
    let last: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, hash FROM audit WHERE seq < ?1 ORDER BY seq DESC LIMIT 1")?
        .query_row(params![young.unwrap_or(i64::MAX)], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((through_seq, through_hash)) = last else {
        return Ok(None);
    };
    let entries = tx
        .prepare_cached("DELETE FROM audit WHERE seq <= ?1")?
        .execute(params![through_seq])? as u64;
    tx.audit_events(&[audit::checkpoint(
        now,
        (through_seq, &through_hash),
        entries,
        cutoff,
    )])?;
    Ok(Some(Pruned {
        entries,
        through_seq,
        through_hash,
    }))
}

pub(super) fn card_reconcile(tx: &mut Tx<'_>, channel: u64) -> StoreResult<u64> {
    let added = tx
        .prepare_cached(
            "INSERT INTO discord_cards (request_id, channel_id, deadline_ms) \
             SELECT id, ?1, deadline_ms FROM requests r WHERE r.state = 'pending' \
             AND NOT EXISTS (SELECT 1 FROM discord_cards c WHERE c.request_id = r.id) \
             AND NOT EXISTS (SELECT 1 FROM discord_digest_members m WHERE m.request_id = r.id)",
        )?
        .execute(params![channel as i64])?;
    let stale = tx
        .prepare_cached(
            "UPDATE discord_cards SET want = done + 1, attempts = 0, next_attempt_ms = 0 \
             WHERE want <= done AND rendered_state IS NOT \
             (SELECT state FROM requests r WHERE r.id = discord_cards.request_id)",
        )?
        .execute([])?;
    Ok((added + stale) as u64)
}

pub(super) fn card_done(
    tx: &mut Tx<'_>,
    id: RequestId,
    message: u64,
    version: i64,
    state: &str,
) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE discord_cards SET message_id = ?1, done = MAX(done, ?2), rendered_state = ?3, \
         attempts = 0, next_attempt_ms = 0 WHERE request_id = ?4",
    )?
    .execute(params![message as i64, version, state, id.to_string()])?;
    Ok(())
}

/// Every waiting card due now (Discord answered again).
pub(super) fn cards_retry_now(tx: &mut Tx<'_>, now: i64) -> StoreResult<u64> {
    let n = tx
        .prepare_cached(
            "UPDATE discord_cards SET next_attempt_ms = 0 \
             WHERE want > done AND next_attempt_ms > ?1",
        )?
        .execute(params![now])?;
    Ok(n as u64)
}

pub(super) fn card_retry_later(
    tx: &mut Tx<'_>,
    id: RequestId,
    attempts: i64,
    next: i64,
) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE discord_cards SET attempts = ?1, next_attempt_ms = ?2 WHERE request_id = ?3",
    )?
    .execute(params![attempts, next, id.to_string()])?;
    Ok(())
}

fn insert_paired(tx: &Transaction<'_>, u: &PairedUser) -> StoreResult<bool> {
    let roles = serde_json::to_string(&u.roles).unwrap_or_else(|_| "[]".into());
    Ok(tx
        .prepare_cached(
            "INSERT INTO paired_users (user_id, roles, display_name, paired_by, paired_ms) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )?
        .execute(params![u.user_id, roles, u.display_name, u.paired_by, u.paired_ms])?
        == 1)
}

fn effect_str(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}

/// The trifecta history of `req`'s agent and user, in this transaction.
fn trifecta_history(
    tx: &Transaction<'_>,
    req: &ApprovalRequest,
    since_ms: i64,
) -> StoreResult<Vec<(String, Vec<ToolTag>)>> {
    let mut out = Vec::new();
    for tag in trifecta::ALL_TAGS {
        for (column, key) in [
            ("agent", Some(req.agent.as_str())),
            ("user_id", req.user_id.as_deref()),
        ] {
            let Some(key) = key else { continue };
            let mut stmt = tx.prepare_cached(&super::history_sql(column, tag.bit()))?;
            let rows = stmt.query_map(params![key, since_ms], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            for row in rows {
                out.push(super::history_entry(&req.agent, tag, row?));
            }
        }
    }
    Ok(out)
}

fn insert_request(
    tx: &Transaction<'_>,
    r: &ApprovalRequest,
    caps: i64,
    idempotency_fp: Option<&str>,
) -> StoreResult<()> {
    let flags = serde_json::Value::Array(r.flags.clone()).to_string();
    let run_plan = super::run_plan_json(r)?;
    tx.prepare_cached(
        "INSERT INTO requests (id, agent, tool, args, args_hash, user_id, channel_id, justification, \
         task_id, idempotency_key, risk, approvals_required, admin_only, rule, rule_detail, flags, \
         created_ms, deadline_ms, state, decided_by, decided_who, decided_reason, decided_ms, \
         requester_uid, caps, idempotency_fp, run_plan) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27)",
    )?
    .execute(params![
        r.id.to_string(),
        r.agent,
        r.tool,
        r.args.to_string(),
        r.args_hash,
        r.user_id,
        r.channel_id,
        r.justification,
        r.task_id,
        r.idempotency_key,
        r.risk.as_str(),
        r.approvals_required as i64,
        r.admin_only,
        r.rule,
        r.rule_detail,
        flags,
        r.created_ms,
        r.deadline_ms,
        r.state.as_str(),
        r.decided_by.map(|d| d.as_str()),
        r.decided_who,
        r.decided_reason,
        r.decided_ms,
        r.requester_uid,
        caps,
        idempotency_fp,
        run_plan,
    ])?;
    Ok(())
}

/// The conditional update that makes exactly one terminal state win.
fn resolve(tx: &Transaction<'_>, r: &ApprovalRequest) -> StoreResult<()> {
    let n = tx
        .prepare_cached(
            "UPDATE requests SET state = ?1, decided_by = ?2, decided_who = ?3, decided_reason = ?4, decided_ms = ?5 \
             WHERE id = ?6 AND state = 'pending'",
        )?
        .execute(params![
            r.state.as_str(),
            r.decided_by.map(|d| d.as_str()),
            r.decided_who,
            r.decided_reason,
            r.decided_ms,
            r.id.to_string(),
        ])?;
    if n != 1 {
        // Cannot happen with one writer; if it does, refuse rather than report a win.
        return Err(StoreError::Conflict {
            what: format!("request {} was no longer pending", r.id),
            retry: false,
        });
    }
    // The request left `pending`: its agent's slot is free.
    tx.prepare_cached(
        "UPDATE agent_pending SET pending = pending - 1 WHERE agent = ?1 AND pending > 0",
    )?
    .execute(params![r.agent])?;
    Ok(())
}

fn load(tx: &Transaction<'_>, id: RequestId) -> StoreResult<Option<ApprovalRequest>> {
    tx.prepare_cached("SELECT * FROM requests WHERE id = ?1")?
        .query_row(params![id.to_string()], request_row)
        .optional()?
        .map(RequestRow::into_request)
        .transpose()
}

fn load_votes(tx: &Transaction<'_>, id: RequestId) -> StoreResult<Vec<Vote>> {
    let mut stmt = tx.prepare_cached(
        "SELECT voter, name, approve, reason, at_ms FROM votes WHERE request_id = ?1 ORDER BY at_ms, voter",
    )?;
    let rows = stmt.query_map(params![id.to_string()], |r| {
        Ok(Vote {
            voter: r.get(0)?,
            name: r.get(1)?,
            approve: r.get(2)?,
            reason: r.get(3)?,
            at_ms: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn request_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRow> {
    Ok(RequestRow {
        id: r.get("id")?,
        agent: r.get("agent")?,
        tool: r.get("tool")?,
        args: r.get("args")?,
        args_hash: r.get("args_hash")?,
        user_id: r.get("user_id")?,
        channel_id: r.get("channel_id")?,
        justification: r.get("justification")?,
        task_id: r.get("task_id")?,
        idempotency_key: r.get("idempotency_key")?,
        risk: r.get("risk")?,
        approvals_required: r.get("approvals_required")?,
        admin_only: r.get("admin_only")?,
        rule: r.get("rule")?,
        rule_detail: r.get("rule_detail")?,
        flags: r.get("flags")?,
        created_ms: r.get("created_ms")?,
        deadline_ms: r.get("deadline_ms")?,
        state: r.get("state")?,
        decided_by: r.get("decided_by")?,
        decided_who: r.get("decided_who")?,
        decided_reason: r.get("decided_reason")?,
        decided_ms: r.get("decided_ms")?,
        requester_uid: r.get("requester_uid")?,
        run_plan: r.get("run_plan")?,
        original_args: r.get("original_args")?,
        original_args_hash: r.get("original_args_hash")?,
        edited_by: r.get("edited_by")?,
        edited_ms: r.get("edited_ms")?,
    })
}

pub(super) fn add_timed_grant(
    tx: &mut Tx<'_>,
    g: &crate::domain::timed::TimedGrant,
    audit: &SealedEvent,
) -> StoreResult<()> {
    tx.prepare_cached(crate::store::timed::INSERT)?
        .execute(params![
            g.id,
            g.agent,
            g.tool,
            g.kind.as_str(),
            g.user_id,
            g.args_hash,
            g.expires_ms,
            g.created_by,
            g.created_ms,
            g.origin_request,
            i64::from(g.by_admin),
        ])?;
    tx.audit(std::slice::from_ref(audit))?;
    Ok(())
}

pub(super) fn remove_timed_grant(
    tx: &mut Tx<'_>,
    id: &str,
    audit: &SealedEvent,
) -> StoreResult<bool> {
    let done = tx
        .prepare_cached(crate::store::timed::DELETE)?
        .execute(params![id])?
        == 1;
    if done {
        tx.audit(std::slice::from_ref(audit))?;
    }
    Ok(done)
}
