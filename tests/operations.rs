//! Operating `keyturn serve` and the CLI: a dead stderr or stdout never
//! panics or wedges the process, signals (SIGINT, SIGTERM, SIGHUP) always
//! work, SIGHUP reloads what it says it reloads, log lines carry no colour
//! codes off a terminal and are JSON when asked, and completions and the man
//! page come out of the binary. Everything runs through the real binary.

mod harness;

use harness::{closed_pipe, Launch, Server, Stderr, BIN};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(15);

fn config_text(dir: &Path, extra: &str) -> String {
    config_with(dir, true, "[[agents]]\nname = \"cli\"\n", extra)
}

fn config_with(dir: &Path, demo: bool, agents: &str, extra: &str) -> String {
    format!(
        r#"
[server]
socket_path = "{d}/k.sock"

[store]
url = "sqlite://{d}/k.db"

[admin]
socket_path = "{d}/a.sock"
single_user_demo = {demo}

{agents}

[[tools]]
name = "Read"
risk = "low"

{extra}
"#,
        d = dir.display()
    )
}

const GRANT_READ: &str = r#"
[[grants]]
scope = "global"
tool = "Read"
effect = "allow"
"#;

/// `keyturn serve` as an operator runs it (log level and colour left to the
/// config and the terminal), stderr going to `stderr`; waited for until it
/// listens.
fn serve(dir: TempDir, text: &str, stderr: Stderr) -> Server {
    Launch::new(dir, text)
        .env_remove("KEYTURN_LOG")
        .env_remove("NO_COLOR")
        .stderr(stderr)
        .start()
}

fn rpc(socket: &Path, method: &str, params: Value) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let line = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{line}").expect("write");
    let mut buf = String::new();
    BufReader::new(s).read_line(&mut buf).expect("read");
    serde_json::from_str(&buf).expect("json")
}

fn check_read(dir: &Path) -> String {
    let v = rpc(
        &dir.join("k.sock"),
        "check",
        json!({"agent": "cli", "tool": "Read", "args": {}}),
    );
    v["result"]["verdict"]["action"]
        .as_str()
        .unwrap_or_else(|| panic!("check answered {v}"))
        .to_string()
}

#[test]
fn serve_with_a_dead_stderr_keeps_serving_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text(dir.path(), GRANT_READ);
    let mut s = serve(dir, &text, Stderr::Closed);
    let dir = s.dir.path().to_path_buf();
    // Every call below logs; every log line hits EPIPE.
    for _ in 0..50 {
        let v = rpc(
            &dir.as_path().join("k.sock"),
            "submit",
            json!({"agent": "cli", "tool": "Read", "args": {"path": "/x"}}),
        );
        assert_eq!(v["result"]["state"], "approved", "{v}");
    }
    s.signal(Signal::SIGHUP);
    assert_eq!(
        check_read(dir.as_path()),
        "allow",
        "still serving after SIGHUP"
    );
    assert_eq!(s.try_wait(), None, "SIGHUP killed serve");
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(WAIT).expect("serve ignored SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        !dir.as_path().join("k.sock").exists(),
        "the socket is removed on shutdown"
    );
}

#[test]
fn sigint_after_stderr_died_mid_run_still_stops_serve() {
    // As with `keyturn serve 2>&1 | tee log` and Ctrl-C killing `tee`
    // first: stderr works at start, then its reader goes away.
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text(dir.path(), GRANT_READ);
    let mut s = serve(dir, &text, Stderr::Pipe);
    let dir = s.dir.path().to_path_buf();
    let mut err = BufReader::new(s.take_stderr());
    // The ready line on stdout came after this log line was queued.
    let mut line = String::new();
    while !line.contains("keyturn is ready") {
        line.clear();
        assert!(
            err.read_line(&mut line).expect("read stderr") > 0,
            "stderr closed"
        );
    }
    drop(err); // `tee` is gone
    s.signal(Signal::SIGHUP); // logs into the dead pipe
    for _ in 0..20 {
        assert_eq!(check_read(dir.as_path()), "allow");
    }
    s.signal(Signal::SIGINT);
    let status = s.wait_exit(WAIT).expect("serve ignored SIGINT");
    assert!(status.success(), "{status:?}");
}

