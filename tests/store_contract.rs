//! The store contract: one story over the persistence ports
//! (`keyturn::app::ports`), written against `Arc<dyn Store>` so every
//! backend runs the same story: SQLite, and PostgreSQL (each test in a
//! schema of its own, see `harness::pg`; without a reachable server those
//! tests print why and pass, except under `CI=true`).
//!
//! Time is a parameter everywhere here: every timestamp is a literal.

mod harness;

use harness::fixture;
use harness::pg;
use keyturn::app::ports::EscalationRecord;
use keyturn::app::ports::{
    AgentPauses, AgentToken, Alert, AuditLog, Cards, Change, Changes, Inserted, PairedUser,
    PairingRefused, PolicyData, Requests, RunRecord, RunRefused, Store, StoreError,
};
use keyturn::domain::audit::{events, AuditEvent};
use keyturn::domain::escalation::{self, Action, Targets};
use keyturn::domain::pairing;
use keyturn::domain::policy::{Effect, Grant, Pause, ALL_AGENTS};
use keyturn::domain::request::{
    ApprovalRequest, DecidedBy, RequestId, State, TransitionError, Vote, VoterRights,
};
use keyturn::domain::run::{Network, Profile, RunPlan, RunState};
use keyturn::domain::trifecta::{Escalation, Guard, ToolTag};
use keyturn::domain::Risk;
use keyturn::store::{Options, PgOptions, PgStore, SqliteStore};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use uuid::Uuid;

/// The card channel the store under test keeps cards for.
const CARDS: u64 = 20;

/// Reaches under the ports, as an operator's tool or a damaged disk would:
/// runs raw SQL on the store's database through another connection.
type Raw<'a> = &'a (dyn Fn(&str) + Sync);

#[tokio::test]
async fn sqlite_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let url = format!("sqlite://{}", path.display());
    let options = Options {
        max_batch: 64,
        cards: Some(CARDS),
        ..Options::default()
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(&url, &options).await.unwrap());
    let raw = move |sql: &str| {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c.execute_batch(sql).unwrap();
    };
    story(store.clone(), &raw).await;
    store.close().await;
}

#[tokio::test]
async fn postgres_keeps_the_contract() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let options = PgOptions {
        max_batch: 64,
        cards: Some(CARDS),
        ..PgOptions::default()
    };
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&schema.url(), &options).await.unwrap());
    let raw = |sql: &str| schema.exec(sql);
    story(store.clone(), &raw).await;
    store.close().await;
}

/// Writes are group-committed; one that fails (here: a request id stored
/// twice, a unique violation) fails only its own caller, with a conflict,
/// and its batch's other writes stand.
#[tokio::test]
async fn sqlite_fails_only_the_bad_write_of_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&url, "normal", 64).await.unwrap());
    only_the_bad_write_fails(store).await;
}

/// The same on PostgreSQL, where the failed write rolls back to its own
/// savepoint inside the batch's transaction.
#[tokio::test]
async fn postgres_fails_only_the_bad_write_of_a_batch() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let options = PgOptions {
        max_batch: 64,
        cards: None,
        ..PgOptions::default()
    };
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&schema.url(), &options).await.unwrap());
    only_the_bad_write_fails(store).await;
}

async fn only_the_bad_write_fails(store: Arc<dyn Store>) {
    let mut requests: Vec<ApprovalRequest> =
        (0..32).map(|n| request(200 + n, 1, 100_000)).collect();
    let mut twin = requests[7].clone();
    twin.args_hash = "a different call".into();
    requests.push(twin);
    let answers = futures::future::join_all(
        requests
            .iter()
            .map(|r| store.insert_request(r.clone(), submitted(r))),
    )
    .await;
    let refused: Vec<&StoreError> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "{answers:?}");
    assert!(
        matches!(refused[0], StoreError::Conflict { retry: false, .. }),
        "{refused:?}"
    );
    for r in &requests[..32] {
        assert_eq!(state(&*store, r.id).await, State::Pending);
    }
    let stored = store.get_request(requests[7].id).await.unwrap().unwrap();
    assert_eq!(
        stored.args_hash, requests[7].args_hash,
        "the first one stands"
    );
    store
        .audit_verify()
        .await
        .unwrap()
        .expect("the chain verifies");
    store.close().await;
}

/// The whole story, in order; each chapter leaves the store as the next expects.
async fn story(store: Arc<dyn Store>, raw: Raw<'_>) {
    let mut feed = Feed(store.subscribe());
    inserts(&*store, &mut feed).await;
    votes(&*store, &mut feed).await;
    edits(&*store, &mut feed).await;
    cancels_and_timeouts(&*store, &mut feed).await;
    rights(&*store, &mut feed).await;
    policy(&*store, &mut feed).await;
    timed_grants(&*store, &mut feed).await;
    pairings(&*store, &mut feed).await;
    tokens(&*store, &mut feed).await;
    pauses(&*store, &mut feed).await;
    cards(&*store, &mut feed).await;
    escalations(&*store, &mut feed).await;
    deadlines(&*store).await;
    audit(&*store).await;
    pending_limits(&*store, &mut feed).await;
    stats_rows(&*store, &mut feed).await;
    corrupt(&*store, raw).await;
}

fn request(n: u128, approvals: u32, deadline_ms: i64) -> ApprovalRequest {
    fixture::request()
        .id(n)
        .agent("agent-a")
        .tool("delete_file")
        .args(json!({"path": format!("/tmp/{n}")}))
        .args_hash(&format!("hash-{n}"))
        .justification("contract")
        .risk(Risk::High)
        .approvals(approvals)
        .created(1_000)
        .deadline(deadline_ms)
        .state(State::Pending)
        .build()
}

/// The events a submit audits a queued request with.
fn submitted(r: &ApprovalRequest) -> Vec<AuditEvent> {
    vec![events::submitted(r), events::policy(r)]
}

fn vote(voter: &str, approve: bool, at_ms: i64) -> Vote {
    Vote {
        voter: voter.into(),
        name: None,
        approve,
        reason: Some(format!("{voter} decides")),
        at_ms,
    }
}

/// Rights of an admin who may not approve their own requests.
const ADMIN: VoterRights = VoterRights {
    is_admin: true,
    may_self_approve: false,
};

/// The change feed as a subscriber sees it.
struct Feed(broadcast::Receiver<Change>);

/// The next change a write published: a `Resync` is skipped (a store
/// shared by several processes publishes one at every periodic re-check
/// and when its listener reconnects; no write of this story made it).
async fn next_change(rx: &mut broadcast::Receiver<Change>) -> Result<Change, RecvError> {
    loop {
        match rx.recv().await {
            Ok(Change::Resync) => continue,
            other => return other,
        }
    }
}

impl Feed {
    /// Runs one write and returns its result with the change it published.
    /// The change must not arrive while the write is still running (it is
    /// published after the commit, which the write's return stands for).
    async fn write<T>(&mut self, write: impl Future<Output = T>) -> (T, Change) {
        self.quiet();
        let out = tokio::select! {
            biased;
            out = write => out,
            early = next_change(&mut self.0) => panic!("published before the write returned: {early:?}"),
        };
        let change = tokio::time::timeout(Duration::from_secs(10), next_change(&mut self.0))
            .await
            .expect("a change is published once the write returns")
            .expect("the feed is open");
        (out, change)
    }

    /// Runs a write that changes nothing anyone follows: nothing is published.
    async fn silent<T>(&mut self, write: impl Future<Output = T>) -> T {
        self.quiet();
        let out = write.await;
        self.quiet();
        out
    }

    fn quiet(&mut self) {
        loop {
            match self.0.try_recv() {
                Ok(Change::Resync) => continue,
                Err(TryRecvError::Empty) => break,
                other => panic!("unexpected change: {other:?}"),
            }
        }
    }
}

/// Stores a pending request; it is queued after the commit.
async fn queue(store: &dyn Store, feed: &mut Feed, r: &ApprovalRequest) {
    let (ins, change) = feed
        .write(store.insert_request(r.clone(), submitted(r)))
        .await;
    assert!(matches!(ins.unwrap(), Inserted::New(_)));
    assert!(matches!(change, Change::Queued { id, .. } if id == r.id));
}

async fn last_audit_kind(store: &dyn Store) -> String {
    store.audit_tail(1).await.unwrap()[0].event.kind.clone()
}

async fn state(store: &dyn Store, id: RequestId) -> State {
    store.get_request(id).await.unwrap().unwrap().state
}

