//! `keyturn mcp-proxy` in front of a real, unmodified MCP server from npm
//! (@modelcontextprotocol/server-filesystem, installed by `.ci/run` into
//! target/mcp), driven by a test client that speaks MCP over stdio. Without
//! the package the test fails under `CI=true` and is skipped, loudly, elsewhere.

mod harness;

use harness::{config, Server, BIN};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

fn fs_server() -> Option<PathBuf> {
    let p = std::env::var_os("KEYTURN_MCP_FS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(
                "target/mcp/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js",
            )
        });
    let node = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if p.exists() && node {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{} (and node) are required under CI; .ci/run installs them",
            p.display()
        );
    }
    eprintln!(
        "\n*** SKIPPED: MCP server not installed at {} (run .ci/run) ***\n",
        p.display()
    );
    None
}

struct Mcp {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    next: u64,
}

impl Mcp {
    fn start(args: &[String]) -> Mcp {
        let mut child = Command::new(BIN)
            .arg("mcp-proxy")
            .args(args)
            .env_remove("KEYTURN_AGENT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mcp-proxy");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let (etx, stderr) = std::sync::mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = etx.send(l);
            }
        });
        Mcp {
            child,
            stdin,
            lines,
            stderr,
            next: 1,
        }
    }

    fn send(&mut self, v: Value) {
        writeln!(self.stdin, "{v}").expect("write to proxy");
    }

    /// Sends a request; returns its id.
    fn request(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next;
        self.next += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        id
    }

    fn response(&self, id: u64) -> Value {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("a response in time");
            let v: Value =
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"));
            if v["id"] == json!(id) && v.get("method").is_none() {
                return v;
            }
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.request(method, params);
        self.response(id)
    }
}

impl Drop for Mcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(v: &Value) -> String {
    v["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

const EXTRA: &str = r#"
[[agents]]
name = "mcp"

[[tools]]
name = "fs.list_directory"
risk = "low"

[[tools]]
name = "fs.write_file"
risk = "high"

[[grants]]
scope = "agent:mcp"
tool = "fs.*"
effect = "allow"

[[grants]]
scope = "agent:mcp"
tool = "fs.move_file"
effect = "deny"
"#;

#[test]
fn gates_a_real_filesystem_server() {
    let Some(server_js) = fs_server() else { return };
    let s = Server::start(config::claude_code, EXTRA);
    let root = s.dir.path().join("files");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("hello.txt"), "hi").expect("write");
    let root_s = root.display().to_string();
    let mut c = Mcp::start(&[
        "--name".into(),
        "fs".into(),
        "--socket".into(),
        s.socket().display().to_string(),
        "--filter-tools".into(),
        "--approval-timeout".into(),
        "2s".into(),
        "--".into(),
        "node".into(),
        server_js.display().to_string(),
        root_s.clone(),
    ]);

    let init = c.call(
        "initialize",
        json!({
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "keyturn-test", "version": "1"}
        }),
    );
    assert!(init["result"]["serverInfo"]["name"].is_string(), "{init}");
    c.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));

    let list = c.call("tools/list", json!({}));
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"list_directory") && names.contains(&"write_file"),
        "{names:?}"
    );
    assert!(
        !names.contains(&"move_file"),
        "denied tool not filtered: {names:?}"
    );

    // Allowed by policy: runs at once.
    let r = c.call(
        "tools/call",
        json!({"name": "list_directory", "arguments": {"path": root_s}}),
    );
    assert_ne!(r["result"]["isError"], json!(true), "{r}");
    assert!(text(&r).contains("hello.txt"), "{r}");

    // Gated, approved by a human: the server writes the file.
    let approved = root.join("approved.txt");
    let id = c.request(
        "tools/call",
        json!({"name": "write_file",
        "arguments": {"path": approved.display().to_string(), "content": "yes"}}),
    );
    let rid = s.wait_queued("fs.write_file");
    assert!(!approved.exists());
    s.approve(&rid, "go ahead");
    let r = c.response(id);
    assert_ne!(r["result"]["isError"], json!(true), "{r}");
    assert_eq!(std::fs::read_to_string(&approved).expect("written"), "yes");

    // Gated, denied: never reaches the server.
    let denied = root.join("denied.txt");
    let id = c.request(
        "tools/call",
        json!({"name": "write_file",
        "arguments": {"path": denied.display().to_string(), "content": "no"}}),
    );
    let rid = s.wait_queued("fs.write_file");
    s.deny(&rid, "not that file");
    let r = c.response(id);
    assert_eq!(r["result"]["isError"], json!(true), "{r}");
    let t = text(&r);
    assert!(
        t.contains("denied by") && t.contains("bob") && t.contains("not that file"),
        "{t}"
    );
    assert!(!denied.exists());

    // Gated, nobody answers: timed out, not run.
    let late = root.join("late.txt");
    let r = c.call(
        "tools/call",
        json!({"name": "write_file",
        "arguments": {"path": late.display().to_string(), "content": "late"}}),
    );
    assert_eq!(r["result"]["isError"], json!(true), "{r}");
    assert!(text(&r).contains("timed out"), "{r}");
    assert!(!late.exists());

    // A hidden tool called anyway is still denied by the policy.
    let r = c.call(
        "tools/call",
        json!({"name": "move_file",
        "arguments": {"source": root.join("hello.txt").display().to_string(),
                      "destination": root.join("moved.txt").display().to_string()}}),
    );
    assert_eq!(r["result"]["isError"], json!(true), "{r}");
    assert!(root.join("hello.txt").exists());

    // A batch cannot smuggle a call past the gate.
    c.send(json!([{"jsonrpc": "2.0", "id": 99, "method": "tools/call",
        "params": {"name": "write_file", "arguments": {"path": late.display().to_string(), "content": "x"}}}]));
    let l = c
        .lines
        .recv_timeout(Duration::from_secs(10))
        .expect("answer to batch");
    assert!(l.contains("batches"), "{l}");
    assert!(!late.exists());
}

