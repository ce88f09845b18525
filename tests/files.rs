//! The files `serve` touches, through the real binary: the database's modes,
//! a config file holding a token, what may sit at the socket path, a
//! database deleted under the running server, and `keyturn init`.

mod harness;

use harness::config;
use harness::rpc::{err_code, submit};
use harness::{run, Server};
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

fn db_files(dir: &Path) -> [PathBuf; 3] {
    ["k.db", "k.db-wal", "k.db-shm"].map(|n| dir.join(n))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// SIGTERM, then a clean exit.
fn stop(s: &mut Server) {
    let status = s.stop();
    assert!(status.success(), "serve exited with {status}");
}

/// Waits (with a deadline) until the server's log contains `needle`.
fn wait_log(s: &Server, needle: &str) -> String {
    s.wait_log_text(|log| log.contains(needle), Duration::from_secs(10))
}

#[test]
fn the_database_its_wal_and_shm_are_owner_only() {
    let mut s = Server::start(config::files, "");
    let dir = s.dir.path().to_path_buf();
    for f in db_files(&dir) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    assert!(
        s.log().contains("created a new, empty database"),
        "{}",
        s.log()
    );
    // Files left too open (an older version, a careless copy) are tightened at start.
    stop(&mut s);
    chmod(&dir.join("k.db"), 0o644);
    std::fs::write(dir.join("k.db-wal"), b"").unwrap();
    chmod(&dir.join("k.db-wal"), 0o666);
    s.kill_and_restart();
    for f in db_files(&dir) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    let log = s.log();
    assert!(
        log.contains("database file was too open; fixed") && log.contains("mode 0644 -> 0600"),
        "{log}"
    );
    // The second start opened the database it found.
    assert_eq!(
        log.matches("created a new, empty database").count(),
        1,
        "{log}"
    );
}

#[test]
fn with_a_store_group_the_files_are_0660_and_in_that_group() {
    let dir = tempfile::tempdir().unwrap();
    let gid = nix::unistd::getgid().as_raw();
    let text = config::files(dir.path(), "")
        .replace("[store]\n", &format!("[store]\ngroup = \"{gid}\"\n"));
    let s = Server::start_in(dir, &text);
    for f in db_files(s.dir.path()) {
        assert_eq!(mode(&f), 0o660, "{}", f.display());
        assert_eq!(std::fs::metadata(&f).unwrap().gid(), gid);
    }
    let text = config::files(s.dir.path(), "")
        .replace("[store]\n", "[store]\ngroup = \"no-such-group-keyturn\"\n");
    let cfg = s.dir.path().join("other.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = run(&["init"], &cfg);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("store.group"), "{}", stderr(&out));
}

#[test]
fn a_config_holding_a_token_must_not_be_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let text = config::files(dir.path(), "").replace(
        "name = \"cli\"\n",
        "name = \"cli\"\ntoken = \"s3cret-agent-token\"\n",
    );
    std::fs::write(&cfg, &text).unwrap();

    chmod(&cfg, 0o644);
    for cmd in ["serve", "check-config"] {
        let out = run(&[cmd], &cfg);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains(&cfg.display().to_string())
                && err.contains("0644")
                && err.contains("agents[1].token")
                && err.contains("chmod 600"),
            "{cmd}: {err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }
    assert!(
        !dir.path().join("k.db").exists(),
        "refused before touching the store"
    );

    // Group-readable: allowed, with a loud warning.
    chmod(&cfg, 0o640);
    let out = run(&["check-config"], &cfg);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("WARNING") && stderr(&out).contains("0640"));

    chmod(&cfg, 0o600);
    let out = run(&["check-config"], &cfg);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("WARNING"), "{}", stderr(&out));

    // A token from the environment leaves nothing secret in the file.
    std::fs::write(&cfg, config::files(dir.path(), "")).unwrap();
    chmod(&cfg, 0o644);
    let out = run(&["check-config"], &cfg);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn serve_never_unlinks_anything_but_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let with_socket = |sock: &str| {
        let text = config::files(dir.path(), "").replace(
            &format!("socket_path = \"{}\"", dir.path().join("k.sock").display()),
            &format!("socket_path = \"{sock}\""),
        );
        std::fs::write(&cfg, text).unwrap();
    };
    // The socket pointed at the database, the config file or the WAL,
    // however spelled: a config error, before anything is touched.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    for (sock, what) in [
        (dir.path().join("k.db").display().to_string(), "database"),
        ("sub/../k.db".to_string(), "database"),
        ("k.db-wal".to_string(), "database"),
        ("config.toml".to_string(), "config file"),
    ] {
        with_socket(&sock);
        let out = run(&["check-config"], &cfg);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sock}: {err}");
        assert!(
            err.contains("server.socket_path") && err.contains(what),
            "{sock}: {err}"
        );
    }

    // A regular file, a directory or a symlink at the socket path is left alone.
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, b"keep me").unwrap();
    std::os::unix::fs::symlink(&notes, dir.path().join("link.sock")).unwrap();
    std::fs::create_dir(dir.path().join("dir.sock")).unwrap();
    for (sock, what) in [
        ("notes.txt", "a regular file"),
        ("link.sock", "a symbolic link"),
        ("dir.sock", "a directory"),
    ] {
        with_socket(sock);
        let out = run(&["serve"], &cfg);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sock}: {err}");
        assert!(
            err.contains(what) && err.contains("not a socket"),
            "{sock}: {err}"
        );
    }
    assert_eq!(std::fs::read(&notes).unwrap(), b"keep me");
    assert!(dir.path().join("link.sock").is_symlink());
    assert!(dir.path().join("dir.sock").is_dir());
}

