//! The request lifecycle: `pending → approved | denied | timed_out | cancelled`.
//!
//! Every transition is decided here by pure functions over a snapshot; the store
//! applies the result with one conditional update (`... WHERE state = 'pending'`),
//! so two deciders racing can never both win.

use super::risk::Risk;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A request's identity. Generated outside the core and passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub Uuid);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for RequestId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim())
            .map(RequestId)
            .map_err(|_| format!("`{s}` is not a request id (expected a UUID)"))
    }
}

/// Where a request is in its life. Exactly one terminal state is ever reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Approved,
    Denied,
    TimedOut,
    Cancelled,
}

impl State {
    pub fn is_terminal(self) -> bool {
        self != State::Pending
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::TimedOut => "timed_out",
            State::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => State::Pending,
            "approved" => State::Approved,
            "denied" => State::Denied,
            "timed_out" => State::TimedOut,
            "cancelled" => State::Cancelled,
            other => return Err(format!("unknown request state `{other}`")),
        })
    }
}

/// Who or what brought a request to its terminal state. Together with
/// [`State`] this tells an agent a timeout from a human's no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// The policy decided at once (allowed or denied by a rule).
    Policy,
    /// One or more people voted.
    Human,
    /// Nobody answered before the deadline.
    Timeout,
    /// The agent (or an admin on its behalf) withdrew the request.
    Cancel,
}

impl DecidedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Policy => "policy",
            DecidedBy::Human => "human",
            DecidedBy::Timeout => "timeout",
            DecidedBy::Cancel => "cancel",
        }
    }
}

impl FromStr for DecidedBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "policy" => DecidedBy::Policy,
            "human" => DecidedBy::Human,
            "timeout" => DecidedBy::Timeout,
            "cancel" => DecidedBy::Cancel,
            other => return Err(format!("unknown decider `{other}`")),
        })
    }
}

/// A tool call as an agent submitted it, after redaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub id: RequestId,
    pub agent: String,
    pub tool: String,
    /// Arguments with secrets masked: what is shown, stored and audited.
    pub args: serde_json::Value,
    /// SHA-256 of the canonical JSON of the *full* arguments.
    pub args_hash: String,
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    pub justification: String,
    pub task_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub risk: Risk,
    /// Distinct approvals needed to approve.
    pub approvals_required: u32,
    /// Only admins may vote (critical risk).
    pub admin_only: bool,
    /// The policy rule that decided or asked, e.g. `risk_high` or `tool_not_allowed`.
    pub rule: String,
    /// Human-readable explanation of `rule`.
    pub rule_detail: String,
    /// Content flags raised on the arguments or justification.
    pub flags: Vec<serde_json::Value>,
    pub created_ms: i64,
    pub deadline_ms: i64,
    pub state: State,
    pub decided_by: Option<DecidedBy>,
    /// Who decided: approvers joined by ", ", the denier, or the canceller.
    pub decided_who: Option<String>,
    pub decided_reason: Option<String>,
    pub decided_ms: Option<i64>,
    /// The Unix uid the request came from (SO_PEERCRED): that uid may not
    /// vote on it. `None` for requests stored before this was recorded.
    #[serde(default)]
    pub requester_uid: Option<u32>,
    /// For a tool Keyturn runs itself: the argv (secrets masked) and the
    /// sandbox it will run in, as the approver is shown it.
    #[serde(default)]
    pub run: Option<crate::domain::run::RunPlan>,
    /// Set when an approver approved the call with edited arguments: `args`,
    /// `args_hash` and `run` are then the edited call, and this keeps the
    /// call as submitted (see [`crate::domain::edit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<ArgsEdit>,
}

/// The call as submitted, kept when an approver edited its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArgsEdit {
    /// The submitted arguments, masked.
    pub original_args: serde_json::Value,
    /// SHA-256 of the canonical JSON of the full submitted arguments.
    pub original_args_hash: String,
    /// Who edited (the voter's display, e.g. `alice (discord:1)`).
    pub by: String,
    pub at_ms: i64,
}

/// One person's vote on a pending request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// A stable identity, e.g. `discord:1234` or `cli:alice`. One vote per voter.
    pub voter: String,
    /// A display name for the voter (e.g. the operator's name); not used for identity.
    pub name: Option<String>,
    pub approve: bool,
    pub reason: Option<String>,
    pub at_ms: i64,
}

