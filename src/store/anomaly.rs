//! The `anomaly_alerts` and `anomaly_seen_tools` rows, shared by both
//! backends (same columns, same SQL text; `$n` placeholders work in SQLite
//! too), mapped to the port's [`Alert`].

use crate::app::ports::Alert;

const COLUMNS: &str = "id, agent, rule, action, detail, count, opened_ms, updated_ms, \
     paused_by, version, message_id, posted_version";

/// Inserts an alert, or raises a known one's count (never lowers it).
pub(crate) const UPSERT: &str = "INSERT INTO anomaly_alerts (id, agent, rule, action, detail, \
     count, opened_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (id) DO UPDATE SET \
     detail = CASE WHEN excluded.count >= anomaly_alerts.count THEN excluded.detail \
              ELSE anomaly_alerts.detail END, \
     count = CASE WHEN excluded.count > anomaly_alerts.count THEN excluded.count \
             ELSE anomaly_alerts.count END, \
     updated_ms = CASE WHEN excluded.updated_ms > anomaly_alerts.updated_ms \
                  THEN excluded.updated_ms ELSE anomaly_alerts.updated_ms END, \
     version = anomaly_alerts.version + 1";

/// Records a posted message at a version (never moves back).
pub(crate) const POSTED: &str = "UPDATE anomaly_alerts SET message_id = $2, \
     posted_version = CASE WHEN $3 > posted_version THEN $3 ELSE posted_version END \
     WHERE id = $1";

/// Records who paused from the alert (the first one kept); the message is due again.
pub(crate) const PAUSED: &str = "UPDATE anomaly_alerts SET \
     paused_by = COALESCE(paused_by, $2), version = version + 1, \
     updated_ms = CASE WHEN $3 > updated_ms THEN $3 ELSE updated_ms END WHERE id = $1";

pub(crate) const KNOWN_TOOL: &str =
    "SELECT first_ms FROM anomaly_seen_tools WHERE agent = $1 AND tool = $2";
pub(crate) const AGENT_TOOLS: &str =
    "SELECT COUNT(*), MIN(first_ms) FROM anomaly_seen_tools WHERE agent = $1";
pub(crate) const ADD_TOOL: &str = "INSERT INTO anomaly_seen_tools (agent, tool, first_ms) \
     VALUES ($1, $2, $3) ON CONFLICT (agent, tool) DO NOTHING";

pub(crate) fn select_one() -> String {
    format!("SELECT {COLUMNS} FROM anomaly_alerts WHERE id = $1")
}

pub(crate) fn select_newest() -> String {
    format!("SELECT {COLUMNS} FROM anomaly_alerts ORDER BY opened_ms DESC, id DESC LIMIT $1")
}

pub(crate) fn select_due() -> String {
    format!(
        "SELECT {COLUMNS} FROM anomaly_alerts WHERE posted_version < version \
         AND updated_ms >= $1 ORDER BY opened_ms, id LIMIT $2"
    )
}

/// `raise_risk` alerts with a match at or after `$1`, the latest first.
pub(crate) fn select_raised() -> String {
    format!(
        "SELECT {COLUMNS} FROM anomaly_alerts WHERE action = 'raise_risk' \
         AND updated_ms >= $1 ORDER BY updated_ms DESC, id LIMIT $2"
    )
}

/// One stored alert.
#[derive(sqlx::FromRow)]
pub(crate) struct AlertRow {
    id: String,
    agent: String,
    rule: String,
    action: String,
    detail: String,
    count: i64,
    opened_ms: i64,
    updated_ms: i64,
    paused_by: Option<String>,
    version: i64,
    message_id: Option<i64>,
    posted_version: i64,
}

impl AlertRow {
    pub(crate) fn into_alert(self) -> Alert {
        Alert {
            id: self.id,
            agent: self.agent,
            rule: self.rule,
            action: self.action,
            detail: self.detail,
            count: self.count.max(0) as u64,
            opened_ms: self.opened_ms,
            updated_ms: self.updated_ms,
            paused_by: self.paused_by,
            version: self.version,
            message_id: self.message_id.map(|m| m as u64),
            posted_version: self.posted_version,
        }
    }
}
