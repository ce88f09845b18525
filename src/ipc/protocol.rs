//! Wire types and stable error codes, the methods and their typed params,
//! and the client's envelope (request line out, response line in). No I/O
//! here.

use crate::domain::policy::Effect;
use crate::domain::request::{ApprovalRequest, DecidedBy, State};
use crate::domain::Risk;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Error codes: JSON-RPC's own, then Keyturn's (-32000 and below). The
/// `data.code` string is the stable name clients should match on.
pub mod codes {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL: i64 = -32603;
    pub const LINE_TOO_LONG: i64 = -32000;
    pub const NOT_FOUND: i64 = -32001;
    pub const CONFLICT: i64 = -32002;
    pub const FORBIDDEN: i64 = -32003;
    pub const LIMIT: i64 = -32004;
}

/// Numeric code for an application error's stable name.
pub fn numeric_code(name: &str) -> i64 {
    match name {
        "parse_error" => codes::PARSE_ERROR,
        "invalid_request" => codes::INVALID_REQUEST,
        "method_not_found" => codes::METHOD_NOT_FOUND,
        "invalid_params" => codes::INVALID_PARAMS,
        "line_too_long" => codes::LINE_TOO_LONG,
        "not_found" | "unknown_agent" => codes::NOT_FOUND,
        "already_decided" | "already_voted" | "pairing_refused" | "idempotency_conflict" => {
            codes::CONFLICT
        }
        "not_admin" | "admin_only" | "agent_refused" | "not_your_request" | "peer_refused"
        | "self_approval" | "unauthorized" | "not_authorized" => codes::FORBIDDEN,
        "too_many_pending" | "too_many_connections" | "too_many_inflight" | "idle_timeout" => {
            codes::LIMIT
        }
        _ => codes::INTERNAL,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: ErrorData,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorData {
    /// Stable snake_case name, e.g. `line_too_long`.
    pub code: String,
}

impl RpcError {
    pub fn new(name: &str, message: impl Into<String>) -> RpcError {
        RpcError {
            code: numeric_code(name),
            message: message.into(),
            data: ErrorData { code: name.into() },
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.data.code)
    }
}

/// One response line.
pub fn response(id: &Value, result: Result<Value, RpcError>) -> String {
    reply(id, result)
}

/// [`response`] for any serializable result.
pub fn reply<T: Serialize>(id: &Value, result: Result<T, RpcError>) -> String {
    // Serialized straight from these borrowed parts: no JSON map is built.
    #[derive(Serialize)]
    struct Response<'a, T> {
        jsonrpc: &'static str,
        id: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<T>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<RpcError>,
    }
    let (result, error) = match result {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    serde_json::to_string(&Response {
        jsonrpc: "2.0",
        id,
        result,
        error,
    })
    // A `Value` always serializes; this is only here so nothing can panic.
    .unwrap_or_else(|_| {
        r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"cannot encode the response"}}"#.into()
    })
}

/// What an agent is told about its request: which outcome, and who or what
/// decided it, so a timeout is never mistaken for a human's no.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DecisionView {
    pub request_id: String,
    /// `pending`, `approved`, `denied`, `timed_out` or `cancelled`.
    pub state: State,
    /// True only for `approved`: the one field a gate needs.
    pub approved: bool,
    /// `policy`, `human`, `timeout` or `cancel`; absent while pending.
    pub decided_by: Option<DecidedBy>,
    /// The policy rule that decided or asked (e.g. `risk_low`, `tool_not_allowed`).
    pub rule: String,
    pub rule_detail: String,
    /// Approvers, the denier or the canceller.
    pub who: Option<String>,
    pub reason: Option<String>,
    pub tool: String,
    pub agent: String,
    pub risk: Risk,
    /// SHA-256 of the canonical JSON of the arguments as submitted.
    pub args_hash: String,
    pub approvals_required: u32,
    pub admin_only: bool,
    pub created_ms: i64,
    pub deadline_ms: i64,
    pub decided_ms: Option<i64>,
    pub flags: Vec<Value>,
    /// One line for humans.
    pub summary: String,
    /// An approver approved the call with edited arguments: run `args`
    /// (whose hash is `args_hash`), never the arguments as submitted
    /// (whose hash is `original_args_hash`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited: bool,
    /// The edited arguments to run, secrets intact: set only for an edited
    /// request, in answers to its own agent. Absent there when the server
    /// no longer holds them: a client must then fail closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// The hash of the arguments as submitted, for an edited request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_args_hash: Option<String>,
}

