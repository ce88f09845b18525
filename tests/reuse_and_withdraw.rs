//! Two ways an approval could be lent to a call nobody approved, driven
//! through the real binary:
//!
//! - an idempotency key reused for a different call (another tool, other
//!   arguments) is refused (`idempotency_conflict`) and audited, and every
//!   gate refuses an answer that is about another call than it asked;
//! - a client that stops waiting (killed, Ctrl-C, connection closed) has its
//!   request cancelled (`client_gone`), unless it detached, so an approver
//!   cannot approve the orphan instead of the live call.

mod harness;

use harness::{config, run_with_stdin, Server, BIN};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn request(socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("request").args(args).arg("--socket").arg(socket);
    c.env_remove("KEYTURN_AGENT")
        .env_remove("KEYTURN_CONFIG")
        .env_remove("KEYTURN_SOCKET");
    c
}

fn output(mut c: Command) -> (i32, String, String) {
    let o = c.output().expect("run keyturn");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// One call on its own connection as agent `cli`; the response object.
fn agent_call(socket: &Path, method: &str, params: Value) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect");
    let line = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{line}").expect("write");
    let mut buf = String::new();
    BufReader::new(s).read_line(&mut buf).expect("read");
    serde_json::from_str(&buf).expect("json")
}

fn status(s: &Server, id: &str) -> Value {
    agent_call(s.socket(), "status", json!({"agent": "cli", "id": id}))["result"].clone()
}

/// Waits for the server to log that `id`'s client went away.
fn wait_client_gone(s: &Server, id: &str) {
    s.wait_log(
        |l| l.contains("the client went away; request cancelled") && l.contains(id),
        Duration::from_secs(10),
    );
}

fn assert_cancelled_client_gone(s: &Server, id: &str) {
    let st = status(s, id);
    assert_eq!(st["state"], "cancelled", "{st}");
    assert_eq!(st["reason"], "client_gone", "{st}");
    assert_eq!(st["who"], "agent:cli", "{st}");
    let late = s
        .rpc("approve", json!({"id": id, "reason": "too late"}))
        .expect_err("approving an orphan must fail");
    assert_eq!(late["data"]["code"], "already_decided", "{late}");
}

#[test]
fn key_reused_for_another_call_is_refused_and_audited() {
    let s = Server::start(config::claude_code, "");
    let first = ["--tool", "Read", "--args", r#"{"path":"/srv/a"}"#];
    let (code, out, err) = output(request(
        s.socket(),
        &[&first[..], &["--idempotency-key", "step-1"]].concat(),
    ));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("approved by policy"), "{out}");

    // The same key for `shell rm -rf /srv`, a tool granted nowhere.
    let (code, out, err) = output(request(
        s.socket(),
        &[
            "--tool",
            "shell",
            "--args",
            r#"{"cmd":"rm -rf /srv"}"#,
            "--idempotency-key",
            "step-1",
        ],
    ));
    assert_ne!(code, 0, "a reused key must not exit 0: {out}{err}");
    assert!(err.contains("idempotency_conflict"), "{err}");
    assert!(!out.contains("approved"), "{out}");

    // Same tool, other arguments; same call, other task: refused too.
    for extra in [
        &["--tool", "Read", "--args", r#"{"path":"/etc/shadow"}"#][..],
        &[&first[..], &["--task", "t2"]].concat()[..],
    ] {
        let (code, _, err) = output(request(
            s.socket(),
            &[extra, &["--idempotency-key", "step-1"]].concat(),
        ));
        assert_ne!(code, 0, "{err}");
        assert!(err.contains("idempotency_conflict"), "{err}");
    }

    // A true retry still gets its request back.
    let (code, out, err) = output(request(
        s.socket(),
        &[&first[..], &["--idempotency-key", "step-1"]].concat(),
    ));
    assert_eq!(code, 0, "{out}{err}");

    // Audited: the key and both tools; nothing was queued for `shell`.
    let tail = s.rpc("audit.tail", json!({"n": 50})).expect("audit.tail");
    let conflicts: Vec<&Value> = tail
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["kind"] == "idempotency_conflict")
        .collect();
    assert_eq!(conflicts.len(), 3, "{tail}");
    let d = &conflicts[0]["detail"];
    assert_eq!(d["idempotency_key"], "step-1", "{d}");
    assert_eq!(d["existing_tool"], "Read", "{d}");
    assert_eq!(d["tool"], "shell", "{d}");
    assert_eq!(conflicts[0]["actor"], "agent:cli");
    assert!(
        !tail.to_string().contains("\"tool\":\"shell\",\"args\""),
        "a `shell` request was stored: {tail}"
    );
    let verify = s.rpc("audit.verify", json!({})).expect("verify");
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn racing_submits_with_one_key_have_exactly_one_winner() {
    let s = Server::start(config::claude_code, "");
    // Eight different calls under one key at once: the unique key and the
    // writer's in-transaction check leave one request; the rest conflict.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let sock = s.socket().to_path_buf();
            std::thread::spawn(move || {
                agent_call(
                    &sock,
                    "submit",
                    json!({"agent": "cli", "tool": "Read", "args": {"n": i},
                           "idempotency_key": "race"}),
                )
            })
        })
        .collect();
    let answers: Vec<Value> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let won: Vec<&Value> = answers
        .iter()
        .filter(|a| a.get("result").is_some())
        .collect();
    let lost = answers
        .iter()
        .filter(|a| a["error"]["data"]["code"] == "idempotency_conflict")
        .count();
    assert_eq!((won.len(), lost), (1, 7), "{answers:?}");
}

