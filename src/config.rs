//! The configuration file: TOML, every key documented in `config.example.toml`.
//!
//! Parsing rejects unknown keys; [`Config::validate`] rejects bad values and
//! impossible combinations, naming the key. Secrets may come from the
//! environment instead of the file, and are redacted in `Debug`.

use crate::domain::flags::FlagKind;
use crate::domain::policy::{Autonomy, Effect, Grant, PolicySettings, Scope, ToolPattern};
use crate::domain::ratelimit::Rate;
use crate::domain::redact::{ExtraRule, Redactor};
use crate::domain::trifecta::ToolTag;
use crate::domain::Risk;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod anomaly;

/// A bad configuration, with the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error(
        "config file {path} holds a secret ({keys}) and is readable by every user (mode {mode:04o}); \
         run `chmod 600 {path}`, or move the secret to the environment ({env})"
    )]
    Exposed {
        path: PathBuf,
        mode: u32,
        keys: String,
        env: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"[redacted]\"")
        }
    }
}

/// The one duration syntax of every CLI flag and config key: `90s`, `5m`,
/// `1h`, `1h30m` (humantime). A bare number is read as seconds, as some
/// flags always accepted; the documented form has a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("`{t}` is not a duration (e.g. `90s`, `5m`, `1h`): {e}"))
}

/// A duration written as `30s`, `5m`, `1h` (see [`parse_duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        parse_duration(&s).map(Dur)
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub risk: RiskConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub tools: Vec<ToolConfig>,
    #[serde(default)]
    pub grants: Vec<GrantConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub pairing: PairingConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub discord: DiscordConfig,
    #[serde(default)]
    pub content: ContentConfig,
    #[serde(default)]
    pub exec: ExecConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub tcp: TcpConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub run: RunConfig,
    /// `[anomaly]`: rules over the stream of calls (see [`anomaly`]).
    #[serde(default)]
    pub anomaly: anomaly::AnomalyConfig,
    /// `[credentials.NAME]`: secrets Keyturn injects into runs of the tools
    /// that declare them; never sent to an agent.
    #[serde(default)]
    pub credentials: std::collections::BTreeMap<String, CredentialConfig>,
    /// Keys whose secret is written in the file itself (not from the
    /// environment): such a file must not be readable by others.
    #[serde(skip)]
    pub secrets_in_file: Vec<String>,
    /// The file this config was loaded from (hidden inside every sandbox).
    #[serde(skip)]
    pub loaded_from: Option<PathBuf>,
}

/// `[log]`: what `serve` logs to stderr, and how.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `keyturn=debug,serenity=warn`). Default
    /// `keyturn=info`; `KEYTURN_LOG` overrides it. Reloaded on SIGHUP.
    pub level: Option<String>,
    /// `text` (default) or `json` (one JSON object per line, for journald
    /// and log shippers). Read at start only.
    pub format: LogFormat,
}

/// The format of `serve`'s log lines.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `keyturn exec`: what the command it runs may see.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// Environment variables passed to the command besides `PATH`, `HOME`,
    /// `LANG` and `TERM` (CA-bundle variables such as `SSL_CERT_FILE` only
    /// when listed; Keyturn's own tokens and loader/proxy variables never).
    pub keep_env: Vec<String>,
}

/// `[run]`: how Keyturn runs the tools that have a `run` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The bubblewrap binary (a name on `PATH` or a path).
    pub bwrap: String,
    /// Most bytes of stdout, and of stderr, kept and returned per run; the
    /// rest is counted (the answer says the full size) and hashed.
    pub max_output_bytes: usize,
    /// Between the SIGTERM and the SIGKILL sent to a run's process group.
    pub kill_grace: Dur,
    /// The uid and gid runs use when Keyturn runs as root (default 65534,
    /// `nobody`): the process limit does not bind root. Ignored otherwise
    /// (runs use Keyturn's own uid).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Where credential files are staged (mode 0700, removed after each
    /// run) before they are bound into a sandbox. Default: `/dev/shm`
    /// (memory, never disk); without it and without this setting, a tool
    /// with a file credential is refused at its run.
    pub scratch_dir: Option<String>,
    /// Most runs at once in this process; more are refused (`too_many_runs`).
    pub max_concurrent: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            bwrap: "bwrap".into(),
            max_output_bytes: 200 * 1024,
            kill_grace: Dur(Duration::from_secs(2)),
            uid: None,
            gid: None,
            scratch_dir: None,
            max_concurrent: 16,
        }
    }
}

/// Where one credential (or one of its auth profiles) is read from: exactly
/// one of `env`, `file`, `command`.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialSource {
    /// Profile name (shown by `keyturn credentials status`); default `default`,
    /// or `profile1`, `profile2`… in a list.
    #[serde(default)]
    pub name: Option<String>,
    /// An environment variable of Keyturn's.
    #[serde(default)]
    pub env: Option<String>,
    /// A file (re-read when it changes).
    #[serde(default)]
    pub file: Option<String>,
    /// A command whose stdout (trailing newline removed) is the value:
    /// `["pass", "show", "kube/prod"]`. No shell.
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

/// `[credentials.NAME]`: one source inline, or `profiles` tried in order.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    #[serde(flatten)]
    pub source: CredentialSource,
    /// Auth profiles in order of preference (failover).
    #[serde(default)]
    pub profiles: Vec<CredentialSource>,
    /// Consecutive failures after which a profile is set aside and the
    /// next one used (default 3). A success resets the count.
    #[serde(default = "default_fail_after")]
    pub fail_after: u32,
    /// Exit codes of a run that count as this credential failing.
    #[serde(default)]
    pub fail_exit_codes: Vec<i32>,
    /// A regex over the run's stdout and stderr that counts as failing
    /// (`Unauthorized|401`).
    #[serde(default)]
    pub fail_pattern: Option<String>,
    /// A set-aside profile is tried again after this long (default: only
    /// after `keyturn credentials reset`, when a re-read finds its value
    /// changed, or when every profile is set aside: then the one set aside
    /// longest ago is tried).
    #[serde(default)]
    pub retry_after: Option<Dur>,
}

fn default_fail_after() -> u32 {
    3
}

impl CredentialConfig {
    /// Whether a source is written inline (`env`, `file`, `command` or
    /// `name` beside the credential's other keys).
    fn has_inline(&self) -> bool {
        let s = &self.source;
        s.name.is_some() || s.env.is_some() || s.file.is_some() || s.command.is_some()
    }

    /// The profiles in order of preference with their names: the inline
    /// source (named `default` unless it says), or `profiles` (named
    /// `profile1`, `profile2`… unless they say).
    pub fn sources(&self) -> Vec<(String, CredentialSource)> {
        if self.profiles.is_empty() {
            let name = self.source.name.clone().unwrap_or_else(|| "default".into());
            return vec![(name, self.source.clone())];
        }
        self.profiles
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let name = p
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("profile{}", i + 1));
                (name, p.clone())
            })
            .collect()
    }
}

/// The optional HTTP listener for `/healthz` and `/metrics` (Prometheus).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address to listen on, e.g. `127.0.0.1:9464` (port 0 picks a free
    /// port, logged at start). Unset: no listener.
    pub listen: Option<String>,
    /// Allow a non-loopback `listen` address. Metrics name agents and
    /// queue sizes: exposing them beyond this host is a deliberate choice.
    pub allow_remote: bool,
}

impl MetricsConfig {
    /// The parsed listen address, if any (checked by [`Config::validate`]).
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(raw) = &self.listen else {
            return Ok(None);
        };
        let addr: std::net::SocketAddr = raw.parse().map_err(|_| {
            invalid(
                "metrics.listen",
                format!("`{raw}` is not an IP address and port, e.g. 127.0.0.1:9464"),
            )
        })?;
        if !addr.ip().is_loopback() && !self.allow_remote {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "`{raw}` is not a loopback address; set metrics.allow_remote = true to serve health and metrics beyond this host"
                ),
            ));
        }
        Ok(Some(addr))
    }
}

/// The optional TCP listener for agents on other hosts (off by default):
/// the agent socket's protocol, each connection authenticated by an agent's
/// bearer token, over TLS unless bound to loopback.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// Address to listen on, e.g. `127.0.0.1:7443` or `0.0.0.0:7443`.
    /// Unset: no TCP listener.
    pub listen: Option<String>,
    /// TLS certificate chain (PEM). Required, with `tls_key`, unless
    /// `listen` is a loopback address.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Open connections from one IP address.
    pub max_connections_per_ip: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            listen: None,
            tls_cert: None,
            tls_key: None,
            max_connections_per_ip: 64,
        }
    }
}

