//! Audit records and their hash chain.
//!
//! Each entry's hash covers the previous entry's hash and the entry's own
//! canonical fields, so editing, deleting or reordering any row breaks the
//! chain at that row. The store assigns `seq` and links entries in commit order.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash that precedes the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event to be audited, before the store links it into the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub at_ms: i64,
    /// What happened: `submitted`, `policy_allowed`, `approved`, `grant_added`, …
    pub kind: String,
    /// Who did it: `agent:NAME`, `cli:NAME`, `discord:ID`, `system`.
    pub actor: String,
    pub request_id: Option<String>,
    /// Why, and the details (already redacted).
    pub detail: serde_json::Value,
}

/// An audit entry as stored and exported (JSON Lines).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of an entry: SHA-256 over the previous hash and the canonical fields.
pub fn entry_hash(seq: i64, prev_hash: &str, e: &AuditEvent) -> String {
    let detail = canonical_json(&e.detail);
    hash_fields(
        seq,
        prev_hash,
        e.at_ms,
        &e.kind,
        &e.actor,
        e.request_id.as_deref(),
        &detail,
    )
}

/// An event with its detail already in canonical JSON: what the store
/// hashes and keeps. Sealing happens where the event is made, so the one
/// writer that links the chain only hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEvent {
    pub at_ms: i64,
    pub kind: String,
    pub actor: String,
    pub request_id: Option<String>,
    /// [`canonical_json`] of the event's detail.
    pub detail: String,
}

impl AuditEvent {
    pub fn seal(&self) -> SealedEvent {
        SealedEvent {
            at_ms: self.at_ms,
            kind: self.kind.clone(),
            actor: self.actor.clone(),
            request_id: self.request_id.clone(),
            detail: canonical_json(&self.detail),
        }
    }
}

/// [`entry_hash`] of a sealed event.
pub fn sealed_hash(seq: i64, prev_hash: &str, e: &SealedEvent) -> String {
    hash_fields(
        seq,
        prev_hash,
        e.at_ms,
        &e.kind,
        &e.actor,
        e.request_id.as_deref(),
        &e.detail,
    )
}

fn hash_fields(
    seq: i64,
    prev_hash: &str,
    at_ms: i64,
    kind: &str,
    actor: &str,
    request_id: Option<&str>,
    canonical_detail: &str,
) -> String {
    let mut h = Sha256::new();
    // Length-prefix each field so no two different entries hash alike.
    for part in [
        seq.to_string().as_str(),
        prev_hash,
        at_ms.to_string().as_str(),
        kind,
        actor,
        request_id.unwrap_or_default(),
        canonical_detail,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A link in the chain: an entry's `seq`, `prev_hash` and `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub seq: i64,
    pub prev_hash: String,
    pub hash: String,
}

/// Chains `events` after `(last_seq, last_hash)`, hashing each with `hash`
/// ([`entry_hash`] or [`sealed_hash`]): the one place links are made.
pub fn chain<T>(
    last_seq: i64,
    last_hash: &str,
    events: &[T],
    hash: impl Fn(i64, &str, &T) -> String,
) -> Vec<Link> {
    let mut prev = last_hash.to_string();
    let mut out = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        let seq = last_seq + 1 + i as i64;
        let h = hash(seq, &prev, event);
        out.push(Link {
            seq,
            prev_hash: std::mem::replace(&mut prev, h.clone()),
            hash: h,
        });
    }
    out
}

/// Links `events` after `(last_seq, last_hash)`.
pub fn link(last_seq: i64, last_hash: &str, events: Vec<AuditEvent>) -> Vec<AuditEntry> {
    let links = chain(last_seq, last_hash, &events, entry_hash);
    events
        .into_iter()
        .zip(links)
        .map(|(event, l)| AuditEntry {
            seq: l.seq,
            event,
            prev_hash: l.prev_hash,
            hash: l.hash,
        })
        .collect()
}

/// The first problem found walking a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    pub seq: i64,
    pub problem: String,
}

