//! A database with damaged pages: `serve` refuses to start on it with an
//! error that names the damage and the fix, and `keyturn db check` reports
//! it (exit 1) where a sound database passes (exit 0). The damage is made
//! by overwriting bytes of the `requests` table's page in a real database
//! file, after the server stopped and the WAL was merged into it.

mod harness;

use harness::{config, Server, BIN};
use serde_json::json;
use std::io::{Seek, SeekFrom, Write};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs `cmd` to its end, failing the test if that takes over 30 s.
fn output_within(cmd: Command) -> Output {
    harness::output_within(cmd, Duration::from_secs(30))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn db_check(cfg: &std::path::Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(["db", "check", "--config"]).arg(cfg);
    output_within(c)
}

#[test]
fn damaged_pages_stop_serve_at_start_and_db_check_reports_them() {
    let mut s = Server::start(config::claude_code, "");
    // A pending request, so the damaged page holds what the scheduler needs.
    let agent_socket = s.socket().to_path_buf();
    let waiter = std::thread::spawn(move || {
        let mut c = Command::new(BIN);
        c.args(["request", "--tool", "Bash", "--no-wait", "--socket"])
            .arg(&agent_socket);
        output_within(c)
    });
    s.wait_queued("Bash");
    assert!(waiter.join().expect("join").status.success());
    let pending = s.admin_rpc("pending", json!({})).expect("pending");
    assert_eq!(pending.as_array().map(Vec::len), Some(1), "{pending}");

    // Stop it, and merge the WAL into the database file.
    s.sigterm();
    assert!(
        s.wait_exit(Duration::from_secs(20)).is_some(),
        "serve did not stop"
    );
    let db = s.dir.path().join("k.db");
    let (root, page_size) = {
        let c = rusqlite::Connection::open(&db).expect("open db");
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
        let root: i64 = c
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = 'requests'",
                [],
                |r| r.get(0),
            )
            .expect("rootpage");
        let size: i64 = c
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page_size");
        (root, size)
    };

    // Sound: db check passes and reads the pending request.
    let o = db_check(&s.config);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("1 pending requests readable"),
        "{}",
        text(&o)
    );

    // Damage the requests table's root page (its b-tree page header).
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .expect("open db file");
        f.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
            .expect("seek");
        f.write_all(&[0x42; 16]).expect("write garbage");
        f.sync_all().expect("sync");
    }

    let o = db_check(&s.config);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("DAMAGED"), "{}", text(&o));

    let started = Instant::now();
    let o = output_within(harness::serve_command(&s.config));
    assert!(
        !o.status.success(),
        "serve started on a damaged database: {}",
        text(&o)
    );
    let out = text(&o);
    assert!(
        out.contains("is damaged") && out.contains("keyturn db check") && out.contains("backup"),
        "{out}"
    );
    assert!(!out.contains("listening on"), "{out}");
    eprintln!(
        "serve refused the damaged database in {:?}",
        started.elapsed()
    );
}
