//! The policy: decides instantly where it can, and says which rule decided.
//!
//! Order (first failure denies): agent known → agent not paused (the kill
//! switch) → user paired → rate limits and task budget → tool allowlist
//! (fail closed, most specific scope wins) → risk level → autonomy mode; an
//! allowed call whose agent is less confident than its threshold asks a
//! human instead. Pure: rate-limit state and time are parameters.
//!
//! Time-boxed grants ([`super::timed`]) come last, and only in place of the
//! "ask a human" step for the risk level or autonomy mode: every deny above
//! (unknown agent, paused agent, unpaired user, rate limits, task budget, the
//! allowlist, content flags that deny) still denies, an escalation forced by
//! content (`force_ask`: flags, the trifecta) still asks, an unattended agent
//! is still denied, an agent below its confidence threshold still asks, and
//! an ask that needs more than one approval, or an admin's when the grant's
//! approver was not one, still asks. The trifecta guard in the store runs
//! after the policy and escalates a granted call like any other allowed one.

use super::ratelimit::{check_budget, Buckets, BudgetExceeded, Rate, TaskUsage};
use super::risk::Risk;
use super::timed::{TimedCall, TimedGrant};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// Where a grant applies. More specific scopes override less specific ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Global,
    Agent(String),
    Role(String),
    Channel(String),
    User(String),
}

/// The scope kinds from most to least specific.
pub const PRECEDENCE: [&str; 5] = ["user", "channel", "role", "agent", "global"];

impl Scope {
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Agent(_) => "agent",
            Scope::Role(_) => "role",
            Scope::Channel(_) => "channel",
            Scope::User(_) => "user",
        }
    }

    pub fn target(&self) -> &str {
        match self {
            Scope::Global => "",
            Scope::Agent(t) | Scope::Role(t) | Scope::Channel(t) | Scope::User(t) => t,
        }
    }

    /// Builds a scope from a kind and a target, validating both.
    pub fn new(kind: &str, target: &str) -> Result<Scope, String> {
        let target = target.trim();
        if kind == "global" {
            if !target.is_empty() {
                return Err(format!("scope `global` takes no target (got `{target}`)"));
            }
            return Ok(Scope::Global);
        }
        if target.is_empty() {
            return Err(format!("scope `{kind}` needs a target, e.g. `{kind}:42`"));
        }
        if target.len() > 100
            || !target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.@".contains(c))
        {
            return Err(format!(
                "scope target `{target}` must be 1-100 characters of letters, digits, `_-.@`"
            ));
        }
        let t = target.to_string();
        match kind {
            "agent" => Ok(Scope::Agent(t)),
            "role" => Ok(Scope::Role(t)),
            "channel" => Ok(Scope::Channel(t)),
            "user" => Ok(Scope::User(t)),
            other => Err(format!(
                "unknown scope `{other}` (expected global, agent, role, channel or user)"
            )),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            other => write!(f, "{}:{}", other.kind(), other.target()),
        }
    }
}

