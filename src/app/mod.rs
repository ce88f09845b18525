//! The use-cases: submit, wait, vote, cancel, expire, grant, pair, audit.
//!
//! [`Gateway`] ties the pure core to a [`Store`]. It knows nothing of sockets
//! or Discord: every surface (socket, CLI, bot) calls these methods, so every
//! surface gets the same rules, the same audit and the same answers.

pub mod connection;
mod content;
pub mod health;
pub mod metrics;
pub mod retention;
pub mod scheduler;
mod waiters;

use crate::config::Config;
use crate::domain::audit::{self, events, AuditEntry};
use crate::domain::flags::FlagScanner;
use crate::domain::pairing;
use crate::domain::policy::{
    self, AllowlistAnswer, Call, Effect, Facts, Grant, PolicySettings, PolicyState, Scope,
    ToolPattern, Verdict,
};
use crate::domain::redact::{self, Redactor};
use crate::domain::request::{ApprovalRequest, DecidedBy, RequestId, State, TransitionError, Vote};
use crate::domain::trifecta;
use crate::domain::Risk;
use crate::store::{PairedUser, PairingRefused, PendingPairing, Store, StoreError, StoredGrant};
use content::Content;
pub use content::VerifyAnswer;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;
pub use waiters::Waiters;

/// Wall-clock now in epoch milliseconds. The only clock read outside tests.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What went wrong, with a stable code for the socket and a message safe to show.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    InvalidParams(String),
    #[error("no request with id {0}")]
    NotFound(String),
    #[error("already decided: {0}")]
    AlreadyDecided(State),
    #[error("{0} has already voted on this request")]
    AlreadyVoted(String),
    #[error("this operation is for admins only")]
    NotAdmin,
    #[error("{0} made this request, so it may not vote on it ([admin] allow_self_approval)")]
    SelfApproval(String),
    #[error("this is a critical request: only an admin may decide it")]
    AdminOnly,
    /// The agent could not authenticate; the text names the cause and the fix
    /// (unknown name, wrong uid, missing or wrong token) and never a token.
    #[error("{0}")]
    AgentRefused(String),
    #[error("request {0} belongs to another agent")]
    NotYourRequest(String),
    #[error("agent `{agent}` already has {max} pending requests; wait for some to be decided")]
    TooManyPending { agent: String, max: usize },
    #[error("{0}")]
    Pairing(String),
    /// An idempotency key reused for a different call (tool, arguments,
    /// user, channel or task differ, or the key predates fingerprints).
    #[error("idempotency key already used for a different call (request {request_id}, tool `{tool}`); nothing was queued: use a new key for a new call")]
    IdempotencyConflict { request_id: String, tool: String },
    #[error("internal error; the call was not carried out (see the server log)")]
    Store(#[from] StoreError),
}

impl AppError {
    /// A stable snake_case code for clients to match on.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::InvalidParams(_) => "invalid_params",
            AppError::NotFound(_) => "not_found",
            AppError::AlreadyDecided(_) => "already_decided",
            AppError::AlreadyVoted(_) => "already_voted",
            AppError::NotAdmin => "not_admin",
            AppError::SelfApproval(_) => "self_approval",
            AppError::AdminOnly => "admin_only",
            AppError::AgentRefused(..) => "agent_refused",
            AppError::NotYourRequest(_) => "not_your_request",
            AppError::TooManyPending { .. } => "too_many_pending",
            AppError::Pairing(_) => "pairing_refused",
            AppError::IdempotencyConflict { .. } => "idempotency_conflict",
            AppError::Store(_) => "internal",
        }
    }
}

fn bad(msg: impl Into<String>) -> AppError {
    AppError::InvalidParams(msg.into())
}

/// A tool call as an agent submits it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Submission {
    pub tool: String,
    pub args: serde_json::Value,
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    pub justification: String,
    pub task_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// Cost of this call, counted against the task budget.
    pub cost: f64,
    /// Ask for a shorter (or longer, up to the maximum) wait than the default.
    pub timeout_secs: Option<u64>,
    /// Nobody is watching: deny at once instead of asking a human.
    pub unattended: bool,
    /// The Unix uid the call came from (set by the socket from SO_PEERCRED,
    /// never from what the agent sends): that uid may not vote on it.
    #[serde(skip)]
    pub requester_uid: Option<u32>,
}

/// A change that surfaces (the Discord bot) follow.
#[derive(Debug, Clone)]
pub enum RequestEvent {
    /// A request now waits for a human.
    Queued(ApprovalRequest),
    /// A request reached its terminal state (any source).
    Resolved(ApprovalRequest),
}

/// What `check` answers: what the policy would do, and why.
#[derive(Debug, Clone, Serialize)]
pub struct CheckAnswer {
    pub verdict: Verdict,
    pub risk: Risk,
    pub allowlist: AllowlistAnswer,
    /// Content flags raised on the call.
    pub flags: Vec<serde_json::Value>,
}