/// Where the TCP listener's TLS certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TcpConfig {
    /// The listen address and the TLS files (`None`: plaintext, loopback
    /// only), or `None` when there is no TCP listener. Refuses a
    /// non-loopback address without TLS, and half a TLS setting.
    pub fn listener(
        &self,
    ) -> Result<Option<(std::net::SocketAddr, Option<TlsFiles>)>, ConfigError> {
        let Some(raw) = &self.listen else {
            if self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err(invalid(
                    "tcp.listen",
                    "tcp.tls_cert or tcp.tls_key is set but tcp.listen is not: set the address to listen on, or remove the TLS keys",
                ));
            }
            return Ok(None);
        };
        let addr: std::net::SocketAddr = raw.parse().map_err(|_| {
            invalid(
                "tcp.listen",
                format!("`{raw}` is not an IP address and port, e.g. 0.0.0.0:7443"),
            )
        })?;
        if self.max_connections_per_ip == 0 {
            return Err(invalid("tcp.max_connections_per_ip", "must be at least 1"));
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "tcp.tls_key",
                    "tcp.tls_cert is set but tcp.tls_key is not: TLS needs both (PEM files)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tcp.tls_cert",
                    "tcp.tls_key is set but tcp.tls_cert is not: TLS needs both (PEM files)",
                ))
            }
        };
        if tls.is_none() && !addr.ip().is_loopback() {
            return Err(invalid(
                "tcp.listen",
                format!(
                    "`{raw}` is not a loopback address, so tcp.tls_cert and tcp.tls_key are required: \
                     without TLS, agents' bearer tokens would cross the network in clear"
                ),
            ));
        }
        Ok(Some((addr, tls)))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Path of the agent socket.
    pub socket_path: PathBuf,
    /// Octal file mode of the socket: `0600`, or `0660` with `socket_group`.
    pub socket_mode: String,
    /// Group (name or gid) that may connect when the mode allows the group.
    pub socket_group: Option<String>,
    pub max_connections: usize,
    /// Longest accepted line on the socket, in bytes.
    pub max_line_bytes: usize,
    /// Largest accepted `args` object (serialized), in bytes.
    pub max_args_bytes: usize,
    /// Largest justification, in bytes.
    pub max_justification_bytes: usize,
    /// Requests one connection may have in flight at once.
    pub max_inflight_per_connection: usize,
    /// Bytes of request lines one connection may have in flight at once
    /// (each call counts its line's length until it is answered).
    pub max_inflight_bytes_per_connection: usize,
    /// Bytes of request lines in flight on all connections of a socket.
    pub max_inflight_bytes: usize,
    /// Open connections from one uid on one socket.
    pub max_connections_per_uid: usize,
    /// A connection with no call in flight that sends no complete line for
    /// this long is closed (with an `idle_timeout` error line).
    pub idle_timeout: Dur,
    /// On the first SIGINT/SIGTERM: how long calls in flight may finish and
    /// replies flush before every connection is closed.
    pub shutdown_drain: Dur,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket_path: PathBuf::from("keyturn.sock"),
            socket_mode: "0600".into(),
            socket_group: None,
            max_connections: 256,
            max_line_bytes: 256 * 1024,
            max_args_bytes: 64 * 1024,
            max_justification_bytes: 4096,
            max_inflight_per_connection: 64,
            max_inflight_bytes_per_connection: 8 * 1024 * 1024,
            max_inflight_bytes: 64 * 1024 * 1024,
            max_connections_per_uid: 64,
            idle_timeout: Dur(Duration::from_secs(300)),
            shutdown_drain: Dur(Duration::from_secs(5)),
        }
    }
}

/// The store URL schemes this build supports.
/// `url` with its password (in the authority or a `password=` parameter)
/// replaced by `***`: what errors and logs may show.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(start) = url.find("://").map(|i| i + 3) {
        let rest = &url[start..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..end];
        if let Some(at) = authority.rfind('@') {
            if let Some(colon) = authority[..at].find(':') {
                out = format!(
                    "{}{}:***{}",
                    &url[..start],
                    &authority[..colon],
                    &url[start + at..]
                );
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

pub const STORE_SCHEMES: &str = "the supported store URL schemes are sqlite:// (e.g. \
     sqlite:///var/lib/keyturn/keyturn.db) and postgres:// (e.g. postgres://keyturn@db/keyturn)";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (created if missing), or `postgres://…` (the
    /// `search_path` schema the URL names is created if missing).
    pub url: String,
    /// SQLite `synchronous`: `normal` (durable across process crashes) or
    /// `full` (also across power loss, slower).
    pub sqlite_synchronous: String,
    /// Largest number of writes committed together in one transaction.
    pub max_batch: usize,
    /// Group (name or gid) that may read and write the database files
    /// (mode 0660). Unset: owner only (0600).
    pub group: Option<String>,
    /// How often a store shared by several processes re-reads what others
    /// may have changed (waiters, pending counts, the policy view, due
    /// deadlines), whatever notifications said: the bound on how long a
    /// lost notification can leave a waiter stranded or a revoked grant
    /// in force here. Unused by SQLite.
    pub recheck: Dur,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://keyturn.db".into(),
            sqlite_synchronous: "normal".into(),
            max_batch: 512,
            group: None,
            recheck: Dur(Duration::from_secs(1)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Unix uids allowed to run admin operations. Empty: the uid running the server.
    pub uids: Vec<u32>,
    /// Path of the admin socket: the only socket that serves admin methods
    /// (approve, deny, pending, grant, …). Relative to the config file.
    pub socket_path: PathBuf,
    /// Octal file mode of the admin socket: `0600`, or `0660` with `socket_group`.
    pub socket_mode: String,
    /// Group (name or gid) of admins, when the mode allows the group.
    pub socket_group: Option<String>,
    /// Everything runs as one uid (the README quick start): agents may run
    /// as the server's uid or an admin uid, share that uid without tokens,
    /// and approve their own calls. Never for production.
    pub single_user_demo: bool,
    /// A vote from the uid that made the request is accepted.
    pub allow_self_approval: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            uids: Vec::new(),
            socket_path: PathBuf::from("keyturn-admin.sock"),
            socket_mode: "0600".into(),
            socket_group: None,
            single_user_demo: false,
            allow_self_approval: false,
        }
    }
}

/// What `[admin] single_user_demo` gives up, logged at start in demo mode.
pub const SINGLE_USER_DEMO_WARNING: &str = "single-user demo mode ([admin] single_user_demo = true): agents running as this server's uid can read and write its database directly, use each other's names and grants, and approve their own calls, so nothing here stops an agent; do not use it in production (see docs/deploy.md).";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    /// Unix uids this agent may connect from. Empty: the uid running the server.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Optional shared secret; `KEYTURN_AGENT_<NAME>_TOKEN` overrides it.
    #[serde(default)]
    pub token: Secret,
    /// Nobody watches this agent: calls that need a human are denied at once.
    #[serde(default)]
    pub unattended: bool,
    /// Most pending requests this agent may have at once, counted in the
    /// store in the transaction that queues a request (so one limit across
    /// every process sharing the database).
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Overrides `[policy] min_confidence` for this agent.
    #[serde(default)]
    pub min_confidence: Option<f64>,
}

fn default_max_pending() -> usize {
    100
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub autonomy: Autonomy,
    /// Per-channel autonomy, e.g. `{ "7" = "approval_required" }`.
    pub channel_autonomy: HashMap<String, Autonomy>,
    /// Calls whose agent states a confidence below this (0..=1) ask a
    /// human even where the policy would allow them (`low_confidence`).
    /// Unset: off. `[[agents]] min_confidence` overrides it per agent.
    pub min_confidence: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiskLevelConfig {
    /// How long a request waits for a human before it times out.
    pub timeout: Dur,
    /// Distinct approvals needed.
    pub approvals: u32,
    /// `[[risk.LEVEL.escalation]]`: what happens while nobody decides
    /// (see [`crate::domain::escalation`]).
    pub escalation: Vec<crate::domain::escalation::StepConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiskConfig {
    pub high: RiskLevelConfig,
    /// A `[risk.critical]` section that leaves out `timeout` keeps the
    /// critical default (15 minutes), not the high one.
    #[serde(deserialize_with = "critical_level")]
    pub critical: RiskLevelConfig,
    /// The longest deadline an agent may ask for.
    pub max_timeout: Dur,
}

impl Default for RiskLevelConfig {
    fn default() -> Self {
        RiskLevelConfig {
            timeout: Dur(Duration::from_secs(300)),
            approvals: 1,
            escalation: Vec::new(),
        }
    }
}

impl RiskLevelConfig {
    /// The defaults of `[risk.critical]`.
    fn critical() -> Self {
        RiskLevelConfig {
            timeout: Dur(Duration::from_secs(900)),
            ..RiskLevelConfig::default()
        }
    }
}

/// `[risk.critical]` with its own defaults for the keys it leaves out.
fn critical_level<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RiskLevelConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Partial {
        timeout: Option<Dur>,
        approvals: Option<u32>,
        #[serde(default)]
        escalation: Vec<crate::domain::escalation::StepConfig>,
    }
    let p = Partial::deserialize(d)?;
    let base = RiskLevelConfig::critical();
    Ok(RiskLevelConfig {
        timeout: p.timeout.unwrap_or(base.timeout),
        approvals: p.approvals.unwrap_or(base.approvals),
        escalation: p.escalation,
    })
}

impl Default for RiskConfig {
    fn default() -> Self {
        RiskConfig {
            high: RiskLevelConfig::default(),
            critical: RiskLevelConfig::critical(),
            max_timeout: Dur(Duration::from_secs(3600)),
        }
    }
}

/// Rate limits and task budgets, counted in memory by each process (per
/// replica when several share one database; `max_pending` is the limit
/// counted in the database).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls per agent, e.g. `600/min`. Unset: unlimited.
    pub agent_rate: Option<Rate>,
    /// Calls on behalf of one user, e.g. `60/min`. Unset: unlimited.
    pub user_rate: Option<Rate>,
    /// Most calls in one task (same task id). Unset: unlimited.
    pub task_max_steps: Option<u64>,
    /// Most total reported cost in one task. Unset: unlimited.
    pub task_max_cost: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    pub name: String,
    pub risk: Risk,
    /// Capabilities for the lethal-trifecta guard: `reads_private_data`,
    /// `sees_untrusted_input`, `communicates_externally`.
    #[serde(default)]
    pub tags: Vec<ToolTag>,
    /// Overrides `content.ask_on_flags` for this tool (`[]`: flags on this
    /// tool's calls never ask a human by themselves; logged at start).
    #[serde(default)]
    pub ask_on_flags: Option<FlagSelection>,
    /// Keyturn runs this tool itself (the `run` method): an argv template
    /// with typed slots, the sandbox profile, credentials. See docs/execution.md.
    #[serde(default)]
    pub run: Option<crate::domain::run::RunSpec>,
}

