//! The gateway's use-cases over a real SQLite store, without a socket:
//! multi-person approval, admin-only requests, pairing and the audit chain.

#[allow(unused_imports)]
use keyturn::app::ports::{AuditLog, Cards, Requests, Store};
use keyturn::app::{AppError, Gateway, Submission};
use keyturn::config::Config;
use keyturn::domain::request::State;
use keyturn::store::SqliteStore;
use serde_json::json;
use std::sync::Arc;

struct Env {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    gw: Arc<Gateway>,
    store: Arc<dyn Store>,
}

async fn env(extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let text = format!(
        "[[agents]]\nname = \"bot\"\n[[users]]\nid = \"42\"\n[[tools]]\nname = \"drop_database\"\nrisk = \"critical\"\n[[grants]]\nscope = \"global\"\ntool = \"*\"\n{extra}"
    );
    let mut cfg = Config::parse(&text).unwrap();
    cfg.store.url = format!("sqlite://{}", db.display());
    cfg.validate().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&cfg.store.url, "normal", 64)
            .await
            .unwrap(),
    );
    let gw = Gateway::new(Arc::new(cfg), store.clone(), 0).await.unwrap();
    Env {
        _dir: dir,
        db,
        gw,
        store,
    }
}

fn sub(tool: &str, user: Option<&str>) -> Submission {
    Submission {
        tool: tool.into(),
        args: json!({"db": "prod"}),
        user_id: user.map(Into::into),
        justification: "cleanup".into(),
        ..Submission::default()
    }
}

#[tokio::test]
async fn two_person_rule_needs_two_distinct_admins() {
    let e = env("[risk.critical]\napprovals = 2\n").await;
    let r =
        e.gw.submit("bot", sub("drop_database", Some("42")))
            .await
            .unwrap();
    assert_eq!(r.state, State::Pending);
    assert!(r.admin_only);
    assert_eq!(r.approvals_required, 2);

    // Not an admin: refused, nothing recorded.
    let err =
        e.gw.vote(r.id, "discord:1", None, true, None, false)
            .await
            .unwrap_err();
    assert!(matches!(err, AppError::AdminOnly));

    let v =
        e.gw.vote(r.id, "uid:1000", Some("alice".into()), true, None, true)
            .await
            .unwrap();
    assert_eq!((v.request.state, v.have, v.need), (State::Pending, 1, 2));
    // The same person cannot turn the second key.
    let err =
        e.gw.vote(
            r.id,
            "uid:1000",
            Some("alice again".into()),
            true,
            None,
            true,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, AppError::AlreadyVoted(_)));
    let v =
        e.gw.vote(
            r.id,
            "uid:1001",
            Some("bob".into()),
            true,
            Some("checked".into()),
            true,
        )
        .await
        .unwrap();
    assert_eq!(v.request.state, State::Approved);
    assert_eq!(
        v.request.decided_who.as_deref(),
        Some("alice (uid:1000), bob (uid:1001)")
    );
}

#[tokio::test]
async fn first_deny_wins_over_partial_approval() {
    let e = env("[risk.critical]\napprovals = 2\n").await;
    let r =
        e.gw.submit("bot", sub("drop_database", None))
            .await
            .unwrap();
    e.gw.vote(r.id, "uid:1", None, true, None, true)
        .await
        .unwrap();
    let v =
        e.gw.vote(r.id, "uid:2", None, false, Some("no".into()), true)
            .await
            .unwrap();
    assert_eq!(v.request.state, State::Denied);
    assert_eq!(v.request.decided_reason.as_deref(), Some("no"));
}

