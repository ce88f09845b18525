//! Rows a batch's writes append and nothing in the batch reads back before
//! the next statement: new request rows without an idempotency key and
//! audit entries (chained in Rust when sent, after the head known then).
//! The writer's [`super::writer::Tx`] keeps them and sends them in one
//! statement (multi-row `INSERT … SELECT FROM UNNEST`) before any other
//! statement of the transaction runs, and at the end of the batch together
//! with the chain head's update and the notes; or, for a batch that only
//! appended, as one statement alone, guarded by the head it expects
//! ([`Head::RecordIf`]). So a batch of policy-decided calls costs one
//! round trip however many calls it holds, instead of two per call and
//! four per batch.

use crate::app::ports::StoreResult;
use crate::domain::audit::{self, SealedEvent};
use crate::domain::request::ApprovalRequest;
use crate::store::error::sqlx as db;
use sqlx::PgConnection;

/// What a batch has appended and not sent yet.
#[derive(Default)]
pub(super) struct Deferred {
    /// New requests (no idempotency key) with their trifecta capabilities.
    requests: Vec<(ApprovalRequest, i64)>,
    /// Sealed, chained only when sent (after the head they follow).
    audit: Vec<SealedEvent>,
}

/// How many rows were deferred, to undo a write that rolls back.
#[derive(Clone, Copy)]
pub(super) struct Len {
    requests: usize,
    audit: usize,
}

impl Deferred {
    pub fn request(&mut self, r: &ApprovalRequest, caps: i64) {
        self.requests.push((r.clone(), caps));
    }

    pub fn audit(&mut self, events: &[SealedEvent]) {
        self.audit.extend_from_slice(events);
    }

    pub fn has_audit(&self) -> bool {
        !self.audit.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.audit.is_empty()
    }

    pub fn len(&self) -> Len {
        Len {
            requests: self.requests.len(),
            audit: self.audit.len(),
        }
    }

    pub fn truncate(&mut self, to: Len) {
        self.requests.truncate(to.requests);
        self.audit.truncate(to.audit);
    }
}

/// The columns of a deferred request row (its idempotency key and
/// fingerprint are NULL: a request with a key is inserted at once) and their types.
const REQUEST_COLUMNS: &str = "id, agent, tool, args, args_hash, user_id, channel_id, \
     justification, task_id, risk, approvals_required, admin_only, rule, rule_detail, flags, \
     created_ms, deadline_ms, state, decided_by, decided_who, decided_reason, decided_ms, \
     requester_uid, caps, run_plan";
const REQUEST_TYPES: [&str; 25] = [
    "text", "text", "text", "text", "text", "text", "text", "text", "text", "text", "bigint",
    "boolean", "text", "text", "text", "bigint", "bigint", "text", "text", "text", "text",
    "bigint", "bigint", "bigint", "text",
];
const AUDIT_COLUMNS: &str = "seq, at_ms, kind, actor, request_id, detail, prev_hash, hash";
const AUDIT_TYPES: [&str; 8] = [
    "bigint", "bigint", "text", "text", "text", "text", "text", "text",
];

/// `UNNEST($n::type[], …)` for `types`, numbering from `*next`.
fn unnest(types: &[&str], next: &mut usize) -> String {
    let args: Vec<String> = types
        .iter()
        .map(|t| {
            *next += 1;
            format!("${}::{t}[]", *next)
        })
        .collect();
    format!("UNNEST({})", args.join(", "))
}

/// What a statement does with the chain head `audit_head`.
pub(super) enum Head<'a> {
    /// Leaves it (the transaction records it at its end).
    Keep,
    /// Records the head after the entries sent.
    Record,
    /// Records it only if `audit_head` still holds this (locking its row
    /// first, waiting for a transaction that holds it): otherwise the
    /// statement does nothing at all. Lets a statement that runs alone, in
    /// its own transaction, append to the chain from a head read earlier.
    RecordIf(&'a (i64, String)),
}