/// Walks entries in order. `start` is the expected `(seq, hash)` before the
/// first entry (`(0, GENESIS)` for a whole log; a retention checkpoint
/// supplies its own). Returns the number of entries verified.
pub fn verify<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
    start: Option<(i64, String)>,
) -> Result<u64, Break> {
    let mut expected: Option<(i64, String)> = start;
    let mut n = 0;
    for e in entries {
        if let Some((seq, hash)) = &expected {
            if e.seq != seq + 1 {
                return Err(Break {
                    seq: e.seq,
                    problem: format!(
                        "expected entry {} next, found {} (a row was deleted or reordered)",
                        seq + 1,
                        e.seq
                    ),
                });
            }
            if &e.prev_hash != hash {
                return Err(Break {
                    seq: e.seq,
                    problem: "prev_hash does not match the previous entry's hash".into(),
                });
            }
        }
        let recomputed = entry_hash(e.seq, &e.prev_hash, &e.event);
        if recomputed != e.hash {
            return Err(Break {
                seq: e.seq,
                problem: "contents do not match the entry's hash (the row was edited)".into(),
            });
        }
        expected = Some((e.seq, e.hash.clone()));
        n += 1;
    }
    Ok(n)
}

pub use super::redact::canonical_json;

/// Kind of the entry that records a retention prune.
pub const CHECKPOINT: &str = "checkpoint";

/// The entry a retention prune appends: it names the last pruned entry
/// `(seq, hash)`, so the first remaining entry's `prev_hash` is still
/// accounted for, and the checkpoint itself is chained like any entry.
pub fn checkpoint(
    at_ms: i64,
    pruned_through: (i64, &str),
    pruned_entries: u64,
    cutoff_ms: i64,
) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind: CHECKPOINT.into(),
        actor: "system".into(),
        request_id: None,
        detail: serde_json::json!({
            "pruned_through_seq": pruned_through.0,
            "pruned_through_hash": pruned_through.1,
            "pruned_entries": pruned_entries,
            "cutoff_ms": cutoff_ms,
        }),
    }
}

/// The `(seq, hash)` a checkpoint entry says was pruned last.
pub fn checkpoint_mark(e: &AuditEvent) -> Option<(i64, String)> {
    if e.kind != CHECKPOINT {
        return None;
    }
    Some((
        e.detail.get("pruned_through_seq")?.as_i64()?,
        e.detail.get("pruned_through_hash")?.as_str()?.to_string(),
    ))
}

/// Walks a whole log (live or exported) in order, one entry at a time, so a
/// caller can feed it page by page. A log that does not start at entry 1 must
/// be explained by its last retention checkpoint; otherwise rows were deleted
/// from its start.
#[derive(Debug, Default)]
pub struct ChainVerifier {
    /// `(seq, hash)` expected before the next entry.
    expected: Option<(i64, String)>,
    /// Where a log that does not begin at entry 1 claims to start.
    start: Option<(i64, String)>,
    last_mark: Option<(i64, String)>,
    n: u64,
}

impl ChainVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next entry.
    pub fn push(&mut self, e: &AuditEntry) -> Result<(), Break> {
        if self.expected.is_none() {
            self.expected = Some(if e.seq == 1 {
                (0, GENESIS.to_string())
            } else {
                let s = (e.seq - 1, e.prev_hash.clone());
                self.start = Some(s.clone());
                s
            });
        }
        verify(std::iter::once(e), self.expected.clone())?;
        if let Some(m) = checkpoint_mark(&e.event) {
            self.last_mark = Some(m);
        }
        self.expected = Some((e.seq, e.hash.clone()));
        self.n += 1;
        Ok(())
    }

    /// The last `(seq, hash)` seen (`(0, GENESIS)` for an empty log).
    pub fn last(&self) -> (i64, String) {
        self.expected
            .clone()
            .unwrap_or_else(|| (0, GENESIS.to_string()))
    }

    /// Ends the walk: the number of entries verified, or the first problem.
    pub fn finish(&self) -> Result<u64, Break> {
        if let Some((seq, hash)) = &self.start {
            let first = seq + 1;
            match &self.last_mark {
                Some((s, h)) if s == seq && h == hash => {}
                Some((s, _)) => {
                    return Err(Break {
                        seq: first,
                        problem: format!(
                            "the log starts at entry {first}, but its last retention checkpoint \
                             says entries up to {s} were pruned (rows were deleted)"
                        ),
                    })
                }
                None => {
                    return Err(Break {
                        seq: first,
                        problem: format!(
                            "the log starts at entry {first}, but no retention checkpoint \
                             accounts for entries 1 to {seq} (rows were deleted from the start, \
                             or this is a partial export)"
                        ),
                    })
                }
            }
        }
        Ok(self.n)
    }
}