async fn inserts(store: &dyn Store, feed: &mut Feed) {
    let mut r = request(1, 1, 100_000);
    r.idempotency_key = Some("key-1".into());
    let (ins, change) = feed
        .write(store.insert_request(r.clone(), submitted(&r)))
        .await;
    assert!(matches!(ins.unwrap(), Inserted::New(n) if n == r));
    match change {
        Change::Queued {
            id,
            agent,
            deadline_ms,
        } => {
            assert_eq!(
                (id, agent.as_str(), deadline_ms),
                (r.id, "agent-a", 100_000)
            );
            // Published after the commit: the row is there to read.
            assert_eq!(state(store, id).await, State::Pending);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(last_audit_kind(store).await, "queued");

    // The same call again under the same key: the stored request, nothing new.
    let mut again = r.clone();
    again.id = RequestId(Uuid::from_u128(101));
    match feed
        .silent(store.insert_request(again.clone(), vec![]))
        .await
    {
        Ok(Inserted::Existing(e)) => assert_eq!(e.id, r.id),
        other => panic!("{other:?}"),
    }
    // A different call under the same key: refused, audited, nothing stored.
    again.args_hash = "another".into();
    match feed
        .silent(store.insert_request(again.clone(), vec![]))
        .await
    {
        Ok(Inserted::Conflict(e)) => assert_eq!(e.id, r.id),
        other => panic!("{other:?}"),
    }
    assert_eq!(last_audit_kind(store).await, "idempotency_conflict");
    assert!(store.get_request(again.id).await.unwrap().is_none());
    let holder = store
        .find_by_idempotency_key("agent-a", "key-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(holder.request.id, r.id);
    assert_eq!(holder.fingerprint, Some(r.fingerprint()));

    // A request the policy decided at once is stored, not queued.
    let mut allowed = request(2, 1, 100_000);
    allowed.state = State::Approved;
    allowed.decided_by = Some(DecidedBy::Policy);
    allowed.decided_ms = Some(allowed.created_ms);
    let ins = feed
        .silent(store.insert_request(allowed.clone(), vec![events::decided_by_policy(&allowed)]))
        .await;
    assert!(matches!(ins.unwrap(), Inserted::New(_)));
    assert!(store.card(allowed.id).await.unwrap().is_none(), "no card");
}

/// `max_pending` is counted in the insert's transaction: a request that
/// would wait with every slot taken is not stored (or, escalated by the
/// trifecta guard, is denied); deciding a request frees its slot.
async fn pending_limits(store: &dyn Store, feed: &mut Feed) {
    let agent = "agent-limit";
    let limited = |n: u128| {
        let mut r = request(n, 1, 100_000);
        r.agent = agent.into();
        r
    };
    let count = |counts: Vec<(String, u64)>| {
        counts
            .into_iter()
            .find(|(a, _)| a == agent)
            .map_or(0, |(_, n)| n)
    };
    let (a, b, c) = (limited(60), limited(61), limited(62));
    for r in [&a, &b] {
        let (ins, _) = feed
            .write(store.insert_guarded(r.clone(), submitted(r), None, 2))
            .await;
        assert!(matches!(ins.unwrap(), Inserted::New(_)));
    }
    assert_eq!(count(store.pending_counts().await.unwrap()), 2);
    // Full: nothing stored, nothing published, nothing audited.
    let head = store.audit_head().await.unwrap();
    match feed
        .silent(store.insert_guarded(c.clone(), submitted(&c), None, 2))
        .await
    {
        Ok(Inserted::TooManyPending { max: 2 }) => {}
        other => panic!("{other:?}"),
    }
    assert!(store.get_request(c.id).await.unwrap().is_none());
    assert_eq!(store.audit_head().await.unwrap(), head);
    // A call the policy decided needs no slot.
    let mut allowed = limited(63);
    allowed.state = State::Approved;
    allowed.decided_by = Some(DecidedBy::Policy);
    let ins = feed
        .silent(store.insert_guarded(allowed.clone(), vec![], None, 2))
        .await;
    assert!(matches!(ins.unwrap(), Inserted::New(_)));
    // Cancelling one frees its slot; the refused call now fits.
    let _ = feed
        .write(store.cancel(a.id, "admin".into(), None, 2_000))
        .await;
    assert_eq!(count(store.pending_counts().await.unwrap()), 1);
    let (ins, _) = feed
        .write(store.insert_guarded(c.clone(), submitted(&c), None, 2))
        .await;
    assert!(matches!(ins.unwrap(), Inserted::New(_)));
    assert_eq!(count(store.pending_counts().await.unwrap()), 2);

    // The trifecta guard escalates an allowed call that completes the
    // trifecta; with no slot left, it denies it instead.
    let guard = |tag: ToolTag| Guard {
        tags: vec![tag],
        since_ms: 0,
        window: "24h".into(),
        escalation: Escalation {
            risk: Risk::High,
            deadline_ms: 200_000,
            approvals_required: 1,
            admin_only: false,
            deny: None,
        },
    };
    for (n, tool, tag) in [
        (64, "read_mail", ToolTag::ReadsPrivateData),
        (65, "browse", ToolTag::SeesUntrustedInput),
    ] {
        let mut r = allowed.clone();
        r.id = RequestId(Uuid::from_u128(n));
        r.tool = tool.into();
        let ins = feed
            .silent(store.insert_guarded(r, vec![], Some(guard(tag)), 2))
            .await;
        assert!(matches!(ins.unwrap(), Inserted::New(r) if r.state == State::Approved));
    }
    let mut send = allowed.clone();
    send.id = RequestId(Uuid::from_u128(66));
    send.tool = "send_mail".into();
    let ins = feed
        .silent(store.insert_guarded(
            send.clone(),
            vec![],
            Some(guard(ToolTag::CommunicatesExternally)),
            2,
        ))
        .await;
    match ins.unwrap() {
        Inserted::New(r) => {
            assert_eq!(
                (r.state, r.rule.as_str()),
                (State::Denied, "too_many_pending")
            );
            assert!(
                r.rule_detail.contains("already has 2 pending"),
                "{}",
                r.rule_detail
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(count(store.pending_counts().await.unwrap()), 2);
    // With a slot free, the same call waits for a human.
    let _ = feed.write(store.time_out(b.id, 100_000)).await;
    send.id = RequestId(Uuid::from_u128(67));
    let (ins, change) = feed
        .write(store.insert_guarded(
            send.clone(),
            vec![],
            Some(guard(ToolTag::CommunicatesExternally)),
            2,
        ))
        .await;
    assert!(
        matches!(ins.unwrap(), Inserted::New(r) if r.state == State::Pending && r.rule == "trifecta")
    );
    assert!(matches!(change, Change::Queued { id, .. } if id == send.id));
    assert_eq!(count(store.pending_counts().await.unwrap()), 2);
}

async fn votes(store: &dyn Store, feed: &mut Feed) {
    // Two approvals needed.
    let r = request(3, 2, 100_000);
    queue(store, feed, &r).await;
    let (v, change) = feed
        .write(store.vote(r.id, vote("uid:1", true, 2_000), ADMIN))
        .await;
    let v = v.unwrap().unwrap();
    assert_eq!((v.have, v.need, v.request.state), (1, 2, State::Pending));
    assert!(matches!(change, Change::Voted { id } if id == r.id));
    assert_eq!(store.votes(r.id).await.unwrap().len(), 1);
    let again = feed
        .silent(store.vote(r.id, vote("uid:1", true, 2_001), ADMIN))
        .await;
    assert!(matches!(
        again.unwrap(),
        Err(TransitionError::AlreadyVoted { .. })
    ));
    let (v, change) = feed
        .write(store.vote(r.id, vote("uid:2", true, 2_002), ADMIN))
        .await;
    let v = v.unwrap().unwrap();
    assert_eq!((v.have, v.need, v.request.state), (2, 2, State::Approved));
    match change {
        Change::Resolved(done) => {
            assert_eq!((done.id, done.state), (r.id, State::Approved));
            assert_eq!(state(store, r.id).await, State::Approved);
            let who = done.decided_who.clone().unwrap();
            assert!(who.contains("uid:1") && who.contains("uid:2"), "{who}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(last_audit_kind(store).await, "approved");

    // The first deny wins over a partial approval.
    let r = request(4, 2, 100_000);
    queue(store, feed, &r).await;
    feed.write(store.vote(r.id, vote("uid:1", true, 2_000), ADMIN))
        .await
        .0
        .unwrap()
        .unwrap();
    let (v, change) = feed
        .write(store.vote(r.id, vote("uid:2", false, 2_001), ADMIN))
        .await;
    assert_eq!(v.unwrap().unwrap().request.state, State::Denied);
    assert!(matches!(change, Change::Resolved(d) if d.state == State::Denied));
    assert_eq!(state(store, r.id).await, State::Denied);
    assert_eq!(last_audit_kind(store).await, "denied");
    let late = feed
        .silent(store.vote(r.id, vote("uid:3", true, 2_002), ADMIN))
        .await;
    assert_eq!(
        late.unwrap().unwrap_err(),
        TransitionError::AlreadyDecided {
            state: State::Denied
        }
    );
    let missing = feed
        .silent(store.vote(
            RequestId(Uuid::from_u128(999)),
            vote("uid:1", true, 1),
            ADMIN,
        ))
        .await;
    assert_eq!(missing.unwrap().unwrap_err(), TransitionError::NotFound);
}

/// Edit, then approve: the edit and its approval in one transaction; the
/// row takes the edited arguments and keeps the submitted ones; an edit on
/// changed arguments, or after approvals of the submitted ones, is refused
/// and changes nothing; the audit chain (with its request ledger) verifies.
async fn edits(store: &dyn Store, feed: &mut Feed) {
    use keyturn::domain::edit::ArgsChange;
    let r = request(880, 2, 100_000);
    queue(store, feed, &r).await;
    let change = ArgsChange {
        expected_hash: r.args_hash.clone(),
        args: json!({"path": "/tmp/edited"}),
        args_hash: "hash-880-edited".into(),
        run: None,
    };
    let stale = ArgsChange {
        expected_hash: "hash-of-something-else".into(),
        ..change.clone()
    };
    let refused = feed
        .silent(store.vote_edited(r.id, vote("uid:1", true, 2_000), ADMIN, stale))
        .await;
    assert_eq!(refused.unwrap().unwrap_err(), TransitionError::ArgsChanged);
    assert_eq!(store.get_request(r.id).await.unwrap().unwrap(), r);
    // The edit counts as the first approval; the second approver sees it.
    let (v, ch) = feed
        .write(store.vote_edited(r.id, vote("uid:1", true, 2_000), ADMIN, change.clone()))
        .await;
    let v = v.unwrap().unwrap();
    assert_eq!((v.have, v.need, v.request.state), (1, 2, State::Pending));
    assert!(matches!(ch, Change::Voted { id } if id == r.id));
    let got = store.get_request(r.id).await.unwrap().unwrap();
    assert_eq!(got, v.request, "what the write returned is what is stored");
    assert_eq!(got.args, json!({"path": "/tmp/edited"}));
    assert_eq!(got.args_hash, "hash-880-edited");
    let e = got.edit.clone().expect("the edit is recorded");
    assert_eq!(e.original_args, r.args);
    assert_eq!(e.original_args_hash, r.args_hash);
    assert_eq!(e.by, "uid:1");
    assert_eq!(e.at_ms, 2_000);
    let tail = store.audit_tail(2).await.unwrap();
    let kinds: Vec<&str> = tail.iter().map(|e| e.event.kind.as_str()).collect();
    assert!(
        kinds.contains(&"args_edited") && kinds.contains(&"vote"),
        "{kinds:?}"
    );
    let edited_entry = tail.iter().find(|e| e.event.kind == "args_edited").unwrap();
    assert_eq!(edited_entry.event.detail["old_args_hash"], "hash-880");
    assert_eq!(
        edited_entry.event.detail["new_args_hash"],
        "hash-880-edited"
    );
    // No second edit: an approval exists.
    let again = ArgsChange {
        expected_hash: "hash-880-edited".into(),
        args_hash: "hash-880-again".into(),
        ..change.clone()
    };
    let refused = feed
        .silent(store.vote_edited(r.id, vote("uid:2", true, 2_001), ADMIN, again))
        .await;
    assert_eq!(
        refused.unwrap().unwrap_err(),
        TransitionError::ApprovedAsIs { have: 1 }
    );
    let (v, _) = feed
        .write(store.vote(r.id, vote("uid:2", true, 2_002), ADMIN))
        .await;
    let done = v.unwrap().unwrap().request;
    assert_eq!(done.state, State::Approved);
    assert_eq!(done.args_hash, "hash-880-edited");
    assert!(done.edit.is_some());

    // Approvals of the submitted arguments exist: no edit.
    let r = request(881, 2, 100_000);
    queue(store, feed, &r).await;
    feed.write(store.vote(r.id, vote("uid:1", true, 2_000), ADMIN))
        .await
        .0
        .unwrap()
        .unwrap();
    let change = ArgsChange {
        expected_hash: r.args_hash.clone(),
        args: json!({"path": "/tmp/other"}),
        args_hash: "hash-881-edited".into(),
        run: None,
    };
    let refused = feed
        .silent(store.vote_edited(r.id, vote("uid:2", true, 2_001), ADMIN, change.clone()))
        .await;
    assert_eq!(
        refused.unwrap().unwrap_err(),
        TransitionError::ApprovedAsIs { have: 1 }
    );
    assert_eq!(
        store.get_request(r.id).await.unwrap().unwrap().args_hash,
        "hash-881"
    );

    // The voter's rights hold: a critical request takes an admin.
    let mut r = request(882, 1, 100_000);
    r.admin_only = true;
    queue(store, feed, &r).await;
    let change = ArgsChange {
        expected_hash: r.args_hash.clone(),
        ..change
    };
    let refused = feed
        .silent(store.vote_edited(
            r.id,
            vote("uid:2", true, 2_001),
            VoterRights::default(),
            change.clone(),
        ))
        .await;
    assert_eq!(refused.unwrap().unwrap_err(), TransitionError::AdminOnly);
    let (v, ch) = feed
        .write(store.vote_edited(r.id, vote("uid:2", true, 2_001), ADMIN, change))
        .await;
    assert_eq!(v.unwrap().unwrap().request.state, State::Approved);
    assert!(matches!(ch, Change::Resolved(d) if d.id == r.id && d.edit.is_some()));
    assert_eq!(last_audit_kind(store).await, "approved");
    let verified = store.audit_verify().await.unwrap();
    assert!(verified.is_ok(), "{verified:?}");
}

async fn cancels_and_timeouts(store: &dyn Store, feed: &mut Feed) {
    let r = request(5, 1, 100_000);
    queue(store, feed, &r).await;
    let (c, change) = feed
        .write(store.cancel(
            r.id,
            "agent:agent-a".into(),
            Some("not needed".into()),
            3_000,
        ))
        .await;
    let c = c.unwrap().unwrap();
    assert_eq!((c.state, c.decided_ms), (State::Cancelled, Some(3_000)));
    assert!(matches!(change, Change::Resolved(d) if d.state == State::Cancelled));
    assert_eq!(state(store, r.id).await, State::Cancelled);
    let again = feed
        .silent(store.cancel(r.id, "agent:agent-a".into(), None, 3_001))
        .await;
    assert!(matches!(
        again.unwrap(),
        Err(TransitionError::AlreadyDecided { .. })
    ));

    // Not before the deadline; at it, yes; a vote after it is refused.
    let r = request(6, 1, 5_000);
    queue(store, feed, &r).await;
    let early = feed.silent(store.time_out(r.id, 4_999)).await;
    assert_eq!(early.unwrap().unwrap_err(), TransitionError::NotDue);
    let past = feed
        .silent(store.vote(r.id, vote("uid:1", true, 5_000), ADMIN))
        .await;
    assert_eq!(past.unwrap().unwrap_err(), TransitionError::PastDeadline);
    let (t, change) = feed.write(store.time_out(r.id, 5_000)).await;
    assert_eq!(t.unwrap().unwrap().state, State::TimedOut);
    assert!(matches!(change, Change::Resolved(d) if d.state == State::TimedOut));
    assert_eq!(state(store, r.id).await, State::TimedOut);
    assert_eq!(last_audit_kind(store).await, "timed_out");
    let late = feed
        .silent(store.vote(r.id, vote("uid:1", true, 4_000), ADMIN))
        .await;
    assert_eq!(
        late.unwrap().unwrap_err(),
        TransitionError::AlreadyDecided {
            state: State::TimedOut
        }
    );
}

/// What the stats chapter checks of a row: tool, state, decider, who,
/// created and decided times.
type StatsSeen<'a> = (
    &'a str,
    State,
    Option<DecidedBy>,
    Option<&'a str>,
    i64,
    Option<i64>,
);

/// The usage report's read: requests created since a time, newest first,
/// bounded, with their outcome as stored.
async fn stats_rows(store: &dyn Store, feed: &mut Feed) {
    // Created after everything else in the story.
    const T: i64 = 1_000_000_000_000;
    let mk = |n: u128, created: i64, tool: &str| {
        let mut r = request(n, 1, T + 100_000);
        r.created_ms = created;
        r.tool = tool.into();
        r.rule = "risk_high".into();
        r
    };
    let (a, b, c) = (
        mk(900, T, "shell"),
        mk(901, T + 10, "deploy"),
        mk(902, T + 20, "shell"),
    );
    for r in [&a, &b, &c] {
        queue(store, feed, r).await;
    }
    feed.write(store.vote(a.id, vote("uid:7", true, T + 1_500), ADMIN))
        .await
        .0
        .unwrap()
        .unwrap();
    feed.write(store.cancel(b.id, "agent:agent-a".into(), None, T + 30))
        .await
        .0
        .unwrap()
        .unwrap();
    let rows = store.requests_since(T, 10).await.unwrap();
    let seen: Vec<StatsSeen<'_>> = rows
        .iter()
        .map(|r| {
            (
                r.tool.as_str(),
                r.state,
                r.decided_by,
                r.decided_who.as_deref(),
                r.created_ms,
                r.decided_ms,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("shell", State::Pending, None, None, T + 20, None),
            (
                "deploy",
                State::Cancelled,
                Some(DecidedBy::Cancel),
                Some("agent:agent-a"),
                T + 10,
                Some(T + 30)
            ),
            (
                "shell",
                State::Approved,
                Some(DecidedBy::Human),
                Some("uid:7"),
                T,
                Some(T + 1_500)
            ),
        ]
    );
    assert!(rows
        .iter()
        .all(|r| r.agent == "agent-a" && r.rule == "risk_high"));
    // Bounded: the newest first.
    let two = store.requests_since(T, 2).await.unwrap();
    assert_eq!(
        two.iter().map(|r| r.created_ms).collect::<Vec<_>>(),
        [T + 20, T + 10]
    );
    assert_eq!(store.requests_since(T + 11, 10).await.unwrap().len(), 1);
    // Close the last one so later chapters see no extra pending request.
    feed.write(store.cancel(c.id, "agent:agent-a".into(), None, T + 40))
        .await
        .0
        .unwrap()
        .unwrap();
}

async fn rights(store: &dyn Store, feed: &mut Feed) {
    // A critical request: admins only, checked on the stored row.
    let mut r = request(7, 1, 100_000);
    r.admin_only = true;
    queue(store, feed, &r).await;
    let not_admin = VoterRights::default();
    let refused = feed
        .silent(store.vote(r.id, vote("discord:5", true, 2_000), not_admin))
        .await;
    assert_eq!(refused.unwrap().unwrap_err(), TransitionError::AdminOnly);
    assert!(
        store.votes(r.id).await.unwrap().is_empty(),
        "nothing stored"
    );
    let (ok, _) = feed
        .write(store.vote(r.id, vote("uid:1", true, 2_001), ADMIN))
        .await;
    assert_eq!(ok.unwrap().unwrap().request.state, State::Approved);

    // The requester (uid or agent) may not vote unless allowed.
    let mut r = request(8, 1, 100_000);
    r.requester_uid = Some(1000);
    queue(store, feed, &r).await;
    for voter in ["uid:1000", "agent:agent-a"] {
        let refused = feed
            .silent(store.vote(r.id, vote(voter, true, 2_000), ADMIN))
            .await;
        assert_eq!(
            refused.unwrap().unwrap_err(),
            TransitionError::SelfApproval {
                voter: voter.into()
            }
        );
    }
    assert!(
        store.votes(r.id).await.unwrap().is_empty(),
        "nothing stored"
    );
    let allowed = VoterRights {
        may_self_approve: true,
        ..ADMIN
    };
    let (ok, _) = feed
        .write(store.vote(r.id, vote("uid:1000", true, 2_001), allowed))
        .await;
    assert_eq!(ok.unwrap().unwrap().request.state, State::Approved);
}

async fn policy(store: &dyn Store, feed: &mut Feed) {
    let g = Grant {
        scope: "global".parse().unwrap(),
        tool: "read_*".parse().unwrap(),
        effect: Effect::Allow,
        source: "store".into(),
    };
    let audit = || events::grant_added(4_000, "uid:0", &g);
    let (added, change) = feed
        .write(store.add_grant(g.clone(), "uid:0".into(), 4_000, audit()))
        .await;
    assert!(added.unwrap());
    assert!(matches!(change, Change::PolicyChanged));
    let stored = store.grants().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].grant, g);
    assert_eq!(
        (stored[0].created_by.as_str(), stored[0].created_ms),
        ("uid:0", 4_000)
    );
    assert_eq!(last_audit_kind(store).await, "grant_added");
    let head = store.audit_head().await.unwrap();
    let again = feed
        .silent(store.add_grant(g.clone(), "uid:0".into(), 4_001, audit()))
        .await;
    assert!(!again.unwrap());
    assert_eq!(
        store.audit_head().await.unwrap(),
        head,
        "no effect, no entry"
    );

    let removed = || events::grant_removed(4_002, "uid:0", &g.scope, &g.tool, g.effect);
    let (gone, change) = feed
        .write(store.remove_grant(g.scope.clone(), g.tool.clone(), g.effect, removed()))
        .await;
    assert!(gone.unwrap());
    assert!(matches!(change, Change::PolicyChanged));
    assert!(store.grants().await.unwrap().is_empty());
    assert_eq!(last_audit_kind(store).await, "grant_removed");
    let again = feed
        .silent(store.remove_grant(g.scope.clone(), g.tool.clone(), g.effect, removed()))
        .await;
    assert!(!again.unwrap());
    assert_eq!(store.audit_head().await.unwrap().0, head.0 + 1);

    let (set, change) = feed
        .write(store.set_tool_risk(
            "rm".into(),
            Some(Risk::Critical),
            "uid:0".into(),
            4_003,
            events::risk_set(4_003, "uid:0", "rm", Some(Risk::Critical)),
        ))
        .await;
    set.unwrap();
    assert!(matches!(change, Change::PolicyChanged));
    assert_eq!(
        store.tool_risks().await.unwrap(),
        [("rm".to_string(), Risk::Critical)]
    );
    assert_eq!(last_audit_kind(store).await, "risk_set");
    feed.write(store.set_tool_risk(
        "rm".into(),
        None,
        "uid:0".into(),
        4_004,
        events::risk_set(4_004, "uid:0", "rm", None),
    ))
    .await
    .0
    .unwrap();
    assert!(store.tool_risks().await.unwrap().is_empty());
}

/// Time-boxed grants: stored with every field, audited, announced as a
/// policy change, expired ones still listed (evaluation ignores them),
/// removed by id once.
async fn timed_grants(store: &dyn Store, feed: &mut Feed) {
    use keyturn::domain::timed::{TimedGrant, TimedScopeKind};
    assert!(store.timed_grants().await.unwrap().is_empty());
    let call = TimedGrant {
        id: "tg-0000000000000001".into(),
        agent: "agent-a".into(),
        tool: "delete_file".into(),
        kind: TimedScopeKind::Call,
        user_id: None,
        args_hash: Some("hash-1".into()),
        expires_ms: Some(4_600),
        created_by: "discord:100".into(),
        created_ms: 4_500,
        origin_request: RequestId(Uuid::from_u128(1)).to_string(),
        by_admin: false,
    };
    let user = TimedGrant {
        id: "tg-0000000000000002".into(),
        kind: TimedScopeKind::AgentToolUser,
        user_id: Some("42".into()),
        args_hash: None,
        expires_ms: None,
        created_ms: 4_501,
        by_admin: true,
        ..call.clone()
    };
    for g in [&call, &user] {
        let (done, change) = feed
            .write(store.add_timed_grant(
                g.clone(),
                events::timed_grant_added(g.created_ms, &g.created_by, g),
            ))
            .await;
        done.unwrap();
        assert!(matches!(change, Change::PolicyChanged));
        assert_eq!(last_audit_kind(store).await, "grant_added");
    }
    assert_eq!(
        store.timed_grants().await.unwrap(),
        vec![call.clone(), user.clone()]
    );
    let tail = store.audit_tail(1).await.unwrap();
    assert_eq!(tail[0].event.detail["grant_id"], user.id.as_str());
    assert_eq!(tail[0].event.detail["expires_ms"], serde_json::Value::Null);

    // The same id twice is an error, not a second grant.
    assert!(store
        .add_timed_grant(call.clone(), events::timed_grant_added(4_502, "x", &call))
        .await
        .is_err());
    assert_eq!(store.timed_grants().await.unwrap().len(), 2);

    let removed = || events::timed_grant_removed(4_700, "uid:0", &call.id);
    let (gone, change) = feed
        .write(store.remove_timed_grant(call.id.clone(), removed()))
        .await;
    assert!(gone.unwrap());
    assert!(matches!(change, Change::PolicyChanged));
    assert_eq!(last_audit_kind(store).await, "grant_removed");
    let head = store.audit_head().await.unwrap();
    let again = feed
        .silent(store.remove_timed_grant(call.id.clone(), removed()))
        .await;
    assert!(!again.unwrap());
    assert_eq!(
        store.audit_head().await.unwrap(),
        head,
        "no effect, no entry"
    );
    assert_eq!(store.timed_grants().await.unwrap(), vec![user.clone()]);
    feed.write(store.remove_timed_grant(
        user.id.clone(),
        events::timed_grant_removed(4_701, "uid:0", &user.id),
    ))
    .await
    .0
    .unwrap();
    assert!(store.timed_grants().await.unwrap().is_empty());
}

async fn pairings(store: &dyn Store, feed: &mut Feed) {
    let code = "ACDEFGHJKM";
    let requested = |user: &str| events::pairing_requested(5_000, user, 65_000);
    let created = feed
        .silent(store.create_pairing_code(
            "42".into(),
            Some("Ann".into()),
            pairing::hash_code(code),
            5_000,
            65_000,
            1,
            requested("42"),
        ))
        .await;
    assert_eq!(created.unwrap(), Ok(()));
    assert_eq!(last_audit_kind(store).await, "pairing_requested");
    let live = store.pairing_codes(5_000).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(
        (live[0].user_id.as_str(), live[0].expires_ms),
        ("42", 65_000)
    );
    assert!(
        store.pairing_codes(65_000).await.unwrap().is_empty(),
        "expired"
    );
    let full = feed
        .silent(store.create_pairing_code(
            "43".into(),
            None,
            pairing::hash_code("CCCCCCCCCC"),
            5_000,
            65_000,
            1,
            requested("43"),
        ))
        .await;
    assert_eq!(full.unwrap(), Err(PairingRefused::TooManyCodes(1)));

    let approved: fn(&PairedUser) -> _ =
        |u| events::pairing_approved(u.paired_ms, &u.paired_by, &u.user_id);
    let wrong = feed
        .silent(store.redeem_pairing_code("XXXXXXXXXX".into(), "uid:0".into(), 6_000, approved))
        .await;
    assert!(wrong.unwrap().is_none());
    let (user, change) = feed
        .write(store.redeem_pairing_code(code.into(), "uid:0".into(), 6_000, approved))
        .await;
    let user = user.unwrap().unwrap();
    assert_eq!(
        (user.user_id.as_str(), user.display_name.as_deref()),
        ("42", Some("Ann"))
    );
    assert!(matches!(change, Change::PolicyChanged));
    assert_eq!(
        store.paired_users().await.unwrap(),
        std::slice::from_ref(&user)
    );
    let entry = &store.audit_tail(1).await.unwrap()[0].event;
    assert_eq!(
        (entry.kind.as_str(), entry.actor.as_str(), &entry.detail),
        ("pairing_approved", "uid:0", &json!({"user_id": "42"}))
    );
    let used = feed
        .silent(store.redeem_pairing_code(code.into(), "uid:0".into(), 6_001, approved))
        .await;
    assert!(used.unwrap().is_none(), "a code is redeemed once");
    let paired = feed
        .silent(store.create_pairing_code(
            "42".into(),
            None,
            pairing::hash_code(code),
            6_002,
            66_000,
            5,
            requested("42"),
        ))
        .await;
    assert_eq!(
        paired.unwrap(),
        Err(PairingRefused::AlreadyPaired("42".into()))
    );

    let (gone, change) = feed
        .write(store.unpair_user("42".into(), events::pairing_revoked(6_003, "uid:0", "42")))
        .await;
    assert!(gone.unwrap());
    assert!(matches!(change, Change::PolicyChanged));
    assert!(store.paired_users().await.unwrap().is_empty());
    assert_eq!(last_audit_kind(store).await, "pairing_revoked");
    let again = feed
        .silent(store.unpair_user("42".into(), events::pairing_revoked(6_004, "uid:0", "42")))
        .await;
    assert!(!again.unwrap());

    let bob = PairedUser {
        user_id: "77".into(),
        roles: vec!["ops".into()],
        display_name: None,
        paired_by: "uid:0".into(),
        paired_ms: 6_005,
    };
    let audit = || events::user_paired(6_005, "uid:0", "77", &bob.roles);
    let (added, change) = feed.write(store.pair_user(bob.clone(), audit())).await;
    assert!(added.unwrap());
    assert!(matches!(change, Change::PolicyChanged));
    assert_eq!(last_audit_kind(store).await, "user_paired");
    let again = feed.silent(store.pair_user(bob.clone(), audit())).await;
    assert!(!again.unwrap());
    assert_eq!(store.paired_users().await.unwrap(), [bob]);
}

/// Agents' bearer tokens: stored with the secret's hash only, a rotation
/// shortens the agent's other live tokens (never lengthens one), a revoke
/// acts once; every write audited and published as a policy change.
async fn tokens(store: &dyn Store, feed: &mut Feed) {
    let token = |id: &str, agent: &str, expires_ms: Option<i64>| AgentToken {
        id: id.into(),
        agent: agent.into(),
        secret_hash: format!("hash-{id}"),
        created_ms: 1_000,
        created_by: "uid:0".into(),
        expires_ms,
        revoked_ms: None,
    };
    let issued = |id: &str, agent: &str, others: Option<i64>| {
        events::token_issued(1_000, "uid:0", id, agent, None, others)
    };
    for (id, agent, expires) in [
        ("a1", "bot", None),
        ("a2", "bot", Some(5_000)),
        ("b1", "other", None),
    ] {
        let (n, change) = feed
            .write(store.issue_token(token(id, agent, expires), None, issued(id, agent, None)))
            .await;
        assert_eq!(n.unwrap(), 0);
        assert!(matches!(change, Change::PolicyChanged));
    }
    assert_eq!(last_audit_kind(store).await, "token_issued");
    // Rotation: bot's other tokens expire at 3_000 (a2's later expiry is
    // brought forward); the other agent's token is untouched.
    let (n, _) = feed
        .write(store.issue_token(
            token("a3", "bot", None),
            Some(3_000),
            issued("a3", "bot", Some(3_000)),
        ))
        .await;
    assert_eq!(n.unwrap(), 2);
    assert_eq!(last_audit_kind(store).await, "token_rotated");
    let by_id = |list: &[AgentToken], id: &str| list.iter().find(|t| t.id == id).cloned().unwrap();
    let list = store.tokens().await.unwrap();
    assert_eq!(list.len(), 4);
    assert_eq!(by_id(&list, "a1").expires_ms, Some(3_000));
    assert_eq!(by_id(&list, "a2").expires_ms, Some(3_000));
    assert_eq!(by_id(&list, "a3").expires_ms, None);
    assert_eq!(by_id(&list, "b1").expires_ms, None);
    assert_eq!(by_id(&list, "a3").secret_hash, "hash-a3");
    // A shorter expiry is never lengthened by a later rotation.
    let (n, _) = feed
        .write(store.issue_token(
            token("a4", "bot", None),
            Some(9_000),
            issued("a4", "bot", Some(9_000)),
        ))
        .await;
    assert_eq!(n.unwrap(), 1, "only a3 outlived 9_000");
    assert_eq!(
        store.token("a1").await.unwrap().unwrap().expires_ms,
        Some(3_000)
    );
    // Revoke: once.
    let (done, change) = feed
        .write(store.revoke_token(
            "b1".into(),
            2_000,
            events::token_revoked(2_000, "uid:0", "b1", "other"),
        ))
        .await;
    assert!(done.unwrap());
    assert!(matches!(change, Change::PolicyChanged));
    assert_eq!(last_audit_kind(store).await, "token_revoked");
    let again = feed
        .silent(store.revoke_token(
            "b1".into(),
            2_500,
            events::token_revoked(2_500, "uid:0", "b1", "other"),
        ))
        .await;
    assert!(!again.unwrap());
    assert_eq!(
        store.token("b1").await.unwrap().unwrap().revoked_ms,
        Some(2_000)
    );
    assert!(store.token("nope").await.unwrap().is_none());
}

fn pause(agent: &str, by: &str, since_ms: i64, reason: Option<&str>) -> Pause {
    Pause {
        agent: agent.into(),
        paused_by: by.into(),
        since_ms,
        reason: reason.map(Into::into),
    }
}

/// The kill switch: a pause is written once (audited, `PolicyChanged`), a
/// second pause keeps the first's author, resume lifts it once.
async fn pauses(store: &dyn Store, feed: &mut Feed) {
    assert!(store.pauses().await.unwrap().is_empty());
    let bot = pause("bot", "uid:0", 1_000, Some("runaway"));
    let (done, change) = feed
        .write(store.pause_agent(
            bot.clone(),
            events::agent_paused(1_000, "uid:0", "bot", Some("runaway")),
        ))
        .await;
    assert!(done.unwrap());
    assert!(matches!(change, Change::PolicyChanged));
    assert_eq!(last_audit_kind(store).await, "agent_paused");
    // Twice: nothing written, nothing audited, nothing published.
    let again = feed
        .silent(store.pause_agent(
            pause("bot", "uid:1", 2_000, None),
            events::agent_paused(2_000, "uid:1", "bot", None),
        ))
        .await;
    assert!(!again.unwrap());
    let all = pause(ALL_AGENTS, "discord:7", 3_000, None);
    let (done, _) = feed
        .write(store.pause_agent(
            all.clone(),
            events::agent_paused(3_000, "discord:7", ALL_AGENTS, None),
        ))
        .await;
    assert!(done.unwrap());
    assert_eq!(store.pauses().await.unwrap(), vec![bot.clone(), all]);
    // Resume the global pause: once.
    let (done, change) = feed
        .write(store.resume_agent(
            ALL_AGENTS.into(),
            events::agent_resumed(4_000, "uid:0", ALL_AGENTS),
        ))
        .await;
    assert!(done.unwrap());
    assert!(matches!(change, Change::PolicyChanged));
    assert_eq!(last_audit_kind(store).await, "agent_resumed");
    let again = feed
        .silent(store.resume_agent(
            ALL_AGENTS.into(),
            events::agent_resumed(4_500, "uid:0", ALL_AGENTS),
        ))
        .await;
    assert!(!again.unwrap());
    assert_eq!(last_audit_kind(store).await, "agent_resumed");
    // `bot` stays paused for the restart checks below (see
    // `*_pause_survives_reopening`); the story goes on without it.
    assert_eq!(store.pauses().await.unwrap(), vec![bot]);
}

#[tokio::test]
async fn sqlite_pause_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let p = pause("bot", "cli:alice", 1_000, Some("loop"));
    let store = SqliteStore::open_with(&url, &Options::default())
        .await
        .unwrap();
    assert!(store
        .pause_agent(
            p.clone(),
            events::agent_paused(1_000, "cli:alice", "bot", Some("loop"))
        )
        .await
        .unwrap());
    store.close().await;
    let store = SqliteStore::open_with(&url, &Options::default())
        .await
        .unwrap();
    assert_eq!(store.pauses().await.unwrap(), vec![p]);
    store.close().await;
}

#[tokio::test]
async fn postgres_pause_survives_reopening_and_is_shared() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let p = pause("bot", "cli:alice", 1_000, None);
    let a = PgStore::open(&schema.url(), &PgOptions::default())
        .await
        .unwrap();
    let b = PgStore::open(&schema.url(), &PgOptions::default())
        .await
        .unwrap();
    let mut heard = b.subscribe();
    assert!(a
        .pause_agent(
            p.clone(),
            events::agent_paused(1_000, "cli:alice", "bot", None)
        )
        .await
        .unwrap());
    // The other process hears of it, and reads it.
    let change = tokio::time::timeout(Duration::from_secs(10), next_change(&mut heard))
        .await
        .expect("the other store hears the pause")
        .unwrap();
    assert!(matches!(change, Change::PolicyChanged), "{change:?}");
    assert_eq!(b.pauses().await.unwrap(), vec![p.clone()]);
    a.close().await;
    b.close().await;
    let c = PgStore::open(&schema.url(), &PgOptions::default())
        .await
        .unwrap();
    assert_eq!(c.pauses().await.unwrap(), vec![p]);
    c.close().await;
}

async fn cards(store: &dyn Store, feed: &mut Feed) {
    // A pending insert gets its card row, due at once, in the same write.
    let r = request(9, 2, 90_000);
    queue(store, feed, &r).await;
    let card = store.card(r.id).await.unwrap().expect("a card row");
    assert_eq!(
        (card.channel_id, card.message_id, card.want, card.done),
        (CARDS, None, 1, 0)
    );
    assert!(store
        .cards_due(7_000, 100)
        .await
        .unwrap()
        .iter()
        .any(|c| c.request_id == r.id));

    // Posted: done, not due.
    feed.silent(store.card_done(r.id, 900, card.want, "pending".into()))
        .await
        .unwrap();
    let card = store.card(r.id).await.unwrap().unwrap();
    assert_eq!((card.message_id, card.done), (Some(900), 1));
    assert!(card.want <= card.done);
    assert!(!store
        .cards_due(i64::MAX, 100)
        .await
        .unwrap()
        .iter()
        .any(|c| c.request_id == r.id));

    // A partial vote bumps it (the count shows), so does the decision.
    let (_, change) = feed
        .write(store.vote(r.id, vote("uid:1", true, 7_001), ADMIN))
        .await;
    assert!(matches!(change, Change::Voted { .. }));
    let card = store.card(r.id).await.unwrap().unwrap();
    assert!(card.want > card.done, "bumped by the vote");
    let (_, change) = feed
        .write(store.cancel(r.id, "uid:0".into(), None, 7_002))
        .await;
    assert!(matches!(change, Change::Resolved(_)));
    let card = store.card(r.id).await.unwrap().unwrap();
    assert_eq!(card.want, 3, "bumped by the vote and by the cancel");
    assert!(store.cards_backlog().await.unwrap() >= 1);

    // A failed attempt waits for its time; done again once edited.
    feed.silent(store.card_retry_later(r.id, 1, 8_000))
        .await
        .unwrap();
    assert!(!store
        .cards_due(7_999, 100)
        .await
        .unwrap()
        .iter()
        .any(|c| c.request_id == r.id));
    let (n, change) = feed.write(store.cards_retry_now(7_999)).await;
    assert!(n.unwrap() >= 1);
    assert!(matches!(change, Change::CardsDue));
    feed.silent(store.card_done(r.id, 900, card.want, "cancelled".into()))
        .await
        .unwrap();
    let card = store.card(r.id).await.unwrap().unwrap();
    assert_eq!((card.want, card.done), (3, 3));
    assert_eq!(card.rendered_state.as_deref(), Some("cancelled"));
}

async fn deadlines(store: &dyn Store) {
    // Pending now: request 1 alone (deadline 100_000); the rest are decided.
    let pending: Vec<_> = store
        .pending(1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.deadline_ms))
        .collect();
    let earliest = pending.iter().map(|(_, d)| *d).min();
    assert_eq!(store.next_deadline().await.unwrap(), earliest);
    let due = store.due_deadlines(earliest.unwrap(), 10).await.unwrap();
    assert!(!due.is_empty());
    assert!(due.iter().all(|(_, d)| *d <= earliest.unwrap()));
    assert!(store.due_deadlines(0, 10).await.unwrap().is_empty());
    let all = store.due_deadlines(i64::MAX, 1_000).await.unwrap();
    assert_eq!(all.len(), pending.len());
    assert!(all.windows(2).all(|w| w[0].1 <= w[1].1), "earliest first");
    assert_eq!(store.due_deadlines(i64::MAX, 1).await.unwrap().len(), 1);
}

async fn audit(store: &dyn Store) {
    let (entries, requests) = store
        .audit_verify()
        .await
        .unwrap()
        .expect("the chain verifies");
    assert!(entries > 20 && requests >= 9, "{entries} {requests}");
    let head = store.audit_head().await.unwrap();
    let last = store.audit_tail(1).await.unwrap().pop().unwrap();
    assert_eq!(head, (last.seq, last.hash));
}

async fn corrupt(store: &dyn Store, raw: Raw<'_>) {
    let g = Grant {
        scope: "global".parse().unwrap(),
        tool: "delete_*".parse().unwrap(),
        effect: Effect::Deny,
        source: "store".into(),
    };
    let audit = events::grant_added(9_000, "uid:0", &g);
    assert!(store
        .add_grant(g, "uid:0".into(), 9_000, audit)
        .await
        .unwrap());
    assert_eq!(store.grants().await.unwrap().len(), 1);
    // An effect that is neither allow nor deny is never read as allow.
    raw("UPDATE grants SET effect = 'Deny'");
    match store.grants().await {
        Err(StoreError::Corrupt(why)) => assert!(why.contains("Deny"), "{why}"),
        other => panic!("a corrupt effect must not read: {other:?}"),
    }
}

// Several processes on one PostgreSQL database: two stores on one schema
// stand for two processes (each has its own pools, writer and origin).

async fn pg_store(schema: &pg::Schema, cards: Option<u64>) -> Arc<PgStore> {
    let options = PgOptions {
        max_batch: 64,
        cards,
        ..PgOptions::default()
    };
    Arc::new(PgStore::open(&schema.url(), &options).await.unwrap())
}

/// Both appending at once: one chain, every entry in it, verified.
#[tokio::test]
async fn postgres_stores_sharing_a_schema_keep_one_audit_chain() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let (a, b) = (pg_store(&schema, None).await, pg_store(&schema, None).await);
    assert_ne!(a.origin(), b.origin());
    let insert = |store: Arc<PgStore>, from: u128| async move {
        let all = (from..from + 500).map(|n| {
            let r = request(n, 1, 100_000);
            let store = store.clone();
            async move { store.insert_request(r.clone(), submitted(&r)).await }
        });
        futures::future::join_all(all).await
    };
    let started = std::time::Instant::now();
    let (x, y) = tokio::join!(insert(a.clone(), 10_000), insert(b.clone(), 20_000));
    eprintln!("2 × 500 inserts from two stores: {:?}", started.elapsed());
    for answer in x.iter().chain(&y) {
        assert!(matches!(answer, Ok(Inserted::New(_))), "{answer:?}");
    }
    let (entries, requests) = a.audit_verify().await.unwrap().expect("one unbroken chain");
    assert_eq!((entries, requests), (2_000, 1_000));
    assert_eq!(b.audit_head().await.unwrap().0, 2_000);
    a.close().await;
    b.close().await;
}

/// Calls the policy decided, through two stores on one schema: each
/// store's batch goes in one statement from the chain head it last saw,
/// which the other store has often moved meanwhile (the batch then takes
/// the head's lock and appends after it). Taking turns, then both at once,
/// the chain stays one and every call is stored.
#[tokio::test]
async fn postgres_decided_calls_from_two_stores_keep_one_chain() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let (a, b) = (pg_store(&schema, None).await, pg_store(&schema, None).await);
    let decided = |n: u128| {
        let mut r = request(n, 1, 100_000);
        r.state = State::Approved;
        r.decided_by = Some(DecidedBy::Policy);
        r.decided_ms = Some(r.created_ms);
        r
    };
    let insert = |store: Arc<PgStore>, r: ApprovalRequest| async move {
        let events = vec![events::submitted(&r), events::decided_by_policy(&r)];
        store.insert_request(r, events).await
    };
    for n in 0..20u128 {
        let store = if n % 2 == 0 { &a } else { &b };
        let answer = insert(store.clone(), decided(40_000 + n)).await;
        assert!(matches!(answer, Ok(Inserted::New(_))), "{answer:?}");
    }
    let burst = |store: Arc<PgStore>, from: u128| {
        futures::future::join_all((from..from + 300).map(|n| insert(store.clone(), decided(n))))
    };
    let (x, y) = tokio::join!(burst(a.clone(), 41_000), burst(b.clone(), 42_000));
    for answer in x.iter().chain(&y) {
        assert!(matches!(answer, Ok(Inserted::New(_))), "{answer:?}");
    }
    let (entries, requests) = a.audit_verify().await.unwrap().expect("one unbroken chain");
    assert_eq!((entries, requests), (2 * 620, 620));
    assert_eq!(b.audit_head().await.unwrap().0, 2 * 620);
    let stored = b
        .get_request(RequestId(Uuid::from_u128(42_299)))
        .await
        .unwrap();
    assert_eq!(stored.map(|r| r.state), Some(State::Approved));
    a.close().await;
    b.close().await;
}

/// One idempotency key submitted through two stores at once: one stores
/// it, the other answers with the holder (the same call) or refuses it (a
/// different call), never an error.
#[tokio::test]
async fn postgres_one_key_from_two_stores_is_stored_once() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let (a, b) = (pg_store(&schema, None).await, pg_store(&schema, None).await);
    let mut races = Vec::new();
    for n in 0..40u128 {
        let mut first = request(30_000 + n, 1, 100_000);
        first.idempotency_key = Some(format!("key-{n}"));
        let mut second = first.clone();
        second.id = RequestId(Uuid::from_u128(40_000 + n));
        // Odd keys: a different call under the same key.
        if n % 2 == 1 {
            second.args_hash = "another call".into();
        }
        let (a, b) = (a.clone(), b.clone());
        races.push(async move {
            let (x, y) = tokio::join!(
                a.insert_request(first.clone(), submitted(&first)),
                b.insert_request(second.clone(), submitted(&second))
            );
            (n, x.unwrap(), y.unwrap())
        });
    }
    for (n, x, y) in futures::future::join_all(races).await {
        let (new, other) = match (&x, &y) {
            (Inserted::New(r), other) | (other, Inserted::New(r)) => (r.clone(), other),
            _ => panic!("key-{n}: nothing stored: {x:?} {y:?}"),
        };
        match other {
            Inserted::Existing(e) if n % 2 == 0 => assert_eq!(e.id, new.id),
            Inserted::Conflict(e) if n % 2 == 1 => assert_eq!(e.id, new.id),
            other => panic!("key-{n}: {other:?}"),
        }
    }
    a.audit_verify().await.unwrap().expect("the chain verifies");
    a.close().await;
    b.close().await;
}

/// Two votes through two stores at once on a request needing two
/// approvals: the row is locked, so the second counts the first.
/// Two timeouts at once: exactly one wins.
#[tokio::test]
async fn postgres_decisions_from_two_stores_are_taken_once() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let (a, b) = (pg_store(&schema, None).await, pg_store(&schema, None).await);
    let mut races = Vec::new();
    for n in 0..30u128 {
        let r = request(50_000 + n, 2, 5_000);
        a.insert_request(r.clone(), submitted(&r)).await.unwrap();
        let (a, b) = (a.clone(), b.clone());
        races.push(async move {
            let (x, y) = tokio::join!(
                a.vote(r.id, vote("uid:1", true, 2_000), ADMIN),
                b.vote(r.id, vote("uid:2", true, 2_000), ADMIN)
            );
            let mut have: Vec<u32> = [x, y]
                .into_iter()
                .map(|v| v.unwrap().unwrap().have)
                .collect();
            have.sort();
            assert_eq!(have, [1, 2], "the second vote counted the first");
            assert_eq!(state(&*a, r.id).await, State::Approved);
        });
    }
    futures::future::join_all(races).await;
    let mut races = Vec::new();
    for n in 0..30u128 {
        let r = request(60_000 + n, 1, 5_000);
        a.insert_request(r.clone(), submitted(&r)).await.unwrap();
        let (a, b) = (a.clone(), b.clone());
        races.push(async move {
            let (x, y) = tokio::join!(a.time_out(r.id, 6_000), b.time_out(r.id, 6_000));
            let (x, y) = (x.unwrap(), y.unwrap());
            assert!(
                x.is_ok() != y.is_ok(),
                "exactly one timeout wins: {x:?} {y:?}"
            );
            let lost = if x.is_ok() { y } else { x };
            assert!(matches!(
                lost,
                Err(TransitionError::AlreadyDecided {
                    state: State::TimedOut
                })
            ));
        });
    }
    futures::future::join_all(races).await;
    let (entries, requests) = b.audit_verify().await.unwrap().expect("the chain verifies");
    assert_eq!(requests, 60);
    assert!(entries > 120, "{entries}");
    a.close().await;
    b.close().await;
}