impl DecisionView {
    /// Why this answer is not about the call a gate asked about (`tool`,
    /// arguments hashing to `args_hash`); `None` when it is. A gate acts on
    /// an answer only when this is `None`: a reused idempotency key or
    /// request id must never lend one call's approval to another.
    pub fn mismatch(&self, tool: &str, args_hash: &str) -> Option<String> {
        if self.tool != tool {
            return Some(format!(
                "asked about tool `{tool}`, the answer is about `{}`",
                self.tool
            ));
        }
        if self.edited && self.original_args_hash.as_deref() == Some(args_hash) {
            // Edited by an approver: only a client that runs the edited
            // arguments (see [`DecisionView::edited_from`]) may act on it.
            return Some(
                "an approver edited the arguments; this client runs only the call it asked \
                 about, so nothing was run"
                    .into(),
            );
        }
        if self.args_hash != args_hash {
            return Some(format!(
                "asked about arguments {args_hash}, the answer is about {}",
                self.args_hash
            ));
        }
        None
    }
}

impl DecisionView {
    /// For an answer about a call submitted with arguments hashing to
    /// `asked_hash` that an approver edited: the edited arguments to run
    /// instead, when they are present and hash to `args_hash`. `None` for
    /// an answer that was not edited from `asked_hash`, or whose edited
    /// arguments are missing or do not match (fail closed: run nothing).
    pub fn edited_from(&self, asked_hash: &str) -> Option<&Value> {
        if !self.edited || self.original_args_hash.as_deref() != Some(asked_hash) {
            return None;
        }
        self.args
            .as_ref()
            .filter(|a| crate::domain::canonical::args_hash(a) == self.args_hash)
    }
}

impl From<&ApprovalRequest> for DecisionView {
    fn from(r: &ApprovalRequest) -> Self {
        DecisionView {
            request_id: r.id.to_string(),
            state: r.state,
            approved: r.state == State::Approved,
            decided_by: r.decided_by,
            rule: r.rule.clone(),
            rule_detail: r.rule_detail.clone(),
            who: r.decided_who.clone(),
            reason: r.decided_reason.clone(),
            tool: r.tool.clone(),
            agent: r.agent.clone(),
            risk: r.risk,
            args_hash: r.args_hash.clone(),
            approvals_required: r.approvals_required,
            admin_only: r.admin_only,
            created_ms: r.created_ms,
            deadline_ms: r.deadline_ms,
            decided_ms: r.decided_ms,
            flags: r.flags.clone(),
            summary: summary(r),
            edited: r.edit.is_some(),
            // Filled in by the server for the request's own agent.
            args: None,
            original_args_hash: r.edit.as_ref().map(|e| e.original_args_hash.clone()),
        }
    }
}

/// `approved by alice (uid:1000): ok`, `denied by policy (no_grant): …`, `timed out`.
pub fn summary(r: &ApprovalRequest) -> String {
    let why = |s: &Option<String>| {
        s.as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| format!(": {s}"))
            .unwrap_or_default()
    };
    match (r.state, r.decided_by) {
        (State::Pending, _) => format!("pending: {}", r.rule_detail),
        (State::Approved, Some(DecidedBy::Policy)) => {
            format!("approved by policy ({}): {}", r.rule, r.rule_detail)
        }
        (State::Denied, Some(DecidedBy::Policy)) => {
            format!("denied by policy ({}): {}", r.rule, r.rule_detail)
        }
        (State::Approved, _) => format!(
            "approved{} by {}{}",
            if r.edit.is_some() { " with edits" } else { "" },
            r.decided_who.as_deref().unwrap_or("?"),
            why(&r.decided_reason)
        ),
        (State::Denied, _) => format!(
            "denied by {}{}",
            r.decided_who.as_deref().unwrap_or("?"),
            why(&r.decided_reason)
        ),
        (State::TimedOut, _) => "timed out: nobody decided before the deadline".to_string(),
        (State::Cancelled, _) => format!(
            "cancelled by {}{}",
            r.decided_who.as_deref().unwrap_or("?"),
            why(&r.decided_reason)
        ),
    }
}

// ---------------------------------------------------------------------------
// Methods: one table of names, one enum of typed calls.

