//! The real server on a temporary socket and database, driven as a client.

mod harness;

use harness::config;
use harness::rpc::{err_code, submit, wait_pending};
use harness::Server;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdStream;
use std::time::Duration;

async fn submit_no_wait(s: &Server, tool: &str, extra: Value) -> Value {
    s.client()
        .await
        .call("submit", submit(tool, extra))
        .await
        .expect("submit")
}

fn id_of(v: &Value) -> String {
    v["request_id"].as_str().expect("request_id").to_string()
}

#[tokio::test]
async fn approve_unblocks_the_waiting_agent() {
    let s = Server::start(config::files, "");
    let r = submit_no_wait(&s, "delete_file", json!({})).await;
    assert_eq!(r["state"], "pending");
    assert_eq!(r["rule"], "risk_high");
    let id = id_of(&r);
    let mut agent = s.client().await;
    let waiting =
        tokio::spawn(async move { agent.call("wait", json!({"agent": "bot", "id": id})).await });
    let mut admin = s.client().await;
    let v = admin
        .call(
            "approve",
            json!({"id": id_of(&r), "reason": "looks fine", "operator": "alice"}),
        )
        .await
        .unwrap();
    assert_eq!(v["decision"]["state"], "approved");
    let d = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d["state"], "approved");
    assert_eq!(d["approved"], true);
    assert_eq!(d["decided_by"], "human");
    assert!(d["who"].as_str().unwrap().starts_with("alice (uid:"), "{d}");
    assert_eq!(d["reason"], "looks fine");
    // A second decision loses.
    assert_eq!(
        err_code(admin.call("deny", json!({"id": id_of(&r)})).await),
        "already_decided"
    );
}

#[tokio::test]
async fn deny_with_reason_is_reported_as_a_human_denial() {
    let s = Server::start(config::files, "");
    let r = submit_no_wait(&s, "delete_file", json!({})).await;
    let mut admin = s.client().await;
    admin
        .call("deny", json!({"id": id_of(&r), "reason": "not today"}))
        .await
        .unwrap();
    let d = s
        .client()
        .await
        .call("status", json!({"agent": "bot", "id": id_of(&r)}))
        .await
        .unwrap();
    assert_eq!(d["state"], "denied");
    assert_eq!(d["decided_by"], "human");
    assert_eq!(d["reason"], "not today");
    assert_eq!(d["approved"], false);
}

#[tokio::test]
async fn unanswered_request_times_out_as_a_denial_distinct_from_a_human_no() {
    let s = Server::start(config::files, "");
    let t0 = std::time::Instant::now();
    let d = s
        .client()
        .await
        .call(
            "submit",
            submit("delete_file", json!({"wait": true, "timeout_secs": 1})),
        )
        .await
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(d["state"], "timed_out");
    assert_eq!(d["decided_by"], "timeout");
    assert_eq!(d["approved"], false);
    // Deciding afterwards is refused.
    let e = err_code(
        s.client()
            .await
            .call("approve", json!({"id": id_of(&d)}))
            .await,
    );
    assert_eq!(e, "already_decided");
}

#[tokio::test]
async fn cancel_ends_the_request_and_wakes_waiters() {
    let s = Server::start(config::files, "");
    let r = submit_no_wait(&s, "delete_file", json!({})).await;
    let id = id_of(&r);
    let mut agent = s.client().await;
    let waiting =
        tokio::spawn(async move { agent.call("wait", json!({"agent": "bot", "id": id})).await });
    let c = s
        .client()
        .await
        .call(
            "cancel",
            json!({"agent": "bot", "id": id_of(&r), "reason": "not needed"}),
        )
        .await
        .unwrap();
    assert_eq!(c["state"], "cancelled");
    let d = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d["state"], "cancelled");
    assert_eq!(d["decided_by"], "cancel");
    assert_eq!(
        err_code(
            s.client()
                .await
                .call("cancel", json!({"agent": "bot", "id": id_of(&r)}))
                .await
        ),
        "already_decided"
    );
}