/// The live policy data: config entries merged with the store's.
#[derive(Default)]
struct PolicyView {
    grants: Vec<Grant>,
    risks: HashMap<String, Risk>,
    /// Paired user id → roles.
    users: HashMap<String, Vec<String>>,
}

/// A reserved pending slot, given back unless the request was stored.
struct PendingSlot<'a> {
    gw: &'a Gateway,
    agent: String,
    kept: bool,
}

impl PendingSlot<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.gw.release_pending(&self.agent);
        }
    }
}

/// Limits on submitted fields.
const MAX_ID_LEN: usize = 100;
const MAX_KEY_LEN: usize = 200;

pub struct Gateway {
    cfg: Arc<Config>,
    /// The config as last (re)loaded: read only for what SIGHUP reloads
    /// (config grants, tool risks, agents' tokens and uids); everything
    /// else comes from `cfg`, the config `serve` started with.
    live: RwLock<Arc<Config>>,
    store: Arc<dyn Store>,
    redactor: Redactor,
    scanner: FlagScanner,
    settings: PolicySettings,
    view: RwLock<PolicyView>,
    limits: Mutex<PolicyState>,
    waiters: Waiters,
    /// Pending requests per agent, for `max_pending`.
    pending_by_agent: Mutex<HashMap<String, usize>>,
    deadlines: mpsc::Sender<(i64, RequestId)>,
    events: broadcast::Sender<RequestEvent>,
    server_uid: u32,
}

impl Gateway {
    /// Builds the gateway and loads the policy view. The receiver is for
    /// [`scheduler::run`].
    pub async fn new(
        cfg: Arc<Config>,
        store: Arc<dyn Store>,
        server_uid: u32,
    ) -> Result<(Arc<Gateway>, mpsc::Receiver<(i64, RequestId)>), AppError> {
        let (deadlines, rx) = mpsc::channel(65_536);
        let (events, _) = broadcast::channel(4096);
        let redactor = cfg.redactor().map_err(|e| bad(e.to_string()))?;
        let scanner = FlagScanner::new(
            cfg.content.allowed_domains.clone(),
            cfg.tools.iter().map(|t| t.name.clone()).collect(),
        );
        let gw = Arc::new(Gateway {
            settings: cfg.policy_settings(),
            redactor,
            scanner,
            live: RwLock::new(cfg.clone()),
            cfg,
            store,
            view: RwLock::default(),
            limits: Mutex::default(),
            waiters: Waiters::default(),
            pending_by_agent: Mutex::default(),
            deadlines,
            events,
            server_uid,
        });
        // Opting out of "a flagged call asks a human" is allowed, never silent.
        for exemption in gw.cfg.flag_ask_exemptions() {
            tracing::warn!("flagged calls may run without a human: {exemption}");
        }
        gw.refresh_policy().await?;
        *gw.pending_by_agent
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = gw
            .store
            .pending_counts()
            .await?
            .into_iter()
            .map(|(a, n)| (a, n as usize))
            .collect();
        Ok((gw, rx))
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RequestEvent> {
        self.events.subscribe()
    }

    /// The config as last reloaded (see [`Gateway::reload_config`]).
    fn live(&self) -> Arc<Config> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes the reloadable parts of a newly loaded (and validated) config:
    /// its grants, tool risks, and agents' tokens and uids. Returns their
    /// names, for the log. Everything else keeps its start-up value.
    pub async fn reload_config(&self, new: Config) -> Result<&'static str, AppError> {
        // Checked before anything is swapped: a bad file changes nothing.
        new.config_grants().map_err(|e| bad(e.to_string()))?;
        // The new agents against the admin settings in force (those are
        // not reloaded): no reload makes an agent an admin or the server.
        let mut probe = (*self.cfg).clone();
        probe.agents = new.agents.clone();
        probe
            .check_uids(self.server_uid)
            .map_err(|e| bad(e.to_string()))?;
        let old = std::mem::replace(
            &mut *self.live.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(new),
        );
        if let Err(e) = self.refresh_policy().await {
            *self.live.write().unwrap_or_else(|e| e.into_inner()) = old;
            return Err(e);
        }
        Ok("config grants, tool risks, agent tokens and uids (agents added since start need a restart)")
    }

    /// Reloads grants, tool risks and paired users from config and store.
    pub async fn refresh_policy(&self) -> Result<(), AppError> {
        let live = self.live();
        let mut grants = live.config_grants().map_err(|e| bad(e.to_string()))?;
        grants.extend(self.store.grants().await?.into_iter().map(|g| g.grant));
        let mut risks: HashMap<String, Risk> = live
            .tools
            .iter()
            .map(|t| (t.name.clone(), t.risk))
            .collect();
        risks.extend(self.store.tool_risks().await?);
        let mut users: HashMap<String, Vec<String>> = self
            .cfg
            .users
            .iter()
            .map(|u| (u.id.clone(), u.roles.clone()))
            .collect();
        for u in self.store.paired_users().await? {
            users.entry(u.user_id).or_default().extend(u.roles);
        }
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = PolicyView {
            grants,
            risks,
            users,
        };
        Ok(())
    }

