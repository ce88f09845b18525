//! One JSON-RPC line in, one response line out. No sockets here: the server
//! passes the peer's uid and which socket it came through, and tests can
//! drive this directly.
//!
//! Admin methods ([`ADMIN_METHODS`]) are served only on the admin socket,
//! whatever the peer's uid: an agent connection can never approve, grant or
//! read the audit log, even when it runs as an admin uid.

use super::protocol::{reply, response, DecisionView, RpcError};
use crate::app::connection::ConnectionStatus;
use crate::app::health::HealthProbe;
use crate::app::{AppError, Gateway, Submission};
use crate::domain::canonical::{parse_strict, strict_number, StrictError};
use crate::domain::policy::Effect;
use crate::domain::request::{ApprovalRequest, RequestId, CLIENT_GONE};
use crate::domain::Risk;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Who is on the other end of a connection (from SO_PEERCRED), and which
/// socket it connected to.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
    /// Connected to the admin socket (`[admin] socket_path`), which only
    /// admin uids may reach; false for the agent socket.
    pub admin_socket: bool,
}

/// One call, parsed out of its line: only the id, the method and the
/// params are kept, so the line (and anything else it carried) is freed
/// before the call runs.
pub struct Call {
    id: Option<Value>,
    method: String,
    params: Value,
}

impl Call {
    /// The call's id (`Null` for a notification), for an answer that refuses it.
    pub fn id(&self) -> &Value {
        self.id.as_ref().unwrap_or(&Value::Null)
    }
}

/// Reads one JSON-RPC line strictly. `Err` is the response line refusing it.
pub fn parse_call(line: &str) -> Result<Call, String> {
    let msg: Value = match parse_strict(line) {
        Ok(v) => v,
        Err(e) => return Err(refused_line(line, &e)),
    };
    let Value::Object(mut obj) = msg else {
        return Err(response(
            &Value::Null,
            Err(RpcError::new("invalid_request", "expected a JSON object")),
        ));
    };
    let id = obj.remove("id");
    let id_ok = matches!(
        &id,
        None | Some(Value::Null | Value::Number(_) | Value::String(_))
    );
    let method = match obj.remove("method") {
        Some(Value::String(m)) => Some(m),
        _ => None,
    };
    let (Some(method), true, Some("2.0")) =
        (method, id_ok, obj.get("jsonrpc").and_then(Value::as_str))
    else {
        return Err(response(
            &id.unwrap_or(Value::Null),
            Err(RpcError::new(
                "invalid_request",
                "expected {\"jsonrpc\":\"2.0\",\"id\":…,\"method\":\"…\",\"params\":{…}}",
            )),
        ));
    };
    let params = obj.remove("params").unwrap_or(Value::Null);
    if !(params.is_object() || params.is_null()) {
        return Err(response(
            &id.unwrap_or(Value::Null),
            Err(RpcError::new("invalid_params", "params must be an object")),
        ));
    }
    Ok(Call { id, method, params })
}

pub struct Handler {
    gw: Arc<Gateway>,
    health: HealthProbe,
}

impl From<AppError> for RpcError {
    fn from(e: AppError) -> RpcError {
        if let AppError::Store(inner) = &e {
            tracing::error!(error = %inner, "store error");
        }
        RpcError::new(e.code(), e.to_string())
    }
}

