//! Edit, then approve: an approver approves a pending request with edited
//! arguments. The edit is checked like a submission (size, a run-tool's
//! slots, the content guard and the policy: an edit the policy would deny is
//! refused), its masks are checked and the original secrets put back
//! ([`crate::domain::edit`]), and the store applies the edit with the
//! approval in one transaction. The agent then gets the edited arguments
//! (secrets intact) and their hash; `verify` accepts only that hash.
//!
//! The full arguments never reach the store (only their masked form and
//! hash): to put secrets back, this process keeps the full arguments of the
//! pending requests it queued that had something masked, in memory only
//! ([`Held`]). After a restart, or on another process, such a request can
//! still be approved or denied, but not edited (refused with a clear
//! message). Requests with nothing masked can always be edited.

use super::decide::transition;
use super::run::Prepared;
use super::{bad, now_ms, AppError, Gateway, Submission};
use crate::domain::edit::{self, ArgsChange};
use crate::domain::policy::Verdict;
use crate::domain::redact;
use crate::domain::request::{
    ApprovalRequest, RequestId, State, TransitionError, Vote, VoterRights,
};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;

/// Most requests whose full arguments are held at once, and most bytes of
/// arguments held; past either, new ones are not held (those can still be
/// approved or denied, not edited; a warning is logged).
const MAX_HELD: usize = 50_000;
const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;
/// How long after its deadline a request's arguments are still held (its
/// agent may read an edited answer a little later).
const HELD_AFTER_DEADLINE_MS: i64 = 3_600_000;

/// Policy rules about how many calls an agent, user or task made: the
/// edited call is not one more call, so these do not refuse an edit.
const RATE_RULES: [&str; 4] = [
    "rate_limit_agent",
    "rate_limit_user",
    "task_step_limit",
    "task_budget",
];

/// The full arguments (as submitted, and as edited) of requests this
/// process queued that had something masked, by request and hash. In
/// memory only: never stored, never logged.
#[derive(Default)]
pub(super) struct Held {
    state: Mutex<HeldState>,
}

#[derive(Default)]
struct HeldState {
    map: HashMap<RequestId, HeldArgs>,
    /// Bytes of arguments held (their JSON text), for [`MAX_HELD_BYTES`].
    bytes: usize,
}

struct HeldArgs {
    until_ms: i64,
    /// (args hash, full arguments, their size in bytes).
    versions: Vec<(String, Value, usize)>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, id: RequestId, hash: String, full: Value, until_ms: i64, now: i64) {
        let size = full.to_string().len();
        let mut st = self.lock();
        if st.map.len() >= MAX_HELD / 2 || st.bytes + size > MAX_HELD_BYTES / 2 {
            let HeldState { map, bytes } = &mut *st;
            map.retain(|_, h| {
                let keep = h.until_ms > now;
                if !keep {
                    *bytes -= h.versions.iter().map(|v| v.2).sum::<usize>();
                }
                keep
            });
        }
        if (st.map.len() >= MAX_HELD && !st.map.contains_key(&id))
            || st.bytes + size > MAX_HELD_BYTES
        {
            tracing::warn!(request.id = %id, "too many arguments held for editing; this request can be approved or denied, not edited");
            return;
        }
        let h = st.map.entry(id).or_insert_with(|| HeldArgs {
            until_ms,
            versions: Vec::new(),
        });
        h.until_ms = h.until_ms.max(until_ms);
        if h.versions.iter().any(|(k, _, _)| *k == hash) {
            return;
        }
        h.versions.push((hash, full, size));
        st.bytes += size;
    }

    fn get(&self, id: RequestId, hash: &str) -> Option<Value> {
        self.lock()
            .map
            .get(&id)?
            .versions
            .iter()
            .find(|(k, _, _)| k == hash)
            .map(|(_, v, _)| v.clone())
    }
}

/// What the edit form of a request holds.
#[derive(Debug, Clone)]
pub enum EditForm {
    /// The masked arguments as pretty JSON, to edit.
    Text(String),
    /// The masked JSON does not fit in a form (its length in characters).
    TooLarge(usize),
}

impl Gateway {
    /// Keeps a newly queued request's full arguments for an edit, when
    /// something in them was masked (else the stored arguments are whole).
    pub(super) fn hold_args(&self, r: &ApprovalRequest, full: &Value) {
        if r.state == State::Pending && redact::args_hash(&r.args) != r.args_hash {
            self.edits.keep(
                r.id,
                r.args_hash.clone(),
                full.clone(),
                r.deadline_ms + HELD_AFTER_DEADLINE_MS,
                now_ms(),
            );
        }
    }

    /// The full arguments of `r` as it stands (edited or not), if known
    /// here: the stored ones when nothing was masked, else the held ones.
    fn full_args(&self, r: &ApprovalRequest) -> Option<Value> {
        if redact::args_hash(&r.args) == r.args_hash {
            return Some(r.args.clone());
        }
        self.edits.get(r.id, &r.args_hash)
    }