/// The terminal fields a transition writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub state: State,
    pub decided_by: DecidedBy,
    pub who: Option<String>,
    pub reason: Option<String>,
    pub at_ms: i64,
}

/// Why a vote, cancel or timeout did not change anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("no such request")]
    NotFound,
    #[error("already decided: {state}")]
    AlreadyDecided { state: State },
    #[error("the deadline has passed")]
    PastDeadline,
    #[error("{voter} has already voted on this request")]
    AlreadyVoted { voter: String },
    #[error("the deadline has not been reached")]
    NotDue,
    /// A critical request, and the voter is no admin.
    #[error("only an admin may decide this request")]
    AdminOnly,
    /// The voter made the request (its uid or its agent), and self-approval
    /// is not allowed.
    #[error("{voter} made this request and may not vote on it")]
    SelfApproval { voter: String },
    /// An edit was made on arguments the request no longer has (another
    /// edit came first).
    #[error("the request's arguments changed since the edit was started")]
    ArgsChanged,
    /// An edit after approvals of the arguments as submitted: those
    /// approvals were not given for the edited call.
    #[error("{have} approval(s) were already given for the arguments as submitted")]
    ApprovedAsIs { have: u32 },
}

/// What a voter may do, as the surface that authenticated them knows it.
/// Checked against the request row inside the vote's transaction
/// ([`authorize_vote`]), so no surface can skip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VoterRights {
    /// May decide critical (`admin_only`) requests.
    pub is_admin: bool,
    /// May vote on a request they made (`[admin] allow_self_approval` or
    /// `single_user_demo`).
    pub may_self_approve: bool,
}

/// Whether `vote.voter` may vote on `req` at all: admin-only requests take
/// admins only, and the uid that made a request (or its agent) may not vote
/// on it unless `rights` allow self-approval. Checked before the lifecycle
/// ([`apply_vote`]), so the refusal is the same whatever state the request is in.
pub fn authorize_vote(
    req: &ApprovalRequest,
    vote: &Vote,
    rights: VoterRights,
) -> Result<(), TransitionError> {
    if req.admin_only && !rights.is_admin {
        return Err(TransitionError::AdminOnly);
    }
    if !rights.may_self_approve && is_requester(req, &vote.voter) {
        return Err(TransitionError::SelfApproval {
            voter: vote.voter.clone(),
        });
    }
    Ok(())
}

/// Whether `voter` is the identity that made `req`: its uid (`uid:N`) or
/// its agent (`agent:NAME`).
pub fn is_requester(req: &ApprovalRequest, voter: &str) -> bool {
    let uid = req
        .requester_uid
        .is_some_and(|u| voter.strip_prefix("uid:") == Some(u.to_string().as_str()));
    uid || voter.strip_prefix("agent:") == Some(req.agent.as_str())
}

/// What a valid vote does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteEffect {
    /// Recorded; more approvals are needed (`have` of `need`).
    Recorded { have: u32, need: u32 },
    /// Recorded, and the request is now terminal.
    Resolved(Resolution),
}

/// Applies `vote` to a request whose current votes are `earlier`.
///
/// The first deny denies; the Nth distinct approval approves; a person votes
/// once; a vote at or after the deadline loses to the timeout.
pub fn apply_vote(
    req: &ApprovalRequest,
    earlier: &[Vote],
    vote: &Vote,
) -> Result<VoteEffect, TransitionError> {
    if req.state.is_terminal() {
        return Err(TransitionError::AlreadyDecided { state: req.state });
    }
    if vote.at_ms >= req.deadline_ms {
        return Err(TransitionError::PastDeadline);
    }
    if earlier.iter().any(|v| v.voter == vote.voter) {
        return Err(TransitionError::AlreadyVoted {
            voter: vote.voter.clone(),
        });
    }
    if !vote.approve {
        return Ok(VoteEffect::Resolved(Resolution {
            state: State::Denied,
            decided_by: DecidedBy::Human,
            who: Some(vote.display()),
            reason: vote.reason.clone(),
            at_ms: vote.at_ms,
        }));
    }
    let approvers: Vec<String> = earlier
        .iter()
        .filter(|v| v.approve)
        .chain(std::iter::once(vote))
        .map(Vote::display)
        .collect();
    let have = approvers.len() as u32;
    let need = req.approvals_required.max(1);
    if have < need {
        return Ok(VoteEffect::Recorded { have, need });
    }
    let reasons: Vec<&str> = earlier
        .iter()
        .filter_map(|v| v.reason.as_deref())
        .chain(vote.reason.as_deref())
        .filter(|r| !r.is_empty())
        .collect();
    Ok(VoteEffect::Resolved(Resolution {
        state: State::Approved,
        decided_by: DecidedBy::Human,
        who: Some(approvers.join(", ")),
        reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
        at_ms: vote.at_ms,
    }))
}