#[tokio::test]
async fn idempotent_resubmit_returns_the_same_request() {
    let s = Server::start(config::files, "");
    let a = submit_no_wait(&s, "delete_file", json!({"idempotency_key": "call-1"})).await;
    let b = submit_no_wait(&s, "delete_file", json!({"idempotency_key": "call-1"})).await;
    assert_eq!(id_of(&a), id_of(&b));
    let c = submit_no_wait(&s, "delete_file", json!({"idempotency_key": "call-2"})).await;
    assert_ne!(id_of(&a), id_of(&c));
    let pending = s.client().await.call("pending", json!({})).await.unwrap();
    assert_eq!(pending.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn wait_resumes_after_reconnect() {
    let s = Server::start(config::files, "");
    let r = {
        let mut first = s.client().await;
        first
            .call("submit", submit("delete_file", json!({})))
            .await
            .unwrap()
        // the first connection is dropped here
    };
    let id = id_of(&r);
    let mut second = s.client().await;
    let waiting =
        tokio::spawn(async move { second.call("wait", json!({"agent": "bot", "id": id})).await });
    s.client()
        .await
        .call("approve", json!({"id": id_of(&r)}))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d["state"], "approved");
}

#[tokio::test]
async fn restart_after_sigkill_keeps_pending_requests_and_deadlines() {
    let mut s = Server::start(config::files, "");
    let short = submit_no_wait(&s, "delete_file", json!({"timeout_secs": 3})).await;
    let long = submit_no_wait(&s, "delete_file", json!({"timeout_secs": 600})).await;
    let short_deadline = short["deadline_ms"].as_i64().unwrap();
    s.kill_and_restart();

    let mut c = s.client().await;
    let pending = c.call("pending", json!({})).await.unwrap();
    let ids: Vec<&str> = pending
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&id_of(&short).as_str()) && ids.contains(&id_of(&long).as_str()),
        "{pending}"
    );
    let kept = pending
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == short["request_id"])
        .unwrap();
    assert_eq!(
        kept["deadline_ms"].as_i64().unwrap(),
        short_deadline,
        "deadline must survive the restart"
    );

    // The short one times out on its original deadline, not earlier.
    let d = c
        .call("wait", json!({"agent": "bot", "id": id_of(&short)}))
        .await
        .unwrap();
    assert_eq!(d["state"], "timed_out");
    assert!(d["decided_ms"].as_i64().unwrap() >= short_deadline);
    // The long one can still be approved.
    c.call("approve", json!({"id": id_of(&long)}))
        .await
        .unwrap();
    let d = c.call("status", json!({"id": id_of(&long)})).await.unwrap();
    assert_eq!(d["state"], "approved");
}

#[tokio::test]
async fn overdue_requests_time_out_at_once_after_restart() {
    let mut s = Server::start(config::files, "");
    let r = submit_no_wait(&s, "delete_file", json!({"timeout_secs": 1})).await;
    s.kill();
    // Stay down past the deadline (wall clock; the server is not running).
    std::thread::sleep(Duration::from_millis(1200));
    s.kill_and_restart();
    let d = s
        .client()
        .await
        .call(
            "wait",
            json!({"agent": "bot", "id": id_of(&r), "timeout_secs": 5}),
        )
        .await
        .unwrap();
    assert_eq!(d["state"], "timed_out");
}

/// Raw line access, to send what a well-behaved client never would.
struct Raw {
    reader: BufReader<StdStream>,
    writer: StdStream,
}

impl Raw {
    fn connect(s: &Server) -> Raw {
        let stream = StdStream::connect(s.socket()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }
    fn send(&mut self, bytes: &[u8]) -> Value {
        self.writer.write_all(bytes).unwrap();
        self.writer.write_all(b"\n").unwrap();
        self.read()
    }
    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}"))
    }
}

