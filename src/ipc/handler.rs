//! One JSON-RPC line in, one response line out. No sockets here: the server
//! passes the peer's uid and which socket it came through, and tests can
//! drive this directly.
//!
//! Admin methods ([`MethodName::requires_admin`]) are served only on the
//! admin socket, whatever the peer's uid: an agent connection can never
//! approve, grant or read the audit log, even when it runs as an admin uid.
//! A connection over TCP has no uid: its bearer token binds it to one agent,
//! which every call on it acts as, and admin methods are never served there.

use super::protocol::{
    reply, response, BadMethod, DecisionView, Method, MethodName, RpcError, RunAnswer, SubmitParams,
};
use crate::app::connection::ConnectionStatus;
use crate::app::health::HealthProbe;
use crate::app::tokens::Bearer;
use crate::app::{AppError, Gateway, Submission};
use crate::domain::canonical::{parse_strict, strict_number, StrictError};
use crate::domain::request::{ApprovalRequest, RequestId, CLIENT_GONE};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub enum Peer {
    /// On a Unix socket: the uid and pid from SO_PEERCRED, and which socket.
    Local {
        uid: u32,
        pid: Option<i32>,
        /// Connected to the admin socket (`[admin] socket_path`), which only
        /// admin uids may reach; false for the agent socket.
        admin_socket: bool,
    },
    /// Over TCP: no uid (uid checks do not apply), authenticated by a bearer
    /// token that binds the connection to one agent.
    Remote {
        addr: std::net::SocketAddr,
        bearer: Arc<Bearer>,
    },
}

/// One call, parsed out of its line once: only the id and the method with
/// its typed params are kept, so the line (and anything else it carried)
/// is freed before the call runs.
pub struct Call {
    id: Option<Value>,
    /// An unknown method or bad params are answered when the call runs
    /// (after the admin check, and not at all for a notification).
    method: Result<Method, BadMethod>,
}

impl Call {
    /// The call's id (`Null` for a notification), for an answer that refuses it.
    pub fn id(&self) -> &Value {
        self.id.as_ref().unwrap_or(&Value::Null)
    }
}

/// The answer to a request's own agent: for a request an approver edited,
/// with the edited arguments to run (secrets intact, when held here).
fn agent_view(gw: &Gateway, r: &ApprovalRequest) -> DecisionView {
    let mut v = DecisionView::from(r);
    v.args = gw.edited_args(r);
    v
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
    Ok(Call {
        id,
        method: Method::parse(&method, params),
    })
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

/// `submit` params split into who asks, how the call waits, and what the
/// app stores.
fn split(p: SubmitParams) -> (String, Option<String>, Flow, Submission) {
    (
        p.agent,
        p.token,
        Flow {
            wait: p.wait,
            detach: p.detach,
        },
        Submission {
            tool: p.tool,
            args: p.args,
            user_id: p.user_id,
            channel_id: p.channel_id,
            justification: p.justification,
            task_id: p.task_id,
            idempotency_key: p.idempotency_key,
            cost: p.cost,
            timeout_secs: p.timeout_secs,
            unattended: p.unattended,
            confidence: p.confidence,
            // Set by the socket from SO_PEERCRED, never from the params.
            requester_uid: None,
        },
    )
}

/// How a `submit` waits, and whether its request outlives the connection.
struct Flow {
    wait: bool,
    detach: bool,
}

fn parse_id(s: &str) -> Result<RequestId, RpcError> {
    s.parse()
        .map_err(|m: String| RpcError::new("invalid_params", m))
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::new("internal", e.to_string()))
}

impl Peer {
    /// The peer's uid; `None` over TCP.
    pub fn uid(&self) -> Option<u32> {
        match self {
            Peer::Local { uid, .. } => Some(*uid),
            Peer::Remote { .. } => None,
        }
    }

    fn admin_socket(&self) -> bool {
        matches!(
            self,
            Peer::Local {
                admin_socket: true,
                ..
            }
        )
    }

    /// Admin rights come with the admin socket (and its uid check), never
    /// with a uid alone: agent connections are never admins.
    fn is_admin(&self, admin_uid: bool) -> bool {
        self.admin_socket() && admin_uid
    }