    /// For an edited request: the arguments to run, secrets intact, for its
    /// agent's answer. `None` when the request was not edited, or when this
    /// process no longer holds them (a client must then fail closed).
    pub fn edited_args(&self, r: &ApprovalRequest) -> Option<Value> {
        r.edit.as_ref()?;
        self.full_args(r)
    }

    /// For an approved run-tool request that was edited: the edited
    /// arguments and their prepared run (checked against the stored plan
    /// by [`Gateway::execute`]). Fails closed when they are not held here.
    pub fn edited_run(&self, r: &ApprovalRequest) -> Result<(Value, Prepared), AppError> {
        let args = self.edited_args(r).ok_or_else(|| AppError::Run {
            code: "run_mismatch",
            message: format!(
                "request {} was approved with edited arguments this process does not hold: nothing was run",
                r.id
            ),
        })?;
        let prepared = self
            .prepare_run(&Submission {
                tool: r.tool.clone(),
                args: args.clone(),
                ..Submission::default()
            })?
            .ok_or_else(|| bad(format!("tool `{}` is not run by Keyturn", r.tool)))?;
        Ok((args, prepared))
    }

    /// Why `r` cannot be edited now, if it cannot (the approver is told).
    async fn not_editable(&self, r: &ApprovalRequest) -> Result<Option<String>, AppError> {
        if r.state.is_terminal() {
            return Err(AppError::AlreadyDecided(r.state));
        }
        if let Some(e) = &r.edit {
            return Ok(Some(format!(
                "this request was already edited by {}; approve or deny it as it now stands",
                e.by
            )));
        }
        let have = self
            .store
            .votes(r.id)
            .await?
            .iter()
            .filter(|v| v.approve)
            .count();
        if have > 0 {
            return Ok(Some(format!(
                "{have} approval(s) were already given for the arguments as submitted, so they \
                 can no longer be edited; approve or deny the request as is"
            )));
        }
        if self.full_args(r).is_none() {
            return Ok(Some(
                "this request's masked values are not held by this Keyturn process (it restarted \
                 since the request came in, or another process queued it), so their originals \
                 cannot be put back: approve or deny it as is"
                    .into(),
            ));
        }
        Ok(None)
    }

    /// The edit form for a pending request: its masked arguments as pretty
    /// JSON, or why it cannot be edited.
    pub async fn edit_form(&self, id: RequestId) -> Result<EditForm, AppError> {
        let r = self.status(id).await?;
        if let Some(why) = self.not_editable(&r).await? {
            return Err(bad(why));
        }
        Ok(match edit::form_text(&r.args) {
            Some(text) => EditForm::Text(text),
            None => EditForm::TooLarge(
                serde_json::to_string_pretty(&r.args)
                    .map(|t| t.chars().count())
                    .unwrap_or(0),
            ),
        })
    }

    /// Approves `id` with the arguments in `text` (the edit form, masked
    /// as shown): same rights as [`Gateway::vote`] (approver, admin-only for
    /// critical, self-approval), checked by the store in the transaction.
    /// A bad edit is refused with a message safe to show, and changes
    /// nothing.
    pub async fn approve_edited(
        &self,
        id: RequestId,
        voter: &str,
        name: Option<String>,
        text: &str,
        is_admin: bool,
    ) -> Result<super::ports::Voted, AppError> {
        // Refusals that need no parsing come first (an edit of a decided
        // request says so, whatever its text).
        let r = self.status(id).await?;
        if let Some(why) = self.not_editable(&r).await? {
            return Err(bad(why));
        }
        let edited = edit::parse_edit(text).map_err(|e| bad(e.to_string()))?;
        self.approve_edited_value(id, voter, name, edited, None, is_admin)
            .await
    }

