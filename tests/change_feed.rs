//! The gateway follows the store's change feed, not its own calls: a revoke,
//! a decision or a new request committed "by another process" (a second
//! connection or a second store on the same database file) and published on
//! the feed is seen by this process's policy view, waiters and deadline
//! scheduler; a policy view that cannot be loaded denies every call.

mod harness;

use harness::fixture;
use keyturn::app::health::HealthProbe;
use keyturn::app::ports::{Change, Requests, Store};
use keyturn::app::{scheduler, Gateway, Submission};
use keyturn::config::Config;
use keyturn::domain::audit::events;
use keyturn::domain::request::{ApprovalRequest, State, Vote};
use keyturn::domain::Risk;
use keyturn::store::SqliteStore;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The longest any awaited change may take; far below every deadline used.
const LIMIT: Duration = Duration::from_secs(30);

struct Env {
    _dir: tempfile::TempDir,
    url: String,
    store: Arc<SqliteStore>,
    gw: Arc<Gateway>,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let text = "[[agents]]\nname = \"bot\"\n[[tools]]\nname = \"read_file\"\nrisk = \"low\"\n";
    let mut cfg = Config::parse(text).unwrap();
    cfg.store.url = url.clone();
    cfg.validate().unwrap();
    let store = Arc::new(SqliteStore::open(&url, "normal", 64).await.unwrap());
    let dyn_store: Arc<dyn Store> = store.clone();
    let gw = Gateway::new(Arc::new(cfg), dyn_store, 0).await.unwrap();
    Env {
        _dir: dir,
        url,
        store,
        gw,
    }
}

fn read_file() -> Submission {
    Submission {
        tool: "read_file".into(),
        args: json!({"path": "/etc/hostname"}),
        justification: "look".into(),
        ..Submission::default()
    }
}

/// Runs SQL on a connection of its own, as another process would.
async fn sql(url: &str, statement: &str) {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query(statement).execute(&mut c).await.unwrap();
    c.close().await.unwrap();
}

/// Polls `cond` until it holds; fails after [`LIMIT`].
async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A pending request as another process would store it.
fn pending(deadline_ms: i64) -> ApprovalRequest {
    fixture::request()
        .agent("bot")
        .tool("deploy")
        .risk(Risk::High)
        .created(keyturn::app::now_ms())
        .deadline(deadline_ms)
        .state(State::Pending)
        .build()
}

async fn insert_elsewhere(other: &SqliteStore, r: ApprovalRequest) {
    let audit = vec![events::submitted(&r), events::policy(&r)];
    other.insert_request(r, audit).await.unwrap();
}

#[tokio::test]
async fn a_revoke_made_in_the_database_binds_the_next_call_once_published() {
    let e = env().await;
    e.gw.grant(
        "global",
        "read_file",
        keyturn::domain::policy::Effect::Allow,
        "uid:0",
    )
    .await
    .unwrap();
    let r = e.gw.submit("bot", read_file()).await.unwrap();
    assert_eq!(r.state, State::Approved, "{r:?}");

    // Another process revokes: the row goes, and the change is published.
    sql(&e.url, "DELETE FROM grants WHERE tool = 'read_file'").await;
    e.store.feed().publish(Change::PolicyChanged);
    until("the policy view drops the revoked grant", || async {
        !e.gw
            .check("bot", &read_file())
            .await
            .unwrap()
            .allowlist
            .allowed
    })
    .await;
    let r = e.gw.submit("bot", read_file()).await.unwrap();
    assert_eq!(r.state, State::Denied, "{r:?}");
}

#[tokio::test]
async fn a_grant_whose_effect_is_corrupt_denies_instead_of_allowing() {
    let e = env().await;
    assert_eq!(
        e.gw.submit("bot", read_file()).await.unwrap().state,
        State::Denied,
        "not granted yet"
    );
    // Another process writes a grant whose effect is neither `allow` nor
    // `deny`: read as *allow* it would let the call through.
    sql(
        &e.url,
        "INSERT INTO grants (scope, tool, effect, created_by, created_ms) \
         VALUES ('global', 'read_file', 'Allow ', 'x', 0)",
    )
    .await;
    e.store.feed().publish(Change::PolicyChanged);
    until("the policy view refuses the corrupt row", || async {
        e.gw.policy_unavailable().is_some()
    })
    .await;
    let r = e.gw.submit("bot", read_file()).await.unwrap();
    assert_eq!(r.state, State::Denied, "{r:?}");
    assert_eq!(r.rule, keyturn::app::POLICY_UNAVAILABLE);
}

