//! The CLI as a user runs it: exit codes and output against the real server.

mod harness;

use harness::config;
use harness::{Server, BIN};
use std::process::{Command, Stdio};
use std::time::Duration;

fn pending_ids(s: &Server) -> Vec<String> {
    let out = s.cli(&["pending", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Starts `keyturn request` in the background and returns it once its
/// request is pending (found through the idempotency key, not by sleeping).
fn request_in_background(s: &Server, key: &str) -> (std::process::Child, String) {
    let child = Command::new(BIN)
        .args([
            "request",
            "--tool",
            "delete_file",
            "--args",
            r#"{"path":"/srv/x"}"#,
            "--user",
            "42",
            "--channel",
            "7",
        ])
        .args([
            "--justification",
            "cleanup",
            "--agent",
            "bot",
            "--idempotency-key",
            key,
            "--config",
        ])
        .arg(&s.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Submitting the same key again returns the same request without a second one.
    let out = Command::new(BIN)
        .args([
            "request",
            "--tool",
            "delete_file",
            "--args",
            r#"{"path":"/srv/x"}"#,
            "--user",
            "42",
            "--channel",
            "7",
        ])
        .args([
            "--agent",
            "bot",
            "--idempotency-key",
            key,
            "--no-wait",
            "--json",
            "--config",
        ])
        .arg(&s.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (child, v["request_id"].as_str().unwrap().to_string())
}

fn wait_exit(mut child: std::process::Child) -> (i32, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "request did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn request_exits_0_when_approved_and_1_when_denied() {
    let s = Server::start(config::files, "");
    let (child, id) = request_in_background(&s, "k1");
    assert_eq!(pending_ids(&s), vec![id.clone()]);
    let out = s.cli(&["approve", &id, "--reason", "ok", "--as", "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, stdout) = wait_exit(child);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("approved by alice"), "{stdout}");

    let (child, id) = request_in_background(&s, "k2");
    s.cli(&["deny", &id, "--reason", "no thanks"]);
    let (code, stdout) = wait_exit(child);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("denied by") && stdout.contains("no thanks"),
        "{stdout}"
    );
}

#[test]
fn request_exits_2_when_the_server_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["request", "--tool", "x", "--socket"])
        .arg(dir.path().join("nobody.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let s = Server::start(config::files, "");
    let out = s.cli(&["request", "--tool", "x", "--args", "{not json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--args is not valid JSON"));
    let out = s.cli(&["grant", "--scope", "galaxy:1", "--tool", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scope"));
    let out = s.cli(&["approve", "not-a-uuid"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a request id"));
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "[risk.high]\napprovals = 0\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("risk.high.approvals"));
    let out = Command::new(BIN)
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // serve refuses the same bad file before touching anything.
    let out = harness::serve_command(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.path().join("keyturn.db").exists());
}

#[test]
fn an_unreachable_postgres_store_fails_the_start_naming_it_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    // Nothing listens on port 1: refused at once.
    std::fs::write(
        &p,
        format!(
            "[server]\nsocket_path = \"{d}/k.sock\"\n[admin]\nsocket_path = \"{d}/a.sock\"\n\
             [store]\nurl = \"postgres://keyturn:hunter2@127.0.0.1:1/keyturn\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a postgres URL is valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for cmd in ["serve", "init"] {
        let out = harness::output_within(
            {
                let mut c = Command::new(BIN);
                c.args([cmd, "--config"]).arg(&p);
                c
            },
            std::time::Duration::from_secs(20),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}: {err}");
        assert!(
            err.contains(
                "cannot connect to PostgreSQL at postgres://keyturn:***@127.0.0.1:1/keyturn"
            ),
            "{cmd}: {err}"
        );
        assert!(!err.contains("hunter2"), "{cmd} shows the password: {err}");
    }
    // `db check` says it could not reach the database, not that it is damaged.
    let out = harness::run(&["db", "check"], &p);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("UNREACHABLE (nothing was checked)"), "{said}");
    assert!(
        !said.contains("DAMAGED") && !said.contains("hunter2"),
        "{said}"
    );
    std::fs::write(
        &p,
        "[store]\nurl = \"mysql://k:hunter2@db.example/keyturn\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sqlite://"),
        "names the supported scheme: {err}"
    );
    assert!(
        err.contains("mysql://k:***@db.example") && !err.contains("hunter2"),
        "{err}"
    );
}

/// On PostgreSQL: `init` migrates (creating the URL's schema), `serve`
/// runs on it, `db check` reads it, and the exported audit chain verifies
/// offline with the same `audit verify --file` as a SQLite export.
#[test]
fn a_postgres_store_serves_and_its_audit_export_verifies_offline() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(schema) = rt.block_on(harness::pg::Schema::new()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("k.db").display());
    let text = config::files(dir.path(), "").replace(&sqlite, &schema.url());
    assert!(text.contains("search_path"), "{text}");
    let init = dir.path().join("init.toml");
    std::fs::write(&init, &text).unwrap();
    let out = harness::run(&["init"], &init);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("migrated the database postgres://"), "{said}");
    let s = Server::start_in(dir, &text);
    for (tool, user) in [("read_file", "42"), ("write_file", "42")] {
        let out = s.cli(&["request", "--tool", tool, "--agent", "bot", "--user", user]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (mut waiting, _) = request_in_background(&s, "pg-pending");
    let out = s.cli(&["db", "check"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("ok (migrations applied, 1 pending requests readable)"),
        "{said}"
    );
    let out = s.cli(&["audit", "export"]);
    assert!(out.status.success());
    let export = String::from_utf8(out.stdout).unwrap();
    // Two calls the policy decided, one submitted and queued.
    assert_eq!(export.lines().count(), 4, "{export}");
    let file = s.dir.path().join("audit.jsonl");
    std::fs::write(&file, &export).unwrap();
    let out = Command::new(BIN)
        .args(["audit", "verify", "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = waiting.kill();
    let _ = waiting.wait();
}

#[test]
fn audit_export_verifies_offline_and_detects_an_edit() {
    let s = Server::start(config::files, "");
    for (tool, user) in [
        ("read_file", "42"),
        ("read_file", "99"),
        ("write_file", "42"),
    ] {
        let out = s.cli(&["request", "--tool", tool, "--agent", "bot", "--user", user]);
        assert_ne!(out.status.code(), Some(2));
    }
    let out = s.cli(&["audit", "export"]);
    assert!(out.status.success());
    let export = String::from_utf8(out.stdout).unwrap();
    // Each call was decided at once by the policy: one entry each.
    assert_eq!(export.lines().count(), 3);
    let file = s.dir.path().join("audit.jsonl");
    std::fs::write(&file, &export).unwrap();
    let out = Command::new(BIN)
        .args(["audit", "verify", "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let tampered = export.replacen("\"actor\":\"agent:bot\"", "\"actor\":\"someone\"", 1);
    std::fs::write(&file, tampered).unwrap();
    let out = Command::new(BIN)
        .args(["audit", "verify", "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("BROKEN at entry 1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A field added to a line (outside the hash), or one taken away, is
    // refused, though every hash still matches.
    let lines: Vec<&str> = export.lines().collect();
    let added = lines[1].replacen("{", "{\"approved_by\":\"mallory\",", 1);
    let missing = lines[1].replacen("\"request_id\":", "\"request\":", 1);
    for (doctored, why) in [(added, "unknown field `approved_by`"), (missing, "field")] {
        let text = format!("{}\n{doctored}\n{}\n", lines[0], lines[2]);
        std::fs::write(&file, text).unwrap();
        let out = Command::new(BIN)
            .args(["audit", "verify", "--file"])
            .arg(&file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(
            stdout.contains("BROKEN at line 2") && stdout.contains(why),
            "{stdout}"
        );
    }
}
