//! The use-cases: submit, wait, vote, cancel, expire, grant, pair, audit.
//!
//! [`Gateway`] ties the pure core to a [`Store`]. It knows nothing of sockets
//! or Discord: every surface (socket, CLI, bot) calls these methods, so every
//! surface gets the same rules, the same audit and the same answers.

mod admin;
pub use admin::ApprovedFor;
mod anomaly;
pub use anomaly::MAX_ALERTS_LISTED;
mod audit;
mod cards;
pub mod connection;
mod content;
mod decide;
mod edit;
pub mod escalation;
pub use edit::EditForm;
pub mod digests;
mod follow;
pub mod health;
pub mod metrics;
mod pairing;
mod pauses;
pub mod ports;
pub mod retention;
pub mod run;
pub mod scheduler;
mod stats;
mod submit;
pub mod tokens;
mod waiters;

use crate::config::Config;
use crate::domain::audit::{events, AuditEntry};
use crate::domain::flags::FlagScanner;
use crate::domain::policy::{
    self, AllowlistAnswer, Call, Effect, Facts, Grant, PolicySettings, PolicyState, Scope,
    ToolPattern, Verdict,
};
use crate::domain::redact::{self, Redactor};
use crate::domain::request::{ApprovalRequest, DecidedBy, RequestId, State, TransitionError, Vote};
use crate::domain::trifecta;
use crate::domain::Risk;
use content::Content;
pub use content::VerifyAnswer;
pub use pauses::{AgentStatus, PauseAnswer, ResumeAnswer};
#[allow(unused_imports)]
use ports::{
    AuditLog, Cards, PairedUser, PairingRefused, Pairings, PendingPairing, PolicyData, Requests,
    Store, StoreError, StoredGrant,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
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
    /// An admin named an agent that is not configured (pause, resume).
    #[error("agent `{0}` is not configured (see `keyturn agent list`)")]
    UnknownAgent(String),
    #[error("request {0} belongs to another agent")]
    NotYourRequest(String),
    #[error("{}", crate::domain::request::too_many_pending(agent, *max))]
    TooManyPending { agent: String, max: usize },
    #[error("{0}")]
    Pairing(String),
    /// An idempotency key reused for a different call (tool, arguments,
    /// user, channel or task differ, or the key predates fingerprints).
    #[error("idempotency key already used for a different call (request {request_id}, tool `{tool}`); nothing was queued: use a new key for a new call")]
    IdempotencyConflict { request_id: String, tool: String },
    /// The policy view could not be loaded from the store: nothing is
    /// decided by a policy that may be stale (fail closed).
    #[error("the policy is unavailable (it could not be loaded from the store); refused until it is (see the server log)")]
    PolicyUnavailable,
    /// A bearer token was refused; never says which part was wrong.
    #[error("the token was not accepted (unknown, wrong, expired or revoked): ask an admin for a valid one (`keyturn token issue`)")]
    Unauthorized,
    /// A connection bound to one agent named another.
    #[error("{0}")]
    NotAuthorized(String),
    /// A storage failure. The database being unreachable is said as such
    /// (`store_unavailable`: retry later); anything else is `internal`.
    /// Either way nothing was carried out, and nothing was allowed.
    #[error("{}", store_message(.0))]
    Store(#[from] StoreError),
    /// A run-tool call that was not run (`already_run`, `too_many_runs`,
    /// `run_mismatch`, `not_running`, `credential_unavailable`…).
    #[error("{message}")]
    Run { code: &'static str, message: String },
}

fn store_message(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => {
            "the database is unavailable, so the call was not carried out (nothing was allowed); \
             try again shortly (see the server log)"
        }
        _ => "internal error; the call was not carried out (see the server log)",
    }
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
            AppError::UnknownAgent(_) => "unknown_agent",
            AppError::NotYourRequest(_) => "not_your_request",
            AppError::TooManyPending { .. } => "too_many_pending",
            AppError::Pairing(_) => "pairing_refused",
            AppError::IdempotencyConflict { .. } => "idempotency_conflict",
            AppError::PolicyUnavailable => "policy_unavailable",
            AppError::Unauthorized => "unauthorized",
            AppError::NotAuthorized(_) => "not_authorized",
            AppError::Store(StoreError::Unavailable(_)) => "store_unavailable",
            AppError::Store(_) => "internal",
            AppError::Run { code, .. } => code,
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
    /// How sure the agent is of this call (0..=1): below the threshold
    /// (`min_confidence`) an allowed call asks a human instead.
    pub confidence: Option<f64>,
    /// The Unix uid the call came from (set by the socket from SO_PEERCRED,
    /// never from what the agent sends): that uid may not vote on it.
    #[serde(skip)]
    pub requester_uid: Option<u32>,
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
    /// Time-boxed grants in force when the view was loaded: evaluation
    /// ignores each past its instant, so none needs a sweep to stop applying.
    timed: Vec<crate::domain::timed::TimedGrant>,
    risks: HashMap<String, Risk>,
    /// Paired user id → roles.
    users: HashMap<String, Vec<String>>,
    /// The kill switches in force (agents paused, and the global pause).
    pauses: Vec<policy::Pause>,
    /// Why the last refresh failed, while it does: the view may be stale,
    /// so every call is denied (`policy_unavailable`) until a refresh works.
    unavailable: Option<String>,
}

/// The rule a call is denied by while the policy view is unavailable.
pub const POLICY_UNAVAILABLE: &str = "policy_unavailable";

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
    /// Held while the view is read from the store and swapped, so an older
    /// read never replaces a newer one.
    refreshing: tokio::sync::Mutex<()>,
    /// Asks the follower for a policy refresh (see [`follow`]).
    policy_due: Arc<Notify>,
    limits: Mutex<PolicyState>,
    waiters: Waiters,
    server_uid: u32,
    /// What runs tools, when this process does (`serve` sets it).
    runner: std::sync::OnceLock<run::Runner>,
    /// Full arguments held for edits (see [`edit`]).
    edits: edit::Held,
    /// The anomaly rules, when any is configured (see [`anomaly`]).
    anomaly: Option<anomaly::AnomalyWatch>,
}