/// Two stores draining the card outbox at once never get the same card; a
/// claim lapses after 30 s (of the callers' clock), and posting clears it.
#[tokio::test]
async fn postgres_cards_are_claimed_by_one_store() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let (a, b) = (
        pg_store(&schema, Some(CARDS)).await,
        pg_store(&schema, Some(CARDS)).await,
    );
    for n in 0..40u128 {
        let r = request(70_000 + n, 1, 100_000 + n as i64);
        a.insert_request(r.clone(), submitted(&r)).await.unwrap();
    }
    let (x, y) = tokio::join!(a.cards_due(1_000, 25), b.cards_due(1_000, 25));
    let (x, y) = (x.unwrap(), y.unwrap());
    let mut seen: Vec<RequestId> = x.iter().chain(&y).map(|c| c.request_id).collect();
    assert_eq!(seen.len(), 40, "{} + {}", x.len(), y.len());
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 40, "no card given to both");
    assert!(x.windows(2).all(|w| w[0].deadline_ms <= w[1].deadline_ms));
    // Claimed: the other store gets nothing now; its own store gets them again.
    assert!(a.cards_due(2_000, 100).await.unwrap().len() == x.len());
    // A's cards: one posted (claim cleared, done), the rest lapse for B.
    let posted = x[0].request_id;
    a.card_done(posted, 1, 1, "pending".into()).await.unwrap();
    assert!(b.cards_due(2_000, 100).await.unwrap().len() == y.len());
    let lapsed = b.cards_due(2_000 + 30_000, 100).await.unwrap();
    assert_eq!(lapsed.len(), 39, "every card but the posted one");
    assert!(lapsed.iter().all(|c| c.request_id != posted));
    // An outbox that starts (its process now leads) releases every claim
    // at once: a card claimed by a leader that died is not held until the
    // claim lapses.
    let again = a.cards_due(40_000, 100).await.unwrap();
    assert!(again.is_empty(), "B's claims hold: {}", again.len());
    a.card_reconcile(CARDS).await.unwrap();
    let released = a.cards_due(40_000, 100).await.unwrap();
    assert_eq!(released.len(), 39, "released by the reconcile");
    a.close().await;
    b.close().await;
}