/// Declares [`MethodName`] from one table, so the list of every method
/// ([`MethodName::ALL`]), the wire names and the parser cannot drift apart.
macro_rules! method_names {
    ($($variant:ident => $name:literal,)*) => {
        /// A method, by name only (its params are in [`Method`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum MethodName {
            $($variant,)*
        }

        impl MethodName {
            /// Every method.
            pub const ALL: &'static [MethodName] = &[$(MethodName::$variant,)*];

            /// The name on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(MethodName::$variant => $name,)*
                }
            }

            /// The method called `name`, if there is one.
            pub fn from_name(name: &str) -> Option<MethodName> {
                match name {
                    $($name => Some(MethodName::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

method_names! {
    Ping => "ping",
    Health => "health",
    Submit => "submit",
    Check => "check",
    Wait => "wait",
    Status => "status",
    Cancel => "cancel",
    Verify => "verify",
    Stats => "stats",
    StatsReport => "stats.report",
    Pending => "pending",
    Approve => "approve",
    Deny => "deny",
    Grant => "grant",
    Revoke => "revoke",
    ToolsList => "tools.list",
    ToolsEffective => "tools.effective",
    ToolsRisk => "tools.risk",
    ToolsRisks => "tools.risks",
    PairingList => "pairing.list",
    PairingRequest => "pairing.request",
    PairingApprove => "pairing.approve",
    PairingAdd => "pairing.add",
    PairingRevoke => "pairing.revoke",
    AuditTail => "audit.tail",
    AuditExport => "audit.export",
    AuditVerify => "audit.verify",
    AuditPrune => "audit.prune",
    TokenIssue => "token.issue",
    TokenRotate => "token.rotate",
    TokenRevoke => "token.revoke",
    TokenList => "token.list",
    Run => "run",
    RunsList => "runs.list",
    RunsKill => "runs.kill",
    CredentialsStatus => "credentials.status",
    CredentialsReset => "credentials.reset",
    AgentPause => "agent.pause",
    AgentResume => "agent.resume",
    AgentList => "agent.list",
    AlertsList => "alerts.list",
}

impl MethodName {
    /// Served only to admins on the admin socket. No catch-all arm: a new
    /// method does not compile until someone decides which side it is on.
    pub const fn requires_admin(self) -> bool {
        use MethodName::*;
        match self {
            Ping | Health | Submit | Check | Wait | Status | Cancel | Verify | Run => false,
            Stats | StatsReport | Pending | Approve | Deny | Grant | Revoke | ToolsList
            | ToolsEffective | ToolsRisk | ToolsRisks | PairingList | PairingRequest
            | PairingApprove | PairingAdd | PairingRevoke | AuditTail | AuditExport
            | AuditVerify | AuditPrune | TokenIssue | TokenRotate | TokenRevoke | TokenList
            | RunsList | RunsKill | CredentialsStatus | CredentialsReset | AgentPause
            | AgentResume | AgentList | AlertsList => true,
        }
    }
}

const ADMIN_COUNT: usize = {
    let (mut n, mut i) = (0, 0);
    while i < MethodName::ALL.len() {
        if MethodName::ALL[i].requires_admin() {
            n += 1;
        }
        i += 1;
    }
    n
};

const ADMIN_NAMES: [&str; ADMIN_COUNT] = {
    let mut out = [""; ADMIN_COUNT];
    let (mut n, mut i) = (0, 0);
    while i < MethodName::ALL.len() {
        if MethodName::ALL[i].requires_admin() {
            out[n] = MethodName::ALL[i].as_str();
            n += 1;
        }
        i += 1;
    }
    out
};

/// The names of the admin methods, derived from
/// [`MethodName::requires_admin`] (for clients that route calls by name).
pub const ADMIN_METHODS: &[&str] = &ADMIN_NAMES;

/// Whether `name` is an admin method (`false` for an unknown name).
pub fn is_admin_method(name: &str) -> bool {
    MethodName::from_name(name).is_some_and(MethodName::requires_admin)
}

/// One call, its params read into the type its method takes.
#[derive(Debug)]
pub enum Method {
    /// Params ignored.
    Ping,
    Health(Empty),
    Submit(SubmitParams),
    Check(SubmitParams),
    Wait(ById),
    Status(ById),
    Cancel(ById),
    Verify(VerifyParams),
    /// Params ignored.
    Stats,
    StatsReport(StatsReportParams),
    Pending(ListParams),
    Approve(DecideParams),
    Deny(DecideParams),
    Grant(GrantParams),
    Revoke(GrantParams),
    ToolsList(ListParams),
    ToolsEffective(EffectiveParams),
    ToolsRisk(RiskParams),
    /// Params ignored.
    ToolsRisks,
    /// Params ignored.
    PairingList,
    PairingRequest(PairingParams),
    PairingApprove(PairingParams),
    PairingAdd(PairingParams),
    PairingRevoke(PairingParams),
    AuditTail(AuditParams),
    AuditExport(AuditParams),
    /// Params ignored.
    AuditVerify,
    AuditPrune(PruneParams),
    TokenIssue(TokenParams),
    TokenRotate(TokenParams),
    TokenRevoke(TokenRevokeParams),
    /// Params ignored.
    TokenList,
    /// Submit a run-tool call, wait for the decision, and (approved) run it.
    Run(SubmitParams),
    RunsList(RunsListParams),
    RunsKill(RunsKillParams),
    /// Params ignored.
    CredentialsStatus,
    CredentialsReset(CredentialsResetParams),
    /// The kill switch: pause one agent, or every agent with `all`.
    AgentPause(AgentPauseParams),
    AgentResume(AgentPauseParams),
    /// Params ignored.
    AgentList,
    /// Anomaly alerts, newest first.
    AlertsList(AlertsListParams),
}

/// Why a call's method or params could not be read.
#[derive(Debug)]
pub struct BadMethod {
    /// The method, when the name was known (only its params were wrong):
    /// an admin method is refused to a non-admin before its params are
    /// blamed.
    pub name: Option<MethodName>,
    /// `method_not_found` or `invalid_params`.
    pub error: RpcError,
}

impl Method {
    /// Reads a call from its `method` and `params` (an object, or `Null`
    /// for none).
    pub fn parse(method: &str, params: Value) -> Result<Method, BadMethod> {
        let Some(name) = MethodName::from_name(method) else {
            return Err(BadMethod {
                name: None,
                error: RpcError::new(
                    "method_not_found",
                    format!(
                        "unknown method `{}`",
                        method.chars().take(64).collect::<String>()
                    ),
                ),
            });
        };
        Method::parse_params(name, params).map_err(|error| BadMethod {
            name: Some(name),
            error,
        })
    }

    fn parse_params(name: MethodName, p: Value) -> Result<Method, RpcError> {
        use MethodName as N;
        Ok(match name {
            N::Ping => Method::Ping,
            N::Health => Method::Health(params(p)?),
            N::Submit => Method::Submit(params(p)?),
            N::Check => Method::Check(params(p)?),
            N::Wait => Method::Wait(params(p)?),
            N::Status => Method::Status(params(p)?),
            N::Cancel => Method::Cancel(params(p)?),
            N::Verify => Method::Verify(params(p)?),
            N::Stats => Method::Stats,
            N::StatsReport => Method::StatsReport(params(p)?),
            N::Pending => Method::Pending(params(p)?),
            N::Approve => Method::Approve(params(p)?),
            N::Deny => Method::Deny(params(p)?),
            N::Grant => Method::Grant(params(p)?),
            N::Revoke => Method::Revoke(params(p)?),
            N::ToolsList => Method::ToolsList(params(p)?),
            N::ToolsEffective => Method::ToolsEffective(params(p)?),
            N::ToolsRisk => Method::ToolsRisk(params(p)?),
            N::ToolsRisks => Method::ToolsRisks,
            N::PairingList => Method::PairingList,
            N::PairingRequest => Method::PairingRequest(params(p)?),
            N::PairingApprove => Method::PairingApprove(params(p)?),
            N::PairingAdd => Method::PairingAdd(params(p)?),
            N::PairingRevoke => Method::PairingRevoke(params(p)?),
            N::AuditTail => Method::AuditTail(params(p)?),
            N::AuditExport => Method::AuditExport(params(p)?),
            N::AuditVerify => Method::AuditVerify,
            N::AuditPrune => Method::AuditPrune(params(p)?),
            N::TokenIssue => Method::TokenIssue(params(p)?),
            N::TokenRotate => Method::TokenRotate(params(p)?),
            N::TokenRevoke => Method::TokenRevoke(params(p)?),
            N::TokenList => Method::TokenList,
            N::Run => Method::Run(params(p)?),
            N::RunsList => Method::RunsList(params(p)?),
            N::RunsKill => Method::RunsKill(params(p)?),
            N::CredentialsStatus => Method::CredentialsStatus,
            N::CredentialsReset => Method::CredentialsReset(params(p)?),
            N::AgentPause => Method::AgentPause(params(p)?),
            N::AgentResume => Method::AgentResume(params(p)?),
            N::AgentList => Method::AgentList,
            N::AlertsList => Method::AlertsList(params(p)?),
        })
    }

    pub fn name(&self) -> MethodName {
        use MethodName as N;
        match self {
            Method::Ping => N::Ping,
            Method::Health(_) => N::Health,
            Method::Submit(_) => N::Submit,
            Method::Check(_) => N::Check,
            Method::Wait(_) => N::Wait,
            Method::Status(_) => N::Status,
            Method::Cancel(_) => N::Cancel,
            Method::Verify(_) => N::Verify,
            Method::Stats => N::Stats,
            Method::StatsReport(_) => N::StatsReport,
            Method::Pending(_) => N::Pending,
            Method::Approve(_) => N::Approve,
            Method::Deny(_) => N::Deny,
            Method::Grant(_) => N::Grant,
            Method::Revoke(_) => N::Revoke,
            Method::ToolsList(_) => N::ToolsList,
            Method::ToolsEffective(_) => N::ToolsEffective,
            Method::ToolsRisk(_) => N::ToolsRisk,
            Method::ToolsRisks => N::ToolsRisks,
            Method::PairingList => N::PairingList,
            Method::PairingRequest(_) => N::PairingRequest,
            Method::PairingApprove(_) => N::PairingApprove,
            Method::PairingAdd(_) => N::PairingAdd,
            Method::PairingRevoke(_) => N::PairingRevoke,
            Method::AuditTail(_) => N::AuditTail,
            Method::AuditExport(_) => N::AuditExport,
            Method::AuditVerify => N::AuditVerify,
            Method::AuditPrune(_) => N::AuditPrune,
            Method::TokenIssue(_) => N::TokenIssue,
            Method::TokenRotate(_) => N::TokenRotate,
            Method::TokenRevoke(_) => N::TokenRevoke,
            Method::TokenList => N::TokenList,
            Method::Run(_) => N::Run,
            Method::RunsList(_) => N::RunsList,
            Method::RunsKill(_) => N::RunsKill,
            Method::CredentialsStatus => N::CredentialsStatus,
            Method::CredentialsReset(_) => N::CredentialsReset,
            Method::AgentPause(_) => N::AgentPause,
            Method::AgentResume(_) => N::AgentResume,
            Method::AgentList => N::AgentList,
            Method::AlertsList(_) => N::AlertsList,
        }
    }

    /// See [`MethodName::requires_admin`].
    pub fn requires_admin(&self) -> bool {
        self.name().requires_admin()
    }
}

/// Reads a method's params; a missing `params` reads as `{}`.
fn params<T: DeserializeOwned>(p: Value) -> Result<T, RpcError> {
    let p = if p.is_null() { json!({}) } else { p };
    serde_json::from_value(p)
        .map_err(|e| RpcError::new("invalid_params", format!("invalid params: {e}")))
}

/// `submit` and `check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitParams {
    pub agent: String,
    pub token: Option<String>,
    pub tool: String,
    #[serde(default = "empty_object")]
    pub args: Value,
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    #[serde(default)]
    pub justification: String,
    pub task_id: Option<String>,
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub cost: f64,
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub unattended: bool,
    /// How sure the agent is of this call, 0..=1 (see `min_confidence`).
    pub confidence: Option<f64>,
    /// Block until the decision instead of returning at once.
    #[serde(default)]
    pub wait: bool,
    /// Keep the request pending if this connection goes away before the
    /// answer (by default a client that leaves cancels it: `client_gone`).
    #[serde(default)]
    pub detach: bool,
}

/// `runs.list` (`keyturn ps`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsListParams {
    /// Only runs still running.
    #[serde(default)]
    pub running: bool,
    pub limit: Option<u32>,
}

/// `alerts.list` (`keyturn alerts`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsListParams {
    /// At most this many (default 50, at most 1000).
    pub limit: Option<u32>,
}

/// `stats.report` (`keyturn stats`, `/stats`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsReportParams {
    /// The window, in seconds back from now (default one day, at most
    /// [`crate::domain::stats::MAX_WINDOW_SECS`]).
    pub window_secs: Option<u64>,
}

