//! The lethal-trifecta guard: an agent that can read private data, sees
//! untrusted input and can talk to the outside world can be steered into
//! leaking. Tools are tagged in the config with the capability they give; when
//! an agent (or anyone acting for the same user) has already used tools of
//! two of the three kinds within a window, a call that brings the third is
//! escalated to a human whatever its risk.
//!
//! The history is kept per agent identity and per user, never per task id:
//! the task id is chosen by the agent, the adversary, so a fresh (or absent)
//! one must not reset what the agent has already touched.
//!
//! Pure: the history (calls approved or still pending, with their tags) is a
//! parameter; the store reads it inside the transaction that stores the call
//! and applies [`guard`], so two calls at once cannot both slip through.

use super::audit::{events, AuditEvent};
use super::request::{too_many_pending, ApprovalRequest, DecidedBy, State, TOO_MANY_PENDING};
use super::Risk;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// A capability a tool gives a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolTag {
    /// Reads mail, files, databases, anything the user would not publish.
    ReadsPrivateData,
    /// Reads web pages, issues, inbound mail: text an attacker can write.
    SeesUntrustedInput,
    /// Sends mail, posts, fetches URLs: data can leave through it.
    CommunicatesExternally,
}

/// The three kinds, in display order.
pub const ALL_TAGS: [ToolTag; 3] = [
    ToolTag::ReadsPrivateData,
    ToolTag::SeesUntrustedInput,
    ToolTag::CommunicatesExternally,
];

impl ToolTag {
    /// The tag's bit in the mask stored on a request row.
    pub fn bit(self) -> i64 {
        match self {
            ToolTag::ReadsPrivateData => 1,
            ToolTag::SeesUntrustedInput => 2,
            ToolTag::CommunicatesExternally => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ToolTag::ReadsPrivateData => "reads_private_data",
            ToolTag::SeesUntrustedInput => "sees_untrusted_input",
            ToolTag::CommunicatesExternally => "communicates_externally",
        }
    }
}

impl fmt::Display for ToolTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The mask of `tags`, as stored on a request row (0: untagged).
pub fn bits(tags: &[ToolTag]) -> i64 {
    tags.iter().fold(0, |m, t| m | t.bit())
}

/// Why a call completes the trifecta, or `None` when it does not.
///
/// `history` holds the tools already used (approved or pending) by `who`
/// (e.g. "agent `a` in the last 24h"), each with its tags; `tool`/`tags` is
/// the call being decided. The call is escalated when it carries at least
/// one tag and, together with the history, `who` would hold all three kinds.
/// One that already holds all three (a human let the third through) keeps
/// asking for every tagged call.
pub fn check(
    who: &str,
    history: &[(String, Vec<ToolTag>)],
    tool: &str,
    tags: &[ToolTag],
) -> Option<String> {
    if tags.is_empty() {
        return None;
    }
    let mut held: BTreeSet<ToolTag> = BTreeSet::new();
    for (_, t) in history {
        held.extend(t.iter().copied());
    }
    let all: BTreeSet<ToolTag> = held.iter().chain(tags).copied().collect();
    if all.len() < ALL_TAGS.len() {
        return None;
    }
    let used: Vec<String> = ALL_TAGS
        .iter()
        .filter(|k| held.contains(k))
        .map(|k| {
            let mut tools: Vec<&str> = history
                .iter()
                .filter(|(_, t)| t.contains(k))
                .map(|(name, _)| name.as_str())
                .collect();
            tools.sort_unstable();
            tools.dedup();
            format!("{k} ({})", tools.join(", "))
        })
        .collect();
    let brings: Vec<&str> = ALL_TAGS
        .iter()
        .filter(|k| tags.contains(k))
        .map(|k| k.as_str())
        .collect();
    let history_text = if used.is_empty() {
        String::new()
    } else {
        format!("{who} has already used {}; ", used.join(" and "))
    };
    Some(format!(
        "lethal trifecta for {who}: {history_text}`{tool}` is {}, so it could read private data, \
         take orders from untrusted input and send data out",
        brings.join(" and ")
    ))
}

/// How an allowed call that would complete the trifecta goes to a human
/// instead: the wait and approvals the policy gives an escalated call.
/// Computed by the caller from the config, before the store decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Escalation {
    pub risk: Risk,
    pub deadline_ms: i64,
    pub approvals_required: u32,
    pub admin_only: bool,
    /// The call cannot wait for a human (nobody watches the agent, or it
    /// has all the pending requests it may have): it is denied at once
    /// instead, with this (rule, why).
    pub deny: Option<(String, String)>,
}