/// Sessions killed under a busy store (a database restart, a cut): every
/// write answers, either committed or `Unavailable`/retryable; the pool
/// reconnects by itself; nothing acknowledged is lost.
#[tokio::test]
async fn postgres_store_survives_killed_sessions() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let app = format!("kt-kill-{}", &schema.name()[3..11]);
    let options = PgOptions {
        max_batch: 64,
        cards: None,
        ..PgOptions::default()
    };
    let store = Arc::new(
        PgStore::open(&schema.url_named(&app), &options)
            .await
            .unwrap(),
    );
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for round in 0..20u128 {
                let batch = (0..25u128).map(|i| {
                    let r = request(80_000 + round * 100 + i, 1, 100_000);
                    let store = store.clone();
                    async move { (r.id, store.insert_request(r.clone(), submitted(&r)).await) }
                });
                outcomes.extend(futures::future::join_all(batch).await);
            }
            outcomes
        })
    };
    let mut killed = 0;
    while !writer.is_finished() {
        killed += schema.terminate(&app);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcomes = writer.await.unwrap();
    let (mut stored, mut refused) = (Vec::new(), 0);
    for (id, outcome) in outcomes {
        match outcome {
            Ok(Inserted::New(_)) => stored.push(id),
            Err(e) if e.is_retryable() => refused += 1,
            // Its commit went through but the answer was lost with the
            // session, and running it again found the row: refused, and
            // stored (the caller denies; nothing is lost).
            Err(StoreError::Conflict { retry: false, .. }) => {
                refused += 1;
                stored.push(id);
            }
            other => panic!("{other:?}"),
        }
    }
    eprintln!(
        "{killed} sessions killed; {} writes committed, {refused} refused",
        stored.len()
    );
    // It serves again once the sessions are back, without a restart.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    assert!(!stored.is_empty(), "nothing was committed at all");
    loop {
        match store.get_request(stored[0]).await {
            Ok(found) => {
                assert!(found.is_some());
                break;
            }
            Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    for id in &stored {
        assert!(
            store.get_request(*id).await.unwrap().is_some(),
            "an acknowledged write is lost"
        );
    }
    let r = request(99_999, 1, 100_000);
    assert!(matches!(
        store
            .insert_request(r.clone(), submitted(&r))
            .await
            .unwrap(),
        Inserted::New(_)
    ));
    store
        .audit_verify()
        .await
        .unwrap()
        .expect("the chain verifies");
    store.close().await;
}

/// One agent's `max_pending` holds across stores queueing at once.
#[tokio::test]
async fn postgres_max_pending_holds_across_stores() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let (a, b) = (pg_store(&schema, None).await, pg_store(&schema, None).await);
    let queue = |store: Arc<PgStore>, from: u128| async move {
        let all = (from..from + 20).map(|n| {
            let r = request(n, 1, 100_000);
            let store = store.clone();
            async move {
                store
                    .insert_guarded(r.clone(), submitted(&r), None, 10)
                    .await
            }
        });
        futures::future::join_all(all).await
    };
    let (x, y) = tokio::join!(queue(a.clone(), 90_000), queue(b.clone(), 91_000));
    let mut stored = 0;
    for answer in x.into_iter().chain(y) {
        match answer.unwrap() {
            Inserted::New(_) => stored += 1,
            Inserted::TooManyPending { max: 10 } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stored, 10);
    assert_eq!(a.pending_counts().await.unwrap(), [("agent-a".into(), 10)]);
    a.close().await;
    b.close().await;
}

/// Each committed change is noted for the other processes, in its own
/// transaction, with this store's origin; a write that changed nothing
/// anyone follows, or failed, sends nothing.
#[tokio::test]
async fn postgres_notes_each_committed_change() {
    use keyturn::store::postgres::notify::{self, Note};
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let store = pg_store(&schema, Some(CARDS)).await;
    let mut listener = sqlx::postgres::PgListener::connect(&schema.url())
        .await
        .unwrap();
    let channel = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&schema.url()).await.unwrap();
        notify::channel(&mut c).await.unwrap()
    };
    assert!(channel.starts_with(notify::CHANNEL), "{channel}");
    listener.listen(&channel).await.unwrap();
    let r = request(95_000, 2, 100_000);
    store
        .insert_request(r.clone(), submitted(&r))
        .await
        .unwrap();
    let e = next_note(&mut listener, &store).await;
    assert_eq!(e.origin, store.origin());
    assert_eq!(
        e.note,
        Note::Queued {
            id: r.id.to_string(),
            agent: "agent-a".into(),
            deadline_ms: 100_000
        }
    );
    // Nothing for a call the policy decided, nor for a failed write.
    let mut allowed = request(95_001, 1, 100_000);
    allowed.state = State::Approved;
    allowed.decided_by = Some(DecidedBy::Policy);
    store.insert_request(allowed.clone(), vec![]).await.unwrap();
    assert!(store.insert_request(allowed, vec![]).await.is_err());
    store
        .vote(r.id, vote("uid:1", true, 2_000), ADMIN)
        .await
        .unwrap()
        .unwrap();
    let id = r.id.to_string();
    assert_eq!(
        next_note(&mut listener, &store).await.note,
        Note::Voted { id: id.clone() }
    );
    store
        .vote(r.id, vote("uid:2", true, 2_001), ADMIN)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next_note(&mut listener, &store).await.note,
        Note::Resolved { id }
    );
    let g = Grant {
        scope: "global".parse().unwrap(),
        tool: "x".parse().unwrap(),
        effect: Effect::Allow,
        source: "store".into(),
    };
    let audit = events::grant_added(3_000, "uid:0", &g);
    assert!(store
        .add_grant(g, "uid:0".into(), 3_000, audit)
        .await
        .unwrap());
    assert_eq!(
        next_note(&mut listener, &store).await.note,
        Note::PolicyChanged
    );
    store.card_retry_later(r.id, 1, 50_000).await.unwrap();
    assert!(store.cards_retry_now(4_000).await.unwrap() > 0);
    assert_eq!(next_note(&mut listener, &store).await.note, Note::CardsDue);
    store.close().await;
}

