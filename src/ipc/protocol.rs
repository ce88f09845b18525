//! Wire types and stable error codes. No I/O here.

use crate::domain::request::{ApprovalRequest, DecidedBy, State};
use crate::domain::Risk;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
        "not_found" => codes::NOT_FOUND,
        "already_decided" | "already_voted" | "pairing_refused" | "idempotency_conflict" => {
            codes::CONFLICT
        }
        "not_admin" | "admin_only" | "agent_refused" | "not_your_request" | "peer_refused"
        | "self_approval" => codes::FORBIDDEN,
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
        if self.args_hash != args_hash {
            return Some(format!(
                "asked about arguments {args_hash}, the answer is about {}",
                self.args_hash
            ));
        }
        None
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
            "approved by {}{}",
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
