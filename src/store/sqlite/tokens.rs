//! Agents' bearer tokens in SQLite (migration 0009): the typed writes, run
//! by the writer like those of [`super::write`], and the reads.

use super::writer::Tx;
use super::SqliteStore;
use crate::app::ports::{AgentToken, AgentTokens, Change, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::store::error::sqlx as db;
use async_trait::async_trait;
use rusqlite::params;

/// Stores `t`; with `others_expire_ms`, shortens the agent's other live
/// tokens to expire then. Returns how many were shortened.
fn issue(
    tx: &mut Tx<'_>,
    t: &AgentToken,
    others_expire_ms: Option<i64>,
    audit: &SealedEvent,
) -> StoreResult<u64> {
    tx.prepare_cached(
        "INSERT INTO agent_tokens (id, agent, secret_hash, created_ms, created_by, expires_ms, revoked_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
    )?
    .execute(params![
        t.id,
        t.agent,
        t.secret_hash,
        t.created_ms,
        t.created_by,
        t.expires_ms
    ])?;
    let mut shortened = 0;
    if let Some(at) = others_expire_ms {
        shortened = tx
            .prepare_cached(
                "UPDATE agent_tokens SET expires_ms = ?1 WHERE agent = ?2 AND id != ?3 \
                 AND revoked_ms IS NULL AND (expires_ms IS NULL OR expires_ms > ?1)",
            )?
            .execute(params![at, t.agent, t.id])? as u64;
    }
    tx.audit(std::slice::from_ref(audit))?;
    Ok(shortened)
}

fn revoke(tx: &mut Tx<'_>, id: &str, now_ms: i64, audit: &SealedEvent) -> StoreResult<bool> {
    let done = tx
        .prepare_cached(
            "UPDATE agent_tokens SET revoked_ms = ?1 WHERE id = ?2 AND revoked_ms IS NULL",
        )?
        .execute(params![now_ms, id])?
        == 1;
    if done {
        tx.audit(std::slice::from_ref(audit))?;
    }
    Ok(done)
}

type TokenRow = (
    String,
    String,
    String,
    i64,
    String,
    Option<i64>,
    Option<i64>,
);

fn token(
    (id, agent, secret_hash, created_ms, created_by, expires_ms, revoked_ms): TokenRow,
) -> AgentToken {
    AgentToken {
        id,
        agent,
        secret_hash,
        created_ms,
        created_by,
        expires_ms,
        revoked_ms,
    }
}

const COLUMNS: &str = "id, agent, secret_hash, created_ms, created_by, expires_ms, revoked_ms";

#[async_trait]
impl AgentTokens for SqliteStore {
    async fn issue_token(
        &self,
        t: AgentToken,
        others_expire_ms: Option<i64>,
        audit: AuditEvent,
    ) -> StoreResult<u64> {
        let audit = audit.seal();
        let n = self
            .write(move |tx| issue(tx, &t, others_expire_ms, &audit))
            .await?;
        self.publish(Change::PolicyChanged);
        Ok(n)
    }
    async fn revoke_token(&self, id: String, now_ms: i64, audit: AuditEvent) -> StoreResult<bool> {
        let audit = audit.seal();
        let done = self
            .write(move |tx| revoke(tx, &id, now_ms, &audit))
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn token(&self, id: &str) -> StoreResult<Option<AgentToken>> {
        let row: Option<TokenRow> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM agent_tokens WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.reads)
                .await
                .map_err(db)?;
        Ok(row.map(token))
    }
    async fn tokens(&self) -> StoreResult<Vec<AgentToken>> {
        let rows: Vec<TokenRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM agent_tokens ORDER BY created_ms, id"
        ))
        .fetch_all(&self.reads)
        .await
        .map_err(db)?;
        Ok(rows.into_iter().map(token).collect())
    }
}
