//! Time-boxed grants ("Allow for…") end to end through the real binary:
//! `keyturn approve ID --for … --scope …` approves the request and lets the
//! next matching calls through by policy, naming the grant, until the grant
//! expires (at its instant), is revoked, and across a restart.

mod harness;

use harness::config;
use harness::rpc::submit;
use harness::Server;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Submits without waiting; the request stays even when the connection ends.
fn call(s: &Server, agent: &str, tool: &str, args: Value) -> Value {
    s.rpc(
        "submit",
        submit(tool, json!({"agent": agent, "args": args, "detach": true})),
    )
    .expect("submit")
}

/// What the policy would do now with the call, without queueing it.
fn check(s: &Server, tool: &str, args: Value) -> Value {
    s.rpc("check", submit(tool, json!({"args": args})))
        .expect("check")
}

fn cli_json(s: &Server, args: &[&str]) -> Value {
    let out = s.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

fn id(v: &Value) -> String {
    v["request_id"].as_str().expect("request_id").to_string()
}

#[test]
fn approve_for_a_call_allows_the_identical_call_until_its_instant() {
    let s = Server::start(config::files, "");
    let x = json!({"path": "/srv/x"});
    let first = call(&s, "bot", "delete_file", x.clone());
    assert_eq!(first["state"], "pending", "{first}");

    let a = cli_json(
        &s,
        &[
            "approve",
            &id(&first),
            "--for",
            "2s",
            "--scope",
            "call",
            "--json",
        ],
    );
    assert_eq!(a["decision"]["state"], "approved", "{a}");
    let grant = a["grant"]["id"].as_str().expect("grant id").to_string();
    assert!(grant.starts_with("tg-"), "{grant}");
    assert_eq!(a["grant"]["scope"], "call");
    assert_eq!(a["grant"]["origin_request"], id(&first));

    // The identical call is allowed by policy, naming the grant.
    let again = call(&s, "bot", "delete_file", x.clone());
    assert_eq!(again["state"], "approved", "{again}");
    assert_eq!(again["decided_by"], "policy");
    assert_eq!(again["rule"], "timed_grant");
    let detail = again["rule_detail"].as_str().unwrap();
    assert!(detail.contains(&grant), "{detail}");
    assert!(detail.contains(&id(&first)), "{detail}");

    // Its audit entry names the grant; the grant's own entry has the rest.
    let tail = s.rpc("audit.tail", json!({"n": 50})).expect("audit");
    let entries = tail.as_array().expect("entries");
    assert!(
        entries.iter().any(|e| e["kind"] == "policy_allowed"
            && e["request_id"] == again["request_id"]
            && e["detail"].to_string().contains(&grant)),
        "{tail}"
    );
    let added = entries
        .iter()
        .find(|e| e["kind"] == "grant_added")
        .expect("grant_added");
    assert_eq!(added["detail"]["grant_id"], grant.as_str());
    assert_eq!(added["detail"]["origin_request"], id(&first).as_str());
    assert!(added["detail"]["expires_ms"].is_i64(), "{added}");

    // Other arguments still ask.
    let other = call(&s, "bot", "delete_file", json!({"path": "/srv/y"}));
    assert_eq!(other["state"], "pending", "{other}");

    // After the expiry it asks again: wait on the policy's answer, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = check(&s, "delete_file", x.clone());
        if c["verdict"]["action"] == "ask" {
            break;
        }
        assert_eq!(c["verdict"]["rule"], "timed_grant", "{c}");
        assert!(Instant::now() < deadline, "the grant never expired: {c}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = call(&s, "bot", "delete_file", x);
    assert_eq!(after["state"], "pending", "{after}");
    assert_eq!(after["rule"], "risk_high");
}

#[test]
fn agent_tool_scope_covers_other_args_for_that_agent_only_survives_restart_and_revokes() {
    let mut s = Server::start(config::files, "");
    let first = call(&s, "bot", "delete_file", json!({"path": "/srv/x"}));
    let a = cli_json(
        &s,
        &[
            "approve",
            &id(&first),
            "--for",
            "1h",
            "--scope",
            "agent-tool",
            "--json",
        ],
    );
    assert_eq!(a["decision"]["state"], "approved", "{a}");
    let grant = a["grant"]["id"].as_str().unwrap().to_string();
    assert!(
        a["grant"]["until"].as_str().unwrap().starts_with("until 2"),
        "{a}"
    );

    let y = call(&s, "bot", "delete_file", json!({"path": "/srv/y"}));
    assert_eq!(y["rule"], "timed_grant", "{y}");
    assert_eq!(y["state"], "approved");
    // Another agent, or another tool, still asks.
    let cli_agent = call(&s, "cli", "delete_file", json!({"path": "/srv/y"}));
    assert_eq!(cli_agent["state"], "pending", "{cli_agent}");
    let crit = call(&s, "bot", "drop_database", json!({}));
    assert_eq!(crit["state"], "pending", "{crit}");

    // Listed with its expiry, by the CLI and by tools.effective.
    let out = s.cli(&["tools", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&grant) && text.contains("until 2"), "{text}");
    let eff = s
        .rpc(
            "tools.effective",
            json!({"agent": "bot", "tool": "delete_file"}),
        )
        .expect("effective");
    assert_eq!(eff["timed_grants"][0]["id"], grant.as_str(), "{eff}");
    let eff = s
        .rpc(
            "tools.effective",
            json!({"agent": "cli", "tool": "delete_file"}),
        )
        .expect("effective");
    assert_eq!(eff["timed_grants"], json!([]), "{eff}");

    // A restart keeps it.
    s.restart();
    let z = call(&s, "bot", "delete_file", json!({"path": "/srv/z"}));
    assert_eq!(z["rule"], "timed_grant", "{z}");

    // Revoking removes it at once.
    let r = cli_json(&s, &["revoke", "--id", &grant, "--json"]);
    assert_eq!(r["changed"], true, "{r}");
    let w = call(&s, "bot", "delete_file", json!({"path": "/srv/w"}));
    assert_eq!(w["state"], "pending", "{w}");
    let r = cli_json(&s, &["revoke", "--id", &grant, "--json"]);
    assert_eq!(r["changed"], false, "{r}");
}

#[test]
fn an_admins_grant_on_a_critical_tool_stands_in_for_the_admin() {
    let s = Server::start(config::files, "");
    let crit = call(&s, "bot", "drop_database", json!({}));
    assert_eq!(crit["admin_only"], true, "{crit}");
    // The CLI is an admin: its grant may stand in for an admin's approval.
    let a = cli_json(
        &s,
        &[
            "approve",
            &id(&crit),
            "--for",
            "15m",
            "--scope",
            "agent-tool",
            "--json",
        ],
    );
    assert_eq!(a["decision"]["state"], "approved", "{a}");
    let next = call(&s, "bot", "drop_database", json!({"db": "other"}));
    assert_eq!(next["rule"], "timed_grant", "{next}");
}

#[test]
fn approve_for_refuses_what_it_cannot_grant() {
    // The two-person rule for critical tools.
    let s = Server::start(config::files, "\n[risk.critical]\napprovals = 2\n");
    // A request that needs more than one approval is refused with a clear
    // error: a grant would let later calls through on one person's word.
    let crit = call(&s, "bot", "drop_database", json!({}));
    assert_eq!(crit["approvals_required"], 2, "{crit}");
    let out = s.cli(&["approve", &id(&crit), "--for", "1h"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs 2 approvals"), "{err}");
    // Nothing was approved, and no vote was recorded.
    let st = s.rpc("status", json!({"id": id(&crit)})).expect("status");
    assert_eq!(st["state"], "pending", "{st}");
    assert_eq!(st["who"], Value::Null, "{st}");
    // Bad durations and scopes are refused before anything is decided.
    let p = call(&s, "bot", "delete_file", json!({"path": "/srv/q"}));
    for args in [
        vec!["approve", p["request_id"].as_str().unwrap(), "--for", "0s"],
        vec![
            "approve",
            p["request_id"].as_str().unwrap(),
            "--for",
            "1h",
            "--scope",
            "everything",
        ],
    ] {
        let out = s.cli(&args);
        assert!(!out.status.success(), "{args:?}");
    }
    let st = s.rpc("status", json!({"id": id(&p)})).expect("status");
    assert_eq!(st["state"], "pending", "{st}");
    // A plain approve still works and adds no grant.
    let a = cli_json(&s, &["approve", &id(&p), "--json"]);
    assert!(a.get("grant").is_none_or(Value::is_null), "{a}");
}