/// The next note from `store` heard, within 10 s. Notifications are
/// database-wide: stores of other tests (in other schemas) are heard too,
/// and skipped by their origin.
async fn next_note(
    listener: &mut sqlx::postgres::PgListener,
    store: &PgStore,
) -> keyturn::store::postgres::notify::Envelope {
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a note within 10 s")
            .unwrap();
        let e = keyturn::store::postgres::notify::parse(n.payload()).expect("a note");
        if e.origin == store.origin() {
            return e;
        }
    }
}

/// Retention: the oldest prefix goes, a checkpoint accounts for it, and
/// the log still verifies (the same on both backends).
async fn prunes(store: Arc<dyn Store>) {
    for (n, created) in (0..10)
        .map(|n| (n, 1_000))
        .chain((10..15).map(|n| (n, 5_000)))
    {
        let mut r = request(97_000 + n, 1, 100_000);
        r.created_ms = created;
        store
            .insert_request(r.clone(), submitted(&r))
            .await
            .unwrap();
    }
    let pruned = store.prune_audit(3_000, 6_000).await.unwrap().unwrap();
    assert_eq!((pruned.entries, pruned.through_seq), (20, 20));
    let (entries, requests) = store.audit_verify().await.unwrap().expect("verifies");
    assert_eq!((entries, requests), (11, 15));
    assert_eq!(store.audit_after(0, 1).await.unwrap()[0].seq, 21);
    assert!(store.prune_audit(3_000, 7_000).await.unwrap().is_none());
    store.close().await;
}

