//! The store's side of idempotency keys: a key answers only the call it was
//! first used for. The check runs in the insert's own transaction, and rows
//! stored before fingerprints existed (NULL) never match: fail closed.

mod harness;

use harness::fixture;
use keyturn::app::ports::{AuditLog, Inserted, Requests, Store};
use keyturn::domain::audit::events;
use keyturn::domain::request::ApprovalRequest;
use keyturn::store::SqliteStore;

fn call(tool: &str, args_hash: &str) -> ApprovalRequest {
    fixture::request()
        .tool(tool)
        .args_hash(args_hash)
        .user("42")
        .task("t")
        .idempotency_key("step-1")
        .created(1)
        .deadline(1)
        .build()
}

async fn insert(store: &SqliteStore, r: ApprovalRequest) -> Inserted {
    let audit = vec![events::decided_by_policy(&r)];
    store.insert_request(r, audit).await.expect("insert")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_answers_only_its_own_call_and_legacy_rows_never_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store = SqliteStore::open(&url, "normal", 64).await.expect("open");

    let first = call("read", "h1");
    let Inserted::New(first) = insert(&store, first).await else {
        panic!("first use of the key must be stored");
    };
    // A retry of the same call: the same request back.
    match insert(&store, call("read", "h1")).await {
        Inserted::Existing(r) => assert_eq!(r.id, first.id),
        other => panic!("a retry must get its request back: {other:?}"),
    }
    // Another tool, other arguments, another user or task: refused.
    let mut other_user = call("read", "h1");
    other_user.user_id = Some("43".into());
    let mut other_task = call("read", "h1");
    other_task.task_id = None;
    for r in [
        call("shell", "h1"),
        call("read", "h2"),
        other_user,
        other_task,
    ] {
        match insert(&store, r).await {
            Inserted::Conflict(held) => assert_eq!(held.id, first.id),
            other => panic!("a different call must conflict: {other:?}"),
        }
    }
    let held = store
        .find_by_idempotency_key("a", "step-1")
        .await
        .expect("find")
        .expect("held");
    assert_eq!(held.fingerprint, Some(first.fingerprint()));
    // Each conflict audited, in the same transaction as the refusal.
    let tail = store.audit_tail(10).await.expect("tail");
    let conflicts: Vec<_> = tail
        .iter()
        .filter(|e| e.event.kind == "idempotency_conflict")
        .collect();
    assert_eq!(conflicts.len(), 4);
    assert_eq!(conflicts[0].event.detail["tool"], "shell");
    assert_eq!(conflicts[0].event.detail["existing_tool"], "read");
    assert_eq!(conflicts[0].event.detail["idempotency_key"], "step-1");
    store.close().await;

    // A row from before fingerprints were stored: even the same call is refused.
    let conn = rusqlite::Connection::open(dir.path().join("k.db")).expect("open db");
    conn.execute("UPDATE requests SET idempotency_fp = NULL", [])
        .expect("null the fingerprint");
    drop(conn);
    let store = SqliteStore::open(&url, "normal", 64).await.expect("reopen");
    let held = store
        .find_by_idempotency_key("a", "step-1")
        .await
        .expect("find")
        .expect("held");
    assert_eq!(held.fingerprint, None);
    match insert(&store, call("read", "h1")).await {
        Inserted::Conflict(held) => assert_eq!(held.id, first.id),
        other => panic!("a key without a fingerprint must conflict: {other:?}"),
    }
    store.close().await;
}
