//! `serve` started on a database file it cannot write (made immutable with
//! `chattr +i`, which binds root too) refuses every write, and once the
//! file is writable again it recovers without a restart, as a running
//! server whose files turned read-only does.

mod harness;

use harness::{config, Server};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn chattr(flag: &str, f: &Path) -> bool {
    Command::new("chattr")
        .arg(flag)
        .arg(f)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Clears the immutable flag whatever happens, so the temp dir can go.
struct Immutable(PathBuf);
impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn submit(socket: &Path, tool: &str) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let line = json!({"jsonrpc": "2.0", "id": 1, "method": "submit",
        "params": {"agent": "cli", "tool": tool, "args": {}}});
    writeln!(s, "{line}").expect("write");
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).expect("read");
    serde_json::from_str(&out).expect("json")
}

#[test]
fn serve_started_on_read_only_files_recovers_once_they_are_writable() {
    let mut s = Server::start(config::claude_code, "");
    s.sigterm();
    assert!(
        s.wait_exit(Duration::from_secs(20)).is_some(),
        "serve did not stop"
    );
    let db = s.dir.path().join("k.db");
    assert!(chattr("+i", &db), "chattr +i is needed for this test");
    let guard = Immutable(db.clone());

    s.restart();
    // Read-only: the call is not acknowledged (fails closed).
    let r = submit(s.socket(), "Read");
    assert!(
        r.get("error").is_some() || r["result"]["approved"] != json!(true),
        "{r}"
    );

    // Writable again: the next call is stored and answered, no restart.
    drop(guard);
    let r = submit(s.socket(), "Read");
    s.kill();
    assert_eq!(r["result"]["state"], "approved", "{r}");
}