#[tokio::test]
async fn sqlite_prunes_the_audit_log_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    prunes(Arc::new(
        SqliteStore::open(&url, "normal", 64).await.unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn postgres_prunes_the_audit_log_with_a_checkpoint() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    prunes(pg_store(&schema, None).await).await;
}

// The process registry (runs of tools Keyturn runs itself), on both
// backends: the run plan a request carries, one run per request, how a run
// ended, kills (heard by every process sharing a PostgreSQL schema), the
// card re-rendered with the run, and the audit chain.

#[tokio::test]
async fn sqlite_keeps_the_runs_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let url = format!("sqlite://{}", path.display());
    let options = Options {
        max_batch: 64,
        cards: Some(CARDS),
        ..Options::default()
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(&url, &options).await.unwrap());
    let raw = move |sql: &str| {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c.execute_batch(sql).unwrap();
    };
    runs_story(store.clone(), None, &raw).await;
    store.close().await;
}

#[tokio::test]
async fn postgres_keeps_the_runs_contract() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let store: Arc<dyn Store> = pg_store(&schema, Some(CARDS)).await;
    // Another process on the same schema: it hears kills asked for here.
    let peer: Arc<dyn Store> = pg_store(&schema, Some(CARDS)).await;
    let raw = |sql: &str| schema.exec(sql);
    runs_story(store.clone(), Some(peer.clone()), &raw).await;
    store.close().await;
    peer.close().await;
}

fn plan(program: &str) -> RunPlan {
    RunPlan {
        argv: vec![program.into(), "--".into(), "/srv/data/x.txt".into()],
        profile: Profile::Bwrap,
        network: Network::None,
        writable: vec!["/srv/out".into()],
        credentials: vec!["kubeconfig".into()],
        timeout_ms: 60_000,
    }
}

fn run_record(id: &str, r: &ApprovalRequest, started_ms: i64) -> RunRecord {
    RunRecord {
        id: id.into(),
        request_id: r.id,
        agent: r.agent.clone(),
        tool: r.tool.clone(),
        argv: r.run.as_ref().map(|p| p.argv.clone()).unwrap_or_default(),
        profile: Profile::Bwrap,
        pid: None,
        host: "host-1".into(),
        server_pid: 4_000,
        approved_by: "uid:1".into(),
        started_ms,
        deadline_ms: started_ms + 60_000,
        state: RunState::Running,
        ended_ms: None,
        exit_code: None,
        signal: None,
        stdout_sha256: None,
        stderr_sha256: None,
        kill_requested_by: None,
    }
}

fn run_event(kind: &str, at_ms: i64, run: &RunRecord) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind: kind.into(),
        actor: "system".into(),
        request_id: Some(run.request_id.to_string()),
        detail: json!({ "run_id": run.id }),
    }
}

/// The next change that `pred` accepts, within 10 s (others are skipped).
async fn wait_for(
    rx: &mut broadcast::Receiver<Change>,
    what: &str,
    pred: impl Fn(&Change) -> bool,
) -> Change {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Ok(c) if pred(&c) => return c,
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => panic!("the feed closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within 10 s"))
}

/// The changes published so far (a write publishes before it returns),
/// without the periodic re-checks.
fn published(rx: &mut broadcast::Receiver<Change>) -> Vec<Change> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(Change::Resync) | Err(TryRecvError::Lagged(_)) => continue,
            Ok(c) => out.push(c),
            Err(_) => return out,
        }
    }
}

async fn want(store: &dyn Store, id: RequestId) -> i64 {
    store.card(id).await.unwrap().expect("a card row").want
}