/// `runs.kill` (`keyturn kill`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsKillParams {
    pub id: String,
    /// Who asks, for the audit log (shown as `cli:NAME`).
    pub operator: Option<String>,
}

/// `agent.pause` and `agent.resume`: one agent by `name`, or every agent
/// (the global switch) with `all`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPauseParams {
    pub name: Option<String>,
    #[serde(default)]
    pub all: bool,
    /// For `agent.pause`: why, recorded and shown with every denial.
    pub reason: Option<String>,
    /// Who asks, for the audit log (shown as `cli:NAME`).
    pub operator: Option<String>,
}

/// `credentials.reset`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsResetParams {
    pub name: String,
    pub operator: Option<String>,
}

/// What `run` answers: the decision, and the run when there was one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunAnswer {
    pub decision: DecisionView,
    /// Absent when the call was not approved.
    pub run: Option<serde_json::Value>,
}

fn empty_object() -> Value {
    json!({})
}

/// `wait`, `status` and `cancel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ById {
    /// Agent name; admins may leave it out to act on any request.
    pub agent: Option<String>,
    pub token: Option<String>,
    pub id: String,
    /// For `wait`: give up after this long and return the request still pending.
    pub timeout_secs: Option<u64>,
    /// For `cancel`.
    pub reason: Option<String>,
    /// For `wait`: leave the request pending if this connection goes away.
    #[serde(default)]
    pub detach: bool,
}