#[test]
fn sighup_reloads_grants_says_so_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text(dir.path(), GRANT_READ);
    let mut s = serve(dir, &text, Stderr::Log);
    let dir = s.dir.path().to_path_buf();
    assert_eq!(check_read(dir.as_path()), "allow");

    // A file that does not load changes nothing.
    s.rewrite_config("this is not toml [");
    s.signal(Signal::SIGHUP);
    s.wait_log(
        |l| l.contains("SIGHUP: config not reloaded, nothing changed"),
        WAIT,
    );
    assert_eq!(check_read(dir.as_path()), "allow");

    // The grant leaves the file: after SIGHUP it no longer applies.
    s.rewrite_config(&config_text(dir.as_path(), ""));
    s.signal(Signal::SIGHUP);
    let line = s.wait_log(|l| l.contains("SIGHUP: reloaded"), WAIT);
    assert!(
        line.contains("config grants, tool risks, agent tokens and uids")
            && line.contains("log level keyturn=info"),
        "{line}"
    );
    assert_ne!(
        check_read(dir.as_path()),
        "allow",
        "the removed grant still applies"
    );
    assert_eq!(s.try_wait(), None, "SIGHUP killed serve");

    // The log level is reloaded too.
    s.rewrite_config(&config_text(
        dir.as_path(),
        "[log]\nlevel = \"keyturn=debug\"\n",
    ));
    s.signal(Signal::SIGHUP);
    let line = s.wait_log(|l| l.contains("SIGHUP: reloaded"), WAIT);
    assert!(line.contains("log level keyturn=debug"), "{line}");

    s.signal(Signal::SIGTERM);
    assert!(s.wait_exit(WAIT).expect("exit on SIGTERM").success());
    // stderr is a pipe, not a terminal: no colour codes anywhere.
    let all = s.log();
    assert!(all.contains("keyturn is ready"), "{all}");
    assert!(
        !all.contains("\u{1b}["),
        "ANSI codes in a piped log:\n{all}"
    );
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text(
        dir.path(),
        &format!("{GRANT_READ}\n[log]\nformat = \"json\"\n"),
    );
    let mut s = serve(dir, &text, Stderr::Pipe);
    let mut err_pipe = s.take_stderr();
    assert_eq!(check_read(s.dir.path()), "allow");
    s.signal(Signal::SIGTERM);
    assert!(s.wait_exit(WAIT).expect("exit on SIGTERM").success());
    let mut text = String::new();
    err_pipe.read_to_string(&mut text).expect("read stderr");
    let mut n = 0;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(v.is_object() && v["level"].is_string(), "{line}");
        n += 1;
    }
    assert!(
        text.contains("keyturn is ready") && n >= 2,
        "expected the start and stop lines:\n{text}"
    );
}

#[test]
fn audit_export_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text(dir.path(), GRANT_READ);
    let mut s = serve(dir, &text, Stderr::Null);
    let (dir, config) = (s.dir.path().to_path_buf(), s.config.clone());
    for _ in 0..5 {
        let v = rpc(
            &dir.as_path().join("k.sock"),
            "submit",
            json!({"agent": "cli", "tool": "Read", "args": {}}),
        );
        assert_eq!(v["result"]["state"], "approved", "{v}");
    }
    // First: there is something to export.
    let full = Command::new(BIN)
        .args(["audit", "export", "--config"])
        .arg(&config)
        .output()
        .expect("run export");
    assert!(full.status.success());
    assert!(String::from_utf8_lossy(&full.stdout).lines().count() >= 5);
    // Then into a pipe nobody reads (`| head -0`).
    let out = Command::new(BIN)
        .args(["audit", "export", "--config"])
        .arg(&config)
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .expect("run export");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert_eq!(stderr, "", "a closed stdout is not an error to report");
    s.signal(Signal::SIGTERM);
    assert!(s.wait_exit(WAIT).is_some());
}

fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn completions_and_man_page_come_from_the_binary() {
    let bash = run_ok(&["completions", "bash"]);
    assert!(
        bash.contains("complete") && bash.contains("approve"),
        "{bash}"
    );
    let zsh = run_ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef keyturn"), "{zsh}");
    let man = run_ok(&["man"]);
    assert!(man.contains(".TH keyturn"), "{man}");
    assert!(man.contains("serve"), "{man}");
    // Into a closed pipe: no panic.
    let out = Command::new(BIN)
        .args(["man"])
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .expect("run man");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn sighup_never_moves_an_agent_onto_the_server_uid() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Not a demo: the agent runs under another uid, with a token.
    let other = r#"
[[agents]]
name = "cli"
uids = [65534]
token = "a-long-enough-agent-token-0123456789"
"#;
    let text = config_with(dir.path(), false, other, GRANT_READ);
    let mut s = serve(dir, &text, Stderr::Log);
    let dir = s.dir.path().to_path_buf();
    // The same agent, now on the server's own uid: refused, nothing changes.
    s.rewrite_config(&config_with(
        dir.as_path(),
        false,
        "[[agents]]\nname = \"cli\"\n",
        GRANT_READ,
    ));
    s.signal(Signal::SIGHUP);
    let line = s.wait_log(|l| l.contains("SIGHUP: config not reloaded"), WAIT);
    assert!(line.contains("the uid Keyturn runs as"), "{line}");
    s.signal(Signal::SIGTERM);
    assert!(s.wait_exit(WAIT).expect("exit on SIGTERM").success());
}

#[test]
fn sighup_does_not_admit_an_agent_added_since_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text(dir.path(), GRANT_READ);
    let mut s = serve(dir, &text, Stderr::Log);
    let dir = s.dir.path().to_path_buf();
    let agents = "[[agents]]\nname = \"cli\"\n\n[[agents]]\nname = \"newbie\"\n";
    s.rewrite_config(&config_with(dir.as_path(), true, agents, GRANT_READ));
    s.signal(Signal::SIGHUP);
    let line = s.wait_log(|l| l.contains("SIGHUP: reloaded"), WAIT);
    assert!(
        line.contains("agents added since start need a restart"),
        "{line}"
    );
    let v = rpc(
        &dir.as_path().join("k.sock"),
        "check",
        json!({"agent": "newbie", "tool": "Read", "args": {}}),
    );
    assert_eq!(v["error"]["data"]["code"], "agent_refused", "{v}");
    assert_eq!(check_read(dir.as_path()), "allow");
    s.signal(Signal::SIGTERM);
    assert!(s.wait_exit(WAIT).expect("exit on SIGTERM").success());
}

#[test]
fn serve_with_an_undrained_stderr_neither_blocks_nor_ignores_sigterm() {
    // stderr is a pipe whose reader is alive but never reads: once its
    // buffer (64 KiB on Linux) is full, a blocking write would wedge serve.
    let dir = tempfile::tempdir().expect("tempdir");
    let agents = "[[agents]]\nname = \"cli\"\nmax_pending = 10000\n";
    let deploy = "[[tools]]\nname = \"Deploy\"\nrisk = \"high\"\n\n[[grants]]\nscope = \"global\"\ntool = \"Deploy\"\neffect = \"allow\"\n";
    let text = config_with(dir.path(), true, agents, deploy);
    let mut s = serve(dir, &text, Stderr::Pipe);
    let dir = s.dir.path().to_path_buf();
    let mut stderr = s.take_stderr();
    const N: usize = 1500;
    let started = Instant::now();
    for i in 0..N {
        // Each queued call logs an INFO line of about 150 bytes.
        let v = rpc(
            &dir.as_path().join("k.sock"),
            "submit",
            json!({"agent": "cli", "tool": "Deploy", "args": {"n": i}}),
        );
        assert_eq!(v["result"]["state"], "pending", "call {i}: {v}");
    }
    let took = started.elapsed();
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(WAIT).expect("serve ignored SIGTERM");
    assert!(status.success(), "{status:?}");
    let mut text = String::new();
    stderr.read_to_string(&mut text).expect("read stderr");
    let queued = text.matches("queued for approval").count();
    eprintln!(
        "{N} queued calls in {took:?}; {} bytes of log reached the pipe, {queued} queue lines",
        text.len()
    );
    assert!(
        text.len() >= 60 * 1024,
        "the pipe never filled, so this test proved nothing ({} bytes)",
        text.len()
    );
}
