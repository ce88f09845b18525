//! Admin use-cases on the policy data: grants, revokes and tool risks.

use super::*;
use crate::domain::timed::{self, TimedGrant, TimedScopeKind};

impl Gateway {
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
        let now = now_ms();
        let audit = events::grant_added(now, by, &g);
        let added = self.store.add_grant(g, by.to_string(), now, audit).await?;
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
        let audit = events::grant_removed(now_ms(), by, &scope, &tool, effect);
        let removed = self.store.remove_grant(scope, tool, effect, audit).await?;
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
        if view.unavailable.is_some() {
            return Err(AppError::PolicyUnavailable);
        }
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
        let now = now_ms();
        let audit = events::risk_set(now, by, tool, risk);
        self.store
            .set_tool_risk(tool.to_string(), risk, by.to_string(), now, audit)
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
}

/// What [`Gateway::approve_for`] did: the approving vote and the grant.
#[derive(Debug, Clone)]
pub struct ApprovedFor {
    pub voted: super::ports::Voted,
    pub grant: TimedGrant,
}

impl Gateway {
    /// Approves `id` and adds a time-boxed grant (`duration` `None`: until
    /// revoked) reaching as far as `kind` says, recorded with the approver
    /// and this request.
    ///
    /// The voter needs the same rights as for a vote (admins only for
    /// critical requests; the requester may not approve its own call). A
    /// request that needs more than one approval is refused: a grant would
    /// let later calls through on one person's word. Order is fail closed:
    /// the approving vote commits first, and the grant is stored only once
    /// the request is approved; if storing it fails, the request stays
    /// approved and no grant exists.
    #[allow(clippy::too_many_arguments)]
    pub async fn approve_for(
        &self,
        id: RequestId,
        voter: &str,
        name: Option<String>,
        reason: Option<String>,
        is_admin: bool,
        duration: Option<Duration>,
        kind: TimedScopeKind,
    ) -> Result<ApprovedFor, AppError> {
        if let Some(d) = duration {
            if !(timed::MIN_DURATION..=timed::MAX_DURATION).contains(&d) {
                return Err(bad("a grant lasts between 1s and 30d, or until revoked"));
            }
        }
        let r = self.status(id).await?;
        if r.state != State::Pending {
            return Err(AppError::AlreadyDecided(r.state));
        }
        if r.admin_only && !is_admin {
            return Err(AppError::AdminOnly);
        }
        if r.approvals_required > 1 {
            return Err(bad(format!(
                "this request needs {} approvals, so it cannot be allowed for a time \
                 (a grant would let later calls through on one approval); approve it with a plain vote",
                r.approvals_required
            )));
        }
        if self.timed_grants(None, None).len() >= timed::MAX_LIVE {
            return Err(bad(format!(
                "{} time-boxed grants are in force, the most there may be; revoke some \
                 (`keyturn tools list`, `keyturn revoke --id`) or approve with a plain vote",
                timed::MAX_LIVE
            )));
        }
        if kind == TimedScopeKind::AgentToolUser && r.user_id.is_none() {
            return Err(bad(
                "this request acts for no user, so scope `agent-tool-user` does not apply; \
                 use `call` or `agent-tool`",
            ));
        }
        // The id is drawn first so the approval's reason can name the grant
        // (cards and `status` show it beside the approver).
        let grant_id = format!("tg-{}", &Uuid::new_v4().simple().to_string()[..16]);
        let allowed = format!(
            "allowed for {}: {} (grant {grant_id})",
            timed::duration_label(duration),
            kind.describe()
        );
        let reason = Some(match reason.filter(|r| !r.trim().is_empty()) {
            Some(r) => format!("{r}; {allowed}"),
            None => allowed,
        });
        let voted = self.vote(id, voter, name, true, reason, is_admin).await?;
        if voted.request.state != State::Approved {
            // Not reachable with one approval needed; never grant without it.
            return Err(bad(
                "the vote was recorded but the request is not approved, so no grant was added",
            ));
        }
        let now = now_ms();
        let grant = TimedGrant {
            id: grant_id,
            agent: r.agent.clone(),
            tool: r.tool.clone(),
            kind,
            user_id: (kind == TimedScopeKind::AgentToolUser)
                .then(|| r.user_id.clone())
                .flatten(),
            args_hash: (kind == TimedScopeKind::Call).then(|| r.args_hash.clone()),
            expires_ms: duration.map(|d| now.saturating_add(d.as_millis() as i64)),
            created_by: voter.to_string(),
            created_ms: now,
            origin_request: id.to_string(),
            by_admin: is_admin,
        };
        let audit = events::timed_grant_added(now, voter, &grant);
        if let Err(e) = self.store.add_timed_grant(grant.clone(), audit).await {
            tracing::error!(request.id = %id, error = %e, "request approved, but its time-boxed grant could not be stored");
            return Err(e.into());
        }
        tracing::info!(request.id = %id, grant.id = %grant.id, grant.scope = %kind, until = %grant.until(), "time-boxed grant added");
        self.refresh_policy().await?;
        Ok(ApprovedFor { voted, grant })
    }

    /// Revokes a time-boxed grant by id; `false` if there was none.
    pub async fn revoke_timed(&self, grant_id: &str, by: &str) -> Result<bool, AppError> {
        if grant_id.is_empty()
            || grant_id.len() > 64
            || !grant_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad("a grant id looks like `tg-` and hex digits"));
        }
        let audit = events::timed_grant_removed(now_ms(), by, grant_id);
        let removed = self
            .store
            .remove_timed_grant(grant_id.to_string(), audit)
            .await?;
        self.refresh_policy().await?;
        Ok(removed)
    }

    /// Time-boxed grants still in force (expired ones left out), optionally
    /// only those for one agent and tool.
    pub fn timed_grants(&self, agent: Option<&str>, tool: Option<&str>) -> Vec<TimedGrant> {
        let now = now_ms();
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        view.timed
            .iter()
            .filter(|g| g.live_at(now))
            .filter(|g| agent.is_none_or(|a| a == g.agent))
            .filter(|g| tool.is_none_or(|t| t == "*" || t == g.tool))
            .cloned()
            .collect()
    }
}
