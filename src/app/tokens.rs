//! Agents' bearer tokens: issue, rotate, revoke, list, and the check the
//! first line of a TCP connection goes through ([`Gateway::authenticate_bearer`]).
//!
//! Tokens live in the store (see [`ports::AgentTokens`]), so processes that
//! share it admit and refuse alike, and a revoke acts everywhere. A secret
//! is drawn here, shown once to the admin who issued it, and never stored
//! or logged: only its SHA-256 is kept, compared in constant time.

use super::*;
use crate::domain::token;
pub use ports::AgentToken;

/// What a connection authenticated as: its token, and the agent it acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bearer {
    pub token_id: String,
    pub agent: String,
    pub expires_ms: Option<i64>,
}

/// Why a presented token was refused. The agent is told only
/// [`AppError::Unauthorized`]; this is for the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The id part, when the token had one (never the secret).
    pub token_id: Option<String>,
    pub why: &'static str,
}

/// A token just issued: the only time its full text exists.
#[derive(Debug, Clone, Serialize)]
pub struct Issued {
    pub id: String,
    pub agent: String,
    /// `kt_<id>_<secret>`: shown once, stored nowhere.
    pub token: String,
    pub expires_ms: Option<i64>,
    /// For a rotation: when the agent's other tokens stop working.
    pub others_expire_ms: Option<i64>,
    /// For a rotation: how many other live tokens were shortened.
    pub others: u64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Gateway {
    /// Tokens are for agents the server was started with.
    fn token_agent(&self, agent: &str) -> Result<(), AppError> {
        if self.cfg.agent(agent).is_none() {
            let shown: String = agent.chars().take(64).collect();
            return Err(bad(format!(
                "agent `{}` is not configured: tokens are issued only for agents with an [[agents]] entry",
                shown.escape_debug()
            )));
        }
        Ok(())
    }

    /// Issues a new token for `agent`, valid for `ttl` (forever if `None`).
    /// With `overlap`, a rotation: the agent's other live tokens expire
    /// `overlap` from now, in the same transaction.
    pub async fn issue_token(
        &self,
        agent: &str,
        ttl: Option<Duration>,
        overlap: Option<Duration>,
        by: &str,
    ) -> Result<Issued, AppError> {
        self.token_agent(agent)?;
        let mut id_bytes = [0u8; token::ID_BYTES];
        let mut secret_bytes = [0u8; token::SECRET_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id_bytes);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret_bytes);
        let (id, text, secret_hash) = token::issue(&id_bytes, &secret_bytes);
        let now = now_ms();
        let expires_ms = ttl.map(|t| now.saturating_add(millis(t)));
        let others_expire_ms = overlap.map(|o| now.saturating_add(millis(o)));
        let row = AgentToken {
            id: id.clone(),
            agent: agent.to_string(),
            secret_hash,
            created_ms: now,
            created_by: by.to_string(),
            expires_ms,
            revoked_ms: None,
        };
        let audit = events::token_issued(now, by, &id, agent, expires_ms, others_expire_ms);
        let others = self.store.issue_token(row, others_expire_ms, audit).await?;
        tracing::info!(token.id = %id, agent = %agent, by = %by, rotated = overlap.is_some(), "agent token issued");
        Ok(Issued {
            id,
            agent: agent.to_string(),
            token: text,
            expires_ms,
            others_expire_ms,
            others,
        })
    }

    /// Revokes token `id` at once (every process sharing the store closes
    /// its connections within about a second).
    pub async fn revoke_token(&self, id: &str, by: &str) -> Result<AgentToken, AppError> {
        if !token::is_id(id) {
            return Err(bad(format!(
                "`{}` is not a token id (24 hex digits, as `keyturn token list` shows)",
                id.chars().take(64).collect::<String>().escape_debug()
            )));
        }
        let Some(t) = self.store.token(id).await? else {
            return Err(AppError::NotFound(format!("token {id}")));
        };
        let now = now_ms();
        let done = self
            .store
            .revoke_token(
                id.to_string(),
                now,
                events::token_revoked(now, by, id, &t.agent),
            )
            .await?;
        if !done {
            return Err(bad(format!("token {id} is already revoked")));
        }
        tracing::info!(token.id = %id, agent = %t.agent, by = %by, "agent token revoked");
        Ok(AgentToken {
            revoked_ms: Some(now),
            ..t
        })
    }

    /// Whether a connection authenticated as `agent` may still act: the
    /// agent is still in the config as last reloaded (a reload that removes
    /// it stops its TCP connections' calls, as it stops its socket calls).
    pub fn bearer_agent_ok(&self, agent: &str) -> Result<(), AppError> {
        if self.live().agent(agent).is_none() {
            return Err(AppError::AgentRefused(format!(
                "agent `{agent}` is no longer configured"
            )));
        }
        Ok(())
    }

    /// Every token (never a secret).
    pub async fn tokens(&self) -> Result<Vec<AgentToken>, AppError> {
        Ok(self.store.tokens().await?)
    }

    /// Checks a presented bearer token: well formed, known, its secret's
    /// hash equal (constant time), not revoked, not expired, for an agent
    /// still configured. `Ok(Err(_))` says why for the log only.
    pub async fn authenticate_bearer(
        &self,
        presented: &str,
    ) -> Result<Result<Bearer, Refused>, AppError> {
        let Some(p) = token::parse(presented) else {
            return Ok(Err(Refused {
                token_id: None,
                why: "malformed",
            }));
        };
        let refused = |why| {
            Ok(Err(Refused {
                token_id: Some(p.id.to_string()),
                why,
            }))
        };
        let Some(t) = self.store.token(p.id).await? else {
            return refused("unknown id");
        };
        if !token::secret_matches(p.secret, &t.secret_hash) {
            return refused("wrong secret");
        }
        if let Some(why) = token::dead_reason(t.expires_ms, t.revoked_ms, now_ms()) {
            return refused(why);
        }
        if self.live().agent(&t.agent).is_none() || self.cfg.agent(&t.agent).is_none() {
            return refused("agent no longer configured");
        }
        Ok(Ok(Bearer {
            token_id: t.id,
            agent: t.agent,
            expires_ms: t.expires_ms,
        }))
    }

    /// Of the tokens `ids`, those no longer live at `now_ms` (revoked,
    /// expired, deleted), with why: the connections bound to them are
    /// closed. One read per id: only tokens in use are read.
    pub async fn dead_tokens(
        &self,
        ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<(String, &'static str)>, AppError> {
        let mut dead = Vec::new();
        for id in ids {
            let why = match self.store.token(id).await? {
                None => Some("deleted"),
                Some(t) => token::dead_reason(t.expires_ms, t.revoked_ms, now_ms),
            };
            if let Some(w) = why {
                dead.push((id.clone(), w));
            }
        }
        Ok(dead)
    }
}
