//! The kill switch and uncertain agents, against the real server: pausing
//! an agent cancels its pending requests (their waiters answered at once)
//! and denies its next calls (`agent_paused`); other agents go on; resume
//! restores; pause-all stops everyone; a pause survives a restart. And a
//! call below `min_confidence` waits for a human.

mod harness;

use harness::{config, Server};
use keyturn::ipc::client::ClientError;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A high-risk call of `agent` (it waits for a human).
fn delete(agent: &str) -> Value {
    json!({"agent": agent, "tool": "delete_file", "args": {"path": "/srv/x"}, "user_id": "42"})
}

/// A low-risk call of `agent` (allowed at once).
fn read(agent: &str) -> Value {
    json!({"agent": agent, "tool": "read_file", "args": {"path": "/srv/x"}, "user_id": "42"})
}

fn code(r: Result<Value, ClientError>) -> String {
    harness::rpc::err_code(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_an_agent_cancels_its_pending_requests_at_once_and_denies_its_calls() {
    let s = Server::start(config::files, "");
    // Two waiting agents of `bot`, one of `cli`.
    let w1 = s.submit_waiting_as("bot", delete("bot"));
    let w2 = s.submit_waiting_as("bot", delete("bot"));
    let other = s.submit_as("cli", delete("cli")).await;
    let mut admin = s.client().await;
    harness::rpc::wait_pending(&mut admin, 3).await;

    // The waiters' answers, timed from the pause's reply.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for w in [w1, w2] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let v = w.await.expect("waiter");
            let _ = tx.send((Instant::now(), v));
        });
    }
    let paused = admin
        .call(
            "agent.pause",
            json!({"name": "bot", "reason": "runaway loop", "operator": "alice"}),
        )
        .await
        .expect("pause");
    let replied = Instant::now();
    assert_eq!(paused["paused"], true, "{paused}");
    assert_eq!(paused["cancelled"], 2, "{paused}");
    assert_eq!(paused["pause"]["paused_by"], "cli:alice");
    for _ in 0..2 {
        let (at, v) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a waiter is answered")
            .expect("answer");
        assert_eq!(v["state"], "cancelled", "{v}");
        let reason = v["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("agent_paused:") && reason.contains("runaway loop"),
            "{v}"
        );
        let late = at.saturating_duration_since(replied);
        assert!(
            late < Duration::from_millis(100),
            "a waiter was answered {late:?} after the pause's reply"
        );
    }
    // The other agent's request still waits.
    let pending = harness::rpc::wait_pending(&mut admin, 1).await;
    assert_eq!(pending[0]["id"], other["request_id"]);

    // Its next call is denied, naming who paused it and why.
    let d = s.submit_as("bot", read("bot")).await;
    assert_eq!(d["state"], "denied", "{d}");
    assert_eq!(d["rule"], "agent_paused");
    let detail = d["rule_detail"].as_str().unwrap();
    assert!(
        detail.contains("cli:alice") && detail.contains("runaway loop"),
        "{detail}"
    );
    // check says so too; the other agent is unaffected.
    let c = s.agent_call("check", read("bot")).await.expect("check");
    assert_eq!(c["verdict"]["rule"], "agent_paused", "{c}");
    let ok = s.submit_as("cli", read("cli")).await;
    assert_eq!(ok["state"], "approved", "{ok}");

    // Pausing again is idempotent: the pause in force is kept.
    let again = admin
        .call("agent.pause", json!({"name": "bot", "reason": "other"}))
        .await
        .expect("pause again");
    assert_eq!(again["paused"], false, "{again}");
    assert_eq!(again["pause"]["reason"], "runaway loop");

    // The list shows who paused it, since when and why.
    let list = admin.call("agent.list", json!({})).await.expect("list");
    let bot = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "bot")
        .cloned()
        .unwrap();
    assert_eq!(bot["paused"]["paused_by"], "cli:alice", "{list}");
    assert!(bot["paused"]["since_ms"].as_i64().unwrap() > 0);
    assert!(list["all_paused"].is_null());

    // An unknown agent is a clear error; an agent may not pause anyone.
    assert_eq!(
        code(admin.call("agent.pause", json!({"name": "nobody"})).await),
        "unknown_agent"
    );
    assert_eq!(
        code(s.agent_call("agent.pause", json!({"name": "cli"})).await),
        "not_admin"
    );

    // Resume restores.
    let r = admin
        .call("agent.resume", json!({"name": "bot"}))
        .await
        .expect("resume");
    assert_eq!(r["resumed"], true, "{r}");
    let ok = s.submit_as("bot", read("bot")).await;
    assert_eq!(ok["state"], "approved", "{ok}");

    // Both were audited.
    let tail = admin
        .call("audit.tail", json!({"n": 50}))
        .await
        .expect("audit");
    let kinds: Vec<&str> = tail
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"agent_paused"), "{kinds:?}");
    assert!(kinds.contains(&"agent_resumed"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "cancelled").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_all_stops_every_agent_and_survives_a_restart() {
    let mut s = Server::start(config::files, "");
    let waiting = s.submit_as("cli", delete("cli")).await;
    let mut admin = s.client().await;
    harness::rpc::wait_pending(&mut admin, 1).await;
    let p = admin
        .call("agent.pause", json!({"all": true, "reason": "incident"}))
        .await
        .expect("pause-all");
    assert_eq!(p["cancelled"], 1, "{p}");
    let st = admin
        .call("status", json!({"id": waiting["request_id"]}))
        .await
        .expect("status");
    assert_eq!(st["state"], "cancelled", "{st}");
    for agent in ["bot", "cli"] {
        let d = s.submit_as(agent, read(agent)).await;
        assert_eq!(d["rule"], "agent_paused", "{d}");
    }
    // `bot` paused on its own too: resume-all leaves that one.
    admin
        .call("agent.pause", json!({"name": "bot"}))
        .await
        .expect("pause bot");
    drop(admin);

    s.stop_async().await;
    s.restart_async().await;
    for agent in ["bot", "cli"] {
        let d = s.submit_as(agent, read(agent)).await;
        assert_eq!(d["rule"], "agent_paused", "after a restart: {d}");
    }

    // The CLI lifts the global pause; `bot` stays paused.
    let out = s.cli(&["agent", "resume-all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = s.submit_as("cli", read("cli")).await;
    assert_eq!(ok["state"], "approved", "{ok}");
    let d = s.submit_as("bot", read("bot")).await;
    assert_eq!(d["rule"], "agent_paused", "{d}");
    let out = s.cli(&["agent", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("bot  paused") && text.contains("cli  running"),
        "{text}"
    );
    let out = s.cli(&["agent", "resume", "bot"]);
    assert!(out.status.success());
    let ok = s.submit_as("bot", read("bot")).await;
    assert_eq!(ok["state"], "approved", "{ok}");
    // Unknown agent on the CLI: a clear error, exit 2.
    let out = s.cli(&["agent", "pause", "nobody"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not configured"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncertain_agent_asks_a_human_even_where_the_policy_allows() {
    let s = Server::start(
        config::files,
        "\n[policy]\nmin_confidence = 0.7\n\n[[agents]]\nname = \"sure\"\nmin_confidence = 0.2\n",
    );
    let mut low = read("bot");
    low["confidence"] = json!(0.3);
    let r = s.submit_as("bot", low.clone()).await;
    assert_eq!(r["state"], "pending", "{r}");
    assert_eq!(r["rule"], "low_confidence");
    assert!(
        r["rule_detail"]
            .as_str()
            .unwrap()
            .starts_with("the agent's confidence 0.3 is below 0.7"),
        "{r}"
    );
    // Audited with the submission.
    let tail = s
        .admin_call("audit.tail", json!({"n": 10}))
        .await
        .expect("audit");
    let sub = tail
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "submitted" && e["request_id"] == r["request_id"])
        .cloned()
        .expect("submitted entry");
    assert_eq!(sub["detail"]["confidence"], 0.3, "{sub}");

    let mut high = read("bot");
    high["confidence"] = json!(0.9);
    let r = s.submit_as("bot", high).await;
    assert_eq!(r["state"], "approved", "{r}");
    assert_eq!(r["rule"], "risk_low");

    // The per-agent threshold overrides the global one.
    let mut sure = read("sure");
    sure["confidence"] = json!(0.3);
    let r = s.submit_as("sure", sure).await;
    assert_eq!(r["state"], "approved", "{r}");

    for bad in [json!(1.5), json!(-0.1), json!("high")] {
        let mut p = read("bot");
        p["confidence"] = bad.clone();
        assert_eq!(
            code(s.agent_call("submit", p).await),
            "invalid_params",
            "{bad}"
        );
    }
    // The CLI passes --confidence.
    let out = s.cli(&[
        "check",
        "--tool",
        "read_file",
        "--args",
        r#"{"path":"/srv/x"}"#,
        "--user",
        "42",
        "--agent",
        "bot",
        "--confidence",
        "0.5",
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("low_confidence"), "{text}");
}