#[tokio::test]
async fn concurrent_votes_on_one_request_produce_one_terminal_state() {
    let e = env("").await;
    for _ in 0..20 {
        let r = e.gw.submit("bot", sub("shell", Some("42"))).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let gw = e.gw.clone();
            tasks.push(tokio::spawn(async move {
                gw.vote(r.id, &format!("uid:{i}"), None, i % 2 == 0, None, true)
                    .await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(v) if v.request.state.is_terminal() => wins += 1,
                Ok(_) => {}
                Err(AppError::AlreadyDecided(_)) => {}
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(wins, 1);
        let votes = e.store.votes(r.id).await.unwrap();
        assert_eq!(votes.len(), 1, "no vote may be recorded after the decision");
    }
}

#[tokio::test]
async fn pairing_code_pairs_a_user_once() {
    let e = env("").await;
    let r = e.gw.submit("bot", sub("shell", Some("77"))).await.unwrap();
    assert_eq!(r.rule, "user_not_paired");

    let (code, _) =
        e.gw.request_pairing("77", Some("Zed".into()))
            .await
            .unwrap();
    assert_eq!(code.len(), 10);
    // A second request replaces the first code: one live code per user.
    let (code2, _) = e.gw.request_pairing("77", None).await.unwrap();
    assert!(e.gw.approve_pairing(&code, "uid:0").await.is_err());
    let (_, codes) = e.gw.pairings().await.unwrap();
    assert_eq!(codes.len(), 1);

    // The code is stored hashed, never in clear.
    let raw = std::fs::read(&e.db).unwrap();
    let wal = std::fs::read(e.db.with_extension("db-wal")).unwrap_or_default();
    for bytes in [&raw, &wal] {
        assert!(
            !bytes.windows(10).any(|w| w == code2.as_bytes()),
            "code found in the database file"
        );
    }

    let typed = format!("{}-{}", &code2[..5].to_lowercase(), &code2[5..]);
    let user = e.gw.approve_pairing(&typed, "uid:0").await.unwrap();
    assert_eq!(user.user_id, "77");
    assert!(
        e.gw.approve_pairing(&code2, "uid:0").await.is_err(),
        "a code works once"
    );
    let r = e.gw.submit("bot", sub("read", Some("77"))).await.unwrap();
    assert_ne!(r.rule, "user_not_paired");

    assert!(e.gw.revoke_pairing("77", "uid:0").await.unwrap());
    let r = e.gw.submit("bot", sub("read", Some("77"))).await.unwrap();
    assert_eq!(r.rule, "user_not_paired");
}

#[tokio::test]
async fn live_codes_are_capped() {
    let e = env("[pairing]\nmax_live_codes = 2\n").await;
    e.gw.request_pairing("1", None).await.unwrap();
    e.gw.request_pairing("2", None).await.unwrap();
    let err = e.gw.request_pairing("3", None).await.unwrap_err();
    assert!(
        err.to_string().contains("too many live pairing codes"),
        "{err}"
    );
}

#[tokio::test]
async fn audit_chain_detects_edits_deletes_and_a_truncated_tail() {
    let e = env("").await;
    for _ in 0..5 {
        e.gw.submit("bot", sub("read", Some("42"))).await.unwrap();
    }
    assert_eq!(e.gw.audit_verify().await.unwrap(), Ok(10));
    e.store.close().await;

    let url = format!("sqlite://{}", e.db.display());
    async fn tamper(url: &str, sql: &str) {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
    }
    async fn verify(url: &str) -> Result<u64, keyturn::domain::audit::Break> {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(url, "normal", 8).await.unwrap());
        let mut cfg = Config::parse("").unwrap();
        cfg.store.url = url.into();
        let gw = Gateway::new(Arc::new(cfg), store.clone(), 0).await.unwrap();
        let r = gw.audit_verify().await.unwrap();
        store.close().await;
        r
    }
    let copy = |name: &str| {
        let p = e.db.with_file_name(name);
        std::fs::copy(&e.db, &p).unwrap();
        format!("sqlite://{}", p.display())
    };

    let edited = copy("edited.db");
    tamper(
        &edited,
        "UPDATE audit SET actor = 'agent:evil' WHERE seq = 4",
    )
    .await;
    assert_eq!(verify(&edited).await.unwrap_err().seq, 4);

    let deleted = copy("deleted.db");
    tamper(&deleted, "DELETE FROM audit WHERE seq = 6").await;
    assert_eq!(verify(&deleted).await.unwrap_err().seq, 7);

    let truncated = copy("truncated.db");
    tamper(&truncated, "DELETE FROM audit WHERE seq = 10").await;
    assert_eq!(verify(&truncated).await.unwrap_err().seq, 10);

    let reordered = copy("reordered.db");
    tamper(&reordered, "UPDATE audit SET seq = -2 WHERE seq = 2").await;
    tamper(&reordered, "UPDATE audit SET seq = 2 WHERE seq = 3").await;
    tamper(&reordered, "UPDATE audit SET seq = 3 WHERE seq = -2").await;
    assert_eq!(verify(&reordered).await.unwrap_err().seq, 2);

    assert_eq!(verify(&url).await, Ok(10));
}

#[tokio::test]
async fn the_requester_uid_and_agent_may_not_vote_on_their_own_request() {
    for (extra, allowed) in [
        ("", false),
        ("[admin]\nallow_self_approval = true\n", true),
        ("[admin]\nsingle_user_demo = true\n", true),
    ] {
        let e = env(extra).await;
        let mut s = sub("drop_database", Some("42"));
        s.requester_uid = Some(1000);
        let r = e.gw.submit("bot", s).await.unwrap();
        assert_eq!(r.requester_uid, Some(1000));
        // Stored, not only in memory.
        assert_eq!(
            e.store
                .get_request(r.id)
                .await
                .unwrap()
                .unwrap()
                .requester_uid,
            Some(1000)
        );
        if allowed {
            let v =
                e.gw.vote(r.id, "uid:1000", None, true, None, true)
                    .await
                    .unwrap();
            assert_eq!(v.request.state, State::Approved, "{extra}");
            continue;
        }
        for (voter, approve) in [("uid:1000", true), ("uid:1000", false), ("agent:bot", true)] {
            let err =
                e.gw.vote(r.id, voter, None, approve, None, true)
                    .await
                    .unwrap_err();
            assert!(matches!(err, AppError::SelfApproval(_)), "{voter}: {err}");
            assert_eq!(err.code(), "self_approval");
        }
        // Another uid decides as usual.
        let v =
            e.gw.vote(r.id, "uid:1001", None, true, None, true)
                .await
                .unwrap();
        assert_eq!(v.request.state, State::Approved);
    }
}