async fn runs_story(store: Arc<dyn Store>, peer: Option<Arc<dyn Store>>, raw: Raw<'_>) {
    let mut rx = store.subscribe();
    let mut peer_rx = peer.as_ref().map(|p| p.subscribe());

    // A run plan round-trips, with and without an idempotency key (on
    // PostgreSQL a request without one is inserted in the batch's rows).
    let mut keyed = request(70_001, 1, 100_000);
    keyed.idempotency_key = Some("run-key".into());
    keyed.run = Some(plan("cat"));
    let mut plain = request(70_002, 1, 100_000);
    plain.run = Some(plan("ls"));
    let other = request(70_003, 1, 100_000);
    for r in [&keyed, &plain, &other] {
        let ins = store
            .insert_guarded(r.clone(), submitted(r), None, 100)
            .await
            .unwrap();
        assert!(matches!(ins, Inserted::New(_)), "{ins:?}");
        let stored = store.get_request(r.id).await.unwrap().unwrap();
        assert_eq!(stored.run, r.run, "request {}", r.id);
    }
    let pending = store.pending(100).await.unwrap();
    let read = |id: RequestId| pending.iter().find(|p| p.id == id).unwrap().run.clone();
    assert_eq!(read(keyed.id), Some(plan("cat")));
    assert_eq!(read(plain.id), Some(plan("ls")));
    assert_eq!(read(other.id), None);
    // A policy-decided call with a plan (it gets no card row).
    let mut allowed = request(70_004, 1, 100_000);
    allowed.state = State::Approved;
    allowed.decided_by = Some(DecidedBy::Policy);
    allowed.decided_ms = Some(1_000);
    allowed.run = Some(plan("echo"));
    store
        .insert_guarded(
            allowed.clone(),
            vec![events::decided_by_policy(&allowed)],
            None,
            100,
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_request(allowed.id).await.unwrap().unwrap().run,
        Some(plan("echo"))
    );
    for r in [&keyed, &plain] {
        store
            .vote(r.id, vote("uid:1", true, 1_500), ADMIN)
            .await
            .unwrap()
            .unwrap();
    }
    published(&mut rx);

    // Registered: audited, the card marked due and published.
    let first = run_record("run-1", &keyed, 2_000);
    let before = want(&*store, keyed.id).await;
    let head = store.audit_head().await.unwrap();
    store
        .run_started(first.clone(), run_event("run_started", 2_000, &first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last_audit_kind(&*store).await, "run_started");
    assert_eq!(store.audit_head().await.unwrap().0, head.0 + 1);
    assert_eq!(want(&*store, keyed.id).await, before + 1, "card bumped");
    assert!(
        published(&mut rx)
            .iter()
            .any(|c| matches!(c, Change::CardsDue)),
        "cards due after the commit"
    );
    assert_eq!(store.run("run-1").await.unwrap().as_ref(), Some(&first));
    assert_eq!(
        store.run_of_request(keyed.id).await.unwrap().as_ref(),
        Some(&first)
    );

    // A request runs at most once: refused, nothing written or audited.
    let head = store.audit_head().await.unwrap();
    let again = run_record("run-1b", &keyed, 2_100);
    let refused = store
        .run_started(again.clone(), run_event("run_started", 2_100, &again))
        .await
        .unwrap();
    assert_eq!(
        refused,
        Err(RunRefused::AlreadyRun {
            request_id: keyed.id.to_string(),
            run_id: "run-1".into()
        })
    );
    assert_eq!(store.audit_head().await.unwrap(), head, "no audit");
    assert!(store.run("run-1b").await.unwrap().is_none());
    assert_eq!(want(&*store, keyed.id).await, before + 1);

    // The pid, once the process started: the card is due again to show it.
    store.run_pid("run-1", 4242).await.unwrap();
    assert_eq!(store.run("run-1").await.unwrap().unwrap().pid, Some(4242));
    assert_eq!(want(&*store, keyed.id).await, before + 2, "card bumped");
    assert!(published(&mut rx)
        .iter()
        .any(|c| matches!(c, Change::CardsDue)));
    assert!(store.run_pid("no-such-run", 1).await.is_err());

    // Two more runs: newest first (by start), running only, limits. A
    // request without a card row has no card to mark due.
    let third = run_record("run-3", &allowed, 4_000);
    store
        .run_started(third.clone(), run_event("run_started", 4_000, &third))
        .await
        .unwrap()
        .unwrap();
    assert!(store.card(allowed.id).await.unwrap().is_none());
    assert!(published(&mut rx).is_empty(), "no card, nothing due");
    let second = run_record("run-2", &plain, 3_000);
    store
        .run_started(second.clone(), run_event("run_started", 3_000, &second))
        .await
        .unwrap()
        .unwrap();
    assert!(published(&mut rx)
        .iter()
        .any(|c| matches!(c, Change::CardsDue)));
    let ids = |list: Vec<RunRecord>| list.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.runs(false, 10).await.unwrap()),
        ["run-3", "run-2", "run-1"]
    );
    assert_eq!(ids(store.runs(false, 1).await.unwrap()), ["run-3"]);

    // Ended: every field round-trips; it no longer counts as running.
    let mut done = store.run("run-1").await.unwrap().unwrap();
    done.state = RunState::Exited;
    done.ended_ms = Some(5_000);
    done.exit_code = Some(3);
    done.signal = None;
    done.stdout_sha256 = Some("a".repeat(64));
    done.stderr_sha256 = Some("b".repeat(64));
    let before = want(&*store, keyed.id).await;
    store
        .run_ended(done.clone(), run_event("run_exited", 5_000, &done))
        .await
        .unwrap();
    assert_eq!(last_audit_kind(&*store).await, "run_exited");
    assert_eq!(store.run("run-1").await.unwrap().as_ref(), Some(&done));
    assert_eq!(want(&*store, keyed.id).await, before + 1, "card bumped");
    assert!(published(&mut rx)
        .iter()
        .any(|c| matches!(c, Change::CardsDue)));
    assert_eq!(ids(store.runs(true, 10).await.unwrap()), ["run-3", "run-2"]);
    let mut missing = done.clone();
    missing.id = "no-such-run".into();
    assert!(store
        .run_ended(missing.clone(), run_event("run_exited", 5_000, &missing))
        .await
        .is_err());

    // A kill of a running run: recorded, audited, the card due, and heard
    // here and by every other process on the store.
    let before = want(&*store, plain.id).await;
    assert!(store
        .request_kill(
            "run-2",
            "uid:1".into(),
            run_event("run_kill_requested", 6_000, &second)
        )
        .await
        .unwrap());
    assert_eq!(last_audit_kind(&*store).await, "run_kill_requested");
    let changes = published(&mut rx);
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::KillRun { run_id } if run_id == "run-2")),
        "{changes:?}"
    );
    assert!(changes.iter().any(|c| matches!(c, Change::CardsDue)));
    assert_eq!(want(&*store, plain.id).await, before + 1, "card bumped");
    assert_eq!(
        store
            .run("run-2")
            .await
            .unwrap()
            .unwrap()
            .kill_requested_by
            .as_deref(),
        Some("uid:1")
    );
    if let Some(peer_rx) = &mut peer_rx {
        wait_for(
            peer_rx,
            "KillRun on the other store",
            |c| matches!(c, Change::KillRun { run_id } if run_id == "run-2"),
        )
        .await;
    }
    let mut killed = store.run("run-2").await.unwrap().unwrap();
    killed.state = RunState::Killed;
    killed.ended_ms = Some(6_100);
    killed.signal = Some(15);
    store
        .run_ended(killed.clone(), run_event("run_killed", 6_100, &killed))
        .await
        .unwrap();
    assert_eq!(store.run("run-2").await.unwrap().as_ref(), Some(&killed));

    // Not running (ended, or no such run): false, nothing audited.
    let head = store.audit_head().await.unwrap();
    published(&mut rx);
    for id in ["run-1", "run-2", "no-such-run"] {
        assert!(!store
            .request_kill(
                id,
                "uid:1".into(),
                run_event("run_kill_requested", 7_000, &first)
            )
            .await
            .unwrap());
    }
    assert_eq!(store.audit_head().await.unwrap(), head);
    assert!(published(&mut rx).is_empty());

    // The chain verifies with the run entries in it.
    store
        .audit_verify()
        .await
        .unwrap()
        .expect("the chain verifies");

    // A stored plan that does not parse is corrupt, never "no plan".
    raw(&format!(
        "UPDATE requests SET run_plan = '{{\"argv\": 1}}' WHERE id = '{}'",
        plain.id
    ));
    match store.get_request(plain.id).await {
        Err(StoreError::Corrupt(why)) => assert!(why.contains("run plan"), "{why}"),
        other => panic!("a corrupt run plan must not read: {other:?}"),
    }
    raw("UPDATE runs SET state = 'finished' WHERE id = 'run-3'");
    assert!(matches!(
        store.run("run-3").await,
        Err(StoreError::Corrupt(_))
    ));
}

/// A migrator holding `backend`'s migrations up to `last` (a database as an
/// older Keyturn left it).
async fn migrations_up_to(
    backend: &str,
    last: i64,
) -> (tempfile::TempDir, sqlx::migrate::Migrator) {
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let version: i64 = name.split('_').next().unwrap().parse().unwrap();
        if version <= last {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    (dir, migrator)
}

/// A pending request row as migrations before the runs (SQLite 0009,
/// PostgreSQL 0002) store it: no `run_plan` column yet.
const OLD_PENDING_ROW: &str = "INSERT INTO requests (id, agent, tool, args, args_hash, justification, \
     risk, approvals_required, admin_only, rule, rule_detail, flags, created_ms, deadline_ms, state) \
     VALUES ('00000000-0000-0000-0000-000000000abc', 'agent-a', 'delete_file', '{}', 'h', 'old', \
     'high', 1, false, 'r', '', '[]', 1000, 100000, 'pending')";

/// After the upgrade the old row reads without a run plan, and new rows
/// keep theirs and can run.
async fn upgraded(store: &dyn Store) {
    let old: RequestId = "00000000-0000-0000-0000-000000000abc".parse().unwrap();
    let pending = store.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].id, pending[0].run.clone()), (old, None));
    let mut r = request(80_001, 1, 100_000);
    r.run = Some(plan("cat"));
    store
        .insert_request(r.clone(), submitted(&r))
        .await
        .unwrap();
    assert_eq!(
        store.get_request(r.id).await.unwrap().unwrap().run,
        Some(plan("cat"))
    );
    let run = run_record("run-upgraded", &r, 2_000);
    store
        .run_started(run.clone(), run_event("run_started", 2_000, &run))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.run_of_request(r.id).await.unwrap(), Some(run));
}

/// A database made by 0001..0009 migrates to 0010 when the store opens,
/// and `db check` (the full integrity check) passes on it before and after.
#[tokio::test]
async fn sqlite_database_from_before_runs_migrates_and_checks() {
    use keyturn::store::check::{check, Depth};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let url = format!("sqlite://{}", path.display());
    {
        let (_held, old) = migrations_up_to("sqlite", 9).await;
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        old.run(&pool).await.unwrap();
        sqlx::query(OLD_PENDING_ROW).execute(&pool).await.unwrap();
        pool.close().await;
    }
    let before = check(&url, Depth::Full, Duration::from_secs(60)).await;
    assert!(before.ok(), "{:?}", before.problems);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&url, "normal", 64).await.unwrap());
    upgraded(&*store).await;
    store.close().await;
    let after = check(&url, Depth::Full, Duration::from_secs(60)).await;
    assert!(after.ok(), "{:?}", after.problems);
    assert_eq!(after.pending, Some(2));
}

/// The same on PostgreSQL: a schema made by 0001..0002 fails `db check`
/// (a migration is missing) until the store opens and applies 0003.
#[tokio::test]
async fn postgres_schema_from_before_runs_migrates_and_checks() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    {
        let (_held, old) = migrations_up_to("postgres", 2).await;
        let pool = sqlx::PgPool::connect(&schema.url()).await.unwrap();
        old.run(&pool).await.unwrap();
        sqlx::query(OLD_PENDING_ROW).execute(&pool).await.unwrap();
        pool.close().await;
    }
    let before = keyturn::store::postgres::check(&schema.url()).await;
    assert!(
        before.problems.iter().any(|p| p.contains("not applied")),
        "{:?}",
        before.problems
    );
    let store: Arc<dyn Store> = pg_store(&schema, None).await;
    upgraded(&*store).await;
    store.close().await;
    let after = keyturn::store::postgres::check(&schema.url()).await;
    assert!(after.ok(), "{:?}", after.problems);
    assert_eq!(after.pending, Some(2));
}

/// The escalation ladder's claims: once per (request, step), only while
/// the request is pending, audited and bumping the card in the same write;
/// sent recorded once; a decided request's steps leave the worker's list
/// but stay readable for its card.
async fn escalations(store: &dyn Store, feed: &mut Feed) {
    let mut r = request(7_001, 1, 90_000);
    r.agent = "agent-esc".into();
    queue(store, feed, &r).await;
    assert!(store.escalations_of(r.id).await.unwrap().is_empty());
    let backup = Targets {
        roles: vec![123_456_789_012_345_678],
        users: vec![],
    };
    let dm = Targets {
        roles: vec![],
        users: vec![111_111_111_111_111_111, 5],
    };
    let rec = |step: u32, action: &str, targets: &Targets, at: i64| EscalationRecord {
        request_id: r.id,
        step,
        action: action.into(),
        targets: targets.clone(),
        claimed_ms: at,
        sent_ms: None,
    };
    let audit = |step: usize, action: Action, targets: &Targets| {
        escalation::audited(5_000, &r.id.to_string(), step, &action, targets)
    };

    // Claimed: stored, audited and the card marked due, in one write.
    let want = store.card(r.id).await.unwrap().unwrap().want;
    let (claimed, change) = feed
        .write(store.claim_escalation(
            rec(0, "ping_role", &backup, 5_000),
            audit(0, Action::PingRole(123_456_789_012_345_678), &backup),
        ))
        .await;
    assert!(claimed.unwrap());
    assert!(matches!(change, Change::CardsDue));
    let last = store.audit_tail(1).await.unwrap().remove(0).event;
    assert_eq!(last.kind, "escalated");
    assert_eq!(last.request_id, Some(r.id.to_string()));
    assert_eq!(last.detail["step"], json!(0));
    assert_eq!(last.detail["action"], json!("ping_role"));
    assert_eq!(
        last.detail["targets"],
        json!({"roles": ["123456789012345678"], "users": []})
    );
    assert_eq!(store.card(r.id).await.unwrap().unwrap().want, want + 1);

    // The same step again (a restart, another leader): nothing written,
    // nothing audited, nothing published.
    let head = store.audit_head().await.unwrap();
    let again = feed
        .silent(store.claim_escalation(
            rec(0, "ping_role", &backup, 6_000),
            audit(0, Action::PingRole(123_456_789_012_345_678), &backup),
        ))
        .await;
    assert!(!again.unwrap());
    assert_eq!(store.audit_head().await.unwrap(), head);
    assert_eq!(
        store.escalations_of(r.id).await.unwrap(),
        vec![rec(0, "ping_role", &backup, 5_000)]
    );

    // A second step; both listed for the worker, unsent.
    let (claimed, _) = feed
        .write(store.claim_escalation(
            rec(2, "dm", &dm, 5_500),
            audit(2, Action::Dm(dm.users.clone()), &dm),
        ))
        .await;
    assert!(claimed.unwrap());
    let mine = |all: Vec<EscalationRecord>| -> Vec<EscalationRecord> {
        all.into_iter().filter(|e| e.request_id == r.id).collect()
    };
    let listed = mine(store.pending_escalations(100).await.unwrap());
    assert_eq!(
        listed,
        vec![
            rec(0, "ping_role", &backup, 5_000),
            rec(2, "dm", &dm, 5_500)
        ]
    );

    // Sent: the first time counts.
    feed.silent(store.escalation_sent(r.id, 0, 5_100))
        .await
        .unwrap();
    feed.silent(store.escalation_sent(r.id, 0, 9_999))
        .await
        .unwrap();
    let of = store.escalations_of(r.id).await.unwrap();
    assert_eq!((of[0].sent_ms, of[1].sent_ms), (Some(5_100), None));

    // No step for a request that does not exist.
    let mut ghost = rec(0, "reping", &backup, 5_000);
    ghost.request_id = RequestId(Uuid::from_u128(7_999));
    let none = feed
        .silent(store.claim_escalation(ghost, audit(0, Action::Reping, &backup)))
        .await;
    assert!(!none.unwrap());

    // Decided: no further step, and none left for the worker; the card
    // still reads the ones that fired.
    feed.write(store.cancel(r.id, "uid:0".into(), None, 7_000))
        .await
        .0
        .unwrap()
        .unwrap();
    let head = store.audit_head().await.unwrap();
    let late = feed
        .silent(store.claim_escalation(
            rec(3, "last_warning", &backup, 7_500),
            audit(3, Action::LastWarning, &backup),
        ))
        .await;
    assert!(!late.unwrap());
    assert_eq!(store.audit_head().await.unwrap(), head);
    assert!(mine(store.pending_escalations(100).await.unwrap()).is_empty());
    assert_eq!(store.escalations_of(r.id).await.unwrap().len(), 2);
}

