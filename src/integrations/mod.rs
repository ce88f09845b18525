//! Adapters that put Keyturn in front of agents people already run: the
//! Claude Code hook, `keyturn exec` and the MCP gating proxy. They are clients
//! of the agent socket like any other agent, and they fail closed: whatever
//! goes wrong on the way to a decision (no socket, garbage, a timeout) ends in
//! "not approved".
//!
//! This module owns the blocking gate used by the hook and `exec` — plain
//! `std` sockets, no async runtime, because the hook runs before every tool
//! call and its start-up time is felt all day. It must not import `app`,
//! `store` or `discord`: it speaks only the wire protocol of `ipc::protocol`,
//! over the agent socket or, given a URL, over TCP (`ipc::tcp_endpoint`).

pub mod exec;
pub mod hook;
pub mod mcp_proxy;

use crate::ipc::protocol::{read_response, request_line, DecisionView, ResponseError, RpcError};
use crate::ipc::tcp_endpoint::{BlockingStream, DialError, TcpTarget};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the socket is: `--socket`, else the config file's `socket_path`,
/// else `./keyturn.sock` (the same rule as the rest of the CLI).
pub fn socket_path(socket: Option<&Path>, config: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if let Some(c) = config {
        // Parse only: full validation compiles the redaction rules, which
        // would cost the hook several milliseconds for one path.
        let text = std::fs::read_to_string(c)
            .map_err(|e| format!("cannot read config file {}: {e}", c.display()))?;
        let cfg = crate::config::Config::parse(&text)
            .map_err(|e| format!("config file {}: {e}", c.display()))?;
        let p = cfg.server.socket_path;
        // Relative to the config file, as `serve` resolves it.
        return Ok(if p.is_relative() {
            c.parent().unwrap_or(Path::new(".")).join(p)
        } else {
            p
        });
    }
    Ok(PathBuf::from("keyturn.sock"))
}

/// Where the gate asks: the agent socket, or a Keyturn over TCP.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Socket(PathBuf),
    Tcp(TcpTarget),
}

impl Endpoint {
    /// `--url` (with the token from `token_env`, default `KEYTURN_TOKEN`,
    /// and the CA `ca`, default `KEYTURN_CA`) when given, else the socket
    /// as [`socket_path`] finds it.
    pub fn find(
        url: Option<&str>,
        token_env: Option<&str>,
        ca: Option<&Path>,
        socket: Option<&Path>,
        config: Option<&Path>,
    ) -> Result<Endpoint, String> {
        match url.filter(|u| !u.is_empty()) {
            Some(u) => Ok(Endpoint::Tcp(TcpTarget::from_env(u, token_env, ca)?)),
            None => Ok(Endpoint::Socket(socket_path(socket, config)?)),
        }
    }

    /// For messages.
    pub fn shown(&self) -> String {
        match self {
            Endpoint::Socket(p) => p.display().to_string(),
            Endpoint::Tcp(t) => t.url.clone(),
        }
    }
}

/// The flags every agent-side gate takes to reach Keyturn over TCP.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct UrlArgs {
    /// Reach Keyturn over TCP instead of the socket:
    /// keyturn+tls://HOST:PORT (or keyturn+tcp://127.0.0.1:PORT on this
    /// host). The agent's bearer token comes from KEYTURN_TOKEN.
    #[arg(long, env = "KEYTURN_URL")]
    pub url: Option<String>,
    /// The variable holding the bearer token (default KEYTURN_TOKEN).
    #[arg(long, value_name = "NAME")]
    pub token_env: Option<String>,
    /// CA certificate (PEM) to trust for keyturn+tls:// (self-signed
    /// deployments); default: KEYTURN_CA, else the public web roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl UrlArgs {
    /// See [`Endpoint::find`].
    pub fn endpoint(
        &self,
        socket: Option<&Path>,
        config: Option<&Path>,
    ) -> Result<Endpoint, String> {
        Endpoint::find(
            self.url.as_deref(),
            self.token_env.as_deref(),
            self.ca.as_deref(),
            socket,
            config,
        )
    }
}