impl Gateway {
    /// Builds the gateway, starts following the store's change feed (see
    /// [`follow`]: waiters, pending slots and the policy view follow it), and
    /// loads the policy view and the pending counts. Deadlines are
    /// [`scheduler::run`]'s, which `serve` starts.
    pub async fn new(
        cfg: Arc<Config>,
        store: Arc<dyn Store>,
        server_uid: u32,
    ) -> Result<Arc<Gateway>, AppError> {
        let redactor = cfg.redactor().map_err(|e| bad(e.to_string()))?;
        let scanner = FlagScanner::new(
            cfg.content.allowed_domains.clone(),
            cfg.tools.iter().map(|t| t.name.clone()).collect(),
        );
        let rules = cfg.anomaly.rules().map_err(|e| bad(e.to_string()))?;
        let gw = Arc::new(Gateway {
            anomaly: anomaly::AnomalyWatch::new(rules),
            settings: cfg.policy_settings(),
            redactor,
            scanner,
            live: RwLock::new(cfg.clone()),
            cfg,
            store,
            view: RwLock::default(),
            refreshing: tokio::sync::Mutex::new(()),
            policy_due: Arc::new(Notify::new()),
            limits: Mutex::default(),
            waiters: Waiters::default(),
            server_uid,
            runner: std::sync::OnceLock::new(),
            edits: edit::Held::default(),
        });
        // Subscribed before anything is loaded: no change is missed between.
        follow::start(&gw);
        // Opting out of "a flagged call asks a human" is allowed, never silent.
        for exemption in gw.cfg.flag_ask_exemptions() {
            tracing::warn!("flagged calls may run without a human: {exemption}");
        }
        gw.refresh_policy().await?;
        // Pauses in force: nothing of theirs stays pending.
        gw.sweep_new_pauses(&[]).await;
        Ok(gw)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Changes committed to the store from now on (see [`ports::Change`]),
    /// for adapters that follow them (the Discord outbox).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<ports::Change> {
        self.store.subscribe()
    }

    /// Whether this process leads the processes sharing the store (see
    /// [`ports::Store::leadership`]): only the leader runs the Discord bot,
    /// the card outbox, the deadline sweep and retention.
    pub fn leadership(&self) -> tokio::sync::watch::Receiver<bool> {
        self.store.leadership()
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
    /// Runs after every local policy write (so this process's very next call
    /// sees it) and on every `PolicyChanged` from the feed. If it fails the
    /// view fails closed: every call is denied until a refresh succeeds (the
    /// follower retries with a growing pause; health reports it).
    pub async fn refresh_policy(&self) -> Result<(), AppError> {
        let _one = self.refreshing.lock().await;
        match self.load_policy().await {
            Ok(view) => {
                let mut current = self.view.write().unwrap_or_else(|e| e.into_inner());
                if current.unavailable.is_some() {
                    tracing::warn!(
                        "policy view loaded again; calls are decided by the policy again"
                    );
                }
                *current = view;
                Ok(())
            }
            Err(e) => {
                let why = match &e {
                    AppError::Store(s) => s.to_string(),
                    other => other.to_string(),
                };
                tracing::error!(error = %why, "POLICY VIEW UNAVAILABLE: every call is denied until it loads again (retrying)");
                self.view
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .unavailable = Some(why);
                Err(e)
            }
        }
    }

    /// Why the policy view is unavailable (every call denied), if it is.
    pub fn policy_unavailable(&self) -> Option<String> {
        self.view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .unavailable
            .clone()
    }

    async fn load_policy(&self) -> Result<PolicyView, AppError> {
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
        // The kill switch is part of the view: if it cannot be read, the
        // view is unavailable and every call is denied (fail closed).
        let pauses = self.store.pauses().await?;
        // Expired grants never apply again, so the view keeps only those in
        // force (the store keeps every one, for the record).
        let now = now_ms();
        let timed = self
            .store
            .timed_grants()
            .await?
            .into_iter()
            .filter(|g| g.live_at(now))
            .collect();
        Ok(PolicyView {
            grants,
            timed,
            risks,
            users,
            pauses,
            unavailable: None,
        })
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
}