/// `verify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyParams {
    /// Agent name; admins may leave it out.
    pub agent: Option<String>,
    pub token: Option<String>,
    pub id: String,
    /// The arguments about to be executed.
    pub args: Value,
}

/// `audit.prune`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PruneParams {
    /// Prune entries older than this many days (default: audit.retention_days).
    pub older_than_days: Option<u32>,
}

/// `token.issue` and `token.rotate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenParams {
    /// A configured agent.
    pub agent: String,
    /// The new token stops working this long after it is issued (never,
    /// when absent).
    pub expires_secs: Option<u64>,
    /// For `token.rotate`: the agent's other live tokens keep working this
    /// long (default one hour).
    pub overlap_secs: Option<u64>,
}

/// `token.revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRevokeParams {
    pub id: String,
}

/// `approve` and `deny`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideParams {
    pub id: String,
    pub reason: Option<String>,
    /// The operator's name, shown beside their uid (letters, digits,
    /// spaces and `_-.'` only, so it cannot imitate a uid).
    pub operator: Option<String>,
    /// `approve` only: also allow matching calls for this long (`15m`,
    /// `1h`, `8h`, `2s`, … or `until_revoked`), adding a time-boxed grant.
    #[serde(rename = "for")]
    pub for_: Option<String>,
    /// With `for`: `call` (default), `agent-tool` or `agent-tool-user`.
    pub scope: Option<String>,
    /// `approve` only: approve with these edited arguments instead (an
    /// object, masked as `status` shows the request's; every mask kept in
    /// its place, see docs/protocol.md "Edit, then approve").
    pub args: Option<Value>,
}

