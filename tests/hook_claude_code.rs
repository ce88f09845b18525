//! `keyturn hook claude-code` driven with real-shaped Claude Code hook inputs
//! (tests/fixtures/claude-code/) against a real server: what it prints and
//! how it exits for allow, approve, deny, timeout, unattended, socket down
//! and garbage.

mod harness;

use harness::{config, run_with_stdin, Server, BIN};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/claude-code")
            .join(name),
    )
    .expect("fixture")
}

fn hook(socket: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["hook", "claude-code", "--socket"])
        .arg(socket)
        .args(extra);
    c.env_remove("KEYTURN_AGENT").env_remove("KEYTURN_CONFIG");
    c
}

/// (exit code, permissionDecision, permissionDecisionReason)
fn parse(code: i32, out: &str) -> (i32, String, String) {
    let v: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    let h = &v["hookSpecificOutput"];
    assert_eq!(h["hookEventName"], "PreToolUse", "{out}");
    (
        code,
        h["permissionDecision"].as_str().unwrap_or("?").to_string(),
        h["permissionDecisionReason"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

fn run(cmd: Command, input: &[u8]) -> (i32, String, String) {
    let (code, out, _err) = run_with_stdin(cmd, input);
    parse(code, &out)
}

#[test]
fn low_risk_call_is_allowed_at_once() {
    let s = Server::start(config::claude_code, "");
    let (code, decision, reason) = run(hook(s.socket(), &[]), &fixture("read.json"));
    assert_eq!((code, decision.as_str()), (0, "allow"), "{reason}");
    assert!(reason.contains("approved by policy"), "{reason}");

    // The socket found through the config file (relative to it), from another cwd.
    let cfg = s.dir.path().join("relative.toml");
    std::fs::write(&cfg, "[server]\nsocket_path = \"k.sock\"\n").expect("write config");
    let mut c = Command::new(BIN);
    c.args(["hook", "claude-code", "--config"])
        .arg(&cfg)
        .current_dir("/");
    c.env_remove("KEYTURN_AGENT").env_remove("KEYTURN_SOCKET");
    let (code, decision, reason) = run(c, &fixture("read.json"));
    assert_eq!((code, decision.as_str()), (0, "allow"), "{reason}");
}

#[test]
fn human_approval_allows_and_wakes_the_hook_quickly() {
    let s = Server::start(config::claude_code, "");
    let cmd = hook(s.socket(), &[]);
    let waiting = std::thread::spawn(move || {
        let r = run(cmd, &fixture("bash.json"));
        (r, Instant::now())
    });
    let id = s.wait_queued("Bash");
    let clicked = Instant::now();
    s.approve(&id, "deploy is fine");
    let ((code, decision, reason), woke) = waiting.join().expect("hook thread");
    let wake = woke.duration_since(clicked);
    eprintln!("approval → hook answered in {wake:?} (includes hook exit)");
    assert_eq!((code, decision.as_str()), (0, "allow"), "{reason}");
    assert!(
        reason.contains("approved by") && reason.contains("deploy is fine"),
        "{reason}"
    );
    assert!(wake < Duration::from_secs(2), "woke after {wake:?}");

    // Claude Code retrying the same tool_use_id re-attaches to the request.
    let (_, decision, reason2) = run(hook(s.socket(), &[]), &fixture("bash.json"));
    assert_eq!(decision, "allow");
    assert!(reason2.contains(&id), "{reason2}");
}

#[test]
fn an_edited_approval_is_passed_on_as_updated_input() {
    let s = Server::start(config::claude_code, "");
    let cmd = hook(s.socket(), &[]);
    let waiting = std::thread::spawn(move || run_with_stdin(cmd, &fixture("bash.json")));
    let id = s.wait_queued("Bash");
    // The approver edits the command (as `approve` with `args` on the admin
    // socket; the Discord modal does the same).
    let edited = serde_json::json!({
        "command": "rm -rf build/ && npm run deploy -- --dry-run",
        "description": "Clean the build and deploy",
        "timeout": 120000,
    });
    let answer = s
        .rpc(
            "approve",
            serde_json::json!({"id": id, "args": edited, "operator": "alice"}),
        )
        .expect("approve with edits");
    assert_eq!(answer["decision"]["state"], "approved", "{answer}");
    let (code, out, _) = waiting.join().expect("hook thread");
    let v: Value = serde_json::from_str(out.trim()).expect("JSON");
    let h = &v["hookSpecificOutput"];
    assert_eq!(
        (code, h["permissionDecision"].as_str()),
        (0, Some("allow")),
        "{out}"
    );
    assert_eq!(
        h["updatedInput"], edited,
        "Claude Code runs the edit: {out}"
    );
    assert!(
        h["permissionDecisionReason"]
            .as_str()
            .unwrap_or("")
            .contains("edited"),
        "{out}"
    );
    // An unedited approval carries no updatedInput.
    let (_, out, _) = run_with_stdin(hook(s.socket(), &[]), &fixture("read.json"));
    assert!(!out.contains("updatedInput"), "{out}");
}

#[test]
fn human_denial_denies_with_who_and_why_and_mcp_names_are_mapped() {
    let s = Server::start(config::claude_code, "");
    let cmd = hook(s.socket(), &[]);
    let waiting = std::thread::spawn(move || run(cmd, &fixture("mcp.json")));
    let id = s.wait_queued("mcp.github.create_issue");
    s.deny(&id, "not on a Friday");
    let (code, decision, reason) = waiting.join().expect("hook thread");
    assert_eq!((code, decision.as_str()), (0, "deny"), "{reason}");
    assert!(
        reason.contains("denied by") && reason.contains("not on a Friday"),
        "{reason}"
    );
    assert!(!reason.contains("timed out"), "{reason}");
}

#[test]
fn own_timeout_denies_saying_timed_out_and_cancels_the_request() {
    let s = Server::start(config::claude_code, "");
    let started = Instant::now();
    let (code, decision, reason) = run(
        hook(s.socket(), &["--timeout", "1"]),
        &fixture("write.json"),
    );
    let took = started.elapsed();
    assert_eq!((code, decision.as_str()), (0, "deny"), "{reason}");
    assert!(reason.contains("timed out"), "{reason}");
    assert!(!reason.contains("denied by"), "{reason}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A late click can no longer approve it.
    let id = reason
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .trim_end_matches(':')
        .to_string();
    let st = s
        .rpc("status", serde_json::json!({"id": id}))
        .expect("status");
    assert_eq!(st["state"], "cancelled", "{st}");
}

#[test]
fn unattended_flag_and_unattended_agent_deny_at_once() {
    let s = Server::start(config::claude_code, "");
    let (code, decision, reason) = run(hook(s.socket(), &["--unattended"]), &fixture("bash.json"));
    assert_eq!((code, decision.as_str()), (0, "deny"), "{reason}");
    assert!(reason.contains("unattended"), "{reason}");
    let (_, decision, reason) = run(
        hook(s.socket(), &["--agent", "robot"]),
        &fixture("bash.json"),
    );
    assert_eq!(decision, "deny", "{reason}");
    assert!(reason.contains("unattended"), "{reason}");
    // Low risk still runs unattended.
    let (_, decision, _) = run(
        hook(s.socket(), &["--agent", "robot"]),
        &fixture("read.json"),
    );
    assert_eq!(decision, "allow");
}

#[test]
fn failures_deny_and_exit_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gone = dir.path().join("nobody.sock");
    let (code, decision, reason) = run(hook(&gone, &[]), &fixture("bash.json"));
    assert_eq!((code, decision.as_str()), (0, "deny"), "{reason}");
    assert!(reason.contains("cannot connect"), "{reason}");

    for garbage in [
        &b"{\"tool_name\": "[..],
        b"",
        b"\xff\xfe\x00",
        b"[1,2,3]",
        b"{\"tool_input\":{}}",
    ] {
        let (code, decision, reason) = run(hook(&gone, &[]), garbage);
        assert_eq!((code, decision.as_str()), (0, "deny"), "{reason}");
    }

    // Something that is not a Keyturn server on the socket.
    let path = dir.path().join("fake.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let fake = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (c, _) = l.accept().expect("accept");
        let mut r = std::io::BufReader::new(c);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = r.get_mut().write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let (code, decision, reason) = run(hook(&path, &[]), &fixture("bash.json"));
    assert_eq!((code, decision.as_str()), (0, "deny"), "{reason}");
    assert!(reason.contains("not a JSON-RPC response"), "{reason}");
    let _ = fake.join();

    // A bad flag is a usage error: exit 2, which Claude Code also treats as a block.
    let (code, _, _) = run_with_stdin(hook(&gone, &["--timeout", "soon"]), &fixture("bash.json"));
    assert_eq!(code, 2);
}

#[test]
fn server_stops_promptly_when_a_gone_agent_was_still_waiting() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::io::Write;
    // An agent gone mid-wait (a hook killed by Claude Code's own timeout)
    // leaves a call in flight on a closed connection; SIGTERM must still
    // stop the server at once.
    let mut s = Server::start(config::claude_code, "");
    let c = std::os::unix::net::UnixStream::connect(s.socket()).expect("connect");
    let mut r = std::io::BufReader::new(c);
    let submit = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "submit", "params": {
        "agent": "claude-code", "tool": "Bash", "args": {"command": "ls"}}});
    writeln!(r.get_mut(), "{submit}").expect("write");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut r, &mut line).expect("read");
    let v: Value = serde_json::from_str(&line).expect("json");
    let id = v["result"]["request_id"].as_str().expect("id").to_string();
    let wait = serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "wait",
        "params": {"agent": "claude-code", "id": id}});
    writeln!(r.get_mut(), "{wait}").expect("write");
    // Not a wait for an outcome: the server only has to have read the
    // `wait` line and the EOF separately, before the signal, for the
    // shutdown path under test to be taken.
    std::thread::sleep(Duration::from_millis(300));
    drop(r);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    kill(Pid::from_raw(s.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = s.wait_exit(Duration::from_secs(10));
    assert!(status.is_some(), "server still running 10 s after SIGTERM");
    eprintln!("server stopped {:?} after SIGTERM", started.elapsed());
}

#[test]
fn other_hook_events_are_refused_naming_pretooluse() {
    let s = Server::start(config::claude_code, "");
    for event in ["PostToolUse", "UserPromptSubmit", "Stop"] {
        let mut v: Value = serde_json::from_slice(&fixture("bash.json")).expect("fixture json");
        v["hook_event_name"] = Value::from(event);
        let input = serde_json::to_vec(&v).expect("json");
        let (code, out, err) = run_with_stdin(hook(s.socket(), &[]), &input);
        assert_eq!(code, 2, "{event}: {out} {err}");
        assert!(
            out.trim().is_empty(),
            "{event}: no PreToolUse answer: {out}"
        );
        assert!(
            err.contains("answers only PreToolUse events") && err.contains(event),
            "{event}: {err}"
        );
    }
    // Nothing was submitted.
    let (code, out, _) = run_with_stdin(hook(s.socket(), &[]), &fixture("read.json"));
    assert_eq!(parse(code, &out).1, "allow");
}
