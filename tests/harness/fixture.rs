//! `ApprovalRequest` values for tests that drive the store directly:
//! [`request`] gives a builder with plain defaults, each test sets what it
//! is about.

use keyturn::domain::request::{ApprovalRequest, RequestId, State};
use keyturn::domain::Risk;
use serde_json::{json, Value};
use uuid::Uuid;

/// A request with defaults: a fresh v7 id, agent `a`, tool `t`, args `{}`
/// (hash `h`), no user, channel, task or idempotency key, low risk (rule
/// `risk_low`), one approval, created and due at 0, approved and not yet
/// decided by anyone.
pub fn request() -> RequestBuilder {
    RequestBuilder(ApprovalRequest {
        id: RequestId(Uuid::now_v7()),
        agent: "a".into(),
        tool: "t".into(),
        args: json!({}),
        args_hash: "h".into(),
        user_id: None,
        channel_id: None,
        justification: String::new(),
        task_id: None,
        idempotency_key: None,
        risk: Risk::Low,
        approvals_required: 1,
        admin_only: false,
        rule: "risk_low".into(),
        rule_detail: String::new(),
        flags: vec![],
        created_ms: 0,
        deadline_ms: 0,
        state: State::Approved,
        decided_by: None,
        decided_who: None,
        decided_reason: None,
        decided_ms: None,
        requester_uid: None,
        run: None,
        edit: None,
    })
}

/// See [`request`].
pub struct RequestBuilder(ApprovalRequest);

impl RequestBuilder {
    /// The id `Uuid::from_u128(n)`, for a known order.
    pub fn id(mut self, n: u128) -> Self {
        self.0.id = RequestId(Uuid::from_u128(n));
        self
    }
    pub fn agent(mut self, agent: &str) -> Self {
        self.0.agent = agent.into();
        self
    }
    pub fn tool(mut self, tool: &str) -> Self {
        self.0.tool = tool.into();
        self
    }
    pub fn args(mut self, args: Value) -> Self {
        self.0.args = args;
        self
    }
    pub fn args_hash(mut self, hash: &str) -> Self {
        self.0.args_hash = hash.into();
        self
    }
    pub fn user(mut self, user_id: &str) -> Self {
        self.0.user_id = Some(user_id.into());
        self
    }
    pub fn task(mut self, task_id: &str) -> Self {
        self.0.task_id = Some(task_id.into());
        self
    }
    pub fn idempotency_key(mut self, key: &str) -> Self {
        self.0.idempotency_key = Some(key.into());
        self
    }
    /// The risk, and the rule that goes with it (`risk_<level>`).
    pub fn risk(mut self, risk: Risk) -> Self {
        self.0.risk = risk;
        self.0.rule = format!("risk_{risk}");
        self
    }
    pub fn justification(mut self, text: &str) -> Self {
        self.0.justification = text.into();
        self
    }
    /// How many approvals decide it.
    pub fn approvals(mut self, n: u32) -> Self {
        self.0.approvals_required = n;
        self
    }
    pub fn created(mut self, ms: i64) -> Self {
        self.0.created_ms = ms;
        self
    }
    pub fn deadline(mut self, ms: i64) -> Self {
        self.0.deadline_ms = ms;
        self
    }
    pub fn state(mut self, state: State) -> Self {
        self.0.state = state;
        self
    }
    pub fn build(self) -> ApprovalRequest {
        self.0
    }
}