/// `grant` and `revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantParams {
    /// `revoke` only: a time-boxed grant's id (`tg-…`), instead of scope and tool.
    pub id: Option<String>,
    #[serde(default)]
    pub scope: String,
    #[serde(default)]
    pub tool: String,
    #[serde(default)]
    pub effect: Effect,
}

/// `pending` and `tools.list`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub limit: Option<u32>,
    pub scope: Option<String>,
}

/// `tools.effective`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EffectiveParams {
    #[serde(default = "default_agent")]
    pub agent: String,
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    pub roles: Option<Vec<String>>,
    #[serde(default = "star")]
    pub tool: String,
}

fn default_agent() -> String {
    "cli".into()
}
fn star() -> String {
    "*".into()
}

/// `tools.risk`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskParams {
    pub tool: String,
    /// `null` clears the override.
    pub risk: Option<Risk>,
}

/// `pairing.request`, `pairing.approve`, `pairing.add` and `pairing.revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairingParams {
    pub code: Option<String>,
    pub user_id: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub display_name: Option<String>,
}

/// A method that takes no parameters.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `audit.tail` and `audit.export`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    pub n: Option<u32>,
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

// ---------------------------------------------------------------------------
// The client's envelope, shared by the async and the blocking client.

/// The request line (without its newline) calling `method` as call `id`.
pub fn request_line(id: u64, method: &str, params: &Value) -> String {
    #[derive(Serialize)]
    struct Request<'a> {
        jsonrpc: &'static str,
        id: u64,
        method: &'a str,
        params: &'a Value,
    }
    serde_json::to_string(&Request {
        jsonrpc: "2.0",
        id,
        method,
        params,
    })
    // A `Value` always serializes; this is only here so nothing can panic.
    .unwrap_or_default()
}

/// Why a response line is not the result of the call it answers.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseError {
    /// The server refused the call (or, with a null id, the line or the
    /// connection it came on).
    Rpc(RpcError),
    /// Not a JSON-RPC response to this call: unreadable, no `id`, another
    /// call's id, neither or both of `result` and `error`, or a result with
    /// a null id. Nothing in it can be trusted, so nothing is acted on.
    Protocol(String),
}