    /// [`Gateway::approve_edited`] with the edit already read (the socket's
    /// `approve` with `args`; its size is bounded by `server.max_args_bytes`).
    pub async fn approve_edited_value(
        &self,
        id: RequestId,
        voter: &str,
        name: Option<String>,
        edited: Value,
        reason: Option<String>,
        is_admin: bool,
    ) -> Result<super::ports::Voted, AppError> {
        let r = self.status(id).await?;
        if let Some(why) = self.not_editable(&r).await? {
            return Err(bad(why));
        }
        if !edited.is_object() {
            return Err(bad(edit::EditError::NotObject.to_string()));
        }
        let full = self
            .full_args(&r)
            .ok_or_else(|| bad("the original arguments are not held here"))?;
        let full_edited = edit::restore(&r.args, &full, &edited).map_err(|e| bad(e.to_string()))?;
        let new_hash = redact::args_hash(&full_edited);
        if new_hash == r.args_hash {
            return Err(bad(
                "the edit changes nothing; use Approve to approve the request as is",
            ));
        }
        // Checked as a submission of the edited call would be.
        let sub = Submission {
            tool: r.tool.clone(),
            args: full_edited.clone(),
            user_id: r.user_id.clone(),
            channel_id: r.channel_id.clone(),
            justification: String::new(),
            task_id: r.task_id.clone(),
            requester_uid: r.requester_uid,
            ..Submission::default()
        };
        self.validate(&sub)
            .map_err(|e| bad(format!("the edited arguments are refused: {e}")))?;
        let plan = match self.prepare_run(&sub) {
            Ok(p) => p.map(|p| p.plan),
            Err(e) => return Err(bad(format!("the edited arguments are refused: {e}"))),
        };
        let now = now_ms();
        let content = self.content(&r.agent, &sub, true).await?;
        let (verdict, _, _) = self.evaluate(&r.agent, &sub, &content, now, true);
        match &verdict {
            // The call's own submission already passed the rate limits and
            // the task budget (the edit is not one more call): only what
            // the arguments decide can still deny it.
            Verdict::Deny { rule, .. } if RATE_RULES.contains(&rule.as_str()) => {
                if let Some((rule, detail)) = &content.force_deny {
                    return Err(bad(format!(
                        "the policy would deny the edited call ({rule}: {detail}); nothing was changed"
                    )));
                }
            }
            Verdict::Deny { rule, detail } => {
                return Err(bad(format!(
                    "the policy would deny the edited call ({rule}: {detail}); nothing was changed"
                )))
            }
            Verdict::Ask {
                admin_only,
                approvals,
                ..
            } => {
                // An edit that makes the call critical needs an admin, and
                // one admin's approval to decide it (a second approver
                // could be no admin).
                if *admin_only && !r.admin_only && (!is_admin || r.approvals_required > 1) {
                    return Err(AppError::AdminOnly);
                }
                if *approvals > r.approvals_required {
                    return Err(bad(format!(
                        "the edited call needs {approvals} approvals, the request {}; approve or \
                         deny it as is",
                        r.approvals_required
                    )));
                }
            }
            Verdict::Allow { .. } => {}
        }
        // Held before the store commits: the agent woken by the commit
        // finds the edited arguments.
        self.edits.keep(
            id,
            new_hash.clone(),
            full_edited,
            r.deadline_ms + HELD_AFTER_DEADLINE_MS,
            now,
        );
        let name = name
            .map(|n| crate::domain::request::clean_display_name(&n))
            .filter(|n| !n.is_empty());
        let reason = reason
            .filter(|r| !r.trim().is_empty())
            .map(|r| self.redactor.redact_text(&r).0);
        let vote = Vote {
            voter: voter.to_string(),
            name: name.map(|n| self.display_name(&n)),
            approve: true,
            reason,
            at_ms: now,
        };
        let rights = VoterRights {
            is_admin,
            may_self_approve: self.cfg.admin.allow_self_approval || self.cfg.admin.single_user_demo,
        };
        let change = ArgsChange {
            expected_hash: r.args_hash.clone(),
            args: content.args,
            args_hash: new_hash,
            run: plan,
        };
        match self.store.vote_edited(id, vote, rights, change).await? {
            Ok(v) => {
                tracing::info!(request.id = %id, voter = %voter, state = %v.request.state, "approved with edited arguments");
                Ok(v)
            }
            Err(TransitionError::PastDeadline) => {
                let _ = self.expire(id).await;
                Err(AppError::AlreadyDecided(State::TimedOut))
            }
            Err(e) => Err(transition(id, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    #[test]
    fn held_arguments_are_found_by_hash_expire_and_are_bounded() {
        let held = Held::default();
        let a = RequestId(Uuid::from_u128(1));
        held.keep(a, "h1".into(), json!({"k": "v1"}), 100, 0);
        held.keep(a, "h2".into(), json!({"k": "v2"}), 100, 0);
        assert_eq!(held.get(a, "h1"), Some(json!({"k": "v1"})));
        assert_eq!(held.get(a, "h2"), Some(json!({"k": "v2"})));
        assert_eq!(held.get(a, "h3"), None);
        // Past their time, entries go when room is needed.
        let big = json!({"k": "x".repeat(MAX_HELD_BYTES / 2)});
        let b = RequestId(Uuid::from_u128(2));
        held.keep(b, "hb".into(), big.clone(), 1_000, 500);
        assert_eq!(held.get(a, "h1"), None, "expired and pruned");
        assert!(held.get(b, "hb").is_some());
        // Over the byte budget: not held (that request cannot be edited).
        let c = RequestId(Uuid::from_u128(3));
        held.keep(c, "hc".into(), big, 1_000, 500);
        assert_eq!(held.get(c, "hc"), None);
        assert!(held.lock().bytes <= MAX_HELD_BYTES);
    }
}
