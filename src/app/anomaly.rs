//! Anomaly alerts on the submit path: every call (and every denial or
//! timeout) goes through the pure detector (`domain::anomaly`); a match
//! becomes an alert, persisted before anything is posted (the Discord
//! adapter posts what the store holds), logged and audited (`anomaly`)
//! when it opens. A rule's action may send the agent's calls to a person
//! for a while (`raise_risk`) or pause the agent (`pause`, by `anomaly`).
//!
//! Advisory, never in the way: an error in the detector's store work is
//! logged and the call goes on as the policy decides. Only the configured
//! actions change a call, and if the pause they ask for fails, the call is
//! denied (fail closed).

use super::pauses::PauseAnswer;
use super::ports::Alert;
use super::*;
use crate::domain::anomaly::{Action, CallSeen, Detector, Hit, Rules, ANOMALY_RULE};
use crate::domain::audit::AuditEvent;
use crate::domain::policy::AGENT_PAUSED;
use std::collections::HashSet;

/// (agent, tool) pairs known to be stored as seen, at most; past it the
/// set starts again (the store still knows them: one more read each).
const MAX_SEEN_CACHE: usize = 50_000;
/// Longest detail kept in an alert (characters).
const MAX_DETAIL: usize = 400;
/// Alerts listed at most by `alerts.list`.
pub const MAX_ALERTS_LISTED: u32 = 1000;

/// The anomaly rules in force in this process and their state.
pub(super) struct AnomalyWatch {
    detector: Mutex<Detector>,
    /// How long `raise_risk` lasts (the rules are read at start only).
    raise_for_ms: i64,
    /// Some rule's action is `raise_risk`.
    raises_risk: bool,
    /// The new-tool rule is on.
    new_tool_on: bool,
    seen: Mutex<HashSet<(String, String)>>,
    /// Agent → (until, why): `raise_risk` in force, from this process's
    /// matches and from the store (see [`refresh_raised`]).
    raised: Arc<Mutex<Raised>>,
    /// The stored `raise_risk` alerts were read once (before the first call
    /// is decided, so a restart does not lift a raised risk).
    restored: tokio::sync::OnceCell<()>,
    /// Starts [`refresh_raised`] with the first call.
    refresher: std::sync::Once,
    /// Pokes whatever posts alerts (the Discord adapter).
    due: Arc<Notify>,
    /// Alert writes not yet made, by alert id: a storm's count updates
    /// collapse into one write per alert per flush.
    unwritten: Arc<Mutex<Unwritten>>,
    /// Wakes the writer of `unwritten`, started with the first alert.
    write_due: Arc<Notify>,
    writer: std::sync::Once,
}

/// Agent → (until, why) of a raised risk.
type Raised = HashMap<String, (i64, String)>;

/// How often the stored `raise_risk` alerts are read again, so a risk
/// raised by another process on the same database holds here too.
const RAISED_REFRESH: Duration = Duration::from_secs(1);
/// Stored `raise_risk` alerts read at a time, at most.
const MAX_RAISED_READ: u32 = 1000;

/// Takes stored `raise_risk` alerts into `raised`: each holds until its
/// latest match plus `raise_for_ms`; a later end wins.
fn merge_raised(raised: &Mutex<Raised>, alerts: Vec<Alert>, raise_for_ms: i64, now: i64) {
    let mut m = raised.lock().unwrap_or_else(|e| e.into_inner());
    m.retain(|_, (until, _)| *until > now);
    for alert in alerts {
        let until = alert.updated_ms.saturating_add(raise_for_ms);
        if until <= now || m.get(&alert.agent).is_some_and(|(u, _)| *u >= until) {
            continue;
        }
        let rule = crate::domain::anomaly::RuleKind::ALL
            .into_iter()
            .find(|r| r.as_str() == alert.rule)
            .map_or(alert.rule.as_str(), |r| r.describe());
        let why = format!("{rule} ({})", alert.detail);
        m.insert(alert.agent, (until, why));
    }
}

/// Reads the stored `raise_risk` alerts every [`RAISED_REFRESH`] until the
/// process ends.
async fn refresh_raised(store: Arc<dyn Store>, raised: Arc<Mutex<Raised>>, raise_for_ms: i64) {
    loop {
        tokio::time::sleep(RAISED_REFRESH).await;
        let now = now_ms();
        match store
            .raised_alerts(now.saturating_sub(raise_for_ms), MAX_RAISED_READ)
            .await
        {
            Ok(alerts) => merge_raised(&raised, alerts, raise_for_ms, now),
            Err(e) => {
                tracing::warn!(error = %e, "anomaly: cannot read raised risks; retrying")
            }
        }
    }
}

