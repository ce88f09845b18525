//! The escalation ladder's use-case: which steps are due for the pending
//! requests (timing by [`crate::domain::escalation`]), claiming a step in
//! the store with its `escalated` audit entry before anyone is pinged, and
//! what the Discord adapter needs to send and show it. Sending is the
//! adapter's (`src/discord/escalation.rs`); nothing here pings anyone.

use super::ports::{EscalationRecord, StoreResult};
use super::Gateway;
use crate::domain::escalation::{self, Step};
use crate::domain::request::{ApprovalRequest, RequestId};
use crate::domain::Risk;
use std::collections::HashMap;

/// Pending requests looked at per pass (oldest deadline first): the most
/// any number of agents may have waiting is far below this in practice.
pub const MAX_REQUESTS: u32 = 10_000;
/// Fired steps read per pass.
const MAX_RECORDS: u32 = MAX_REQUESTS * escalation::MAX_STEPS as u32;

/// A step to send: due now (not claimed yet) or claimed and not yet sent.
#[derive(Debug, Clone)]
pub struct EscalationJob {
    pub request: ApprovalRequest,
    pub record: EscalationRecord,
}

/// What one pass of the escalation worker finds.
#[derive(Debug, Clone, Default)]
pub struct EscalationPass {
    /// Steps due now, not claimed yet, in firing order per request.
    pub due: Vec<EscalationJob>,
    /// Steps claimed earlier whose message(s) never reached Discord (a
    /// failure, a crash, a change of leader): to send again.
    pub unsent: Vec<EscalationJob>,
    /// When the next step of a pending request comes due.
    pub next_ms: Option<i64>,
}

impl Gateway {
    /// The steps for a request of `risk`: `[risk.critical]`'s for critical
    /// requests, `[risk.high]`'s for every other request that waits (they
    /// wait by its timeout too). Validated when the config was loaded.
    pub fn escalation_ladder(&self, risk: Risk) -> Vec<Step> {
        let (level, r) = match risk {
            Risk::Critical => ("critical", &self.cfg.risk.critical),
            _ => ("high", &self.cfg.risk.high),
        };
        escalation::parse_ladder(
            &format!("risk.{level}.escalation"),
            &r.escalation,
            r.timeout.0,
        )
        .unwrap_or_else(|(key, e)| {
            tracing::error!(key = %key, error = %e, "escalation steps refused; none run for this level");
            Vec::new()
        })
    }

    /// Whether any level has escalation steps.
    pub fn escalation_configured(&self) -> bool {
        !(self.cfg.risk.high.escalation.is_empty() && self.cfg.risk.critical.escalation.is_empty())
    }

    /// The role that may decide `req`: the admin role for an admins-only
    /// request, the approver role otherwise (what a re-ping pings).
    pub fn deciding_role(&self, req: &ApprovalRequest) -> Option<u64> {
        let d = &self.cfg.discord;
        if req.admin_only {
            d.admin_role_id
        } else {
            d.approver_role_id
        }
    }

    /// Reads the pending requests and the steps they fired, and finds the
    /// steps due at `now_ms`, those claimed but never sent, and when the
    /// next step comes due. A request past its deadline gets no step (the
    /// deadline sweep ends it).
    pub async fn escalation_pass(&self, now_ms: i64) -> StoreResult<EscalationPass> {
        let mut pass = EscalationPass::default();
        if !self.escalation_configured() {
            return Ok(pass);
        }
        let ladders = [
            (Risk::High, self.escalation_ladder(Risk::High)),
            (Risk::Critical, self.escalation_ladder(Risk::Critical)),
        ];
        let mut fired: HashMap<RequestId, Vec<EscalationRecord>> = HashMap::new();
        for r in self.store.pending_escalations(MAX_RECORDS).await? {
            fired.entry(r.request_id).or_default().push(r);
        }
        for req in self.store.pending(MAX_REQUESTS).await? {
            let records = fired.remove(&req.id).unwrap_or_default();
            for r in records.iter().filter(|r| r.sent_ms.is_none()) {
                pass.unsent.push(EscalationJob {
                    request: req.clone(),
                    record: r.clone(),
                });
            }
            if req.deadline_ms <= now_ms {
                continue;
            }
            let steps = if req.risk == Risk::Critical {
                &ladders[1].1
            } else {
                &ladders[0].1
            };
            if steps.is_empty() {
                continue;
            }
            let done: Vec<usize> = records.iter().map(|r| r.step as usize).collect();
            let plan = escalation::plan(steps, req.created_ms, req.deadline_ms, &done, now_ms);
            if let Some(n) = plan.next_ms {
                pass.next_ms = Some(pass.next_ms.map_or(n, |m| m.min(n)));
            }
            let deciders = self.deciding_role(&req);
            for i in plan.due {
                let step = &steps[i];
                pass.due.push(EscalationJob {
                    record: EscalationRecord {
                        request_id: req.id,
                        step: i as u32,
                        action: step.action.as_str().into(),
                        targets: step.targets(deciders),
                        claimed_ms: now_ms,
                        sent_ms: None,
                    },
                    request: req.clone(),
                });
            }
        }
        Ok(pass)
    }

    /// Claims a due step (and audits it as `escalated`, and marks the card
    /// due so it shows it) before anyone is pinged. `false`: it was claimed
    /// already, or the request is no longer pending; send nothing then.
    pub async fn claim_escalation(&self, job: &EscalationJob) -> StoreResult<bool> {
        let r = &job.record;
        let action = self
            .escalation_ladder(job.request.risk)
            .get(r.step as usize)
            .map(|s| s.action.clone());
        let Some(action) = action else {
            return Ok(false);
        };
        let audit = escalation::audited(
            r.claimed_ms,
            &r.request_id.to_string(),
            r.step as usize,
            &action,
            &r.targets,
        );
        self.store.claim_escalation(r.clone(), audit).await
    }

    /// Records that a claimed step's message(s) reached Discord.
    pub async fn escalation_sent(&self, id: RequestId, step: u32, at_ms: i64) -> StoreResult<()> {
        self.store.escalation_sent(id, step, at_ms).await
    }

    /// The steps fired for a request (for its card).
    pub async fn escalations_of(&self, id: RequestId) -> StoreResult<Vec<EscalationRecord>> {
        self.store.escalations_of(id).await
    }
}
