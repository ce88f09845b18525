//! The `escalations` row, shared by both backends (same columns, same SQL
//! text for reads): each (request, step) of the escalation ladder that
//! fired, mapped to the port's type.

use crate::app::ports::{EscalationRecord, StoreError, StoreResult};
use crate::domain::escalation::Targets;
use crate::domain::request::RequestId;

/// The claim: stored only while the request is pending, and only once per
/// (request, step) (`$n` placeholders work in SQLite too).
pub(crate) const CLAIM: &str = "INSERT INTO escalations \
     (request_id, step, action, targets, claimed_ms) \
     SELECT $1, $2, $3, $4, $5 WHERE EXISTS \
     (SELECT 1 FROM requests WHERE id = $1 AND state = 'pending') \
     ON CONFLICT (request_id, step) DO NOTHING";

/// Marks the request's card due again, if it has one (it shows the step).
pub(crate) const BUMP_CARD: &str = "UPDATE discord_cards \
     SET want = want + 1, attempts = 0, next_attempt_ms = 0 WHERE request_id = $1";

/// Records a step's message(s) as sent (the first time counts). Binds:
/// sent_ms, request_id, step (SQLite numbers `$n` by first appearance).
pub(crate) const SENT: &str = "UPDATE escalations SET sent_ms = COALESCE(sent_ms, $1) \
     WHERE request_id = $2 AND step = $3";

const COLUMNS: &str = "e.request_id, e.step, e.action, e.targets, e.claimed_ms, e.sent_ms";

/// The steps fired for one request.
pub(crate) fn of_request() -> String {
    format!("SELECT {COLUMNS} FROM escalations e WHERE e.request_id = $1 ORDER BY e.step")
}

/// The steps fired for requests still pending, oldest claim first.
pub(crate) fn of_pending() -> String {
    format!(
        "SELECT {COLUMNS} FROM escalations e JOIN requests r ON r.id = e.request_id \
         WHERE r.state = 'pending' ORDER BY e.claimed_ms, e.request_id, e.step LIMIT $1"
    )
}

/// One stored row.
#[derive(sqlx::FromRow)]
pub(crate) struct EscalationRow {
    request_id: String,
    step: i64,
    action: String,
    targets: String,
    claimed_ms: i64,
    sent_ms: Option<i64>,
}

impl EscalationRow {
    /// The record, or `Corrupt` for a row this version cannot read.
    pub(crate) fn into_record(self) -> StoreResult<EscalationRecord> {
        let targets: Targets = serde_json::from_str(&self.targets)
            .map_err(|e| StoreError::Corrupt(format!("escalation targets: {e}")))?;
        Ok(EscalationRecord {
            request_id: self.request_id.parse().map_err(StoreError::Corrupt)?,
            step: u32::try_from(self.step)
                .map_err(|_| StoreError::Corrupt(format!("escalation step {}", self.step)))?,
            action: self.action,
            targets,
            claimed_ms: self.claimed_ms,
            sent_ms: self.sent_ms,
        })
    }
}

/// The targets as stored.
pub(crate) fn targets_json(t: &Targets) -> String {
    serde_json::to_string(t).unwrap_or_else(|_| "{}".into())
}

/// The request id as stored.
pub(crate) fn id(r: RequestId) -> String {
    r.to_string()
}