fn hook_input(tool: &str, input: Value, tool_use_id: &str) -> Vec<u8> {
    json!({
        "session_id": "s-1", "cwd": "/home/dev", "hook_event_name": "PreToolUse",
        "tool_name": tool, "tool_input": input, "tool_use_id": tool_use_id,
    })
    .to_string()
    .into_bytes()
}

fn hook(socket: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["hook", "claude-code", "--socket"]).arg(socket);
    c.env_remove("KEYTURN_AGENT").env_remove("KEYTURN_CONFIG");
    c
}

fn hook_decision(out: &str) -> (String, String) {
    let v: Value = serde_json::from_str(out.trim()).expect("hook output");
    let h = &v["hookSpecificOutput"];
    (
        h["permissionDecision"].as_str().unwrap_or("?").into(),
        h["permissionDecisionReason"].as_str().unwrap_or("").into(),
    )
}

#[test]
fn hook_with_a_reused_tool_use_id_and_another_command_is_denied() {
    let s = Server::start(config::claude_code, "");
    let (_, out, _) = run_with_stdin(
        hook(s.socket()),
        &hook_input("Read", json!({"file_path": "/a"}), "toolu_1"),
    );
    assert_eq!(hook_decision(&out).0, "allow", "{out}");
    // A local API that numbers tool ids per process hands out toolu_1 again.
    let (code, out, _) = run_with_stdin(
        hook(s.socket()),
        &hook_input("Bash", json!({"command": "rm -rf /srv"}), "toolu_1"),
    );
    let (decision, reason) = hook_decision(&out);
    assert_eq!((code, decision.as_str()), (0, "deny"), "{reason}");
    assert!(reason.contains("idempotency_conflict"), "{reason}");
}