    /// How the audit log names this peer when no agent acts.
    fn who(&self) -> String {
        match self {
            Peer::Local { uid, .. } => format!("uid:{uid}"),
            Peer::Remote { bearer, .. } => format!("agent:{}", bearer.agent),
        }
    }
}

/// Why `peer` (whose uid is an admin's when `admin_uid`) may not call
/// `method`, if it may not.
fn refusal(method: MethodName, peer: &Peer, admin_uid: bool) -> Option<RpcError> {
    if !method.requires_admin() || peer.is_admin(admin_uid) {
        return None;
    }
    if let Peer::Remote { .. } = peer {
        return Some(RpcError::new(
            "not_admin",
            format!(
                "`{}` is an admin method and is never served over TCP: use the admin socket ([admin] socket_path) on the server's host",
                method.as_str()
            ),
        ));
    }
    if !peer.admin_socket() {
        return Some(RpcError::new(
            "not_admin",
            format!(
                "`{}` is an admin method and is served only on the admin socket ([admin] socket_path; the CLI finds it with --config or --admin-socket), not on the agent socket",
                method.as_str()
            ),
        ));
    }
    Some(AppError::NotAdmin.into())
}

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
        let result = self.run(peer, call.method, gone).await;
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

    /// Refuses an admin method to a non-admin (before anything else about
    /// the call is judged, its params included), then runs it.
    async fn run(
        &self,
        peer: Peer,
        method: Result<Method, BadMethod>,
        gone: &CancellationToken,
    ) -> Result<Out, RpcError> {
        let admin_uid = peer.uid().is_some_and(|u| self.gw.is_admin_uid(u));
        let admin = peer.is_admin(admin_uid);
        let name = match &method {
            Ok(m) => Some(m.name()),
            Err(bad) => bad.name,
        };
        if let Some(no) = name.and_then(|n| refusal(n, &peer, admin_uid)) {
            return Err(no);
        }
        let method = method.map_err(|bad| bad.error)?;
        self.dispatch(peer, admin, method, gone).await
    }

    async fn dispatch(
        &self,
        peer: Peer,
        admin: bool,
        method: Method,
        gone: &CancellationToken,
    ) -> Result<Out, RpcError> {
        let gw = &self.gw;
        let actor = |operator: &Option<String>| -> Result<(String, Option<String>), RpcError> {
            let name = match operator.as_deref() {
                Some(raw) => crate::domain::request::check_display_name(raw)
                    .map_err(|m| RpcError::new("invalid_params", m))?,
                None => None,
            };
            Ok((peer.who(), name))
        };
        let who = peer.who();
        let approve = matches!(method, Method::Approve(_));
        let rotate = matches!(method, Method::TokenRotate(_));
        let pause = matches!(method, Method::AgentPause(_));
        let value = match method {
            Method::Ping => Ok(json!({"pong": true, "admin": admin})),
            // On both sockets: it says what is down, never why, except to
            // an admin (error texts may name hosts or Discord's answers).
            Method::Health(_) => {
                let report = self.health.check(true).await;
                to_value(if admin {
                    report
                } else {
                    report.without_details()
                })
            }
            Method::Submit(p) => {
                let (agent, token, flow, mut sub) = split(p);
                self.authenticate(&peer, &agent, token.as_deref())?;
                sub.requester_uid = peer.uid();
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
                return Ok(Out::Decision(Box::new(agent_view(gw, &r))));
            }
            Method::Run(p) => {
                let (agent, token, flow, mut sub) = split(p);
                self.authenticate(&peer, &agent, token.as_deref())?;
                sub.requester_uid = peer.uid();
                let args = sub.args.clone();
                let (r, prepared) = gw.submit_run(&agent, sub).await?;
                let r = if r.state.is_terminal() {
                    r
                } else {
                    tokio::select! {
                        w = gw.wait(r.id, Some(&agent), None) => w?,
                        _ = gone.cancelled() => self.client_left(r.id, Some(&agent), flow.detach).await?,
                    }
                };
                let decision = agent_view(gw, &r);
                if r.state != crate::domain::request::State::Approved {
                    return Ok(Out::Value(to_value(RunAnswer {
                        decision,
                        run: None,
                    })?));
                }
                // The run is its own task: a client that leaves (or a
                // dropped connection) never leaves it half-recorded; it
                // ends by itself, by its timeout or by a kill.
                // Approved with edits: what runs is the edited call, whose
                // plan the approver saw (checked against the stored one).
                let (args, prepared) = if r.edit.is_some() {
                    gw.edited_run(&r)?
                } else {
                    (args, prepared)
                };
                let gw2 = gw.clone();
                let ran = tokio::spawn(async move { gw2.execute(&r, prepared, &args).await })
                    .await
                    .map_err(|e| RpcError::new("internal", format!("the run failed: {e}")))??;
                return Ok(Out::Value(to_value(RunAnswer {
                    decision,
                    run: Some(to_value(ran)?),
                })?));
            }
            Method::RunsList(q) => to_value(gw.runs(q.running, q.limit.unwrap_or(50)).await?),
            Method::RunsKill(q) => {
                let (who, name) = actor(&q.operator)?;
                let by = name.map(|n| format!("cli:{n}")).unwrap_or(who);
                to_value(gw.kill_run(&q.id, &by).await?)
            }
            Method::AgentPause(q) | Method::AgentResume(q) => {
                let (who, name) = actor(&q.operator)?;
                let by = name.map(|n| format!("cli:{n}")).unwrap_or(who);
                let agent = match (q.name.as_deref(), q.all) {
                    (Some(n), false) => Some(n),
                    (None, true) => None,
                    _ => {
                        return Err(RpcError::new(
                            "invalid_params",
                            "give either `name` (one agent) or `all: true` (every agent)",
                        ))
                    }
                };
                if pause {
                    to_value(gw.pause_agent(agent, q.reason, &by).await?)
                } else if q.reason.is_some() {
                    Err(RpcError::new(
                        "invalid_params",
                        "`reason` is for agent.pause",
                    ))
                } else {
                    to_value(gw.resume_agent(agent, &by).await?)
                }
            }
            Method::AlertsList(q) => to_value(gw.alerts(q.limit.unwrap_or(50)).await?),
            Method::AgentList => {
                let (agents, all) = gw.agent_statuses().await?;
                Ok(json!({"agents": agents, "all_paused": all}))
            }
            Method::CredentialsStatus => to_value(gw.credentials_status()?),
            Method::CredentialsReset(q) => {
                let (who, name) = actor(&q.operator)?;
                let by = name.map(|n| format!("cli:{n}")).unwrap_or(who);
                gw.credentials_reset(&q.name, &by).await?;
                Ok(json!({"reset": q.name}))
            }
            Method::Check(p) => {
                let (agent, token, _, sub) = split(p);
                self.authenticate(&peer, &agent, token.as_deref())?;
                to_value(gw.check(&agent, &sub).await?)
            }
            Method::Wait(q) => {
                let id = parse_id(&q.id)?;
                let agent = self.acting_agent(&peer, admin, &q.agent, &q.token)?;
                let waited = gw.wait(id, agent, q.timeout_secs.map(Duration::from_secs));
                let r = tokio::select! {
                    w = waited => w?,
                    _ = gone.cancelled() => self.client_left(id, agent, q.detach).await?,
                };
                return Ok(Out::Decision(Box::new(match agent {
                    Some(_) => agent_view(gw, &r),
                    None => DecisionView::from(&r),
                })));
            }
            Method::Status(q) => {
                let id = parse_id(&q.id)?;
                let agent = self.acting_agent(&peer, admin, &q.agent, &q.token)?;
                let r = gw.status_for(id, agent).await?;
                return Ok(Out::Decision(Box::new(match agent {
                    Some(_) => agent_view(gw, &r),
                    None => DecisionView::from(&r),
                })));
            }
            Method::Cancel(q) => {
                let id = parse_id(&q.id)?;
                let agent = self.acting_agent(&peer, admin, &q.agent, &q.token)?;
                let by = agent.map(|a| format!("agent:{a}")).unwrap_or(who);
                let r = gw.cancel(id, &by, agent, q.reason).await?;
                return Ok(Out::Decision(Box::new(DecisionView::from(&r))));
            }
            Method::Verify(q) => {
                let id = parse_id(&q.id)?;
                let agent = self.acting_agent(&peer, admin, &q.agent, &q.token)?;
                to_value(gw.verify_args(id, agent, &q.args).await?)
            }
            Method::Stats => {
                let counts = gw.pending_counts().await?;
                let total: usize = counts.values().sum();
                Ok(json!({"pending": total, "pending_by_agent": counts, "waiting": gw.waiting()}))
            }
            Method::StatsReport(q) => to_value(
                gw.stats_report(
                    q.window_secs
                        .unwrap_or(crate::domain::stats::DEFAULT_WINDOW_SECS),
                )
                .await?,
            ),
            Method::Pending(q) => to_value(gw.pending(q.limit.unwrap_or(100).min(10_000)).await?),
            Method::Approve(q) if q.args.is_some() => {
                if q.for_.is_some() || q.scope.is_some() {
                    return Err(AppError::InvalidParams(
                        "`args` (approve with edits) does not go with `for` or `scope`".into(),
                    )
                    .into());
                }
                let id = parse_id(&q.id)?;
                let (voter, name) = actor(&q.operator)?;
                let edited = q.args.unwrap_or_default();
                let v = gw
                    .approve_edited_value(id, &voter, name, edited, q.reason, true)
                    .await?;
                Ok(json!({
                    "decision": DecisionView::from(&v.request),
                    "approvals": v.have,
                    "approvals_required": v.need,
                }))
            }
            Method::Approve(q) if q.for_.is_some() => {
                let id = parse_id(&q.id)?;
                let (voter, name) = actor(&q.operator)?;
                let duration =
                    crate::domain::timed::parse_duration(q.for_.as_deref().unwrap_or(""))
                        .map_err(AppError::InvalidParams)?;
                let kind: crate::domain::timed::TimedScopeKind = q
                    .scope
                    .as_deref()
                    .unwrap_or("call")
                    .parse()
                    .map_err(AppError::InvalidParams)?;
                let a = gw
                    .approve_for(id, &voter, name, q.reason, true, duration, kind)
                    .await?;
                Ok(json!({
                    "decision": DecisionView::from(&a.voted.request),
                    "approvals": a.voted.have,
                    "approvals_required": a.voted.need,
                    "grant": timed_view(&a.grant),
                }))
            }
            Method::Approve(q) | Method::Deny(q) => {
                if q.for_.is_some() || q.scope.is_some() || q.args.is_some() {
                    return Err(AppError::InvalidParams(
                        "`for`, `scope` and `args` go with `approve` only (and `scope` needs `for`)".into(),
                    )
                    .into());
                }
                let id = parse_id(&q.id)?;
                let (voter, name) = actor(&q.operator)?;
                let v = gw.vote(id, &voter, name, approve, q.reason, true).await?;
                Ok(json!({
                    "decision": DecisionView::from(&v.request),
                    "approvals": v.have,
                    "approvals_required": v.need,
                }))
            }
            Method::Grant(q) => {
                Ok(json!({"changed": gw.grant(&q.scope, &q.tool, q.effect, &who).await?}))
            }
            Method::Revoke(q) => match &q.id {
                Some(id) => Ok(json!({"changed": gw.revoke_timed(id, &who).await?})),
                None => Ok(json!({"changed": gw.revoke(&q.scope, &q.tool, q.effect, &who).await?})),
            },
            Method::ToolsList(q) => Ok(json!({
                "grants": to_value(gw.grants(q.scope.as_deref()).await?)?,
                "timed_grants": gw.timed_grants(None, None).iter().map(timed_view).collect::<Vec<_>>(),
                "risks": gw.tool_risks().into_iter().map(|(t, r)| json!({"tool": t, "risk": r})).collect::<Vec<_>>(),
            })),
            Method::ToolsEffective(q) => {
                let mut v = to_value(gw.effective(
                    &q.agent,
                    q.user_id.as_deref(),
                    q.channel_id.as_deref(),
                    q.roles,
                    &q.tool,
                )?)?;
                // Time-boxed grants for this agent (and tool), with expiries:
                // they stand in for a human's approval, not for the allowlist.
                let timed: Vec<Value> = gw
                    .timed_grants(Some(&q.agent), Some(&q.tool))
                    .iter()
                    .filter(|g| g.user_id.is_none() || g.user_id.as_deref() == q.user_id.as_deref())
                    .map(timed_view)
                    .collect();
                if let Value::Object(m) = &mut v {
                    m.insert("timed_grants".into(), Value::Array(timed));
                }
                Ok(v)
            }
            Method::ToolsRisk(q) => {
                gw.set_risk(&q.tool, q.risk, &who).await?;
                Ok(json!({"tool": q.tool, "risk": q.risk}))
            }
            Method::ToolsRisks => Ok(json!(gw
                .tool_risks()
                .into_iter()
                .map(|(t, r)| json!({"tool": t, "risk": r}))
                .collect::<Vec<_>>())),
            Method::PairingList => {
                let (users, codes) = gw.pairings().await?;
                Ok(json!({"paired": to_value(users)?, "pending_codes": to_value(codes)?}))
            }
            Method::PairingRequest(q) => {
                let user = required(q.user_id, "user_id")?;
                let (code, expires_ms) = gw.request_pairing(&user, q.display_name).await?;
                Ok(json!({"user_id": user, "code": code, "expires_ms": expires_ms}))
            }
            Method::PairingApprove(q) => {
                let code = required(q.code, "code")?;
                to_value(gw.approve_pairing(&code, &who).await?)
            }
            Method::PairingAdd(q) => {
                let user = required(q.user_id, "user_id")?;
                Ok(json!({"changed": gw.pair_user(&user, q.roles, &who).await?}))
            }
            Method::PairingRevoke(q) => {
                let user = required(q.user_id, "user_id")?;
                Ok(json!({"changed": gw.revoke_pairing(&user, &who).await?}))
            }
            Method::AuditTail(q) => to_value(gw.audit_tail(q.n.unwrap_or(20).min(10_000)).await?),
            Method::AuditExport(q) => to_value(
                gw.audit_after(q.after.unwrap_or(0), q.limit.unwrap_or(1000).min(10_000))
                    .await?,
            ),
            Method::AuditVerify => match gw.audit_verify().await? {
                Ok(n) => Ok(json!({"ok": true, "entries": n})),
                Err(b) => Ok(json!({"ok": false, "broken_at": b.seq, "problem": b.problem})),
            },
            Method::TokenIssue(q) | Method::TokenRotate(q) => {
                let overlap = rotate.then(|| Duration::from_secs(q.overlap_secs.unwrap_or(3600)));
                if !rotate && q.overlap_secs.is_some() {
                    return Err(RpcError::new(
                        "invalid_params",
                        "`overlap_secs` is for token.rotate",
                    ));
                }
                let ttl = q.expires_secs.map(Duration::from_secs);
                to_value(gw.issue_token(&q.agent, ttl, overlap, &who).await?)
            }
            Method::TokenRevoke(q) => to_value(gw.revoke_token(&q.id, &who).await?),
            Method::TokenList => to_value(gw.tokens().await?),
            Method::AuditPrune(q) => {
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
        };
        value.map(Out::Value)
    }

    /// Checks that `peer` may act as `agent`: on a Unix socket by uid and
    /// the agent's configured token; over TCP the connection's bearer token
    /// already did, for its one agent, and no other.
    fn authenticate(&self, peer: &Peer, agent: &str, token: Option<&str>) -> Result<(), RpcError> {
        match peer {
            Peer::Local { uid, .. } => Ok(self.gw.authenticate_agent(agent, token, *uid)?),
            Peer::Remote { bearer, .. } if bearer.agent == agent => {
                Ok(self.gw.bearer_agent_ok(agent)?)
            }
            Peer::Remote { bearer, .. } => {
                let shown: String = agent.chars().take(64).collect();
                Err(AppError::NotAuthorized(format!(
                    "this connection's token is agent `{}`'s; it may not act as agent `{}`",
                    bearer.agent,
                    shown.escape_debug()
                ))
                .into())
            }
        }
    }

    /// The agent a by-id call acts as (authenticated), or `None` for an
    /// admin acting on any request. Over TCP, the token's agent when the
    /// call names none.
    fn acting_agent<'a>(
        &self,
        peer: &'a Peer,
        admin: bool,
        agent: &'a Option<String>,
        token: &Option<String>,
    ) -> Result<Option<&'a str>, RpcError> {
        match (agent, peer) {
            (Some(a), _) => {
                self.authenticate(peer, a, token.as_deref())?;
                Ok(Some(a.as_str()))
            }
            (None, Peer::Remote { bearer, .. }) => {
                self.gw.bearer_agent_ok(&bearer.agent)?;
                Ok(Some(bearer.agent.as_str()))
            }
            (None, _) if admin => Ok(None),
            (None, _) => Err(RpcError::new("invalid_params", "`agent` is required")),
        }
    }
}