/// Anomaly alerts and seen tools (SQLite migration 0015, PostgreSQL 0008):
/// an alert is stored with its audit line, its count only ever grows (writes
/// may land out of order), a message is due until posted at the latest
/// version, a pause is recorded once and makes it due again; a tool is new
/// once per agent, and the agent's first sighting is kept.
async fn anomaly_story(store: &dyn Store) {
    let alert = |count: u64, updated_ms: i64, detail: &str| Alert {
        id: "01937a4e-8c2b-7f3d-9a1e-0123456789ab".into(),
        agent: "bot".into(),
        rule: "rate".into(),
        action: "alert".into(),
        detail: detail.into(),
        count,
        opened_ms: 1_000,
        updated_ms,
        paused_by: None,
        version: 1,
        message_id: None,
        posted_version: 0,
    };
    assert!(store.alerts(10).await.unwrap().is_empty());
    store
        .record_alert(
            alert(1, 1_000, "first"),
            Some(events::anomaly(1_000, "bot", "rate", "first", 1)),
        )
        .await
        .unwrap();
    assert_eq!(last_audit_kind(store).await, "anomaly");
    let tail = store.audit_tail(1).await.unwrap();
    assert_eq!(tail[0].event.detail["rule"], "rate");
    assert_eq!(tail[0].event.actor, "anomaly");
    store
        .record_alert(alert(5, 3_000, "fifth"), None)
        .await
        .unwrap();
    // An older write landing late never lowers the count.
    store
        .record_alert(alert(3, 2_000, "third"), None)
        .await
        .unwrap();
    let a = store.alert(&alert(0, 0, "").id).await.unwrap().unwrap();
    assert_eq!(
        (a.count, a.detail.as_str(), a.updated_ms),
        (5, "fifth", 3_000)
    );
    assert_eq!(a.version, 3);
    assert_eq!(a.message_id, None);
    // Due until posted at its version; `since` leaves old ones out.
    let due = store.alerts_due(0, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert!(store.alerts_due(3_001, 10).await.unwrap().is_empty());
    store.alert_posted(&a.id, 777, a.version).await.unwrap();
    assert!(store.alerts_due(0, 10).await.unwrap().is_empty());
    // A stale post never moves the version back.
    store.alert_posted(&a.id, 777, 1).await.unwrap();
    assert!(store.alerts_due(0, 10).await.unwrap().is_empty());
    // A pause is recorded once and makes the message due again.
    assert!(store
        .alert_paused(&a.id, "discord:7".into(), 4_000)
        .await
        .unwrap());
    assert!(store
        .alert_paused(&a.id, "discord:8".into(), 5_000)
        .await
        .unwrap());
    assert!(!store.alert_paused("nope", "x".into(), 5_000).await.unwrap());
    let a = store.alert(&a.id).await.unwrap().unwrap();
    assert_eq!(a.paused_by.as_deref(), Some("discord:7"));
    assert_eq!(a.message_id, Some(777));
    assert_eq!(store.alerts_due(0, 10).await.unwrap().len(), 1);
    // Newest first.
    let mut b = alert(1, 9_000, "other");
    b.id = "01937a4e-8c2b-7f3d-9a1e-0123456789ac".into();
    b.opened_ms = 9_000;
    store.record_alert(b.clone(), None).await.unwrap();
    let list = store.alerts(10).await.unwrap();
    assert_eq!(
        list.iter().map(|a| a.id.clone()).collect::<Vec<_>>(),
        vec![b.id.clone(), a.id.clone()]
    );
    assert_eq!(store.alerts(1).await.unwrap().len(), 1);
    // Raised risks: only `raise_risk` alerts matched at or after `since`,
    // the latest first.
    assert!(store.raised_alerts(0, 10).await.unwrap().is_empty());
    for (n, updated) in [(0xd0u8, 10_000), (0xd1, 12_000), (0xd2, 11_000)] {
        let mut r = alert(1, updated, "raised");
        r.id = format!("01937a4e-8c2b-7f3d-9a1e-0123456789{n:02x}");
        r.action = "raise_risk".into();
        r.opened_ms = updated;
        store.record_alert(r, None).await.unwrap();
    }
    let raised = store.raised_alerts(11_000, 10).await.unwrap();
    assert_eq!(
        raised.iter().map(|a| a.updated_ms).collect::<Vec<_>>(),
        vec![12_000, 11_000]
    );
    assert!(raised.iter().all(|a| a.action == "raise_risk"));
    assert_eq!(store.raised_alerts(0, 1).await.unwrap().len(), 1);
    assert!(store.raised_alerts(12_001, 10).await.unwrap().is_empty());

    // Seen tools.
    assert_eq!(
        store.note_tool_seen("bot", "read", 100).await.unwrap(),
        Some(100)
    );
    assert_eq!(
        store.note_tool_seen("bot", "read", 200).await.unwrap(),
        None
    );
    assert_eq!(
        store.note_tool_seen("bot", "write", 300).await.unwrap(),
        Some(100)
    );
    assert_eq!(
        store.note_tool_seen("cli", "read", 400).await.unwrap(),
        Some(400)
    );
    assert_eq!(
        store.note_tool_seen("bot", "write", 500).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn sqlite_keeps_the_anomaly_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open_with(&url, &Options::default())
            .await
            .unwrap(),
    );
    anomaly_story(&*store).await;
    store.close().await;
    // Kept across a reopen.
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open_with(&url, &Options::default())
            .await
            .unwrap(),
    );
    assert_eq!(store.alerts(10).await.unwrap().len(), 5);
    assert_eq!(
        store.note_tool_seen("bot", "read", 900).await.unwrap(),
        None
    );
    store.close().await;
}

#[tokio::test]
async fn postgres_keeps_the_anomaly_contract() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(
        PgStore::open(&schema.url(), &PgOptions::default())
            .await
            .unwrap(),
    );
    anomaly_story(&*store).await;
    store.close().await;
}

/// Flood digests (migrations sqlite 0016, postgres 0009): a request moves
/// from its unposted card into one digest, never both and never two; the
/// digest counts its pending requests and finishes once shown all decided.
async fn digests_story(store: Arc<dyn Store>) {
    use keyturn::domain::digest::NewDigest;
    let mut rs: Vec<ApprovalRequest> = (1..=6)
        .map(|n| request(900 + n, 1, 50_000 + n as i64))
        .collect();
    rs[5].agent = "agent-b".into();
    for r in &rs {
        assert!(matches!(
            store.insert_request(r.clone(), submitted(r)).await.unwrap(),
            Inserted::New(_)
        ));
    }
    // Request 905's card is posted: it stays a card.
    store
        .card_done(rs[4].id, 555, 1, "pending".into())
        .await
        .unwrap();
    let (n, waiting) = store.cards_waiting(3).await.unwrap();
    assert_eq!(n, 5);
    let ids: Vec<RequestId> = waiting.iter().map(|w| w.request_id).collect();
    assert_eq!(
        ids,
        vec![rs[0].id, rs[1].id, rs[2].id],
        "oldest deadline first"
    );
    assert_eq!(waiting[0].agent, "agent-a");

    let d1 = Uuid::from_u128(0xd1);
    let d2 = Uuid::from_u128(0xd2);
    let new = vec![NewDigest {
        id: d1,
        agent: "agent-a".into(),
        tool: "delete_file".into(),
    }];
    let joins = vec![
        (rs[0].id, d1),
        (rs[1].id, d1),
        (rs[4].id, d1),
        (rs[2].id, d1),
    ];
    let moved = store
        .digest_apply(CARDS, new, joins, 1_000, 30_000)
        .await
        .unwrap();
    assert_eq!(moved, 3, "the posted card stays a card");
    assert!(
        store.card(rs[0].id).await.unwrap().is_none(),
        "no card once digested"
    );
    assert!(store.card(rs[4].id).await.unwrap().is_some());
    let members: Vec<RequestId> = store
        .digest_members(d1)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        members,
        vec![rs[0].id, rs[1].id, rs[2].id],
        "in joining order"
    );
    // Never in two digests.
    let again = store
        .digest_apply(
            CARDS,
            vec![NewDigest {
                id: d2,
                agent: "agent-a".into(),
                tool: "delete_file".into(),
            }],
            vec![(rs[0].id, d2)],
            1_100,
            30_000,
        )
        .await
        .unwrap();
    assert_eq!(again, 0);
    let live = store.digests_live().await.unwrap();
    let d = live.iter().find(|d| d.id == d1).expect("live");
    assert_eq!((d.members, d.pending, d.message_id), (3, 3, None));
    assert_eq!(
        (d.channel_id, d.open_until_ms, d.created_ms),
        (CARDS, 31_000, 1_000)
    );
    assert_eq!(store.digest_members(d2).await.unwrap().len(), 0);

    // A restart's reconcile does not card a digested request again.
    store.card_reconcile(CARDS).await.unwrap();
    assert!(store.card(rs[0].id).await.unwrap().is_none());
    let (n, _) = store.cards_waiting(100).await.unwrap();
    assert_eq!(n, 2, "904 and 906 still wait as cards");

    // Decisions show in the pending count; posted, then edited.
    store
        .vote(rs[1].id, vote("uid:1", false, 2_000), ADMIN)
        .await
        .unwrap()
        .unwrap();
    store
        .digest_done(d1, 777, "3/2".into(), 3, false, 4_000)
        .await
        .unwrap();
    let d = store.digest(d1).await.unwrap().unwrap();
    assert_eq!(
        (
            d.message_id,
            d.pending,
            d.rendered.as_deref(),
            d.next_attempt_ms
        ),
        (Some(777), 2, Some("3/2"), 4_000)
    );
    store.digest_retry_later(d1, 1, 5_000, true).await.unwrap();
    let d = store.digest(d1).await.unwrap().unwrap();
    assert_eq!(
        (d.message_id, d.attempts, d.next_attempt_ms),
        (None, 1, 5_000)
    );
    store
        .cancel(rs[0].id, "uid:0".into(), None, 2_100)
        .await
        .unwrap()
        .unwrap();
    store.time_out(rs[2].id, 60_000).await.unwrap().unwrap();
    // Shown all decided, but for fewer members than joined: not finished.
    store
        .digest_done(d1, 778, "2/0".into(), 2, true, 6_000)
        .await
        .unwrap();
    assert!(store
        .digests_live()
        .await
        .unwrap()
        .iter()
        .any(|d| d.id == d1));
    store
        .digest_done(d1, 778, "3/0".into(), 3, true, 6_000)
        .await
        .unwrap();
    assert!(!store
        .digests_live()
        .await
        .unwrap()
        .iter()
        .any(|d| d.id == d1));
    assert_eq!(store.digest(d1).await.unwrap().unwrap().pending, 0);
    // A finished digest takes nobody: the card stays.
    let moved = store
        .digest_apply(CARDS, vec![], vec![(rs[3].id, d1)], 7_000, 30_000)
        .await
        .unwrap();
    assert_eq!(moved, 0);
    assert!(store.card(rs[3].id).await.unwrap().is_some());
}

#[tokio::test]
async fn sqlite_keeps_the_digests_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let options = Options {
        max_batch: 64,
        cards: Some(CARDS),
        ..Options::default()
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(&url, &options).await.unwrap());
    digests_story(store.clone()).await;
    store.close().await;
}

#[tokio::test]
async fn postgres_keeps_the_digests_contract() {
    let Some(schema) = pg::Schema::new().await else {
        return;
    };
    let store: Arc<dyn Store> = pg_store(&schema, Some(CARDS)).await;
    digests_story(store.clone()).await;
    store.close().await;
}
