//! The command line: `serve` runs the daemon; every other subcommand is a
//! client of one of its sockets: agent subcommands (request, check, exec,
//! hook, mcp-proxy, verify, health) use the agent socket, admin subcommands
//! (approve, deny, pending, stats, grant, tools, pairing, audit, status, cancel,
//! agent)
//! the admin socket. Human-readable output by default, `--json` everywhere.

use crate::config::Config;
use crate::ipc::answers::{
    AuditAnswer, ChainAnswer, ChangedAnswer, CheckAnswer, EffectiveAnswer, FlagAnswer,
    HealthAnswer, PairedAnswer, PairingCodeIssued, PairingsAnswer, PendingAnswer, PruneAnswer,
    TokenAnswer, TokenIssued, ToolRiskAnswer, ToolsAnswer, VerifyAnswer, VoteAnswer,
};
use crate::ipc::client::Client;
use crate::ipc::protocol::DecisionView;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "keyturn",
    version,
    about = "Human-in-the-loop approval gateway for AI agents"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Conn {
    /// Config file (used to find the sockets).
    #[arg(long, global = true, env = "KEYTURN_CONFIG")]
    config: Option<PathBuf>,
    /// Agent socket path (overrides the config). Default: ./keyturn.sock
    #[arg(long, global = true, env = "KEYTURN_SOCKET")]
    socket: Option<PathBuf>,
    /// Admin socket path, for admin subcommands (overrides the config).
    /// Default: ./keyturn-admin.sock
    #[arg(long, global = true, env = "KEYTURN_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Agent subcommands: reach Keyturn over TCP instead of the agent
    /// socket: keyturn+tls://HOST:PORT (or keyturn+tcp://127.0.0.1:PORT on
    /// this host), authenticated with the bearer token in KEYTURN_TOKEN.
    /// Admin subcommands always use the admin socket.
    #[arg(long, global = true, env = "KEYTURN_URL")]
    url: Option<String>,
    /// The variable holding the bearer token for --url (default KEYTURN_TOKEN).
    #[arg(long, global = true, value_name = "NAME")]
    token_env: Option<String>,
    /// CA certificate (PEM) to trust for keyturn+tls:// (self-signed
    /// deployments); default: KEYTURN_CA, else the public web roots.
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct CallArgs {
    /// Tool name, e.g. delete_file.
    #[arg(long)]
    tool: String,
    /// Arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    args: String,
    /// On whose behalf (user id).
    #[arg(long)]
    user: Option<String>,
    /// Channel id the request comes from.
    #[arg(long)]
    channel: Option<String>,
    /// Why the agent wants to run it, shown to the approver.
    #[arg(long, default_value = "")]
    justification: String,
    /// Task id: step limit and cost budget are counted per task.
    #[arg(long)]
    task: Option<String>,
    /// Cost of the call, counted against the task budget.
    #[arg(long, default_value_t = 0.0)]
    cost: f64,
    /// How sure the agent is of this call, 0 to 1: below the configured
    /// min_confidence an allowed call asks a human.
    #[arg(long)]
    confidence: Option<f64>,
    /// Agent name.
    #[arg(long, env = "KEYTURN_AGENT", default_value = "cli")]
    agent: String,
    /// Agent token, if the agent has one.
    #[arg(long, env = "KEYTURN_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (see config.example.toml).
        #[arg(long, env = "KEYTURN_CONFIG")]
        config: PathBuf,
    },
    /// Create the database deliberately (never over an existing one).
    /// `serve` creates it on its own only where no database ever was.
    Init {
        /// Config file naming the database to create.
        #[arg(long, env = "KEYTURN_CONFIG")]
        config: PathBuf,
    },
    /// The database itself (admin, on the server's machine).
    #[command(subcommand)]
    Db(DbCmd),
    /// Validate a config file without starting.
    CheckConfig {
        /// Config file to check.
        #[arg(long, env = "KEYTURN_CONFIG")]
        config: PathBuf,
    },
    /// Submit a tool call and wait for the decision (exit 0 approved, 1 denied or timed out, 2 error).
    Request {
        #[command(flatten)]
        call: CallArgs,
        /// Retrying with the same key returns the same request.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Ask for another deadline than the risk level's (`90s`, `5m`, `1h`;
        /// never beyond risk.max_timeout).
        #[arg(long, value_parser = crate::config::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Return at once with the request id instead of waiting; the
        /// request stays pending after this command exits (`detach`).
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Have Keyturn run a tool it runs itself (a tool with a `run` section):
    /// submit, wait for the decision, then Keyturn runs exactly the approved
    /// argv in its sandbox. Prints the run's stdout and stderr; exits with
    /// its exit code (1 denied, 2 error, 124 timed out, 137 killed, 126 not
    /// started).
    Run {
        #[command(flatten)]
        call: CallArgs,
        /// Retrying with the same key returns the same request (which runs once).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Ask for another deadline than the risk level's (`90s`, `5m`).
        #[arg(long, value_parser = crate::config::parse_duration)]
        timeout: Option<std::time::Duration>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The process registry: runs going now, and recent ones (admin).
    Ps {
        /// Also list runs that ended.
        #[arg(long, short)]
        all: bool,
        /// Most runs to list.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Kill a run: SIGTERM to its whole process group, then SIGKILL (admin).
    Kill {
        /// Run id (from `keyturn ps`).
        id: String,
        /// Your name, for the audit log. Default: $USER.
        #[arg(long = "as")]
        operator: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Brokered credentials: which auth profile is active (names only) (admin).
    Credentials {
        #[command(subcommand)]
        cmd: CredentialsCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// What the policy would do with a call, without queueing it.
    Check {
        #[command(flatten)]
        call: CallArgs,
        #[command(flatten)]
        conn: Conn,
    },
    /// Wait for a request's decision (agents resume with this after reconnecting).
    /// As an agent, leaving (Ctrl-C, kill) cancels the request unless --detach.
    Wait {
        /// Request id.
        id: String,
        /// Agent that made the request (admins may leave it out).
        #[arg(long, env = "KEYTURN_AGENT")]
        agent: Option<String>,
        /// Leave the request pending if this command is interrupted.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Is the server healthy? Asks over the agent socket (the admin socket
    /// with --admin-socket, which also says why a component is down).
    /// Exit 0 when the socket, the store and (if configured) Discord are
    /// up, 1 when something is down (printed), 2 when the server cannot be
    /// reached or does not answer.
    Health {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a request.
    Status {
        /// Request id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a pending request.
    Cancel {
        /// Request id.
        id: String,
        /// Why, recorded with the cancellation.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Usage over a window (admin): calls by outcome, tool and agent, time
    /// to decision (p50/p90, nearest rank) overall and per approver,
    /// timeouts, calls approved per policy rule, the most denied tools.
    /// `--json` prints the whole report.
    Stats {
        /// How far back: a number and a unit (s, m, h, d, w), e.g. 24h or 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List pending requests (admin).
    Pending {
        /// Most requests to list.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Approve a pending request (admin).
    Approve {
        /// Request id (from `keyturn pending` or the waiting agent's stderr).
        id: String,
        /// Why, shown to the agent and in the audit log.
        #[arg(long)]
        reason: Option<String>,
        /// Your name, shown beside your uid, never instead of it (letters,
        /// digits, spaces and `_-.'`). Default: $USER.
        #[arg(long = "as")]
        operator: Option<String>,
        /// Also allow matching calls without asking for this long: `15m`,
        /// `1h`, `8h`, `2s`, … or `until_revoked` (adds a time-boxed grant).
        #[arg(long = "for")]
        for_: Option<String>,
        /// With `--for`: how far the grant reaches: `call` (this exact call,
        /// the default), `agent-tool` (this tool for this agent) or
        /// `agent-tool-user` (… acting for this user).
        #[arg(long, requires = "for_")]
        scope: Option<String>,
        /// Approve with edited arguments: a JSON object as `keyturn pending
        /// --json` shows the request's `args` (masked), every mask kept
        /// where it is (the original secrets are put back). `-` reads stdin.
        #[arg(long, value_name = "FILE", conflicts_with = "for_")]
        args_file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Deny a pending request (admin).
    Deny {
        /// Request id.
        id: String,
        /// Why, shown to the agent and in the audit log.
        #[arg(long)]
        reason: Option<String>,
        /// Your name, shown beside your uid (as for approve). Default: $USER.
        #[arg(long = "as")]
        operator: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Allow a tool (or glob) in a scope: global, agent:NAME, role:ID, channel:ID, user:ID (admin).
    Grant {
        /// global, agent:NAME, role:ID, channel:ID or user:ID.
        #[arg(long)]
        scope: String,
        /// Tool name or glob such as `fs.*`.
        #[arg(long)]
        tool: String,
        /// Add a deny entry instead of an allow entry.
        #[arg(long)]
        deny: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a grant (admin): by scope and tool, or a time-boxed one by `--id`.
    Revoke {
        /// A time-boxed grant's id (`tg-…`, from `keyturn tools list`).
        #[arg(long, conflicts_with_all = ["scope", "tool", "deny"], required_unless_present_all = ["scope", "tool"])]
        id: Option<String>,
        /// The grant's scope, as given to `grant`.
        #[arg(long)]
        scope: Option<String>,
        /// The grant's tool or glob, as given to `grant`.
        #[arg(long)]
        tool: Option<String>,
        /// Remove a deny entry instead of an allow entry.
        #[arg(long)]
        deny: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Grants, risks and the effective allowlist (admin).
    Tools {
        #[command(subcommand)]
        cmd: Option<ToolsCmd>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Pairing of users (admin).
    Pairing {
        #[command(subcommand)]
        cmd: PairingCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// The kill switch: pause an agent (its calls are denied and its
    /// pending requests cancelled) or every agent, resume, list (admin).
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Anomaly alerts, newest first (admin).
    Alerts {
        /// At most this many (default 50, at most 1000).
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Agents' bearer tokens for connections over TCP (admin).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Measure throughput and latency against an in-process server.
    Bench {
        /// The store to measure (default: a SQLite file in a temp
        /// directory). A postgres:// URL runs in a schema of its own,
        /// dropped at the end.
        #[arg(long)]
        store: Option<String>,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Approval wake-up rounds.
        #[arg(long, default_value_t = 200)]
        wakeups: usize,
        /// Then create this many pending requests, restart, and time their expiry.
        #[arg(long, default_value_t = 0)]
        pending: usize,
        /// With a postgres:// store: also run this many replicas on it and
        /// measure the load spread over them, an agent's wake-up by an
        /// approval through another replica, and the leader's takeover.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// Then time this many runs of `/bin/true` each way: `run` in
        /// bubblewrap, `run` with the host profile, and `keyturn exec`.
        #[arg(long, default_value_t = 0)]
        runs: usize,
    },
    /// Check that arguments are exactly those a request was approved with
    /// (exit 0 when they match and it is approved, 1 otherwise).
    Verify {
        /// Request id.
        id: String,
        /// The arguments about to be executed, as a JSON object.
        #[arg(long)]
        args: String,
        /// Agent name (admins may leave it out).
        #[arg(long, env = "KEYTURN_AGENT")]
        agent: Option<String>,
        /// Agent token, if the agent has one.
        #[arg(long, env = "KEYTURN_AGENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The audit log (admin).
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Agent hooks: `keyturn hook claude-code` (see docs/integrations.md).
    #[command(subcommand)]
    Hook(crate::integrations::hook::HookCmd),
    /// Ask for approval, then run a command (its exit code; 126 when not approved).
    Exec(crate::integrations::exec::ExecArgs),
    /// Gate the tool calls of an MCP server that speaks stdio.
    McpProxy(crate::integrations::mcp_proxy::ProxyArgs),
    /// Print a shell completion script, e.g.
    /// `keyturn completions bash > /etc/bash_completion.d/keyturn`.
    Completions {
        /// The shell to write the completion script for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `keyturn man | man -l -`.
    Man,
}

#[derive(Subcommand)]
enum ToolsCmd {
    /// List grants and tool risks.
    List {
        /// Only this scope's grants.
        #[arg(long)]
        scope: Option<String>,
    },
    /// Which scope decides for a context, and why.
    Effective {
        /// User id of the context.
        #[arg(long)]
        user: Option<String>,
        /// Channel id of the context.
        #[arg(long)]
        channel: Option<String>,
        /// Role ids (default: the user's recorded roles).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Agent name of the context.
        #[arg(long, default_value = "cli")]
        agent: String,
        /// Tool to decide for.
        #[arg(long, default_value = "*")]
        tool: String,
    },
    /// Set a tool's risk (low, medium, high, critical) or `clear` the override.
    Risk {
        /// Tool name.
        tool: String,
        /// low, medium, high, critical or clear.
        level: String,
    },
}

#[derive(Subcommand)]
enum DbCmd {
    /// Full integrity check of the database (PRAGMA integrity_check) and a
    /// read of every pending request; read-only, safe while `serve` runs.
    /// Exit 0 when sound, 1 when damaged.
    Check {
        /// Config file naming the database.
        #[arg(long, env = "KEYTURN_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PairingCmd {
    /// Paired users and live codes.
    List,
    /// Issue a pairing code for a user (as if they had asked the bot).
    Request {
        /// User id to pair.
        #[arg(long)]
        user: String,
        /// Display name shown with the code.
        #[arg(long)]
        name: Option<String>,
    },
    /// Approve a pairing code.
    Approve {
        /// The code `pairing request` (or the bot) gave.
        code: String,
    },
    /// Pair a user directly.
    Add {
        /// User id to pair.
        user: String,
        /// Role ids the user has (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Revoke a user's pairing.
    Revoke {
        /// User id to unpair.
        user: String,
    },
}

#[derive(Subcommand)]
enum CredentialsCmd {
    /// Each credential, its active profile and the failures counted.
    Status,
    /// Put a credential's set-aside profiles back in use.
    Reset {
        /// The credential (`[credentials.NAME]`).
        name: String,
        /// Your name, for the audit log. Default: $USER.
        #[arg(long = "as")]
        operator: Option<String>,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Pause an agent: from its next call every call is denied
    /// (`agent_paused`), and its pending requests are cancelled.
    Pause {
        /// A configured agent.
        name: String,
        /// Why, shown with every denial and recorded in the audit log.
        #[arg(long)]
        reason: Option<String>,
        /// Your name, for the audit log. Default: $USER.
        #[arg(long = "as")]
        operator: Option<String>,
    },
    /// Lift an agent's pause.
    Resume {
        /// A configured agent.
        name: String,
        /// Your name, for the audit log. Default: $USER.
        #[arg(long = "as")]
        operator: Option<String>,
    },
    /// Pause every agent (the global switch).
    PauseAll {
        /// Why, shown with every denial and recorded in the audit log.
        #[arg(long)]
        reason: Option<String>,
        /// Your name, for the audit log. Default: $USER.
        #[arg(long = "as")]
        operator: Option<String>,
    },
    /// Lift the global pause (agents paused one by one stay paused).
    ResumeAll {
        /// Your name, for the audit log. Default: $USER.
        #[arg(long = "as")]
        operator: Option<String>,
    },
    /// Configured agents, and who paused which, since when and why.
    List,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue a token for a configured agent; it is printed once, here, and
    /// stored only hashed.
    Issue {
        /// The agent the token acts as.
        #[arg(long)]
        agent: String,
        /// Stop working after this long (`30d`, `12h`); default: never.
        #[arg(long, value_parser = crate::config::parse_duration)]
        expires: Option<std::time::Duration>,
    },
    /// Issue a new token for an agent; its other live tokens keep working
    /// for the overlap only.
    Rotate {
        /// The agent whose token is rotated.
        #[arg(long)]
        agent: String,
        /// How long the agent's other tokens keep working.
        #[arg(long, value_parser = crate::config::parse_duration, default_value = "1h")]
        overlap: std::time::Duration,
        /// The new token stops working after this long; default: never.
        #[arg(long, value_parser = crate::config::parse_duration)]
        expires: Option<std::time::Duration>,
    },
    /// Revoke a token at once: it is refused from now on, and connections
    /// using it are closed.
    Revoke {
        /// The token's id (from `keyturn token list`).
        id: String,
    },
    /// Every token: id, agent, created, expires, revoked (never a secret).
    List,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// The newest entries.
    Tail {
        /// How many entries.
        #[arg(short, long, default_value_t = 20)]
        n: u32,
    },
    /// Every entry as JSON Lines.
    Export {
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Walk the hash chain and report the first broken link.
    Verify {
        /// Verify an exported JSON Lines file offline instead of the live log.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Delete entries older than N days, leaving a checkpoint entry that keeps
    /// the chain verifiable (default N: audit.retention_days).
    Prune {
        /// Age in days (default: audit.retention_days).
        #[arg(long)]
        older_than_days: Option<u32>,
    },
}

/// Exit codes: 0 ok/approved, 1 denied/timed out, 2 error.
const EXIT_DENIED: u8 = 1;
const EXIT_ERROR: u8 = 2;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Hook and exec block on plain sockets: no runtime, no tracing set-up,
    // because the hook's start-up time is paid before every tool call.
    let cli = match cli.command {
        Command::Hook(cmd) => return ExitCode::from(crate::integrations::hook::main(cmd)),
        Command::Exec(a) => return ExitCode::from(crate::integrations::exec::main(a)),
        command => Cli { command },
    };
    // Printed without a runtime or a logger.
    match &cli.command {
        Command::Completions { shell } => {
            return ExitCode::from(print_completions(*shell));
        }
        Command::Man => return ExitCode::from(print_man()),
        _ => {}
    }
    // `serve` logs as its config says; a config that does not load is
    // reported by `serve` itself, with the default logger.
    let log = match &cli.command {
        Command::Serve { config } => Config::load(config).map(|c| c.log).unwrap_or_default(),
        _ => Default::default(),
    };
    let _log_guard = crate::logging::init(
        matches!(cli.command, Command::Serve { .. }),
        log.level.as_deref(),
        log.format,
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::errln!("keyturn: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            crate::errln!("keyturn: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Writes the completion script for `shell` to stdout.
fn print_completions(shell: clap_complete::Shell) -> u8 {
    use clap::CommandFactory;
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "keyturn", &mut buf);
    crate::logging::out(format_args!("{}", String::from_utf8_lossy(&buf)));
    0
}

/// Writes the man page (roff) to stdout.
fn print_man() -> u8 {
    use clap::CommandFactory;
    let mut buf = Vec::new();
    if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut buf) {
        crate::errln!("keyturn: cannot render the man page: {e}");
        return EXIT_ERROR;
    }
    crate::logging::out(format_args!("{}", String::from_utf8_lossy(&buf)));
    0
}

impl Conn {
    fn socket_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(c) = &self.config {
            let cfg = Config::load(c)?;
            return Ok(cfg.server.socket_path);
        }
        Ok(PathBuf::from("keyturn.sock"))
    }

    /// Where agent subcommands ask: `--url` when given, else the agent socket.
    fn endpoint(&self) -> anyhow::Result<crate::integrations::Endpoint> {
        use crate::integrations::Endpoint;
        match self.url.as_deref().filter(|u| !u.is_empty()) {
            Some(u) => Ok(Endpoint::Tcp(
                crate::ipc::tcp_endpoint::TcpTarget::from_env(
                    u,
                    self.token_env.as_deref(),
                    self.ca.as_deref(),
                )
                .map_err(anyhow::Error::msg)?,
            )),
            None => Ok(Endpoint::Socket(self.socket_path()?)),
        }
    }

    async fn client(&self) -> anyhow::Result<Client> {
        match self.endpoint()? {
            crate::integrations::Endpoint::Tcp(t) => Ok(Client::connect_tcp(&t).await?),
            crate::integrations::Endpoint::Socket(p) => Ok(Client::connect(&p).await?),
        }
    }

    fn admin_socket_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.admin_socket {
            return Ok(s.clone());
        }
        if let Some(c) = &self.config {
            let cfg = Config::load(c)?;
            return Ok(cfg.admin.socket_path);
        }
        Ok(PathBuf::from("keyturn-admin.sock"))
    }

    /// A connection to the admin socket (admin methods are served nowhere else).
    async fn admin_client(&self) -> anyhow::Result<Client> {
        let path = self.admin_socket_path()?;
        Client::connect(&path).await.map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "admin subcommands use the admin socket {} ([admin] socket_path; --config or --admin-socket); only admins may reach it",
                path.display()
            ))
        })
    }

    /// The agent socket when acting as `agent`, else the admin socket (an
    /// admin acting on any request).
    async fn client_for(&self, agent: Option<&str>) -> anyhow::Result<Client> {
        match agent {
            Some(_) => self.client().await,
            None => self.admin_client().await,
        }
    }
}

/// How long `keyturn health` waits for the server's answer.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn health(conn: &Conn) -> anyhow::Result<u8> {
    let ask = async {
        let mut c = match conn.admin_socket {
            Some(_) => conn.admin_client().await?,
            None => conn.client().await?,
        };
        anyhow::Ok(c.call("health", json!({})).await?)
    };
    let v = tokio::time::timeout(HEALTH_TIMEOUT, ask)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the server did not answer within {} s",
                HEALTH_TIMEOUT.as_secs()
            )
        })??;
    let h: HealthAnswer = read(&v)?;
    show(conn.json, &v, &h, health_text);
    Ok(if h.ok { 0 } else { EXIT_DENIED })
}

fn health_text(h: &HealthAnswer) -> String {
    let mut out = String::from(if h.ok { "healthy" } else { "UNHEALTHY" });
    for (name, c) in [
        ("socket", &h.socket),
        ("store", &h.store),
        ("policy", &h.policy),
        ("discord", &h.discord),
    ] {
        let Some(c) = c else {
            if name == "discord" {
                out.push_str("\n  discord: not configured");
            }
            continue;
        };
        out.push_str(&format!(
            "\n  {name}: {}{}",
            if c.up { "up" } else { "DOWN" },
            match c.state.as_deref() {
                Some(s) if s != "up" && s != "down" => format!(" ({})", printable(s)),
                _ => String::new(),
            }
        ));
        if let Some(d) = &c.detail {
            out.push_str(&format!(": {}", printable(d)));
        }
    }
    if let Some(role) = &h.role {
        out.push_str(&format!("\n  role: {}", printable(role)));
    }
    out
}

fn parse_args(s: &str) -> anyhow::Result<Value> {
    // Strict: refused here as the server would (duplicate keys, numbers
    // that would not survive exactly), with the key or number named.
    use crate::domain::canonical::{parse_strict, StrictError};
    let v: Value = parse_strict(s).map_err(|e| match e {
        StrictError::Syntax(why) => anyhow::anyhow!("--args is not valid JSON: {why}"),
        refused => anyhow::anyhow!("--args: {refused}"),
    })?;
    anyhow::ensure!(
        v.is_object(),
        "--args must be a JSON object, e.g. '{{\"path\":\"/tmp/x\"}}'"
    );
    Ok(v)
}

fn call_params(c: &CallArgs) -> anyhow::Result<Value> {
    let mut p = json!({
        "agent": c.agent, "tool": c.tool, "args": parse_args(&c.args)?,
        "justification": c.justification, "cost": c.cost,
    });
    for (k, v) in [
        ("user_id", &c.user),
        ("channel_id", &c.channel),
        ("task_id", &c.task),
        ("token", &c.token),
    ] {
        if let Some(v) = v {
            p[k] = json!(v);
        }
    }
    if let Some(c) = c.confidence {
        p["confidence"] = json!(c);
    }
    Ok(p)
}

/// Reads a method's answer into the type the CLI prints from (once).
fn read<T: DeserializeOwned>(v: &Value) -> anyhow::Result<T> {
    T::deserialize(v)
        .map_err(|e| anyhow::anyhow!("Keyturn sent an answer this CLI cannot read: {e}"))
}

/// Prints an answer: with `--json` as the server sent it, else as text
/// made from its typed form.
/// `keyturn stats` as text.
fn stats_text(r: &crate::domain::stats::StatsReport, since: &str) -> String {
    use crate::domain::stats::Outcome;
    use std::fmt::Write as _;
    let mut out = format!("calls in the last {}: {}", printable(since), r.total);
    if r.truncated {
        out.push_str(" (cut to the newest requests)");
    }
    for o in Outcome::ALL {
        let _ = write!(out, "\n  {:<20} {}", o.label(), r.outcomes.get(o));
    }
    let ms = |ms: i64| format!("{:.1}s", ms as f64 / 1000.0);
    match &r.time_to_decision {
        Some(l) => {
            let _ = write!(
                out,
                "\ntime to a human decision: p50 {} p90 {} ({} decisions)",
                ms(l.p50_ms),
                ms(l.p90_ms),
                l.count
            );
        }
        None => out.push_str("\ntime to a human decision: no human decisions"),
    }
    for a in &r.by_approver {
        let _ = write!(
            out,
            "\n  {}: {} approved, {} denied, p50 {} p90 {}",
            printable(&a.approver),
            a.approved,
            a.denied,
            ms(a.time_to_decision.p50_ms),
            ms(a.time_to_decision.p90_ms)
        );
    }
    let _ = write!(out, "\ntimeouts: {}", r.timeouts);
    let list = |title: &str, items: Vec<String>, omitted: u64| {
        let mut s = format!("\n{title}:");
        if items.is_empty() {
            s.push_str(" none");
        }
        for i in items {
            s.push_str("\n  ");
            s.push_str(&i);
        }
        if omitted > 0 {
            let _ = write!(s, "\n  … and {omitted} more");
        }
        s
    };
    let named = |n: &crate::domain::stats::NamedOutcomes| {
        format!(
            "{}: {} ({} approved, {} denied, {} timed out, {} cancelled, {} pending)",
            printable(&n.name),
            n.total,
            n.outcomes.approved_by_policy + n.outcomes.approved_by_human,
            n.outcomes.denied_by_policy + n.outcomes.denied_by_human,
            n.outcomes.timed_out,
            n.outcomes.cancelled,
            n.outcomes.pending
        )
    };
    out.push_str(&list(
        "by tool",
        r.by_tool.iter().map(named).collect(),
        r.by_tool_omitted,
    ));
    out.push_str(&list(
        "by agent",
        r.by_agent.iter().map(named).collect(),
        r.by_agent_omitted,
    ));
    let counted =
        |c: &crate::domain::stats::NamedCount| format!("{}: {}", printable(&c.name), c.calls);
    out.push_str(&list(
        "approved by policy, per rule",
        r.grants_used.iter().map(counted).collect(),
        r.grants_used_omitted,
    ));
    out.push_str(&list(
        "most denied tools",
        r.top_denied_tools.iter().map(counted).collect(),
        0,
    ));
    out
}

fn show<T>(json_out: bool, raw: &Value, answer: &T, text: impl FnOnce(&T) -> String) {
    if json_out {
        crate::outln!("{}", serde_json::to_string_pretty(raw).unwrap_or_default());
    } else {
        crate::outln!("{}", text(answer));
    }
}

fn decision_text(d: &DecisionView) -> String {
    // A flag the CLI cannot read is still counted and shown as unknown.
    let flags: Vec<FlagAnswer> = d
        .flags
        .iter()
        .map(|f| {
            FlagAnswer::deserialize(f).unwrap_or(FlagAnswer {
                kind: None,
                detail: String::new(),
            })
        })
        .collect();
    format!(
        "{} {}: {}{}",
        d.request_id,
        d.tool,
        d.summary,
        flags_text(&flags)
    )
}

/// Content flags, one per line, loud enough to be seen: empty when none.
fn flags_text(flags: &[FlagAnswer]) -> String {
    if flags.is_empty() {
        return String::new();
    }
    let mut out = format!("\n    !! {} CONTENT FLAG(S):", flags.len());
    for f in flags {
        out.push_str(&format!(
            "\n    !! {}: {}",
            f.kind.as_deref().unwrap_or("?"),
            printable(&f.detail)
        ));
    }
    out
}

/// Control characters escaped, everything else as is.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let e: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            e
        })
        .collect()
}

/// `--as NAME` as given (the server refuses a name that could imitate a
/// uid), else `$USER` when it is a plain name.
fn operator(o: Option<String>) -> Option<String> {
    o.or_else(|| {
        std::env::var("USER")
            .ok()
            .filter(|u| matches!(crate::domain::request::check_display_name(u), Ok(Some(_))))
    })
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Hook(cmd) => Ok(crate::integrations::hook::main(cmd)),
        Command::Exec(a) => Ok(crate::integrations::exec::main(a)),
        Command::McpProxy(a) => crate::integrations::mcp_proxy::run(a).await,
        Command::Completions { shell } => Ok(print_completions(shell)),
        Command::Man => Ok(print_man()),
        Command::Serve { config } => {
            let cfg = Config::load(&config)?;
            if let Some(w) = cfg.check_file_permissions(&config)? {
                tracing::warn!("{w}");
            }
            crate::serve::run_reloading(cfg, config).await?;
            Ok(0)
        }
        Command::Init { config } => {
            let cfg = Config::load(&config)?;
            if let Some(w) = cfg.check_file_permissions(&config)? {
                crate::errln!("keyturn: WARNING: {w}");
            }
            if crate::serve::is_postgres(&cfg) {
                crate::serve::init_store(&cfg).await?;
                crate::outln!("migrated the database {}", crate::serve::store_name(&cfg));
                return Ok(0);
            }
            let db = cfg
                .store_path()
                .context("store.url names no database file (in memory): nothing to create")?;
            crate::serve::init_store(&cfg).await?;
            crate::outln!("created the database {}", db.display());
            Ok(0)
        }
        Command::Db(DbCmd::Check { config }) => {
            let cfg = Config::load(&config)?;
            if let Some(db) = cfg.store_path() {
                if !db.exists() {
                    anyhow::bail!("no database at {}", db.display());
                }
            }
            let r = crate::serve::check_store(&cfg).await;
            let name = crate::serve::store_name(&cfg);
            let passed = if crate::serve::is_postgres(&cfg) {
                "migrations applied"
            } else {
                "integrity_check passed"
            };
            if r.ok() {
                crate::outln!(
                    "{name}: ok ({passed}, {} pending requests readable)",
                    r.pending.unwrap_or(0)
                );
                Ok(0)
            } else if r.unreachable {
                crate::outln!("{name}: UNREACHABLE (nothing was checked)");
                for p in &r.problems {
                    crate::outln!("  {}", printable(p));
                }
                Ok(EXIT_DENIED)
            } else {
                crate::outln!("{name}: DAMAGED");
                for p in &r.problems {
                    crate::outln!("  {}", printable(p));
                }
                crate::outln!(
                    "restore the database from a backup; `keyturn serve` refuses to start on it"
                );
                Ok(EXIT_DENIED)
            }
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            cfg.check_uids(nix::unistd::getuid().as_raw())?;
            // The TCP listener's certificate and key, read as `serve` will.
            crate::serve::check_tcp(&cfg)?;
            // A tool that runs in bubblewrap needs a working bubblewrap.
            crate::serve::check_run(&cfg)?;
            if let Some(w) = cfg.check_file_permissions(&config)? {
                crate::errln!("keyturn: WARNING: {w}");
            }
            crate::outln!(
                "{}: ok ({} agents, {} grants, {} tools, {} users, discord {}{})",
                config.display(),
                cfg.agents.len(),
                cfg.grants.len(),
                cfg.tools.len(),
                cfg.users.len(),
                if cfg.discord_enabled() { "on" } else { "off" },
                if cfg.admin.single_user_demo {
                    ", SINGLE-USER DEMO: agents are not kept apart from the server or its admins"
                } else {
                    ""
                }
            );
            Ok(0)
        }
        Command::Request {
            call,
            idempotency_key,
            timeout,
            no_wait,
            conn,
        } => {
            let mut p = call_params(&call)?;
            p["wait"] = json!(!no_wait);
            // Without --no-wait, this process going away (Ctrl-C, kill)
            // cancels the request: nobody is left to act on an approval.
            p["detach"] = json!(no_wait);
            let asked_tool = call.tool.clone();
            let asked_hash = crate::domain::canonical::args_hash(&p["args"]);
            if let Some(k) = idempotency_key {
                p["idempotency_key"] = json!(k);
            }
            if let Some(t) = timeout {
                // Whole seconds on the wire; a part second rounds up.
                p["timeout_secs"] = json!(t.as_secs() + u64::from(t.subsec_nanos() > 0));
            }
            // While a human decides, stderr says which request it is and how
            // to approve it; the idempotency key lets that lookup find it.
            if p.get("idempotency_key").is_none() {
                p["idempotency_key"] = json!(format!("keyturn-cli:{}", uuid::Uuid::new_v4()));
            }
            let mut client = conn.client().await?;
            let _notice = (!no_wait).then(|| {
                crate::integrations::PendingNotice::start(
                    conn.endpoint()
                        .unwrap_or_else(|_| crate::integrations::Endpoint::Socket(PathBuf::new())),
                    p.clone(),
                    crate::integrations::NOTICE_AFTER,
                )
            });
            let v = client.call("submit", p).await?;
            let d: DecisionView = read(&v)?;
            // Exit 0 only for an answer about exactly this call.
            if let Some(why) = d.mismatch(&asked_tool, &asked_hash) {
                anyhow::bail!("Keyturn's answer is about a different call ({why}); not approved");
            }
            show(conn.json, &v, &d, decision_text);
            Ok(
                if d.approved || (no_wait && d.state == crate::domain::request::State::Pending) {
                    0
                } else {
                    EXIT_DENIED
                },
            )
        }
        Command::Check { call, conn } => {
            let v = conn
                .client()
                .await?
                .call("check", call_params(&call)?)
                .await?;
            let a: CheckAnswer = read(&v)?;
            show(conn.json, &v, &a, |a| {
                format!(
                    "{} ({}): {}{}",
                    a.verdict.action,
                    a.verdict.rule,
                    a.verdict.detail,
                    flags_text(&a.flags)
                )
            });
            Ok(0)
        }
        Command::Wait {
            id,
            agent,
            detach,
            conn,
        } => {
            let mut p = json!({"id": id, "detach": detach});
            if let Some(a) = &agent {
                p["agent"] = json!(a);
            }
            let v = conn
                .client_for(agent.as_deref())
                .await?
                .call("wait", p)
                .await?;
            let d: DecisionView = read(&v)?;
            show(conn.json, &v, &d, decision_text);
            Ok(if d.approved { 0 } else { EXIT_DENIED })
        }
        Command::Health { conn } => health(&conn).await,
        Command::Status { id, conn } => {
            let v = conn
                .admin_client()
                .await?
                .call("status", json!({"id": id}))
                .await?;
            show(conn.json, &v, &read(&v)?, decision_text);
            Ok(0)
        }
        Command::Cancel { id, reason, conn } => {
            let v = conn
                .admin_client()
                .await?
                .call("cancel", json!({"id": id, "reason": reason}))
                .await?;
            show(conn.json, &v, &read(&v)?, decision_text);
            Ok(0)
        }
        Command::Stats { since, conn } => {
            let window = crate::domain::stats::parse_window(&since)
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let v = conn
                .admin_client()
                .await?
                .call("stats.report", json!({"window_secs": window}))
                .await?;
            let report: crate::domain::stats::StatsReport = read(&v)?;
            show(conn.json, &v, &report, |r| stats_text(r, &since));
            Ok(0)
        }
        Command::Pending { limit, conn } => {
            let v = conn
                .admin_client()
                .await?
                .call("pending", json!({"limit": limit}))
                .await?;
            let list: Vec<PendingAnswer> = read(&v)?;
            show(conn.json, &v, &list, |list| {
                if list.is_empty() {
                    return "no pending requests".into();
                }
                list.iter()
                    .map(|r| {
                        let left = (r.deadline_ms - crate::app::now_ms()) / 1000;
                        format!(
                            "{}  {}  risk={}  agent={}  user={}  channel={}  {}s left{}\n    rule: {}\n    args: {}\n    why: {}",
                            r.id,
                            r.tool,
                            r.risk,
                            r.agent,
                            r.user_id.as_deref().unwrap_or("-"),
                            r.channel_id.as_deref().unwrap_or("-"),
                            left.max(0),
                            flags_text(&r.flags),
                            printable(&r.rule_detail),
                            r.args,
                            r.justification.escape_debug(),
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(0)
        }
        Command::Approve {
            id,
            reason,
            operator: op,
            for_,
            scope,
            args_file,
            conn,
        } => {
            let args = args_file.map(|f| read_args_file(&f)).transpose()?;
            let for_ = for_.map(|f| (f, scope));
            decide(&conn, "approve", id, reason, op, for_, args).await
        }
        Command::Deny {
            id,
            reason,
            operator: op,
            conn,
        } => decide(&conn, "deny", id, reason, op, None, None).await,
        Command::Grant {
            scope,
            tool,
            deny,
            conn,
        } => grant(&conn, "grant", scope, tool, deny).await,
        Command::Revoke {
            id: Some(id), conn, ..
        } => revoke_timed(&conn, id).await,
        Command::Revoke {
            scope,
            tool,
            deny,
            conn,
            ..
        } => {
            grant(
                &conn,
                "revoke",
                scope.unwrap_or_default(),
                tool.unwrap_or_default(),
                deny,
            )
            .await
        }
        Command::Tools { cmd, conn } => {
            tools(&conn, cmd.unwrap_or(ToolsCmd::List { scope: None })).await
        }
        Command::Pairing { cmd, conn } => pairing_cmd(&conn, cmd).await,
        Command::Audit { cmd, conn } => audit_cmd(&conn, cmd).await,
        Command::Token { cmd, conn } => token_cmd(&conn, cmd).await,
        Command::Agent { cmd, conn } => agent_cmd(&conn, cmd).await,
        Command::Alerts { limit, conn } => alerts_cmd(&conn, limit).await,
        Command::Run {
            call,
            idempotency_key,
            timeout,
            conn,
        } => run_cmd(call, idempotency_key, timeout, conn).await,
        Command::Ps { all, limit, conn } => {
            let v = conn
                .admin_client()
                .await?
                .call("runs.list", json!({"running": !all, "limit": limit}))
                .await?;
            let runs: Vec<crate::app::ports::RunRecord> = read(&v)?;
            show(conn.json, &v, &runs, |runs| {
                if runs.is_empty() {
                    return if all {
                        "no runs".into()
                    } else {
                        "no runs going".into()
                    };
                }
                runs.iter()
                    .map(|r| {
                        format!(
                            "{}  {}  {}  agent {}  tool {}  pid {}  started {}  approved by {}\n    {}",
                            r.id,
                            r.state.as_str(),
                            r.exit_code.map(|c| format!("exit {c}")).or(r.signal.map(|s| format!("signal {s}"))).unwrap_or_default(),
                            printable(&r.agent),
                            printable(&r.tool),
                            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                            when(Some(r.started_ms)),
                            printable(&r.approved_by),
                            printable(&serde_json::to_string(&r.argv).unwrap_or_default()),
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(0)
        }
        Command::Kill {
            id,
            operator: op,
            conn,
        } => {
            let v = conn
                .admin_client()
                .await?
                .call("runs.kill", json!({"id": id, "operator": operator(op)}))
                .await?;
            let r: crate::app::ports::RunRecord = read(&v)?;
            show(conn.json, &v, &r, |r| {
                format!(
                    "run {}: kill sent (SIGTERM, then SIGKILL to its process group)",
                    r.id
                )
            });
            Ok(0)
        }
        Command::Credentials { cmd, conn } => {
            let mut c = conn.admin_client().await?;
            match cmd {
                CredentialsCmd::Status => {
                    let v = c.call("credentials.status", json!({})).await?;
                    let list: Vec<crate::app::ports::CredentialStatus> = read(&v)?;
                    show(conn.json, &v, &list, |list| {
                        if list.is_empty() {
                            return "no credentials configured".into();
                        }
                        list.iter()
                            .map(|c| {
                                let profiles: Vec<String> = c
                                    .profiles
                                    .iter()
                                    .map(|p| {
                                        let mut s = format!("{} ({} failures", p.name, p.failures);
                                        if p.set_aside {
                                            s.push_str(", set aside");
                                        }
                                        if p.unreadable {
                                            s.push_str(", unreadable");
                                        }
                                        s + ")"
                                    })
                                    .collect();
                                format!(
                                    "{}: active {}; profiles: {}",
                                    c.name,
                                    c.active,
                                    profiles.join(", ")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                CredentialsCmd::Reset { name, operator: op } => {
                    let v = c
                        .call(
                            "credentials.reset",
                            json!({"name": name, "operator": operator(op)}),
                        )
                        .await?;
                    show(conn.json, &v, &name, |n| {
                        format!("{n}: every profile back in use")
                    });
                }
            }
            Ok(0)
        }
        Command::Bench {
            store,
            clients,
            seconds,
            wakeups,
            pending,
            replicas,
            runs,
        } => {
            crate::bench::run(crate::bench::BenchOptions {
                store,
                clients,
                seconds,
                wakeups,
                pending,
                replicas,
                runs,
            })
            .await?;
            Ok(0)
        }
        Command::Verify {
            id,
            args,
            agent,
            token,
            conn,
        } => {
            let mut p = json!({"id": id, "args": parse_args(&args)?});
            if let Some(a) = &agent {
                p["agent"] = json!(a);
            }
            if let Some(t) = token {
                p["token"] = json!(t);
            }
            let v = conn
                .client_for(agent.as_deref())
                .await?
                .call("verify", p)
                .await?;
            let a: VerifyAnswer = read(&v)?;
            let ok = a.matches && a.approved;
            show(conn.json, &v, &a, |a| {
                let id = &a.request_id;
                let state = &a.state;
                match (a.matches, a.approved) {
                    (true, true) => format!("{id}: ok, these are the approved arguments"),
                    (true, false) => {
                        format!("{id}: arguments match, but the request is {state}, not approved")
                    }
                    (false, _) => format!(
                        "{id}: MISMATCH: these arguments hash to {}, the request was {} with {}",
                        a.args_hash, state, a.expected_hash
                    ),
                }
            });
            Ok(if ok { 0 } else { EXIT_DENIED })
        }
    }
}

async fn decide(
    conn: &Conn,
    method: &str,
    id: String,
    reason: Option<String>,
    op: Option<String>,
    for_: Option<(String, Option<String>)>,
    args: Option<Value>,
) -> anyhow::Result<u8> {
    let mut params = json!({"id": id, "reason": reason, "operator": operator(op)});
    if let Some(args) = args {
        params["args"] = args;
    }
    if let Some((duration, scope)) = for_ {
        params["for"] = json!(duration);
        params["scope"] = json!(scope.unwrap_or_else(|| "call".into()));
    }
    let v = conn.admin_client().await?.call(method, params).await?;
    let a: VoteAnswer = read(&v)?;
    show(conn.json, &v, &a, |a| {
        let d = &a.decision;
        let mut text = if d.state == crate::domain::request::State::Pending {
            format!(
                "{}: vote recorded ({} of {} approvals)",
                d.request_id, a.approvals, a.approvals_required
            )
        } else {
            decision_text(d)
        };
        if let Some(g) = &a.grant {
            text.push_str(&format!("\nallowed {}: grant {}", g.until, g.line()));
        }
        text
    });
    Ok(0)
}

/// Largest `--args-file` read.
const MAX_ARGS_FILE: u64 = 16 * 1024 * 1024;

/// The edited arguments of `approve --args-file` (`-`: stdin): one JSON
/// object, read strictly (no duplicate keys, exact numbers).
fn read_args_file(path: &std::path::Path) -> anyhow::Result<Value> {
    use anyhow::Context as _;
    use std::io::Read as _;
    let mut raw = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_ARGS_FILE)
            .read_to_end(&mut raw)
            .context("while reading the edited arguments from stdin")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_ARGS_FILE).read_to_end(&mut raw))
            .with_context(|| format!("while reading {}", path.display()))?;
    }
    let v = crate::domain::canonical::parse_strict_slice(&raw)
        .map_err(|e| anyhow::anyhow!("the edited arguments are not valid JSON: {e}"))?;
    anyhow::ensure!(v.is_object(), "the edited arguments must be a JSON object");
    Ok(v)
}

async fn revoke_timed(conn: &Conn, id: String) -> anyhow::Result<u8> {
    let v = conn
        .admin_client()
        .await?
        .call("revoke", json!({"id": id}))
        .await?;
    let a: ChangedAnswer = read(&v)?;
    show(conn.json, &v, &a, |a| {
        if a.changed {
            format!("grant {id}: removed")
        } else {
            format!("grant {id}: there was no such grant")
        }
    });
    Ok(0)
}

async fn grant(
    conn: &Conn,
    method: &str,
    scope: String,
    tool: String,
    deny: bool,
) -> anyhow::Result<u8> {
    let effect = if deny { "deny" } else { "allow" };
    let v = conn
        .admin_client()
        .await?
        .call(
            method,
            json!({"scope": scope, "tool": tool, "effect": effect}),
        )
        .await?;
    let a: ChangedAnswer = read(&v)?;
    show(conn.json, &v, &a, |a| match (method, a.changed) {
        ("grant", true) => format!("{effect} `{tool}` in {scope}: added"),
        ("grant", false) => format!("{effect} `{tool}` in {scope}: already present"),
        (_, true) => format!("{effect} `{tool}` in {scope}: removed"),
        _ => format!("{effect} `{tool}` in {scope}: there was no such grant"),
    });
    Ok(0)
}

async fn tools(conn: &Conn, cmd: ToolsCmd) -> anyhow::Result<u8> {
    let mut c = conn.admin_client().await?;
    match cmd {
        ToolsCmd::List { scope } => {
            let v = c.call("tools.list", json!({"scope": scope})).await?;
            let a: ToolsAnswer = read(&v)?;
            show(conn.json, &v, &a, |a| {
                let mut out = vec!["grants:".to_string()];
                for g in &a.grants {
                    out.push(format!(
                        "  {:<20} {:<6} {:<30} (by {})",
                        g.scope,
                        g.effect,
                        g.tool,
                        g.created_by.as_deref().unwrap_or("?")
                    ));
                }
                out.push(
                    "time-boxed grants (stand in for an approval; expired ones left out):".into(),
                );
                if a.timed_grants.is_empty() {
                    out.push("  (none)".into());
                }
                for g in &a.timed_grants {
                    out.push(format!("  {}", g.line()));
                }
                out.push("risks (unlisted tools are high):".into());
                for r in &a.risks {
                    out.push(format!(
                        "  {:<30} {}",
                        r.tool,
                        r.risk.as_deref().unwrap_or("?")
                    ));
                }
                out.join("\n")
            });
        }
        ToolsCmd::Effective {
            user,
            channel,
            roles,
            agent,
            tool,
        } => {
            let roles = (!roles.is_empty()).then_some(roles);
            let v = c
                .call("tools.effective", json!({"user_id": user, "channel_id": channel, "roles": roles, "agent": agent, "tool": tool}))
                .await?;
            let a: EffectiveAnswer = read(&v)?;
            show(conn.json, &v, &a, |a| {
                let mut out = vec![format!(
                    "{} — deciding scope: {}",
                    a.detail,
                    a.deciding_scope.as_deref().unwrap_or("none (deny)")
                )];
                for g in &a.entries {
                    out.push(format!("  {} {} {}", g.scope, g.effect, g.tool));
                }
                if !a.timed_grants.is_empty() {
                    out.push("time-boxed grants (in place of an approval):".into());
                    for g in &a.timed_grants {
                        out.push(format!("  {}", g.line()));
                    }
                }
                out.join("\n")
            });
        }
        ToolsCmd::Risk { tool, level } => {
            let risk = if level == "clear" {
                Value::Null
            } else {
                json!(level)
            };
            let v = c
                .call("tools.risk", json!({"tool": tool, "risk": risk}))
                .await?;
            let a: ToolRiskAnswer = read(&v)?;
            show(conn.json, &v, &a, |a| {
                format!(
                    "{}: {}",
                    a.tool,
                    a.risk.as_deref().unwrap_or("cleared (config or high)")
                )
            });
        }
    }
    Ok(0)
}

/// A time in epoch ms as UTC text, or `never`.
fn when(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "never".into())
}

/// `keyturn run`: the decision, then the run's output on this process's
/// stdout and stderr, and its exit code as ours.
async fn run_cmd(
    call: CallArgs,
    idempotency_key: Option<String>,
    timeout: Option<std::time::Duration>,
    conn: Conn,
) -> anyhow::Result<u8> {
    let mut p = call_params(&call)?;
    let asked_tool = call.tool.clone();
    let asked_hash = crate::domain::canonical::args_hash(&p["args"]);
    p["idempotency_key"] =
        json!(idempotency_key.unwrap_or_else(|| format!("keyturn-cli:{}", uuid::Uuid::new_v4())));
    if let Some(t) = timeout {
        p["timeout_secs"] = json!(t.as_secs() + u64::from(t.subsec_nanos() > 0));
    }
    let mut client = conn.client().await?;
    let _notice = crate::integrations::PendingNotice::start(
        conn.endpoint()
            .unwrap_or_else(|_| crate::integrations::Endpoint::Socket(PathBuf::new())),
        p.clone(),
        crate::integrations::NOTICE_AFTER,
    );
    let v = client.call("run", p).await?;
    let d: DecisionView = read(&v["decision"])?;
    // Approved with edits: Keyturn ran the edited call the approver saw.
    let edited = d.tool == asked_tool && d.edited_from(&asked_hash).is_some();
    if let Some(why) = d.mismatch(&asked_tool, &asked_hash).filter(|_| !edited) {
        anyhow::bail!("Keyturn's answer is about a different call ({why}); not run");
    }
    if edited && !conn.json {
        crate::errln!("keyturn: an approver edited the arguments; the edited call was run");
    }
    if conn.json {
        crate::outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    if !d.approved || v["run"].is_null() {
        if !conn.json {
            crate::errln!("keyturn: not run: {}", decision_text(&d));
        }
        return Ok(EXIT_DENIED);
    }
    let run = &v["run"];
    let text = |k: &str| run[k]["text"].as_str().unwrap_or_default().to_string();
    if !conn.json {
        use std::io::Write;
        let _ = std::io::stdout().write_all(text("stdout").as_bytes());
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().write_all(text("stderr").as_bytes());
        for f in run["flags"].as_array().into_iter().flatten() {
            crate::errln!(
                "keyturn: flagged in the output: {} {}",
                printable(f["kind"].as_str().unwrap_or("?")),
                printable(f["detail"].as_str().unwrap_or_default())
            );
        }
    }
    let state = run["state"].as_str().unwrap_or_default();
    let code = match state {
        "exited" => match (run["exit_code"].as_i64(), run["signal"].as_i64()) {
            (Some(c), _) => u8::try_from(c).unwrap_or(1),
            (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
            _ => 1,
        },
        "timed_out" => 124,
        "killed" => 137,
        _ => 126,
    };
    if !conn.json && state != "exited" {
        crate::errln!(
            "keyturn: run {} {}{}",
            printable(run["run_id"].as_str().unwrap_or_default()),
            state.replace('_', " "),
            run["error"]
                .as_str()
                .map(|e| format!(": {}", printable(e)))
                .unwrap_or_default()
        );
    }
    Ok(code)
}

fn pause_text(p: &crate::domain::policy::Pause) -> String {
    let who = if p.is_global() {
        "every agent".to_string()
    } else {
        format!("agent {}", printable(&p.agent))
    };
    format!(
        "{who} paused by {} since {}{}",
        printable(&p.paused_by),
        when(Some(p.since_ms)),
        p.reason
            .as_deref()
            .map(|r| format!(": {}", printable(r)))
            .unwrap_or_default()
    )
}

async fn alerts_cmd(conn: &Conn, limit: Option<u32>) -> anyhow::Result<u8> {
    use crate::app::ports::Alert;
    let mut c = conn.admin_client().await?;
    let v = c.call("alerts.list", json!({"limit": limit})).await?;
    let alerts: Vec<Alert> = read(&v)?;
    show(conn.json, &v, &alerts, |list| {
        if list.is_empty() {
            return "no anomaly alerts".to_string();
        }
        list.iter()
            .map(|a| {
                let at = chrono::DateTime::from_timestamp_millis(a.opened_ms)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default();
                let paused = a
                    .paused_by
                    .as_deref()
                    .map(|b| format!(" [agent paused by {}]", printable(b)))
                    .unwrap_or_default();
                format!(
                    "{at}  {}  {}  x{}  {}  ({}){paused}",
                    printable(&a.agent),
                    a.rule,
                    a.count,
                    printable(&a.detail),
                    a.action
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(0)
}

async fn agent_cmd(conn: &Conn, cmd: AgentCmd) -> anyhow::Result<u8> {
    use crate::app::{AgentStatus, PauseAnswer, ResumeAnswer};
    let mut c = conn.admin_client().await?;
    let (method, params) = match cmd {
        AgentCmd::Pause {
            name,
            reason,
            operator: op,
        } => (
            "agent.pause",
            json!({"name": name, "reason": reason, "operator": operator(op)}),
        ),
        AgentCmd::PauseAll {
            reason,
            operator: op,
        } => (
            "agent.pause",
            json!({"all": true, "reason": reason, "operator": operator(op)}),
        ),
        AgentCmd::Resume { name, operator: op } => (
            "agent.resume",
            json!({"name": name, "operator": operator(op)}),
        ),
        AgentCmd::ResumeAll { operator: op } => (
            "agent.resume",
            json!({"all": true, "operator": operator(op)}),
        ),
        AgentCmd::List => ("agent.list", json!({})),
    };
    let v = c.call(method, params).await?;
    match method {
        "agent.pause" => {
            let a: PauseAnswer = read(&v)?;
            show(conn.json, &v, &a, |a| {
                format!(
                    "{}{}; {} pending request(s) cancelled",
                    if a.paused { "" } else { "already paused: " },
                    pause_text(&a.pause),
                    a.cancelled
                )
            });
        }
        "agent.resume" => {
            let a: ResumeAnswer = read(&v)?;
            show(conn.json, &v, &a, |a| {
                let who = if a.agent == crate::domain::policy::ALL_AGENTS {
                    "the global pause".to_string()
                } else {
                    format!("agent {}", printable(&a.agent))
                };
                let mut out = if a.resumed {
                    format!("{who} lifted")
                } else {
                    format!("{who} was not paused")
                };
                if let Some(p) = &a.still_paused_by {
                    out.push_str(&format!("; still stopped: {}", pause_text(p)));
                }
                out
            });
        }
        _ => {
            #[derive(Deserialize, serde::Serialize)]
            struct List {
                agents: Vec<AgentStatus>,
                all_paused: Option<crate::domain::policy::Pause>,
            }
            let l: List = read(&v)?;
            show(conn.json, &v, &l, |l| {
                let mut lines = Vec::new();
                if let Some(p) = &l.all_paused {
                    lines.push(format!("GLOBAL PAUSE: {}", pause_text(p)));
                }
                for a in &l.agents {
                    lines.push(match &a.paused {
                        Some(p) => format!("{}  paused ({})", printable(&a.name), pause_text(p)),
                        None => format!("{}  running", printable(&a.name)),
                    });
                }
                if lines.is_empty() {
                    "no agents configured".into()
                } else {
                    lines.join("\n")
                }
            });
        }
    }
    Ok(0)
}

async fn token_cmd(conn: &Conn, cmd: TokenCmd) -> anyhow::Result<u8> {
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs().max(1));
    let mut c = conn.admin_client().await?;
    let (method, params) = match cmd {
        TokenCmd::Issue { agent, expires } => (
            "token.issue",
            json!({"agent": agent, "expires_secs": secs(expires)}),
        ),
        TokenCmd::Rotate {
            agent,
            overlap,
            expires,
        } => (
            "token.rotate",
            json!({"agent": agent, "expires_secs": secs(expires), "overlap_secs": overlap.as_secs()}),
        ),
        TokenCmd::Revoke { id } => ("token.revoke", json!({"id": id})),
        TokenCmd::List => ("token.list", json!({})),
    };
    let v = c.call(method, params).await?;
    let text = match method {
        "token.issue" | "token.rotate" => {
            let t: TokenIssued = read(&v)?;
            let mut out = format!(
                "token {} for agent {} (expires {}); it is shown only now:\n{}",
                t.id,
                t.agent,
                when(t.expires_ms),
                t.token
            );
            if let Some(at) = t.others_expire_ms {
                out.push_str(&format!(
                    "\n{} other token(s) of agent {} stop working at {}",
                    t.others,
                    t.agent,
                    when(Some(at))
                ));
            }
            out
        }
        "token.revoke" => {
            let t: TokenAnswer = read(&v)?;
            format!("revoked token {} of agent {}", t.id, t.agent)
        }
        _ => {
            let list: Vec<TokenAnswer> = read(&v)?;
            if list.is_empty() {
                "no tokens".into()
            } else {
                list.iter()
                    .map(|t| {
                        format!(
                            "{}  agent={}  created={} by {}  expires={}  revoked={}",
                            t.id,
                            t.agent,
                            when(Some(t.created_ms)),
                            printable(&t.created_by),
                            when(t.expires_ms),
                            t.revoked_ms.map_or("no".into(), |r| when(Some(r)))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
    };
    show(conn.json, &v, &text, |t| t.clone());
    Ok(0)
}

async fn pairing_cmd(conn: &Conn, cmd: PairingCmd) -> anyhow::Result<u8> {
    let mut c = conn.admin_client().await?;
    let (method, params) = match cmd {
        PairingCmd::List => ("pairing.list", json!({})),
        PairingCmd::Request { user, name } => (
            "pairing.request",
            json!({"user_id": user, "display_name": name}),
        ),
        PairingCmd::Approve { code } => ("pairing.approve", json!({"code": code})),
        PairingCmd::Add { user, roles } => {
            ("pairing.add", json!({"user_id": user, "roles": roles}))
        }
        PairingCmd::Revoke { user } => ("pairing.revoke", json!({"user_id": user})),
    };
    let v = c.call(method, params).await?;
    let text = match method {
        "pairing.list" => {
            let a: PairingsAnswer = read(&v)?;
            let mut out = vec!["paired users:".to_string()];
            for u in &a.paired {
                out.push(format!(
                    "  {}  roles={}  by {}",
                    u.user_id,
                    serde_json::to_string(&u.roles).unwrap_or_default(),
                    u.paired_by
                ));
            }
            out.push("live pairing codes:".into());
            for p in &a.pending_codes {
                out.push(format!(
                    "  user {}  expires in {}s",
                    p.user_id,
                    (p.expires_ms - crate::app::now_ms()) / 1000
                ));
            }
            out.join("\n")
        }
        "pairing.request" => {
            let a: PairingCodeIssued = read(&v)?;
            format!("pairing code for user {}: {}", a.user_id, a.code)
        }
        "pairing.approve" => {
            let a: PairedAnswer = read(&v)?;
            format!("user {} is now paired", a.user_id)
        }
        _ => format!("changed: {}", read::<ChangedAnswer>(&v)?.changed),
    };
    show(conn.json, &v, &text, String::clone);
    Ok(0)
}

async fn audit_cmd(conn: &Conn, cmd: AuditCmd) -> anyhow::Result<u8> {
    if let AuditCmd::Verify { file: Some(f) } = &cmd {
        return verify_file(f, conn.json);
    }
    let mut c = conn.admin_client().await?;
    match cmd {
        AuditCmd::Tail { n } => {
            let v = c.call("audit.tail", json!({"n": n})).await?;
            // With `--json`, each entry exactly as the server sent it.
            let raw: Vec<Value> = read(&v)?;
            for e in &raw {
                if conn.json {
                    crate::outln!("{e}");
                } else {
                    let e: AuditAnswer = read(e)?;
                    let at = chrono::DateTime::from_timestamp_millis(e.at_ms)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default();
                    crate::outln!(
                        "#{} {} {:<18} {:<22} {} {}",
                        e.seq,
                        at,
                        e.kind,
                        e.actor,
                        e.request_id.as_deref().unwrap_or("-"),
                        e.detail
                    );
                }
            }
        }
        AuditCmd::Export { mut after } => loop {
            let v = c
                .call("audit.export", json!({"after": after, "limit": 5000}))
                .await?;
            // Each entry exactly as the server sent it (the export is what
            // `audit verify --file` checks).
            let page: Vec<Value> = read(&v)?;
            let Some(last) = page.last() else { break };
            after = read::<AuditAnswer>(last)?.seq;
            for e in &page {
                crate::outln!("{e}");
            }
        },
        AuditCmd::Prune { older_than_days } => {
            let mut p = json!({});
            if let Some(d) = older_than_days {
                p["older_than_days"] = json!(d);
            }
            let v = c.call("audit.prune", p).await?;
            let a: PruneAnswer = read(&v)?;
            show(conn.json, &v, &a, |a| {
                match a.through_seq {
                Some(through) if a.pruned > 0 => format!(
                    "pruned {} entries (through entry {through}); a checkpoint entry records the last one",
                    a.pruned
                ),
                _ => "nothing to prune".to_string(),
            }
            });
        }
        AuditCmd::Verify { .. } => {
            let v = c.call("audit.verify", json!({})).await?;
            let a: ChainAnswer = read(&v)?;
            show(conn.json, &v, &a, |a| {
                if a.ok {
                    format!("audit chain ok: {} entries", a.entries.unwrap_or(0))
                } else {
                    format!(
                        "audit chain BROKEN at entry {}: {}",
                        a.broken_at.unwrap_or(0),
                        a.problem.as_deref().unwrap_or("")
                    )
                }
            });
            return Ok(if a.ok { 0 } else { EXIT_DENIED });
        }
    }
    Ok(0)
}

fn verify_file(path: &std::path::Path, json_out: bool) -> anyhow::Result<u8> {
    use crate::domain::audit::{parse_export_line, ChainVerifier};
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("while reading {}", path.display()))?;
    let mut entries = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match parse_export_line(line) {
            Ok(e) => entries.push(e),
            // A line that is not exactly an entry (a field added, missing
            // or repeated) is a doctored export, not a usage error.
            Err(e) => {
                let problem = format!("line {} is not an audit entry: {e}", i + 1);
                let v = json!({"ok": false, "broken_at_line": i + 1, "problem": problem});
                show(json_out, &v, &(), |_| {
                    format!("audit export BROKEN at line {}: {problem}", i + 1)
                });
                return Ok(EXIT_DENIED);
            }
        }
    }
    let mut walk = ChainVerifier::new();
    let result = entries
        .iter()
        .try_for_each(|e| walk.push(e))
        .and_then(|()| walk.finish());
    let v = match &result {
        Ok(n) => json!({"ok": true, "entries": n}),
        Err(b) => json!({"ok": false, "broken_at": b.seq, "problem": b.problem}),
    };
    show(json_out, &v, &result, |result| match result {
        Ok(n) => format!("audit export ok: {n} entries"),
        Err(b) => format!("audit export BROKEN at entry {}: {}", b.seq, b.problem),
    });
    Ok(if result.is_ok() { 0 } else { EXIT_DENIED })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and positional of every subcommand, with no help text.
    fn missing_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                out.push(format!("{path} {} (subcommand)", sub.get_name()));
            }
            missing_help(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_and_subcommand_has_help_text() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        missing_help(&cmd, "keyturn", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