/// What the guard needs to decide one call inside the store's transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    /// The call's capabilities (never empty: untagged calls are not guarded).
    pub tags: Vec<ToolTag>,
    /// History starts here (now minus `content.trifecta_window`).
    pub since_ms: i64,
    /// The window as configured, for the reason text (`24h`).
    pub window: String,
    pub escalation: Escalation,
}

/// Who the history belongs to, as the reason names it.
pub fn who(agent: &str, user: Option<&str>, window: &str) -> String {
    match user {
        Some(u) => format!("agent `{agent}` (and calls for user {u}) in the last {window}"),
        None => format!("agent `{agent}` in the last {window}"),
    }
}

/// What [`guard`] decides for a call that would wait for a human when its
/// agent has no pending slot left (all `max_pending` taken): a call the
/// policy allowed and the guard escalated is denied instead (rule
/// `too_many_pending`); a call that was already going to wait cannot be
/// stored at all (`None`).
pub fn guard_without_slot(
    req: &ApprovalRequest,
    history: &[(String, Vec<ToolTag>)],
    g: &Guard,
    max_pending: usize,
) -> Option<(ApprovalRequest, Vec<AuditEvent>)> {
    if req.state != State::Approved {
        return None;
    }
    let full = Guard {
        escalation: Escalation {
            deny: Some((
                TOO_MANY_PENDING.to_string(),
                too_many_pending(&req.agent, max_pending),
            )),
            ..g.escalation.clone()
        },
        ..g.clone()
    };
    guard(req, history, &full)
}

