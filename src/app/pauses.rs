//! The kill switch: pausing an agent (or every agent) denies its calls from
//! the next one on (`agent_paused`) and cancels what it has pending, so the
//! agents waiting on those requests are answered at once; resuming lifts it.
//! The pause lives in the store (it survives a restart, and every process
//! sharing the store denies alike) and in the policy view.

use super::*;
use crate::domain::policy::{Pause, AGENT_PAUSED, ALL_AGENTS};

/// Longest pause reason kept (bytes); a longer one is refused.
const MAX_REASON_LEN: usize = 500;

/// Most pending requests one pause sweeps (each agent has at most
/// `max_pending`; this bounds a single read).
const SWEEP_LIMIT: u32 = 100_000;

/// What `agent.pause` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PauseAnswer {
    /// The agent, or `*` for every agent.
    pub agent: String,
    /// `false`: it was already paused (the pause in force is unchanged).
    pub paused: bool,
    /// The pause in force: who, since when, why.
    pub pause: Pause,
    /// Pending requests cancelled by this call.
    pub cancelled: usize,
    /// Runs of the agent that were running, killed by this call.
    pub killed_runs: usize,
}

/// What `agent.resume` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeAnswer {
    /// The agent, or `*` for the global pause.
    pub agent: String,
    /// `false`: it was not paused.
    pub resumed: bool,
    /// The agent is still stopped by the global pause (or, after a
    /// resume-all, by its own).
    pub still_paused_by: Option<Pause>,
}

/// One configured agent, as `agent.list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: String,
    /// The pause that stops it (its own, or the global one), if any.
    pub paused: Option<Pause>,
}

