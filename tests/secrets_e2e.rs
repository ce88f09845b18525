//! End to end with the real binary: secrets planted in the arguments and
//! justification of requests on every path (allowed, pending, approved by a
//! human, denied by a human, denied by policy, cancelled, `check`, `verify`)
//! must not appear in the database files, the server's logs (at debug level)
//! or any CLI output. And: a copy of the database with one audit row edited,
//! deleted or reordered fails `keyturn audit verify`, naming the row.

mod harness;

use harness::{Launch, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// Deterministic pseudo-random characters from `alphabet`, so each planted
/// secret is unique to this test and cannot appear by accident.
fn rnd(label: &str, n: usize, alphabet: &str) -> String {
    let a: Vec<char> = alphabet.chars().collect();
    let mut out = String::new();
    let mut block = 0u32;
    while out.len() < n {
        let h = Sha256::digest(format!("{label}/{block}").as_bytes());
        for b in h {
            if out.len() < n {
                out.push(a[b as usize % a.len()]);
            }
        }
        block += 1;
    }
    out
}

const B62: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const UPPER_NUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const DIGITS: &str = "0123456789";
const B64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// (kind, secret) pairs, each a different format.
fn secrets() -> Vec<(&'static str, String)> {
    let pem_lines: Vec<String> = (0..3).map(|i| rnd(&format!("pem{i}"), 64, B64)).collect();
    vec![
        (
            "aws_access_key",
            format!("AKIA{}", rnd("aws", 16, UPPER_NUM)),
        ),
        ("aws_secret_key", rnd("awssecret", 40, B62)),
        ("github_token", format!("ghp_{}", rnd("gh", 36, B62))),
        ("gitlab_token", format!("glpat-{}", rnd("gl", 20, B62))),
        (
            "slack_token",
            format!(
                "xoxb-{}-{}-{}",
                rnd("sl1", 11, DIGITS),
                rnd("sl2", 13, DIGITS),
                rnd("sl3", 24, B62)
            ),
        ),
        ("stripe_key", format!("sk_live_{}", rnd("stripe", 34, B62))),
        ("openai_key", format!("sk-proj-{}", rnd("openai", 64, B62))),
        (
            "anthropic_key",
            format!("sk-ant-api03-{}AA", rnd("anthropic", 93, B62)),
        ),
        (
            "jwt",
            format!(
                "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.{}.{}",
                rnd("jwtp", 60, B62),
                rnd("jwts", 43, B62)
            ),
        ),
        (
            "private_key",
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----",
                pem_lines.join("\n")
            ),
        ),
        ("url_password", rnd("urlpw", 18, B62)),
        ("bearer_token", rnd("bearer", 40, B62)),
        ("password_field", format!("hunter-{}", rnd("pw", 10, B62))),
        ("api_key_field", rnd("apikey", 24, B62)),
        ("high_entropy", rnd("entropy", 40, B62)),
        ("google_api_key", format!("AIza{}", rnd("google", 35, B62))),
        ("npm_token", format!("npm_{}", rnd("npm", 36, B62))),
        ("reason_secret", format!("ghp_{}", rnd("reason", 36, B62))),
    ]
}

fn get<'a>(s: &'a [(&str, String)], kind: &str) -> &'a str {
    &s.iter().find(|(k, _)| *k == kind).unwrap().1
}

/// Arguments carrying every secret, in keys, free text, URLs and headers.
fn planted_args(s: &[(&str, String)]) -> Value {
    json!({
        "env": {
            "AWS_ACCESS_KEY_ID": get(s, "aws_access_key"),
            "aws_secret_access_key": get(s, "aws_secret_key"),
        },
        "cmd": format!("git push https://x:{}@github.com/o/r && echo {}", get(s, "github_token"), get(s, "gitlab_token")),
        "notify": {"text": format!("slack {} stripe {}", get(s, "slack_token"), get(s, "stripe_key"))},
        "llm": [get(s, "openai_key"), {"key": get(s, "anthropic_key")}],
        "session": get(s, "jwt"),
        "tls_key": get(s, "private_key"),
        "db": format!("postgres://app:{}@db.internal:5432/app", get(s, "url_password")),
        "headers": {"X-Trace": format!("Bearer {}", get(s, "bearer_token"))},
        "login": {"user": "svc", "password": get(s, "password_field")},
        "api_key": get(s, "api_key_field"),
        "maps": format!("https://maps.googleapis.com/maps/api/js?key={}", get(s, "google_api_key")),
        "npmrc": format!("//registry.npmjs.org/:_authToken={}", get(s, "npm_token")),
    })
}

