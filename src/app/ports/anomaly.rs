//! The anomaly port: alerts (persisted before anything is posted, so a
//! restart or a Discord outage loses none) and the tools each agent has
//! been seen calling (so "new tool" holds across a restart).

use super::StoreResult;
use crate::domain::audit::AuditEvent;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Tools remembered per agent at most; past it a tool is not recorded (and
/// keeps counting as new, its alerts still one per window).
pub const MAX_SEEN_TOOLS_PER_AGENT: i64 = 10_000;

/// One alert: a rule that matched for an agent, with the matches counted in
/// its window, and where it was posted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub agent: String,
    /// The rule (`rate`, `denials`, `off_hours`, `new_tool`, `repeat`).
    pub rule: String,
    /// `alert`, `raise_risk` or `pause`.
    pub action: String,
    /// What was seen, as of the latest match (tool names and counts only).
    pub detail: String,
    /// Matches in the alert's window.
    pub count: u64,
    pub opened_ms: i64,
    pub updated_ms: i64,
    /// Who paused the agent from this alert (`discord:ID`), or `anomaly`
    /// for the `pause` action.
    pub paused_by: Option<String>,
    /// Raised by every change; the message is due while `posted_version`
    /// is below it.
    pub version: i64,
    /// The alert's message, once posted.
    pub message_id: Option<u64>,
    pub posted_version: i64,
}

#[async_trait]
pub trait Anomalies: Send + Sync + 'static {
    /// Stores a new alert or, for a known id, raises its count (never
    /// lowers it: writes may land out of order) and takes its detail;
    /// either way its version grows. `audit` is appended in the same
    /// transaction.
    async fn record_alert(&self, alert: Alert, audit: Option<AuditEvent>) -> StoreResult<()>;
    /// One alert.
    async fn alert(&self, id: &str) -> StoreResult<Option<Alert>>;
    /// The newest alerts first.
    async fn alerts(&self, limit: u32) -> StoreResult<Vec<Alert>>;
    /// Alerts whose message is not posted or not up to date, updated at
    /// or after `since_ms`, oldest first.
    async fn alerts_due(&self, since_ms: i64, limit: u32) -> StoreResult<Vec<Alert>>;
    /// `raise_risk` alerts with a match at or after `since_ms`, the latest
    /// first (so a restart, or another process on the same database,
    /// keeps the raised risk in force).
    async fn raised_alerts(&self, since_ms: i64, limit: u32) -> StoreResult<Vec<Alert>>;
    /// Records the message of an alert as posted at `version`.
    async fn alert_posted(&self, id: &str, message_id: u64, version: i64) -> StoreResult<()>;
    /// Records who paused the agent from the alert (first one kept);
    /// `false` if there is no such alert.
    async fn alert_paused(&self, id: &str, by: String, now_ms: i64) -> StoreResult<bool>;
    /// Notes that `agent` called `tool`. `None` if it was known; else when
    /// the agent was first seen calling anything (this call, for a new agent).
    async fn note_tool_seen(
        &self,
        agent: &str,
        tool: &str,
        now_ms: i64,
    ) -> StoreResult<Option<i64>>;
}