/// Alert writes waiting, by alert id: the alert's latest state, and its
/// audit line (when it opened).
type Unwritten = HashMap<String, (Alert, Option<AuditEvent>)>;

/// Most alerts waiting to be written; past it a match is written by the
/// submit path itself (never dropped).
const MAX_UNWRITTEN: usize = 10_000;

impl AnomalyWatch {
    /// `None` when no rule is configured.
    pub(super) fn new(rules: Rules) -> Option<AnomalyWatch> {
        rules.any().then(|| AnomalyWatch {
            raise_for_ms: rules.raise_for_ms,
            raises_risk: rules.raises_risk(),
            new_tool_on: rules.new_tool.is_some(),
            detector: Mutex::new(Detector::new(rules)),
            seen: Mutex::default(),
            raised: Arc::default(),
            restored: tokio::sync::OnceCell::new(),
            refresher: std::sync::Once::new(),
            due: Arc::new(Notify::new()),
            unwritten: Arc::default(),
            write_due: Arc::new(Notify::new()),
            writer: std::sync::Once::new(),
        })
    }
}

/// Writes queued alerts until the process ends: each pass takes every
/// queued alert (the latest state of each) and stores it, then pokes the
/// alert poster.
async fn write_alerts(
    store: Arc<dyn Store>,
    unwritten: Arc<Mutex<Unwritten>>,
    write_due: Arc<Notify>,
    due: Arc<Notify>,
) {
    loop {
        write_due.notified().await;
        let batch: Vec<(Alert, Option<AuditEvent>)> = unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, v)| v)
            .collect();
        for (alert, audit) in batch {
            if let Err(e) = store.record_alert(alert, audit).await {
                tracing::error!(error = %e, "anomaly: cannot store an alert");
            }
        }
        due.notify_one();
    }
}

fn new_id() -> String {
    Uuid::now_v7().to_string()
}

/// What the anomaly rules do to one call before the policy sees it.
#[derive(Debug, Default)]
pub(super) struct AnomalyEffect {
    /// `raise_risk` in force: a person decides (rule `anomaly`).
    pub(super) force_ask: Option<(String, String)>,
    /// A `pause` action failed: deny (fail closed).
    pub(super) force_deny: Option<(String, String)>,
}

fn clip(s: &str) -> String {
    s.chars().take(MAX_DETAIL).collect()
}

impl Gateway {
    /// Pokes the alert poster whenever an alert is stored or changes;
    /// `None` when no anomaly rule is configured.
    pub fn alerts_wake(&self) -> Option<Arc<Notify>> {
        self.anomaly.as_ref().map(|a| a.due.clone())
    }

    /// The newest alerts first (at most [`MAX_ALERTS_LISTED`]).
    pub async fn alerts(&self, limit: u32) -> Result<Vec<Alert>, AppError> {
        Ok(self.store.alerts(limit.min(MAX_ALERTS_LISTED)).await?)
    }

    /// One alert.
    pub async fn alert(&self, id: &str) -> Result<Option<Alert>, AppError> {
        Ok(self.store.alert(id).await?)
    }

    /// Alerts whose message is due (new or changed since posted), updated
    /// at or after `since_ms`, oldest first.
    pub async fn alerts_due(&self, since_ms: i64, limit: u32) -> Result<Vec<Alert>, AppError> {
        Ok(self.store.alerts_due(since_ms, limit).await?)
    }

    /// Records an alert's message as posted at `version`.
    pub async fn alert_posted(
        &self,
        id: &str,
        message_id: u64,
        version: i64,
    ) -> Result<(), AppError> {
        Ok(self.store.alert_posted(id, message_id, version).await?)
    }

    /// The Pause agent button of an alert (the caller checked that `by` is
    /// an admin): pauses the alert's agent with a reason naming the alert,
    /// and records on the alert who paused (its message then says so).
    pub async fn pause_from_alert(
        &self,
        alert_id: &str,
        by: &str,
    ) -> Result<(Alert, PauseAnswer), AppError> {
        let alert = self
            .store
            .alert(alert_id)
            .await?
            .ok_or_else(|| AppError::NotFound(alert_id.to_string()))?;
        let reason = clip(&format!(
            "anomaly alert {} ({}): {}",
            alert.id, alert.rule, alert.detail
        ));
        let answer = self
            .pause_agent(Some(&alert.agent), Some(reason), by)
            .await?;
        // Already paused: the alert names who did.
        self.store
            .alert_paused(&alert.id, answer.pause.paused_by.clone(), now_ms())
            .await?;
        if let Some(a) = &self.anomaly {
            a.due.notify_one();
        }
        let alert = self.store.alert(alert_id).await?.unwrap_or(alert);
        Ok((alert, answer))
    }

