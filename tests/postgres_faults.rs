//! PostgreSQL lost while `keyturn serve` runs on it: the database is taken
//! away by cutting a TCP proxy between the two (the shared test server keeps
//! running for every other test), then brought back.
//!
//! While it is gone, a submit is refused with a clear error (fail closed:
//! nothing is allowed that could not be recorded), and an agent already
//! waiting keeps waiting. Once it is back, service resumes by itself, the
//! waiting agent gets the decision made through the CLI, and nothing
//! committed before the cut is lost.

mod harness;

use harness::tcp_proxy::Proxy;
use harness::{config, pg, rpc, Server};
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn losing_postgres_refuses_submits_keeps_waiters_and_resumes_by_itself() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(schema) = rt.block_on(pg::Schema::new()) else {
        return;
    };
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap());
    let url = schema
        .url()
        .replace("127.0.0.1:5432", &proxy.addr().to_string());
    assert_ne!(url, schema.url(), "the store goes through the proxy");
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("k.db").display());
    let text = config::files(dir.path(), "").replace(&sqlite, &url);
    let s = Server::start_in(dir, &text);

    // Committed before the cut: one call the policy allowed, one that waits.
    let allowed = s
        .rpc("submit", rpc::submit("read_file", json!({})))
        .expect("allowed");
    assert_eq!(allowed["state"], "approved", "{allowed}");
    let queued = s
        .rpc("submit", rpc::submit("delete_file", json!({"wait": false})))
        .expect("queued");
    assert_eq!(queued["state"], "pending", "{queued}");
    let id = queued["request_id"].as_str().unwrap().to_string();
    let socket = s.socket().to_path_buf();
    let (tx, waited) = std::sync::mpsc::channel();
    let wid = id.clone();
    std::thread::spawn(move || {
        let r = rpc::call(&socket, "wait", json!({"agent": "bot", "id": wid}));
        let _ = tx.send((Instant::now(), r));
    });

    // The agent is blocked in `wait` (it read its request) before the cut.
    let registered = Instant::now();
    while s.rpc("stats", json!({})).expect("stats")["waiting"] != 1 {
        assert!(
            registered.elapsed() < Duration::from_secs(10),
            "the agent never started waiting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    proxy.cut();
    let cut_at = Instant::now();
    // Refused, with an error that says the database is the problem: never
    // allowed without a record, never a hang.
    let refused = loop {
        match s.rpc("submit", rpc::submit("read_file", json!({}))) {
            Err(e) => break e,
            Ok(v) => {
                // The first calls may still ride a connection being torn down.
                assert!(
                    cut_at.elapsed() < Duration::from_secs(15),
                    "submits still answered 15 s after the database went away: {v}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let said = refused.to_string();
    assert!(
        said.contains("store_unavailable") && said.contains("the database is unavailable"),
        "the refusal names the cause: {said}"
    );
    eprintln!(
        "first refused submit {:?} after the cut: {said}",
        cut_at.elapsed()
    );
    // The waiting agent has had no answer: it keeps waiting.
    if let Ok(early) = waited.recv_timeout(Duration::from_secs(2)) {
        panic!("the waiting agent was answered while the database was gone: {early:?}");
    }
    // The server itself keeps serving: ping answers.
    s.rpc("ping", json!({}))
        .expect("ping while the database is gone");

    proxy.restore();
    let back = Instant::now();
    loop {
        match s.rpc("submit", rpc::submit("read_file", json!({}))) {
            Ok(v) if v["state"] == "approved" => break,
            other => {
                assert!(
                    back.elapsed() < Duration::from_secs(30),
                    "service did not resume within 30 s of the database's return: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    eprintln!(
        "service resumed {:?} after the database returned",
        back.elapsed()
    );

    // The waiting agent gets the decision made through the CLI.
    let approved = s.approve(&id, "back again");
    assert_eq!(approved["decision"]["state"], "approved", "{approved}");
    let (_, answer) = waited
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting agent is answered");
    let answer = answer.expect("wait answers");
    assert_eq!(answer["state"], "approved", "{answer}");

    // Nothing committed before the cut is lost, and the chain is whole.
    let kept = s
        .rpc(
            "status",
            json!({"agent": "bot", "id": allowed["request_id"]}),
        )
        .expect("the allowed call is still recorded");
    assert_eq!(kept["state"], "approved", "{kept}");
    let out = s.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
