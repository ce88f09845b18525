//! Deciding requests: status and waiting, votes, cancels and timeouts, and
//! the per-agent pending slots they free.

use super::*;
use crate::domain::request::VoterRights;

/// Pause between two reads of a waited-on request while the store cannot
/// be read.
const WAIT_READ_RETRY: Duration = Duration::from_secs(1);
impl Gateway {
    /// The request as stored.
    pub async fn status(&self, id: RequestId) -> Result<ApprovalRequest, AppError> {
        self.store
            .get_request(id)
            .await?
            .ok_or_else(|| AppError::NotFound(id.to_string()))
    }

    /// Checks that `agent` submitted `id` (admins may see every request).
    pub async fn status_for(
        &self,
        id: RequestId,
        agent: Option<&str>,
    ) -> Result<ApprovalRequest, AppError> {
        let r = self.status(id).await?;
        match agent {
            Some(a) if a != r.agent => Err(AppError::NotYourRequest(id.to_string())),
            _ => Ok(r),
        }
    }

    /// Blocks until `id` is terminal, or `max_wait` passes (then returns it
    /// pending). Woken by the `Resolved` change the store publishes, so a
    /// decision committed by anyone who publishes on the feed wakes it.
    pub async fn wait(
        &self,
        id: RequestId,
        agent: Option<&str>,
        max_wait: Option<Duration>,
    ) -> Result<ApprovalRequest, AppError> {
        let mut woken = self.waiters.register(id);
        // While the store cannot be read (a database briefly away), the
        // agent keeps waiting and the read is retried, for at most as long
        // as any request may wait; a decision committed meanwhile wakes it.
        let bound = max_wait.map_or(self.cfg.risk.max_timeout.0, |m| {
            m.min(self.cfg.risk.max_timeout.0)
        });
        let started = tokio::time::Instant::now();
        let r = loop {
            match self.status_for(id, agent).await {
                Err(AppError::Store(e)) if e.is_retryable() && started.elapsed() < bound => {
                    tracing::debug!(request.id = %id, error = %e, "cannot read a waited-on request; retrying");
                    tokio::select! {
                        done = &mut woken => {
                            return match done {
                                Ok(done) if agent.is_none_or(|a| a == done.agent) => Ok(done),
                                _ => self.status_for(id, agent).await,
                            };
                        }
                        _ = tokio::time::sleep(WAIT_READ_RETRY) => {}
                    }
                }
                other => break other?,
            }
        };
        if r.state.is_terminal() {
            return Ok(r);
        }
        // The scheduler times the request out at its deadline; the grace
        // covers a store that is briefly slow.
        let until_deadline = Duration::from_millis((r.deadline_ms - now_ms()).max(0) as u64)
            + Duration::from_secs(5);
        let limit = max_wait.map_or(until_deadline, |m| m.min(until_deadline));
        match tokio::time::timeout(limit, woken).await {
            Ok(Ok(done)) => Ok(done),
            _ => self.status(id).await,
        }
    }

    /// How many agents are blocked in [`Gateway::wait`] right now.
    pub fn waiting(&self) -> usize {
        self.waiters.count()
    }

    /// Records a person's vote. `is_admin` says whether the voter may decide
    /// critical requests. `voter` is a stable identity (`uid:N`,
    /// `discord:ID`); `name` is only shown beside it, cleaned so it cannot
    /// imitate one.
    ///
    /// The uid that made a request (and its agent) may not vote on it,
    /// unless `[admin] allow_self_approval` or `single_user_demo` is set:
    /// checked in the vote's transaction, so every surface gets the rule.
    pub async fn vote(
        &self,
        id: RequestId,
        voter: &str,
        name: Option<String>,
        approve: bool,
        reason: Option<String>,
        is_admin: bool,
    ) -> Result<super::ports::Voted, AppError> {
        let admin = &self.cfg.admin;
        let name = name
            .map(|n| crate::domain::request::clean_display_name(&n))
            .filter(|n| !n.is_empty());
        let reason = reason
            .filter(|r| !r.trim().is_empty())
            .map(|r| self.redactor.redact_text(&r).0);
        let vote = Vote {
            voter: voter.to_string(),
            name: name.map(|n| self.display_name(&n)),
            approve,
            reason,
            at_ms: now_ms(),
        };
        let rights = VoterRights {
            is_admin,
            may_self_approve: admin.allow_self_approval || admin.single_user_demo,
        };
        // Admin-only and self-approval are checked by the store on the row
        // it decides on, in the vote's transaction.
        match self.store.vote(id, vote, rights).await? {
            Ok(v) => {
                if v.request.state.is_terminal() {
                    tracing::info!(request.id = %id, state = %v.request.state, "decided");
                }
                if v.request.state == State::Denied {
                    self.anomaly_on_denial(&v.request).await;
                }
                Ok(v)
            }
            Err(TransitionError::PastDeadline) => {
                // The decision lost to the timeout; make the timeout happen now.
                let _ = self.expire(id).await;
                Err(AppError::AlreadyDecided(State::TimedOut))
            }
            Err(e @ TransitionError::SelfApproval { .. }) => {
                tracing::warn!(request.id = %id, voter = %voter, "vote by the requester refused");
                Err(transition(id, e))
            }
            Err(e) => Err(transition(id, e)),
        }
    }

    /// Cancels a pending request.
    pub async fn cancel(
        &self,
        id: RequestId,
        who: &str,
        agent: Option<&str>,
        reason: Option<String>,
    ) -> Result<ApprovalRequest, AppError> {
        self.status_for(id, agent).await?;
        let reason = reason.map(|r| self.redactor.redact_text(&r).0);
        match self
            .store
            .cancel(id, who.to_string(), reason, now_ms())
            .await?
        {
            Ok(r) => Ok(r),
            Err(e) => Err(transition(id, e)),
        }
    }

    /// Times out `id` if its deadline has passed (called by the scheduler).
    /// Not due yet (the clock moved back) is no error: the scheduler's
    /// sweep finds it again at its deadline.
    pub async fn expire(&self, id: RequestId) -> Result<(), AppError> {
        if let Ok(r) = self.store.time_out(id, now_ms()).await? {
            tracing::info!(request.id = %r.id, "timed out");
            self.anomaly_on_denial(&r).await;
        }
        Ok(())
    }

    /// Pending requests per agent, as the store counts them.
    pub async fn pending_counts(&self) -> Result<HashMap<String, usize>, AppError> {
        Ok(self
            .store
            .pending_counts()
            .await?
            .into_iter()
            .map(|(a, n)| (a, n as usize))
            .collect())
    }

    pub async fn pending(&self, limit: u32) -> Result<Vec<ApprovalRequest>, AppError> {
        Ok(self.store.pending(limit).await?)
    }
}

pub(super) fn transition(id: RequestId, e: TransitionError) -> AppError {
    match e {
        TransitionError::NotFound => AppError::NotFound(id.to_string()),
        TransitionError::AlreadyDecided { state } => AppError::AlreadyDecided(state),
        TransitionError::PastDeadline => AppError::AlreadyDecided(State::TimedOut),
        TransitionError::AlreadyVoted { voter } => AppError::AlreadyVoted(voter),
        TransitionError::NotDue => bad("the deadline has not been reached"),
        TransitionError::AdminOnly => AppError::AdminOnly,
        TransitionError::SelfApproval { voter } => AppError::SelfApproval(voter),
        e @ (TransitionError::ArgsChanged | TransitionError::ApprovedAsIs { .. }) => bad(format!(
            "{e}: the edit was not applied and the request is unchanged"
        )),
    }
}
