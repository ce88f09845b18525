//! `keyturn exec` against a real server: runs only when approved, exit codes,
//! minimal environment, command timeout and output truncation.

mod harness;

use harness::{config, Server, BIN};
use std::process::{Command, Output, Stdio};

fn exec(s: &Server, extra: &[&str], cmd: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["exec", "--socket"])
        .arg(s.socket())
        .args(extra)
        .arg("--")
        .args(cmd);
    c.env_remove("KEYTURN_AGENT").stdin(Stdio::null());
    c
}

fn out(c: &mut Command) -> (i32, String, String) {
    let o: Output = c.output().expect("run");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const EXTRA: &str = r#"
[[tools]]
name = "shell.ls"
risk = "low"

[[tools]]
name = "shell.rm"
risk = "high"
"#;

#[test]
fn approved_command_runs_with_a_minimal_environment() {
    let s = Server::start(config::claude_code, EXTRA);
    let (code, stdout, stderr) = out(exec(
        &s,
        &["--tool", "shell.ls"],
        &["sh", "-c", "echo hi; env; exit 3"],
    )
    .env("LD_PRELOAD", "/tmp/evil.so")
    .env("PYTHONPATH", "/tmp/evil")
    .env("https_proxy", "http://evil:8080")
    .env("NODE_OPTIONS", "--require /tmp/evil.js")
    .env("GITHUB_TOKEN", "ghp_secret")
    .env("AWS_SECRET_ACCESS_KEY", "aws_secret")
    .env("KEYTURN_AGENT_TOKEN", "agent_secret")
    .env("SSL_CERT_FILE", "/tmp/evil-ca.pem")
    .env("LANG", "C.UTF-8")
    .env("KEEP_ME", "yes"));
    assert_eq!(code, 3, "{stderr}");
    assert!(stdout.starts_with("hi\n"), "{stdout}");
    for bad in [
        "LD_PRELOAD",
        "PYTHONPATH",
        "https_proxy",
        "NODE_OPTIONS",
        "GITHUB_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "KEYTURN_AGENT_TOKEN",
        "SSL_CERT_FILE",
        "KEEP_ME",
    ] {
        assert!(
            !stdout.contains(&format!("{bad}=")),
            "{bad} leaked: {stdout}"
        );
    }
    assert!(stdout.contains("PATH="), "{stdout}");
    assert!(stdout.contains("LANG=C.UTF-8"), "{stdout}");
    assert!(stderr.contains("approved by policy"), "{stderr}");
    assert!(stderr.contains("other variables not passed"), "{stderr}");
}

#[test]
fn named_variables_are_kept_and_shown_to_the_approver() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Server::start(config::claude_code, EXTRA);
    // `[exec] keep_env` in the config the command names, plus --keep-env.
    let cfg = dir.path().join("exec.toml");
    std::fs::write(&cfg, "[exec]\nkeep_env = [\"AWS_SECRET_ACCESS_KEY\"]\n").expect("write");
    let (code, stdout, stderr) = out(exec(
        &s,
        &[
            "--tool",
            "shell.ls",
            "--config",
            cfg.to_str().expect("utf8"),
            "--keep-env",
            "GITHUB_TOKEN",
            "--keep-env",
            "SSL_CERT_FILE",
        ],
        &["env"],
    )
    .env("GITHUB_TOKEN", "ghp_secret")
    .env("AWS_SECRET_ACCESS_KEY", "aws_secret")
    .env("SSL_CERT_FILE", "/etc/ssl/ca.pem")
    .env("KEYTURN_AGENT_TOKEN", "agent_secret"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("GITHUB_TOKEN=ghp_secret"), "{stdout}");
    assert!(
        stdout.contains("AWS_SECRET_ACCESS_KEY=aws_secret"),
        "{stdout}"
    );
    assert!(stdout.contains("SSL_CERT_FILE=/etc/ssl/ca.pem"), "{stdout}");
    assert!(!stdout.contains("KEYTURN_AGENT_TOKEN"), "{stdout}");
    // The request names what the command gets (never the values).
    let last = s
        .rpc("audit.tail", serde_json::json!({"n": 1}))
        .expect("tail");
    let args = &last[0]["detail"]["args"];
    assert_eq!(
        args["keep_env"],
        serde_json::json!(["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "SSL_CERT_FILE"]),
        "{last}"
    );
    assert!(!last.to_string().contains("ghp_secret"));

    // Keyturn's own token and loader variables are refused, before asking.
    for never in ["KEYTURN_AGENT_TOKEN", "LD_PRELOAD", "https_proxy"] {
        let (code, stdout, stderr) = out(exec(
            &s,
            &["--tool", "shell.ls", "--keep-env", never],
            &["echo", "ran"],
        )
        .env(never, "x"));
        assert_eq!(code, 126, "{never}: {stderr}");
        assert!(!stdout.contains("ran"), "{stdout}");
        assert!(
            stderr.contains(never) && stderr.contains("never"),
            "{stderr}"
        );
    }
}

#[test]
fn human_approval_runs_and_denial_exits_126_without_running() {
    let s = Server::start(config::claude_code, EXTRA);
    let dir = tempfile::tempdir().expect("tmp");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "x").expect("write");
    let v = victim.display().to_string();

    let mut denied = exec(
        &s,
        &["--tool", "shell.rm", "--justification", "cleanup"],
        &["rm", &v],
    );
    let t = std::thread::spawn(move || out(&mut denied));
    let id = s.wait_queued("shell.rm");
    let req = s
        .rpc("status", serde_json::json!({"id": id}))
        .expect("status");
    assert_eq!(req["tool"], "shell.rm");
    s.deny(&id, "keep it");
    let (code, _, stderr) = t.join().expect("join");
    assert_eq!(code, 126, "{stderr}");
    assert!(
        stderr.contains("denied by") && stderr.contains("keep it"),
        "{stderr}"
    );
    assert!(victim.exists());

    let mut approved = exec(&s, &["--tool", "shell.rm"], &["rm", &v]);
    let t = std::thread::spawn(move || out(&mut approved));
    let id = s.wait_queued("shell.rm");
    s.approve(&id, "ok");
    let (code, _, stderr) = t.join().expect("join");
    assert_eq!(code, 0, "{stderr}");
    assert!(!victim.exists());
}

#[test]
fn unattended_timeouts_and_unreachable_socket_exit_126() {
    let s = Server::start(config::claude_code, EXTRA);
    let (code, _, stderr) = out(&mut exec(
        &s,
        &["--tool", "shell.rm", "--unattended"],
        &["true"],
    ));
    assert_eq!(code, 126);
    assert!(stderr.contains("unattended"), "{stderr}");
    let (code, _, stderr) = out(&mut exec(
        &s,
        &["--tool", "shell.rm", "--approval-timeout", "1s"],
        &["true"],
    ));
    assert_eq!(code, 126);
    assert!(stderr.contains("timed out"), "{stderr}");
    let mut c = Command::new(BIN);
    c.args([
        "exec",
        "--socket",
        "/nonexistent/k.sock",
        "--tool",
        "shell.ls",
        "--",
        "true",
    ]);
    let (code, _, stderr) = out(&mut c);
    assert_eq!(code, 126);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[test]
fn command_timeout_and_output_truncation() {
    let s = Server::start(config::claude_code, EXTRA);
    let started = std::time::Instant::now();
    let (code, _, stderr) = out(&mut exec(
        &s,
        &["--tool", "shell.ls", "--timeout", "1s"],
        &["sleep", "30"],
    ));
    assert_eq!(code, 124, "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let (code, stdout, _) = out(&mut exec(
        &s,
        &["--tool", "shell.ls", "--max-output", "100"],
        &["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' 'a'"],
    ));
    assert_eq!(code, 0);
    assert!(stdout.starts_with(&"a".repeat(100)), "{stdout}");
    assert!(
        stdout.contains("[keyturn: stdout truncated at 100 bytes"),
        "{stdout}"
    );
    assert!(stdout.len() < 400, "{}", stdout.len());
    let (code, _, _) = out(&mut exec(
        &s,
        &["--tool", "shell.ls"],
        &["/nonexistent/cmd"],
    ));
    assert_eq!(code, 127);
}

#[test]
fn a_waiting_exec_prints_the_request_id_and_how_to_approve_it() {
    use std::io::{BufRead, BufReader};
    let s = Server::start(config::claude_code, EXTRA);
    let mut child = exec(&s, &["--tool", "shell.rm"], &["true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let queued = s.wait_queued("shell.rm");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let notice = loop {
        let l = rx
            .recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
            .expect("a notice on stderr while waiting");
        if l.contains("is waiting for approval") {
            break l;
        }
    };
    assert!(
        notice.contains(&format!("request {queued} "))
            && notice.contains(&format!("keyturn approve {queued}")),
        "{notice}"
    );
    s.approve(&queued, "ok");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}

#[test]
fn an_edited_argv_runs_instead_and_any_other_edit_runs_nothing() {
    let s = Server::start(config::claude_code, EXTRA);
    let dir = tempfile::tempdir().expect("tmp");
    let asked = dir.path().join("asked");
    let edited = dir.path().join("edited");
    for f in [&asked, &edited] {
        std::fs::write(f, "x").expect("write");
    }
    let a = asked.display().to_string();
    let e = edited.display().to_string();
    let pending_args =
        |s: &Server| s.rpc("pending", serde_json::json!({})).expect("pending")[0]["args"].clone();

    // The approver changes which file: the edited command line runs.
    let mut c = exec(&s, &["--tool", "shell.rm"], &["rm", &a]);
    let t = std::thread::spawn(move || out(&mut c));
    let id = s.wait_queued("shell.rm");
    let mut args = pending_args(&s);
    args["argv"] = serde_json::json!(["rm", e]);
    s.rpc("approve", serde_json::json!({"id": id, "args": args}))
        .expect("approve with edits");
    let (code, _, stderr) = t.join().expect("join");
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("as the approver edited it"), "{stderr}");
    assert!(!edited.exists(), "the edited command ran");
    assert!(asked.exists(), "the asked-for command did not");

    // An edit of anything but argv: nothing runs.
    let mut c = exec(&s, &["--tool", "shell.rm"], &["rm", &a]);
    let t = std::thread::spawn(move || out(&mut c));
    let id = s.wait_queued("shell.rm");
    let mut args = pending_args(&s);
    args["cwd"] = serde_json::json!("/");
    s.rpc("approve", serde_json::json!({"id": id, "args": args}))
        .expect("approve with edits");
    let (code, _, stderr) = t.join().expect("join");
    assert_eq!(code, 126, "{stderr}");
    assert!(asked.exists());
}
