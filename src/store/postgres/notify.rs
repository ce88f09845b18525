//! What crosses processes on PostgreSQL: each write that publishes a
//! [`crate::app::ports::Change`] also sends a [`Note`] on [`CHANNEL`] with
//! `pg_notify` inside its own transaction, so it is delivered exactly when
//! (and only if) the write commits. A note carries ids only (a payload is
//! at most 8000 bytes); the listener re-reads the rows it names.

use crate::app::ports::StoreResult;
use crate::store::error::sqlx as db;

pub const CHANNEL: &str = "keyturn_changes";

/// The channel a connection's notes go on: [`CHANNEL`] and a hash of the
/// schema it writes to, since notifications are database-wide: stores in
/// other schemas of the same database (another deployment, another test)
/// are never heard. `param` is the placeholder bound to [`CHANNEL`].
pub(super) fn schema_channel(param: &str) -> String {
    format!("{param} || '_' || md5(coalesce(current_schema(), ''))")
}

/// The channel notes are sent on from `conn`'s schema (for LISTEN).
pub async fn channel(conn: &mut sqlx::PgConnection) -> StoreResult<String> {
    sqlx::query_scalar(&format!("SELECT {}", schema_channel("$1")))
        .bind(CHANNEL)
        .fetch_one(conn)
        .await
        .map_err(db)
}

/// What crosses processes: ids only (a payload is at most 8000 bytes); the listener re-reads rows.
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
    /// A kill of this run was asked for: the process running it kills it.
    KillRun {
        run_id: String,
    },
}

/// A note with the origin of the store that sent it (a process ignores its
/// own notes: it published them on its feed already).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    pub origin: String,
    #[serde(flatten)]
    pub note: Note,
}

/// The payload of `note` from `origin`.
pub(super) fn payload(origin: &str, note: Note) -> String {
    let envelope = Envelope {
        origin: origin.to_string(),
        note,
    };
    // Strings, integers and a tag: serializing cannot fail.
    serde_json::to_string(&envelope).unwrap_or_default()
}

/// Sends `note` in the transaction `conn` is in (delivered on its commit).
pub async fn send(conn: &mut sqlx::PgConnection, origin: &str, note: Note) -> StoreResult<()> {
    sqlx::query(&format!("SELECT pg_notify({}, $2)", schema_channel("$1")))
        .bind(CHANNEL)
        .bind(payload(origin, note))
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// A received payload, or `None` if it is not one of ours.
pub fn parse(payload: &str) -> Option<Envelope> {
    serde_json::from_str(payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_round_trips_and_stays_small() {
        let notes = [
            Note::Queued {
                id: "00000000-0000-0000-0000-000000000001".into(),
                agent: "a".repeat(200),
                deadline_ms: i64::MAX,
            },
            Note::Voted { id: "x".into() },
            Note::Resolved { id: "y".into() },
            Note::PolicyChanged,
            Note::CardsDue,
            Note::KillRun {
                run_id: "0190d5a4-7b3c-7def-8123-456789abcdef".into(),
            },
        ];
        for note in notes {
            let p = payload("origin-1", note.clone());
            assert!(p.len() < 8000, "{p}");
            let e = parse(&p).unwrap();
            assert_eq!((e.origin.as_str(), e.note), ("origin-1", note));
        }
        assert_eq!(
            payload("o", Note::Voted { id: "r".into() }),
            r#"{"origin":"o","k":"voted","id":"r"}"#
        );
        assert_eq!(
            payload("o", Note::KillRun { run_id: "r".into() }),
            r#"{"origin":"o","k":"kill_run","run_id":"r"}"#
        );
        assert!(parse("not json").is_none());
        assert!(parse(r#"{"origin":"o","k":"unknown"}"#).is_none());
    }
}