/// Cancels a pending request on behalf of `who`.
pub fn cancel(
    req: &ApprovalRequest,
    who: &str,
    reason: Option<String>,
    now_ms: i64,
) -> Result<Resolution, TransitionError> {
    if req.state.is_terminal() {
        return Err(TransitionError::AlreadyDecided { state: req.state });
    }
    Ok(Resolution {
        state: State::Cancelled,
        decided_by: DecidedBy::Cancel,
        who: Some(who.to_string()),
        reason,
        at_ms: now_ms,
    })
}

/// Times out a pending request whose deadline has been reached.
pub fn time_out(req: &ApprovalRequest, now_ms: i64) -> Result<Resolution, TransitionError> {
    if req.state.is_terminal() {
        return Err(TransitionError::AlreadyDecided { state: req.state });
    }
    if now_ms < req.deadline_ms {
        return Err(TransitionError::NotDue);
    }
    Ok(Resolution {
        state: State::TimedOut,
        decided_by: DecidedBy::Timeout,
        who: None,
        reason: Some("no decision before the deadline".into()),
        at_ms: now_ms,
    })
}

impl Vote {
    /// `alice (uid:1000)`, or the bare identity when there is no name. The
    /// name is cleaned ([`clean_display_name`]) so it can never carry
    /// parentheses, commas or colons: `alice (uid:0)` cannot read as uid 0,
    /// nor `a, bob (uid:2)` as a second approver.
    pub fn display(&self) -> String {
        match self.name.as_deref().map(clean_display_name) {
            Some(n) if !n.is_empty() && n != self.voter => format!("{n} ({})", self.voter),
            _ => self.voter.clone(),
        }
    }
}

/// The longest display name kept, in characters.
pub const MAX_DISPLAY_NAME: usize = 64;

/// Whether `c` may appear in a display name: letters, digits, spaces and
/// `_-.'`. Nothing that can open a parenthesis, separate approvers (`,`) or
/// imitate an identity (`uid:N`, `discord:N`), and no control characters.
fn name_char_ok(c: char) -> bool {
    c.is_alphanumeric() || " _-.'".contains(c)
}

/// A display name reduced to the characters it may have, spaces collapsed,
/// at most [`MAX_DISPLAY_NAME`] characters.
pub fn clean_display_name(raw: &str) -> String {
    let kept: String = raw.chars().filter(|c| name_char_ok(*c)).collect();
    kept.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(MAX_DISPLAY_NAME)
        .collect()
}

/// Checks an operator's name as typed (`keyturn approve --as NAME`):
/// refused, not silently changed, when it has anything
/// [`clean_display_name`] would drop. Empty means no name.
pub fn check_display_name(raw: &str) -> Result<Option<String>, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if let Some(bad) = trimmed.chars().find(|c| !name_char_ok(*c)) {
        return Err(format!(
            "the operator name may contain only letters, digits, spaces and `_-.'` (found {:?}); it is shown beside your uid, never instead of it",
            bad
        ));
    }
    if trimmed.chars().count() > MAX_DISPLAY_NAME {
        return Err(format!(
            "the operator name is longer than {MAX_DISPLAY_NAME} characters"
        ));
    }
    Ok(Some(clean_display_name(trimmed)))
}

/// The cancel reason recorded when the agent's client went away (closed its
/// connection, was killed, or withdrew the call) before its answer.
pub const CLIENT_GONE: &str = "client_gone";

/// The rule (and error code) of a call refused because its agent already
/// has `max_pending` requests waiting for a human.
pub const TOO_MANY_PENDING: &str = "too_many_pending";

