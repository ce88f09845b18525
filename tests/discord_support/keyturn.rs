//! Spawning the real `keyturn` binary against a temp directory (config,
//! sockets, database) and talking to it as an agent (agent socket) or admin
//! (admin socket). Agents and admin are this one uid, so the config sets
//! `[admin] single_user_demo = true`.
#![allow(dead_code)]

use keyturn::ipc::client::Client;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The agent every test config declares.
pub const AGENT: &str = "agent";

/// A test config: Discord pointed at `api_base`, user 42 and alice (100)
/// paired, `delete_file` high and `drop_db` critical (both allowed
/// globally), `read_file` low (not allowed anywhere).
pub fn config(api_base: &str) -> String {
    format!(
        r#"
[server]
socket_path = "k.sock"

[store]
url = "sqlite://k.db"

[admin]
# Agents and admin are the test's one uid.
single_user_demo = true

[risk.high]
timeout = "30s"

[[agents]]
name = "{AGENT}"
max_pending = 1000

[[users]]
id = "42"

[[users]]
id = "100"

[[tools]]
name = "delete_file"
risk = "high"

[[tools]]
name = "drop_db"
risk = "critical"

[[tools]]
name = "read_file"
risk = "low"

[[grants]]
scope = "global"
tool = "delete_file"

[[grants]]
scope = "global"
tool = "drop_db"

[discord]
token = "fake-token"
api_base = "{api_base}"
guild_id = 10
approvals_channel_id = 20
approver_role_id = 30
admin_role_id = 31
ping_approvers = true
ping_admins = true
"#
    )
}

/// A running `keyturn serve`.
pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    /// The agent socket.
    pub socket: PathBuf,
    /// The admin socket (the default `[admin] socket_path`).
    pub admin_socket: PathBuf,
}

/// Why `serve` did not come up: its exit status and log.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<std::process::ExitStatus>,
    pub log: String,
}

/// Writes `config` into `dir` and starts the binary; waits (10 s at most)
/// for its `listening` line.
pub async fn spawn(dir: &Path, config: &str) -> Result<Server, StartFailure> {
    let cfg_path = dir.join("config.toml");
    std::fs::write(&cfg_path, config).expect("write config");
    // The config holds the bot token: `serve` refuses it world-readable.
    std::fs::set_permissions(
        &cfg_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod config");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("keyturn.log"))
        .expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyturn"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg_path)
        .env("KEYTURN_LOG", "keyturn=debug")
        .env_remove("KEYTURN_DISCORD_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn keyturn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with("keyturn: listening on") {
                return true;
            }
        }
        false
    };
    let up = tokio::time::timeout(Duration::from_secs(10), wait).await;
    if up != Ok(true) {
        let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => {
                let _ = child.start_kill();
                None
            }
        };
        return Err(StartFailure {
            status,
            log: read_log(dir),
        });
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Server {
        child,
        dir: dir.to_path_buf(),
        socket: dir.join("k.sock"),
        admin_socket: dir.join("keyturn-admin.sock"),
    })
}

pub fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("keyturn.log")).unwrap_or_default()
}

impl Server {
    /// A connection to the admin socket, which serves every method to an admin.
    pub async fn client(&self) -> Client {
        Client::connect(&self.admin_socket).await.expect("connect")
    }

    /// A connection to the agent socket (agent methods only).
    pub async fn agent_client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect")
    }

    /// One call on a fresh connection: `submit` and `check` as the agent
    /// (agent socket), everything else as an admin (admin socket).
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        let mut c = if matches!(method, "submit" | "check" | "ping") {
            self.agent_client().await
        } else {
            self.client().await
        };
        c.call(method, params).await.map_err(|e| e.to_string())
    }

    /// Submits as the test agent and blocks until decided, in the background.
    pub fn submit_waiting(&self, params: Value) -> tokio::task::JoinHandle<Value> {
        let socket = self.socket.clone();
        let mut p = params;
        p["agent"] = json!(AGENT);
        p["wait"] = json!(true);
        tokio::spawn(async move {
            let mut c = Client::connect(&socket).await.expect("connect");
            c.call("submit", p).await.expect("submit")
        })
    }

    /// Submits as the test agent without waiting.
    pub async fn submit(&self, params: Value) -> Value {
        let mut p = params;
        p["agent"] = json!(AGENT);
        self.call("submit", p).await.expect("submit")
    }

    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// kill -9: no shutdown at all.
    pub async fn kill9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("keyturn did not stop within 10 s")
            .expect("wait")
    }
}

/// A high-risk request on behalf of user 42.
pub fn delete_file() -> Value {
    json!({
        "tool": "delete_file",
        "args": {"path": "/srv/x"},
        "user_id": "42",
        "channel_id": "7",
        "justification": "cleanup of old builds",
    })
}