    /// Runs the call through the rules before the policy decides it: the
    /// rate, repeat, off-hours and new-tool rules, their actions, and
    /// `raise_risk` in force for the agent.
    pub(super) async fn anomaly_on_call(&self, agent: &str, s: &Submission) -> AnomalyEffect {
        let Some(a) = &self.anomaly else {
            return AnomalyEffect::default();
        };
        let now = now_ms();
        let args_hash = redact::args_hash(&s.args);
        let mut hits = a
            .detector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_call(
                CallSeen {
                    agent,
                    tool: &s.tool,
                    args_hash: &args_hash,
                },
                now,
                &mut new_id,
            );
        if let Some(hit) = self.new_tool(a, agent, &s.tool, now).await {
            hits.push(hit);
        }
        let mut effect = self.anomaly_act(hits).await;
        // Risks raised before a restart, or by another process.
        if a.raises_risk {
            let raise_for = a.raise_for_ms;
            let restored = a
                .restored
                .get_or_try_init(|| async {
                    let alerts = self
                        .store
                        .raised_alerts(now.saturating_sub(raise_for), MAX_RAISED_READ)
                        .await?;
                    merge_raised(&a.raised, alerts, raise_for, now);
                    Ok::<(), StoreError>(())
                })
                .await;
            if let Err(e) = restored {
                // Unknown whether a risk is raised: a person decides.
                tracing::error!(error = %e, "anomaly: cannot read raised risks; this call asks a person (read again at the next call)");
                effect.force_ask = Some((
                    ANOMALY_RULE.to_string(),
                    "anomaly: the raised risks could not be read, so a person decides".to_string(),
                ));
            }
            a.refresher.call_once(|| {
                tokio::spawn(refresh_raised(
                    self.store.clone(),
                    a.raised.clone(),
                    raise_for,
                ));
            });
        }
        let raised = a
            .raised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
            .filter(|(until, _)| *until > now)
            .cloned();
        if let Some((until, why)) = raised {
            let left = crate::domain::anomaly::duration_label(((until - now) / 1000 + 1) * 1000);
            effect.force_ask = Some((
                ANOMALY_RULE.to_string(),
                format!(
                    "anomaly alert: {why}; every call of this agent asks a person for {left} more"
                ),
            ));
        }
        effect
    }

