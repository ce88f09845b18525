//! The card outbox as the SQLite store keeps it: due order, versions that
//! survive a change racing a post, and the reconcile after a restart.

mod harness;

use harness::fixture;
#[allow(unused_imports)]
use keyturn::app::ports::{AuditLog, Cards, Requests, Store};
use keyturn::domain::request::{ApprovalRequest, RequestId, State, Vote};
use keyturn::domain::Risk;
use keyturn::store::SqliteStore;

fn request(n: u128, deadline_ms: i64) -> ApprovalRequest {
    fixture::request()
        .id(n)
        .risk(Risk::High)
        .deadline(deadline_ms)
        .state(State::Pending)
        .build()
}

#[tokio::test]
async fn outbox_rows_follow_their_requests() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store = SqliteStore::open(&url, "normal", 64).await.unwrap();
    let (a, b, c) = (request(1, 3000), request(2, 1000), request(3, 2000));
    for r in [&a, &b, &c] {
        store.insert_request(r.clone(), vec![]).await.unwrap();
    }
    // a and b get cards through events; c was queued while the bot was down.
    store.card_touch(a.id, 20, a.deadline_ms).await.unwrap();
    store.card_touch(b.id, 20, b.deadline_ms).await.unwrap();
    assert_eq!(store.card_reconcile(20).await.unwrap(), 1);
    let due = store.cards_due(0, 10).await.unwrap();
    let order: Vec<RequestId> = due.iter().map(|c| c.request_id).collect();
    assert_eq!(order, [b.id, c.id, a.id], "oldest deadline first");
    assert!(due.iter().all(|c| c.message_id.is_none()));

    // b is posted while a change to it arrives: it stays due.
    let v = due[0].want;
    store.card_touch(b.id, 20, b.deadline_ms).await.unwrap();
    store
        .card_done(b.id, 555, v, "pending".into())
        .await
        .unwrap();
    let row = store.card(b.id).await.unwrap().unwrap();
    assert_eq!(row.message_id, Some(555));
    assert!(row.want > row.done, "the racing change is not lost");
    let now = store.cards_due(0, 10).await.unwrap();
    assert!(now.iter().any(|c| c.request_id == b.id));

    // A failed card waits until its retry time.
    store.card_retry_later(c.id, 3, 10_000).await.unwrap();
    assert!(!store
        .cards_due(9_999, 10)
        .await
        .unwrap()
        .iter()
        .any(|x| x.request_id == c.id));
    assert_eq!(store.card_next_attempt().await.unwrap(), Some(0));
    // Discord answers again: every waiting card is due at once, in
    // deadline order with the rest.
    assert_eq!(store.cards_retry_now(5_000).await.unwrap(), 1);
    assert!(store
        .cards_due(5_000, 10)
        .await
        .unwrap()
        .iter()
        .any(|x| x.request_id == c.id));
    assert_eq!(
        store.cards_retry_now(5_000).await.unwrap(),
        0,
        "nothing waits"
    );
    store.card_retry_later(c.id, 3, 10_000).await.unwrap();

    // Everything delivered; then a request is decided while the bot is down.
    for r in [&a, &b, &c] {
        let row = store.card(r.id).await.unwrap().unwrap();
        store
            .card_done(r.id, 600 + r.deadline_ms as u64, row.want, "pending".into())
            .await
            .unwrap();
    }
    assert!(store.cards_due(i64::MAX, 10).await.unwrap().is_empty());
    let vote = Vote {
        voter: "uid:1".into(),
        name: None,
        approve: false,
        reason: None,
        at_ms: 1,
    };
    store.vote(a.id, vote).await.unwrap().unwrap();
    assert_eq!(store.card_reconcile(20).await.unwrap(), 1);
    let due = store.cards_due(0, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].request_id, a.id);
    assert_eq!(due[0].message_id, Some(3600), "edited, not posted again");
    assert_eq!(store.card_reconcile(20).await.unwrap(), 0, "idempotent");
    store.close().await;
}