/// Sends `rows` (emptied once sent) with their audit entries chained after
/// `head`, and in the same statement what [`Head`] says and the `notes`
/// (payloads) on the schema's channel: one round trip. Returns the head
/// after the entries, or `None` if a [`Head::RecordIf`] found another head
/// (nothing was written). Nothing to send, no round trip.
pub(super) async fn send(
    conn: &mut PgConnection,
    rows: &mut Deferred,
    head: &(i64, String),
    record: Head<'_>,
    notes: &[String],
) -> StoreResult<Option<(i64, String)>> {
    let Deferred { requests, audit } = &*rows;
    if requests.is_empty() && audit.is_empty() && matches!(record, Head::Keep) && notes.is_empty() {
        return Ok(Some(head.clone()));
    }
    let links = audit::chain(head.0, &head.1, audit, |seq, prev, e| {
        audit::sealed_hash(seq, prev, e)
    });
    let after = links
        .last()
        .map_or_else(|| head.clone(), |l| (l.seq, l.hash.clone()));
    let mut next = 0;
    let mut parts = Vec::new();
    // With RecordIf, every part runs only if the head's update did.
    let mut gate = "";
    match record {
        Head::Keep => {}
        Head::Record => {
            parts.push("h AS (UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1)".to_string());
            next = 2;
        }
        Head::RecordIf(_) => {
            parts.push(
                "h AS (UPDATE audit_head SET seq = $1, hash = $2 \
                 WHERE id = 1 AND seq = $3 AND hash = $4 RETURNING 1)"
                    .to_string(),
            );
            next = 4;
            gate = " WHERE EXISTS (SELECT 1 FROM h)";
        }
    }
    if !requests.is_empty() {
        parts.push(format!(
            "r AS (INSERT INTO requests ({REQUEST_COLUMNS}) SELECT * FROM {} AS u{gate})",
            unnest(&REQUEST_TYPES, &mut next)
        ));
    }
    if !audit.is_empty() {
        parts.push(format!(
            "a AS (INSERT INTO audit ({AUDIT_COLUMNS}) SELECT * FROM {} AS u{gate})",
            unnest(&AUDIT_TYPES, &mut next)
        ));
    }
    // A data-modifying part runs whether or not the query reads it; the
    // notes are a plain SELECT, so the query counts them to run them.
    if !notes.is_empty() {
        parts.push(format!(
            "n AS (SELECT pg_notify({}, p) FROM unnest(${}::text[]) AS p{gate})",
            super::notify::schema_channel(&format!("${}", next + 1)),
            next + 2
        ));
    }
    let notes_run = if notes.is_empty() {
        "0::bigint"
    } else {
        "(SELECT count(*) FROM n)"
    };
    let updated = if gate.is_empty() {
        "1::bigint"
    } else {
        "(SELECT count(*) FROM h)"
    };
    let sql = format!("WITH {} SELECT {updated}, {notes_run}", parts.join(", "));
    let mut q = sqlx::query_as::<_, (i64, i64)>(&sql);
    match record {
        Head::Keep => {}
        Head::Record => q = q.bind(after.0).bind(after.1.as_str()),
        Head::RecordIf((seq, hash)) => {
            q = q
                .bind(after.0)
                .bind(after.1.as_str())
                .bind(*seq)
                .bind(hash.as_str())
        }
    }
    if !requests.is_empty() {
        let col = |f: &dyn Fn(&(ApprovalRequest, i64)) -> String| -> Vec<String> {
            requests.iter().map(f).collect()
        };
        let opt = |f: &dyn Fn(&ApprovalRequest) -> Option<String>| -> Vec<Option<String>> {
            requests.iter().map(|(r, _)| f(r)).collect()
        };
        let int = |f: &dyn Fn(&(ApprovalRequest, i64)) -> Option<i64>| -> Vec<Option<i64>> {
            requests.iter().map(f).collect()
        };
        q = q
            .bind(col(&|(r, _)| r.id.to_string()))
            .bind(col(&|(r, _)| r.agent.clone()))
            .bind(col(&|(r, _)| r.tool.clone()))
            .bind(col(&|(r, _)| r.args.to_string()))
            .bind(col(&|(r, _)| r.args_hash.clone()))
            .bind(opt(&|r| r.user_id.clone()))
            .bind(opt(&|r| r.channel_id.clone()))
            .bind(col(&|(r, _)| r.justification.clone()))
            .bind(opt(&|r| r.task_id.clone()))
            .bind(col(&|(r, _)| r.risk.as_str().to_string()))
            .bind(int(&|(r, _)| Some(i64::from(r.approvals_required))))
            .bind(
                requests
                    .iter()
                    .map(|(r, _)| r.admin_only)
                    .collect::<Vec<bool>>(),
            )
            .bind(col(&|(r, _)| r.rule.clone()))
            .bind(col(&|(r, _)| r.rule_detail.clone()))
            .bind(col(&|(r, _)| {
                serde_json::Value::Array(r.flags.clone()).to_string()
            }))
            .bind(int(&|(r, _)| Some(r.created_ms)))
            .bind(int(&|(r, _)| Some(r.deadline_ms)))
            .bind(col(&|(r, _)| r.state.as_str().to_string()))
            .bind(opt(&|r| r.decided_by.map(|d| d.as_str().to_string())))
            .bind(opt(&|r| r.decided_who.clone()))
            .bind(opt(&|r| r.decided_reason.clone()))
            .bind(int(&|(r, _)| r.decided_ms))
            .bind(int(&|(r, _)| r.requester_uid.map(i64::from)))
            .bind(int(&|(_, caps)| Some(*caps)))
            .bind(
                requests
                    .iter()
                    .map(|(r, _)| crate::store::sqlite::run_plan_json(r))
                    .collect::<StoreResult<Vec<Option<String>>>>()?,
            );
    }
    if !audit.is_empty() {
        q = q
            .bind(links.iter().map(|l| l.seq).collect::<Vec<i64>>())
            .bind(audit.iter().map(|a| a.at_ms).collect::<Vec<i64>>())
            .bind(audit.iter().map(|a| a.kind.as_str()).collect::<Vec<&str>>())
            .bind(
                audit
                    .iter()
                    .map(|a| a.actor.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(
                audit
                    .iter()
                    .map(|a| a.request_id.as_deref())
                    .collect::<Vec<Option<&str>>>(),
            )
            .bind(
                audit
                    .iter()
                    .map(|a| a.detail.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(
                links
                    .iter()
                    .map(|l| l.prev_hash.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(links.iter().map(|l| l.hash.as_str()).collect::<Vec<&str>>());
    }
    if !notes.is_empty() {
        q = q.bind(super::notify::CHANNEL).bind(notes);
    }
    let (updated, _notes) = q.fetch_one(conn).await.map_err(db)?;
    if updated != 1 {
        return Ok(None);
    }
    *rows = Deferred::default();
    Ok(Some(after))
}
