//! A real `keyturn serve` on a temp socket and database, and the admin side
//! (approve, deny, on the admin socket) as a human would use it. Waiting is
//! event-driven: the server's log lines are read as they are written.
//!
//! The tests run agents and admin as one uid, so every config here sets
//! `[admin] single_user_demo = true` unless the test's TOML sets it itself.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_keyturn");

/// Agents and tools every test config has; tests add more TOML.
pub const BASE: &str = r#"
[[agents]]
name = "claude-code"

[[agents]]
name = "cli"

[[agents]]
name = "robot"
unattended = true

[[tools]]
name = "Read"
risk = "low"

[[tools]]
name = "Bash"
risk = "high"

[[grants]]
scope = "global"
tool = "*"
effect = "allow"
"#;

pub struct Server {
    child: Child,
    pub dir: tempfile::TempDir,
    /// The agent socket.
    pub socket: PathBuf,
    /// The admin socket (admin methods are served only here).
    pub admin_socket: PathBuf,
    pub config: PathBuf,
    log: Receiver<String>,
}

/// Methods served only on the admin socket: the server's own list.
pub use keyturn::ipc::handler::ADMIN_METHODS;

/// `toml` with `[admin] single_user_demo = true` added, unless it already
/// says `single_user_demo` (tests of the refusal set it to false).
pub fn with_demo(toml: &str) -> String {
    if toml.contains("single_user_demo") {
        return toml.to_string();
    }
    if toml.contains("[admin]\n") {
        toml.replacen("[admin]\n", "[admin]\nsingle_user_demo = true\n", 1)
    } else {
        format!("{toml}\n[admin]\nsingle_user_demo = true\n")
    }
}

/// Whether a call goes to the admin socket: admin methods, and agent
/// methods without an `agent` (an admin acting on any request).
pub fn is_admin_call(method: &str, params: &Value) -> bool {
    ADMIN_METHODS.contains(&method)
        || (method != "ping" && params.get("agent").is_none_or(Value::is_null))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Server {
    pub fn start(extra_toml: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("k.sock");
        let admin_socket = dir.path().join("keyturn-admin.sock");
        let config = dir.path().join("config.toml");
        let toml = with_demo(&format!(
            "[server]\nsocket_path = \"{}\"\n\n[store]\nurl = \"sqlite://{}\"\n\n{BASE}\n{extra_toml}\n",
            socket.display(),
            dir.path().join("k.db").display()
        ));
        std::fs::write(&config, toml).expect("write config");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
        }
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("KEYTURN_LOG", "keyturn=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keyturn serve");
        let (tx, log) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for r in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(strip_ansi(&line));
                }
            });
        }
        let s = Server {
            child,
            dir,
            socket,
            admin_socket,
            config,
            log,
        };
        s.wait_log(
            |l| l.starts_with("keyturn: listening on"),
            Duration::from_secs(10),
        );
        s
    }

    /// Waits for a log line matching `pred` and returns it.
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no matching server log line within {within:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!("the server exited"),
            }
        }
    }

    /// Waits until a request for `tool` is queued for a human; returns its id.
    pub fn wait_queued(&self, tool: &str) -> String {
        let needle = format!("tool={tool} ");
        let line = self.wait_log(
            |l| l.contains("queued for approval") && l.contains(&needle),
            Duration::from_secs(10),
        );
        let at = line.find("request.id=").expect("request.id in log") + "request.id=".len();
        line[at..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    }

    /// One call on a fresh connection, as the server's own uid: admin calls
    /// ([`is_admin_call`]) on the admin socket, the rest on the agent socket.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        let socket = if is_admin_call(method, &params) {
            &self.admin_socket
        } else {
            &self.socket
        };
        self.rpc_on(socket, method, params)
    }

    /// One call on a fresh connection to the agent socket.
    pub fn agent_rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        self.rpc_on(&self.socket, method, params)
    }

    /// One call on a fresh connection to the admin socket.
    pub fn admin_rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        self.rpc_on(&self.admin_socket, method, params)
    }

    /// One call on a fresh connection to `socket`.
    pub fn rpc_on(
        &self,
        socket: &std::path::Path,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        let mut s = UnixStream::connect(socket).expect("connect");
        let line = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        writeln!(s, "{line}").expect("write");
        let mut r = BufReader::new(s);
        let mut buf = String::new();
        r.read_line(&mut buf).expect("read");
        let v: Value = serde_json::from_str(&buf).expect("json");
        match v.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(v["result"].clone()),
        }
    }

    pub fn approve(&self, id: &str, reason: &str) -> Value {
        self.rpc(
            "approve",
            json!({"id": id, "reason": reason, "operator": "alice"}),
        )
        .expect("approve")
    }

    pub fn deny(&self, id: &str, reason: &str) -> Value {
        self.rpc(
            "deny",
            json!({"id": id, "reason": reason, "operator": "bob"}),
        )
        .expect("deny")
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the server exits (its log pipes close), then reaps it.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => return self.child.wait().ok(),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to completion with `stdin`, returning (status code, stdout, stderr).
pub fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> (i32, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut si = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let w = std::thread::spawn(move || {
        let _ = si.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = w.join();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