/// Why the gate could not get a decision.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot connect to Keyturn at {path}: {source} (is `keyturn serve` running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to Keyturn failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("Keyturn sent something that is not a JSON-RPC response: {0}")]
    Protocol(String),
    #[error("Keyturn refused the call: {0}")]
    Rpc(RpcError),
    /// Connecting over TCP failed (connect, TLS handshake).
    #[error("{0}")]
    Dial(String),
    /// The answer is about another call than the one asked about (another
    /// tool, other arguments, another request): never act on it.
    #[error("Keyturn's answer is about a different call ({0})")]
    Mismatch(String),
    /// The gate's own client withdrew the call (MCP cancellation, or the
    /// client went away); the request was cancelled with it.
    #[error("the call was withdrawn by the client")]
    Withdrawn,
}

/// The gate's connection: the agent socket, or TCP (plain or TLS).
enum GateStream {
    Unix(UnixStream),
    Tcp(BlockingStream),
}

impl std::io::Read for GateStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            GateStream::Unix(s) => s.read(buf),
            GateStream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for GateStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            GateStream::Unix(s) => s.write(buf),
            GateStream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            GateStream::Unix(s) => s.flush(),
            GateStream::Tcp(s) => s.flush(),
        }
    }
}

impl GateStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            GateStream::Unix(s) => s.set_read_timeout(t),
            GateStream::Tcp(s) => s.socket().set_read_timeout(t),
        }
    }
}

/// A second handle on a gate's connection, to shut it down from another
/// thread (see [`Withdraw`]).
#[derive(Debug)]
pub enum StreamHandle {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl StreamHandle {
    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            StreamHandle::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            StreamHandle::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }
}

/// A blocking JSON-RPC client over the agent socket or TCP: one line out,
/// one in.
pub struct LineClient {
    reader: BufReader<GateStream>,
    next_id: u64,
}

impl LineClient {
    /// A second handle on the connection, to shut it down from elsewhere.
    pub fn stream_handle(&self) -> std::io::Result<StreamHandle> {
        match self.reader.get_ref() {
            GateStream::Unix(s) => s.try_clone().map(StreamHandle::Unix),
            GateStream::Tcp(s) => s.socket().try_clone().map(StreamHandle::Tcp),
        }
    }

    /// Connects to the socket, or over TCP (authenticated with the
    /// target's token).
    pub fn connect(at: &Endpoint) -> Result<LineClient, GateError> {
        let stream = match at {
            Endpoint::Socket(path) => {
                GateStream::Unix(UnixStream::connect(path).map_err(|source| {
                    GateError::Connect {
                        path: path.display().to_string(),
                        source,
                    }
                })?)
            }
            Endpoint::Tcp(t) => GateStream::Tcp(t.connect_blocking().map_err(|e| match e {
                DialError::Refused(e) => GateError::Rpc(e),
                DialError::Protocol(why) => GateError::Protocol(why),
                other => GateError::Dial(other.to_string()),
            })?),
        };
        Ok(LineClient {
            reader: BufReader::new(stream),
            next_id: 1,
        })
    }

    /// Calls `method`; `deadline` bounds the wait for the answer (an
    /// `Io` error of kind `WouldBlock`/`TimedOut` when it passes).
    pub fn call(
        &mut self,
        method: &str,
        params: Value,
        deadline: Option<Instant>,
    ) -> Result<Value, GateError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = request_line(id, method, &params);
        line.push('\n');
        let stream = self.reader.get_mut();
        stream.write_all(line.as_bytes())?;
        let timeout = match deadline {
            Some(d) => Some(
                d.checked_duration_since(Instant::now())
                    .filter(|t| !t.is_zero())
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))?,
            ),
            None => None,
        };
        self.reader.get_ref().set_read_timeout(timeout)?;
        let mut buf = String::new();
        if self.reader.read_line(&mut buf)? == 0 {
            return Err(GateError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
        read_response(buf.trim_end(), id).map_err(|e| match e {
            ResponseError::Rpc(e) => GateError::Rpc(e),
            ResponseError::Protocol(why) => GateError::Protocol(why),
        })
    }
}