#[test]
fn server_exit_answers_in_flight_requests_and_ends_the_proxy() {
    let s = Server::start(config::claude_code, EXTRA);
    // A stand-in server that reads one request, complains on stderr and dies.
    let mut c = Mcp::start(&[
        "--name".into(),
        "fs".into(),
        "--socket".into(),
        s.socket().display().to_string(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        "read line; echo boom >&2; exit 7".into(),
    ]);
    // One call waiting for a human, one request forwarded to the server.
    let gated = c.request(
        "tools/call",
        json!({"name": "write_file", "arguments": {"path": "/x", "content": ""}}),
    );
    s.wait_queued("fs.write_file");
    let forwarded = c.request("initialize", json!({}));
    // Both answered (in any order), then the proxy's stdout ends.
    let mut answered = Vec::new();
    while let Ok(l) = c.lines.recv_timeout(Duration::from_secs(10)) {
        let v: Value = serde_json::from_str(&l).expect("json");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains("exited"), "{v}");
        answered.push(v["id"].as_u64().unwrap_or(0));
    }
    answered.sort_unstable();
    assert_eq!(answered, vec![gated, forwarded]);
    let status = c.child.wait().expect("proxy exit");
    assert_eq!(status.code(), Some(7));
    // The child's stderr came through ours (read until it shows or ends).
    let mut seen = Vec::new();
    while let Ok(l) = c.stderr.recv_timeout(Duration::from_secs(10)) {
        if l.contains("boom") {
            return;
        }
        seen.push(l);
    }
    panic!("child stderr not passed through: {seen:?}");
}

#[test]
fn unattended_proxy_denies_gated_calls_at_once() {
    let s = Server::start(config::claude_code, EXTRA);
    let mut c = Mcp::start(&[
        "--name".into(),
        "fs".into(),
        "--socket".into(),
        s.socket().display().to_string(),
        "--unattended".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        "cat >/dev/null".into(),
    ]);
    let r = c.call(
        "tools/call",
        json!({"name": "write_file", "arguments": {"path": "/x", "content": ""}}),
    );
    assert_eq!(r["result"]["isError"], json!(true), "{r}");
    assert!(text(&r).contains("unattended"), "{r}");
}

/// A proxy in front of a stand-in server that reads and never answers.
fn silent_proxy(s: &Server) -> Mcp {
    Mcp::start(&[
        "--name".into(),
        "fs".into(),
        "--socket".into(),
        s.socket().display().to_string(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        "cat >/dev/null".into(),
    ])
}

/// The request `id` ended cancelled because its client went away, and a
/// late approval is refused.
fn assert_withdrawn(s: &Server, id: &str) {
    s.wait_log(
        |l| l.contains("the client went away; request cancelled") && l.contains(id),
        Duration::from_secs(10),
    );
    let late = s
        .rpc("approve", json!({"id": id, "reason": "late"}))
        .expect_err("a withdrawn call cannot be approved");
    assert_eq!(late["data"]["code"], "already_decided", "{late}");
}

#[test]
fn a_cancelled_call_is_withdrawn_and_a_late_approval_runs_nothing() {
    let s = Server::start(config::claude_code, EXTRA);
    let mut c = silent_proxy(&s);
    let gated = c.request(
        "tools/call",
        json!({"name": "write_file", "arguments": {"path": "/x", "content": ""}}),
    );
    let id = s.wait_queued("fs.write_file");
    // What the official Python client sends when its own timeout passes.
    c.send(
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                  "params": {"requestId": gated, "reason": "timed out"}}),
    );
    assert_withdrawn(&s, &id);
    // No answer for the cancelled call: the next line is the next call's.
    let denied = c.call(
        "tools/call",
        json!({"name": "move_file", "arguments": {"source": "/a", "destination": "/b"}}),
    );
    assert_eq!(denied["result"]["isError"], json!(true), "{denied}");
    // Closing stdin ends the stand-in server and the proxy; nothing more
    // comes out, in particular nothing for the cancelled call.
    drop(std::mem::replace(
        &mut c.stdin,
        Command::new("true")
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn")
            .stdin
            .take()
            .expect("stdin"),
    ));
    while let Ok(l) = c.lines.recv_timeout(Duration::from_secs(10)) {
        let v: Value = serde_json::from_str(&l).expect("json");
        assert_ne!(v["id"], json!(gated), "answered a cancelled call: {v}");
    }
}

