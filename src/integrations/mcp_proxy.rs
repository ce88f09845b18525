//! `keyturn mcp-proxy --name NAME -- <command>`: a gate between an MCP
//! client (our stdin/stdout) and an MCP server that speaks stdio (the child).
//!
//! Every line passes through untouched except the client's `tools/call`
//! requests: each is submitted to Keyturn as tool `NAME.<tool>` with the
//! call's arguments, and forwarded to the server only once approved. Client
//! lines are read strictly (no duplicate keys, no number that would be
//! rounded, nothing but JSON); a line that fails is answered with a JSON-RPC
//! error and never forwarded, as is a `tools/call` whose `name` is missing,
//! empty or not a string or whose `arguments` is present but not an object. A
//! denial or a timeout becomes a tool result with `isError: true` whose text
//! says who denied it and why, or that nobody decided in time. With
//! `--filter-tools`, `tools/list` answers hide the tools the policy would
//! deny whatever the arguments. The child's stderr is ours; its exit ends the
//! proxy, and requests still in flight then get JSON-RPC errors, not silence.
//! A call the client cancels (`notifications/cancelled`) while it waits for
//! Keyturn, or every such call when the client goes away (stdin closed), is
//! withdrawn: its request is cancelled (`client_gone`), so a late approval
//! runs nothing.
//!
//! Tool annotations (`destructiveHint`, `readOnlyHint`) are shown to the
//! approver in the justification; they do not change the risk, because the
//! gateway takes a tool's risk only from its own configuration (a tool not
//! listed there is already `high`).

use super::hook::parse_duration;
use super::{ask_abortable, policy_tool_name, Identity, LineClient, Outcome, Withdraw};
use crate::domain::canonical::parse_strict;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Server name: its tools are gated as `NAME.<tool>`.
    #[arg(long)]
    pub name: String,
    /// Agent name.
    #[arg(long, env = "KEYTURN_AGENT", default_value = "mcp")]
    pub agent: String,
    /// Agent token, if the agent has one.
    #[arg(long, env = "KEYTURN_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Socket path (overrides the config).
    #[arg(long, env = "KEYTURN_SOCKET")]
    pub socket: Option<PathBuf>,
    #[command(flatten)]
    pub url: super::UrlArgs,
    /// Config file (used to find the socket).
    #[arg(long, env = "KEYTURN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Hide from `tools/list` the tools the policy would always deny.
    #[arg(long, env = "KEYTURN_MCP_FILTER_TOOLS")]
    pub filter_tools: bool,
    /// Nobody is watching: calls that need a human are denied at once.
    #[arg(long)]
    pub unattended: bool,
    /// Longest wait for a decision per call (default: Keyturn's own deadline).
    #[arg(long, value_parser = parse_duration)]
    pub approval_timeout: Option<Duration>,
    /// On whose behalf (a paired user id).
    #[arg(long)]
    pub user: Option<String>,
    /// Channel id the work belongs to.
    #[arg(long)]
    pub channel: Option<String>,
    /// The MCP server's command line (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

enum Out {
    Line(String),
    Flush(oneshot::Sender<()>),
}

#[derive(Default)]
struct State {
    /// Client requests not yet answered (by id, as JSON text).
    inflight: HashMap<String, Value>,
    /// Ids of `tools/list` requests, whose answers may be filtered.
    lists: HashSet<String>,
    /// Annotations seen in `tools/list` answers, by tool.
    annotations: HashMap<String, Value>,
    /// The child is gone: nothing more is forwarded.
    dead: bool,
    /// `tools/call` requests still waiting for Keyturn, by id: withdrawn
    /// when the client cancels them or goes away.
    gates: HashMap<String, Arc<Withdraw>>,
}

struct Proxy {
    args: ProxyArgs,
    id: Identity,
    state: Mutex<State>,
    out: mpsc::UnboundedSender<Out>,
    /// `None` once the client has left: the server's stdin is then closed.
    to_child: Mutex<Option<mpsc::UnboundedSender<String>>>,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn error_line(id: &Value, code: i64, message: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}).to_string()
}

/// The answer to a call that was not approved: a tool result the model can read.
pub fn refusal(id: &Value, text: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": {
        "content": [{"type": "text", "text": text}],
        "isError": true,
    }})
    .to_string()
}

impl Proxy {
    fn send(&self, line: String) {
        let _ = self.out.send(Out::Line(line));
    }