fn planted_justification(s: &[(&str, String)]) -> String {
    format!(
        "deploy with Authorization: Bearer {} and blob {} then call {}",
        get(s, "bearer_token"),
        get(s, "high_entropy"),
        get(s, "openai_key")
    )
}

/// Substrings that must not appear: each secret whole, and for long ones a
/// middle piece (masks keep at most the first and last four characters).
fn needles(s: &[(&str, String)], agent_token: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (kind, v) in s
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain([("agent_token", agent_token)])
    {
        out.push((kind.to_string(), v.to_string()));
        for line in v
            .lines()
            .filter(|l| l.len() >= 32 && !l.starts_with("-----"))
        {
            out.push((format!("{kind} line"), line.to_string()));
        }
        let chars: Vec<char> = v.chars().collect();
        if chars.len() >= 24 {
            let mid: String = chars[5..chars.len() - 5].iter().take(14).collect();
            out.push((format!("{kind} middle"), mid));
        }
    }
    out
}

fn config_text(db: &str) -> String {
    format!(
        r#"
[server]
socket_path = "k.sock"
[store]
url = "sqlite://{db}"
[admin]
# The agent and the admin are this test's one uid.
single_user_demo = true
[[agents]]
name = "cli"
[[tools]]
name = "read_file"
risk = "low"
# The planted secrets raise flags (a password in a URL is an external
# host); this test is about masking, so flags stay advisory here.
ask_on_flags = []
[[tools]]
name = "deploy"
risk = "high"
[[grants]]
scope = "global"
tool = "read_file"
[[grants]]
scope = "global"
tool = "deploy"
"#
    )
}

/// `serve` in `dir` with debug logs of every crate and the agent's token
/// from the environment.
fn start(dir: TempDir, agent_token: &str) -> Server {
    Launch::new(dir, config_text("k.db"))
        .env("KEYTURN_LOG", "debug")
        .env("KEYTURN_AGENT_CLI_TOKEN", agent_token)
        .start()
}

