//! `keyturn health` and the `[metrics]` HTTP listener, through the real
//! binary: exit codes, `/healthz`, and `/metrics` values after a known
//! sequence of calls. (Discord down is in `discord_outage.rs`, beside the
//! fake Discord.) Every wait is on a log line or a polled value with a
//! deadline.

mod harness;

use harness::{config, Launch, Server, BIN};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

const METRICS: &str = r#"
[[tools]]
name = "Forbidden"
risk = "low"

[[grants]]
scope = "global"
tool = "Forbidden"
effect = "deny"

[metrics]
listen = "127.0.0.1:0"
"#;

/// Waits for the listener's line on stdout; returns `host:port`.
fn metrics_addr(s: &Server) -> String {
    let line = s.wait_log(
        |l| l.starts_with("keyturn: metrics on http://"),
        Duration::from_secs(10),
    );
    line.trim_start_matches("keyturn: metrics on http://")
        .trim()
        .to_string()
}

/// A plain HTTP/1.1 GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// The value of one sample line (`name{labels} value`), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Polls `/metrics` until `series` has `want`, or fails with the last text.
fn wait_sample(addr: &str, series: &str, want: f64) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, text) = http_get(addr, "/metrics");
        assert_eq!(code, 200);
        if sample(&text, series) == Some(want) {
            return text;
        }
        assert!(
            Instant::now() < until,
            "{series} never became {want}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn submit(s: &Server, tool: &str) -> Value {
    s.agent_rpc("submit", json!({"agent": "cli", "tool": tool, "args": {}}))
        .expect("submit")
}

#[test]
fn health_and_metrics_on_a_running_server() {
    let s = Server::start(config::claude_code, METRICS);
    let addr = metrics_addr(&s);

    // `keyturn health`: exit 0, on the agent socket and on the admin socket.
    let out = Command::new(BIN)
        .args(["health", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{out:?}");
    assert!(stdout.starts_with("healthy"), "{stdout}");
    assert!(stdout.contains("store: up"), "{stdout}");
    assert!(stdout.contains("discord: not configured"), "{stdout}");
    // A store one process uses: it always leads.
    assert!(stdout.contains("role: leader"), "{stdout}");
    let out = Command::new(BIN)
        .args(["health", "--json", "--admin-socket"])
        .arg(s.admin_socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], true);
    assert_eq!(v["store"]["up"], true);
    assert!(v["store"]["millis"].is_u64(), "{v}");
    assert_eq!(v["discord"], Value::Null);
    assert_eq!(v["down"], json!([]));
    assert_eq!(v["role"], "leader");

    // `/healthz`.
    let (code, body) = http_get(&addr, "/healthz");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(v["ok"], true);
    assert_eq!(v["socket"]["up"], true);
    assert_eq!(v["store"]["up"], true);

    // A known sequence: 3 allowed by policy, 1 denied by policy, 1 asked
    // and approved by a person.
    for _ in 0..3 {
        assert_eq!(submit(&s, "Read")["state"], "approved");
    }
    assert_eq!(submit(&s, "Forbidden")["state"], "denied");
    let asked = submit(&s, "Bash");
    assert_eq!(asked["state"], "pending", "{asked}");
    let text = wait_sample(&addr, "keyturn_pending_requests", 1.0);
    for (series, want) in [
        (
            r#"keyturn_decisions_total{outcome="approved",decided_by="policy"}"#,
            3.0,
        ),
        (
            r#"keyturn_decisions_total{outcome="denied",decided_by="policy"}"#,
            1.0,
        ),
        (
            r#"keyturn_decisions_total{outcome="approved",decided_by="human"}"#,
            0.0,
        ),
        ("keyturn_time_to_decision_seconds_count", 0.0),
        (r#"keyturn_role{role="leader"}"#, 1.0),
        (r#"keyturn_role{role="follower"}"#, 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series}:\n{text}");
    }
    s.approve(asked["request_id"].as_str().unwrap(), "fine");
    let text = wait_sample(&addr, "keyturn_pending_requests", 0.0);
    for (series, want) in [
        (
            r#"keyturn_decisions_total{outcome="approved",decided_by="policy"}"#,
            3.0,
        ),
        (
            r#"keyturn_decisions_total{outcome="denied",decided_by="policy"}"#,
            1.0,
        ),
        (
            r#"keyturn_decisions_total{outcome="approved",decided_by="human"}"#,
            1.0,
        ),
        (
            r#"keyturn_decisions_total{outcome="timed_out",decided_by="timeout"}"#,
            0.0,
        ),
        ("keyturn_time_to_decision_seconds_count", 1.0),
        (r#"keyturn_time_to_decision_seconds_bucket{le="+Inf"}"#, 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series}:\n{text}");
    }
    // Every decision above was committed by the writer.
    let commits = sample(&text, "keyturn_store_commit_seconds_count").expect("commits");
    assert!(commits >= 1.0, "{text}");
    assert!(
        text.contains("# TYPE keyturn_store_commit_seconds histogram"),
        "{text}"
    );
    // Discord is not configured: no Discord series.
    assert!(!text.contains("keyturn_discord_"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    // Connections: one held open on the agent socket, then closed.
    let held = std::os::unix::net::UnixStream::connect(s.socket()).unwrap();
    wait_sample(&addr, r#"keyturn_connections{socket="agent"}"#, 1.0);
    drop(held);
    wait_sample(&addr, r#"keyturn_connections{socket="agent"}"#, 0.0);

    // Anything else is not served.
    assert_eq!(http_get(&addr, "/").0, 404);
}

#[test]
fn health_exits_2_when_no_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["health", "--socket"])
        .arg(dir.path().join("nobody.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
}

#[test]
fn a_taken_metrics_port_stops_serve_at_start_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let toml = config::with_demo(&format!(
        "[server]\nsocket_path = \"{}\"\n\n[store]\nurl = \"sqlite://{}\"\n\n{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        dir.path().join("k.sock").display(),
        dir.path().join("k.db").display(),
        config::CLAUDE_CODE_BASE,
    ));
    // Bounded: serve must exit by itself (it is killed at the start's deadline).
    let Err(f) = Launch::new(dir, toml).try_start() else {
        panic!("serve kept running with its metrics port taken");
    };
    let err = &f.log;
    assert_eq!(f.status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(err.contains("metrics.listen"), "{err}");
    assert!(
        !f.dir.path().join("k.sock").exists(),
        "the agent socket was left behind"
    );
    drop(taken);
}

#[test]
fn a_remote_metrics_address_needs_allow_remote() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &str| {
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            config::with_demo(&format!(
                "[server]\nsocket_path = \"{}\"\n{}\n[metrics]\n{extra}\n",
                dir.path().join("k.sock").display(),
                config::CLAUDE_CODE_BASE
            )),
        )
        .unwrap();
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = check("listen = \"0.0.0.0:9464\"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        err.contains("metrics.listen") && err.contains("allow_remote"),
        "{err}"
    );
    let out = check("listen = \"0.0.0.0:9464\"\nallow_remote = true");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = check("listen = \"localhost\"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