/// Applies the guard to a call about to be stored, given the history of its
/// agent and user (approved and pending calls in the window, this batch's
/// included). `None`: store it as it is. Otherwise the request to store
/// instead, with its audit events:
/// - an allowed call that completes the trifecta waits for a human (rule
///   `trifecta`), or is denied at once for an unattended agent;
/// - a call already waiting for a human says on its card that approving it
///   completes the trifecta.
pub fn guard(
    req: &ApprovalRequest,
    history: &[(String, Vec<ToolTag>)],
    g: &Guard,
) -> Option<(ApprovalRequest, Vec<AuditEvent>)> {
    let reason = check(
        &who(&req.agent, req.user_id.as_deref(), &g.window),
        history,
        &req.tool,
        &g.tags,
    )?;
    let mut r = req.clone();
    match req.state {
        State::Approved => {
            let e = &g.escalation;
            r.rule = "trifecta".into();
            r.risk = e.risk;
            if let Some((rule, why)) = &e.deny {
                r.rule = rule.clone();
                r.state = State::Denied;
                r.rule_detail = format!("{reason}; {why}");
                r.decided_by = Some(DecidedBy::Policy);
                r.decided_who = Some("policy".into());
                r.decided_reason = Some(r.rule_detail.clone());
                r.decided_ms = Some(req.created_ms);
                return Some((r.clone(), vec![events::decided_by_policy(&r)]));
            }
            r.state = State::Pending;
            r.rule_detail = format!("{reason}; {}", req.rule_detail);
            r.deadline_ms = e.deadline_ms;
            r.approvals_required = e.approvals_required.max(1);
            r.admin_only = e.admin_only;
            r.decided_by = None;
            r.decided_who = None;
            r.decided_reason = None;
            r.decided_ms = None;
        }
        State::Pending => {
            r.rule_detail = format!("approving this completes the {reason}; {}", req.rule_detail);
        }
        _ => return None,
    }
    let ev = vec![events::submitted(&r), events::policy(&r)];
    Some((r, ev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ToolTag::*;

    /// (history, tags of the call, escalated?)
    type Case<'a> = (&'a [(&'a str, &'a [ToolTag])], &'a [ToolTag], bool);

    fn h(list: &[(&str, &[ToolTag])]) -> Vec<(String, Vec<ToolTag>)> {
        list.iter()
            .map(|(n, t)| (n.to_string(), t.to_vec()))
            .collect()
    }

    #[test]
    fn table() {
        let cases: &[Case] = &[
            // Nothing used yet: no single-kind tool escalates.
            (&[], &[CommunicatesExternally], false),
            // Two kinds used, the third arrives: escalate.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("fetch_url", &[SeesUntrustedInput]),
                ],
                &[CommunicatesExternally],
                true,
            ),
            // Any order: private + external, then untrusted.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("send_email", &[CommunicatesExternally]),
                ],
                &[SeesUntrustedInput],
                true,
            ),
            // Two kinds used, another tool of a kind already held: fine.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("fetch_url", &[SeesUntrustedInput]),
                ],
                &[ReadsPrivateData],
                false,
            ),
            // Only one kind used: the second kind does not escalate.
            (
                &[("read_email", &[ReadsPrivateData])],
                &[SeesUntrustedInput],
                false,
            ),
            // An untagged tool never escalates.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("fetch_url", &[SeesUntrustedInput]),
                ],
                &[],
                false,
            ),
            // One tool that is all three at once.
            (
                &[],
                &[ReadsPrivateData, SeesUntrustedInput, CommunicatesExternally],
                true,
            ),
            // A tool with two kinds completes one already held.
            (
                &[("browse", &[SeesUntrustedInput])],
                &[ReadsPrivateData, CommunicatesExternally],
                true,
            ),
            // All three held already: every tagged call keeps asking.
            (
                &[
                    ("read_email", &[ReadsPrivateData]),
                    ("fetch_url", &[SeesUntrustedInput]),
                    ("send_email", &[CommunicatesExternally]),
                ],
                &[ReadsPrivateData],
                true,
            ),
        ];
        for (i, (hist, tags, want)) in cases.iter().enumerate() {
            let got = check("agent `a`", &h(hist), "the_tool", tags);
            assert_eq!(got.is_some(), *want, "case {i}: {got:?}");
        }
    }

    #[test]
    fn reason_names_kinds_and_tools() {
        let why = check(
            "agent `a` in the last 24h",
            &h(&[
                ("read_email", &[ReadsPrivateData]),
                ("fetch_url", &[SeesUntrustedInput]),
                ("read_calendar", &[ReadsPrivateData]),
            ]),
            "send_email",
            &[CommunicatesExternally],
        )
        .unwrap();
        assert!(
            why.contains("reads_private_data (read_calendar, read_email)"),
            "{why}"
        );
        assert!(why.contains("sees_untrusted_input (fetch_url)"), "{why}");
        assert!(
            why.contains("`send_email` is communicates_externally"),
            "{why}"
        );
        assert!(
            why.starts_with("lethal trifecta for agent `a` in the last 24h: agent `a` in the last 24h has already used"),
            "{why}"
        );
    }

    fn req(state: State) -> ApprovalRequest {
        serde_json::from_value(serde_json::json!({
            "id": "0190c0de-0000-7000-8000-000000000001", "agent": "a", "tool": "send_email",
            "args": {}, "args_hash": "h", "user_id": "42", "channel_id": null,
            "justification": "", "task_id": "fresh", "idempotency_key": null, "risk": "low",
            "approvals_required": 1, "admin_only": false, "rule": "risk_low",
            "rule_detail": "`send_email` is low risk", "flags": [], "created_ms": 1000,
            "deadline_ms": 1000, "state": state, "decided_by": null, "decided_who": null,
            "decided_reason": null, "decided_ms": null
        }))
        .unwrap()
    }

    fn g(unattended: bool) -> Guard {
        let deny = unattended.then(|| ("unattended".to_string(), "nobody is watching".to_string()));
        Guard {
            tags: vec![CommunicatesExternally],
            since_ms: 0,
            window: "24h".into(),
            escalation: Escalation {
                risk: Risk::Low,
                deadline_ms: 301_000,
                approvals_required: 1,
                admin_only: false,
                deny,
            },
        }
    }

    #[test]
    fn guard_escalates_allowed_calls_and_warns_on_waiting_ones() {
        let hist = h(&[
            ("read_email", &[ReadsPrivateData]),
            ("fetch_url", &[SeesUntrustedInput]),
        ]);
        // Not completing: stored as it is.
        assert!(guard(&req(State::Approved), &hist[..1], &g(false)).is_none());
        // Allowed call completes it: waits for a human, rule `trifecta`.
        let (r, ev) = guard(&req(State::Approved), &hist, &g(false)).unwrap();
        assert_eq!((r.state, r.rule.as_str()), (State::Pending, "trifecta"));
        assert_eq!(r.deadline_ms, 301_000);
        assert!(r.decided_by.is_none());
        assert!(r.rule_detail.contains("user 42"), "{}", r.rule_detail);
        let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["submitted", "queued"]);
        // Unattended: denied at once.
        let (r, ev) = guard(&req(State::Approved), &hist, &g(true)).unwrap();
        assert_eq!((r.state, r.rule.as_str()), (State::Denied, "unattended"));
        assert_eq!(ev[0].kind, "policy_denied");
        // Already waiting: the card says what approving does.
        let (r, _) = guard(&req(State::Pending), &hist, &g(false)).unwrap();
        assert_eq!((r.state, r.rule.as_str()), (State::Pending, "risk_low"));
        assert!(
            r.rule_detail
                .starts_with("approving this completes the lethal trifecta for agent `a`"),
            "{}",
            r.rule_detail
        );
        // Denied calls are left alone.
        assert!(guard(&req(State::Denied), &hist, &g(false)).is_none());
    }
}