fn is_timeout(e: &GateError) -> bool {
    matches!(e, GateError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// Who is asking, and where.
#[derive(Debug, Clone)]
pub struct Identity {
    pub socket: Endpoint,
    pub agent: String,
    pub token: Option<String>,
}

/// The outcome of asking, reduced to what a gate does with it.
#[derive(Debug)]
pub enum Outcome {
    /// Run it.
    Approved(DecisionView),
    /// Denied by a person or the policy, or cancelled.
    Denied(DecisionView),
    /// Nobody decided in time: Keyturn's own deadline (`view` is the
    /// timed-out request) or the gate's wait budget (`view` is `None`).
    TimedOut {
        view: Option<DecisionView>,
        waited: Duration,
        request_id: Option<String>,
    },
    /// No decision could be had; fail closed.
    Failed(GateError),
}

impl Outcome {
    pub fn approved(&self) -> bool {
        matches!(self, Outcome::Approved(_))
    }

    /// One line for the agent (or the person reading its transcript).
    pub fn reason(&self) -> String {
        match self {
            Outcome::Approved(v) => format!("Keyturn {}: {}", v.request_id, v.summary),
            Outcome::Denied(v) => format!(
                "Keyturn {}: {} — the call was not run",
                v.request_id, v.summary
            ),
            Outcome::TimedOut {
                waited, request_id, ..
            } => format!(
                "Keyturn{}: timed out after {:.0?} waiting for a human decision; nobody approved, so the call was not run",
                request_id.as_deref().map(|i| format!(" {i}")).unwrap_or_default(),
                waited
            ),
            Outcome::Failed(e) => {
                format!("Keyturn could not decide ({e}); failing closed, the call was not run")
            }
        }
    }
}

fn view(v: Value) -> Result<DecisionView, GateError> {
    serde_json::from_value(v).map_err(|e| GateError::Protocol(format!("bad decision: {e}")))
}

/// The call a gate asked about: an answer is acted on only if it is about
/// exactly this call. An idempotency key or a request id that another call
/// already used must never turn someone else's approval into ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub tool: String,
    /// [`crate::domain::canonical::args_hash`] of the arguments sent.
    pub args_hash: String,
}

impl Asked {
    /// What `submit` params (`tool`, `args`) ask about.
    pub fn from_params(p: &Value) -> Asked {
        Asked {
            tool: p.get("tool").and_then(Value::as_str).unwrap_or("").into(),
            args_hash: crate::domain::canonical::args_hash(p.get("args").unwrap_or(&Value::Null)),
        }
    }

    /// `Ok` only when `d` answers this call (and, if given, this request).
    pub fn check(
        &self,
        d: DecisionView,
        request_id: Option<&str>,
    ) -> Result<DecisionView, GateError> {
        // An answer an approver edited from exactly this call is accepted
        // with its edited arguments (present and matching their hash): the
        // gate must then run those ([`DecisionView::edited_from`]).
        let edited_ok = d.tool == self.tool && d.edited_from(&self.args_hash).is_some();
        if let Some(why) = d
            .mismatch(&self.tool, &self.args_hash)
            .filter(|_| !edited_ok)
        {
            return Err(GateError::Mismatch(why));
        }
        if let Some(id) = request_id.filter(|id| *id != d.request_id) {
            return Err(GateError::Mismatch(format!(
                "waited for request {id}, the answer is about {}",
                d.request_id
            )));
        }
        Ok(d)
    }
}

/// Lets another thread withdraw a call that [`ask_abortable`] is waiting
/// on: the connection is shut down, and the server cancels the request
/// (`client_gone`), as it does for any waiting client that goes away.
#[derive(Debug, Default)]
pub struct Withdraw {
    state: std::sync::Mutex<(bool, Option<StreamHandle>)>,
}

impl Withdraw {
    /// Withdraws the call (now, or as soon as it connects).
    pub fn withdraw(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = true;
        if let Some(s) = st.1.take() {
            let _ = s.shutdown();
        }
    }

    pub fn withdrawn(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Records the connection; `false` if the call is already withdrawn.
    fn attach(&self, s: StreamHandle) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 {
            return false;
        }
        st.1 = Some(s);
        true
    }
}

fn classify(d: DecisionView, waited: Duration) -> Outcome {
    use crate::domain::request::State;
    match d.state {
        State::Approved => Outcome::Approved(d),
        State::TimedOut => Outcome::TimedOut {
            request_id: Some(d.request_id.clone()),
            view: Some(d),
            waited,
        },
        State::Pending => Outcome::TimedOut {
            request_id: Some(d.request_id.clone()),
            view: Some(d),
            waited,
        },
        State::Denied | State::Cancelled => Outcome::Denied(d),
    }
}

/// Submits `params` (a `submit` params object without `agent`/`token`/`wait`)
/// and blocks until a decision or until `budget` has passed. On its own
/// timeout it cancels the request, so a late click cannot approve a call
/// nobody is waiting for. Every answer is checked against what was asked
/// ([`Asked`]); one about another call fails closed.
pub fn ask(id: &Identity, params: Value, budget: Duration) -> Outcome {
    ask_abortable(id, params, budget, &Withdraw::default())
}

/// [`ask`] for a person at a terminal (`keyturn exec`): while the call
/// waits for a human, stderr says which request it is and how to approve it
/// (see [`PendingNotice`]).
pub fn ask_announcing(id: &Identity, params: Value, budget: Duration) -> Outcome {
    let mut params = params;
    if params.get("idempotency_key").is_none() {
        params["idempotency_key"] = json!(format!("keyturn-gate:{}", uuid::Uuid::new_v4()));
    }
    let mut lookup = params.clone();
    lookup["agent"] = json!(id.agent);
    if let Some(t) = &id.token {
        lookup["token"] = json!(t);
    }
    let _notice = PendingNotice::start(id.socket.clone(), lookup, NOTICE_AFTER);
    ask(id, params, budget)
}

/// How long a call may go unanswered before [`PendingNotice`] looks it up:
/// calls the policy decides are answered well within it, so they print nothing.
pub const NOTICE_AFTER: Duration = Duration::from_millis(300);

/// Prints `keyturn: request ID is waiting for approval: keyturn approve ID`
/// to stderr once a call has gone unanswered for a moment. It finds the
/// request by submitting the same call again under the same idempotency key
/// with `wait: false` (which returns the stored request, never a second
/// one) on its own connection, so the waiting call stays one call: killing
/// the process still cancels the request. Dropping it before it fires (the
/// answer came) prints nothing.
pub struct PendingNotice {
    _done: std::sync::mpsc::Sender<()>,
}

impl PendingNotice {
    /// `params`: the full `submit` params (agent, token, idempotency_key).
    pub fn start(socket: Endpoint, params: Value, after: Duration) -> PendingNotice {
        let (done, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if !matches!(
                rx.recv_timeout(after),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            ) {
                return;
            }
            let mut p = params;
            p["wait"] = json!(false);
            let found = LineClient::connect(&socket)
                .and_then(|mut c| {
                    c.call("submit", p, Some(Instant::now() + Duration::from_secs(2)))
                })
                .and_then(view);
            // The answer may have come meanwhile: say nothing then.
            if let (Ok(d), Err(std::sync::mpsc::TryRecvError::Empty)) = (found, rx.try_recv()) {
                if d.state == crate::domain::request::State::Pending {
                    crate::errln!("{}", pending_notice(&d.request_id));
                }
            }
        });
        PendingNotice { _done: done }
    }
}