#[test]
fn a_client_that_goes_away_withdraws_its_gated_calls() {
    let s = Server::start(config::claude_code, EXTRA);
    let mut c = silent_proxy(&s);
    c.request(
        "tools/call",
        json!({"name": "write_file", "arguments": {"path": "/y", "content": ""}}),
    );
    let id = s.wait_queued("fs.write_file");
    // The MCP client leaves: the proxy's stdin closes.
    drop(std::mem::replace(
        &mut c.stdin,
        Command::new("true")
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn")
            .stdin
            .take()
            .expect("stdin"),
    ));
    assert_withdrawn(&s, &id);
}

/// Sends one raw line (text the test writes, so duplicates survive).
fn send_raw(c: &mut Mcp, line: &str) {
    writeln!(c.stdin, "{line}").expect("write to proxy");
}

/// The proxy's own error for request `id`: -32602 (or `code`) with `needle`.
fn refused(c: &Mcp, id: u64, code: i64, needle: &str) {
    let r = c.response(id);
    assert_eq!(r["error"]["code"], code, "{r}");
    let msg = r["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

#[test]
fn malformed_tools_calls_never_reach_the_real_server_nor_the_queue() {
    let Some(server_js) = fs_server() else { return };
    let s = Server::start(config::claude_code, EXTRA);
    let root = s.dir.path().join("files");
    std::fs::create_dir(&root).expect("mkdir");
    let mut c = Mcp::start(&[
        "--name".into(),
        "fs".into(),
        "--socket".into(),
        s.socket().display().to_string(),
        "--".into(),
        "node".into(),
        server_js.display().to_string(),
        root.display().to_string(),
    ]);
    let init = c.call(
        "initialize",
        json!({
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "keyturn-test", "version": "1"}
        }),
    );
    assert!(init["result"]["serverInfo"]["name"].is_string(), "{init}");
    c.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));

    let target = root.join("x.txt").display().to_string();
    let other = root.join("y.txt").display().to_string();
    // `arguments` present but not an object: the approver would see `{}`.
    for bad in [
        json!(format!("{{\"path\":\"{target}\",\"content\":\"x\"}}")),
        json!([target, "x"]),
        Value::Null,
        json!(5),
    ] {
        let id = c.request(
            "tools/call",
            json!({"name": "write_file", "arguments": bad}),
        );
        refused(&c, id, -32602, "`arguments` must be an object");
    }
    // No usable tool name: the card would name a tool called `fs.`.
    for (params, needle) in [
        (json!({"arguments": {"path": target}}), "no tool `name`"),
        (json!({"name": "", "arguments": {}}), "empty tool `name`"),
        (json!({"name": 7, "arguments": {}}), "must be a string"),
        (
            json!({"name": "write file", "arguments": {}}),
            "may contain only",
        ),
        (json!("write_file"), "needs `params`"),
    ] {
        let id = c.request("tools/call", params);
        refused(&c, id, -32602, needle);
    }
    // Duplicate keys: the approver and the server could read different paths.
    send_raw(
        &mut c,
        &format!(
            r#"{{"jsonrpc":"2.0","id":900,"method":"tools/call","params":{{"name":"write_file","arguments":{{"path":"{other}","content":"x","path":"{target}"}}}}}}"#
        ),
    );
    let l = c
        .lines
        .recv_timeout(Duration::from_secs(10))
        .expect("answer");
    assert!(
        l.contains("duplicate key `path`") && l.contains("-32600"),
        "{l}"
    );
    // …or different methods.
    send_raw(
        &mut c,
        &format!(
            r#"{{"jsonrpc":"2.0","id":901,"method":"tools/call","method":"tools/list","params":{{"name":"write_file","arguments":{{"path":"{target}","content":"x"}}}}}}"#
        ),
    );
    let l = c
        .lines
        .recv_timeout(Duration::from_secs(10))
        .expect("answer");
    assert!(l.contains("duplicate key `method`"), "{l}");
    // Text a lenient reader accepts (NaN) is not passed on either.
    send_raw(
        &mut c,
        &format!(
            r#"{{"jsonrpc":"2.0","id":902,"method":"tools/call","params":{{"name":"write_file","arguments":{{"path":"{target}","content":"x","n":NaN}}}}}}"#
        ),
    );
    let l = c
        .lines
        .recv_timeout(Duration::from_secs(10))
        .expect("answer");
    assert!(l.contains("-32700"), "{l}");

    // Nothing was queued: the next queued request is this call, and denying
    // it answers this call.
    let id = c.request(
        "tools/call",
        json!({"name": "write_file", "arguments": {"path": target, "content": "late"}}),
    );
    let rid = s.wait_queued("fs.write_file");
    s.deny(&rid, "no");
    let r = c.response(id);
    assert_eq!(r["result"]["isError"], json!(true), "{r}");
    assert!(text(&r).contains("denied by"), "{r}");
    // Nothing was forwarded: no file was written, and the server is fine.
    assert!(!root.join("x.txt").exists() && !root.join("y.txt").exists());
    let list = c.call("tools/list", json!({}));
    assert!(list["result"]["tools"].is_array(), "{list}");
}