    /// Whether `uid` may run admin operations.
    pub fn is_admin_uid(&self, uid: u32) -> bool {
        if self.cfg.admin.uids.is_empty() {
            uid == self.server_uid
        } else {
            self.cfg.admin.uids.contains(&uid)
        }
    }

    /// Whether some agent or admin may connect from `uid` at all.
    pub fn uid_may_connect(&self, uid: u32) -> bool {
        self.is_admin_uid(uid) || self.cfg.agents.iter().any(|a| self.agent_uid_ok(a, uid))
    }

    fn agent_uid_ok(&self, a: &crate::config::AgentConfig, uid: u32) -> bool {
        if a.uids.is_empty() {
            uid == self.server_uid
        } else {
            a.uids.contains(&uid)
        }
    }

    /// Checks that `name` is a configured agent allowed from `uid`, with the
    /// right token if it has one.
    pub fn authenticate_agent(
        &self,
        name: &str,
        token: Option<&str>,
        uid: u32,
    ) -> Result<(), AppError> {
        let shown: String = name.chars().take(64).collect();
        let shown = shown.escape_debug().to_string();
        let live = self.live();
        let Some(a) = live.agent(name) else {
            return Err(AppError::AgentRefused(format!(
                "agent `{shown}` is not configured: add an [[agents]] entry with name = \"{shown}\" \
                 to the server's config, or connect with --agent NAME of a configured agent"
            )));
        };
        // An agent added by a reload has none of its other settings
        // (max_pending, unattended…) in force until a restart: refused.
        if self.cfg.agent(name).is_none() {
            return Err(AppError::AgentRefused(format!(
                "agent `{shown}` was added to the config after keyturn started: restart \
                 keyturn serve to admit it"
            )));
        }
        if !self.agent_uid_ok(a, uid) {
            return Err(AppError::AgentRefused(format!(
                "agent `{shown}` is not allowed to connect from uid {uid}: run the agent as a \
                 uid in its [[agents]] uids (empty: only the uid running the server), or add \
                 {uid} there"
            )));
        }
        if !a.token.0.is_empty() {
            use subtle::ConstantTimeEq;
            let Some(given) = token else {
                return Err(AppError::AgentRefused(format!(
                    "agent `{shown}` has a token and none was sent: pass --token or set \
                     KEYTURN_AGENT_TOKEN to the agent's token"
                )));
            };
            if !bool::from(given.as_bytes().ct_eq(a.token.0.as_bytes())) {
                return Err(AppError::AgentRefused(format!(
                    "the token sent for agent `{shown}` is wrong: pass the token configured \
                     for it (--token or KEYTURN_AGENT_TOKEN)"
                )));
            }
        }
        Ok(())
    }