#[tokio::test]
async fn malformed_and_oversized_lines_get_errors_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let text = config::files(dir.path(), "").replace(
        "[server]\n",
        "[server]\nmax_line_bytes = 4096\nmax_args_bytes = 1024\n",
    );
    let s = Server::start_in(dir, &text);
    let mut raw = Raw::connect(&s);
    let v = raw.send(b"this is not json");
    assert_eq!(v["error"]["data"]["code"], "parse_error");
    assert_eq!(v["error"]["code"], -32700);
    let v = raw.send(b"[1,2]");
    assert_eq!(v["error"]["data"]["code"], "invalid_request");
    let v = raw.send(br#"{"jsonrpc":"2.0","id":7,"method":"nope"}"#);
    assert_eq!(v["error"]["data"]["code"], "method_not_found");
    assert_eq!(v["id"], 7);
    let v = raw.send(
        br#"{"jsonrpc":"2.0","id":8,"method":"submit","params":{"agent":"bot","tool":"rm -rf"}}"#,
    );
    assert_eq!(v["error"]["data"]["code"], "invalid_params");
    let v = raw.send(br#"{"jsonrpc":"2.0","id":9,"method":"submit","params":{"agent":"bot","tool":"x","colour":"red"}}"#);
    assert_eq!(v["error"]["data"]["code"], "invalid_params");
    assert!(v["error"]["message"].as_str().unwrap().contains("colour"));
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":10,"method":"submit","params":{{"agent":"bot","tool":"x","args":{{"a":"{}"}}}}}}"#,
        "y".repeat(2000)
    );
    let v = raw.send(big.as_bytes());
    assert_eq!(v["error"]["data"]["code"], "invalid_params");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_args_bytes"));
    let huge = "z".repeat(10_000);
    let v = raw.send(huge.as_bytes());
    assert_eq!(v["error"]["data"]["code"], "line_too_long");
    // Still usable.
    let v = raw.send(br#"{"jsonrpc":"2.0","id":11,"method":"ping"}"#);
    assert_eq!(v["result"]["pong"], true);
    assert_eq!(v["id"], 11);
    // Nothing was queued by any of that.
    let pending = s.client().await.call("pending", json!({})).await.unwrap();
    assert_eq!(pending, json!([]));
}

#[tokio::test]
async fn a_line_split_around_another_calls_reply_is_read_whole() {
    let s = Server::start(config::files, "");
    let mut raw = Raw::connect(&s);
    // One whole call and the first half of the next in one write; the first
    // call's reply goes out while the server holds half a line.
    let second = br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#;
    let (head, tail) = second.split_at(17);
    let mut first = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#.to_vec();
    first.push(b'\n');
    first.extend_from_slice(head);
    raw.writer.write_all(&first).unwrap();
    let v = raw.read();
    assert_eq!(
        (v["id"].clone(), v["result"]["pong"].clone()),
        (json!(1), json!(true))
    );
    let v = raw.send(tail);
    assert_eq!(v["id"], 2, "the split line was read whole: {v}");
    assert_eq!(v["result"]["pong"], true);
}

#[tokio::test]
async fn a_peer_whose_uid_is_not_configured_is_refused() {
    // Neither an admin nor any agent may connect from this uid.
    let dir = tempfile::tempdir().unwrap();
    let text = config::files(dir.path(), "[admin]\nuids = [4000000001]\n")
        .replace("name = \"bot\"", "name = \"bot\"\nuids = [4000000002]")
        .replace("name = \"cli\"", "name = \"cli\"\nuids = [4000000002]");
    let s = Server::start_in(dir, &text);
    let mut raw = Raw::connect(&s);
    let v = raw.read();
    assert_eq!(v["error"]["data"]["code"], "peer_refused");
}

#[tokio::test]
async fn admin_methods_are_refused_to_non_admins() {
    let s = Server::start(config::files, "[admin]\nuids = [4000000001]\n");
    let mut c = s.agent_client().await;
    for (method, params) in [
        ("pending", json!({})),
        ("approve", json!({"id": uuid::Uuid::new_v4().to_string()})),
        ("grant", json!({"scope": "global", "tool": "x"})),
        ("audit.tail", json!({})),
        ("pairing.approve", json!({"code": "ACDEFGHJKM"})),
    ] {
        assert_eq!(
            err_code(c.call(method, params).await),
            "not_admin",
            "{method}"
        );
    }
    // Agent methods still work.
    let r = c
        .call("submit", submit("read_file", json!({})))
        .await
        .unwrap();
    assert_eq!(r["state"], "approved");
    // And an agent cannot see another agent's request without being admin.
    let e = c.call("status", json!({"id": r["request_id"]})).await;
    assert_eq!(err_code(e), "invalid_params");
}

#[tokio::test]
async fn policy_decisions_name_their_rule() {
    let s = Server::start(config::files, "[limits]\nagent_rate = \"2/min\"\n");
    let mut c = s.client().await;
    let r = c
        .call("submit", submit("read_file", json!({})))
        .await
        .unwrap();
    assert_eq!(
        (
            r["state"].as_str(),
            r["decided_by"].as_str(),
            r["rule"].as_str()
        ),
        (Some("approved"), Some("policy"), Some("risk_low"))
    );
    let r = c
        .call("submit", submit("read_file", json!({"user_id": "99"})))
        .await
        .unwrap();
    assert_eq!(
        (r["state"].as_str(), r["rule"].as_str()),
        (Some("denied"), Some("user_not_paired"))
    );
    let r = c
        .call("submit", submit("write_file", json!({})))
        .await
        .unwrap();
    assert_eq!(r["rule"], "risk_medium");
    let r = c
        .call("submit", submit("read_file", json!({})))
        .await
        .unwrap();
    assert_eq!(
        (r["state"].as_str(), r["rule"].as_str()),
        (Some("denied"), Some("rate_limit_agent"))
    );
    // check does not queue or consume.
    let v = c
        .call("check", submit("delete_file", json!({})))
        .await
        .unwrap();
    assert_eq!(v["verdict"]["action"], "deny");
    assert_eq!(v["verdict"]["rule"], "rate_limit_agent");
    // An unknown agent is refused.
    let e = c
        .call("submit", json!({"agent": "ghost", "tool": "read_file"}))
        .await;
    assert_eq!(err_code(e), "agent_refused");
}

#[tokio::test]
async fn pending_requests_per_agent_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        config::files(dir.path(), "").replace("name = \"bot\"", "name = \"bot\"\nmax_pending = 2");
    let s = Server::start_in(dir, &text);
    let mut c = s.client().await;
    for _ in 0..2 {
        c.call("submit", submit("delete_file", json!({})))
            .await
            .unwrap();
    }
    assert_eq!(
        err_code(c.call("submit", submit("delete_file", json!({}))).await),
        "too_many_pending"
    );
    // Auto-decided calls are not affected.
    assert_eq!(
        c.call("submit", submit("read_file", json!({})))
            .await
            .unwrap()["state"],
        "approved"
    );
}

