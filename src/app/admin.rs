//! Admin use-cases on the policy data: grants, revokes and tool risks.

use super::*;

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