#[tokio::test]
async fn a_policy_view_that_cannot_load_denies_every_call_until_it_loads_again() {
    let e = env().await;
    e.gw.grant(
        "global",
        "read_file",
        keyturn::domain::policy::Effect::Allow,
        "uid:0",
    )
    .await
    .unwrap();
    assert_eq!(
        e.gw.submit("bot", read_file()).await.unwrap().state,
        State::Approved
    );
    // A corrupt row: the view cannot be loaded, so it is not trusted.
    sql(
        &e.url,
        "INSERT INTO grants (scope, tool, effect, created_by, created_ms) \
         VALUES ('not a scope', 'read_file', 'allow', 'x', 0)",
    )
    .await;
    e.store.feed().publish(Change::PolicyChanged);
    until("the policy view is unavailable", || async {
        e.gw.policy_unavailable().is_some()
    })
    .await;
    let health = HealthProbe::new(e.gw.clone(), None).check(true).await;
    assert!(!health.ok && health.down == ["policy"], "{health:?}");
    let r = e.gw.submit("bot", read_file()).await.unwrap();
    assert_eq!(r.state, State::Denied, "{r:?}");
    assert_eq!(r.rule, keyturn::app::POLICY_UNAVAILABLE);
    assert!(
        !e.gw
            .check("bot", &read_file())
            .await
            .unwrap()
            .allowlist
            .allowed
    );

    // Repaired: the retry loads it and calls are decided by the policy again.
    sql(&e.url, "DELETE FROM grants WHERE scope = 'not a scope'").await;
    until("the policy view loads again", || async {
        e.gw.policy_unavailable().is_none()
    })
    .await;
    assert_eq!(
        e.gw.submit("bot", read_file()).await.unwrap().state,
        State::Approved
    );
    assert!(HealthProbe::new(e.gw.clone(), None).check(true).await.ok);
}

#[tokio::test]
async fn a_decision_committed_elsewhere_wakes_the_waiting_agent_at_once() {
    let e = env().await;
    let other = SqliteStore::open(&e.url, "normal", 64).await.unwrap();
    // Far beyond the test's limit: only the feed can end the wait in time.
    let req = pending(keyturn::app::now_ms() + 3_600_000);
    let id = req.id;
    insert_elsewhere(&other, req).await;

    let gw = e.gw.clone();
    let waiting = tokio::spawn(async move { gw.wait(id, Some("bot"), None).await });
    until("the agent waits", || async { e.gw.waiting() == 1 }).await;

    let vote = Vote {
        voter: "discord:7".into(),
        name: None,
        approve: true,
        reason: None,
        at_ms: keyturn::app::now_ms(),
    };
    let decided = other
        .vote(
            id,
            vote,
            keyturn::domain::request::VoterRights {
                is_admin: true,
                may_self_approve: false,
            },
        )
        .await
        .unwrap()
        .unwrap()
        .request;
    assert_eq!(decided.state, State::Approved);
    e.store.feed().publish(Change::Resolved(Arc::new(decided)));

    let woken = tokio::time::timeout(LIMIT, waiting)
        .await
        .expect("the agent was not woken by the published decision")
        .unwrap()
        .unwrap();
    assert_eq!(woken.state, State::Approved);
    assert_eq!(woken.id, id);
    other.close().await;
}

#[tokio::test]
async fn a_request_queued_elsewhere_is_timed_out_by_this_scheduler_at_its_deadline() {
    let e = env().await;
    let stop = CancellationToken::new();
    let sched = tokio::spawn(scheduler::run(e.gw.clone(), stop.clone()));
    let other = SqliteStore::open(&e.url, "normal", 64).await.unwrap();

    // Created after the scheduler started, by another store: only a sweep
    // of the database finds it (the change carries no more than a deadline).
    let deadline_ms = keyturn::app::now_ms() + 300;
    let req = pending(deadline_ms);
    let id = req.id;
    insert_elsewhere(&other, req).await;
    e.store.feed().publish(Change::Queued {
        id,
        agent: "bot".into(),
        deadline_ms,
    });

    let done = tokio::time::timeout(LIMIT, e.gw.wait(id, Some("bot"), None))
        .await
        .expect("the request was not timed out")
        .unwrap();
    assert_eq!(done.state, State::TimedOut, "{done:?}");
    assert!(done.decided_ms.unwrap() >= deadline_ms);
    let stored = other.get_request(id).await.unwrap().unwrap();
    assert_eq!(stored.state, State::TimedOut);

    stop.cancel();
    sched.await.unwrap();
    other.close().await;
}