/// A set of flag kinds: `"all"` (every kind, including kinds added in later
/// versions) or a list such as `["homoglyph", "exfiltration"]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FlagSelection {
    #[default]
    All,
    Only(Vec<FlagKind>),
}

impl FlagSelection {
    pub fn contains(&self, kind: FlagKind) -> bool {
        match self {
            FlagSelection::All => true,
            FlagSelection::Only(k) => k.contains(&kind),
        }
    }

    /// Names as written in the config (`all` or the listed kinds).
    pub fn describe(&self) -> String {
        match self {
            FlagSelection::All => "all".into(),
            FlagSelection::Only(k) if k.is_empty() => "none".into(),
            FlagSelection::Only(k) => k.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "),
        }
    }
}

impl<'de> Deserialize<'de> for FlagSelection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FlagSelection;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"all\" or a list of flag kinds")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FlagSelection, E> {
                if v == "all" {
                    Ok(FlagSelection::All)
                } else {
                    Err(E::custom(format!(
                        "`{v}`: expected \"all\" or a list of flag kinds"
                    )))
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<FlagSelection, A::Error> {
                let mut kinds = Vec::new();
                while let Some(k) = seq.next_element::<FlagKind>()? {
                    if !kinds.contains(&k) {
                        kinds.push(k);
                    }
                }
                Ok(FlagSelection::Only(kinds))
            }
        }
        d.deserialize_any(V)
    }
}

/// What is masked and flagged in tool-call content.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentConfig {
    /// Hosts agents may send data to; anything else in the arguments is
    /// flagged `exfiltration`. `example.com` covers its subdomains; `*` allows all.
    pub allowed_domains: Vec<String>,
    /// More key names whose values are always hidden (case, `-`, `_`, `.` ignored).
    pub extra_secret_keys: Vec<String>,
    /// More secret formats: a name and a regex (group 1, if any, is the secret).
    pub secret_rules: Vec<SecretRuleConfig>,
    /// Any flag raises the call's risk by one level.
    pub raise_risk_on_flags: bool,
    /// Flag kinds that deny the call at once (rule `flag_<kind>`).
    pub deny_on_flags: Vec<FlagKind>,
    /// Flag kinds that send the call to a human whatever its risk (rule
    /// `flag_<kind>`). Default `"all"`: every kind, including kinds added
    /// later; `deny_on_flags` beats it; `[[tools]] ask_on_flags` overrides it.
    pub ask_on_flags: FlagSelection,
    /// How far back the lethal-trifecta guard looks at an agent's (and a
    /// user's) calls. A task id never shortens it.
    pub trifecta_window: Dur,
}

