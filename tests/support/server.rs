//! Spawns the real `keyturn serve` binary on a temporary socket and database,
//! and talks to it as a client.
//!
//! Agents and admin are this one uid, so [`base_config`] sets `[admin]
//! single_user_demo = true` (unless `extra` says `single_user_demo` itself).
//! [`Server::client`] connects to the admin socket, which serves every method
//! to an admin; [`Server::agent_client`] to the agent socket, which refuses
//! admin methods.

use keyturn::ipc::client::{Client, ClientError};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyturn");

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

/// A config that makes agent `bot` (this uid) and admin (this uid) work,
/// with a few tools at each risk level. `extra` is appended verbatim, then
/// the single-user demo switch ([`with_demo`]).
/// Writes a config file readable by its owner only, as `serve` requires of
/// a file that holds a token.
pub fn write_config(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write config");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

pub fn base_config(dir: &Path, extra: &str) -> String {
    with_demo(&format!(
        r#"
[server]
socket_path = "{sock}"

[store]
url = "sqlite://{db}"

[[agents]]
name = "bot"

[[agents]]
name = "cli"

[[users]]
id = "42"

[[tools]]
name = "read_file"
risk = "low"

[[tools]]
name = "write_file"
risk = "medium"

[[tools]]
name = "delete_file"
risk = "high"

[[tools]]
name = "drop_database"
risk = "critical"

[[grants]]
scope = "global"
tool = "*"
{extra}
"#,
        sock = dir.join("k.sock").display(),
        db = dir.join("k.db").display(),
    ))
}

pub struct Server {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub child: Child,
    pub stderr: PathBuf,
}

impl Server {
    /// Writes the config and starts the server, waiting for its ready line.
    pub fn start(extra: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = base_config(dir.path(), extra);
        Server::start_in(dir, &text)
    }

    pub fn start_in(dir: tempfile::TempDir, config_text: &str) -> Server {
        let config = dir.path().join("config.toml");
        write_config(&config, config_text);
        let stderr = dir.path().join("server.log");
        let child = spawn(&config, &stderr);
        Server {
            dir,
            config,
            child,
            stderr,
        }
    }

    /// The agent socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("k.sock")
    }

    /// The admin socket (the default `[admin] socket_path`, next to the config).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("keyturn-admin.sock")
    }

    /// A connection to the admin socket: every method, as an admin.
    pub async fn client(&self) -> Client {
        Client::connect(&self.admin_socket())
            .await
            .expect("connect")
    }

    /// A connection to the agent socket: agent methods only.
    pub async fn agent_client(&self) -> Client {
        Client::connect(&self.socket()).await.expect("connect")
    }

    /// SIGKILL, then start again on the same directory.
    pub fn kill_and_restart(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
        self.child = spawn(&self.config, &self.stderr);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("KEYTURN_SOCKET")
            .env_remove("KEYTURN_ADMIN_SOCKET")
            .output()
            .expect("run cli")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &Path, stderr: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr)
        .expect("log file");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("KEYTURN_LOG", "keyturn=debug")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn keyturn");
    // Wait for the ready line, with a deadline.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("keyturn: listening on") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        panic!(
            "keyturn did not become ready; log:\n{}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
    }
    child
}

/// Submit params for agent `bot`.
pub fn submit(tool: &str, extra: Value) -> Value {
    let mut p = json!({"agent": "bot", "tool": tool, "args": {"path": "/srv/x"}, "user_id": "42", "channel_id": "7", "justification": "test"});
    if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
    }
    p
}

/// The stable error code of a failed call.
pub fn err_code(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Rpc(e)) => e.data.code,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

/// Waits (with a deadline) until `pending` lists `n` requests.
pub async fn wait_pending(c: &mut Client, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = c.call("pending", json!({})).await.expect("pending");
        let list = list.as_array().cloned().unwrap_or_default();
        if list.len() == n {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} pending, have {}",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
