//! The usage report end to end: a known sequence of calls against the real
//! `keyturn serve` (allowed and denied by the policy, approved and denied
//! by two operators on the admin socket, one timing out, one cancelled,
//! one left pending), then `keyturn stats --json` and `keyturn stats`
//! report exactly that. Every wait has a deadline.

mod harness;

use harness::config;
use harness::rpc::submit;
use harness::Server;
use serde_json::{json, Value};

fn id_of(v: &Value) -> String {
    v["request_id"].as_str().expect("request_id").to_string()
}

/// Submits without waiting; returns the answer.
async fn call(s: &Server, agent: &str, tool: &str, extra: Value) -> Value {
    let mut p = submit(tool, extra);
    p["agent"] = json!(agent);
    s.admin_call("submit", p).await.expect("submit")
}

fn vote(s: &Server, method: &str, id: &str, operator: &str) {
    let v = s
        .admin_rpc(method, json!({"id": id, "operator": operator}))
        .unwrap_or_else(|e| panic!("{method}: {e}"));
    assert_eq!(v["decision"]["decided_by"], "human", "{v}");
}

fn stats_json(s: &Server, args: &[&str]) -> Value {
    let mut all = vec!["stats"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = s.cli(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_match_a_known_sequence_of_calls_exactly() {
    let deny_drop =
        "\n[[grants]]\nscope = \"global\"\ntool = \"drop_database\"\neffect = \"deny\"\n";
    let s = Server::start(config::files, deny_drop);
    let uid = nix::unistd::getuid();

    // Decided by the policy at once.
    for _ in 0..2 {
        let r = call(&s, "bot", "read_file", json!({})).await;
        assert_eq!(r["state"], "approved", "{r}");
    }
    let r = call(&s, "cli", "write_file", json!({})).await;
    assert_eq!(r["state"], "approved", "{r}");
    for _ in 0..2 {
        let r = call(&s, "bot", "drop_database", json!({})).await;
        assert_eq!(
            (r["state"].as_str(), r["decided_by"].as_str()),
            (Some("denied"), Some("policy")),
            "{r}"
        );
    }
    // Decided by two operators.
    let a = id_of(&call(&s, "bot", "delete_file", json!({})).await);
    vote(&s, "approve", &a, "alice");
    let b = id_of(&call(&s, "cli", "delete_file", json!({})).await);
    vote(&s, "deny", &b, "bob");
    let c = id_of(&call(&s, "bot", "delete_file", json!({})).await);
    vote(&s, "deny", &c, "alice");
    // Nobody answers: it times out (the submit waits for that).
    let t = s
        .admin_call(
            "submit",
            submit("delete_file", json!({"wait": true, "timeout_secs": 1})),
        )
        .await
        .expect("submit");
    assert_eq!(t["state"], "timed_out", "{t}");
    // Withdrawn, and one left waiting.
    let d = id_of(&call(&s, "cli", "delete_file", json!({})).await);
    let v = s.admin_rpc("cancel", json!({"id": d})).expect("cancel");
    assert_eq!(v["state"], "cancelled", "{v}");
    let p = call(&s, "bot", "delete_file", json!({})).await;
    assert_eq!(p["state"], "pending", "{p}");

    let r = stats_json(&s, &["--since", "1h"]);
    assert_eq!(r["total"], 11, "{r:#}");
    assert_eq!(r["truncated"], false);
    assert_eq!(
        r["outcomes"],
        json!({
            "approved_by_policy": 3,
            "approved_by_human": 1,
            "denied_by_policy": 2,
            "denied_by_human": 2,
            "timed_out": 1,
            "cancelled": 1,
            "pending": 1,
        })
    );
    assert_eq!(r["timeouts"], 1);
    let names = |list: &Value| -> Vec<(String, u64)> {
        list.as_array()
            .expect("list")
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().expect("name").to_string(),
                    t["total"].as_u64().or(t["calls"].as_u64()).expect("count"),
                )
            })
            .collect()
    };
    let owned = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
        v.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    };
    assert_eq!(
        names(&r["by_tool"]),
        owned(&[
            ("delete_file", 6),
            ("drop_database", 2),
            ("read_file", 2),
            ("write_file", 1)
        ])
    );
    let delete = &r["by_tool"][0];
    assert_eq!(
        (
            &delete["approved_by_human"],
            &delete["denied_by_human"],
            &delete["timed_out"],
            &delete["cancelled"],
            &delete["pending"]
        ),
        (&json!(1), &json!(2), &json!(1), &json!(1), &json!(1))
    );
    assert_eq!(names(&r["by_agent"]), owned(&[("bot", 8), ("cli", 3)]));
    assert_eq!(
        names(&r["top_denied_tools"]),
        owned(&[("delete_file", 2), ("drop_database", 2)])
    );
    assert_eq!(
        names(&r["grants_used"]),
        owned(&[("risk_low", 2), ("risk_medium", 1)])
    );
    // Three human decisions; per approver, who decided what.
    assert_eq!(r["time_to_decision"]["count"], 3, "{r:#}");
    let (p50, p90) = (
        r["time_to_decision"]["p50_ms"].as_i64().expect("p50"),
        r["time_to_decision"]["p90_ms"].as_i64().expect("p90"),
    );
    assert!(0 <= p50 && p50 <= p90, "{p50} {p90}");
    let approvers: Vec<(String, u64, u64, u64)> = r["by_approver"]
        .as_array()
        .expect("by_approver")
        .iter()
        .map(|a| {
            (
                a["approver"].as_str().expect("approver").to_string(),
                a["approved"].as_u64().expect("approved"),
                a["denied"].as_u64().expect("denied"),
                a["time_to_decision"]["count"].as_u64().expect("count"),
            )
        })
        .collect();
    assert_eq!(
        approvers,
        [
            (format!("alice (uid:{uid})"), 1, 1, 2),
            (format!("bob (uid:{uid})"), 0, 1, 1),
        ]
    );

    // The same as text.
    let out = s.cli(&["stats", "--since", "1h"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("calls in the last 1h: 11"), "{text}");
    assert!(text.contains("timeouts: 1"), "{text}");
    assert!(text.contains("delete_file: 6"), "{text}");

    // A window before any of it counts nothing; a bad window is refused.
    let r = stats_json(&s, &["--since", "1s"]);
    assert!(r["total"].as_u64().expect("total") <= 11);
    let out = s.cli(&["stats", "--since", "1y"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
    // Over the socket: admins only, and the window is bounded.
    let e = s
        .agent_rpc("stats.report", json!({}))
        .expect_err("agent socket");
    assert_eq!(e["data"]["code"], "not_admin", "{e}");
    let e = s
        .admin_rpc("stats.report", json!({"window_secs": 400 * 86_400}))
        .expect_err("too long");
    assert_eq!(e["data"]["code"], "invalid_params", "{e}");
}