impl Default for ContentConfig {
    fn default() -> Self {
        ContentConfig {
            allowed_domains: vec![],
            extra_secret_keys: vec![],
            secret_rules: vec![],
            raise_risk_on_flags: false,
            deny_on_flags: vec![],
            ask_on_flags: FlagSelection::All,
            trifecta_window: Dur(Duration::from_secs(24 * 3600)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRuleConfig {
    pub name: String,
    pub pattern: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// `global`, `agent:NAME`, `role:ID`, `channel:ID` or `user:ID`.
    pub scope: String,
    /// Tool name or glob (`fs.*`, `*`).
    pub tool: String,
    #[serde(default)]
    pub effect: Effect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user's id (a Discord user id, or any id your agents use).
    pub id: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairingConfig {
    /// How long a pairing code stays valid.
    pub code_ttl: Dur,
    /// Most live codes at once, across all users.
    pub max_live_codes: usize,
}

impl Default for PairingConfig {
    fn default() -> Self {
        PairingConfig {
            code_ttl: Dur(Duration::from_secs(3600)),
            max_live_codes: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Prune entries older than this many days (0: keep forever).
    pub retention_days: u32,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DiscordConfig {
    /// Bot token; `KEYTURN_DISCORD_TOKEN` overrides it. Empty: no bot.
    pub token: Secret,
    /// Unset: real Discord. A local base such as `http://127.0.0.1:8765` for tests.
    pub api_base: Option<String>,
    pub gateway_url: Option<String>,
    pub guild_id: Option<u64>,
    pub approvals_channel_id: Option<u64>,
    pub approver_role_id: Option<u64>,
    pub admin_role_id: Option<u64>,
    /// Ping the approver role on high-risk cards.
    pub ping_approvers: bool,
    /// Ping the admin role on critical cards.
    pub ping_admins: bool,
    /// The user a request is for may approve it.
    pub allow_self_approval: bool,
    /// Longest pause of a card waiting for Discord after failures (default 10 s).
    pub max_retry_pause: Option<Dur>,
    /// How long the start-up checks may take before `serve` goes on without
    /// Discord and keeps connecting in the background (default 5 s).
    pub start_timeout: Option<Dur>,
    /// Flood digests: more cards waiting to be posted than this (and more
    /// than Discord lets the bot post in 15 s) are grouped into digests per
    /// agent and tool (default 20; 0 turns digests off).
    pub digest_threshold: Option<u32>,
}

/// Refuses a socket path `key` that resolves to one of the `taken` paths
/// (each with what it is, for the message).
pub fn check_socket_path(
    key: &str,
    socket: &Path,
    taken: &[(String, PathBuf)],
) -> Result<(), ConfigError> {
    let me = resolved(socket);
    for (what, other) in taken {
        if resolved(other) == me {
            return Err(invalid(
                key,
                format!(
                    "`{}` is {what}; binding a socket there would replace it",
                    socket.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The path with symlinks and `..` resolved as far as it exists (a socket or
/// database not created yet resolves through its directory).
fn resolved(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            match dir.canonicalize() {
                Ok(d) => d.join(name),
                Err(_) => p.to_path_buf(),
            }
        }
        _ => p.to_path_buf(),
    }
}

/// Names under which config secrets may come from the environment.
pub const ENV_DISCORD_TOKEN: &str = "KEYTURN_DISCORD_TOKEN";

fn parse_mode(key: &str, m: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(m.trim_start_matches("0o"), 8)
        .ok()
        .filter(|v| *v <= 0o777)
        .ok_or_else(|| invalid(key, format!("`{m}` is not an octal mode like 0600")))
}

/// Path length, and a mode that gives nobody but the owner (and the named
/// group) access.
/// One credential source: exactly one of `env`, `file`, `command`, each
/// usable (a variable name, an absolute path, a non-empty argv).
fn validate_credential_source(key: &str, s: &CredentialSource) -> Result<(), ConfigError> {
    let set = [s.env.is_some(), s.file.is_some(), s.command.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        return Err(invalid(
            key,
            format!("set exactly one of `env`, `file`, `command` (found {set})"),
        ));
    }
    if let Some(e) = &s.env {
        if e.is_empty() || e.contains('=') || e.contains('\0') {
            return Err(invalid(
                format!("{key}.env"),
                "must be an environment variable name",
            ));
        }
    }
    if let Some(f) = &s.file {
        if !f.starts_with('/') {
            return Err(invalid(
                format!("{key}.file"),
                format!("`{f}` must be an absolute path"),
            ));
        }
    }
    if let Some(argv) = &s.command {
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(invalid(
                format!("{key}.command"),
                "must name a program: [\"program\", \"arg\", …] (no shell)",
            ));
        }
    }
    Ok(())
}

fn validate_socket(
    section: &str,
    path: &Path,
    mode: u32,
    group: &Option<String>,
) -> Result<(), ConfigError> {
    let key = format!("{section}.socket_path");
    if path.as_os_str().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    // Linux limits socket paths to 107 bytes.
    if path.as_os_str().len() > 107 {
        return Err(invalid(
            key,
            format!(
                "`{}` is longer than the 107 bytes a Unix socket path may have",
                path.display()
            ),
        ));
    }
    let key = format!("{section}.socket_mode");
    if mode & 0o007 != 0 {
        return Err(invalid(
            key,
            format!(
                "must not give access to others (use 0600, or 0660 with {section}.socket_group)"
            ),
        ));
    }
    if mode & 0o070 != 0 && group.is_none() {
        return Err(invalid(
            key,
            format!("{mode:04o} gives the group access, so {section}.socket_group must be set"),
        ));
    }
    Ok(())
}

fn agent_token_env(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("KEYTURN_AGENT_{upper}_TOKEN")
}

impl Config {
    /// Reads, parses, applies environment secrets and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        cfg.secrets_in_file = cfg.secret_keys();
        cfg.apply_env(|k| std::env::var(k).ok());
        // Relative paths are relative to the config file, so any cwd works.
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate()?;
        cfg.check_socket_paths(path)?;
        cfg.loaded_from = Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
        Ok(cfg)
    }

    /// Keys that hold a secret (before the environment is applied: the file's own).
    fn secret_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        if !self.discord.token.0.is_empty() {
            keys.push("discord.token".to_string());
        }
        for (i, a) in self.agents.iter().enumerate() {
            if !a.token.0.is_empty() {
                keys.push(format!("agents[{i}].token"));
            }
        }
        keys
    }

    /// For `serve`, `init` and `check-config`: a config file that holds a
    /// secret must not be readable by other users. World-readable is
    /// refused; group-readable is allowed (a deliberate group, e.g. for a
    /// deploy tool) and returned as a warning to print loudly.
    pub fn check_file_permissions(&self, path: &Path) -> Result<Option<String>, ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        if self.secrets_in_file.is_empty() {
            return Ok(None);
        }
        let mode = std::fs::metadata(path)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        let keys = self.secrets_in_file.join(", ");
        if mode & 0o004 != 0 {
            let mut env = vec![ENV_DISCORD_TOKEN.to_string()];
            env.extend(self.agents.iter().map(|a| agent_token_env(&a.name)));
            return Err(ConfigError::Exposed {
                path: path.to_path_buf(),
                mode,
                keys,
                env: env.join(", "),
            });
        }
        if mode & 0o040 != 0 {
            return Ok(Some(format!(
                "config file {} holds a secret ({keys}) and is readable by its group (mode {mode:04o}); \
                 run `chmod 600 {}` unless every member of that group may hold the secret",
                path.display(),
                path.display()
            )));
        }
        Ok(None)
    }

    /// The database file, if the store is a file (`None` for `:memory:`).
    pub fn store_path(&self) -> Option<PathBuf> {
        let rest = self.store.url.strip_prefix("sqlite://")?;
        let path = rest.split('?').next().unwrap_or(rest);
        (!path.is_empty() && path != ":memory:" && !rest.contains("mode=memory"))
            .then(|| PathBuf::from(path))
    }

    /// Every socket the server binds, with its key. A new socket is added
    /// here, so the path checks below cover it.
    pub fn sockets(&self) -> Vec<(&'static str, &Path)> {
        vec![
            ("server.socket_path", self.server.socket_path.as_path()),
            ("admin.socket_path", self.admin.socket_path.as_path()),
        ]
    }

    /// A socket path must not name the database, its `-wal`/`-shm`, the
    /// config file or another socket, compared after resolving symlinks and
    /// `..`: binding there would replace that file.
    pub fn check_socket_paths(&self, config_file: &Path) -> Result<(), ConfigError> {
        let mut taken: Vec<(String, PathBuf)> =
            vec![("the config file".into(), config_file.to_path_buf())];
        if let Some(db) = self.store_path() {
            let name = db
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            taken.push(("the database (store.url)".into(), db.clone()));
            for suffix in ["-wal", "-shm", "-journal"] {
                taken.push((
                    format!("the database's {suffix} file"),
                    db.with_file_name(format!("{name}{suffix}")),
                ));
            }
        }
        for (key, socket) in self.sockets() {
            check_socket_path(key, socket, &taken)?;
            taken.push((format!("the socket {key}"), socket.to_path_buf()));
        }
        Ok(())
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Secrets from the environment override the file.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(t) = get(ENV_DISCORD_TOKEN).filter(|t| !t.is_empty()) {
            self.discord.token = Secret(t);
        }
        for a in &mut self.agents {
            if let Some(t) = get(&agent_token_env(&a.name)).filter(|t| !t.is_empty()) {
                a.token = Secret(t);
            }
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.server.socket_path.is_relative() {
            self.server.socket_path = base.join(&self.server.socket_path);
        }
        if self.admin.socket_path.is_relative() {
            self.admin.socket_path = base.join(&self.admin.socket_path);
        }
        for p in [&mut self.tcp.tls_cert, &mut self.tcp.tls_key]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(rest) = self.store.url.strip_prefix("sqlite://") {
            let p = Path::new(rest);
            if p.is_relative() && rest != ":memory:" {
                self.store.url = format!("sqlite://{}", base.join(p).display());
            }
        }
    }

    /// Paths no run may see: Keyturn's database (and its WAL, its
    /// directory's marker), its config file, its sockets and its TLS key.
    pub fn paths_hidden_from_runs(&self) -> Vec<String> {
        let mut out: Vec<PathBuf> = vec![
            self.server.socket_path.clone(),
            self.admin.socket_path.clone(),
        ];
        out.extend(self.loaded_from.clone());
        out.extend(self.tcp.tls_key.clone());
        if let Some(rest) = self.store.url.strip_prefix("sqlite://") {
            let db = PathBuf::from(rest.split('?').next().unwrap_or(rest));
            if db.is_absolute() {
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    out.push(PathBuf::from(format!("{}{suffix}", db.display())));
                }
            }
        }
        out.into_iter()
            .filter(|p| p.is_absolute())
            .map(|p| p.display().to_string())
            .collect()
    }

    /// Whether any tool is run by Keyturn in the bubblewrap sandbox.
    pub fn uses_bwrap(&self) -> bool {
        self.tools.iter().any(|t| {
            t.run
                .as_ref()
                .is_some_and(|r| r.profile == crate::domain::run::Profile::Bwrap)
        })
    }

    /// Rejects bad values and impossible combinations, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(level) = &self.log.level {
            tracing_subscriber::EnvFilter::builder()
                .parse(level)
                .map_err(|e| invalid("log.level", format!("not a log filter: {e}")))?;
        }
        let s = &self.server;
        for (section, path, mode, group) in [
            (
                "server",
                &s.socket_path,
                self.socket_mode()?,
                &s.socket_group,
            ),
            (
                "admin",
                &self.admin.socket_path,
                self.admin_socket_mode()?,
                &self.admin.socket_group,
            ),
        ] {
            validate_socket(section, path, mode, group)?;
        }
        self.metrics.listen_addr()?;
        self.tcp.listener()?;
        if s.socket_path == self.admin.socket_path {
            return Err(invalid(
                "admin.socket_path",
                "must differ from server.socket_path: admin methods are served only on the admin socket",
            ));
        }
        for (key, v, min) in [
            ("server.max_connections", s.max_connections, 1),
            ("server.max_line_bytes", s.max_line_bytes, 1024),
            ("server.max_args_bytes", s.max_args_bytes, 64),
            (
                "server.max_justification_bytes",
                s.max_justification_bytes,
                16,
            ),
            (
                "server.max_inflight_per_connection",
                s.max_inflight_per_connection,
                1,
            ),
            (
                "server.max_connections_per_uid",
                s.max_connections_per_uid,
                1,
            ),
            (
                "server.max_inflight_bytes_per_connection",
                s.max_inflight_bytes_per_connection,
                s.max_line_bytes,
            ),
            (
                "server.max_inflight_bytes",
                s.max_inflight_bytes,
                s.max_inflight_bytes_per_connection,
            ),
            ("store.max_batch", self.store.max_batch, 1),
            ("pairing.max_live_codes", self.pairing.max_live_codes, 1),
        ] {
            if v < min {
                return Err(invalid(key, format!("must be at least {min} (got {v})")));
            }
        }
        if s.idle_timeout.0 < Duration::from_millis(100) {
            return Err(invalid("server.idle_timeout", "must be at least 100ms"));
        }
        if s.shutdown_drain.0 > Duration::from_secs(600) {
            return Err(invalid("server.shutdown_drain", "must be at most 10m"));
        }
        if s.max_args_bytes >= s.max_line_bytes {
            return Err(invalid(
                "server.max_args_bytes",
                "must be smaller than server.max_line_bytes",
            ));
        }
        match self.store.url.split_once("://").map(|(scheme, _)| scheme) {
            Some("sqlite" | "postgres" | "postgresql") => {}
            _ => {
                return Err(invalid(
                    "store.url",
                    format!("`{}`: {STORE_SCHEMES}", redact_url(&self.store.url)),
                ));
            }
        }
        if self.store.recheck.0.is_zero() {
            return Err(invalid("store.recheck", "must be greater than 0"));
        }
        if !["normal", "full"].contains(&self.store.sqlite_synchronous.as_str()) {
            return Err(invalid(
                "store.sqlite_synchronous",
                "must be `normal` or `full`",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, a) in self.agents.iter().enumerate() {
            let key = format!("agents[{i}].name");
            if a.name.is_empty()
                || a.name.len() > 64
                || !a
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                return Err(invalid(
                    key,
                    "must be 1-64 characters of letters, digits, `_-.`",
                ));
            }
            if !names.insert(a.name.as_str()) {
                return Err(invalid(key, format!("agent `{}` is listed twice", a.name)));
            }
            if a.max_pending == 0 {
                return Err(invalid(
                    format!("agents[{i}].max_pending"),
                    "must be at least 1",
                ));
            }
            if let Some(c) = a.min_confidence {
                crate::domain::policy::validate_confidence(c).map_err(|_| {
                    invalid(
                        format!("agents[{i}].min_confidence"),
                        format!("must be a number from 0 to 1 (got {c})"),
                    )
                })?;
            }
        }
        if let Some(c) = self.policy.min_confidence {
            crate::domain::policy::validate_confidence(c).map_err(|_| {
                invalid(
                    "policy.min_confidence",
                    format!("must be a number from 0 to 1 (got {c})"),
                )
            })?;
        }
        for (level, r) in [("high", &self.risk.high), ("critical", &self.risk.critical)] {
            if r.approvals == 0 || r.approvals > 10 {
                return Err(invalid(format!("risk.{level}.approvals"), "must be 1-10"));
            }
            if r.timeout.0.is_zero() {
                return Err(invalid(format!("risk.{level}.timeout"), "must be positive"));
            }
            if r.timeout.0 > self.risk.max_timeout.0 {
                return Err(invalid(
                    format!("risk.{level}.timeout"),
                    "must not exceed risk.max_timeout",
                ));
            }
            crate::domain::escalation::parse_ladder(
                &format!("risk.{level}.escalation"),
                &r.escalation,
                r.timeout.0,
            )
            .map_err(|(key, message)| invalid(key, message))?;
        }
        if let Some(c) = self.limits.task_max_cost {
            if !(c.is_finite() && c > 0.0) {
                return Err(invalid("limits.task_max_cost", "must be a positive number"));
            }
        }
        if self.content.trifecta_window.0 < Duration::from_secs(1) {
            return Err(invalid("content.trifecta_window", "must be at least 1s"));
        }
        if self.content.trifecta_window.0 > Duration::from_secs(366 * 86_400) {
            return Err(invalid(
                "content.trifecta_window",
                "must be at most 366 days",
            ));
        }
        if self.limits.task_max_steps == Some(0) {
            return Err(invalid("limits.task_max_steps", "must be at least 1"));
        }
        let mut tools = std::collections::HashSet::new();
        for (i, t) in self.tools.iter().enumerate() {
            crate::domain::policy::validate_tool_name(&t.name)
                .map_err(|m| invalid(format!("tools[{i}].name"), m))?;
            if !tools.insert(t.name.as_str()) {
                return Err(invalid(
                    format!("tools[{i}].name"),
                    format!("`{}` is listed twice", t.name),
                ));
            }
        }
        self.config_grants()?;
        self.redactor()?;
        for (i, u) in self.users.iter().enumerate() {
            Scope::new("user", &u.id).map_err(|m| invalid(format!("users[{i}].id"), m))?;
            for r in &u.roles {
                Scope::new("role", r).map_err(|m| invalid(format!("users[{i}].roles"), m))?;
            }
        }
        for ch in self.policy.channel_autonomy.keys() {
            Scope::new("channel", ch)
                .map_err(|m| invalid(format!("policy.channel_autonomy.{ch}"), m))?;
        }
        self.validate_credentials()?;
        self.anomaly.rules()?;
        self.validate_discord()
    }

    /// `[credentials.NAME]` entries, and the tools' `run` sections (their
    /// spec, and that every credential they use is defined).
    fn validate_credentials(&self) -> Result<(), ConfigError> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        };
        for (name, c) in &self.credentials {
            let key = format!("credentials.{name}");
            if !name_ok(name) {
                return Err(invalid(
                    key,
                    "the name must be 1-64 characters of letters, digits, `_-.`",
                ));
            }
            match (c.has_inline(), c.profiles.is_empty()) {
                (true, false) => {
                    return Err(invalid(
                        key,
                        "has both an inline source and `profiles`: use one",
                    ))
                }
                (false, true) => {
                    return Err(invalid(
                        key,
                        "has no source: set one of `env`, `file`, `command`, or `profiles`",
                    ))
                }
                _ => {}
            }
            let keyed: Vec<(String, &CredentialSource)> = if c.profiles.is_empty() {
                vec![(key.clone(), &c.source)]
            } else {
                c.profiles
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (format!("{key}.profiles[{i}]"), p))
                    .collect()
            };
            for (k, src) in &keyed {
                validate_credential_source(k, src)?;
            }
            let mut seen = std::collections::HashSet::new();
            for ((k, _), (profile, _)) in keyed.iter().zip(c.sources()) {
                if !name_ok(&profile) {
                    return Err(invalid(
                        format!("{k}.name"),
                        "must be 1-64 characters of letters, digits, `_-.`",
                    ));
                }
                if !seen.insert(profile.clone()) {
                    return Err(invalid(
                        format!("{k}.name"),
                        format!("profile `{profile}` is listed twice"),
                    ));
                }
            }
            if c.fail_after < 1 {
                return Err(invalid(format!("{key}.fail_after"), "must be at least 1"));
            }
            if let Some(pattern) = &c.fail_pattern {
                let re = regex::bytes::Regex::new(pattern)
                    .map_err(|e| invalid(format!("{key}.fail_pattern"), e.to_string()))?;
                if re.is_match(b"") {
                    return Err(invalid(
                        format!("{key}.fail_pattern"),
                        "matches the empty string, so every run would count as a failure",
                    ));
                }
            }
            if c.retry_after.as_ref().is_some_and(|d| d.0.is_zero()) {
                return Err(invalid(
                    format!("{key}.retry_after"),
                    "must be greater than 0",
                ));
            }
        }
        for t in &self.tools {
            let Some(run) = &t.run else { continue };
            let key = format!("tools.{}.run", t.name);
            crate::domain::run::check_spec(run).map_err(|m| invalid(key.clone(), m))?;
            for (i, u) in run.credentials.iter().enumerate() {
                if !self.credentials.contains_key(&u.name) {
                    return Err(invalid(
                        format!("{key}.credentials[{i}].name"),
                        format!(
                            "tool `{}` uses credential `{}`, which no [credentials.{}] section defines",
                            t.name, u.name, u.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The secret masker built from `[content]`; a bad rule names its key.
    pub fn redactor(&self) -> Result<Redactor, ConfigError> {
        let c = &self.content;
        let mut rules = Vec::with_capacity(c.secret_rules.len());
        for (i, r) in c.secret_rules.iter().enumerate() {
            let key = format!("content.secret_rules[{i}]");
            if r.name.is_empty()
                || r.name.len() > 64
                || !r
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                return Err(invalid(
                    format!("{key}.name"),
                    "must be 1-64 characters of letters, digits, `_-.`",
                ));
            }
            // Compile alone first so the error names this rule's key.
            Redactor::new(
                &[],
                &[ExtraRule {
                    name: r.name.clone(),
                    pattern: r.pattern.clone(),
                }],
            )
            .map_err(|e| invalid(format!("{key}.pattern"), e.to_string()))?;
            if regex::Regex::new(&r.pattern).is_ok_and(|re| re.is_match("")) {
                return Err(invalid(
                    format!("{key}.pattern"),
                    "matches the empty string, so it would mask nothing useful",
                ));
            }
            rules.push(ExtraRule {
                name: r.name.clone(),
                pattern: r.pattern.clone(),
            });
        }
        Redactor::new(&c.extra_secret_keys, &rules)
            .map_err(|e| invalid("content.secret_rules", e.to_string()))
    }

    /// The flag kinds that send a call to `tool` to a human.
    pub fn ask_on_flags(&self, tool: &str) -> &FlagSelection {
        self.tools
            .iter()
            .find(|t| t.name == tool)
            .and_then(|t| t.ask_on_flags.as_ref())
            .unwrap_or(&self.content.ask_on_flags)
    }

    /// Where flagged calls do not all go to a human: one line per setting
    /// that leaves kinds out, for the start-up log (never silent).
    pub fn flag_ask_exemptions(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.content.ask_on_flags != FlagSelection::All {
            out.push(format!(
                "content.ask_on_flags = {} (other flag kinds do not ask a human by themselves)",
                self.content.ask_on_flags.describe()
            ));
        }
        for t in &self.tools {
            if let Some(sel) = &t.ask_on_flags {
                if *sel != FlagSelection::All {
                    out.push(format!(
                        "tool `{}`: ask_on_flags = {} (other flag kinds do not ask a human by themselves)",
                        t.name,
                        sel.describe()
                    ));
                }
            }
        }
        out
    }

    /// Tags of a configured tool (none for tools not in the config).
    pub fn tool_tags(&self, tool: &str) -> &[ToolTag] {
        self.tools
            .iter()
            .find(|t| t.name == tool)
            .map(|t| t.tags.as_slice())
            .unwrap_or(&[])
    }

    fn validate_discord(&self) -> Result<(), ConfigError> {
        let d = &self.discord;
        if d.token.0.is_empty() {
            return Ok(());
        }
        if d.guild_id.is_none() {
            return Err(invalid(
                "discord.guild_id",
                "is required when a bot token is set",
            ));
        }
        if d.approvals_channel_id.is_none() {
            return Err(invalid(
                "discord.approvals_channel_id",
                "is required when a bot token is set",
            ));
        }
        if d.approver_role_id.is_none() {
            return Err(invalid(
                "discord.approver_role_id",
                "is required when a bot token is set (nobody could approve)",
            ));
        }
        if d.admin_role_id.is_none() {
            return Err(invalid(
                "discord.admin_role_id",
                "is required when a bot token is set (nobody could approve critical requests)",
            ));
        }
        if let Some(Dur(p)) = d.max_retry_pause {
            if p.is_zero() || p > Duration::from_secs(60) {
                return Err(invalid(
                    "discord.max_retry_pause",
                    "must be between 1ms and 60s",
                ));
            }
        }
        if let Some(Dur(p)) = d.start_timeout {
            if p.is_zero() || p > Duration::from_secs(60) {
                return Err(invalid(
                    "discord.start_timeout",
                    "must be between 1ms and 60s",
                ));
            }
        }
        if let Some(base) = &d.api_base {
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                return Err(invalid(
                    "discord.api_base",
                    "must start with http:// or https://",
                ));
            }
        }
        Ok(())
    }

    /// The agent socket's file mode as a number.
    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        parse_mode("server.socket_mode", &self.server.socket_mode)
    }

    /// The admin socket's file mode as a number.
    pub fn admin_socket_mode(&self) -> Result<u32, ConfigError> {
        parse_mode("admin.socket_mode", &self.admin.socket_mode)
    }

    /// The admin uids, with empty meaning the server's own uid.
    pub fn admin_uids(&self, server_uid: u32) -> Vec<u32> {
        if self.admin.uids.is_empty() {
            vec![server_uid]
        } else {
            self.admin.uids.clone()
        }
    }

    /// The uids an agent may connect from, with empty meaning the server's uid.
    pub fn agent_uids(a: &AgentConfig, server_uid: u32) -> Vec<u32> {
        if a.uids.is_empty() {
            vec![server_uid]
        } else {
            a.uids.clone()
        }
    }

    /// The checks that depend on the uid the server runs as, made by
    /// `check-config` and `serve` (not by clients, which run as other uids).
    ///
    /// Unless `[admin] single_user_demo` is set: no agent may run as the
    /// server's uid (it could read and write the database, and reach the
    /// admin socket) or as an admin uid (it could approve its own calls),
    /// and agents sharing a uid must each have a token (otherwise each could
    /// claim the others' names and `agent:NAME` grants).
    pub fn check_uids(&self, server_uid: u32) -> Result<(), ConfigError> {
        if self.admin.single_user_demo {
            return Ok(());
        }
        const HOW: &str = "run agents as their own users (see docs/deploy.md), or set [admin] single_user_demo = true for a single-user demo";
        let admins = self.admin_uids(server_uid);
        let mut by_uid: std::collections::BTreeMap<u32, Vec<(usize, &AgentConfig)>> =
            Default::default();
        for (i, a) in self.agents.iter().enumerate() {
            let uids = Self::agent_uids(a, server_uid);
            let key = format!("agents[{i}].uids");
            let shown = if a.uids.is_empty() {
                "empty, which means the server's own uid".to_string()
            } else {
                format!("{:?}", a.uids)
            };
            if uids.contains(&server_uid) {
                return Err(invalid(
                    key,
                    format!(
                        "agent `{}` would run as uid {server_uid}, the uid Keyturn runs as (uids: {shown}); such an agent can read and write the database directly; {HOW}",
                        a.name
                    ),
                ));
            }
            if let Some(u) = uids.iter().find(|u| admins.contains(u)) {
                return Err(invalid(
                    key,
                    format!(
                        "agent `{}` may connect from uid {u}, which is an admin uid (admin.uids); it could approve its own calls; {HOW}",
                        a.name
                    ),
                ));
            }
            for u in uids {
                by_uid.entry(u).or_default().push((i, a));
            }
        }
        for (uid, agents) in by_uid {
            if agents.len() < 2 {
                continue;
            }
            if let Some((i, a)) = agents.iter().find(|(_, a)| a.token.0.is_empty()) {
                let names: Vec<&str> = agents.iter().map(|(_, a)| a.name.as_str()).collect();
                return Err(invalid(
                    format!("agents[{i}].token"),
                    format!(
                        "agents {} share uid {uid}, and `{}` has no token, so any of them could claim its name and its agent:{} grants; give each agent sharing a uid a token (or {}), or run each as its own uid",
                        names.join(", "),
                        a.name,
                        a.name,
                        agent_token_env(&a.name)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Grants written in the config file.
    pub fn config_grants(&self) -> Result<Vec<Grant>, ConfigError> {
        self.grants
            .iter()
            .enumerate()
            .map(|(i, g)| {
                Ok(Grant {
                    scope: g
                        .scope
                        .parse()
                        .map_err(|m: String| invalid(format!("grants[{i}].scope"), m))?,
                    tool: g
                        .tool
                        .parse::<ToolPattern>()
                        .map_err(|m| invalid(format!("grants[{i}].tool"), m))?,
                    effect: g.effect,
                    source: "config".into(),
                })
            })
            .collect()
    }

    pub fn policy_settings(&self) -> PolicySettings {
        PolicySettings {
            autonomy: self.policy.autonomy,
            channel_autonomy: self.policy.channel_autonomy.clone(),
            agent_rate: self.limits.agent_rate,
            user_rate: self.limits.user_rate,
            task_max_steps: self.limits.task_max_steps,
            task_max_cost: self.limits.task_max_cost,
            approvals_high: self.risk.high.approvals,
            approvals_critical: self.risk.critical.approvals,
        }
    }

    /// Default wait for a risk level (only high and critical wait).
    pub fn timeout_for(&self, risk: Risk) -> Duration {
        match risk {
            Risk::Critical => self.risk.critical.timeout.0,
            _ => self.risk.high.timeout.0,
        }
    }

    pub fn agent(&self, name: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// Whether the bot should run.
    pub fn discord_enabled(&self) -> bool {
        !self.discord.token.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_duration_syntax_for_flags_and_keys() {
        for (text, secs) in [
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("90", 90),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
            assert_eq!(
                Dur::try_from(text.to_string()).map(|d| d.0),
                Ok(Duration::from_secs(secs))
            );
        }
        let e = parse_duration("5 parsecs").unwrap_err();
        assert!(e.contains("`90s`, `5m`, `1h`"), "{e}");
    }

    fn parse_ok(text: &str) -> Config {
        let c = Config::parse(text).unwrap();
        c.validate().unwrap();
        c
    }

    fn err(text: &str) -> String {
        match Config::parse(text) {
            Err(e) => e,
            Ok(c) => c.validate().unwrap_err().to_string(),
        }
    }

    #[test]
    fn empty_config_is_valid_with_defaults() {
        let c = parse_ok("");
        assert_eq!(c.server.socket_mode, "0600");
        assert_eq!(c.risk.high.timeout.0, Duration::from_secs(300));
        assert_eq!(c.risk.critical.timeout.0, Duration::from_secs(900));
    }

    #[test]
    fn a_critical_section_without_a_timeout_keeps_the_critical_default() {
        let c = parse_ok("[risk.critical]\napprovals = 2");
        assert_eq!(c.risk.critical.timeout.0, Duration::from_secs(900));
        assert_eq!(c.risk.critical.approvals, 2);
        let c = parse_ok("[risk.critical]\ntimeout = \"2m\"");
        assert_eq!(c.risk.critical.timeout.0, Duration::from_secs(120));
        assert_eq!(c.risk.critical.approvals, 1);
        assert!(err("[risk.critical]\ncolour = 1").contains("unknown field `colour`"));
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let text = include_str!("../config.example.toml");
        let c = parse_ok(text);
        assert!(c.agents.iter().any(|a| a.name == "cli"));
        // The quick start runs everything as one uid: only the demo switch allows it.
        assert!(c.admin.single_user_demo);
        c.check_uids(nix::unistd::getuid().as_raw()).unwrap();
        assert!(c.users.iter().any(|u| u.id == "42"));
        assert!(!c.content.raise_risk_on_flags && c.content.deny_on_flags.is_empty());
        let grants = c.config_grants().unwrap();
        assert!(grants
            .iter()
            .any(|g| g.scope.to_string() == "channel:7" && g.tool.as_str() == "delete_file"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(err("[server]\nsocket = \"x\"").contains("unknown field `socket`"));
        assert!(err("colour = 1").contains("unknown field"));
    }

    #[test]
    fn connection_limits_name_the_key() {
        assert!(err("[server]\nidle_timeout = \"10ms\"").contains("server.idle_timeout"));
        assert!(err("[server]\nshutdown_drain = \"1h\"").contains("server.shutdown_drain"));
        assert!(
            err("[server]\nmax_connections_per_uid = 0").contains("server.max_connections_per_uid")
        );
        // A line of the longest size must fit in a connection's budget,
        // and one connection's budget in the socket's.
        assert!(err("[server]\nmax_inflight_bytes_per_connection = 1000")
            .contains("server.max_inflight_bytes_per_connection"));
        assert!(err("[server]\nmax_inflight_bytes = 300000").contains("server.max_inflight_bytes"));
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.shutdown_drain.0, Duration::from_secs(5));
        assert_eq!(c.server.idle_timeout.0, Duration::from_secs(300));
    }

    #[test]
    fn the_store_recheck_is_positive() {
        assert!(err("[store]\nrecheck = \"0s\"").contains("store.recheck"));
        assert_eq!(
            Config::parse("").unwrap().store.recheck.0,
            Duration::from_secs(1)
        );
        let c = Config::parse("[store]\nrecheck = \"250ms\"").unwrap();
        assert_eq!(c.store.recheck.0, Duration::from_millis(250));
    }

    #[test]
    fn bad_values_name_the_key() {
        assert!(err("[server]\nsocket_mode = \"0666\"").contains("server.socket_mode"));
        assert!(err("[server]\nsocket_mode = \"0660\"").contains("server.socket_group"));
        assert!(err("[server]\nsocket_mode = \"rw\"").contains("server.socket_mode"));
        assert!(err("[risk.high]\napprovals = 0").contains("risk.high.approvals"));
        assert!(err("[risk.high]\ntimeout = \"soon\"").contains("not a duration"));
        assert!(err("[risk]\nmax_timeout = \"1m\"").contains("risk.high.timeout"));
        assert!(err("[limits]\nagent_rate = \"fast\"").contains("not a rate"));
        assert!(err("[[grants]]\nscope = \"planet:1\"\ntool = \"x\"").contains("grants[0].scope"));
        assert!(err("[[grants]]\nscope = \"global\"\ntool = \"rm -rf\"").contains("grants[0].tool"));
        assert!(err("[[tools]]\nname = \"x\"\nrisk = \"extreme\"").contains("unknown risk level"));
        assert!(
            err("[[agents]]\nname = \"a\"\n[[agents]]\nname = \"a\"").contains("agents[1].name")
        );
        assert!(err("[store]\nurl = \"mysql://x\"").contains("store.url"));
        assert!(err("[discord]\ntoken = \"t\"").contains("discord.guild_id"));
        assert!(err("[content]\ncolour = 1").contains("unknown field `colour`"));
        assert!(
            err("[[content.secret_rules]]\nname = \"x\"\npattern = \"(unclosed\"")
                .contains("content.secret_rules[0].pattern")
        );
        assert!(
            err("[[content.secret_rules]]\nname = \"x\"\npattern = \"a*\"")
                .contains("content.secret_rules[0].pattern")
        );
        assert!(
            err("[[content.secret_rules]]\nname = \"bad name\"\npattern = \"a\"")
                .contains("content.secret_rules[0].name")
        );
        assert!(err("[content]\ndeny_on_flags = [\"rudeness\"]").contains("unknown variant"));
        assert!(err("[content]\nask_on_flags = [\"rudeness\"]").contains("unknown variant"));
        assert!(err("[content]\nask_on_flags = \"some\"").contains("expected \"all\""));
        assert!(err("[content]\ntrifecta_window = \"0s\"").contains("content.trifecta_window"));
        assert!(
            err("[[tools]]\nname = \"x\"\nrisk = \"low\"\ntags = [\"evil\"]")
                .contains("unknown variant")
        );
    }

    #[test]
    fn flagged_calls_ask_a_human_unless_a_tool_opts_out_loudly() {
        let c = parse_ok("");
        assert_eq!(c.content.ask_on_flags, FlagSelection::All);
        assert_eq!(c.content.trifecta_window.0, Duration::from_secs(86_400));
        assert!(c.ask_on_flags("x").contains(FlagKind::Homoglyph));
        assert!(c.flag_ask_exemptions().is_empty());
        let c = parse_ok(
            "[content]\nask_on_flags = [\"homoglyph\"]\n\
             [[tools]]\nname = \"quiet\"\nrisk = \"low\"\nask_on_flags = []\n\
             [[tools]]\nname = \"loud\"\nrisk = \"low\"\nask_on_flags = \"all\"",
        );
        assert!(c.ask_on_flags("other").contains(FlagKind::Homoglyph));
        assert!(!c.ask_on_flags("other").contains(FlagKind::Exfiltration));
        assert!(!c.ask_on_flags("quiet").contains(FlagKind::Homoglyph));
        assert!(c.ask_on_flags("loud").contains(FlagKind::Exfiltration));
        let ex = c.flag_ask_exemptions();
        assert_eq!(ex.len(), 2, "{ex:?}");
        assert!(
            ex[1].contains("`quiet`") && ex[1].contains("none"),
            "{ex:?}"
        );
    }

    #[test]
    fn content_rules_extend_the_redactor() {
        let c = parse_ok(
            "[content]\nextra_secret_keys = [\"x-internal\"]\n\
             [[content.secret_rules]]\nname = \"acme\"\npattern = \"ACME-[0-9]{8}\"",
        );
        let r = c.redactor().unwrap();
        let (t, f) = r.redact_text("id ACME-12345678 here");
        assert!(!t.contains("ACME-12345678") && f[0].kind == "acme", "{t}");
        let v = r.redact_value(&serde_json::json!({"X_Internal": "plain"}));
        assert!(!v.value.to_string().contains("plain"));
    }

    #[test]
    fn env_secrets_override_the_file_and_debug_hides_them() {
        let mut c =
            Config::parse("[[agents]]\nname = \"my-agent\"\ntoken = \"filetoken\"").unwrap();
        c.apply_env(|k| (k == "KEYTURN_AGENT_MY_AGENT_TOKEN").then(|| "envtoken".to_string()));
        assert_eq!(c.agents[0].token.0, "envtoken");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("envtoken") && !dbg.contains("filetoken"));
        c.apply_env(|k| (k == ENV_DISCORD_TOKEN).then(|| "bot".to_string()));
        assert_eq!(c.discord.token.0, "bot");
    }

    #[test]
    fn agents_may_not_run_as_the_server_or_an_admin_without_the_demo_switch() {
        // Empty agent uids mean the server's uid: refused, naming the agent.
        let e = parse_ok("[[agents]]\nname = \"a\"")
            .check_uids(1000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agents[0].uids") && e.contains("`a`") && e.contains("uid 1000"),
            "{e}"
        );
        assert!(e.contains("single_user_demo"), "{e}");
        // An agent uid that is the server's uid, written out.
        let e = parse_ok("[[agents]]\nname = \"a\"\nuids = [1000]")
            .check_uids(1000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("uid 1000"), "{e}");
        // An agent uid that is an admin uid.
        let e = parse_ok("[admin]\nuids = [1001]\n[[agents]]\nname = \"a\"\nuids = [1001]")
            .check_uids(1000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin uid") && e.contains("1001"), "{e}");
        // Empty admin.uids means the server's uid; an agent on its own uid is fine.
        parse_ok("[[agents]]\nname = \"a\"\nuids = [2000]")
            .check_uids(1000)
            .unwrap();
        parse_ok("[admin]\nuids = [1001]\n[[agents]]\nname = \"a\"\nuids = [2000]")
            .check_uids(1000)
            .unwrap();
        // The switch allows it.
        parse_ok("[admin]\nsingle_user_demo = true\n[[agents]]\nname = \"a\"")
            .check_uids(1000)
            .unwrap();
    }

    #[test]
    fn agents_sharing_a_uid_each_need_a_token() {
        let two = "[[agents]]\nname = \"a\"\nuids = [2000]\n[[agents]]\nname = \"b\"\nuids = [2000, 2001]\n";
        let e = parse_ok(two).check_uids(1000).unwrap_err().to_string();
        assert!(
            e.contains("agents[0].token") && e.contains("share uid 2000"),
            "{e}"
        );
        assert!(e.contains("KEYTURN_AGENT_A_TOKEN"), "{e}");
        // One token is not enough: the other name can still be claimed.
        let one = two.replacen("uids = [2000]\n", "uids = [2000]\ntoken = \"t\"\n", 1);
        let e = parse_ok(&one).check_uids(1000).unwrap_err().to_string();
        assert!(e.contains("agents[1].token"), "{e}");
        // Both: fine; a token from the environment counts.
        let mut c = parse_ok(&one);
        c.apply_env(|k| (k == "KEYTURN_AGENT_B_TOKEN").then(|| "u".to_string()));
        c.check_uids(1000).unwrap();
        // Different uids need no tokens.
        parse_ok(
            "[[agents]]\nname = \"a\"\nuids = [2000]\n[[agents]]\nname = \"b\"\nuids = [2001]",
        )
        .check_uids(1000)
        .unwrap();
    }

    #[test]
    fn the_admin_socket_is_validated_like_the_agent_socket() {
        assert_eq!(
            parse_ok("").admin.socket_path,
            PathBuf::from("keyturn-admin.sock")
        );
        assert!(err("[admin]\nsocket_mode = \"0666\"").contains("admin.socket_mode"));
        assert!(err("[admin]\nsocket_mode = \"0660\"").contains("admin.socket_group"));
        parse_ok("[admin]\nsocket_mode = \"0660\"\nsocket_group = \"admins\"");
        assert!(err("[admin]\nsocket_path = \"keyturn.sock\"").contains("admin.socket_path"));
        assert!(err("[admin]\nsocket_path = \"\"").contains("admin.socket_path"));
    }

    #[test]
    fn the_store_path_comes_from_the_url() {
        let mut c = Config::default();
        assert_eq!(c.store_path(), Some(PathBuf::from("keyturn.db")));
        c.store.url = "sqlite:///var/lib/k.db?mode=rwc".into();
        assert_eq!(c.store_path(), Some(PathBuf::from("/var/lib/k.db")));
        c.store.url = "sqlite://:memory:".into();
        assert_eq!(c.store_path(), None);
    }

    #[test]
    fn the_admin_socket_may_not_sit_on_the_database() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        let db = d.path().join("k.db");
        c.store.url = format!("sqlite://{}", db.display());
        c.server.socket_path = d.path().join("k.sock");
        c.admin.socket_path = db.clone();
        let e = c
            .check_socket_paths(&d.path().join("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin.socket_path") && e.contains("database"),
            "{e}"
        );
        c.admin.socket_path = d.path().join("admin.sock");
        c.check_socket_paths(&d.path().join("c.toml")).unwrap();
    }

    #[test]
    fn a_socket_may_not_share_a_path_with_another_file_or_socket() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.sock");
        let taken = vec![("the socket server.socket_path".to_string(), a.clone())];
        let e = check_socket_path("admin.socket_path", &a, &taken).unwrap_err();
        assert!(e.to_string().contains("admin.socket_path"), "{e}");
        assert!(e.to_string().contains("server.socket_path"), "{e}");
        // Spelled differently, the same file.
        std::fs::create_dir(d.path().join("x")).unwrap();
        let b = d.path().join("x/../a.sock");
        assert!(check_socket_path("admin.socket_path", &b, &taken).is_err());
        let c = d.path().join("c.sock");
        assert!(check_socket_path("admin.socket_path", &c, &taken).is_ok());
    }

    #[test]
    fn tokens_written_in_the_file_are_noted_even_when_the_env_overrides_them() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(&f, "[[agents]]\nname = \"a\"\ntoken = \"t\"\n").unwrap();
        let c = Config::load(&f).unwrap();
        assert_eq!(c.secrets_in_file, vec!["agents[0].token".to_string()]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o604)).unwrap();
        let e = c.check_file_permissions(&f).unwrap_err().to_string();
        assert!(
            e.contains("0604") && e.contains("KEYTURN_AGENT_A_TOKEN"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(c.check_file_permissions(&f).unwrap().is_none());
        std::fs::write(&f, "[[agents]]\nname = \"a\"\n").unwrap();
        assert!(Config::load(&f).unwrap().secrets_in_file.is_empty());
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut c =
            Config::parse("[store]\nurl = \"sqlite://k.db\"\n[server]\nsocket_path = \"k.sock\"")
                .unwrap();
        c.resolve_paths(Path::new("/etc/keyturn"));
        assert_eq!(c.store.url, "sqlite:///etc/keyturn/k.db");
        assert_eq!(
            c.admin.socket_path,
            PathBuf::from("/etc/keyturn/keyturn-admin.sock")
        );
        assert_eq!(c.server.socket_path, PathBuf::from("/etc/keyturn/k.sock"));
    }

    #[test]
    fn the_commented_credentials_example_parses_and_validates() {
        let text = include_str!("../config.example.toml");
        let block: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [credentials."))
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        let c = parse_ok(&block);
        assert_eq!(c.credentials.len(), 2, "{block}");
        assert_eq!(c.credentials["kube"].sources().len(), 2);
        let run = c.tools[0].run.as_ref().unwrap();
        assert_eq!(run.credentials[0].name, "kube");
    }

    #[test]
    fn credentials_inline_and_profiles_parse_with_their_names() {
        let c = parse_ok(
            r#"
            [credentials.gh]
            env = "GH_TOKEN"

            [credentials.kube]
            fail_after = 2
            fail_exit_codes = [1]
            fail_pattern = "Unauthorized|401"
            retry_after = "10m"
            profiles = [
              { name = "primary", file = "/etc/keyturn/kube-a" },
              { command = ["pass", "show", "kube/b"] },
            ]
            "#,
        );
        let gh = &c.credentials["gh"];
        assert_eq!(gh.fail_after, 3);
        assert_eq!(gh.sources()[0].0, "default");
        let kube = &c.credentials["kube"];
        let names: Vec<String> = kube.sources().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["primary", "profile2"]);
        assert_eq!(
            kube.retry_after.as_ref().map(|d| d.0),
            Some(Duration::from_secs(600))
        );
    }

    #[test]
    fn credential_sources_name_the_key() {
        let e = err("[credentials.gh]\nenv = \"A\"\nfile = \"/x\"");
        assert!(
            e.contains("`credentials.gh`") && e.contains("exactly one"),
            "{e}"
        );
        let e = err("[credentials.gh]\nfail_after = 2");
        assert!(
            e.contains("`credentials.gh`") && e.contains("no source"),
            "{e}"
        );
        let e = err("[credentials.gh]\nenv = \"A\"\nprofiles = [{ env = \"B\" }]");
        assert!(e.contains("both an inline source"), "{e}");
        let e = err("[credentials.gh]\nprofiles = [{ env = \"B\" }, { name = \"x\" }]");
        assert!(e.contains("credentials.gh.profiles[1]"), "{e}");
        let e = err(
            "[credentials.gh]\nprofiles = [{ name = \"a\", env = \"A\" }, { name = \"a\", env = \"B\" }]",
        );
        assert!(
            e.contains("credentials.gh.profiles[1].name") && e.contains("twice"),
            "{e}"
        );
        let e = err(
            "[credentials.gh]\nprofiles = [{ env = \"A\" }, { name = \"profile1\", env = \"B\" }]",
        );
        assert!(e.contains("twice"), "{e}");
        let e = err("[credentials.gh]\nenv = \"A\"\nfail_after = 0");
        assert!(e.contains("credentials.gh.fail_after"), "{e}");
        let e = err("[credentials.gh]\nenv = \"A\"\nfail_pattern = \"(\"");
        assert!(e.contains("credentials.gh.fail_pattern"), "{e}");
        let e = err("[credentials.gh]\nenv = \"A\"\nfail_pattern = \"x*\"");
        assert!(e.contains("empty string"), "{e}");
        let e = err("[credentials.gh]\ncommand = []");
        assert!(e.contains("credentials.gh.command"), "{e}");
        let e = err("[credentials.gh]\ncommand = [\"\"]");
        assert!(e.contains("credentials.gh.command"), "{e}");
        let e = err("[credentials.gh]\nfile = \"relative/token\"");
        assert!(
            e.contains("credentials.gh.file") && e.contains("absolute"),
            "{e}"
        );
        let e = err("[credentials.gh]\nenv = \"A\"\nretry_after = \"0s\"");
        assert!(e.contains("credentials.gh.retry_after"), "{e}");
        let e = err("[credentials.\"a b\"]\nenv = \"A\"");
        assert!(e.contains("credentials.a b"), "{e}");
        let e = err("[credentials.gh]\nenv = \"A\"\ncolour = 1");
        assert!(e.contains("unknown field") || e.contains("colour"), "{e}");
    }

    #[test]
    fn tools_must_name_defined_credentials_and_valid_run_specs() {
        let tool = |creds: &str, argv: &str| {
            format!(
                "[credentials.kube]\nfile = \"/etc/kube\"\n\n[[tools]]\nname = \"kubectl_get\"\nrisk = \"low\"\n[tools.run]\nargv = {argv}\ncredentials = {creds}\n"
            )
        };
        parse_ok(&tool(
            r#"[{ name = "kube", file = "/tmp/kube/config", path_env = "KUBECONFIG" }]"#,
            r#"["kubectl", "get", "pods"]"#,
        ));
        let e = err(&tool(
            r#"[{ name = "gh", env = "GH_TOKEN" }]"#,
            r#"["gh", "api"]"#,
        ));
        assert!(
            e.contains("tools.kubectl_get.run.credentials[0].name") && e.contains("`gh`"),
            "{e}"
        );
        let e = err(&tool("[]", "[]"));
        assert!(
            e.contains("`tools.kubectl_get.run`") && e.contains("argv"),
            "{e}"
        );
    }

    #[test]
    fn escalation_steps_are_validated_at_load_naming_the_key() {
        let ok = Config::parse(
            "[risk.high]\ntimeout = \"5m\"\n\
             [[risk.high.escalation]]\nafter = \"3m\"\naction = \"reping\"\n\
             [[risk.high.escalation]]\nbefore_deadline = \"1m\"\naction = \"last_warning\"\n\
             [risk.critical]\ntimeout = \"15m\"\n\
             [[risk.critical.escalation]]\nafter = \"6m\"\naction = \"dm\"\nusers = [\"111\"]\n",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.risk.high.escalation.len(), 2);
        let e = err("[[risk.high.escalation]]\nafter = \"5m\"\naction = \"reping\"");
        assert!(e.contains("risk.high.escalation[0].after"), "{e}");
        let e = err(
            "[[risk.critical.escalation]]\nafter = \"1m\"\naction = \"ping_role\"\nrole = \"@ops\"",
        );
        assert!(e.contains("risk.critical.escalation[0].role"), "{e}");
        let e = err("[[risk.high.escalation]]\nafter = \"1m\"\nbefore_deadline = \"1m\"\naction = \"reping\"");
        assert!(
            e.contains("risk.high.escalation[0]") && e.contains("exactly one"),
            "{e}"
        );
        let e = err("[[risk.high.escalation]]\nafter = \"1m\"\naction = \"reping\"\nwhen = 1");
        assert!(e.contains("unknown field"), "{e}");
    }
}