fn params<T: DeserializeOwned>(p: Value) -> Result<T, RpcError> {
    let p = if p.is_null() { json!({}) } else { p };
    serde_json::from_value(p)
        .map_err(|e| RpcError::new("invalid_params", format!("invalid params: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitParams {
    agent: String,
    token: Option<String>,
    tool: String,
    #[serde(default = "empty_object")]
    args: Value,
    user_id: Option<String>,
    channel_id: Option<String>,
    #[serde(default)]
    justification: String,
    task_id: Option<String>,
    idempotency_key: Option<String>,
    #[serde(default)]
    cost: f64,
    timeout_secs: Option<u64>,
    #[serde(default)]
    unattended: bool,
    /// Block until the decision instead of returning at once.
    #[serde(default)]
    wait: bool,
    /// Keep the request pending if this connection goes away before the
    /// answer (by default a client that leaves cancels it: `client_gone`).
    #[serde(default)]
    detach: bool,
}

fn empty_object() -> Value {
    json!({})
}

impl SubmitParams {
    fn split(self) -> (String, Option<String>, Flow, Submission) {
        (
            self.agent,
            self.token,
            Flow {
                wait: self.wait,
                detach: self.detach,
            },
            Submission {
                tool: self.tool,
                args: self.args,
                user_id: self.user_id,
                channel_id: self.channel_id,
                justification: self.justification,
                task_id: self.task_id,
                idempotency_key: self.idempotency_key,
                cost: self.cost,
                timeout_secs: self.timeout_secs,
                unattended: self.unattended,
                // Set by the socket from SO_PEERCRED, never from the params.
                requester_uid: None,
            },
        )
    }
}

/// How a `submit` waits, and whether its request outlives the connection.
struct Flow {
    wait: bool,
    detach: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ById {
    /// Agent name; admins may leave it out to act on any request.
    agent: Option<String>,
    token: Option<String>,
    id: String,
    /// For `wait`: give up after this long and return the request still pending.
    timeout_secs: Option<u64>,
    /// For `cancel`.
    reason: Option<String>,
    /// For `wait`: leave the request pending if this connection goes away.
    #[serde(default)]
    detach: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    /// Agent name; admins may leave it out.
    agent: Option<String>,
    token: Option<String>,
    id: String,
    /// The arguments about to be executed.
    args: Value,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PruneParams {
    /// Prune entries older than this many days (default: audit.retention_days).
    older_than_days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideParams {
    id: String,
    reason: Option<String>,
    /// The operator's name, shown beside their uid (letters, digits,
    /// spaces and `_-.'` only, so it cannot imitate a uid).
    operator: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantParams {
    scope: String,
    tool: String,
    #[serde(default)]
    effect: Effect,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<u32>,
    scope: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EffectiveParams {
    #[serde(default = "default_agent")]
    agent: String,
    user_id: Option<String>,
    channel_id: Option<String>,
    roles: Option<Vec<String>>,
    #[serde(default = "star")]
    tool: String,
}

fn default_agent() -> String {
    "cli".into()
}
fn star() -> String {
    "*".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RiskParams {
    tool: String,
    /// `null` clears the override.
    risk: Option<Risk>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairingParams {
    code: Option<String>,
    user_id: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    display_name: Option<String>,
}

/// A method that takes no parameters.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    n: Option<u32>,
    after: Option<i64>,
    limit: Option<u32>,
}

fn parse_id(s: &str) -> Result<RequestId, RpcError> {
    s.parse()
        .map_err(|m: String| RpcError::new("invalid_params", m))
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::new("internal", e.to_string()))
}

/// Methods only admins may call.
pub const ADMIN_METHODS: &[&str] = &[
    "stats",
    "pending",
    "approve",
    "deny",
    "grant",
    "revoke",
    "tools.list",
    "tools.effective",
    "tools.risk",
    "tools.risks",
    "pairing.list",
    "pairing.request",
    "pairing.approve",
    "pairing.add",
    "pairing.revoke",
    "audit.tail",
    "audit.export",
    "audit.verify",
    "audit.prune",
];

impl Handler {
    pub fn new(gw: Arc<Gateway>) -> Handler {
        Handler {
            health: HealthProbe::new(gw.clone(), None),
            gw,
        }
    }

    /// Reports this Discord connection in `health` (when Discord is configured).
    pub fn with_discord(mut self, status: Option<ConnectionStatus>) -> Handler {
        self.health = HealthProbe::new(self.gw.clone(), status);
        self
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gw
    }

    /// Handles one line. `None` for a notification (no `id`), which gets no answer.
    pub async fn handle_line(&self, peer: Peer, line: &str) -> Option<String> {
        self.handle_line_on(peer, line, &CancellationToken::new())
            .await
    }

    /// [`Handler::handle_line`] for a call on a connection: `gone` fires when
    /// the peer has gone away (closed, killed). A `submit` or `wait` whose
    /// client leaves before its answer cancels the request (`client_gone`),
    /// so nobody can approve a call nobody is waiting for, unless the call
    /// set `detach`.
    pub async fn handle_line_on(
        &self,
        peer: Peer,
        line: &str,
        gone: &CancellationToken,
    ) -> Option<String> {
        match parse_call(line) {
            Ok(call) => self.handle_call(peer, call, gone).await,
            Err(reply) => Some(reply),
        }
    }

    /// Runs a call parsed by [`parse_call`]; `None` for a notification.
    pub async fn handle_call(
        &self,
        peer: Peer,
        call: Call,
        gone: &CancellationToken,
    ) -> Option<String> {
        let result = self.dispatch(peer, &call.method, call.params, gone).await;
        call.id.map(|id| reply(&id, result))
    }

    /// The client of a call waiting on request `id` left before its answer.
    /// An agent's call cancels the request (as the agent, already
    /// authenticated on this call) unless it asked to `detach`; an admin
    /// watching (`agent` is `None`) is not the agent's client.
    async fn client_left(
        &self,
        id: RequestId,
        agent: Option<&str>,
        detach: bool,
    ) -> Result<ApprovalRequest, RpcError> {
        let gw = &self.gw;
        let Some(agent) = agent.filter(|_| !detach) else {
            tracing::info!(request.id = %id, "the client went away; the detached request stays pending");
            return Ok(gw.status(id).await?);
        };
        match gw
            .cancel(
                id,
                &format!("agent:{agent}"),
                Some(agent),
                Some(CLIENT_GONE.into()),
            )
            .await
        {
            Ok(r) => {
                tracing::info!(request.id = %id, agent = %agent, "the client went away; request cancelled");
                Ok(r)
            }
            // Decided meanwhile: nothing to cancel.
            Err(AppError::AlreadyDecided(_)) => Ok(gw.status(id).await?),
            Err(e) => Err(e.into()),
        }
    }

    async fn dispatch(
        &self,
        peer: Peer,
        method: &str,
        p: Value,
        gone: &CancellationToken,
    ) -> Result<Out, RpcError> {
        let gw = &self.gw;
        // Admin rights come with the admin socket (and its uid check), never
        // with a uid alone: agent connections are never admins.
        let admin = peer.admin_socket && gw.is_admin_uid(peer.uid);
        if ADMIN_METHODS.contains(&method) && !admin {
            if !peer.admin_socket {
                return Err(RpcError::new(
                    "not_admin",
                    format!(
                        "`{method}` is an admin method and is served only on the admin socket ([admin] socket_path; the CLI finds it with --config or --admin-socket), not on the agent socket"
                    ),
                ));
            }
            return Err(AppError::NotAdmin.into());
        }
        let actor = |operator: &Option<String>| -> Result<(String, Option<String>), RpcError> {
            let name = match operator.as_deref() {
                Some(raw) => crate::domain::request::check_display_name(raw)
                    .map_err(|m| RpcError::new("invalid_params", m))?,
                None => None,
            };
            Ok((format!("uid:{}", peer.uid), name))
        };
        let who = format!("uid:{}", peer.uid);
        let value = match method {
            "ping" => Ok(json!({"pong": true, "admin": admin})),
            // On both sockets: it says what is down, never why, except to
            // an admin (error texts may name hosts or Discord's answers).
            "health" => {
                let _: Empty = params(p)?;
                let report = self.health.check(true).await;
                to_value(if admin {
                    report
                } else {
                    report.without_details()
                })
            }
            "submit" => {
                let (agent, token, flow, mut sub) = params::<SubmitParams>(p)?.split();
                gw.authenticate_agent(&agent, token.as_deref(), peer.uid)?;
                sub.requester_uid = Some(peer.uid);
                // The submit itself always completes (a half-stored request
                // would have no deadline and no card); only then is the
                // client's absence acted on.
                let r = gw.submit(&agent, sub).await?;
                let r = if r.state.is_terminal() {
                    r
                } else if flow.wait {
                    tokio::select! {
                        w = gw.wait(r.id, Some(&agent), None) => w?,
                        _ = gone.cancelled() => self.client_left(r.id, Some(&agent), flow.detach).await?,
                    }
                } else if gone.is_cancelled() {
                    // Nobody will read the request id: cancel, not orphan.
                    self.client_left(r.id, Some(&agent), flow.detach).await?
                } else {
                    r
                };
                return Ok(Out::Decision(Box::new(DecisionView::from(&r))));
            }
            "check" => {
                let (agent, token, _, sub) = params::<SubmitParams>(p)?.split();
                gw.authenticate_agent(&agent, token.as_deref(), peer.uid)?;
                to_value(gw.check(&agent, &sub).await?)
            }
            "wait" | "status" | "cancel" => {
                let q: ById = params(p)?;
                let id = parse_id(&q.id)?;
                let agent = match &q.agent {
                    Some(a) => {
                        gw.authenticate_agent(a, q.token.as_deref(), peer.uid)?;
                        Some(a.as_str())
                    }
                    None if admin => None,
                    None => return Err(RpcError::new("invalid_params", "`agent` is required")),
                };
                let r = match method {
                    "wait" => {
                        let waited = gw.wait(id, agent, q.timeout_secs.map(Duration::from_secs));
                        tokio::select! {
                            w = waited => w?,
                            _ = gone.cancelled() => self.client_left(id, agent, q.detach).await?,
                        }
                    }
                    "status" => gw.status_for(id, agent).await?,
                    _ => {
                        let by = agent.map(|a| format!("agent:{a}")).unwrap_or(who);
                        gw.cancel(id, &by, agent, q.reason).await?
                    }
                };
                return Ok(Out::Decision(Box::new(DecisionView::from(&r))));
            }
            "verify" => {
                let q: VerifyParams = params(p)?;
                let id = parse_id(&q.id)?;
                let agent = match &q.agent {
                    Some(a) => {
                        gw.authenticate_agent(a, q.token.as_deref(), peer.uid)?;
                        Some(a.as_str())
                    }
                    None if admin => None,
                    None => return Err(RpcError::new("invalid_params", "`agent` is required")),
                };
                to_value(gw.verify_args(id, agent, &q.args).await?)
            }
            "stats" => {
                let counts = gw.pending_counts();
                let total: usize = counts.values().sum();
                Ok(json!({"pending": total, "pending_by_agent": counts}))
            }
            "pending" => {
                let q: ListParams = params(p)?;
                to_value(gw.pending(q.limit.unwrap_or(100).min(10_000)).await?)
            }
            "approve" | "deny" => {
                let q: DecideParams = params(p)?;
                let id = parse_id(&q.id)?;
                let (voter, name) = actor(&q.operator)?;
                let v = gw
                    .vote(id, &voter, name, method == "approve", q.reason, true)
                    .await?;
                Ok(json!({
                    "decision": DecisionView::from(&v.request),
                    "approvals": v.have,
                    "approvals_required": v.need,
                }))
            }
            "grant" | "revoke" => {
                let q: GrantParams = params(p)?;
                let changed = if method == "grant" {
                    gw.grant(&q.scope, &q.tool, q.effect, &who).await?
                } else {
                    gw.revoke(&q.scope, &q.tool, q.effect, &who).await?
                };
                Ok(json!({"changed": changed}))
            }
            "tools.list" => {
                let q: ListParams = params(p)?;
                Ok(json!({
                    "grants": to_value(gw.grants(q.scope.as_deref()).await?)?,
                    "risks": gw.tool_risks().into_iter().map(|(t, r)| json!({"tool": t, "risk": r})).collect::<Vec<_>>(),
                }))
            }
            "tools.effective" => {
                let q: EffectiveParams = params(p)?;
                to_value(gw.effective(
                    &q.agent,
                    q.user_id.as_deref(),
                    q.channel_id.as_deref(),
                    q.roles,
                    &q.tool,
                )?)
            }
            "tools.risk" => {
                let q: RiskParams = params(p)?;
                gw.set_risk(&q.tool, q.risk, &who).await?;
                Ok(json!({"tool": q.tool, "risk": q.risk}))
            }
            "tools.risks" => Ok(json!(gw
                .tool_risks()
                .into_iter()
                .map(|(t, r)| json!({"tool": t, "risk": r}))
                .collect::<Vec<_>>())),
            "pairing.list" => {
                let (users, codes) = gw.pairings().await?;
                Ok(json!({"paired": to_value(users)?, "pending_codes": to_value(codes)?}))
            }
            "pairing.request" => {
                let q: PairingParams = params(p)?;
                let user = q
                    .user_id
                    .ok_or_else(|| RpcError::new("invalid_params", "`user_id` is required"))?;
                let (code, expires_ms) = gw.request_pairing(&user, q.display_name).await?;
                Ok(json!({"user_id": user, "code": code, "expires_ms": expires_ms}))
            }
            "pairing.approve" => {
                let q: PairingParams = params(p)?;
                let code = q
                    .code
                    .ok_or_else(|| RpcError::new("invalid_params", "`code` is required"))?;
                to_value(gw.approve_pairing(&code, &who).await?)
            }
            "pairing.add" => {
                let q: PairingParams = params(p)?;
                let user = q
                    .user_id
                    .ok_or_else(|| RpcError::new("invalid_params", "`user_id` is required"))?;
                Ok(json!({"changed": gw.pair_user(&user, q.roles, &who).await?}))
            }
            "pairing.revoke" => {
                let q: PairingParams = params(p)?;
                let user = q
                    .user_id
                    .ok_or_else(|| RpcError::new("invalid_params", "`user_id` is required"))?;
                Ok(json!({"changed": gw.revoke_pairing(&user, &who).await?}))
            }
            "audit.tail" => {
                let q: AuditParams = params(p)?;
                to_value(gw.audit_tail(q.n.unwrap_or(20).min(10_000)).await?)
            }
            "audit.export" => {
                let q: AuditParams = params(p)?;
                to_value(
                    gw.audit_after(q.after.unwrap_or(0), q.limit.unwrap_or(1000).min(10_000))
                        .await?,
                )
            }
            "audit.verify" => match gw.audit_verify().await? {
                Ok(n) => Ok(json!({"ok": true, "entries": n})),
                Err(b) => Ok(json!({"ok": false, "broken_at": b.seq, "problem": b.problem})),
            },
            "audit.prune" => {
                let q: PruneParams = params(p)?;
                let days = match q.older_than_days {
                    Some(d) => d,
                    None if gw.config().audit.retention_days > 0 => {
                        gw.config().audit.retention_days
                    }
                    None => {
                        return Err(RpcError::new(
                            "invalid_params",
                            "audit.retention_days is 0 (keep forever); give the age to prune explicitly (`older_than_days`, CLI --older-than-days)",
                        ))
                    }
                };
                Ok(match gw.prune_audit(days).await? {
                    Some(p) => {
                        json!({"pruned": p.entries, "through_seq": p.through_seq, "through_hash": p.through_hash})
                    }
                    None => json!({"pruned": 0}),
                })
            }
            other => Err(RpcError::new(
                "method_not_found",
                format!(
                    "unknown method `{}`",
                    other.chars().take(64).collect::<String>()
                ),
            )),
        };
        value.map(Out::Value)
    }
}

/// A method's result. Decisions, the hot path, are serialized straight from
/// their struct into the response line.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Out {
    Value(Value),
    Decision(Box<DecisionView>),
}

/// The answer to a line the strict reader refused: `parse_error` for
/// text that is not JSON; for JSON Keyturn will not read (a duplicate key, a
/// number that would not survive exactly) `invalid_params` when it is inside
/// `params`, else `invalid_request`. The id is echoed when it can be read.
fn refused_line(line: &str, e: &StrictError) -> String {
    let Some(at) = e.at() else {
        return response(
            &Value::Null,
            Err(RpcError::new("parse_error", e.to_string())),
        );
    };
    let in_params = at.starts_with("/params/") || at == "/params";
    let code = if in_params {
        "invalid_params"
    } else {
        "invalid_request"
    };
    // The line is JSON (only its params were refused): read the id leniently.
    // Outside params the id itself may be what is in doubt.
    let id = in_params
        .then(|| serde_json::from_str::<Value>(line).ok())
        .flatten()
        .and_then(|v| v.get("id").cloned())
        .filter(|id| match id {
            Value::String(_) => true,
            Value::Number(n) => strict_number(&n.to_string()).is_ok(),
            _ => false,
        })
        .unwrap_or(Value::Null);
    response(&id, Err(RpcError::new(code, e.to_string())))
}