impl ChainVerifier {
    /// Compares where the walk ended with the chain head the store recorded
    /// (read in the same snapshot): a deleted last row shows only here.
    pub fn check_head(&self, head_seq: i64, head_hash: &str) -> Result<(), Break> {
        let (seq, hash) = self.last();
        if seq != head_seq || hash != head_hash {
            return Err(Break {
                seq: seq + 1,
                problem: format!(
                    "the chain ends at entry {seq} but the recorded head is entry {head_seq} \
                     (rows at the end were deleted or the head was edited)"
                ),
            });
        }
        Ok(())
    }
}

/// The fields of a request row the audit chain vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    pub id: String,
    pub agent: String,
    pub tool: String,
    pub args_hash: String,
    /// `pending`, `approved`, `denied`, `timed_out`, `cancelled`.
    pub state: String,
    pub decided_by: Option<String>,
    pub created_ms: i64,
}

/// What the chain says about one request (compact: verify holds one per
/// request in the log).
#[derive(Debug, Clone, Default)]
struct Told {
    /// The last entry about it.
    seq: i64,
    state: Option<&'static str>,
    decided_by: Option<String>,
    /// SHA-256 of agent, tool and args hash, from its submission entry.
    submitted: Option<[u8; 32]>,
    seen: bool,
}

fn submission_digest(agent: &str, tool: &str, args_hash: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [agent, tool, args_hash] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

const STATES: [&str; 5] = ["pending", "approved", "denied", "timed_out", "cancelled"];

/// Cross-checks request rows against the chain, so editing a request's
/// state, decision or arguments hash in the database (which no audit row
/// shows) is caught. Feed every entry in order with [`RequestLedger::push`],
/// then every request row with [`RequestLedger::check`], then
/// [`RequestLedger::finish`]; all from one snapshot.
#[derive(Debug, Default)]
pub struct RequestLedger {
    told: std::collections::HashMap<String, Told>,
    /// Requests created before this were pruned from the log (last retention
    /// checkpoint), so they may have no entries left.
    pruned_before_ms: Option<i64>,
    checked: u64,
}

impl RequestLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes what one (already chain-verified) entry says about its request.
    pub fn push(&mut self, e: &AuditEntry) {
        if e.event.kind == CHECKPOINT {
            self.pruned_before_ms = e.event.detail.get("cutoff_ms").and_then(|v| v.as_i64());
            return;
        }
        let Some(id) = &e.event.request_id else {
            return;
        };
        let d = &e.event.detail;
        let (state, submitted) = match e.event.kind.as_str() {
            "submitted" => (Some("pending"), true),
            "policy_allowed" => (Some("approved"), true),
            "policy_denied" => (Some("denied"), true),
            k => (
                STATES.iter().find(|s| **s == k && k != "pending").copied(),
                false,
            ),
        };
        if e.event.kind == "args_edited" {
            // An edit moves the request to new arguments: only from the
            // ones its submission (or an earlier edit) recorded.
            let s = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            let t = self.told.entry(id.clone()).or_default();
            t.seq = e.seq;
            if t.submitted == Some(submission_digest(s("agent"), s("tool"), s("old_args_hash"))) {
                t.submitted = Some(submission_digest(s("agent"), s("tool"), s("new_args_hash")));
            }
            return;
        }
        if state.is_none() && e.event.kind != "queued" && e.event.kind != "vote" {
            return;
        }
        let t = self.told.entry(id.clone()).or_default();
        t.seq = e.seq;
        if submitted {
            let agent = e
                .event
                .actor
                .strip_prefix("agent:")
                .unwrap_or(&e.event.actor);
            let s = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            t.submitted = Some(submission_digest(agent, s("tool"), s("args_hash")));
        }
        if let Some(st) = state {
            // A submission after a decision cannot undo it.
            if !(submitted && t.state.is_some_and(|s| s != "pending")) {
                t.state = Some(st);
            }
            t.decided_by = match e.event.kind.as_str() {
                "policy_allowed" | "policy_denied" => Some("policy".into()),
                "submitted" => None,
                _ => d
                    .get("decided_by")
                    .and_then(|v| v.as_str())
                    .map(String::from),
            };
        }
    }

    /// Checks one request row against what the chain says.
    pub fn check(&mut self, r: &RequestFacts) -> Result<(), Break> {
        self.checked += 1;
        let Some(t) = self.told.get_mut(&r.id) else {
            if self.pruned_before_ms.is_some_and(|cut| r.created_ms < cut) {
                return Ok(());
            }
            return Err(Break {
                seq: 0,
                problem: format!(
                    "request {} ({}, {}) has no audit entries (the row was added, or its \
                     entries deleted, outside Keyturn)",
                    r.id, r.tool, r.state
                ),
            });
        };
        t.seen = true;
        let edited = |what: String| Break {
            seq: t.seq,
            problem: format!(
                "request {}: {what} (the request row was edited outside Keyturn)",
                r.id
            ),
        };
        if let Some(st) = t.state {
            if st != r.state {
                return Err(edited(format!(
                    "the database says `{}`, the audit log says `{st}`",
                    r.state
                )));
            }
            if st != "pending" && t.decided_by.as_deref() != r.decided_by.as_deref() {
                return Err(edited(format!(
                    "decided by `{}` in the database, by `{}` in the audit log",
                    r.decided_by.as_deref().unwrap_or("-"),
                    t.decided_by.as_deref().unwrap_or("-")
                )));
            }
        }
        if let Some(d) = t.submitted {
            if d != submission_digest(&r.agent, &r.tool, &r.args_hash) {
                return Err(edited(
                    "its agent, tool or arguments hash differ from its submission entry".into(),
                ));
            }
        }
        Ok(())
    }

    /// After every row: a request the chain knows that has no row was deleted.
    /// Returns the number of request rows checked.
    pub fn finish(&self) -> Result<u64, Break> {
        if let Some((id, t)) = self
            .told
            .iter()
            .filter(|(_, t)| !t.seen && t.submitted.is_some())
            .min_by_key(|(_, t)| t.seq)
        {
            return Err(Break {
                seq: t.seq,
                problem: format!(
                    "request {id} is in the audit log but not in the database (its row was deleted)"
                ),
            });
        }
        Ok(self.checked)
    }
}

