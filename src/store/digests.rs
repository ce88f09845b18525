//! The flood-digest rows (`discord_digests`, `discord_digest_members`),
//! shared by both backends: the reads' SQL text (`$n` placeholders work in
//! SQLite too) and the row mapped to the app's [`DigestRow`].

use crate::app::digests::DigestRow;
use crate::app::ports::{StoreError, StoreResult};
use crate::domain::digest::Waiting;

/// Live digests with their pending counts, oldest first.
pub(crate) const LIVE: &str = "SELECT d.id, d.channel_id, d.agent, d.tool, d.message_id, \
     d.members, d.rendered, d.open_until_ms, d.attempts, d.next_attempt_ms, d.created_ms, \
     (SELECT COUNT(*) FROM discord_digest_members m JOIN requests r ON r.id = m.request_id \
      WHERE m.digest_id = d.id AND r.state = 'pending') AS pending \
     FROM discord_digests d WHERE d.finished = 0 ORDER BY d.created_ms, d.id";

/// One digest by id, as [`LIVE`] reads it (finished or not).
pub(crate) const ONE: &str = "SELECT d.id, d.channel_id, d.agent, d.tool, d.message_id, \
     d.members, d.rendered, d.open_until_ms, d.attempts, d.next_attempt_ms, d.created_ms, \
     (SELECT COUNT(*) FROM discord_digest_members m JOIN requests r ON r.id = m.request_id \
      WHERE m.digest_id = d.id AND r.state = 'pending') AS pending \
     FROM discord_digests d WHERE d.id = $1";

/// Cards of pending requests never posted, oldest deadline first.
pub(crate) const WAITING: &str = "SELECT c.request_id, r.agent, r.tool FROM discord_cards c \
     JOIN requests r ON r.id = c.request_id WHERE c.message_id IS NULL AND r.state = 'pending' \
     ORDER BY c.deadline_ms, c.request_id LIMIT $1";

/// How many cards [`WAITING`] would read without its limit.
pub(crate) const WAITING_COUNT: &str = "SELECT COUNT(*) FROM discord_cards c \
     JOIN requests r ON r.id = c.request_id WHERE c.message_id IS NULL AND r.state = 'pending'";

/// A digest's requests in joining order.
pub(crate) const MEMBERS: &str = "SELECT r.* FROM discord_digest_members m \
     JOIN requests r ON r.id = m.request_id WHERE m.digest_id = $1 ORDER BY m.seq";

#[derive(sqlx::FromRow)]
pub(crate) struct DigestDbRow {
    id: String,
    channel_id: i64,
    agent: String,
    tool: String,
    message_id: Option<i64>,
    members: i64,
    rendered: Option<String>,
    open_until_ms: i64,
    attempts: i64,
    next_attempt_ms: i64,
    created_ms: i64,
    pending: i64,
}

impl DigestDbRow {
    pub(crate) fn into_digest(self) -> StoreResult<DigestRow> {
        Ok(DigestRow {
            id: self
                .id
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("digest id `{}`", self.id)))?,
            channel_id: self.channel_id as u64,
            agent: self.agent,
            tool: self.tool,
            message_id: self.message_id.map(|m| m as u64),
            members: self.members.clamp(0, i64::from(u32::MAX)) as u32,
            pending: self.pending.clamp(0, i64::from(u32::MAX)) as u32,
            rendered: self.rendered,
            open_until_ms: self.open_until_ms,
            attempts: self.attempts,
            next_attempt_ms: self.next_attempt_ms,
            created_ms: self.created_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct WaitingRow {
    request_id: String,
    agent: String,
    tool: String,
}

impl WaitingRow {
    pub(crate) fn into_waiting(self) -> StoreResult<Waiting> {
        Ok(Waiting {
            request_id: self.request_id.parse().map_err(StoreError::Corrupt)?,
            agent: self.agent,
            tool: self.tool,
        })
    }
}
