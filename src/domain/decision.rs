//! What a vote, cancel or timeout writes: the request row after it and the
//! audit events that record it, decided from the row (and votes) a store
//! read inside its write transaction. Every backend calls these, so the
//! audit chain is the same whichever database keeps it.
//!
//! Pure: no I/O, no clock (time comes in the vote or as `now_ms`).

use super::audit::{events, AuditEvent};
use super::request::{self, ApprovalRequest, TransitionError, Vote, VoteEffect, VoterRights};

/// A vote the lifecycle accepted.
#[derive(Debug, Clone)]
pub struct VoteWrite {
    /// The request after the vote (terminal if the vote decided it; then
    /// the store writes its terminal fields).
    pub request: ApprovalRequest,
    /// Approvals counted, and needed.
    pub have: u32,
    pub need: u32,
    /// The vote, then its resolution if it decided the request.
    pub events: Vec<AuditEvent>,
}

/// A vote by `vote.voter` with `rights` on `req`, whose earlier votes are
/// `earlier`: refused when the voter may not vote on it
/// ([`request::authorize_vote`]), else applied ([`request::apply_vote`]).
pub fn vote(
    mut req: ApprovalRequest,
    earlier: &[Vote],
    vote: &Vote,
    rights: VoterRights,
) -> Result<VoteWrite, TransitionError> {
    request::authorize_vote(&req, vote, rights)?;
    let effect = request::apply_vote(&req, earlier, vote)?;
    let mut audit = Vec::with_capacity(2);
    audit.push(events::vote(&req, vote));
    let (have, need) = match effect {
        VoteEffect::Recorded { have, need } => (have, need),
        VoteEffect::Resolved(res) => {
            req.resolve(&res);
            audit.push(events::resolved(&req));
            let need = req.approvals_required.max(1);
            (if vote.approve { need } else { 0 }, need)
        }
    };
    Ok(VoteWrite {
        request: req,
        have,
        need,
        events: audit,
    })
}

/// An approval with edited arguments ([`crate::domain::edit`]): refused
/// when the arguments changed since the edit was checked, or when approvals
/// were already given for the arguments as submitted (they did not see the
/// edit); else the request takes the edited arguments (keeping the
/// submitted ones in `edit`) and the approval is applied as [`vote`] does.
/// The edit is audited first, then the vote (and its resolution).
pub fn vote_edited(
    mut req: ApprovalRequest,
    earlier: &[Vote],
    vote_: &Vote,
    rights: VoterRights,
    change: &super::edit::ArgsChange,
) -> Result<VoteWrite, TransitionError> {
    request::authorize_vote(&req, vote_, rights)?;
    if req.state.is_terminal() {
        return Err(TransitionError::AlreadyDecided { state: req.state });
    }
    if req.args_hash != change.expected_hash {
        return Err(TransitionError::ArgsChanged);
    }
    if earlier.iter().any(|v| v.voter == vote_.voter) {
        return Err(TransitionError::AlreadyVoted {
            voter: vote_.voter.clone(),
        });
    }
    let have = earlier.iter().filter(|v| v.approve).count() as u32;
    if have > 0 {
        return Err(TransitionError::ApprovedAsIs { have });
    }
    if !vote_.approve {
        // An edit is always an approval.
        return Err(TransitionError::ArgsChanged);
    }
    if vote_.at_ms >= req.deadline_ms {
        return Err(TransitionError::PastDeadline);
    }
    let edited = events::args_edited(
        &req,
        &vote_.voter,
        &req.args_hash,
        &change.args_hash,
        vote_.at_ms,
    );
    let original_args = std::mem::replace(&mut req.args, change.args.clone());
    let original_args_hash = std::mem::replace(&mut req.args_hash, change.args_hash.clone());
    req.run = change.run.clone();
    req.edit = Some(request::ArgsEdit {
        original_args,
        original_args_hash,
        by: vote_.display(),
        at_ms: vote_.at_ms,
    });
    let mut w = vote(req, earlier, vote_, rights)?;
    w.events.insert(0, edited);
    Ok(w)
}

/// `req` cancelled by `who`, with its audit event.
pub fn cancel(
    mut req: ApprovalRequest,
    who: &str,
    reason: Option<String>,
    now_ms: i64,
) -> Result<(ApprovalRequest, AuditEvent), TransitionError> {
    let res = request::cancel(&req, who, reason, now_ms)?;
    req.resolve(&res);
    let e = events::resolved(&req);
    Ok((req, e))
}

/// `req` timed out at `now_ms`, with its audit event.
pub fn time_out(
    mut req: ApprovalRequest,
    now_ms: i64,
) -> Result<(ApprovalRequest, AuditEvent), TransitionError> {
    let res = request::time_out(&req, now_ms)?;
    req.resolve(&res);
    let e = events::resolved(&req);
    Ok((req, e))
}

/// The audit event of a submission refused because its idempotency key is
/// held by `existing`, a different call.
pub fn idempotency_conflict(new: &ApprovalRequest, existing: &ApprovalRequest) -> AuditEvent {
    events::idempotency_conflict(new.created_ms, existing, &new.tool, &new.args_hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::{tests::pending, State};

    fn v(voter: &str, approve: bool) -> Vote {
        Vote {
            voter: voter.into(),
            name: None,
            approve,
            reason: None,
            at_ms: 10,
        }
    }

    #[test]
    fn rights_are_checked_before_the_lifecycle() {
        let mut r = pending(1, 100);
        r.admin_only = true;
        let voter = VoterRights::default();
        assert_eq!(
            vote(r.clone(), &[], &v("uid:5", true), voter).unwrap_err(),
            TransitionError::AdminOnly
        );
        // Even on a decided request, a non-admin hears "admin only".
        r.state = State::Denied;
        assert_eq!(
            vote(r, &[], &v("uid:5", true), voter).unwrap_err(),
            TransitionError::AdminOnly
        );
    }

    #[test]
    fn the_requester_may_not_vote_unless_allowed() {
        let mut r = pending(1, 100);
        r.requester_uid = Some(1000);
        let no = VoterRights::default();
        let yes = VoterRights {
            may_self_approve: true,
            ..no
        };
        for voter in ["uid:1000", &format!("agent:{}", r.agent)] {
            assert_eq!(
                vote(r.clone(), &[], &v(voter, true), no).unwrap_err(),
                TransitionError::SelfApproval {
                    voter: voter.into()
                }
            );
            let w = vote(r.clone(), &[], &v(voter, true), yes).unwrap();
            assert_eq!(w.events.len(), 2, "vote and resolution");
        }
        // uid:100 is not uid:1000.
        assert!(vote(r, &[], &v("uid:100", true), no).is_ok());
    }
}
