//! The content guard through the real binary and its socket: a secret in a
//! tool name or id is refused with `invalid_params` and never reaches the
//! server's log; an encoded secret comes back masked and flagged
//! `encoded_secret`.

mod harness;

use harness::{config, Server};
use serde_json::json;
use std::time::Duration;

const GHP: &str = "ghp_Q7mW2xR9tK4vB8nL1cZ5hJ3pD6fG0sY2aE4u";

#[test]
fn a_secret_in_a_tool_name_or_id_is_refused_and_never_logged() {
    let s = Server::start(config::claude_code, "");
    for params in [
        json!({"agent": "cli", "tool": GHP, "args": {}}),
        json!({"agent": "cli", "tool": "Read", "args": {}, "task_id": format!("t-{GHP}")}),
        json!({"agent": "cli", "tool": "Read", "args": {}, "idempotency_key": GHP}),
        json!({"agent": "cli", "tool": "Read", "args": {}, "user_id": GHP}),
    ] {
        let err = s.rpc("submit", params.clone()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("invalid_params"), "{text}");
        assert!(!text.contains("Q7mW2xR9"), "{text}");
    }
    // A clean call after them that waits for a human: once its log line is
    // there, every earlier line has been read, and none holds the token.
    s.rpc(
        "submit",
        json!({"agent": "cli", "tool": "Bash", "args": {"cmd": "ls"}, "justification": "ok", "wait": false}),
    )
    .unwrap();
    let seen = std::cell::RefCell::new(Vec::new());
    s.wait_log(
        |l| {
            seen.borrow_mut().push(l.to_owned());
            l.contains("queued for approval") && l.contains("tool=Bash ")
        },
        Duration::from_secs(10),
    );
    let seen = seen.into_inner();
    assert!(
        seen.iter().all(|l| !l.contains("Q7mW2xR9")),
        "token in the log: {seen:?}"
    );
}

#[test]
fn an_encoded_secret_is_masked_and_flagged_through_the_socket() {
    let s = Server::start(config::claude_code, "");
    let hex: String = GHP.bytes().map(|b| format!("{b:02x}")).collect();
    let r = s
        .rpc(
            "submit",
            json!({"agent": "cli", "tool": "Read", "args": {"blob": hex}, "justification": "read"}),
        )
        .unwrap();
    let text = r.to_string();
    assert!(!text.contains(&hex), "{text}");
    let flags = r["flags"].as_array().cloned().unwrap_or_default();
    assert!(
        flags.iter().any(|f| f["kind"] == "encoded_secret"
            && f["detail"]
                .as_str()
                .is_some_and(|d| d.contains("github_token as hex"))),
        "{flags:?}"
    );
}