/// One CLI run: (exit code, stdout + stderr).
fn cli(cfg: &Path, agent_token: &str, args: &[&str]) -> (i32, String) {
    let out = harness::cli(cfg, args)
        .env("KEYTURN_LOG", "debug")
        .env("KEYTURN_AGENT_TOKEN", agent_token)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn request_id(out: &str) -> String {
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["request_id"].as_str().unwrap().to_string()
}

fn read_all(paths: &[PathBuf]) -> Vec<u8> {
    let mut all = Vec::new();
    for p in paths {
        if let Ok(b) = std::fs::read(p) {
            all.extend_from_slice(&b);
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn planted_secrets_never_reach_disk_logs_or_cli_output() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("agent-tok-{}", rnd("agenttoken", 32, B62));
    let s = secrets();
    assert!(s.len() >= 12);
    let args = planted_args(&s).to_string();
    let why = planted_justification(&s);
    let mut server = start(dir, &token);
    let cfg = server.config.clone();
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut run = |label: &str, a: &[&str]| -> (i32, String) {
        let (code, out) = cli(&cfg, &token, a);
        outputs.push((label.to_string(), out.clone()));
        (code, out)
    };

    // Allowed at once by policy.
    let (code, out) = run(
        "request allowed",
        &[
            "request",
            "--tool",
            "read_file",
            "--args",
            &args,
            "--justification",
            &why,
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let allowed = request_id(&out);
    // Text output of the same path.
    let (code, _) = run(
        "request allowed text",
        &[
            "request",
            "--tool",
            "read_file",
            "--args",
            &args,
            "--justification",
            &why,
        ],
    );
    assert_eq!(code, 0);
    // Pending, then shown by `pending` and `status`.
    let mut pending = Vec::new();
    for i in 0..3 {
        let (code, out) = run(
            "request pending",
            &[
                "request",
                "--no-wait",
                "--tool",
                "deploy",
                "--args",
                &args,
                "--justification",
                &why,
                "--json",
                "--task",
                &format!("t{i}"),
            ],
        );
        assert_eq!(code, 0, "{out}");
        pending.push(request_id(&out));
    }
    let (_, list) = run("pending --json", &["pending", "--json"]);
    for id in &pending {
        assert!(list.contains(id.as_str()), "pending lists {id}: {list}");
    }
    assert!(list.contains("[github_token:"), "masks are shown: {list}");
    run("pending", &["pending"]);
    run("status", &["status", &pending[0]]);
    run("status --json", &["status", &pending[0], "--json"]);
    // Human approval and denial, with secrets in the reasons.
    let reason = format!("ok, token {}", get(&s, "reason_secret"));
    let (code, out) = run("approve", &["approve", &pending[0], "--reason", &reason]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run("deny", &["deny", &pending[1], "--reason", &reason]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run("cancel", &["cancel", &pending[2], "--reason", &reason]);
    assert_eq!(code, 0, "{out}");
    // Denied by policy (no grant).
    let (code, out) = run(
        "request denied",
        &[
            "request",
            "--tool",
            "drop_db",
            "--args",
            &args,
            "--justification",
            &why,
        ],
    );
    assert_eq!(code, 1, "{out}");
    // Check, and verify with the full arguments.
    run(
        "check",
        &[
            "check",
            "--tool",
            "deploy",
            "--args",
            &args,
            "--justification",
            &why,
        ],
    );
    let (code, out) = run(
        "verify",
        &["verify", &allowed, "--args", &args, "--agent", "cli"],
    );
    assert_eq!(code, 0, "verify matches the approved args: {out}");
    let (code, out) = run(
        "verify json",
        &["verify", &pending[1], "--args", &args, "--json"],
    );
    assert_eq!(code, 1, "a denied request does not verify: {out}");
    // The audit log as the CLI shows it.
    let (_, export) = run("audit export", &["audit", "export"]);
    assert!(export.contains("\"submitted\""), "{export}");
    run("audit tail", &["audit", "tail", "-n", "100"]);
    let (code, out) = run("audit verify", &["audit", "verify"]);
    assert_eq!(code, 0, "{out}");

    // The database while the server runs (main file, WAL, shared memory).
    let files: Vec<PathBuf> = ["k.db", "k.db-wal", "k.db-shm"]
        .iter()
        .map(|f| server.dir.path().join(f))
        .collect();
    let live_db = read_all(&files);
    assert!(
        contains(&live_db, "[github_token:"),
        "the db holds masked args"
    );
    server.stop();
    let log = server.log();
    let db_after = read_all(&files);
    assert!(
        log.contains("queued for approval") && log.contains("DEBUG"),
        "debug logs were captured: {log}"
    );

    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("db (live)".into(), live_db),
        ("db (after stop)".into(), db_after),
        ("server stdout and stderr".into(), log.into_bytes()),
    ];
    places.extend(
        outputs
            .into_iter()
            .map(|(l, o)| (format!("cli {l}"), o.into_bytes())),
    );
    let mut leaks = Vec::new();
    for (kind, needle) in needles(&s, &token) {
        for (place, bytes) in &places {
            if contains(bytes, &needle) {
                leaks.push(format!("{kind} in {place}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked: {leaks:#?}");
}

/// Runs `sql` on the database at `db` with sqlx.
fn tamper(db: &Path, sql: &[&str]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        for q in sql {
            sqlx::query(q).execute(&mut c).await.unwrap();
        }
        c.close().await.unwrap();
    });
}

#[test]
fn audit_verify_names_the_tampered_row_in_a_copied_database() {
    let mut server = start(tempfile::tempdir().unwrap(), "t");
    let (dir, cfg) = (server.dir.path().to_path_buf(), server.config.clone());
    // Each call is decided at once by the policy: one audit entry each.
    for i in 0..8 {
        let (code, out) = cli(
            &cfg,
            "t",
            &[
                "request",
                "--tool",
                "read_file",
                "--args",
                &format!("{{\"i\":{i}}}"),
            ],
        );
        assert_eq!(code, 0, "{out}");
    }
    let (code, export) = cli(&cfg, "t", &["audit", "export"]);
    assert_eq!(code, 0);
    server.stop();
    assert_eq!(export.lines().count(), 8, "{export}");

    let cases: &[(&str, &[&str], &str)] = &[
        (
            "edit",
            &["UPDATE audit SET detail = '{\"tool\":\"rm\"}' WHERE seq = 3"],
            "BROKEN at entry 3",
        ),
        (
            "delete",
            &["DELETE FROM audit WHERE seq = 4"],
            "BROKEN at entry 5",
        ),
        (
            "reorder",
            &[
                "UPDATE audit SET seq = -6 WHERE seq = 6",
                "UPDATE audit SET seq = 6 WHERE seq = 7",
                "UPDATE audit SET seq = 7 WHERE seq = -6",
            ],
            "BROKEN at entry 6",
        ),
    ];
    for (name, sql, want) in cases {
        let copy = tempfile::tempdir().unwrap();
        // The store's readers are read-only, so the WAL may outlive the
        // server: copy it with the database.
        std::fs::copy(dir.as_path().join("k.db"), copy.path().join("k.db")).unwrap();
        let wal = dir.as_path().join("k.db-wal");
        if wal.exists() {
            std::fs::copy(&wal, copy.path().join("k.db-wal")).unwrap();
        }
        tamper(&copy.path().join("k.db"), sql);
        let mut copied = start(copy, "t");
        let (code, out) = cli(&copied.config, "t", &["audit", "verify"]);
        copied.stop();
        assert_eq!(code, 1, "{name}: {out}");
        assert!(out.contains(want), "{name}: want `{want}` in {out}");
    }

    // Offline: the same three on the exported JSON Lines.
    let lines: Vec<&str> = export.lines().collect();
    let mut edited = lines.clone();
    let e = edited[2].replace("\"agent:cli\"", "\"agent:evil\"");
    edited[2] = &e;
    let mut deleted = lines.clone();
    deleted.remove(3);
    let mut reordered = lines.clone();
    reordered.swap(5, 6);
    for (name, l, want) in [
        ("edit", edited, "BROKEN at entry 3"),
        ("delete", deleted, "BROKEN at entry 5"),
        ("reorder", reordered, "BROKEN at entry 7"),
        (
            "first row deleted",
            lines[1..].to_vec(),
            "BROKEN at entry 2",
        ),
    ] {
        let f = dir.as_path().join(format!("{name}.jsonl"));
        std::fs::write(&f, l.join("\n")).unwrap();
        let (code, out) = cli(
            &cfg,
            "t",
            &["audit", "verify", "--file", f.to_str().unwrap()],
        );
        assert_eq!(code, 1, "{name}: {out}");
        assert!(out.contains(want), "{name}: want `{want}` in {out}");
    }
    let f = dir.as_path().join("good.jsonl");
    std::fs::write(&f, &export).unwrap();
    let (code, out) = cli(
        &cfg,
        "t",
        &["audit", "verify", "--file", f.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");

    // Retention from the CLI: prune everything, the checkpoint keeps the
    // chain verifiable live and exported, and a later deletion is still seen.
    let verify_file = |f: &Path| {
        cli(
            &cfg,
            "t",
            &["audit", "verify", "--file", f.to_str().unwrap()],
        )
    };
    server.restart();
    let (code, out) = cli(&cfg, "t", &["audit", "prune"]);
    assert_eq!(code, 2, "retention is off, so the age must be given: {out}");
    let (code, out) = cli(&cfg, "t", &["audit", "prune", "--older-than-days", "0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pruned 8 entries"), "{out}");
    let (code, out) = cli(
        &cfg,
        "t",
        &["request", "--tool", "read_file", "--args", "{}"],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&cfg, "t", &["audit", "verify"]);
    assert_eq!(code, 0, "{out}");
    // The checkpoint and the one new call.
    assert!(out.contains("ok: 2 entries"), "{out}");
    let (_, pruned_export) = cli(&cfg, "t", &["audit", "export"]);
    server.stop();
    let lines: Vec<&str> = pruned_export.lines().collect();
    assert!(lines[0].contains("\"checkpoint\""), "{pruned_export}");
    let f = dir.as_path().join("pruned.jsonl");
    std::fs::write(&f, lines.join("\n")).unwrap();
    let (code, out) = verify_file(&f);
    assert_eq!(code, 0, "{out}");
    std::fs::write(&f, lines[1..].join("\n")).unwrap();
    let (code, out) = verify_file(&f);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN at entry 10"), "{out}");
}