/// Why a call of `agent` cannot wait for a human: all its `max` pending
/// slots are taken.
pub fn too_many_pending(agent: &str, max: usize) -> String {
    format!("agent `{agent}` already has {max} pending requests; wait for some to be decided")
}

/// The idempotency fingerprint of a submission: SHA-256 over a canonical
/// encoding of everything that makes two calls "the same call" (agent, tool,
/// hash of the full arguments, user, channel, task). A key reused with a
/// different fingerprint is a different call and must never get the earlier
/// answer. The encoding is a JSON array (strings escaped one way only),
/// prefixed with a version tag so a future change cannot collide.
pub fn submission_fingerprint(
    agent: &str,
    tool: &str,
    args_hash: &str,
    user_id: Option<&str>,
    channel_id: Option<&str>,
    task_id: Option<&str>,
) -> String {
    use sha2::{Digest, Sha256};
    let fields = serde_json::json!([agent, tool, args_hash, user_id, channel_id, task_id]);
    let mut h = Sha256::new();
    h.update(b"keyturn-submission-v1\n");
    h.update(fields.to_string().as_bytes());
    hex::encode(h.finalize())
}

impl ApprovalRequest {
    /// This request's [`submission_fingerprint`].
    pub fn fingerprint(&self) -> String {
        submission_fingerprint(
            &self.agent,
            &self.tool,
            &self.args_hash,
            self.user_id.as_deref(),
            self.channel_id.as_deref(),
            self.task_id.as_deref(),
        )
    }