/// Reads the response line to call `id`: its result, or why there is none.
///
/// A client has one call in flight, so the answer must carry its id. The
/// one exception is an error with `"id": null`, which is how a server
/// answers what it could not attribute to a call (a line it could not read,
/// a refused connection). Anything else, including a response with no `id`
/// at all or with another call's id, is a protocol error: fail closed,
/// never skip ahead to a later line.
pub fn read_response(line: &str, id: u64) -> Result<Value, ResponseError> {
    /// Parsed once, straight into its parts (no intermediate JSON tree).
    #[derive(Deserialize)]
    struct Response {
        #[serde(default, deserialize_with = "present")]
        id: Option<Value>,
        /// `Some(Value::Null)` for `"result": null`, `None` when absent.
        #[serde(default, deserialize_with = "present")]
        result: Option<Value>,
        #[serde(default)]
        error: Option<RpcError>,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
        Deserialize::deserialize(d).map(Some)
    }
    let protocol = |why: String| Err(ResponseError::Protocol(why));
    let r: Response = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return protocol(e.to_string()),
    };
    let ours = match &r.id {
        None => return protocol("a response without an id".into()),
        Some(Value::Null) => false,
        Some(Value::Number(n)) if n.as_u64() == Some(id) => true,
        Some(other) => {
            return protocol(format!(
                "the answer to call {} arrived for call {id}",
                excerpt(&other.to_string())
            ))
        }
    };
    match (r.result, r.error) {
        (None, Some(e)) => Err(ResponseError::Rpc(e)),
        (Some(v), None) if ours => Ok(v),
        (Some(_), None) => protocol("a result with a null id".into()),
        (None, None) => protocol("a response with neither result nor error".into()),
        (Some(_), Some(_)) => protocol("a response with both result and error".into()),
    }
}

