//! The `timed_grants` row, shared by both backends (same columns, same SQL
//! text): time-boxed grants as stored, mapped to the domain's type.

use crate::app::ports::{StoreError, StoreResult};
use crate::domain::timed::TimedGrant;

/// Columns of `timed_grants`, in the order [`SELECT`] reads them.
pub(crate) const SELECT: &str = "SELECT id, agent, tool, kind, user_id, args_hash, expires_ms, \
     created_by, created_ms, origin_request, by_admin FROM timed_grants ORDER BY created_ms, id";

/// The insert both backends run (`$n` placeholders work in SQLite too).
pub(crate) const INSERT: &str = "INSERT INTO timed_grants (id, agent, tool, kind, user_id, \
     args_hash, expires_ms, created_by, created_ms, origin_request, by_admin) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// The delete by id.
pub(crate) const DELETE: &str = "DELETE FROM timed_grants WHERE id = $1";

/// One stored row.
#[derive(sqlx::FromRow)]
pub(crate) struct TimedRow {
    id: String,
    agent: String,
    tool: String,
    kind: String,
    user_id: Option<String>,
    args_hash: Option<String>,
    expires_ms: Option<i64>,
    created_by: String,
    created_ms: i64,
    origin_request: String,
    by_admin: i64,
}

impl TimedRow {
    /// The grant, or `Corrupt` for a kind this version does not know (a
    /// grant it cannot read is not silently widened or dropped).
    pub(crate) fn into_grant(self) -> StoreResult<TimedGrant> {
        Ok(TimedGrant {
            id: self.id,
            agent: self.agent,
            tool: self.tool,
            kind: self.kind.parse().map_err(StoreError::Corrupt)?,
            user_id: self.user_id,
            args_hash: self.args_hash,
            expires_ms: self.expires_ms,
            created_by: self.created_by,
            created_ms: self.created_ms,
            origin_request: self.origin_request,
            by_admin: self.by_admin != 0,
        })
    }
}
