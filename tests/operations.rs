//! Operating `keyturn serve` and the CLI: a dead stderr or stdout never
//! panics or wedges the process, signals (SIGINT, SIGTERM, SIGHUP) always
//! work, SIGHUP reloads what it says it reloads, log lines carry no colour
//! codes off a terminal and are JSON when asked, and completions and the man
//! page come out of the binary. Everything runs through the real binary.

mod common;

use common::BIN;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

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

fn write_config(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write config");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

const GRANT_READ: &str = r#"
[[grants]]
scope = "global"
tool = "Read"
effect = "allow"
"#;

/// Lines of a pipe, as they come.
fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

fn wait_line(rx: &Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + WAIT;
    loop {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(l) if pred(&l) => return l,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => panic!("no {what} within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the process exited before {what}"),
        }
    }
}

/// `keyturn serve` with `stderr`, waited for until it listens. Returns the
/// child and its stdout lines.
fn serve(config: &Path, stderr: Stdio) -> (Child, Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("KEYTURN_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn keyturn serve");
    let out = lines(child.stdout.take().expect("stdout"));
    wait_line(&out, "the ready line", |l| {
        l.starts_with("keyturn: listening on")
    });
    (child, out)
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).expect("kill");
}

/// Waits for the child to exit, at most [`WAIT`].
fn wait_exit(child: &mut Child) -> Option<ExitStatus> {
    let until = Instant::now() + WAIT;
    while Instant::now() < until {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
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

/// A pipe whose read end is already closed: every write to it fails with
/// EPIPE, from the first byte on (no race with a reader).
fn dead_pipe() -> Stdio {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    drop(r);
    Stdio::from(w)
}

#[test]
fn serve_with_a_dead_stderr_keeps_serving_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    write_config(&config, &config_text(dir.path(), GRANT_READ));
    let (mut child, _out) = serve(&config, dead_pipe());
    // Every call below logs; every log line hits EPIPE.
    for _ in 0..50 {
        let v = rpc(
            &dir.path().join("k.sock"),
            "submit",
            json!({"agent": "cli", "tool": "Read", "args": {"path": "/x"}}),
        );
        assert_eq!(v["result"]["state"], "approved", "{v}");
    }
    signal(&child, Signal::SIGHUP);
    assert_eq!(
        check_read(dir.path()),
        "allow",
        "still serving after SIGHUP"
    );
    assert_eq!(
        child.try_wait().expect("try_wait"),
        None,
        "SIGHUP killed serve"
    );
    signal(&child, Signal::SIGTERM);
    let status = wait_exit(&mut child).expect("serve ignored SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        !dir.path().join("k.sock").exists(),
        "the socket is removed on shutdown"
    );
}

#[test]
fn sigint_after_stderr_died_mid_run_still_stops_serve() {
    // As with `keyturn serve 2>&1 | tee log` and Ctrl-C killing `tee`
    // first: stderr works at start, then its reader goes away.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    write_config(&config, &config_text(dir.path(), GRANT_READ));
    let (mut child, _out) = serve(&config, Stdio::piped());
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
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
    signal(&child, Signal::SIGHUP); // logs into the dead pipe
    for _ in 0..20 {
        assert_eq!(check_read(dir.path()), "allow");
    }
    signal(&child, Signal::SIGINT);
    let status = wait_exit(&mut child).expect("serve ignored SIGINT");
    assert!(status.success(), "{status:?}");
}

#[test]
fn sighup_reloads_grants_says_so_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    write_config(&config, &config_text(dir.path(), GRANT_READ));
    let (mut child, _out) = serve(&config, Stdio::piped());
    let err_pipe = child.stderr.take().expect("stderr");
    let (tx, err) = std::sync::mpsc::channel();
    let raw = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let raw = raw.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                raw.lock().expect("lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
    }
    assert_eq!(check_read(dir.path()), "allow");

    // A file that does not load changes nothing.
    write_config(&config, "this is not toml [");
    signal(&child, Signal::SIGHUP);
    wait_line(&err, "the refused reload line", |l| {
        l.contains("SIGHUP: config not reloaded, nothing changed")
    });
    assert_eq!(check_read(dir.path()), "allow");

    // The grant leaves the file: after SIGHUP it no longer applies.
    write_config(&config, &config_text(dir.path(), ""));
    signal(&child, Signal::SIGHUP);
    let line = wait_line(&err, "the reload line", |l| l.contains("SIGHUP: reloaded"));
    assert!(
        line.contains("config grants, tool risks, agent tokens and uids")
            && line.contains("log level keyturn=info"),
        "{line}"
    );
    assert_ne!(
        check_read(dir.path()),
        "allow",
        "the removed grant still applies"
    );
    assert_eq!(
        child.try_wait().expect("try_wait"),
        None,
        "SIGHUP killed serve"
    );

    // The log level is reloaded too.
    write_config(
        &config,
        &config_text(dir.path(), "[log]\nlevel = \"keyturn=debug\"\n"),
    );
    signal(&child, Signal::SIGHUP);
    let line = wait_line(&err, "the second reload line", |l| {
        l.contains("SIGHUP: reloaded")
    });
    assert!(line.contains("log level keyturn=debug"), "{line}");

    signal(&child, Signal::SIGTERM);
    assert!(wait_exit(&mut child).expect("exit on SIGTERM").success());
    // stderr is a pipe, not a terminal: no colour codes anywhere.
    let all = raw.lock().expect("lock").join("\n");
    assert!(all.contains("keyturn is ready"), "{all}");
    assert!(
        !all.contains("\u{1b}["),
        "ANSI codes in a piped log:\n{all}"
    );
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    write_config(
        &config,
        &config_text(
            dir.path(),
            &format!("{GRANT_READ}\n[log]\nformat = \"json\"\n"),
        ),
    );
    let (mut child, _out) = serve(&config, Stdio::piped());
    let mut err_pipe = child.stderr.take().expect("stderr");
    assert_eq!(check_read(dir.path()), "allow");
    signal(&child, Signal::SIGTERM);
    assert!(wait_exit(&mut child).expect("exit on SIGTERM").success());
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
    let config = dir.path().join("config.toml");
    write_config(&config, &config_text(dir.path(), GRANT_READ));
    let (mut child, _out) = serve(&config, Stdio::null());
    for _ in 0..5 {
        let v = rpc(
            &dir.path().join("k.sock"),
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
        .stdout(dead_pipe())
        .stderr(Stdio::piped())
        .output()
        .expect("run export");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert_eq!(stderr, "", "a closed stdout is not an error to report");
    signal(&child, Signal::SIGTERM);
    assert!(wait_exit(&mut child).is_some());
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
        .stdout(dead_pipe())
        .stderr(Stdio::piped())
        .output()
        .expect("run man");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn sighup_never_moves_an_agent_onto_the_server_uid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    // Not a demo: the agent runs under another uid, with a token.
    let other = r#"
[[agents]]
name = "cli"
uids = [65534]
token = "a-long-enough-agent-token-0123456789"
"#;
    write_config(&config, &config_with(dir.path(), false, other, GRANT_READ));
    let (mut child, _out) = serve(&config, Stdio::piped());
    let err = lines(child.stderr.take().expect("stderr"));
    // The same agent, now on the server's own uid: refused, nothing changes.
    write_config(
        &config,
        &config_with(
            dir.path(),
            false,
            "[[agents]]\nname = \"cli\"\n",
            GRANT_READ,
        ),
    );
    signal(&child, Signal::SIGHUP);
    let line = wait_line(&err, "the refused reload line", |l| {
        l.contains("SIGHUP: config not reloaded")
    });
    assert!(line.contains("the uid Keyturn runs as"), "{line}");
    signal(&child, Signal::SIGTERM);
    assert!(wait_exit(&mut child).expect("exit on SIGTERM").success());
}

#[test]
fn sighup_does_not_admit_an_agent_added_since_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    write_config(&config, &config_text(dir.path(), GRANT_READ));
    let (mut child, _out) = serve(&config, Stdio::piped());
    let err = lines(child.stderr.take().expect("stderr"));
    let agents = "[[agents]]\nname = \"cli\"\n\n[[agents]]\nname = \"newbie\"\n";
    write_config(&config, &config_with(dir.path(), true, agents, GRANT_READ));
    signal(&child, Signal::SIGHUP);
    let line = wait_line(&err, "the reload line", |l| l.contains("SIGHUP: reloaded"));
    assert!(
        line.contains("agents added since start need a restart"),
        "{line}"
    );
    let v = rpc(
        &dir.path().join("k.sock"),
        "check",
        json!({"agent": "newbie", "tool": "Read", "args": {}}),
    );
    assert_eq!(v["error"]["data"]["code"], "agent_refused", "{v}");
    assert_eq!(check_read(dir.path()), "allow");
    signal(&child, Signal::SIGTERM);
    assert!(wait_exit(&mut child).expect("exit on SIGTERM").success());
}

#[test]
fn serve_with_an_undrained_stderr_neither_blocks_nor_ignores_sigterm() {
    // stderr is a pipe whose reader is alive but never reads: once its
    // buffer (64 KiB on Linux) is full, a blocking write would wedge serve.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    let agents = "[[agents]]\nname = \"cli\"\nmax_pending = 10000\n";
    let deploy = "[[tools]]\nname = \"Deploy\"\nrisk = \"high\"\n\n[[grants]]\nscope = \"global\"\ntool = \"Deploy\"\neffect = \"allow\"\n";
    write_config(&config, &config_with(dir.path(), true, agents, deploy));
    let (mut child, _out) = serve(&config, Stdio::piped());
    let mut stderr = child.stderr.take().expect("stderr");
    const N: usize = 1500;
    let started = Instant::now();
    for i in 0..N {
        // Each queued call logs an INFO line of about 150 bytes.
        let v = rpc(
            &dir.path().join("k.sock"),
            "submit",
            json!({"agent": "cli", "tool": "Deploy", "args": {"n": i}}),
        );
        assert_eq!(v["result"]["state"], "pending", "call {i}: {v}");
    }
    let took = started.elapsed();
    signal(&child, Signal::SIGTERM);
    let status = wait_exit(&mut child).expect("serve ignored SIGTERM");
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