    fn validate(&self, s: &Submission) -> Result<(), AppError> {
        policy::validate_tool_name(&s.tool).map_err(bad)?;
        if !s.args.is_object() {
            return Err(bad("`args` must be a JSON object"));
        }
        let size = s.args.to_string().len();
        if size > self.cfg.server.max_args_bytes {
            return Err(bad(format!(
                "`args` is {size} bytes; the limit is {} (server.max_args_bytes)",
                self.cfg.server.max_args_bytes
            )));
        }
        if s.justification.len() > self.cfg.server.max_justification_bytes {
            return Err(bad(format!(
                "`justification` is {} bytes; the limit is {}",
                s.justification.len(),
                self.cfg.server.max_justification_bytes
            )));
        }
        for (field, v, kind) in [
            ("user_id", &s.user_id, "user"),
            ("channel_id", &s.channel_id, "channel"),
        ] {
            if let Some(v) = v {
                if v.len() > MAX_ID_LEN || Scope::new(kind, v).is_err() {
                    return Err(bad(format!(
                        "`{field}` must be 1-{MAX_ID_LEN} characters of letters, digits, `_-.@`"
                    )));
                }
            }
        }
        for (field, v) in [
            ("task_id", &s.task_id),
            ("idempotency_key", &s.idempotency_key),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.len() > MAX_KEY_LEN || v.chars().any(char::is_control) {
                    return Err(bad(format!(
                        "`{field}` must be 1-{MAX_KEY_LEN} bytes without control characters"
                    )));
                }
            }
        }
        if !(s.cost.is_finite() && s.cost >= 0.0) {
            return Err(bad("`cost` must be a finite number >= 0"));
        }
        if s.timeout_secs == Some(0) {
            return Err(bad("`timeout_secs` must be at least 1"));
        }
        // Names and ids are logged, stored and shown as they are (they key
        // lookups, so they cannot be masked): one that holds a secret is
        // refused, and the error names the format, never the value.
        for (field, v, strict) in [
            ("tool", Some(&s.tool), true),
            ("user_id", s.user_id.as_ref(), true),
            ("channel_id", s.channel_id.as_ref(), true),
            ("task_id", s.task_id.as_ref(), false),
            ("idempotency_key", s.idempotency_key.as_ref(), false),
        ] {
            if let Some(kind) = v.and_then(|v| self.secret_in_name(v, strict)) {
                return Err(bad(format!(
                    "`{field}` looks like it holds a secret ({kind}); names and ids are logged \
                     and shown as they are, so put secrets in `args`, where they are masked"
                )));
            }
        }
        Ok(())
    }

    /// The kind of secret in a name or id, if any. Random-looking ids
    /// (`high_entropy`) are refused only where `strict`: task ids and
    /// idempotency keys are often random by design.
    fn secret_in_name(&self, v: &str, strict: bool) -> Option<String> {
        let (_, findings) = self.redactor.redact_text(v);
        findings
            .into_iter()
            .find(|f| strict || f.kind != "high_entropy")
            .map(|f| f.kind)
    }

    /// A display name (operator or pairing user) as stored and shown: secrets
    /// masked first, then cut to 100 characters, so a cut never leaves half
    /// a secret unrecognised.
    fn display_name(&self, name: &str) -> String {
        self.redactor
            .redact_text(name)
            .0
            .chars()
            .take(100)
            .collect()
    }

    fn evaluate(
        &self,
        agent: &str,
        s: &Submission,
        content: &Content,
        now: i64,
        dry_run: bool,
    ) -> (Verdict, Risk, AllowlistAnswer) {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let no_roles = Vec::new();
        let roles = s
            .user_id
            .as_ref()
            .and_then(|u| view.users.get(u))
            .unwrap_or(&no_roles);
        let call = Call {
            agent,
            user: s.user_id.as_deref(),
            roles,
            channel: s.channel_id.as_deref(),
            tool: &s.tool,
            task: s.task_id.as_deref(),
            cost: s.cost,
        };
        let agent_cfg = self.cfg.agent(agent);
        let risk = view.risks.get(&s.tool).copied().unwrap_or(Risk::High);
        let facts = Facts {
            agent_known: agent_cfg.is_some(),
            user_paired: s
                .user_id
                .as_ref()
                .is_some_and(|u| view.users.contains_key(u)),
            unattended: s.unattended || agent_cfg.is_some_and(|a| a.unattended),
            risk,
            raise_risk: content.raise_risk.clone(),
            force_deny: content.force_deny.clone(),
            force_ask: content.force_ask.clone(),
        };
        let allowlist = policy::resolve_allowlist(&view.grants, &call);
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let verdict = policy::evaluate(
            &self.settings,
            &view.grants,
            &call,
            &facts,
            &mut limits,
            now,
            dry_run,
        );
        (verdict, risk, allowlist)
    }

    /// What the policy would do with `s`, without queueing or using a token.
    pub async fn check(&self, agent: &str, s: &Submission) -> Result<CheckAnswer, AppError> {
        self.validate(s)?;
        let content = self.content(agent, s, true).await?;
        let (verdict, risk, allowlist) = self.evaluate(agent, s, &content, now_ms(), true);
        Ok(CheckAnswer {
            verdict,
            risk,
            allowlist,
            flags: content.flags,
        })
    }

    /// Submits a call. Returns the request, already terminal when the policy
    /// decided it, or pending (persisted, with its deadline scheduled).
    pub async fn submit(&self, agent: &str, s: Submission) -> Result<ApprovalRequest, AppError> {
        self.validate(&s)?;
        if let Some(key) = &s.idempotency_key {
            // A fast answer for a retry, before the policy spends anything.
            // The writer checks again in the insert's transaction (races).
            if let Some(held) = self.store.find_by_idempotency_key(agent, key).await? {
                let args_hash = redact::args_hash(&s.args);
                let fp = crate::domain::request::submission_fingerprint(
                    agent,
                    &s.tool,
                    &args_hash,
                    s.user_id.as_deref(),
                    s.channel_id.as_deref(),
                    s.task_id.as_deref(),
                );
                if held.fingerprint.as_deref() == Some(fp.as_str()) {
                    return Ok(held.request);
                }
                self.store
                    .append_audit(vec![events::idempotency_conflict(
                        now_ms(),
                        &held.request,
                        &s.tool,
                        &args_hash,
                    )])
                    .await?;
                return Err(conflict(&held.request));
            }
        }
        let content = self.content(agent, &s, false).await?;
        let now = now_ms();
        let (verdict, tool_risk, _) = self.evaluate(agent, &s, &content, now, false);
        let Content {
            args,
            justification,
            flags,
            ..
        } = content;
        let mut req = ApprovalRequest {
            // Time-ordered (UUIDv7): new rows land at the right edge of the
            // id indexes, so a group commit touches a few pages instead of one
            // random page per request (measured: the WAL writes dominated).
            id: RequestId(Uuid::now_v7()),
            agent: agent.to_string(),
            args_hash: redact::args_hash(&s.args),
            args,
            tool: s.tool,
            user_id: s.user_id,
            channel_id: s.channel_id,
            justification,
            task_id: s.task_id,
            idempotency_key: s.idempotency_key,
            risk: match &verdict {
                Verdict::Allow { risk, .. } | Verdict::Ask { risk, .. } => *risk,
                Verdict::Deny { .. } => tool_risk,
            },
            approvals_required: 1,
            admin_only: false,
            rule: verdict.rule().to_string(),
            rule_detail: String::new(),
            flags,
            created_ms: now,
            deadline_ms: now,
            state: State::Pending,
            decided_by: None,
            decided_who: None,
            decided_reason: None,
            decided_ms: None,
            requester_uid: s.requester_uid,
        };
        let mut reservation = None;
        let tags = self.cfg.tool_tags(&req.tool);
        match &verdict {
            Verdict::Allow { detail, log, .. } => {
                req.rule_detail = detail.clone();
                req.state = State::Approved;
                if *log {
                    tracing::info!(request.id = %req.id, agent = %req.agent, tool = %req.tool, rule = %req.rule, "allowed and logged");
                }
            }
            Verdict::Deny { detail, .. } => {
                req.rule_detail = detail.clone();
                req.state = State::Denied;
            }
            Verdict::Ask {
                risk,
                admin_only,
                approvals,
                detail,
                ..
            } => {
                let max = self.cfg.agent(agent).map(|a| a.max_pending).unwrap_or(0);
                reservation = Some(self.reserve_pending(agent, max)?);
                let default = self.cfg.timeout_for(*risk);
                let wanted = s.timeout_secs.map(Duration::from_secs).unwrap_or(default);
                let wait = wanted.min(self.cfg.risk.max_timeout.0);
                req.deadline_ms = now + wait.as_millis() as i64;
                req.admin_only = *admin_only;
                req.approvals_required = *approvals;
                req.rule_detail = detail.clone();
            }
        }
        if req.state.is_terminal() {
            req.decided_by = Some(DecidedBy::Policy);
            req.decided_who = Some("policy".into());
            req.decided_reason = Some(req.rule_detail.clone());
            req.decided_ms = Some(now);
        }
        let audit = if req.state.is_terminal() {
            vec![events::decided_by_policy(&req)]
        } else {
            vec![events::submitted(&req), events::policy(&req)]
        };
        // A tagged call is guarded by the store, in the transaction that
        // stores it: an allowed call that completes the trifecta waits for
        // a human instead, so it needs a pending slot (or is denied).
        let guard = (!tags.is_empty() && req.state != State::Denied).then(|| {
            let unattended = s.unattended || self.cfg.agent(agent).is_some_and(|a| a.unattended);
            let mut deny = None;
            if req.state == State::Approved {
                if unattended {
                    deny = Some((
                        "unattended".to_string(),
                        "nobody is watching this agent, so it is denied at once".to_string(),
                    ));
                } else {
                    let max = self.cfg.agent(agent).map(|a| a.max_pending).unwrap_or(0);
                    match self.reserve_pending(agent, max) {
                        Ok(slot) => reservation = Some(slot),
                        Err(e) => deny = Some(("too_many_pending".to_string(), e.to_string())),
                    }
                }
            }
            let wanted = s
                .timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(self.cfg.timeout_for(req.risk));
            let wait = wanted.min(self.cfg.risk.max_timeout.0);
            trifecta::Guard {
                tags: tags.to_vec(),
                since_ms: now - self.cfg.content.trifecta_window.0.as_millis() as i64,
                window: self.trifecta_window_label(),
                escalation: trifecta::Escalation {
                    risk: req.risk,
                    deadline_ms: now + wait.as_millis() as i64,
                    approvals_required: if req.risk == Risk::Critical {
                        self.settings.approvals_critical.max(1)
                    } else {
                        self.settings.approvals_high.max(1)
                    },
                    admin_only: req.risk == Risk::Critical,
                    deny,
                },
            }
        });
        let req = match self.store.insert_guarded(req, audit, guard).await? {
            crate::store::Inserted::Existing(r) => return Ok(r),
            crate::store::Inserted::Conflict(r) => return Err(conflict(&r)),
            crate::store::Inserted::New(r) => r,
        };
        if req.state.is_terminal() {
            metrics::global().decided(&req);
        }
        // The slot now belongs to the stored request; `finished` frees it.
        if let Some(r) = reservation {
            if req.state == State::Pending {
                r.keep();
            }
        }
        if req.state == State::Pending {
            tracing::info!(request.id = %req.id, agent = %req.agent, tool = %req.tool, risk = %req.risk, "queued for approval");
            // Bounded channel: if the scheduler is far behind, the submit waits.
            if self
                .deadlines
                .send((req.deadline_ms, req.id))
                .await
                .is_err()
            {
                tracing::error!(request.id = %req.id, "deadline scheduler is gone");
            }
            let _ = self.events.send(RequestEvent::Queued(req.clone()));
        }
        Ok(req)
    }

    /// The request as stored.
    pub async fn status(&self, id: RequestId) -> Result<ApprovalRequest, AppError> {
        self.store
            .get_request(id)
            .await?
            .ok_or_else(|| AppError::NotFound(id.to_string()))
    }

    /// Checks that `agent` submitted `id` (admins may see every request).
    pub async fn status_for(
        &self,
        id: RequestId,
        agent: Option<&str>,
    ) -> Result<ApprovalRequest, AppError> {
        let r = self.status(id).await?;
        match agent {
            Some(a) if a != r.agent => Err(AppError::NotYourRequest(id.to_string())),
            _ => Ok(r),
        }
    }

    /// Blocks until `id` is terminal, or `max_wait` passes (then returns it pending).
    pub async fn wait(
        &self,
        id: RequestId,
        agent: Option<&str>,
        max_wait: Option<Duration>,
    ) -> Result<ApprovalRequest, AppError> {
        let woken = self.waiters.register(id);
        let r = self.status_for(id, agent).await?;
        if r.state.is_terminal() {
            return Ok(r);
        }
        // The scheduler times the request out at its deadline; the grace
        // covers a store that is briefly slow.
        let until_deadline = Duration::from_millis((r.deadline_ms - now_ms()).max(0) as u64)
            + Duration::from_secs(5);
        let limit = max_wait.map_or(until_deadline, |m| m.min(until_deadline));
        match tokio::time::timeout(limit, woken).await {
            Ok(Ok(done)) => Ok(done),
            _ => self.status(id).await,
        }
    }

    /// Records a person's vote. `is_admin` says whether the voter may decide
    /// critical requests. `voter` is a stable identity (`uid:N`,
    /// `discord:ID`); `name` is only shown beside it, cleaned so it cannot
    /// imitate one.
    ///
    /// The uid that made a request (and its agent) may not vote on it,
    /// unless `[admin] allow_self_approval` or `single_user_demo` is set:
    /// checked here so every surface gets the rule.
    pub async fn vote(
        &self,
        id: RequestId,
        voter: &str,
        name: Option<String>,
        approve: bool,
        reason: Option<String>,
        is_admin: bool,
    ) -> Result<crate::store::Voted, AppError> {
        let r = self.status(id).await?;
        if r.admin_only && !is_admin {
            return Err(AppError::AdminOnly);
        }
        let own = r.requester_uid.is_some_and(|u| voter == format!("uid:{u}"))
            || voter == format!("agent:{}", r.agent);
        let admin = &self.cfg.admin;
        if own && !(admin.allow_self_approval || admin.single_user_demo) {
            tracing::warn!(request.id = %id, voter = %voter, "vote by the requester refused");
            return Err(AppError::SelfApproval(voter.to_string()));
        }
        let name = name
            .map(|n| crate::domain::request::clean_display_name(&n))
            .filter(|n| !n.is_empty());
        let reason = reason
            .filter(|r| !r.trim().is_empty())
            .map(|r| self.redactor.redact_text(&r).0);
        let vote = Vote {
            voter: voter.to_string(),
            name: name.map(|n| self.display_name(&n)),
            approve,
            reason,
            at_ms: now_ms(),
        };
        match self.store.vote(id, vote).await? {
            Ok(v) => {
                if v.request.state.is_terminal() {
                    tracing::info!(request.id = %id, state = %v.request.state, "decided");
                    self.finished(&v.request);
                }
                Ok(v)
            }
            Err(TransitionError::PastDeadline) => {
                // The decision lost to the timeout; make the timeout happen now.
                let _ = self.expire(id).await;
                Err(AppError::AlreadyDecided(State::TimedOut))
            }
            Err(e) => Err(transition(id, e)),
        }
    }

    /// Cancels a pending request.
    pub async fn cancel(
        &self,
        id: RequestId,
        who: &str,
        agent: Option<&str>,
        reason: Option<String>,
    ) -> Result<ApprovalRequest, AppError> {
        self.status_for(id, agent).await?;
        let reason = reason.map(|r| self.redactor.redact_text(&r).0);
        match self
            .store
            .cancel(id, who.to_string(), reason, now_ms())
            .await?
        {
            Ok(r) => {
                self.finished(&r);
                Ok(r)
            }
            Err(e) => Err(transition(id, e)),
        }
    }

    /// Times out `id` if its deadline has passed (called by the scheduler).
    pub async fn expire(&self, id: RequestId) -> Result<(), AppError> {
        match self.store.time_out(id, now_ms()).await? {
            Ok(r) => {
                tracing::info!(request.id = %id, "timed out");
                self.finished(&r);
            }
            Err(TransitionError::NotDue) => {
                // Woken early (clock change): schedule again.
                if let Ok(r) = self.status(id).await {
                    let _ = self.deadlines.send((r.deadline_ms, id)).await;
                }
            }
            Err(_) => {}
        }
        Ok(())
    }

    fn finished(&self, r: &ApprovalRequest) {
        metrics::global().decided(r);
        self.release_pending(&r.agent);
        self.waiters.wake(r);
        let _ = self.events.send(RequestEvent::Resolved(r.clone()));
    }

    /// Takes one of `agent`'s pending slots, or refuses when all are taken.
    /// Counted in memory (loaded from the store at start), so the check
    /// costs nothing with 100,000 pending requests.
    fn reserve_pending(&self, agent: &str, max: usize) -> Result<PendingSlot<'_>, AppError> {
        let mut counts = self
            .pending_by_agent
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(agent.to_string()).or_default();
        if *n >= max {
            return Err(AppError::TooManyPending {
                agent: agent.to_string(),
                max,
            });
        }
        *n += 1;
        Ok(PendingSlot {
            gw: self,
            agent: agent.to_string(),
            kept: false,
        })
    }

    /// Pending requests per agent, as counted in memory.
    pub fn pending_counts(&self) -> HashMap<String, usize> {
        self.pending_by_agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(a, n)| (a.clone(), *n))
            .collect()
    }

    fn release_pending(&self, agent: &str) {
        let mut counts = self
            .pending_by_agent
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(agent) {
            *n = n.saturating_sub(1);
        }
    }

    pub async fn pending(&self, limit: u32) -> Result<Vec<ApprovalRequest>, AppError> {
        Ok(self.store.pending(limit).await?)
    }

    // ---- grants and risks ------------------------------------------------

    pub async fn grant(
        &self,
        scope: &str,
        tool: &str,
        effect: Effect,
        by: &str,
    ) -> Result<bool, AppError> {
        let scope: Scope = scope.parse().map_err(bad)?;
        let tool: ToolPattern = tool.parse().map_err(bad)?;
        let g = Grant {
            scope,
            tool,
            effect,
            source: "store".into(),
        };
        let added = self.store.add_grant(g, by.to_string(), now_ms()).await?;
        self.refresh_policy().await?;
        Ok(added)
    }

    pub async fn revoke(
        &self,
        scope: &str,
        tool: &str,
        effect: Effect,
        by: &str,
    ) -> Result<bool, AppError> {
        let scope: Scope = scope.parse().map_err(bad)?;
        let tool: ToolPattern = tool.parse().map_err(bad)?;
        if self
            .live()
            .config_grants()
            .map_err(|e| bad(e.to_string()))?
            .iter()
            .any(|g| g.scope == scope && g.tool == tool && g.effect == effect)
        {
            return Err(bad(format!(
                "`{tool}` in {scope} is granted by the config file; remove it there"
            )));
        }
        let removed = self
            .store
            .remove_grant(scope, tool, effect, by.to_string(), now_ms())
            .await?;
        self.refresh_policy().await?;
        Ok(removed)
    }

    /// Every grant, config first, optionally only one scope.
    pub async fn grants(&self, scope: Option<&str>) -> Result<Vec<StoredGrant>, AppError> {
        let scope: Option<Scope> = scope.map(str::parse).transpose().map_err(bad)?;
        let mut all: Vec<StoredGrant> = self
            .live()
            .config_grants()
            .map_err(|e| bad(e.to_string()))?
            .into_iter()
            .map(|grant| StoredGrant {
                grant,
                created_by: "config".into(),
                created_ms: 0,
            })
            .collect();
        all.extend(self.store.grants().await?);
        Ok(all
            .into_iter()
            .filter(|g| scope.as_ref().is_none_or(|s| &g.grant.scope == s))
            .collect())
    }

    /// Which scope decides for a context, and what it says about `tool`.
    pub fn effective(
        &self,
        agent: &str,
        user: Option<&str>,
        channel: Option<&str>,
        roles: Option<Vec<String>>,
        tool: &str,
    ) -> Result<AllowlistAnswer, AppError> {
        if tool != "*" {
            policy::validate_tool_name(tool).map_err(bad)?;
        }
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let roles = roles.unwrap_or_else(|| {
            user.and_then(|u| view.users.get(u))
                .cloned()
                .unwrap_or_default()
        });
        let call = Call {
            agent,
            user,
            roles: &roles,
            channel,
            tool,
            task: None,
            cost: 0.0,
        };
        Ok(policy::resolve_allowlist(&view.grants, &call))
    }

    pub async fn set_risk(&self, tool: &str, risk: Option<Risk>, by: &str) -> Result<(), AppError> {
        policy::validate_tool_name(tool).map_err(bad)?;
        self.store
            .set_tool_risk(tool.to_string(), risk, by.to_string(), now_ms())
            .await?;
        self.refresh_policy().await
    }

    /// Every tool with a known risk (config, then store overrides).
    pub fn tool_risks(&self) -> Vec<(String, Risk)> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, Risk)> = view.risks.iter().map(|(k, r)| (k.clone(), *r)).collect();
        v.sort();
        v
    }

    // ---- pairing ---------------------------------------------------------

    /// Issues a pairing code for an unknown user (shown to them once).
    pub async fn request_pairing(
        &self,
        user_id: &str,
        display_name: Option<String>,
    ) -> Result<(String, i64), AppError> {
        Scope::new("user", user_id).map_err(bad)?;
        if self
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .users
            .contains_key(user_id)
        {
            return Err(AppError::Pairing(format!(
                "user {user_id} is already paired"
            )));
        }
        let code = loop {
            let mut bytes = [0u8; 64];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            if let Some(c) = pairing::code_from_random(&bytes) {
                break c;
            }
        };
        let now = now_ms();
        let expires = now + self.cfg.pairing.code_ttl.0.as_millis() as i64;
        let display_name = display_name.map(|n| self.display_name(&n));
        match self
            .store
            .create_pairing_code(
                user_id.to_string(),
                display_name,
                pairing::hash_code(&code),
                now,
                expires,
                self.cfg.pairing.max_live_codes,
            )
            .await?
        {
            Ok(()) => Ok((code, expires)),
            Err(e @ (PairingRefused::AlreadyPaired(_) | PairingRefused::TooManyCodes(_))) => {
                Err(AppError::Pairing(e.to_string()))
            }
        }
    }

    /// Approves a typed code; returns the user now paired.
    pub async fn approve_pairing(&self, code: &str, by: &str) -> Result<PairedUser, AppError> {
        let code = pairing::normalize(code);
        if code.len() != pairing::CODE_LEN {
            return Err(bad(format!(
                "a pairing code has {} characters",
                pairing::CODE_LEN
            )));
        }
        let user = self
            .store
            .redeem_pairing_code(code, by.to_string(), now_ms())
            .await?
            .ok_or_else(|| {
                AppError::Pairing("no live pairing code matches (wrong, used or expired)".into())
            })?;
        self.refresh_policy().await?;
        Ok(user)
    }

    /// Pairs a user directly, with optional roles.
    pub async fn pair_user(
        &self,
        user_id: &str,
        roles: Vec<String>,
        by: &str,
    ) -> Result<bool, AppError> {
        Scope::new("user", user_id).map_err(bad)?;
        for r in &roles {
            Scope::new("role", r).map_err(bad)?;
        }
        let added = self
            .store
            .pair_user(PairedUser {
                user_id: user_id.to_string(),
                roles,
                display_name: None,
                paired_by: by.to_string(),
                paired_ms: now_ms(),
            })
            .await?;
        self.refresh_policy().await?;
        Ok(added)
    }

    pub async fn revoke_pairing(&self, user_id: &str, by: &str) -> Result<bool, AppError> {
        if self.cfg.users.iter().any(|u| u.id == user_id) {
            return Err(bad(format!(
                "user {user_id} is paired by the config file; remove it there"
            )));
        }
        let removed = self
            .store
            .unpair_user(user_id.to_string(), by.to_string(), now_ms())
            .await?;
        self.refresh_policy().await?;
        Ok(removed)
    }

    pub async fn pairings(&self) -> Result<(Vec<PairedUser>, Vec<PendingPairing>), AppError> {
        let mut users: Vec<PairedUser> = self
            .cfg
            .users
            .iter()
            .map(|u| PairedUser {
                user_id: u.id.clone(),
                roles: u.roles.clone(),
                display_name: None,
                paired_by: "config".into(),
                paired_ms: 0,
            })
            .collect();
        users.extend(self.store.paired_users().await?);
        Ok((users, self.store.pairing_codes(now_ms()).await?))
    }

    // ---- audit -----------------------------------------------------------

    pub async fn audit_tail(&self, n: u32) -> Result<Vec<AuditEntry>, AppError> {
        Ok(self.store.audit_tail(n).await?)
    }

    pub async fn audit_after(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>, AppError> {
        Ok(self.store.audit_after(after, limit).await?)
    }

    /// Walks the whole chain and checks every request row against it, from
    /// one snapshot; `Err` names the first break. `Ok` is the number of
    /// entries verified.
    pub async fn audit_verify(&self) -> Result<Result<u64, audit::Break>, AppError> {
        Ok(self.store.audit_verify().await?.map(|(entries, requests)| {
            tracing::debug!(entries, requests, "audit log verified");
            entries
        }))
    }
}

fn conflict(held: &ApprovalRequest) -> AppError {
    tracing::warn!(request.id = %held.id, agent = %held.agent, "idempotency key reused for a different call; refused");
    AppError::IdempotencyConflict {
        request_id: held.id.to_string(),
        tool: held.tool.clone(),
    }
}

fn transition(id: RequestId, e: TransitionError) -> AppError {
    match e {
        TransitionError::NotFound => AppError::NotFound(id.to_string()),
        TransitionError::AlreadyDecided { state } => AppError::AlreadyDecided(state),
        TransitionError::PastDeadline => AppError::AlreadyDecided(State::TimedOut),
        TransitionError::AlreadyVoted { voter } => AppError::AlreadyVoted(voter),
        TransitionError::NotDue => bad("the deadline has not been reached"),
    }
}
