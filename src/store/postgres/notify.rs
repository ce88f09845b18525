//! What a PostgreSQL store tells the other processes sharing its database:
//! one note per committed change, sent with `pg_notify` inside the write's
//! transaction (so it is delivered on commit, never for a rolled-back
//! write), on one channel, as JSON tagged with the writing store's origin.

use crate::app::ports::StoreResult;
use crate::store::error::sqlx as db;

/// The channel every note is sent on.
pub const CHANNEL: &str = "keyturn_changes";

/// One committed change, as another process learns of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Note {
    Queued {
        id: String,
        agent: String,
        deadline_ms: i64,
    },
    Voted {
        id: String,
    },
    Resolved {
        id: String,
    },
    PolicyChanged,
    CardsDue,
}

/// A note with the id of the store that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    pub origin: String,
    #[serde(flatten)]
    pub note: Note,
}

/// Sends `note` from `origin` on [`CHANNEL`] (inside the caller's
/// transaction: delivered when it commits).
pub async fn send(conn: &mut sqlx::PgConnection, origin: &str, note: Note) -> StoreResult<()> {
    let payload = serde_json::to_string(&Envelope {
        origin: origin.to_string(),
        note,
    })
    .map_err(|e| crate::app::ports::StoreError::Failed(e.to_string()))?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// A payload as received, or `None` if it is not a note this build knows.
pub fn parse(payload: &str) -> Option<Envelope> {
    serde_json::from_str(payload).ok()
}
