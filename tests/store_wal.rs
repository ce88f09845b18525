//! The SQLite WAL under sustained writes: it is checkpointed and restarted,
//! so it stays small while far more than its size goes through it, and
//! nothing written is lost on the way.

mod harness;

use harness::fixture;
#[allow(unused_imports)]
use keyturn::app::ports::{AuditLog, Requests, Store};
use keyturn::domain::audit::events;
use keyturn::domain::request::ApprovalRequest;
use keyturn::store::{SqliteStore, WalTuning};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn allowed(args: serde_json::Value) -> ApprovalRequest {
    fixture::request().args(args).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_writes_restart_the_wal_instead_of_growing_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let wal = dir.path().join("k.db-wal");
    let tuning = WalTuning {
        checkpoint_every: Duration::from_millis(20),
        restart_frames: 64,
    };
    let url = format!("sqlite://{}", db.display());
    let store = Arc::new(
        SqliteStore::open_tuned(&url, "normal", 64, tuning)
            .await
            .unwrap(),
    );
    // 8,000 requests with 4 KB of arguments each, stored twice (the row and
    // its `submitted` audit entry): over 64 MB goes through the WAL. Eight
    // writers at once keep the writer busy, which is when a background
    // checkpoint alone never lets the log restart.
    const WRITERS: usize = 8;
    const EACH: usize = 1000;
    let filler = "x".repeat(4096);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let filler = filler.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let r = allowed(json!({"w": w, "i": i, "filler": filler}));
                let audit = vec![events::submitted(&r), events::policy(&r)];
                store.insert_request(r, audit).await.unwrap();
            }
        }));
    }
    let mut largest_wal = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        largest_wal = largest_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    largest_wal = largest_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    assert!(
        largest_wal < 16 << 20,
        "the WAL grew to {largest_wal} bytes while over 64 MB went through it"
    );
    // Every entry is there, in one unbroken chain.
    let (seq, _) = store.audit_head().await.unwrap();
    assert_eq!(seq, (WRITERS * EACH * 2) as i64);
    let entries = store.audit_after(0, u32::MAX).await.unwrap();
    assert_eq!(entries.len(), WRITERS * EACH * 2);
    assert_eq!(
        keyturn::domain::audit::verify(&entries, Some((0, keyturn::domain::audit::GENESIS.into()))),
        Ok(entries.len() as u64)
    );
    store.close().await;
}
