//! Method results as a client reads them: the fields the CLI prints, typed,
//! so it deserializes an answer once and prints from fields instead of
//! indexing JSON. Pure: serde types only, no I/O. Unknown fields are
//! ignored (a newer server may add some); a missing one is an answer the
//! client cannot read. Decisions are [`super::protocol::DecisionView`].

use super::protocol::DecisionView;
use serde::Deserialize;
use serde_json::Value;

/// `health`.
#[derive(Debug, Deserialize)]
pub struct HealthAnswer {
    pub ok: bool,
    pub socket: Option<ComponentAnswer>,
    pub store: Option<ComponentAnswer>,
    /// The policy view (grants, risks, pairings) as loaded from the store.
    #[serde(default)]
    pub policy: Option<ComponentAnswer>,
    /// `None` when Discord is not configured.
    pub discord: Option<ComponentAnswer>,
    /// `leader` or `follower` (absent from older servers).
    #[serde(default)]
    pub role: Option<String>,
}

/// One component in [`HealthAnswer`].
#[derive(Debug, Deserialize)]
pub struct ComponentAnswer {
    pub up: bool,
    /// `up`, `down`, `timeout`, or Discord's `connected`/`connecting`/
    /// `failed`/`standby`.
    pub state: Option<String>,
    /// Why it is down (admins only).
    pub detail: Option<String>,
}

/// A content flag, in a decision, a check or a pending request.
#[derive(Debug, Deserialize)]
pub struct FlagAnswer {
    pub kind: Option<String>,
    #[serde(default)]
    pub detail: String,
}

/// `check`.
#[derive(Debug, Deserialize)]
pub struct CheckAnswer {
    pub verdict: VerdictAnswer,
    #[serde(default)]
    pub flags: Vec<FlagAnswer>,
}

/// The policy's verdict in [`CheckAnswer`].
#[derive(Debug, Deserialize)]
pub struct VerdictAnswer {
    /// `allow`, `deny` or `ask`.
    pub action: String,
    pub rule: String,
    pub detail: String,
}

/// `approve` and `deny`.
#[derive(Debug, Deserialize)]
pub struct VoteAnswer {
    pub decision: DecisionView,
    pub approvals: u32,
    pub approvals_required: u32,
    /// The time-boxed grant an `approve --for` added.
    pub grant: Option<TimedGrantAnswer>,
}

/// A time-boxed grant (`approve --for`, `tools.list`, `tools.effective`).
#[derive(Debug, Deserialize)]
pub struct TimedGrantAnswer {
    pub id: String,
    pub agent: String,
    pub tool: String,
    pub scope: String,
    pub scope_label: String,
    pub user_id: Option<String>,
    pub until: String,
    pub created_by: String,
    pub origin_request: String,
}

impl TimedGrantAnswer {
    /// One line: `tg-… shell for agent bot (this exact call) until … by uid:0, from request …`.
    pub fn line(&self) -> String {
        let user = self
            .user_id
            .as_deref()
            .map(|u| format!(" and user {u}"))
            .unwrap_or_default();
        format!(
            "{} `{}` for agent {}{} ({}) {} — by {}, from request {}",
            self.id,
            self.tool,
            self.agent,
            user,
            self.scope_label,
            self.until,
            self.created_by,
            self.origin_request
        )
    }
}

/// One request in the `pending` list.
#[derive(Debug, Deserialize)]
pub struct PendingAnswer {
    pub id: String,
    pub tool: String,
    pub risk: String,
    pub agent: String,
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    pub deadline_ms: i64,
    #[serde(default)]
    pub flags: Vec<FlagAnswer>,
    pub rule_detail: String,
    pub args: Value,
    pub justification: String,
}

/// `grant`, `revoke`, `pairing.add` and `pairing.revoke`.
#[derive(Debug, Deserialize)]
pub struct ChangedAnswer {
    pub changed: bool,
}

/// `tools.list`.
#[derive(Debug, Deserialize)]
pub struct ToolsAnswer {
    pub grants: Vec<GrantAnswer>,
    #[serde(default)]
    pub timed_grants: Vec<TimedGrantAnswer>,
    pub risks: Vec<ToolRiskAnswer>,
}

/// One allowlist entry (`tools.list`, `tools.effective`).
#[derive(Debug, Deserialize)]
pub struct GrantAnswer {
    pub scope: String,
    pub effect: String,
    pub tool: String,
    /// Absent from `tools.effective`.
    pub created_by: Option<String>,
}

/// A tool's risk level (`tools.list`, `tools.risk`); `None` when cleared.
#[derive(Debug, Deserialize)]
pub struct ToolRiskAnswer {
    pub tool: String,
    pub risk: Option<String>,
}

/// `tools.effective`.
#[derive(Debug, Deserialize)]
pub struct EffectiveAnswer {
    pub detail: String,
    pub deciding_scope: Option<String>,
    pub entries: Vec<GrantAnswer>,
    #[serde(default)]
    pub timed_grants: Vec<TimedGrantAnswer>,
}

/// `pairing.list`.
#[derive(Debug, Deserialize)]
pub struct PairingsAnswer {
    pub paired: Vec<PairedAnswer>,
    pub pending_codes: Vec<PairingCodeAnswer>,
}

/// A paired user (`pairing.list`, `pairing.approve`).
#[derive(Debug, Deserialize)]
pub struct PairedAnswer {
    pub user_id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub paired_by: String,
}

/// A live pairing code in [`PairingsAnswer`] (the code itself is never shown).
#[derive(Debug, Deserialize)]
pub struct PairingCodeAnswer {
    pub user_id: String,
    pub expires_ms: i64,
}

/// `pairing.request`.
#[derive(Debug, Deserialize)]
pub struct PairingCodeIssued {
    pub user_id: String,
    pub code: String,
}

/// `token.issue` and `token.rotate`: the token, shown once.
#[derive(Debug, Deserialize)]
pub struct TokenIssued {
    pub id: String,
    pub agent: String,
    pub token: String,
    pub expires_ms: Option<i64>,
    pub others_expire_ms: Option<i64>,
    #[serde(default)]
    pub others: u64,
}

/// One token as `token.list` and `token.revoke` show it (never a secret).
#[derive(Debug, Deserialize)]
pub struct TokenAnswer {
    pub id: String,
    pub agent: String,
    pub created_ms: i64,
    pub created_by: String,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

/// One audit entry (`audit.tail`, `audit.export`).
#[derive(Debug, Deserialize)]
pub struct AuditAnswer {
    pub seq: i64,
    pub at_ms: i64,
    pub kind: String,
    pub actor: String,
    pub request_id: Option<String>,
    pub detail: Value,
}

/// `audit.prune`.
#[derive(Debug, Deserialize)]
pub struct PruneAnswer {
    pub pruned: u64,
    pub through_seq: Option<i64>,
}

/// `audit.verify`.
#[derive(Debug, Deserialize)]
pub struct ChainAnswer {
    pub ok: bool,
    pub entries: Option<u64>,
    pub broken_at: Option<i64>,
    pub problem: Option<String>,
}

/// `verify`.
#[derive(Debug, Deserialize)]
pub struct VerifyAnswer {
    pub request_id: String,
    pub state: String,
    pub matches: bool,
    pub approved: bool,
    pub args_hash: String,
    pub expected_hash: String,
}