/// The fields an exported entry has, no more and no fewer.
const ENTRY_FIELDS: [&str; 8] = [
    "seq",
    "at_ms",
    "kind",
    "actor",
    "request_id",
    "detail",
    "prev_hash",
    "hash",
];

/// One exported entry, strictly: exactly the fields of [`AuditEntry`], each
/// once. A field added to a line (say `"approved_by"`) is outside the hash,
/// so a lenient reader would accept a doctored export.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictEntry {
    seq: i64,
    at_ms: i64,
    kind: String,
    actor: String,
    request_id: Option<String>,
    detail: serde_json::Value,
    prev_hash: String,
    hash: String,
}

/// Parses one line of `keyturn audit export`, refusing added, missing or
/// repeated fields.
pub fn parse_export_line(line: &str) -> Result<AuditEntry, String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(line).map_err(|e| e.to_string())?;
    if let Some(extra) = map.keys().find(|k| !ENTRY_FIELDS.contains(&k.as_str())) {
        return Err(format!("unknown field `{extra}` (not covered by the hash)"));
    }
    if let Some(missing) = ENTRY_FIELDS.iter().find(|k| !map.contains_key(**k)) {
        return Err(format!("missing field `{missing}`"));
    }
    // Typed and duplicate-key checks (a JSON map keeps only the last copy).
    let e: StrictEntry = serde_json::from_str(line).map_err(|e| e.to_string())?;
    Ok(AuditEntry {
        seq: e.seq,
        event: AuditEvent {
            at_ms: e.at_ms,
            kind: e.kind,
            actor: e.actor,
            request_id: e.request_id,
            detail: e.detail,
        },
        prev_hash: e.prev_hash,
        hash: e.hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(i: i64) -> AuditEvent {
        AuditEvent {
            at_ms: i,
            kind: "submitted".into(),
            actor: "agent:a".into(),
            request_id: Some(format!("r{i}")),
            detail: json!({"b": 1, "a": [i]}),
        }
    }

    #[test]
    fn linked_chain_verifies() {
        let entries = link(0, GENESIS, (1..=5).map(ev).collect());
        assert_eq!(verify(&entries, Some((0, GENESIS.into()))), Ok(5));
        // Continuing a chain links to its last hash.
        let more = link(5, &entries[4].hash, vec![ev(6)]);
        assert_eq!(more[0].prev_hash, entries[4].hash);
    }

    #[test]
    fn edit_delete_and_reorder_are_named() {
        let entries = link(0, GENESIS, (1..=5).map(ev).collect());
        let start = Some((0, GENESIS.to_string()));

        let mut edited = entries.clone();
        edited[2].event.actor = "agent:evil".into();
        assert_eq!(verify(&edited, start.clone()).unwrap_err().seq, 3);

        let mut deleted = entries.clone();
        deleted.remove(1);
        assert_eq!(verify(&deleted, start.clone()).unwrap_err().seq, 3);

        let mut reordered = entries.clone();
        reordered.swap(3, 4);
        assert_eq!(verify(&reordered, start.clone()).unwrap_err().seq, 5);

        // Deleting the last row cannot be seen from the rows alone; the
        // store's chain head catches that (see store tests).
        let mut rehashed = entries.clone();
        rehashed[1].event.kind = "approved".into();
        rehashed[1].hash = entry_hash(2, &rehashed[1].prev_hash, &rehashed[1].event);
        assert_eq!(verify(&rehashed, start).unwrap_err().seq, 3);
    }

    fn walk(entries: &[AuditEntry]) -> Result<u64, Break> {
        let mut v = ChainVerifier::new();
        for e in entries {
            v.push(e)?;
        }
        v.finish()
    }

    #[test]
    fn checkpoint_keeps_a_pruned_chain_verifiable() {
        let entries = link(0, GENESIS, (1..=6).map(ev).collect());
        assert_eq!(walk(&entries), Ok(6));
        // Prune 1..=3, append a checkpoint naming entry 3.
        let cp = checkpoint(100, (3, &entries[2].hash), 3, 50);
        let mut pruned: Vec<AuditEntry> = entries[3..].to_vec();
        pruned.extend(link(6, &entries[5].hash, vec![cp]));
        assert_eq!(walk(&pruned), Ok(4));
        assert_eq!(
            checkpoint_mark(&pruned[3].event),
            Some((3, entries[2].hash.clone()))
        );

        // Deleting the first remaining row is seen through the checkpoint.
        let b = walk(&pruned[1..]).unwrap_err();
        assert_eq!(b.seq, 5);
        assert!(
            b.problem.contains("checkpoint says entries up to 3"),
            "{}",
            b.problem
        );

        // Without any checkpoint, a log that skips entry 1 is broken.
        let b = walk(&entries[1..]).unwrap_err();
        assert_eq!(b.seq, 2);
        assert!(
            b.problem.contains("no retention checkpoint"),
            "{}",
            b.problem
        );

        // Editing the checkpoint breaks its hash.
        let mut edited = pruned.clone();
        edited[3].event.detail["pruned_through_seq"] = serde_json::json!(2);
        assert_eq!(walk(&edited).unwrap_err().seq, 7);
    }

    #[test]
    fn export_lines_are_parsed_strictly() {
        let e = &link(0, GENESIS, vec![ev(1)])[0];
        let line = serde_json::to_string(e).unwrap();
        assert_eq!(parse_export_line(&line).unwrap(), *e);
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["approved_by"] = json!("mallory");
        let err = parse_export_line(&v.to_string()).unwrap_err();
        assert!(err.contains("unknown field `approved_by`"), "{err}");
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v.as_object_mut().unwrap().remove("request_id");
        let err = parse_export_line(&v.to_string()).unwrap_err();
        assert!(err.contains("missing field `request_id`"), "{err}");
        let dup = line.replacen("\"kind\":", "\"kind\":\"approved\",\"kind\":", 1);
        assert!(parse_export_line(&dup)
            .unwrap_err()
            .contains("duplicate field"));
    }

    #[test]
    fn request_rows_are_checked_against_the_chain() {
        let sub = AuditEvent {
            at_ms: 10,
            kind: "submitted".into(),
            actor: "agent:a".into(),
            request_id: Some("r1".into()),
            detail: json!({"tool": "t", "args_hash": "h1"}),
        };
        let decided = AuditEvent {
            at_ms: 11,
            kind: "denied".into(),
            actor: "discord:1".into(),
            request_id: Some("r1".into()),
            detail: json!({"decided_by": "human"}),
        };
        let entries = link(0, GENESIS, vec![sub, decided]);
        let row = RequestFacts {
            id: "r1".into(),
            agent: "a".into(),
            tool: "t".into(),
            args_hash: "h1".into(),
            state: "denied".into(),
            decided_by: Some("human".into()),
            created_ms: 10,
        };
        let ledger = |rows: &[RequestFacts]| {
            let mut l = RequestLedger::new();
            entries.iter().for_each(|e| l.push(e));
            for r in rows {
                l.check(r)?;
            }
            l.finish()
        };
        assert_eq!(ledger(std::slice::from_ref(&row)), Ok(1));
        let edited = RequestFacts {
            state: "approved".into(),
            ..row.clone()
        };
        let b = ledger(&[edited]).unwrap_err();
        assert_eq!(b.seq, 2);
        assert!(b.problem.contains("says `approved`"), "{}", b.problem);
        let hash = RequestFacts {
            args_hash: "h2".into(),
            ..row.clone()
        };
        assert!(ledger(&[hash])
            .unwrap_err()
            .problem
            .contains("arguments hash"));
        let stranger = RequestFacts {
            id: "r2".into(),
            ..row.clone()
        };
        assert!(ledger(&[row.clone(), stranger])
            .unwrap_err()
            .problem
            .contains("has no audit entries"));
        assert!(ledger(&[])
            .unwrap_err()
            .problem
            .contains("not in the database"));
    }

    #[test]
    fn canonical_json_ignores_key_order_and_whitespace() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
    }
}