#[test]
fn refused_lines_are_not_forwarded_to_the_server() {
    let s = Server::start(config::claude_code, EXTRA);
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = dir.path().join("forwarded.jsonl");
    // A stand-in server that records every line it is given.
    let mut c = Mcp::start(&[
        "--name".into(),
        "fs".into(),
        "--socket".into(),
        s.socket().display().to_string(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        format!("cat >> '{}'", seen.display()),
    ]);
    let id = c.request(
        "tools/call",
        json!({"name": "list_directory", "arguments": "{}"}),
    );
    refused(&c, id, -32602, "`arguments`");
    let id = c.request("tools/call", json!({"arguments": {}}));
    refused(&c, id, -32602, "`name`");
    send_raw(&mut c, r#"{"jsonrpc":"2.0","id":5,"method":"ping","id":6}"#);
    let l = c
        .lines
        .recv_timeout(Duration::from_secs(10))
        .expect("answer");
    assert!(l.contains("duplicate key `id`"), "{l}");
    send_raw(
        &mut c,
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"list_directory","arguments":{"n":1e400}}}"#,
    );
    let l = c
        .lines
        .recv_timeout(Duration::from_secs(10))
        .expect("answer");
    assert!(l.contains("range"), "{l}");
    // A tools/call without an id is dropped, not forwarded.
    c.send(json!({"jsonrpc": "2.0", "method": "tools/call",
        "params": {"name": "list_directory", "arguments": {}}}));
    // A plain request marks the end: once it arrives, everything before it
    // that was forwarded has arrived too (one pipe, in order).
    c.send(json!({"jsonrpc": "2.0", "id": 99, "method": "ping"}));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = std::fs::read_to_string(&seen).unwrap_or_default();
        if got.contains(r#""id":99"#) {
            break got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ping not forwarded: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(got.lines().count(), 1, "only the ping was forwarded: {got}");
}

#[test]
fn an_edited_approval_forwards_the_edited_arguments() {
    let s = Server::start(config::claude_code, EXTRA);
    // The stand-in server echoes what reaches it.
    let mut c = Mcp::start(&[
        "--name".into(),
        "fs".into(),
        "--socket".into(),
        s.socket().display().to_string(),
        "--".into(),
        "cat".into(),
    ]);
    let gated = c.request(
        "tools/call",
        json!({"name": "write_file", "arguments": {"path": "/srv/a.txt", "content": "v1"}}),
    );
    let id = s.wait_queued("fs.write_file");
    let edited = json!({"path": "/srv/a.txt", "content": "v2, as the approver wrote it"});
    s.rpc(
        "approve",
        json!({"id": id, "args": edited, "operator": "alice"}),
    )
    .expect("approve with edits");
    // What reached the server is the edited call, and only it.
    let reached = loop {
        let l = c
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the call reaches the server");
        let v: Value = serde_json::from_str(&l).expect("json");
        if v["id"] == json!(gated) {
            break v;
        }
    };
    assert_eq!(reached["method"], "tools/call", "{reached}");
    assert_eq!(reached["params"]["name"], "write_file");
    assert_eq!(reached["params"]["arguments"], edited, "{reached}");
}