impl Gateway {
    /// The pause in force for `agent` in this process's policy view.
    pub(super) fn pause_of(&self, agent: &str) -> Option<Pause> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        policy::pause_for(&view.pauses, agent).cloned()
    }

    /// The pauses this process's policy view holds.
    pub(super) fn pauses_in_view(&self) -> Vec<Pause> {
        self.view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .pauses
            .clone()
    }

    /// Sweeps the pending requests of every pause in the view that is not
    /// in `before` (after a refresh, and at start with none before: a pause
    /// whose sweep was cut short by a crash is finished then). Failures are
    /// logged: the pause itself already denies every new call.
    pub(super) async fn sweep_new_pauses(&self, before: &[Pause]) {
        for p in self.pauses_in_view() {
            if before.iter().any(|b| b.agent == p.agent) {
                continue;
            }
            if let Err(e) = self.sweep_paused(&p.agent, &p).await {
                tracing::error!(agent = %p.agent, error = %e, "cannot cancel a paused agent's pending requests (retried at the next policy change)");
            }
        }
    }

    /// The agent a pause or resume names: a configured agent, or
    /// [`ALL_AGENTS`] for `None`.
    fn pause_target(&self, agent: Option<&str>) -> Result<String, AppError> {
        match agent {
            None => Ok(ALL_AGENTS.to_string()),
            Some(name) => {
                if self.live().agent(name).is_none() {
                    let shown: String = name.chars().take(64).collect();
                    return Err(AppError::UnknownAgent(shown.escape_debug().to_string()));
                }
                Ok(name.to_string())
            }
        }
    }

    /// Pauses `agent` (every agent with `None`): persisted, audited
    /// (`agent_paused`), in force in this process before it returns (and in
    /// every other on its `PolicyChanged`), and every pending request it
    /// covers is cancelled with the pause's reason. Pausing a paused agent
    /// changes nothing but still sweeps its pending requests.
    pub async fn pause_agent(
        &self,
        agent: Option<&str>,
        reason: Option<String>,
        by: &str,
    ) -> Result<PauseAnswer, AppError> {
        let target = self.pause_target(agent)?;
        let reason = match reason.map(|r| r.trim().to_string()) {
            Some(r) if r.len() > MAX_REASON_LEN => {
                return Err(bad(format!(
                    "`reason` is {} bytes; the limit is {MAX_REASON_LEN}",
                    r.len()
                )))
            }
            Some(r) if r.chars().any(char::is_control) => {
                return Err(bad("`reason` must not hold control characters"))
            }
            Some(r) if !r.is_empty() => Some(self.redactor.redact_text(&r).0),
            _ => None,
        };
        let now = now_ms();
        let pause = Pause {
            agent: target.clone(),
            paused_by: by.to_string(),
            since_ms: now,
            reason: reason.clone(),
        };
        // What this pause will cancel, read before it is stored: the
        // follower may sweep them first when it hears of the pause.
        let covered: Vec<RequestId> = self
            .store
            .pending(SWEEP_LIMIT)
            .await?
            .into_iter()
            .filter(|r| target == ALL_AGENTS || r.agent == target)
            .map(|r| r.id)
            .collect();
        let audit = events::agent_paused(now, by, &target, reason.as_deref());
        let paused = self.store.pause_agent(pause.clone(), audit).await?;
        // From here on this process denies the agent's calls.
        self.refresh_policy().await?;
        let in_force = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            view.pauses.iter().find(|p| p.agent == target).cloned()
        }
        .unwrap_or(pause);
        tracing::warn!(agent = %target, by = %by, newly = paused, "agent paused: its calls are denied");
        let swept = self.sweep_paused(&target, &in_force).await?;
        // Counted whichever sweep (this one or the follower's) cancelled them.
        let mut cancelled = 0;
        for id in covered {
            if let Some(r) = self.store.get_request(id).await? {
                if r.state == State::Cancelled
                    && r.decided_reason
                        .as_deref()
                        .is_some_and(|why| why.starts_with(AGENT_PAUSED))
                {
                    cancelled += 1;
                }
            }
        }
        let cancelled = cancelled.max(swept);
        // A paused agent's runs stop too: each is killed wherever it runs.
        let mut killed_runs = 0;
        for run in self.runs(true, 1000).await? {
            if target == ALL_AGENTS || run.agent == target {
                match self.kill_run(&run.id, by).await {
                    Ok(_) => killed_runs += 1,
                    Err(e) => {
                        tracing::warn!(run.id = %run.id, error = %e, "pause: run not killed")
                    }
                }
            }
        }
        Ok(PauseAnswer {
            agent: target,
            paused,
            pause: in_force,
            cancelled,
            killed_runs,
        })
    }

    /// Cancels every pending request of `target` (of every agent for
    /// [`ALL_AGENTS`]) with the pause's reason. The store publishes each
    /// cancel, so the agents waiting on them are answered at once.
    async fn sweep_paused(&self, target: &str, pause: &Pause) -> Result<usize, AppError> {
        let pending = self.store.pending(SWEEP_LIMIT).await?;
        let mut cancelled = 0;
        for r in pending
            .into_iter()
            .filter(|r| target == ALL_AGENTS || r.agent == target)
        {
            if self.cancel_paused(r.id, pause).await?.state == State::Cancelled {
                cancelled += 1;
            }
        }
        Ok(cancelled)
    }

    /// Cancels one pending request because its agent is paused (audited
    /// like any cancel, by whoever paused it). Already decided: returned
    /// as it is.
    pub(super) async fn cancel_paused(
        &self,
        id: RequestId,
        pause: &Pause,
    ) -> Result<ApprovalRequest, AppError> {
        let reason = format!("{AGENT_PAUSED}: {}", pause.detail());
        match self
            .store
            .cancel(id, pause.paused_by.clone(), Some(reason), now_ms())
            .await?
        {
            Ok(r) => {
                tracing::info!(request.id = %r.id, agent = %r.agent, "cancelled: its agent is paused");
                Ok(r)
            }
            Err(_) => self
                .store
                .get_request(id)
                .await?
                .ok_or_else(|| AppError::NotFound(id.to_string())),
        }
    }

    /// Lifts the pause of `agent` (the global pause with `None`), audited
    /// (`agent_resumed`). Its calls are decided by the policy again from
    /// the next one, unless another pause still covers it.
    pub async fn resume_agent(
        &self,
        agent: Option<&str>,
        by: &str,
    ) -> Result<ResumeAnswer, AppError> {
        let target = self.pause_target(agent)?;
        let audit = events::agent_resumed(now_ms(), by, &target);
        let resumed = self.store.resume_agent(target.clone(), audit).await?;
        self.refresh_policy().await?;
        if resumed {
            tracing::warn!(agent = %target, by = %by, "agent resumed");
        }
        let still_paused_by = if target == ALL_AGENTS {
            None
        } else {
            self.pause_of(&target)
        };
        Ok(ResumeAnswer {
            agent: target,
            resumed,
            still_paused_by,
        })
    }

    /// Every configured agent with the pause that stops it, and the global
    /// pause if one is in force. Read from the store, not the view, so an
    /// admin sees what is persisted.
    pub async fn agent_statuses(&self) -> Result<(Vec<AgentStatus>, Option<Pause>), AppError> {
        let pauses = self.store.pauses().await?;
        let global = pauses.iter().find(|p| p.is_global()).cloned();
        let agents = self
            .live()
            .agents
            .iter()
            .map(|a| AgentStatus {
                name: a.name.clone(),
                paused: policy::pause_for(&pauses, &a.name).cloned(),
            })
            .collect();
        Ok((agents, global))
    }
}