/// Builders for the events the lifecycle produces, so every surface audits alike.
pub mod events {
    use super::AuditEvent;
    use crate::domain::policy::{Effect, Grant, Scope, ToolPattern};
    use crate::domain::request::{ApprovalRequest, Vote};
    use crate::domain::Risk;
    use serde_json::json;

    /// Adds the agent's confidence (0..=1) to a submission entry.
    pub fn add_confidence(e: &mut AuditEvent, confidence: f64) {
        if let serde_json::Value::Object(m) = &mut e.detail {
            m.insert("confidence".into(), json!(confidence));
        }
    }

    /// An agent (or, as `*`, every agent) was paused: the kill switch
    /// (written only when it was not paused yet).
    pub fn agent_paused(at_ms: i64, by: &str, agent: &str, reason: Option<&str>) -> AuditEvent {
        admin(
            at_ms,
            "agent_paused",
            by,
            json!({"agent": agent, "reason": reason}),
        )
    }

    /// An anomaly rule matched (written when its alert opens; the alert's
    /// count then grows in the alerts table, one alert per rule, agent and
    /// window).
    pub fn anomaly(at_ms: i64, agent: &str, rule: &str, detail: &str, count: u64) -> AuditEvent {
        admin(
            at_ms,
            "anomaly",
            "anomaly",
            json!({"agent": agent, "rule": rule, "detail": detail, "count": count}),
        )
    }