/// The line [`PendingNotice`] prints.
pub fn pending_notice(request_id: &str) -> String {
    format!(
        "keyturn: request {request_id} is waiting for approval: keyturn approve {request_id} \
         (or keyturn deny {request_id}; on Discord, its card in the approvals channel if a bot is configured)"
    )
}

/// [`ask`], which `withdraw` can end early (the request is then cancelled
/// by the server, and the outcome is [`GateError::Withdrawn`]).
pub fn ask_abortable(
    id: &Identity,
    params: Value,
    budget: Duration,
    withdraw: &Withdraw,
) -> Outcome {
    match ask_inner(id, params, budget, withdraw) {
        Outcome::Approved(_) if withdraw.withdrawn() => Outcome::Failed(GateError::Withdrawn),
        Outcome::Failed(_) | Outcome::TimedOut { .. } if withdraw.withdrawn() => {
            Outcome::Failed(GateError::Withdrawn)
        }
        o => o,
    }
}

fn ask_inner(id: &Identity, mut params: Value, budget: Duration, withdraw: &Withdraw) -> Outcome {
    let started = Instant::now();
    let deadline = started + budget;
    let asked = Asked::from_params(&params);
    params["agent"] = json!(id.agent);
    if let Some(t) = &id.token {
        params["token"] = json!(t);
    }
    // One call that waits on the server: if this process is killed (or the
    // call withdrawn) at any moment, the connection closes with the call in
    // flight and the server cancels the request (`client_gone`). Two calls
    // (submit, then wait) would leave a moment between them where a kill
    // orphans a pending request.
    params["wait"] = json!(true);
    if params.get("idempotency_key").is_none() {
        // Lets the budget's expiry find the request again (see `give_up`).
        params["idempotency_key"] = json!(format!("keyturn-gate:{}", uuid::Uuid::new_v4()));
    }
    let mut client = match LineClient::connect(&id.socket) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e),
    };
    match client.stream_handle() {
        Ok(s) => {
            if !withdraw.attach(s) {
                return Outcome::Failed(GateError::Withdrawn);
            }
        }
        Err(e) => return Outcome::Failed(GateError::Io(e)),
    }
    // The server answers at the decision (woken, not polled) or at the
    // request's own deadline; our read deadline enforces the budget.
    let answer = client
        .call("submit", params.clone(), Some(deadline))
        .and_then(view)
        .and_then(|d| asked.check(d, None));
    let outcome = match answer {
        Ok(d) if d.state.is_terminal() => classify(d, started.elapsed()),
        Err(_) if withdraw.withdrawn() => Outcome::Failed(GateError::Withdrawn),
        // Still pending past the server's own grace: as for our budget.
        Ok(d) => give_up(id, &asked, Some(&d.request_id), &params, started),
        Err(e) if is_timeout(&e) => give_up(id, &asked, None, &params, started),
        Err(e) => Outcome::Failed(e),
    };
    // Closing with the call still in flight cancels it, should `give_up`
    // not have reached the server.
    drop(client);
    outcome
}