    /// The new-tool rule: the store says whether the pair is new (and the
    /// agent's first call, for `learn_for`); a store error is logged and
    /// the call goes on.
    async fn new_tool(&self, a: &AnomalyWatch, agent: &str, tool: &str, now: i64) -> Option<Hit> {
        if !a.new_tool_on {
            return None;
        }
        let key = (agent.to_string(), tool.to_string());
        if a.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
        {
            return None;
        }
        let first = match self.store.note_tool_seen(agent, tool, now).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(agent = %agent, tool = %tool, error = %e, "anomaly: cannot record a tool as seen (the call goes on)");
                return None;
            }
        };
        {
            let mut seen = a.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() >= MAX_SEEN_CACHE {
                seen.clear();
            }
            seen.insert(key);
        }
        let first = first?;
        a.detector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_new_tool(agent, tool, first, now, &mut new_id)
    }

    /// A call of `agent` was denied (by the policy or a person) or timed
    /// out: the denials rule. Denials of a paused agent are not counted
    /// (the pause explains them).
    pub(super) async fn anomaly_on_denial(&self, r: &ApprovalRequest) {
        let Some(a) = &self.anomaly else {
            return;
        };
        if r.rule == AGENT_PAUSED
            || r.decided_reason
                .as_deref()
                .is_some_and(|w| w.starts_with(AGENT_PAUSED))
        {
            return;
        }
        let what = match (r.state, r.decided_by) {
            (State::TimedOut, _) => format!("`{}` timed out", r.tool),
            (_, Some(DecidedBy::Policy)) => format!("`{}` denied by policy ({})", r.tool, r.rule),
            _ => format!("`{}` denied by a person", r.tool),
        };
        let hit = a
            .detector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_denial(&r.agent, &what, now_ms(), &mut new_id);
        if let Some(hit) = hit {
            let _ = self.anomaly_act(vec![hit]).await;
        }
    }

    /// Stores an alert that opens at once; queues a count update for the
    /// writer task (off the submit path; a later state of the same alert
    /// replaces an unwritten one, keeping its audit line). A full queue:
    /// written here.
    async fn queue_alert(&self, a: &AnomalyWatch, alert: Alert, audit: Option<AuditEvent>) {
        // An alert that opens (it carries its audit line) is stored before
        // the call that raised it is answered, so a crash right after
        // loses neither; only the count updates of a storm are coalesced.
        let audit = match audit {
            Some(event) => match self
                .store
                .record_alert(alert.clone(), Some(event.clone()))
                .await
            {
                Ok(()) => {
                    a.due.notify_one();
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "anomaly: cannot store an alert; queued to try again");
                    Some(event)
                }
            },
            None => None,
        };
        a.writer.call_once(|| {
            tokio::spawn(write_alerts(
                self.store.clone(),
                a.unwritten.clone(),
                a.write_due.clone(),
                a.due.clone(),
            ));
        });
        let overflow = {
            let mut q = a.unwritten.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((held, held_audit)) = q.get_mut(&alert.id) {
                if alert.count >= held.count {
                    held.count = alert.count;
                    held.detail = alert.detail;
                    held.updated_ms = held.updated_ms.max(alert.updated_ms);
                }
                if held_audit.is_none() {
                    *held_audit = audit;
                }
                None
            } else if q.len() < MAX_UNWRITTEN {
                q.insert(alert.id.clone(), (alert, audit));
                None
            } else {
                Some((alert, audit))
            }
        };
        match overflow {
            None => a.write_due.notify_one(),
            Some((alert, audit)) => {
                if let Err(e) = self.store.record_alert(alert, audit).await {
                    tracing::error!(error = %e, "anomaly: cannot store an alert");
                }
                a.due.notify_one();
            }
        }
    }

    /// Records each hit and carries out its action.
    async fn anomaly_act(&self, hits: Vec<Hit>) -> AnomalyEffect {
        let mut effect = AnomalyEffect::default();
        let Some(a) = &self.anomaly else {
            return effect;
        };
        let raise_for = a.raise_for_ms;
        for hit in hits {
            let now = now_ms();
            let detail = clip(&hit.detail);
            if hit.opened {
                tracing::warn!(agent = %hit.agent, rule = %hit.rule, action = hit.action.as_str(), detail = %detail, "ANOMALY");
            } else {
                tracing::debug!(agent = %hit.agent, rule = %hit.rule, count = hit.count, "anomaly: one more match");
            }
            let alert = Alert {
                id: hit.alert_id.clone(),
                agent: hit.agent.clone(),
                rule: hit.rule.as_str().to_string(),
                action: hit.action.as_str().to_string(),
                detail: detail.clone(),
                count: hit.count,
                opened_ms: hit.opened_ms,
                updated_ms: now,
                paused_by: None,
                version: 1,
                message_id: None,
                posted_version: 0,
            };
            let audit = hit
                .opened
                .then(|| events::anomaly(now, &hit.agent, hit.rule.as_str(), &detail, hit.count));
            match hit.action {
                // Already paused: nothing to do but count (off the path).
                Action::Pause if self.pause_of(&hit.agent).is_none() => {
                    // Persisted before the pause it causes.
                    if let Err(e) = self.store.record_alert(alert, audit).await {
                        tracing::error!(agent = %hit.agent, error = %e, "anomaly: cannot store an alert");
                    }
                    let reason = clip(&format!(
                        "anomaly alert {} ({}): {detail}",
                        hit.alert_id, hit.rule
                    ));
                    match self
                        .pause_agent(Some(&hit.agent), Some(reason), ANOMALY_RULE)
                        .await
                    {
                        Ok(_) => {
                            if let Err(e) = self
                                .store
                                .alert_paused(&hit.alert_id, ANOMALY_RULE.into(), now_ms())
                                .await
                            {
                                tracing::error!(error = %e, "anomaly: cannot record the pause on its alert");
                            }
                        }
                        Err(e) => {
                            tracing::error!(agent = %hit.agent, error = %e, "anomaly: THE AGENT COULD NOT BE PAUSED; its call is denied");
                            effect.force_deny = Some((
                                ANOMALY_RULE.to_string(),
                                format!(
                                    "anomaly alert ({}): the agent was to be paused and could not be, so the call is denied",
                                    hit.rule
                                ),
                            ));
                        }
                    }
                    a.due.notify_one();
                }
                Action::Pause | Action::RaiseRisk | Action::Alert => {
                    if hit.action == Action::RaiseRisk {
                        let why = format!("{} ({detail})", hit.rule.describe());
                        let mut raised = a.raised.lock().unwrap_or_else(|e| e.into_inner());
                        raised.retain(|_, (until, _)| *until > now);
                        raised.insert(hit.agent.clone(), (now + raise_for, why));
                    }
                    self.queue_alert(a, alert, audit).await;
                }
            }
        }
        effect
    }
}