    /// A pause was lifted (written only when there was one).
    pub fn agent_resumed(at_ms: i64, by: &str, agent: &str) -> AuditEvent {
        admin(at_ms, "agent_resumed", by, json!({"agent": agent}))
    }

    /// A request entered the system (before any decision).
    pub fn submitted(r: &ApprovalRequest) -> AuditEvent {
        AuditEvent {
            at_ms: r.created_ms,
            kind: "submitted".into(),
            actor: format!("agent:{}", r.agent),
            request_id: Some(r.id.to_string()),
            detail: json!({
                "tool": r.tool, "args": r.args, "args_hash": r.args_hash,
                "user_id": r.user_id, "channel_id": r.channel_id,
                "justification": r.justification, "task_id": r.task_id,
                "risk": r.risk, "flags": r.flags, "requester_uid": r.requester_uid,
            }),
        }
    }

    /// A call the policy decided at once: its submission and the decision
    /// in one entry, `policy_allowed` or `policy_denied`, by the agent that
    /// asked, with the rule and why. One row per call on the hot path
    /// instead of two (`keyturn bench`, six 10 s runs: median 23,700/s →
    /// 25,800/s, p99 1.76–2.42 ms → 1.64–1.90 ms).
    pub fn decided_by_policy(r: &ApprovalRequest) -> AuditEvent {
        let mut e = submitted(r);
        e.kind = policy_kind(r).into();
        if let serde_json::Value::Object(m) = &mut e.detail {
            m.insert("rule".into(), json!(r.rule));
            m.insert("why".into(), json!(r.rule_detail));
        }
        e
    }