/// Cancels `request_id`, best effort, on a fresh connection (the old one
/// may hold a half-read answer). The request as it ended, if known.
fn cancel(id: &Identity, request_id: &str, reason: &str) -> Option<DecisionView> {
    let mut p = json!({"agent": id.agent, "id": request_id, "reason": reason});
    if let Some(t) = &id.token {
        p["token"] = json!(t);
    }
    LineClient::connect(&id.socket)
        .and_then(|mut c| c.call("cancel", p, Some(Instant::now() + Duration::from_secs(2))))
        .ok()
        .and_then(|v| view(v).ok())
}

/// The budget passed with no decision: cancel the request, saying why, so a
/// late click cannot approve a call nobody is waiting for. Its id, when the
/// answer did not carry it, comes from submitting the same call again under
/// the same idempotency key (which returns the request, not a new one).
fn give_up(
    id: &Identity,
    asked: &Asked,
    request_id: Option<&str>,
    params: &Value,
    started: Instant,
) -> Outcome {
    let waited = started.elapsed();
    let request_id = request_id.map(str::to_string).or_else(|| {
        let mut p = params.clone();
        p["wait"] = json!(false);
        LineClient::connect(&id.socket)
            .and_then(|mut c| c.call("submit", p, Some(Instant::now() + Duration::from_secs(2))))
            .and_then(view)
            .and_then(|d| asked.check(d, None))
            .ok()
            .map(|d| d.request_id)
    });
    // A decision can land between our timeout and the cancel: honour a
    // denial, but never run an approval we no longer wait for.
    let view = request_id.as_deref().and_then(|rid| {
        cancel(
            id,
            rid,
            &format!("the agent stopped waiting after {waited:.0?}"),
        )
    });
    Outcome::TimedOut {
        view,
        waited,
        request_id,
    }
}

/// Maps a tool name onto the characters policies accept (ASCII letters,
/// digits and `_.:-/`); anything else becomes `_`.
pub fn policy_tool_name(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.:-/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