/// At most 64 characters of `s`, for an error message.
fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Params each method accepts, so every method can be parsed.
    fn minimal(m: MethodName) -> Value {
        use MethodName as N;
        let id = "00000000-0000-0000-0000-000000000000";
        match m {
            N::Submit | N::Check | N::Run => json!({"agent": "bot", "tool": "t"}),
            N::RunsKill => json!({"id": "x"}),
            N::CredentialsReset => json!({"name": "x"}),
            N::Wait | N::Status | N::Cancel | N::Approve | N::Deny => json!({"id": id}),
            N::Verify => json!({"id": id, "args": {}}),
            N::Grant | N::Revoke => json!({"scope": "global", "tool": "t"}),
            N::TokenIssue | N::TokenRotate => json!({"agent": "bot"}),
            N::TokenRevoke => json!({"id": "x"}),
            N::ToolsRisk => json!({"tool": "t", "risk": null}),
            N::Ping
            | N::Health
            | N::Stats
            | N::StatsReport
            | N::Pending
            | N::ToolsList
            | N::ToolsEffective
            | N::ToolsRisks
            | N::PairingList
            | N::PairingRequest
            | N::PairingApprove
            | N::PairingAdd
            | N::PairingRevoke
            | N::AuditTail
            | N::AuditExport
            | N::AuditVerify
            | N::AuditPrune
            | N::TokenList
            | N::RunsList
            | N::AgentList
            | N::AlertsList
            | N::CredentialsStatus => Value::Null,
            N::AgentPause | N::AgentResume => json!({"name": "bot"}),
        }
    }

    #[test]
    fn every_method_name_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for &m in MethodName::ALL {
            assert!(seen.insert(m.as_str()), "{} twice", m.as_str());
            assert_eq!(MethodName::from_name(m.as_str()), Some(m));
            let parsed = Method::parse(m.as_str(), minimal(m))
                .unwrap_or_else(|bad| panic!("{}: {}", m.as_str(), bad.error));
            assert_eq!(parsed.name(), m);
            assert_eq!(parsed.requires_admin(), m.requires_admin());
        }
        assert_eq!(seen.len(), 41);
    }

    #[test]
    fn the_admin_methods_are_exactly_these() {
        let admin = [
            "stats",
            "stats.report",
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
            "token.issue",
            "token.rotate",
            "token.revoke",
            "token.list",
            "runs.list",
            "runs.kill",
            "credentials.status",
            "credentials.reset",
            "agent.pause",
            "agent.resume",
            "agent.list",
            "alerts.list",
        ];
        for name in admin {
            assert!(is_admin_method(name), "{name}");
            assert!(MethodName::from_name(name).unwrap().requires_admin());
        }
        assert_eq!(ADMIN_METHODS, admin);
        for name in [
            "ping", "health", "submit", "check", "wait", "status", "cancel", "verify",
        ] {
            assert!(!is_admin_method(name), "{name}");
        }
        assert!(!is_admin_method("no.such.method"));
        assert!(!is_admin_method("Approve"));
    }

    #[test]
    fn an_unknown_method_is_method_not_found_with_a_bounded_name() {
        let bad = Method::parse("approve_all", json!({})).unwrap_err();
        assert_eq!(bad.name, None);
        assert_eq!(
            bad.error,
            RpcError::new("method_not_found", "unknown method `approve_all`")
        );
        assert_eq!(bad.error.code, codes::METHOD_NOT_FOUND);
        let long = "x".repeat(100);
        let bad = Method::parse(&long, Value::Null).unwrap_err();
        assert_eq!(
            bad.error.message,
            format!("unknown method `{}`", "x".repeat(64))
        );
    }

    #[test]
    fn bad_params_name_the_field_and_keep_the_method() {
        let bad = Method::parse("submit", json!({"agent": "bot"})).unwrap_err();
        assert_eq!(bad.name, Some(MethodName::Submit));
        assert_eq!(bad.error.data.code, "invalid_params");
        assert_eq!(bad.error.code, codes::INVALID_PARAMS);
        assert!(
            bad.error.message.contains("`tool`"),
            "{}",
            bad.error.message
        );
        let bad = Method::parse("approve", json!({"id": "x", "approver": "me"})).unwrap_err();
        assert_eq!(bad.name, Some(MethodName::Approve));
        assert!(
            bad.error.message.contains("`approver`"),
            "{}",
            bad.error.message
        );
        let bad = Method::parse("health", json!({"verbose": true})).unwrap_err();
        assert!(
            bad.error.message.contains("`verbose`"),
            "{}",
            bad.error.message
        );
        // Methods without params ignore whatever they are sent, as before.
        assert!(Method::parse("ping", json!({"anything": 1})).is_ok());
        assert!(Method::parse("audit.verify", json!({"anything": 1})).is_ok());
    }

    #[test]
    fn a_request_line_is_one_jsonrpc_object() {
        assert_eq!(
            request_line(7, "status", &json!({"id": "a\nb"})),
            r#"{"jsonrpc":"2.0","id":7,"method":"status","params":{"id":"a\nb"}}"#
        );
    }

    #[test]
    fn a_response_to_this_call_gives_its_result_or_error() {
        assert_eq!(
            read_response(r#"{"jsonrpc":"2.0","id":3,"result":{"a":1}}"#, 3),
            Ok(json!({"a": 1}))
        );
        assert_eq!(
            read_response(r#"{"jsonrpc":"2.0","id":3,"result":null}"#, 3),
            Ok(Value::Null)
        );
        let e = RpcError::new("not_found", "no such request");
        let line = reply::<Value>(&json!(3), Err(e.clone()));
        assert_eq!(read_response(&line, 3), Err(ResponseError::Rpc(e)));
    }

    #[test]
    fn an_error_with_a_null_id_is_the_answer() {
        // How a server answers a line it could not read, or refuses a connection.
        let e = RpcError::new("too_many_connections", "busy");
        let line = reply::<Value>(&Value::Null, Err(e.clone()));
        assert_eq!(read_response(&line, 1), Err(ResponseError::Rpc(e)));
    }

    #[test]
    fn anything_else_is_a_protocol_error() {
        let protocol =
            |line: &str| matches!(read_response(line, 3), Err(ResponseError::Protocol(_)));
        // No id at all, even with an error or a result.
        assert!(protocol(
            r#"{"jsonrpc":"2.0","error":{"code":-32601,"message":"x","data":{"code":"method_not_found"}}}"#
        ));
        assert!(protocol(r#"{"jsonrpc":"2.0","result":{"approved":true}}"#));
        // Another call's id: never skipped, never taken.
        assert!(protocol(
            r#"{"jsonrpc":"2.0","id":2,"result":{"approved":true}}"#
        ));
        assert!(protocol(
            r#"{"jsonrpc":"2.0","id":"3","result":{"approved":true}}"#
        ));
        assert!(protocol(
            r#"{"jsonrpc":"2.0","id":4,"error":{"code":-32601,"message":"x","data":{"code":"method_not_found"}}}"#
        ));
        // A result nobody can attribute.
        assert!(protocol(
            r#"{"jsonrpc":"2.0","id":null,"result":{"approved":true}}"#
        ));
        // Neither, or both.
        assert!(protocol(r#"{"jsonrpc":"2.0","id":3}"#));
        assert!(protocol(
            r#"{"jsonrpc":"2.0","id":3,"result":{},"error":{"code":-32601,"message":"x","data":{"code":"method_not_found"}}}"#
        ));
        // Not JSON, not an object, an error without its stable code.
        assert!(protocol("HTTP/1.1 400 Bad Request"));
        assert!(protocol("[1,2,3]"));
        assert!(protocol(
            r#"{"jsonrpc":"2.0","id":3,"error":{"code":-1,"message":"x"}}"#
        ));
    }
}
