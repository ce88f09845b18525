//! Rows a batch's writes append and nothing in the batch reads back before
//! the next statement: new request rows without an idempotency key and
//! audit entries (chained in Rust). The writer's [`super::writer::Tx`]
//! keeps them and sends them in one statement (multi-row `INSERT … SELECT
//! FROM UNNEST`), before any other statement of the transaction runs, and
//! at the end of the batch together with the chain head's update and the
//! notes. So a batch of policy-decided calls costs the same few round trips
//! however many calls it holds, instead of two per call.

use crate::app::ports::StoreResult;
use crate::domain::request::ApprovalRequest;
use crate::store::error::sqlx as db;
use sqlx::PgConnection;

/// An audit entry, chained, waiting to be sent.
pub(super) struct AuditRow {
    pub seq: i64,
    pub at_ms: i64,
    pub kind: String,
    pub actor: String,
    pub request_id: Option<String>,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// What a batch has appended and not sent yet.
#[derive(Default)]
pub(super) struct Deferred {
    /// New requests (no idempotency key) with their trifecta capabilities.
    requests: Vec<(ApprovalRequest, i64)>,
    audit: Vec<AuditRow>,
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

    pub fn audit(&mut self, rows: impl IntoIterator<Item = AuditRow>) {
        self.audit.extend(rows);
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
     requester_uid, caps";
const REQUEST_TYPES: [&str; 24] = [
    "text", "text", "text", "text", "text", "text", "text", "text", "text", "text", "bigint",
    "boolean", "text", "text", "text", "bigint", "bigint", "text", "text", "text", "text",
    "bigint", "bigint", "bigint",
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

/// Sends `rows` (emptied), and with them, in the same statement, the chain
/// `head` to record and the `notes` (payloads) to send on the schema's
/// channel: one round trip. Nothing to send, no round trip.
pub(super) async fn send(
    conn: &mut PgConnection,
    rows: &mut Deferred,
    head: Option<&(i64, String)>,
    notes: &[String],
) -> StoreResult<()> {
    if rows.is_empty() && head.is_none() && notes.is_empty() {
        return Ok(());
    }
    let Deferred { requests, audit } = std::mem::take(rows);
    let mut next = 0;
    let mut parts = Vec::new();
    if !requests.is_empty() {
        parts.push(format!(
            "r AS (INSERT INTO requests ({REQUEST_COLUMNS}) SELECT * FROM {})",
            unnest(&REQUEST_TYPES, &mut next)
        ));
    }
    if !audit.is_empty() {
        parts.push(format!(
            "a AS (INSERT INTO audit ({AUDIT_COLUMNS}) SELECT * FROM {})",
            unnest(&AUDIT_TYPES, &mut next)
        ));
    }
    if head.is_some() {
        parts.push(format!(
            "h AS (UPDATE audit_head SET seq = ${}, hash = ${} WHERE id = 1)",
            next + 1,
            next + 2
        ));
        next += 2;
    }
    // A data-modifying part runs whether or not the query reads it; the
    // notes are a plain SELECT, so the query counts them to run them.
    let main = if notes.is_empty() {
        "SELECT 0::bigint".to_string()
    } else {
        parts.push(format!(
            "n AS (SELECT pg_notify({}, p) FROM unnest(${}::text[]) AS p)",
            super::notify::schema_channel(&format!("${}", next + 1)),
            next + 2
        ));
        "SELECT count(*) FROM n".to_string()
    };
    let sql = format!("WITH {} {main}", parts.join(", "));
    let mut q = sqlx::query(&sql);
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
            .bind(int(&|(_, caps)| Some(*caps)));
    }
    if !audit.is_empty() {
        q = q
            .bind(audit.iter().map(|a| a.seq).collect::<Vec<i64>>())
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
                audit
                    .iter()
                    .map(|a| a.prev_hash.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(audit.iter().map(|a| a.hash.as_str()).collect::<Vec<&str>>());
    }
    if let Some((seq, hash)) = head {
        q = q.bind(*seq).bind(hash.as_str());
    }
    if !notes.is_empty() {
        q = q.bind(super::notify::CHANNEL).bind(notes);
    }
    q.execute(conn).await.map_err(db)?;
    Ok(())
}