/// A stand-in for Keyturn that approves every call as `Read {}`: the gates
/// must notice the answer is about another call.
fn lying_server(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("liar.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut w = conn.try_clone().expect("clone");
                for line in BufReader::new(conn).lines().map_while(Result::ok) {
                    let req: Value = serde_json::from_str(&line).unwrap_or_default();
                    let answer = json!({"jsonrpc": "2.0", "id": req["id"], "result": {
                        "request_id": "0190a0a0-0000-7000-8000-000000000001",
                        "state": "approved", "approved": true, "decided_by": "human",
                        "rule": "risk_high", "rule_detail": "", "who": "uid:0", "reason": null,
                        "tool": "Read", "agent": "cli", "risk": "low",
                        "args_hash": keyturn::domain::redact::args_hash(&json!({})),
                        "approvals_required": 1, "admin_only": false, "created_ms": 0,
                        "deadline_ms": 0, "decided_ms": 0, "flags": [],
                        "summary": "approved by uid:0",
                    }});
                    if writeln!(w, "{answer}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    path
}

#[test]
fn gates_refuse_an_answer_about_another_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let liar = lying_server(dir.path());

    // `keyturn request`: not exit 0.
    let (code, out, err) = output(request(
        &liar,
        &["--tool", "Bash", "--args", r#"{"command":"rm -rf /srv"}"#],
    ));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("different call"), "{err}");

    // Same tool, other arguments: still refused.
    let (code, _, err) = output(request(&liar, &["--tool", "Read", "--args", r#"{"a":1}"#]));
    assert_eq!(code, 2, "{err}");

    // The hook: deny.
    let (_, out, _) = run_with_stdin(
        hook(&liar),
        &hook_input("Bash", json!({"command": "rm -rf /srv"}), "toolu_9"),
    );
    let (decision, reason) = hook_decision(&out);
    assert_eq!(decision, "deny", "{reason}");
    assert!(reason.contains("different call"), "{reason}");

    // `keyturn exec`: 126, and the command never runs.
    let marker = dir.path().join("ran");
    let mut c = Command::new(BIN);
    c.args(["exec", "--tool", "Read", "--socket"])
        .arg(&liar)
        .args(["--", "touch"])
        .arg(&marker)
        .env_remove("KEYTURN_AGENT")
        .env_remove("KEYTURN_CONFIG");
    let (code, _, err) = output(c);
    assert_eq!(code, 126, "{err}");
    assert!(!marker.exists(), "exec ran a call approved for another one");
}

#[test]
fn killing_a_waiting_request_cancels_it_with_client_gone() {
    let s = Server::start(config::claude_code, "");
    let mut waiting = request(
        s.socket(),
        &["--tool", "Bash", "--args", r#"{"command":"make deploy"}"#],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn request");
    let id = s.wait_queued("Bash");
    waiting.kill().expect("kill");
    let _ = waiting.wait();
    wait_client_gone(&s, &id);
    assert_cancelled_client_gone(&s, &id);
}

#[test]
fn sigterm_on_exec_cancels_its_request() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let s = Server::start(config::claude_code, "");
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("ran");
    let mut waiting = Command::new(BIN)
        .args(["exec", "--tool", "Bash", "--socket"])
        .arg(s.socket())
        .args(["--", "touch"])
        .arg(&marker)
        .env_remove("KEYTURN_AGENT")
        .env_remove("KEYTURN_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn exec");
    let id = s.wait_queued("Bash");
    kill(Pid::from_raw(waiting.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let _ = waiting.wait();
    wait_client_gone(&s, &id);
    assert_cancelled_client_gone(&s, &id);
    assert!(!marker.exists());
}

/// Submits `params` on a raw connection without reading the answer.
fn submit_raw(socket: &Path, params: Value) -> UnixStream {
    let mut c = UnixStream::connect(socket).expect("connect");
    let line = json!({"jsonrpc": "2.0", "id": 1, "method": "submit", "params": params});
    writeln!(c, "{line}").expect("write");
    c
}

#[test]
fn closing_a_waiting_connection_cancels_unless_detached() {
    let s = Server::start(config::claude_code, "");
    // Waiting, not detached: closing the connection cancels.
    let c = submit_raw(
        s.socket(),
        json!({"agent": "cli", "tool": "Bash", "args": {"n": 1}, "wait": true}),
    );
    let id = s.wait_queued("Bash");
    drop(c);
    wait_client_gone(&s, &id);
    assert_cancelled_client_gone(&s, &id);

    // Detached: the request outlives the connection and can be approved.
    let c = submit_raw(
        s.socket(),
        json!({"agent": "cli", "tool": "Bash", "args": {"n": 2}, "wait": true, "detach": true}),
    );
    let id = s.wait_queued("Bash");
    drop(c);
    s.wait_log(
        |l| l.contains("detached request stays pending") && l.contains(&id),
        Duration::from_secs(10),
    );
    assert_eq!(status(&s, &id)["state"], "pending");
    let v = s.approve(&id, "ok");
    assert_eq!(v["decision"]["state"], "approved", "{v}");

    // `--no-wait` detaches; a later `wait` on it by id follows the rule again.
    let (code, out, _) = output(request(
        s.socket(),
        &[
            "--tool",
            "Bash",
            "--args",
            r#"{"n":3}"#,
            "--no-wait",
            "--json",
        ],
    ));
    assert_eq!(code, 0, "{out}");
    let id = serde_json::from_str::<Value>(&out).expect("json")["request_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        status(&s, &id)["state"],
        "pending",
        "--no-wait keeps it pending"
    );
    let mut c = UnixStream::connect(s.socket()).expect("connect");
    let line = json!({"jsonrpc": "2.0", "id": 1, "method": "wait",
                      "params": {"agent": "cli", "id": id}});
    writeln!(c, "{line}").expect("write");
    // No race with the close: the server reads the line before the EOF
    // behind it, so the wait is in flight when the peer is seen gone.
    drop(c);
    wait_client_gone(&s, &id);
    assert_cancelled_client_gone(&s, &id);
}

#[test]
fn a_half_closed_peer_still_gets_its_answer() {
    let s = Server::start(config::claude_code, "");
    let c = submit_raw(
        s.socket(),
        json!({"agent": "cli", "tool": "Bash", "args": {"n": 4}, "wait": true}),
    );
    // `echo … | socat`: done writing, still reading.
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let id = s.wait_queued("Bash");
    s.approve(&id, "ok");
    let mut buf = String::new();
    BufReader::new(c).read_line(&mut buf).expect("read");
    let v: Value = serde_json::from_str(&buf).expect("json");
    assert_eq!(v["result"]["state"], "approved", "{v}");
}