    fn forward(&self, line: String) {
        let tx = self.to_child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send(line);
        }
    }

    /// One line from the client.
    fn on_client_line(self: &Arc<Self>, line: String) {
        // Read strictly: a line the server might read differently from us
        // (a duplicate key, a number we would round, or text a lenient
        // parser accepts, like `NaN`) could carry a call past the gate, so
        // it is answered here and never forwarded.
        let msg: Value = match parse_strict(&line) {
            Ok(v) => v,
            Err(e) => {
                self.send(error_line(
                    &Value::Null,
                    if e.at().is_some() { -32600 } else { -32700 },
                    &format!("keyturn mcp-proxy refused the message: {e}"),
                ));
                return;
            }
        };
        if msg.is_array() {
            // A batch could smuggle a tools/call past the gate.
            self.send(error_line(
                &Value::Null,
                -32600,
                "keyturn mcp-proxy does not accept JSON-RPC batches; send one message per line",
            ));
            return;
        }
        let method = msg
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_string);
        let id = msg.get("id").cloned();
        match (method.as_deref(), id) {
            (Some("tools/call"), Some(id)) => {
                let target = match call_target(&msg) {
                    Ok(t) => t,
                    Err(why) => {
                        // Nothing forwarded, nothing queued.
                        self.send(error_line(&id, -32602, &why));
                        return;
                    }
                };
                let key = id.to_string();
                let withdraw = Arc::new(Withdraw::default());
                {
                    let mut st = lock(&self.state);
                    st.inflight.insert(key.clone(), id.clone());
                    st.gates.insert(key, withdraw.clone());
                }
                let me = self.clone();
                tokio::spawn(async move { me.gate(id, target, line, withdraw).await });
            }
            (Some("tools/call"), None) => {
                // A call without an id cannot be answered; it is not forwarded either.
                crate::errln!("keyturn mcp-proxy: dropped a tools/call without an id");
            }
            (Some(m), Some(id)) => {
                let key = id.to_string();
                {
                    let mut st = lock(&self.state);
                    st.inflight.insert(key.clone(), id.clone());
                    if m == "tools/list" {
                        st.lists.insert(key);
                    }
                }
                self.forward(line);
            }
            // Notifications and answers to the server's own requests.
            (method, _) => {
                if method == Some("notifications/cancelled") {
                    if let Some(rid) = msg.pointer("/params/requestId") {
                        self.withdraw(&rid.to_string());
                    }
                }
                // Also for a call already forwarded: the server stops it.
                self.forward(line);
            }
        }
    }

    /// The client cancelled call `key` (or left): if it still waits for
    /// Keyturn, withdraw it, so its request is cancelled (`client_gone`) and
    /// a late approval runs nothing. No answer is sent for it.
    fn withdraw(&self, key: &str) {
        let gate = {
            let mut st = lock(&self.state);
            let gate = st.gates.remove(key);
            if gate.is_some() {
                st.inflight.remove(key);
            }
            gate
        };
        if let Some(g) = gate {
            g.withdraw();
        }
    }

    /// The client went away: withdraw every call still waiting for Keyturn.
    fn withdraw_all(&self) {
        let keys: Vec<String> = lock(&self.state).gates.keys().cloned().collect();
        for k in keys {
            self.withdraw(&k);
        }
    }

    async fn gate(
        self: Arc<Self>,
        id: Value,
        (tool, args): (String, Value),
        line: String,
        withdraw: Arc<Withdraw>,
    ) {
        let key = id.to_string();
        let tool = tool.as_str();
        let hints = lock(&self.state)
            .annotations
            .get(tool)
            .map(|a| format!(" (annotations: {a})"))
            .unwrap_or_default();
        let mut p = json!({
            "tool": policy_tool_name(&format!("{}.{tool}", self.args.name)),
            "args": args,
            "justification": format!("MCP server `{}`: tools/call {tool}{hints}", self.args.name),
            "unattended": self.args.unattended,
        });
        if let Some(u) = &self.args.user {
            p["user_id"] = json!(u);
        }
        if let Some(c) = &self.args.channel {
            p["channel_id"] = json!(c);
        }
        let budget = self
            .args
            .approval_timeout
            .unwrap_or(Duration::from_secs(7 * 24 * 3600));
        let ident = self.id.clone();
        let w = withdraw.clone();
        let outcome = tokio::task::spawn_blocking(move || ask_abortable(&ident, p, budget, &w))
            .await
            .unwrap_or_else(|e| {
                Outcome::Failed(super::GateError::Protocol(format!("gate task failed: {e}")))
            });
        let mut st = lock(&self.state);
        st.gates.remove(&key);
        if st.dead || !st.inflight.contains_key(&key) || withdraw.withdrawn() {
            // Answered when the server died, or withdrawn by the client.
            return;
        }
        let edited = match &outcome {
            Outcome::Approved(d) if d.edited => {
                Some(edited_call(&line, d.args.as_ref()).ok_or(format!(
                    "Keyturn {}: an approver edited this call, and the edited arguments cannot \
                     be forwarded; failing closed, the call was not run",
                    d.request_id
                )))
            }
            _ => None,
        };
        if let Some(Err(why)) = &edited {
            st.inflight.remove(&key);
            drop(st);
            crate::errln!("keyturn mcp-proxy: {why}");
            self.send(refusal(&id, why));
        } else if matches!(outcome, Outcome::Approved(_)) {
            drop(st);
            // What runs is what the approver saw: their edit, if they made one.
            self.forward(edited.and_then(Result::ok).unwrap_or(line));
        } else {
            st.inflight.remove(&key);
            drop(st);
            crate::errln!("keyturn mcp-proxy: {}", outcome.reason());
            self.send(refusal(&id, &outcome.reason()));
        }
    }

    /// One line from the server.
    async fn on_child_line(&self, line: String) {
        let Ok(mut msg) = serde_json::from_str::<Value>(&line) else {
            self.send(line);
            return;
        };
        let is_response = msg.get("method").is_none()
            && (msg.get("result").is_some() || msg.get("error").is_some());
        let Some(key) = msg.get("id").filter(|_| is_response).map(Value::to_string) else {
            self.send(line);
            return;
        };
        let was_list = {
            let mut st = lock(&self.state);
            st.inflight.remove(&key);
            st.lists.remove(&key)
        };
        if !was_list {
            self.send(line);
            return;
        }
        if let Some(tools) = msg.pointer("/result/tools").and_then(Value::as_array) {
            let mut st = lock(&self.state);
            for t in tools {
                if let (Some(n), Some(a)) =
                    (t.get("name").and_then(Value::as_str), t.get("annotations"))
                {
                    st.annotations.insert(n.to_string(), a.clone());
                }
            }
        }
        if !self.args.filter_tools {
            self.send(line);
            return;
        }
        let names: Vec<String> = msg
            .pointer("/result/tools")
            .and_then(Value::as_array)
            .map(|ts| {
                ts.iter()
                    .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let (ident, server, a) = (self.id.clone(), self.args.name.clone(), self.args.clone());
        let denied =
            tokio::task::spawn_blocking(move || never_allowed(&ident, &server, &a, &names))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        match denied {
            Ok(denied) => {
                if let Some(tools) = msg
                    .pointer_mut("/result/tools")
                    .and_then(Value::as_array_mut)
                {
                    tools.retain(|t| {
                        !t.get("name")
                            .and_then(Value::as_str)
                            .is_some_and(|n| denied.contains(n))
                    });
                }
                self.send(msg.to_string());
            }
            Err(e) => {
                // Calls are gated anyway; the list is only a convenience.
                crate::errln!(
                    "keyturn mcp-proxy: cannot filter tools/list ({e}); passing it through"
                );
                self.send(line);
            }
        }
    }

    /// The child is gone: every request still in flight gets an error.
    fn child_gone(&self, why: &str) {
        let ids: Vec<Value> = {
            let mut st = lock(&self.state);
            st.dead = true;
            st.inflight.drain().map(|(_, id)| id).collect()
        };
        for id in ids {
            self.send(error_line(&id, -32603, why));
        }
    }
}

/// The `tools/call` line with its `arguments` replaced by an approver's
/// edit (an object); `None` when that cannot be done exactly.
fn edited_call(line: &str, args: Option<&Value>) -> Option<String> {
    let args = args.filter(|a| a.is_object())?;
    let mut msg: Value = serde_json::from_str(line).ok()?;
    let params = msg.get_mut("params")?.as_object_mut()?;
    params.insert("arguments".into(), args.clone());
    serde_json::to_string(&msg).ok()
}

/// The tool name and arguments of a `tools/call`, exactly as the server
/// will read them, or why the call is refused (a JSON-RPC -32602): the
/// approver must see the call that runs, so nothing is defaulted or
/// rewritten. `arguments` may be absent (no arguments: `{}`), else it must
/// be an object; `name` must be a non-empty string the policy can name as
/// it is.
fn call_target(msg: &Value) -> Result<(String, Value), String> {
    let Some(params) = msg.get("params").and_then(Value::as_object) else {
        return Err("tools/call needs `params` with the tool's `name`".into());
    };
    let name = match params.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n,
        Some(Value::String(_)) => return Err("tools/call has an empty tool `name`".into()),
        Some(_) => return Err("tools/call `name` must be a string".into()),
        None => return Err("tools/call has no tool `name`".into()),
    };
    if policy_tool_name(name) != *name {
        return Err(format!(
            "tools/call `name` {:?} may contain only ASCII letters, digits and `_.:-/`",
            name.chars().take(64).collect::<String>()
        ));
    }
    let args = match params.get("arguments") {
        None => json!({}),
        Some(Value::Object(m)) => Value::Object(m.clone()),
        Some(other) => {
            let kind = match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
            };
            return Err(format!(
                "tools/call `arguments` must be an object (or absent), not {kind}"
            ));
        }
    };
    Ok((name.clone(), args))
}