impl FromStr for Scope {
    type Err = String;
    /// Parses `global`, `agent:NAME`, `role:ID`, `channel:ID` or `user:ID`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((kind, target)) => Scope::new(kind.trim(), target),
            None => Scope::new(s.trim(), ""),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A tool name or a glob over tool names: `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ToolPattern(String);

/// Longest tool name or pattern accepted anywhere.
pub const MAX_TOOL_LEN: usize = 128;

/// Checks a tool name as submitted by an agent.
pub fn validate_tool_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOOL_LEN {
        return Err(format!("tool name must be 1-{MAX_TOOL_LEN} bytes"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.:-/".contains(c))
    {
        return Err(format!(
            "tool name `{}` may contain only ASCII letters, digits and `_.:-/`",
            name.escape_default()
        ));
    }
    Ok(())
}

impl ToolPattern {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `tool` matches this pattern.
    pub fn matches(&self, tool: &str) -> bool {
        glob_match(self.0.as_bytes(), tool.as_bytes())
    }
}

impl fmt::Display for ToolPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ToolPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let without_stars: String = s.chars().filter(|&c| c != '*').collect();
        if s.is_empty() || s.len() > MAX_TOOL_LEN {
            return Err(format!("tool pattern must be 1-{MAX_TOOL_LEN} bytes"));
        }
        if s.contains("**") {
            return Err(format!("tool pattern `{s}`: `**` is not allowed, use `*`"));
        }
        if !without_stars.is_empty() {
            validate_tool_name(&without_stars).map_err(|_| {
                format!(
                    "tool pattern `{}` may contain only ASCII letters, digits, `_.:-/` and `*`",
                    s.escape_default()
                )
            })?;
        }
        Ok(ToolPattern(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for ToolPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Iterative glob match with `*` only (no backtracking blow-up).
fn glob_match(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pat.len() && pat[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Allow or deny entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    #[default]
    Allow,
    Deny,
}

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub scope: Scope,
    pub tool: ToolPattern,
    #[serde(default)]
    pub effect: Effect,
    /// `config` or `store`: config grants can only be changed by editing the file.
    #[serde(default = "default_source")]
    pub source: String,
}

fn default_source() -> String {
    "store".into()
}

/// The context a call is evaluated in.
#[derive(Debug, Clone, Default)]
pub struct Call<'a> {
    pub agent: &'a str,
    pub user: Option<&'a str>,
    /// The user's roles, from Keyturn's own records (never from the agent).
    pub roles: &'a [String],
    pub channel: Option<&'a str>,
    pub tool: &'a str,
    pub task: Option<&'a str>,
    pub cost: f64,
}

impl Scope {
    fn applies_to(&self, call: &Call<'_>) -> bool {
        match self {
            Scope::Global => true,
            Scope::Agent(a) => a == call.agent,
            Scope::Role(r) => call.roles.iter().any(|x| x == r),
            Scope::Channel(c) => call.channel == Some(c.as_str()),
            Scope::User(u) => call.user == Some(u.as_str()),
        }
    }
}

/// What the allowlist says about a call, and which scope said it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowlistAnswer {
    pub allowed: bool,
    /// `tool_allowed`, `tool_denied`, `tool_not_allowed` or `no_grant`.
    pub rule: &'static str,
    /// The scope kind that decided (`user`, `channel`, …), if any had entries.
    pub deciding_scope: Option<&'static str>,
    /// The entry that matched, if any.
    pub matched: Option<Grant>,
    /// Every entry of the deciding scope (what a human needs to see why).
    pub entries: Vec<Grant>,
    pub detail: String,
}

/// Fail-closed allowlist: the most specific scope kind with any entry for this
/// context decides; within it a matching deny beats a matching allow; no entry
/// anywhere denies.
pub fn resolve_allowlist(grants: &[Grant], call: &Call<'_>) -> AllowlistAnswer {
    for kind in PRECEDENCE {
        let entries: Vec<&Grant> = grants
            .iter()
            .filter(|g| g.scope.kind() == kind && g.scope.applies_to(call))
            .collect();
        if entries.is_empty() {
            continue;
        }
        let all: Vec<Grant> = entries.iter().map(|g| (*g).clone()).collect();
        let find = |effect| {
            entries
                .iter()
                .find(|g| g.effect == effect && g.tool.matches(call.tool))
        };
        if let Some(g) = find(Effect::Deny) {
            return AllowlistAnswer {
                allowed: false,
                rule: "tool_denied",
                deciding_scope: Some(kind),
                matched: Some((*g).clone()),
                entries: all,
                detail: format!(
                    "`{}` is denied by `{}` in scope {}",
                    call.tool, g.tool.0, g.scope
                ),
            };
        }
        if let Some(g) = find(Effect::Allow) {
            return AllowlistAnswer {
                allowed: true,
                rule: "tool_allowed",
                deciding_scope: Some(kind),
                matched: Some((*g).clone()),
                entries: all,
                detail: format!(
                    "`{}` is allowed by `{}` in scope {}",
                    call.tool, g.tool.0, g.scope
                ),
            };
        }
        return AllowlistAnswer {
            allowed: false,
            rule: "tool_not_allowed",
            deciding_scope: Some(kind),
            matched: None,
            entries: all,
            detail: format!(
                "scope `{kind}` has entries for this context but none allows `{}`",
                call.tool
            ),
        };
    }
    AllowlistAnswer {
        allowed: false,
        rule: "no_grant",
        deciding_scope: None,
        matched: None,
        entries: vec![],
        detail: format!("no allowlist entry in any scope covers `{}`", call.tool),
    }
}

/// How much the gateway lets through without a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Autonomy {
    /// Low, medium and high run without asking; critical still asks an admin.
    Autonomous,
    /// Ask per risk level: high asks an approver, critical an admin.
    #[default]
    Supervised,
    /// Every allowed call asks (critical still asks an admin).
    ApprovalRequired,
}

/// Everything configurable about the policy (built from the config file).
#[derive(Debug, Clone, Default)]
pub struct PolicySettings {
    pub autonomy: Autonomy,
    pub channel_autonomy: HashMap<String, Autonomy>,
    pub agent_rate: Option<Rate>,
    pub user_rate: Option<Rate>,
    pub task_max_steps: Option<u64>,
    pub task_max_cost: Option<f64>,
    /// Distinct approvals needed at high and at critical risk.
    pub approvals_high: u32,
    pub approvals_critical: u32,
}

/// Facts about the caller that the policy cannot know itself.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub agent_known: bool,
    pub user_paired: bool,
    /// Nobody is watching: a call that needs a human is denied at once.
    pub unattended: bool,
    /// The tool's risk (unknown tools are `High`).
    pub risk: Risk,
    /// Content flags that raise the risk by one level.
    pub raise_risk: Option<String>,
    /// Content flags configured to deny: (rule, detail).
    pub force_deny: Option<(String, String)>,
    /// An escalation that forces a human whatever the risk: (rule, detail),
    /// e.g. `flag_homoglyph` for a flagged call, `trifecta`.
    pub force_ask: Option<(String, String)>,
    /// The kill switch in force for this agent (its own or the global one),
    /// if any: every call is denied (`agent_paused`).
    pub paused: Option<Pause>,
    /// How sure the agent says it is of this call (0..=1), if it said.
    pub confidence: Option<f64>,
    /// The threshold below which an allowed call asks a human
    /// (`low_confidence`); `None` turns the check off.
    pub min_confidence: Option<f64>,
}

/// The rule a paused agent's calls are denied by, and the reason its
/// pending requests are cancelled with.
pub const AGENT_PAUSED: &str = "agent_paused";

/// The rule an allowed call asks a human by when its agent's confidence is
/// below the threshold.
pub const LOW_CONFIDENCE: &str = "low_confidence";

/// The agent name a global pause (`pause-all`) is stored under; no
/// configured agent can have it (names are letters, digits and `_-.`).
pub const ALL_AGENTS: &str = "*";

/// A kill switch in force: one agent's (or, under [`ALL_AGENTS`], every
/// agent's), who pulled it, when and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// The agent, or [`ALL_AGENTS`].
    pub agent: String,
    /// Who paused it (`uid:1000`, `cli:alice`, `discord:42`).
    pub paused_by: String,
    pub since_ms: i64,
    pub reason: Option<String>,
}

impl Pause {
    /// Whether this pause stops every agent.
    pub fn is_global(&self) -> bool {
        self.agent == ALL_AGENTS
    }

    /// Why a call is denied (and a pending request cancelled) under this
    /// pause: who paused, and why if they said.
    pub fn detail(&self) -> String {
        let what = if self.is_global() {
            "every agent is paused (pause-all)".to_string()
        } else {
            format!("agent `{}` is paused", self.agent)
        };
        match self.reason.as_deref().filter(|r| !r.is_empty()) {
            Some(r) => format!("{what} by {}: {r}", self.paused_by),
            None => format!("{what} by {}", self.paused_by),
        }
    }
}

/// The pause in force for `agent` among `pauses`: the global one first
/// (it stops everyone), else the agent's own.
pub fn pause_for<'a>(pauses: &'a [Pause], agent: &str) -> Option<&'a Pause> {
    pauses
        .iter()
        .find(|p| p.is_global())
        .or_else(|| pauses.iter().find(|p| p.agent == agent))
}

/// Checks a submitted confidence: a finite number in 0..=1.
pub fn validate_confidence(c: f64) -> Result<(), String> {
    if c.is_finite() && (0.0..=1.0).contains(&c) {
        Ok(())
    } else {
        Err(format!(
            "`confidence` must be a number from 0 to 1 (got {c})"
        ))
    }
}

/// Whether a call with `confidence` falls below `min` (both set), and if
/// so why: `the agent's confidence 0.42 is below 0.7`. A call that says
/// nothing about its confidence is not held back by it.
pub fn low_confidence(confidence: Option<f64>, min: Option<f64>) -> Option<String> {
    match (confidence, min) {
        (Some(c), Some(m)) if c < m => Some(format!("the agent's confidence {c} is below {m}")),
        _ => None,
    }
}

/// Mutable rate-limit and budget state, owned by the caller.
#[derive(Debug, Default)]
pub struct PolicyState {
    pub agents: Buckets,
    pub users: Buckets,
    pub tasks: HashMap<(String, String), (TaskUsage, i64)>,
}

impl PolicyState {
    /// Forgets idle buckets and tasks idle for `task_idle_ms`.
    pub fn prune(&mut self, s: &PolicySettings, now_ms: i64, task_idle_ms: i64) {
        if let Some(r) = s.agent_rate {
            self.agents.prune(r, now_ms);
        }
        if let Some(r) = s.user_rate {
            self.users.prune(r, now_ms);
        }
        self.tasks
            .retain(|_, (_, last)| now_ms - *last < task_idle_ms);
    }
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Verdict {
    Allow {
        risk: Risk,
        rule: String,
        detail: String,
        /// Medium risk: allowed, and logged prominently.
        log: bool,
    },
    Deny {
        rule: String,
        detail: String,
    },
    Ask {
        risk: Risk,
        /// Only admins may vote.
        admin_only: bool,
        approvals: u32,
        rule: String,
        detail: String,
    },
}

impl Verdict {
    pub fn rule(&self) -> &str {
        match self {
            Verdict::Allow { rule, .. }
            | Verdict::Deny { rule, .. }
            | Verdict::Ask { rule, .. } => rule,
        }
    }
}

fn deny(rule: &str, detail: String) -> Verdict {
    Verdict::Deny {
        rule: rule.into(),
        detail,
    }
}

/// Evaluates one call. With `dry_run` no rate-limit token or budget is used.
pub fn evaluate(
    s: &PolicySettings,
    grants: &[Grant],
    call: &Call<'_>,
    facts: &Facts,
    state: &mut PolicyState,
    now_ms: i64,
    dry_run: bool,
) -> Verdict {
    evaluate_with_timed(s, grants, &[], None, call, facts, state, now_ms, dry_run)
}

/// [`evaluate`] with time-boxed grants: one live at `now_ms` that covers the
/// call (`args_hash` is the call's) allows, with rule `timed_grant` and a
/// detail naming it, what would otherwise ask a human for its risk level or
/// the autonomy mode. Nothing else changes (see the module header).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with_timed(
    s: &PolicySettings,
    grants: &[Grant],
    timed: &[TimedGrant],
    args_hash: Option<&str>,
    call: &Call<'_>,
    facts: &Facts,
    state: &mut PolicyState,
    now_ms: i64,
    dry_run: bool,
) -> Verdict {
    if !facts.agent_known {
        return deny(
            "unknown_agent",
            format!("agent `{}` is not configured", call.agent),
        );
    }
    if let Some(p) = &facts.paused {
        return deny(AGENT_PAUSED, p.detail());
    }
    if let Some(user) = call.user {
        if !facts.user_paired {
            return deny(
                "user_not_paired",
                format!("user {user} is not paired; an admin must approve their pairing code"),
            );
        }
    }
    if let Some(rate) = s.agent_rate {
        if !state.agents.take(call.agent, rate, now_ms, dry_run) {
            return deny(
                "rate_limit_agent",
                format!("agent `{}` exceeded {rate}", call.agent),
            );
        }
    }
    if let (Some(rate), Some(user)) = (s.user_rate, call.user) {
        if !state.users.take(user, rate, now_ms, dry_run) {
            return deny("rate_limit_user", format!("user {user} exceeded {rate}"));
        }
    }
    if !(call.cost.is_finite() && call.cost >= 0.0) {
        return deny(
            "invalid_cost",
            "cost must be a finite number >= 0".to_string(),
        );
    }
    if let Some(task) = call.task {
        let key = (call.agent.to_string(), task.to_string());
        let usage = state
            .tasks
            .get(&key)
            .map(|(u, _)| u.clone())
            .unwrap_or_default();
        match check_budget(&usage, call.cost, s.task_max_steps, s.task_max_cost) {
            Err(BudgetExceeded::Steps { used, max }) => {
                return deny(
                    "task_step_limit",
                    format!("task `{task}` has used {used} of {max} steps"),
                )
            }
            Err(BudgetExceeded::Cost { used, adding, max }) => {
                return deny(
                    "task_budget",
                    format!(
                    "task `{task}` has used {used} of its budget {max}; this call adds {adding}"
                ),
                )
            }
            Ok(()) if !dry_run => {
                let entry = state.tasks.entry(key).or_default();
                entry.0.steps += 1;
                entry.0.cost += call.cost;
                entry.1 = now_ms;
            }
            Ok(()) => {}
        }
    }
    let allow = resolve_allowlist(grants, call);
    if !allow.allowed {
        return deny(allow.rule, allow.detail);
    }
    if let Some((rule, detail)) = &facts.force_deny {
        return deny(rule, detail.clone());
    }

    let mut risk = facts.risk;
    let mut why = format!("`{}` is {} risk", call.tool, risk);
    if let Some(flag) = &facts.raise_risk {
        risk = risk.raised();
        why = format!("{why}, raised to {risk}: {flag}");
    }
    let autonomy = call
        .channel
        .and_then(|c| s.channel_autonomy.get(c))
        .copied()
        .unwrap_or(s.autonomy);

    let timed_call = TimedCall {
        agent: call.agent,
        tool: call.tool,
        user: call.user,
        args_hash,
    };
    // `grantable`: whether a time-boxed grant may stand in for the human.
    let ask = |rule: &str, detail: String, grantable: bool| {
        if facts.unattended {
            return deny(
                "unattended",
                format!("{detail}; nobody is watching this agent, so it is denied at once"),
            );
        }
        let admin_only = risk == Risk::Critical;
        let approvals = if admin_only {
            s.approvals_critical.max(1)
        } else {
            s.approvals_high.max(1)
        };
        if grantable && approvals == 1 {
            if let Some(g) = timed
                .iter()
                .find(|g| (g.by_admin || !admin_only) && g.covers(&timed_call, now_ms))
            {
                return Verdict::Allow {
                    risk,
                    rule: "timed_grant".into(),
                    detail: format!("{}; {detail}", g.allow_detail()),
                    log: true,
                };
            }
        }
        Verdict::Ask {
            risk,
            admin_only,
            approvals,
            rule: rule.into(),
            detail,
        }
    };

    if let Some((rule, reason)) = &facts.force_ask {
        return ask(rule, format!("{reason}; {why}"), false);
    }
    let verdict = match (risk, autonomy) {
        (Risk::Critical, _) => ask(
            "risk_critical",
            format!("{why}: an admin must approve"),
            true,
        ),
        (_, Autonomy::ApprovalRequired) => ask(
            "approval_required",
            format!("{why}; autonomy is approval_required, so every call asks"),
            true,
        ),
        (Risk::High, Autonomy::Supervised) => ask(
            "risk_high",
            format!("{why}: an approver must approve"),
            true,
        ),
        (Risk::High, Autonomy::Autonomous) => Verdict::Allow {
            risk,
            rule: "autonomous".into(),
            detail: format!("{why}; autonomy is autonomous"),
            log: true,
        },
        (Risk::Medium, _) => Verdict::Allow {
            risk,
            rule: "risk_medium".into(),
            detail: format!("{why}: allowed and logged"),
            log: true,
        },
        (Risk::Low, _) => Verdict::Allow {
            risk,
            rule: "risk_low".into(),
            detail: why,
            log: false,
        },
    };
    // An uncertain agent asks a human even where the policy would allow;
    // a deny or an ask stays as it is.
    match (
        &verdict,
        low_confidence(facts.confidence, facts.min_confidence),
    ) {
        (Verdict::Allow { detail, .. }, Some(low)) => ask(
            LOW_CONFIDENCE,
            format!("{low}, so a human decides; {detail}"),
            false,
        ),
        _ => verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(scope: &str, tool: &str) -> Grant {
        Grant {
            scope: scope.parse().unwrap(),
            tool: tool.parse().unwrap(),
            effect: Effect::Allow,
            source: "store".into(),
        }
    }

    fn deny_g(scope: &str, tool: &str) -> Grant {
        Grant {
            effect: Effect::Deny,
            ..g(scope, tool)
        }
    }

    fn call<'a>(tool: &'a str, roles: &'a [String]) -> Call<'a> {
        Call {
            agent: "bot",
            user: Some("42"),
            roles,
            channel: Some("7"),
            tool,
            task: None,
            cost: 0.0,
        }
    }

    fn facts(risk: Risk) -> Facts {
        Facts {
            agent_known: true,
            user_paired: true,
            risk,
            ..Facts::default()
        }
    }

    fn settings() -> PolicySettings {
        PolicySettings {
            approvals_high: 1,
            approvals_critical: 2,
            ..PolicySettings::default()
        }
    }

    fn eval(grants: &[Grant], c: &Call<'_>, f: &Facts) -> Verdict {
        evaluate(
            &settings(),
            grants,
            c,
            f,
            &mut PolicyState::default(),
            0,
            false,
        )
    }

    fn timed(kind: crate::domain::timed::TimedScopeKind, expires: Option<i64>) -> TimedGrant {
        TimedGrant {
            id: "tg-7".into(),
            agent: "bot".into(),
            tool: "x".into(),
            kind,
            user_id: Some("42".into()),
            args_hash: Some("h1".into()),
            expires_ms: expires,
            created_by: "uid:1".into(),
            created_ms: 0,
            origin_request: "r1".into(),
            by_admin: false,
        }
    }

    fn eval_timed(
        s: &PolicySettings,
        grants: &[Grant],
        t: &[TimedGrant],
        hash: &str,
        c: &Call<'_>,
        f: &Facts,
        now: i64,
    ) -> Verdict {
        evaluate_with_timed(
            s,
            grants,
            t,
            Some(hash),
            c,
            f,
            &mut PolicyState::default(),
            now,
            false,
        )
    }

    #[test]
    fn a_timed_grant_replaces_the_ask_until_its_instant() {
        use crate::domain::timed::TimedScopeKind as K;
        let grants = vec![g("global", "*")];
        let t = [timed(K::Call, Some(1000))];
        let c = call("x", &[]);
        let f = facts(Risk::High);
        let v = eval_timed(&settings(), &grants, &t, "h1", &c, &f, 999);
        assert_eq!(v.rule(), "timed_grant");
        let Verdict::Allow { detail, .. } = &v else {
            panic!("{v:?}")
        };
        assert!(detail.contains("grant tg-7"), "{detail}");
        assert!(detail.contains("request r1"), "{detail}");
        // At the instant of expiry it asks again, with no sweep.
        let v = eval_timed(&settings(), &grants, &t, "h1", &c, &f, 1000);
        assert_eq!(v.rule(), "risk_high");
        // Other arguments still ask.
        let v = eval_timed(&settings(), &grants, &t, "h2", &c, &f, 0);
        assert_eq!(v.rule(), "risk_high");
        // The agent-tool scope covers other arguments, for this agent only.
        let t = [timed(K::AgentTool, None)];
        let v = eval_timed(&settings(), &grants, &t, "h2", &c, &f, 0);
        assert_eq!(v.rule(), "timed_grant");
        let other = Call {
            agent: "bot2",
            ..call("x", &[])
        };
        let v = eval_timed(&settings(), &grants, &t, "h2", &other, &f, 0);
        assert_eq!(v.rule(), "risk_high");
    }

    #[test]
    fn a_timed_grant_never_turns_a_deny_into_an_allow() {
        use crate::domain::timed::TimedScopeKind as K;
        let t = [timed(K::AgentTool, None)];
        let c = call("x", &[]);
        let f = facts(Risk::High);
        // The allowlist denies.
        assert_eq!(
            eval_timed(&settings(), &[], &t, "h1", &c, &f, 0).rule(),
            "no_grant"
        );
        let grants = vec![g("global", "*"), deny_g("user:42", "x")];
        assert_eq!(
            eval_timed(&settings(), &grants, &t, "h1", &c, &f, 0).rule(),
            "tool_denied"
        );
        let grants = vec![g("global", "*")];
        // A content flag that denies.
        let mut fd = facts(Risk::High);
        fd.force_deny = Some(("flag_prompt_injection".into(), "d".into()));
        assert_eq!(
            eval_timed(&settings(), &grants, &t, "h1", &c, &fd, 0).rule(),
            "flag_prompt_injection"
        );
        // A forced escalation (the trifecta, a flag) still asks.
        let mut fa = facts(Risk::High);
        fa.force_ask = Some(("trifecta".into(), "lethal trifecta".into()));
        assert_eq!(
            eval_timed(&settings(), &grants, &t, "h1", &c, &fa, 0).rule(),
            "trifecta"
        );
        // Unattended is still denied.
        let mut fu = facts(Risk::High);
        fu.unattended = true;
        assert_eq!(
            eval_timed(&settings(), &grants, &t, "h1", &c, &fu, 0).rule(),
            "unattended"
        );
        // Rate limits still deny.
        let mut s = settings();
        s.agent_rate = Some("1/min".parse().unwrap());
        let mut st = PolicyState::default();
        let run = |st: &mut PolicyState| {
            evaluate_with_timed(&s, &grants, &t, Some("h1"), &c, &f, st, 0, false)
        };
        assert_eq!(run(&mut st).rule(), "timed_grant");
        assert_eq!(run(&mut st).rule(), "rate_limit_agent");
    }

    #[test]
    fn critical_needs_an_admins_grant_and_a_single_approval() {
        use crate::domain::timed::TimedScopeKind as K;
        let grants = vec![g("global", "*")];
        let c = call("x", &[]);
        let f = facts(Risk::Critical);
        let mut s = settings();
        s.approvals_critical = 1;
        let t = [timed(K::AgentTool, None)];
        assert_eq!(
            eval_timed(&s, &grants, &t, "h1", &c, &f, 0).rule(),
            "risk_critical"
        );
        let mut admin = timed(K::AgentTool, None);
        admin.by_admin = true;
        let t = [admin];
        assert_eq!(
            eval_timed(&s, &grants, &t, "h1", &c, &f, 0).rule(),
            "timed_grant"
        );
        // Two approvals needed: a grant never bypasses the second person.
        s.approvals_critical = 2;
        assert_eq!(
            eval_timed(&s, &grants, &t, "h1", &c, &f, 0).rule(),
            "risk_critical"
        );
    }

    #[test]
    fn glob_matching() {
        let p: ToolPattern = "fs.*".parse().unwrap();
        assert!(p.matches("fs.read"));
        assert!(p.matches("fs."));
        assert!(!p.matches("fsx.read"));
        assert!(!p.matches("net.fs.read"));
        let star: ToolPattern = "*".parse().unwrap();
        assert!(star.matches("anything.at:all"));
        let mid: ToolPattern = "mcp.*.delete*".parse().unwrap();
        assert!(mid.matches("mcp.github.delete_repo"));
        assert!(!mid.matches("mcp.github.create"));
        let exact: ToolPattern = "shell".parse().unwrap();
        assert!(exact.matches("shell"));
        assert!(!exact.matches("shell2"));
    }

    #[test]
    fn bad_patterns_are_rejected_with_a_reason() {
        assert!("".parse::<ToolPattern>().is_err());
        assert!("fs.**".parse::<ToolPattern>().unwrap_err().contains("**"));
        assert!("rm -rf".parse::<ToolPattern>().is_err());
        assert!("a".repeat(129).parse::<ToolPattern>().is_err());
        assert!("x\u{202e}".parse::<ToolPattern>().is_err());
    }

    #[test]
    fn scopes_parse_and_print() {
        for s in ["global", "agent:bot", "role:30", "channel:7", "user:42"] {
            assert_eq!(s.parse::<Scope>().unwrap().to_string(), s);
        }
        assert!("galaxy:1".parse::<Scope>().is_err());
        assert!("user:".parse::<Scope>().is_err());
        assert!("global:x".parse::<Scope>().is_err());
        assert!("user:a b".parse::<Scope>().is_err());
    }

    #[test]
    fn no_entry_anywhere_denies() {
        let v = eval(&[], &call("shell", &[]), &facts(Risk::Low));
        assert_eq!(v.rule(), "no_grant");
    }

    #[test]
    fn most_specific_scope_with_entries_decides() {
        let roles = vec!["30".to_string()];
        // Global allows everything, but the channel scope only allows fs.*.
        let grants = vec![g("global", "*"), g("channel:7", "fs.*")];
        let c = call("shell", &roles);
        let a = resolve_allowlist(&grants, &c);
        assert!(!a.allowed);
        assert_eq!(a.rule, "tool_not_allowed");
        assert_eq!(a.deciding_scope, Some("channel"));
        assert!(resolve_allowlist(&grants, &call("fs.read", &roles)).allowed);

        // A user entry beats the channel entry.
        let grants = vec![g("channel:7", "fs.*"), g("user:42", "shell")];
        let a = resolve_allowlist(&grants, &c);
        assert!(a.allowed);
        assert_eq!(a.deciding_scope, Some("user"));
        assert!(!resolve_allowlist(&grants, &call("fs.read", &roles)).allowed);
    }

    #[test]
    fn precedence_is_global_agent_role_channel_user() {
        let roles = vec!["30".to_string()];
        let all = [
            g("global", "t_global"),
            g("agent:bot", "t_agent"),
            g("role:30", "t_role"),
            g("channel:7", "t_channel"),
            g("user:42", "t_user"),
        ];
        // Remove scopes from the most specific down; each time the next one decides.
        for (i, kind) in PRECEDENCE.iter().enumerate() {
            let grants: Vec<Grant> = all[..all.len() - i].to_vec();
            let a = resolve_allowlist(&grants, &call(&format!("t_{kind}"), &roles));
            assert!(a.allowed, "{kind}");
            assert_eq!(a.deciding_scope, Some(*kind));
        }
    }

    #[test]
    fn entries_for_other_contexts_do_not_apply() {
        let grants = vec![
            g("user:99", "*"),
            g("channel:8", "*"),
            g("role:31", "*"),
            g("agent:other", "*"),
        ];
        let roles = vec!["30".to_string()];
        assert_eq!(
            resolve_allowlist(&grants, &call("shell", &roles)).rule,
            "no_grant"
        );
    }

    #[test]
    fn roles_union_within_role_scope() {
        let roles = vec!["30".to_string(), "31".to_string()];
        let grants = vec![g("role:30", "a"), g("role:31", "b")];
        assert!(resolve_allowlist(&grants, &call("a", &roles)).allowed);
        assert!(resolve_allowlist(&grants, &call("b", &roles)).allowed);
        assert!(!resolve_allowlist(&grants, &call("c", &roles)).allowed);
    }

    #[test]
    fn deny_entry_beats_allow_in_same_scope() {
        let grants = vec![g("channel:7", "*"), deny_g("channel:7", "shell")];
        let a = resolve_allowlist(&grants, &call("shell", &[]));
        assert!(!a.allowed);
        assert_eq!(a.rule, "tool_denied");
        assert!(resolve_allowlist(&grants, &call("fs.read", &[])).allowed);
    }

    #[test]
    fn agent_acting_for_itself_is_governed_by_its_scope() {
        let grants = vec![g("agent:bot", "fs.*"), g("user:42", "*")];
        let c = Call {
            user: None,
            channel: None,
            ..call("fs.read", &[])
        };
        let mut f = facts(Risk::Low);
        f.user_paired = false; // irrelevant without a user
        assert_eq!(eval(&grants, &c, &f).rule(), "risk_low");
        let c = Call {
            user: None,
            channel: None,
            ..call("shell", &[])
        };
        assert_eq!(eval(&grants, &c, &f).rule(), "tool_not_allowed");
    }

    #[test]
    fn unknown_agent_and_unpaired_user_deny_first() {
        let grants = vec![g("global", "*")];
        let mut f = facts(Risk::Low);
        f.agent_known = false;
        assert_eq!(eval(&grants, &call("x", &[]), &f).rule(), "unknown_agent");
        let mut f = facts(Risk::Low);
        f.user_paired = false;
        assert_eq!(eval(&grants, &call("x", &[]), &f).rule(), "user_not_paired");
    }

    #[test]
    fn risk_levels_map_to_actions() {
        let grants = vec![g("global", "*")];
        let c = call("x", &[]);
        assert!(matches!(
            eval(&grants, &c, &facts(Risk::Low)),
            Verdict::Allow { log: false, .. }
        ));
        assert!(matches!(
            eval(&grants, &c, &facts(Risk::Medium)),
            Verdict::Allow { log: true, .. }
        ));
        assert!(matches!(
            eval(&grants, &c, &facts(Risk::High)),
            Verdict::Ask {
                admin_only: false,
                approvals: 1,
                ..
            }
        ));
        assert!(matches!(
            eval(&grants, &c, &facts(Risk::Critical)),
            Verdict::Ask {
                admin_only: true,
                approvals: 2,
                ..
            }
        ));
    }

    #[test]
    fn autonomy_modes() {
        let grants = vec![g("global", "*")];
        let mut s = settings();
        s.autonomy = Autonomy::Autonomous;
        s.channel_autonomy
            .insert("7".into(), Autonomy::ApprovalRequired);
        let mut st = PolicyState::default();
        // Channel 7 requires approval even for low risk.
        let v = evaluate(
            &s,
            &grants,
            &call("x", &[]),
            &facts(Risk::Low),
            &mut st,
            0,
            false,
        );
        assert_eq!(v.rule(), "approval_required");
        // Elsewhere autonomous: high runs, critical still asks an admin.
        let c = Call {
            channel: Some("8"),
            ..call("x", &[])
        };
        let v = evaluate(&s, &grants, &c, &facts(Risk::High), &mut st, 0, false);
        assert_eq!(v.rule(), "autonomous");
        let v = evaluate(&s, &grants, &c, &facts(Risk::Critical), &mut st, 0, false);
        assert_eq!(v.rule(), "risk_critical");
    }

    #[test]
    fn rate_limits_per_agent_and_user() {
        let grants = vec![g("global", "*")];
        let mut s = settings();
        s.agent_rate = Some("2/min".parse().unwrap());
        let mut st = PolicyState::default();
        let c = call("x", &[]);
        let f = facts(Risk::Low);
        assert_eq!(
            evaluate(&s, &grants, &c, &f, &mut st, 0, false).rule(),
            "risk_low"
        );
        assert_eq!(
            evaluate(&s, &grants, &c, &f, &mut st, 0, false).rule(),
            "risk_low"
        );
        assert_eq!(
            evaluate(&s, &grants, &c, &f, &mut st, 0, false).rule(),
            "rate_limit_agent"
        );
        let mut s = settings();
        s.user_rate = Some("1/min".parse().unwrap());
        let mut st = PolicyState::default();
        assert_eq!(
            evaluate(&s, &grants, &c, &f, &mut st, 0, false).rule(),
            "risk_low"
        );
        assert_eq!(
            evaluate(&s, &grants, &c, &f, &mut st, 0, false).rule(),
            "rate_limit_user"
        );
        // Another user is not affected.
        let c2 = Call {
            user: Some("43"),
            ..call("x", &[])
        };
        assert_eq!(
            evaluate(&s, &grants, &c2, &f, &mut st, 0, false).rule(),
            "risk_low"
        );
    }

    #[test]
    fn dry_run_uses_no_tokens() {
        let grants = vec![g("global", "*")];
        let mut s = settings();
        s.agent_rate = Some("1/min".parse().unwrap());
        s.task_max_steps = Some(1);
        let mut st = PolicyState::default();
        let c = Call {
            task: Some("t"),
            ..call("x", &[])
        };
        let f = facts(Risk::Low);
        for _ in 0..3 {
            assert_eq!(
                evaluate(&s, &grants, &c, &f, &mut st, 0, true).rule(),
                "risk_low"
            );
        }
        assert_eq!(
            evaluate(&s, &grants, &c, &f, &mut st, 0, false).rule(),
            "risk_low"
        );
    }

    #[test]
    fn task_steps_and_budget() {
        let grants = vec![g("global", "*")];
        let mut s = settings();
        s.task_max_steps = Some(2);
        s.task_max_cost = Some(1.0);
        let mut st = PolicyState::default();
        let f = facts(Risk::Low);
        let c = |task, cost| Call {
            task: Some(task),
            cost,
            ..call("x", &[])
        };
        assert_eq!(
            evaluate(&s, &grants, &c("t", 0.6), &f, &mut st, 0, false).rule(),
            "risk_low"
        );
        assert_eq!(
            evaluate(&s, &grants, &c("t", 0.6), &f, &mut st, 0, false).rule(),
            "task_budget"
        );
        assert_eq!(
            evaluate(&s, &grants, &c("t", 0.1), &f, &mut st, 0, false).rule(),
            "risk_low"
        );
        assert_eq!(
            evaluate(&s, &grants, &c("t", 0.0), &f, &mut st, 0, false).rule(),
            "task_step_limit"
        );
        // Another task has its own budget.
        assert_eq!(
            evaluate(&s, &grants, &c("u", 0.0), &f, &mut st, 0, false).rule(),
            "risk_low"
        );
        assert_eq!(
            evaluate(&s, &grants, &c("u", f64::NAN), &f, &mut st, 0, false).rule(),
            "invalid_cost"
        );
    }

    #[test]
    fn unattended_denies_what_would_ask() {
        let grants = vec![g("global", "*")];
        let mut f = facts(Risk::High);
        f.unattended = true;
        assert_eq!(eval(&grants, &call("x", &[]), &f).rule(), "unattended");
        f.risk = Risk::Low;
        assert_eq!(eval(&grants, &call("x", &[]), &f).rule(), "risk_low");
    }

    #[test]
    fn flags_raise_force_and_deny() {
        let grants = vec![g("global", "*")];
        let mut f = facts(Risk::Medium);
        f.raise_risk = Some("prompt_injection".into());
        assert!(matches!(
            eval(&grants, &call("x", &[]), &f),
            Verdict::Ask {
                risk: Risk::High,
                ..
            }
        ));
        let mut f = facts(Risk::Low);
        f.force_ask = Some(("trifecta".into(), "lethal trifecta".into()));
        assert_eq!(eval(&grants, &call("x", &[]), &f).rule(), "trifecta");
        let mut f = facts(Risk::Low);
        f.force_deny = Some(("flag_prompt_injection".into(), "d".into()));
        assert_eq!(
            eval(&grants, &call("x", &[]), &f).rule(),
            "flag_prompt_injection"
        );
        // The allowlist still comes first.
        assert_eq!(eval(&[], &call("x", &[]), &f).rule(), "no_grant");
    }

    fn pause(agent: &str, reason: Option<&str>) -> Pause {
        Pause {
            agent: agent.into(),
            paused_by: "uid:1000".into(),
            since_ms: 5,
            reason: reason.map(Into::into),
        }
    }

    #[test]
    fn a_paused_agent_is_denied_before_anything_else_is_spent() {
        let grants = vec![g("global", "*")];
        let mut f = facts(Risk::Low);
        f.paused = Some(pause("bot", Some("runaway loop")));
        let mut state = PolicyState::default();
        let s = PolicySettings {
            agent_rate: Some("1/m".parse().unwrap()),
            ..settings()
        };
        let v = evaluate(&s, &grants, &call("x", &[]), &f, &mut state, 0, false);
        assert_eq!(
            v,
            Verdict::Deny {
                rule: AGENT_PAUSED.into(),
                detail: "agent `bot` is paused by uid:1000: runaway loop".into()
            }
        );
        // No rate-limit token was used by the denied call.
        f.paused = None;
        let v = evaluate(&s, &grants, &call("x", &[]), &f, &mut state, 0, false);
        assert_eq!(v.rule(), "risk_low");
    }

    #[test]
    fn the_global_pause_wins_over_an_agents_own() {
        let all = pause(ALL_AGENTS, None);
        let own = pause("bot", Some("mine"));
        let pauses = vec![own.clone(), all.clone()];
        assert_eq!(pause_for(&pauses, "bot"), Some(&all));
        assert_eq!(pause_for(&pauses, "other"), Some(&all));
        let pauses = vec![own.clone()];
        assert_eq!(pause_for(&pauses, "bot"), Some(&own));
        assert_eq!(pause_for(&pauses, "other"), None);
        assert_eq!(
            all.detail(),
            "every agent is paused (pause-all) by uid:1000"
        );
    }

    #[test]
    fn confidence_must_be_a_number_from_0_to_1() {
        for ok in [0.0, 0.5, 1.0] {
            assert!(validate_confidence(ok).is_ok(), "{ok}");
        }
        for bad in [-0.01, 1.5, f64::NAN, f64::INFINITY] {
            assert!(validate_confidence(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn low_confidence_asks_a_human_where_the_policy_would_allow() {
        let grants = vec![g("global", "*")];
        let mut f = facts(Risk::Low);
        f.min_confidence = Some(0.7);
        f.confidence = Some(0.42);
        let v = eval(&grants, &call("x", &[]), &f);
        match &v {
            Verdict::Ask { rule, detail, .. } => {
                assert_eq!(rule, LOW_CONFIDENCE);
                assert!(
                    detail.starts_with("the agent's confidence 0.42 is below 0.7"),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
        // At or above the threshold, or without a confidence: allowed.
        for c in [Some(0.7), Some(0.9), None] {
            f.confidence = c;
            assert_eq!(
                eval(&grants, &call("x", &[]), &f).rule(),
                "risk_low",
                "{c:?}"
            );
        }
        // No threshold: off.
        f.min_confidence = None;
        f.confidence = Some(0.1);
        assert_eq!(eval(&grants, &call("x", &[]), &f).rule(), "risk_low");
    }

    #[test]
    fn low_confidence_never_turns_a_deny_into_an_ask() {
        let mut f = facts(Risk::Low);
        f.min_confidence = Some(0.7);
        f.confidence = Some(0.1);
        // Not granted: still denied.
        assert_eq!(eval(&[], &call("x", &[]), &f).rule(), "no_grant");
        // Unattended: the human it would ask is not there, so denied.
        f.unattended = true;
        let grants = vec![g("global", "*")];
        assert_eq!(eval(&grants, &call("x", &[]), &f).rule(), "unattended");
        // Already asking (high risk): the policy's own rule stays.
        let mut f = facts(Risk::High);
        f.min_confidence = Some(0.7);
        f.confidence = Some(0.1);
        assert_eq!(eval(&grants, &call("x", &[]), &f).rule(), "risk_high");
    }
}