    /// Applies a resolution to this snapshot (the store does the same in SQL).
    pub fn resolve(&mut self, r: &Resolution) {
        self.state = r.state;
        self.decided_by = Some(r.decided_by);
        self.decided_who = r.who.clone();
        self.decided_reason = r.reason.clone();
        self.decided_ms = Some(r.at_ms);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pending(approvals: u32, deadline_ms: i64) -> ApprovalRequest {
        ApprovalRequest {
            id: RequestId(Uuid::from_u128(1)),
            agent: "a".into(),
            tool: "delete_file".into(),
            args: serde_json::json!({"path": "/x"}),
            args_hash: "h".into(),
            user_id: Some("42".into()),
            channel_id: Some("7".into()),
            justification: "j".into(),
            task_id: None,
            idempotency_key: None,
            risk: Risk::High,
            approvals_required: approvals,
            admin_only: false,
            rule: "risk_high".into(),
            rule_detail: String::new(),
            flags: vec![],
            created_ms: 0,
            deadline_ms,
            state: State::Pending,
            decided_by: None,
            decided_who: None,
            decided_reason: None,
            decided_ms: None,
            requester_uid: None,
            run: None,
            edit: None,
        }
    }

    fn vote(voter: &str, approve: bool, at_ms: i64) -> Vote {
        Vote {
            voter: voter.into(),
            name: None,
            approve,
            reason: Some(format!("{voter} says")),
            at_ms,
        }
    }

    #[test]
    fn fingerprint_covers_every_field_that_makes_a_call() {
        let base = pending(1, 100);
        let fp = base.fingerprint();
        assert_eq!(fp.len(), 64);
        assert_eq!(
            fp,
            pending(1, 200).fingerprint(),
            "deadline is not the call"
        );
        type Change = fn(&mut ApprovalRequest);
        let variants: Vec<Change> = vec![
            |r| r.agent = "b".into(),
            |r| r.tool = "read_file".into(),
            |r| r.args_hash = "h2".into(),
            |r| r.user_id = None,
            |r| r.channel_id = Some("8".into()),
            |r| r.task_id = Some("t".into()),
            // No ambiguity between fields: moving text across a boundary
            // changes the fingerprint.
            |r| {
                r.agent = "a\",\"delete_file".into();
                r.tool = String::new();
            },
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut r = base.clone();
            change(&mut r);
            assert_ne!(r.fingerprint(), fp, "variant {i}");
        }
    }

    #[test]
    fn single_approval_approves() {
        let r = pending(1, 100);
        let e = apply_vote(&r, &[], &vote("alice", true, 10)).unwrap();
        match e {
            VoteEffect::Resolved(res) => {
                assert_eq!(res.state, State::Approved);
                assert_eq!(res.who.as_deref(), Some("alice"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_person_rule_needs_two_distinct_approvers() {
        let r = pending(2, 100);
        let first = vote("alice", true, 10);
        assert_eq!(
            apply_vote(&r, &[], &first).unwrap(),
            VoteEffect::Recorded { have: 1, need: 2 }
        );
        // The same person cannot supply the second key.
        assert_eq!(
            apply_vote(&r, std::slice::from_ref(&first), &vote("alice", true, 11)),
            Err(TransitionError::AlreadyVoted {
                voter: "alice".into()
            })
        );
        match apply_vote(&r, &[first], &vote("bob", true, 12)).unwrap() {
            VoteEffect::Resolved(res) => {
                assert_eq!(res.state, State::Approved);
                assert_eq!(res.who.as_deref(), Some("alice, bob"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_deny_denies_even_after_an_approval() {
        let r = pending(2, 100);
        let e = apply_vote(&r, &[vote("alice", true, 10)], &vote("bob", false, 11)).unwrap();
        match e {
            VoteEffect::Resolved(res) => {
                assert_eq!(res.state, State::Denied);
                assert_eq!(res.who.as_deref(), Some("bob"));
                assert_eq!(res.reason.as_deref(), Some("bob says"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn double_decision_is_refused() {
        let mut r = pending(1, 100);
        let VoteEffect::Resolved(res) = apply_vote(&r, &[], &vote("alice", true, 10)).unwrap()
        else {
            panic!("not resolved")
        };
        r.resolve(&res);
        assert_eq!(
            apply_vote(&r, &[], &vote("bob", false, 11)),
            Err(TransitionError::AlreadyDecided {
                state: State::Approved
            })
        );
    }

    #[test]
    fn vote_at_or_after_deadline_loses_to_timeout() {
        let r = pending(1, 100);
        assert_eq!(
            apply_vote(&r, &[], &vote("alice", true, 100)),
            Err(TransitionError::PastDeadline)
        );
        assert_eq!(time_out(&r, 100).unwrap().state, State::TimedOut);
    }

    #[test]
    fn timeout_before_deadline_is_refused() {
        let r = pending(1, 100);
        assert_eq!(time_out(&r, 99), Err(TransitionError::NotDue));
    }

    #[test]
    fn cancel_after_decision_is_refused() {
        let mut r = pending(1, 100);
        r.resolve(&time_out(&r, 100).unwrap());
        assert_eq!(
            cancel(&r, "agent", None, 120),
            Err(TransitionError::AlreadyDecided {
                state: State::TimedOut
            })
        );
    }

    #[test]
    fn cancel_pending_records_who() {
        let r = pending(1, 100);
        let res = cancel(&r, "agent:a", Some("changed my mind".into()), 5).unwrap();
        assert_eq!(res.state, State::Cancelled);
        assert_eq!(res.decided_by, DecidedBy::Cancel);
    }

    #[test]
    fn states_round_trip_through_text() {
        for s in [
            State::Pending,
            State::Approved,
            State::Denied,
            State::TimedOut,
            State::Cancelled,
        ] {
            assert_eq!(s.as_str().parse::<State>().unwrap(), s);
        }
    }

    #[test]
    fn a_display_name_cannot_imitate_an_identity() {
        // Refused as typed.
        for bad in [
            "alice (uid:1000)",
            "uid:0",
            "a, bob (uid:2)",
            "x\u{202e}y",
            "tab\there",
            "full\u{ff08}width\u{ff09}",
        ] {
            assert!(check_display_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_display_name("  José O'Neil ").unwrap().as_deref(),
            Some("José O'Neil")
        );
        assert_eq!(check_display_name("").unwrap(), None);
        assert!(check_display_name(&"a".repeat(MAX_DISPLAY_NAME + 1)).is_err());
        assert!(check_display_name(&"a".repeat(MAX_DISPLAY_NAME)).is_ok());
        // Whatever reached the store is cleaned when shown.
        let v = Vote {
            voter: "uid:1001".into(),
            name: Some("alice (uid:1000), bob\n".into()),
            approve: true,
            reason: None,
            at_ms: 0,
        };
        assert_eq!(v.display(), "alice uid1000 bob (uid:1001)");
        assert_eq!(v.display().matches("uid:").count(), 1);
    }
}