#[tokio::test]
async fn a_database_deleted_under_the_server_fails_closed_and_is_not_recreated() {
    let mut s = Server::start(config::files, "");
    let dir = s.dir.path().to_path_buf();
    let mut c = s.client().await;
    let ok = c
        .call("submit", submit("read_file", json!({})))
        .await
        .expect("submit before the deletion");
    assert_eq!(ok["state"], "approved");

    std::fs::remove_file(dir.join("k.db")).unwrap();
    // The very next write is refused (checked after its commit, before its answer)...
    let r = c.call("submit", submit("read_file", json!({}))).await;
    assert_eq!(err_code(r), "internal");
    wait_log(&s, "THE DATABASE FILE IS GONE");
    // ...and every later one: no silent recovery into the orphaned file.
    for _ in 0..3 {
        let r = c.call("submit", submit("read_file", json!({}))).await;
        assert_eq!(err_code(r), "internal");
    }
    let r = c
        .call("grant", json!({"scope": "user:42", "tool": "x"}))
        .await;
    assert_eq!(err_code(r), "internal");
    // Health says so: reads may still work, but the store is down.
    let out = run(&["health", "--json"], &s.config);
    let report: Value = serde_json::from_slice(&out.stdout).expect("health --json");
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(report["store"]["up"], json!(false), "{report}");
    assert!(report["down"].to_string().contains("store"), "{report}");
    drop(c);
    stop(&mut s);

    // Restarting does not make a fresh, empty database in its place.
    let out = run(&["serve"], &s.config);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is missing") && err.contains(".k.db.created") && err.contains("keyturn init"),
        "{err}"
    );
    assert!(!dir.join("k.db").exists());

    // `keyturn init` is the deliberate way to start over, once the orphaned
    // file's WAL (SQLite leaves it: the database it belonged to is gone) is
    // out of the way, since SQLite would replay it into the new database.
    if dir.join("k.db-wal").exists() {
        let out = run(&["init"], &s.config);
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains("left over"), "{}", stderr(&out));
        for f in ["k.db-wal", "k.db-shm"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    let out = run(&["init"], &s.config);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(mode(&dir.join("k.db")), 0o600);
    let out = run(&["init"], &s.config);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    s.kill_and_restart();
    let mut c = s.client().await;
    let ok = c
        .call("submit", submit("read_file", json!({})))
        .await
        .expect("submit after init");
    assert_eq!(ok["state"], "approved");
}

#[test]
fn a_database_replaced_under_the_server_fails_closed() {
    let s = Server::start(config::files, "");
    let dir = s.dir.path().to_path_buf();
    // Another file moved into the database's place (a restore done live).
    std::fs::write(dir.join("other.db"), b"").unwrap();
    std::fs::rename(dir.join("other.db"), dir.join("k.db")).unwrap();
    // The checkpointer notices within a round even with no writes.
    let log = wait_log(&s, "THE DATABASE FILE IS GONE");
    assert!(log.contains("was replaced by another file"), "{log}");
}

#[test]
fn leftover_wal_without_a_database_blocks_serve_and_init() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, config::files(dir.path(), "")).unwrap();
    std::fs::write(dir.path().join("k.db-wal"), b"old frames").unwrap();
    let out = run(&["serve"], &cfg);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("k.db-wal"), "{}", stderr(&out));
    let out = run(&["init"], &cfg);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("left over"), "{}", stderr(&out));
    assert!(!dir.path().join("k.db").exists());
}