#[tokio::test]
async fn grants_revokes_and_audit_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        config::files(dir.path(), "").replace("[[grants]]\nscope = \"global\"\ntool = \"*\"", "");
    let s = Server::start_in(dir, &text);
    let mut c = s.client().await;
    let r = c
        .call("submit", submit("read_file", json!({})))
        .await
        .unwrap();
    assert_eq!(r["rule"], "no_grant");
    c.call("grant", json!({"scope": "channel:7", "tool": "read_*"}))
        .await
        .unwrap();
    let r = c
        .call("submit", submit("read_file", json!({})))
        .await
        .unwrap();
    assert_eq!(r["state"], "approved");
    let eff = c
        .call(
            "tools.effective",
            json!({"user_id": "42", "channel_id": "7", "tool": "read_file"}),
        )
        .await
        .unwrap();
    assert_eq!(eff["deciding_scope"], "channel");
    assert_eq!(
        err_code(
            c.call("grant", json!({"scope": "planet:1", "tool": "x"}))
                .await
        ),
        "invalid_params"
    );
    c.call("revoke", json!({"scope": "channel:7", "tool": "read_*"}))
        .await
        .unwrap();
    let r = c
        .call("submit", submit("read_file", json!({})))
        .await
        .unwrap();
    assert_eq!(r["rule"], "no_grant");

    let tail = c.call("audit.tail", json!({"n": 100})).await.unwrap();
    let kinds: Vec<&str> = tail
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "policy_denied",
        "grant_added",
        "policy_allowed",
        "grant_removed",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    // A call the policy decided at once is one entry: who asked, for what,
    // and the rule that decided.
    let allowed = tail
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "policy_allowed")
        .unwrap();
    assert_eq!(allowed["actor"], "agent:bot");
    assert_eq!(allowed["detail"]["tool"], "read_file");
    assert_eq!(allowed["detail"]["rule"], "risk_low");
    let v = c.call("audit.verify", json!({})).await.unwrap();
    assert_eq!(v["ok"], true);
}