/// A param that this method requires although its params type does not.
fn required(v: Option<String>, field: &str) -> Result<String, RpcError> {
    v.ok_or_else(|| RpcError::new("invalid_params", format!("`{field}` is required")))
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

/// A time-boxed grant as the socket shows it (with its `until` label).
fn timed_view(g: &crate::domain::timed::TimedGrant) -> Value {
    json!({
        "id": g.id,
        "agent": g.agent,
        "tool": g.tool,
        "scope": g.kind,
        "scope_label": g.kind.describe(),
        "user_id": g.user_id,
        "args_hash": g.args_hash,
        "expires_ms": g.expires_ms,
        "until": g.until(),
        "created_by": g.created_by,
        "created_ms": g.created_ms,
        "origin_request": g.origin_request,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(admin_socket: bool) -> Peer {
        Peer::Local {
            uid: 1000,
            pid: None,
            admin_socket,
        }
    }

    fn remote() -> Peer {
        Peer::Remote {
            addr: "127.0.0.1:1".parse().unwrap(),
            bearer: Arc::new(Bearer {
                token_id: "t".into(),
                agent: "bot".into(),
                expires_ms: None,
            }),
        }
    }

    #[test]
    fn no_admin_method_is_served_over_tcp() {
        for &m in MethodName::ALL {
            let refused = refusal(m, &remote(), false);
            assert_eq!(refused.is_some(), m.requires_admin(), "{}", m.as_str());
            if let Some(e) = refused {
                assert_eq!(e.data.code, "not_admin");
                assert!(e.message.contains("TCP"), "{}", e.message);
            }
        }
    }

    #[test]
    fn the_agent_socket_refuses_every_admin_method_even_to_an_admin_uid() {
        for &m in MethodName::ALL.iter().filter(|m| m.requires_admin()) {
            for admin_uid in [false, true] {
                let Some(e) = refusal(m, &peer(false), admin_uid) else {
                    panic!("{} served on the agent socket", m.as_str());
                };
                assert_eq!(e.data.code, "not_admin", "{}", m.as_str());
                assert!(e.message.contains("admin socket"), "{}", e.message);
                assert!(e.message.contains(m.as_str()), "{}", e.message);
            }
            // A uid that is not an admin on the admin socket.
            let e = refusal(m, &peer(true), false)
                .unwrap_or_else(|| panic!("{} served to a non-admin uid", m.as_str()));
            assert_eq!(e.data.code, "not_admin", "{}", m.as_str());
            // An admin on the admin socket.
            assert!(refusal(m, &peer(true), true).is_none(), "{}", m.as_str());
        }
    }

    #[test]
    fn agent_methods_are_served_on_both_sockets() {
        for &m in MethodName::ALL.iter().filter(|m| !m.requires_admin()) {
            for socket in [false, true] {
                for admin_uid in [false, true] {
                    assert!(
                        refusal(m, &peer(socket), admin_uid).is_none(),
                        "{}",
                        m.as_str()
                    );
                }
            }
        }
    }

    #[test]
    fn an_admin_method_with_bad_params_is_still_an_admin_method() {
        // The handler refuses by `BadMethod::name` before blaming the params.
        let line = r#"{"jsonrpc":"2.0","id":1,"method":"approve","params":{"nope":1}}"#;
        let Ok(call) = parse_call(line) else {
            panic!("line refused")
        };
        let Err(bad) = &call.method else {
            panic!("bad params accepted")
        };
        assert_eq!(bad.name, Some(MethodName::Approve));
        assert!(refusal(MethodName::Approve, &peer(false), false).is_some());
    }
}