/// The tools (by MCP name) the policy denies whatever the arguments.
fn never_allowed(
    id: &Identity,
    server: &str,
    a: &ProxyArgs,
    names: &[String],
) -> Result<HashSet<String>, String> {
    let mut c = LineClient::connect(&id.socket).map_err(|e| e.to_string())?;
    let mut denied = HashSet::new();
    for n in names {
        let mut p = json!({
            "agent": id.agent,
            "tool": policy_tool_name(&format!("{server}.{n}")),
            "args": {},
            "unattended": a.unattended,
        });
        if let Some(t) = &id.token {
            p["token"] = json!(t);
        }
        if let Some(u) = &a.user {
            p["user_id"] = json!(u);
        }
        if let Some(ch) = &a.channel {
            p["channel_id"] = json!(ch);
        }
        let v = c
            .call(
                "check",
                p,
                Some(std::time::Instant::now() + Duration::from_secs(10)),
            )
            .map_err(|e| e.to_string())?;
        if v.pointer("/verdict/action").and_then(Value::as_str) == Some("deny") {
            denied.insert(n.clone());
        }
    }
    Ok(denied)
}

pub async fn run(a: ProxyArgs) -> anyhow::Result<u8> {
    use anyhow::Context;
    anyhow::ensure!(
        !a.name.is_empty() && policy_tool_name(&a.name) == a.name,
        "--name may contain only ASCII letters, digits and `_.:-/`"
    );
    let socket = a
        .url
        .endpoint(a.socket.as_deref(), a.config.as_deref())
        .map_err(anyhow::Error::msg)?;
    let mut child = tokio::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("while starting the MCP server `{}`", a.command[0]))?;
    let (Some(mut child_in), Some(child_out)) = (child.stdin.take(), child.stdout.take()) else {
        anyhow::bail!("the MCP server's stdio is not available");
    };

    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Out>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(m) = out_rx.recv().await {
            match m {
                Out::Line(mut l) => {
                    l.push('\n');
                    if stdout.write_all(l.as_bytes()).await.is_err()
                        || stdout.flush().await.is_err()
                    {
                        break;
                    }
                }
                Out::Flush(done) => {
                    let _ = stdout.flush().await;
                    let _ = done.send(());
                }
            }
        }
    });
    let (child_tx, mut child_rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(mut l) = child_rx.recv().await {
            l.push('\n');
            if child_in.write_all(l.as_bytes()).await.is_err() || child_in.flush().await.is_err() {
                break;
            }
        }
        // Dropping child_in closes the server's stdin.
    });

    let proxy = Arc::new(Proxy {
        id: Identity {
            socket,
            agent: a.agent.clone(),
            token: a.token.clone(),
        },
        args: a,
        state: Mutex::new(State::default()),
        out: out_tx.clone(),
        to_child: Mutex::new(Some(child_tx)),
    });

    // Our stdin on a plain thread: a blocked read must not hold the runtime open.
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if in_tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });

    let from_child = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(child_out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                proxy.on_child_line(l).await;
            }
        })
    };

    let mut stdin_open = true;
    let status = loop {
        tokio::select! {
            line = in_rx.recv(), if stdin_open => match line {
                Some(l) => proxy.on_client_line(l),
                None => {
                    // The client left: nobody waits for the calls still
                    // gated (cancel them), close the server's stdin and
                    // let it exit.
                    stdin_open = false;
                    proxy.withdraw_all();
                    *proxy.to_child.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            },
            st = child.wait() => break st,
        }
    };
    let _ = from_child.await;
    let code = match &status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        }
        Err(_) => 1,
    };
    proxy.child_gone(&format!(
        "the MCP server exited ({}) before answering",
        match &status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        }
    ));
    let (done, flushed) = oneshot::channel();
    let _ = out_tx.send(Out::Flush(done));
    let _ = tokio::time::timeout(Duration::from_secs(5), flushed).await;
    drop(writer);
    // Gate threads may still be blocked on Keyturn for calls nobody will
    // read; dropping the runtime would wait for them. Everything owed to
    // the client is written: leave now.
    std::process::exit(code.clamp(0, 255));
}