#[tokio::test]
async fn racing_deciders_exactly_one_wins() {
    let s = Server::start(config::files, "");
    for _ in 0..10 {
        let r = submit_no_wait(&s, "delete_file", json!({})).await;
        let id = id_of(&r);
        let mut a = s.client().await;
        let mut b = s.client().await;
        let (x, y) = tokio::join!(
            a.call("approve", json!({"id": id, "operator": "a"})),
            b.call("deny", json!({"id": id, "operator": "b"}))
        );
        let oks = [x.is_ok(), y.is_ok()].iter().filter(|o| **o).count();
        // The same uid votes for both, so the loser is already_decided or already_voted.
        assert_eq!(oks, 1, "{x:?} {y:?}");
        let loser = if x.is_ok() { y } else { x };
        let code = err_code(loser);
        assert!(
            code == "already_decided" || code == "already_voted",
            "{code}"
        );
    }
}

#[test]
fn a_second_instance_on_the_same_socket_fails_clearly() {
    let s = Server::start(config::files, "");
    let out = harness::serve_command(&s.config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on.
    let sock = dir.path().join("k.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let text = config::files(dir.path(), "");
    let s = Server::start_in(dir, &text);
    assert!(StdStream::connect(s.socket()).is_ok());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        config::files(dir.path(), "").replace("[server]\n", "[server]\nmax_connections = 2\n");
    let s = Server::start_in(dir, &text);
    let mut a = s.agent_client().await;
    let mut b = s.agent_client().await;
    // Both are served (a round trip proves they hold their slots).
    a.call("ping", json!({})).await.unwrap();
    b.call("ping", json!({})).await.unwrap();
    let mut raw = Raw::connect(&s);
    let v = raw.read();
    assert_eq!(v["error"]["data"]["code"], "too_many_connections");
    drop(a);
    // A freed slot is reusable: retry until the server has noticed the close.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = s.agent_client().await;
        match c.call("ping", json!({})).await {
            Ok(_) => break,
            Err(_) if std::time::Instant::now() < deadline => tokio::task::yield_now().await,
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

#[test]
fn group_mode_sets_the_socket_group() {
    let gid = nix::unistd::getgid().as_raw();
    let dir = tempfile::tempdir().unwrap();
    let text = config::files(dir.path(), "").replace(
        "[server]\n",
        &format!("[server]\nsocket_mode = \"0660\"\nsocket_group = \"{gid}\"\n"),
    );
    let s = Server::start_in(dir, &text);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(s.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
}

#[test]
fn sigterm_exits_within_the_drain_while_a_client_reads_no_replies() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        config::files(dir.path(), "").replace("[server]\n", "[server]\nshutdown_drain = \"1s\"\n");
    let mut s = Server::start_in(dir, &text);
    // A client that sends calls and never reads their replies, until the
    // server stops reading too (it is stuck writing to this client): the
    // socket stays unwritable for a whole second.
    let stream = StdStream::connect(s.socket()).unwrap();
    stream.set_nonblocking(true).unwrap();
    let line = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n".repeat(64);
    let mut w = &stream;
    let mut off = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the server kept reading"
        );
        match w.write(&line[off..]) {
            Ok(n) => off = (off + n) % line.len(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                use std::os::fd::AsFd;
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
                if poll(&mut fds, PollTimeout::from(1000u16)).unwrap() == 0 {
                    break;
                }
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    // An agent with a call in flight that does read: it is answered
    // during the drain or closed at its end, never left hanging.
    let t = std::time::Instant::now();
    s.sigterm();
    let st = s
        .wait_exit(Duration::from_secs(4))
        .unwrap_or_else(|| panic!("serve still running 4 s after SIGTERM; log:\n{}", s.log()));
    assert!(st.success(), "{st:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "left before the drain"
    );
    assert!(s.log().contains("shutdown drain over"), "{}", s.log());
    assert!(!s.socket().exists());
}

#[tokio::test]
async fn deadlines_keep_running_during_the_drain_and_the_call_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        config::files(dir.path(), "").replace("[server]\n", "[server]\nshutdown_drain = \"30s\"\n");
    let mut s = Server::start_in(dir, &text);
    let mut agent = Raw::connect(&s);
    let line = json!({"jsonrpc": "2.0", "id": 7, "method": "submit",
        "params": submit("delete_file", json!({"wait": true, "timeout_secs": 2}))});
    agent
        .writer
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    let mut admin = s.client().await;
    wait_pending(&mut admin, 1).await;
    drop(admin);
    s.sigterm();
    // The scheduler still runs while the call is in flight: the request
    // times out and its answer reaches the agent before the server exits.
    let v = agent.read();
    assert_eq!(v["id"], 7, "{v}");
    assert_eq!(v["result"]["state"], "timed_out", "{v}");
    let st = s
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("serve still running; log:\n{}", s.log()));
    assert!(st.success());
    // New clients are refused, not left unanswered.
    assert!(StdStream::connect(s.socket()).is_err());
}

#[tokio::test]
async fn idle_connections_of_an_agent_do_not_lock_admins_out() {
    let dir = tempfile::tempdir().unwrap();
    let text = config::files(dir.path(), "").replace(
        "[server]\n",
        "[server]\nmax_connections = 8\nmax_connections_per_uid = 4\n",
    );
    let s = Server::start_in(dir, &text);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = s.agent_client().await;
        c.call("ping", json!({})).await.unwrap();
        held.push(c);
    }
    // Over the per-uid cap: a clear refusal naming the key.
    let mut raw = Raw::connect(&s);
    let v = raw.read();
    assert_eq!(v["error"]["data"]["code"], "too_many_connections");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("server.max_connections_per_uid"), "{msg}");
    // The client reports the server's refusal even when its own write
    // finds the connection already closed (not `Broken pipe`).
    let mut late = s.agent_client().await;
    s.wait_log_text(
        |l| l.matches("refused a connection and closed it").count() >= 2,
        Duration::from_secs(10),
    );
    let e = late.call("ping", json!({})).await.unwrap_err();
    assert!(e.to_string().contains("max_connections_per_uid"), "{e}");
    // The admin socket has its own budget: admins still get in.
    let out = s.cli(&["pending"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
}

#[test]
fn the_cli_prints_the_refusal_not_broken_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let text = config::files(dir.path(), "")
        .replace("[server]\n", "[server]\nmax_connections_per_uid = 1\n");
    let s = Server::start_in(dir, &text);
    // The one admin connection this uid may have, held open.
    let hold = StdStream::connect(s.admin_socket()).unwrap();
    let out = s.cli(&["pending"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("too_many_connections"), "{err}");
    assert!(err.contains("server.max_connections_per_uid"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
    drop(hold);
}

#[test]
fn an_idle_connection_is_closed_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        config::files(dir.path(), "").replace("[server]\n", "[server]\nidle_timeout = \"300ms\"\n");
    let s = Server::start_in(dir, &text);
    let mut raw = Raw::connect(&s);
    let v = raw.send(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
    assert!(v.get("error").is_none(), "{v}");
    let t = std::time::Instant::now();
    // Read until EOF (the read timeout is the deadline).
    let v = raw.read();
    assert_eq!(v["error"]["data"]["code"], "idle_timeout", "{v}");
    assert!(t.elapsed() >= Duration::from_millis(250));
    let mut rest = String::new();
    assert_eq!(raw.reader.read_line(&mut rest).unwrap(), 0, "{rest}");
    // A connection with a call in flight is not idle.
    let mut busy = Raw::connect(&s);
    let line = json!({"jsonrpc": "2.0", "id": 2, "method": "submit",
        "params": submit("delete_file", json!({"wait": true, "timeout_secs": 1}))});
    busy.writer
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    let v = busy.read();
    assert_eq!(v["id"], 2, "{v}");
    assert!(v.get("error").is_none(), "{v}");
}

/// A `submit` line that waits for a decision, padded with a field the
/// server ignores to about `len` bytes.
fn padded_wait(id: u64, len: usize) -> Vec<u8> {
    let mut v = json!({"jsonrpc": "2.0", "id": id, "method": "submit",
        "params": submit("delete_file", json!({"wait": true}))});
    let short = v.to_string().len();
    v["pad"] = json!("x".repeat(len - short - 10));
    format!("{v}\n").into_bytes()
}

#[tokio::test]
async fn bytes_in_flight_are_bounded_per_connection_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let text = config::files(dir.path(), "").replace(
        "[server]\n",
        "[server]\nmax_line_bytes = 4096\nmax_args_bytes = 1024\n\
         max_inflight_bytes_per_connection = 8192\nmax_inflight_bytes = 16384\n",
    );
    let s = Server::start_in(dir, &text);
    let mut conns: Vec<Raw> = (0..3).map(|_| Raw::connect(&s)).collect();
    let mut admin = s.client().await;
    // Two 3000-byte calls fit on a connection; the third does not.
    for id in 1..=2 {
        conns[0].writer.write_all(&padded_wait(id, 3000)).unwrap();
    }
    let v = conns[0].send(&padded_wait(3, 3000)[..2999]);
    assert_eq!(v["id"], 3, "{v}");
    assert_eq!(v["error"]["data"]["code"], "too_many_inflight", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("max_inflight_bytes_per_connection"), "{msg}");
    // 5 × 3000 fit in the 16384 of the socket; the sixth does not.
    for id in 11..=12 {
        conns[1].writer.write_all(&padded_wait(id, 3000)).unwrap();
    }
    conns[2].writer.write_all(&padded_wait(21, 3000)).unwrap();
    let list = wait_pending(&mut admin, 5).await;
    let v = conns[2].send(&padded_wait(22, 3000)[..2999]);
    assert_eq!(v["id"], 22, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("server.max_inflight_bytes)"), "{msg}");
    // Calls that end give their bytes back: deny all five, read each
    // answer (written after its call has ended), then the socket has room.
    for r in &list {
        let id = r["id"].as_str().unwrap().to_string();
        admin.call("deny", json!({"id": id})).await.unwrap();
    }
    for (c, n) in conns.iter_mut().zip([2, 2, 1]) {
        for _ in 0..n {
            let v = c.read();
            assert_eq!(v["result"]["state"], "denied", "{v}");
        }
    }
    for id in 31..=2 + 30 {
        conns[0].writer.write_all(&padded_wait(id, 3000)).unwrap();
    }
    conns[1].writer.write_all(&padded_wait(41, 3000)).unwrap();
    conns[1].writer.write_all(&padded_wait(42, 3000)).unwrap();
    conns[2].writer.write_all(&padded_wait(51, 3000)).unwrap();
    let v = conns[2].send(br#"{"jsonrpc":"2.0","id":99,"method":"ping"}"#);
    assert_eq!(v["id"], 99, "a call was refused: {v}");
    wait_pending(&mut admin, 5).await;
}