    fn policy_kind(r: &ApprovalRequest) -> &'static str {
        match r.state {
            crate::domain::request::State::Pending => "queued",
            crate::domain::request::State::Approved => "policy_allowed",
            _ => "policy_denied",
        }
    }

    /// What the policy did with it: `policy_allowed`, `policy_denied` or `queued`.
    pub fn policy(r: &ApprovalRequest) -> AuditEvent {
        let kind = policy_kind(r);
        AuditEvent {
            at_ms: r.created_ms,
            kind: kind.into(),
            actor: "policy".into(),
            request_id: Some(r.id.to_string()),
            detail: json!({
                "rule": r.rule, "why": r.rule_detail, "risk": r.risk,
                "approvals_required": r.approvals_required, "admin_only": r.admin_only,
                "deadline_ms": r.deadline_ms,
            }),
        }
    }

    /// One person's vote.
    pub fn vote(r: &ApprovalRequest, v: &Vote) -> AuditEvent {
        AuditEvent {
            at_ms: v.at_ms,
            kind: "vote".into(),
            actor: v.voter.clone(),
            request_id: Some(r.id.to_string()),
            detail: json!({"approve": v.approve, "reason": v.reason}),
        }
    }

    /// An approver edited a pending request's arguments (with their
    /// approval, which the `vote` entry after this one records). Names both
    /// argument hashes, never the arguments.
    pub fn args_edited(
        r: &ApprovalRequest,
        voter: &str,
        old_args_hash: &str,
        new_args_hash: &str,
        at_ms: i64,
    ) -> AuditEvent {
        AuditEvent {
            at_ms,
            kind: "args_edited".into(),
            actor: voter.to_string(),
            request_id: Some(r.id.to_string()),
            detail: json!({
                "agent": r.agent, "tool": r.tool,
                "old_args_hash": old_args_hash, "new_args_hash": new_args_hash,
            }),
        }
    }

    /// A human decision, timeout or cancel.
    pub fn resolved(r: &ApprovalRequest) -> AuditEvent {
        AuditEvent {
            at_ms: r.decided_ms.unwrap_or(r.created_ms),
            kind: r.state.as_str().into(),
            actor: r.decided_who.clone().unwrap_or_else(|| "system".into()),
            request_id: Some(r.id.to_string()),
            detail: json!({
                "decided_by": r.decided_by, "who": r.decided_who, "reason": r.decided_reason,
            }),
        }
    }

    /// An idempotency key was reused for a different call: refused, nothing
    /// queued. Names the key, the request that holds it and both calls'
    /// tools and argument hashes (the new call's arguments are not stored).
    pub fn idempotency_conflict(
        at_ms: i64,
        existing: &ApprovalRequest,
        tool: &str,
        args_hash: &str,
    ) -> AuditEvent {
        AuditEvent {
            at_ms,
            kind: "idempotency_conflict".into(),
            actor: format!("agent:{}", existing.agent),
            request_id: Some(existing.id.to_string()),
            detail: json!({
                "idempotency_key": existing.idempotency_key,
                "existing_tool": existing.tool, "existing_args_hash": existing.args_hash,
                "tool": tool, "args_hash": args_hash,
            }),
        }
    }

    /// A grant was added (written only when it was new).
    pub fn grant_added(at_ms: i64, by: &str, g: &Grant) -> AuditEvent {
        admin(
            at_ms,
            "grant_added",
            by,
            json!({"scope": g.scope, "tool": g.tool, "effect": g.effect}),
        )
    }

    /// A time-boxed grant was added while approving a request: its id,
    /// scope, expiry, approver and the originating request.
    pub fn timed_grant_added(
        at_ms: i64,
        by: &str,
        g: &crate::domain::timed::TimedGrant,
    ) -> AuditEvent {
        AuditEvent {
            at_ms,
            kind: "grant_added".into(),
            actor: by.into(),
            request_id: Some(g.origin_request.clone()),
            detail: json!({
                "grant_id": g.id,
                "scope": g.kind,
                "agent": g.agent,
                "tool": g.tool,
                "user_id": g.user_id,
                "args_hash": g.args_hash,
                "effect": "allow",
                "expires_ms": g.expires_ms,
                "until": g.until(),
                "origin_request": g.origin_request,
                "by_admin": g.by_admin,
            }),
        }
    }

    /// A time-boxed grant was revoked (written only when there was one).
    pub fn timed_grant_removed(at_ms: i64, by: &str, id: &str) -> AuditEvent {
        admin(at_ms, "grant_removed", by, json!({"grant_id": id}))
    }

    /// A grant was removed (written only when there was one).
    pub fn grant_removed(
        at_ms: i64,
        by: &str,
        scope: &Scope,
        tool: &ToolPattern,
        effect: Effect,
    ) -> AuditEvent {
        admin(
            at_ms,
            "grant_removed",
            by,
            json!({"scope": scope, "tool": tool, "effect": effect}),
        )
    }

    /// A tool's risk was set, or with `None` cleared (always written).
    pub fn risk_set(at_ms: i64, by: &str, tool: &str, risk: Option<Risk>) -> AuditEvent {
        admin(at_ms, "risk_set", by, json!({"tool": tool, "risk": risk}))
    }

    /// A user was paired directly (written only when they were not yet).
    pub fn user_paired(at_ms: i64, by: &str, user_id: &str, roles: &[String]) -> AuditEvent {
        admin(
            at_ms,
            "user_paired",
            by,
            json!({"user_id": user_id, "roles": roles}),
        )
    }

    /// A user was unpaired (written only when they were paired).
    pub fn pairing_revoked(at_ms: i64, by: &str, user_id: &str) -> AuditEvent {
        admin(at_ms, "pairing_revoked", by, json!({"user_id": user_id}))
    }

    /// A pairing code was issued to a user (written only when it was stored).
    pub fn pairing_requested(at_ms: i64, user_id: &str, expires_ms: i64) -> AuditEvent {
        admin(
            at_ms,
            "pairing_requested",
            &format!("user:{user_id}"),
            json!({"user_id": user_id, "expires_ms": expires_ms}),
        )
    }

    /// A pairing code was redeemed and its user paired.
    pub fn pairing_approved(at_ms: i64, by: &str, user_id: &str) -> AuditEvent {
        admin(at_ms, "pairing_approved", by, json!({"user_id": user_id}))
    }

    /// An agent's bearer token was issued (never its secret). With
    /// `others_expire_ms`, a rotation: the agent's other live tokens expire
    /// then (the overlap).
    pub fn token_issued(
        at_ms: i64,
        by: &str,
        id: &str,
        agent: &str,
        expires_ms: Option<i64>,
        others_expire_ms: Option<i64>,
    ) -> AuditEvent {
        let kind = if others_expire_ms.is_some() {
            "token_rotated"
        } else {
            "token_issued"
        };
        admin(
            at_ms,
            kind,
            by,
            json!({"token_id": id, "agent": agent, "expires_ms": expires_ms,
                   "others_expire_ms": others_expire_ms}),
        )
    }

    /// An agent's bearer token was revoked (written only when it was live).
    pub fn token_revoked(at_ms: i64, by: &str, id: &str, agent: &str) -> AuditEvent {
        admin(
            at_ms,
            "token_revoked",
            by,
            json!({"token_id": id, "agent": agent}),
        )
    }

    /// An administrative change (grant, revoke, pairing, risk).
    pub fn admin(at_ms: i64, kind: &str, actor: &str, detail: serde_json::Value) -> AuditEvent {
        AuditEvent {
            at_ms,
            kind: kind.into(),
            actor: actor.into(),
            request_id: None,
            detail,
        }
    }
}
