//! Agents' bearer tokens in PostgreSQL (migration 0002), as the SQLite
//! store keeps them: the typed writes, run by the writer in the batch's
//! transaction with their audit entry and a `PolicyChanged` note (so every
//! process sharing the database re-checks its connections), and the reads.

use super::notify::Note;
use super::writer::Tx;
use super::PgStore;
use crate::app::ports::{AgentToken, AgentTokens, Change, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::store::error::sqlx as db;
use async_trait::async_trait;
use std::sync::Arc;

/// Stores `t`; with `others_expire_ms`, shortens the agent's other live
/// tokens to expire then. Returns how many were shortened.
async fn issue(
    tx: &mut Tx,
    t: &AgentToken,
    others_expire_ms: Option<i64>,
    audit: &SealedEvent,
) -> StoreResult<u64> {
    sqlx::query(
        "INSERT INTO agent_tokens (id, agent, secret_hash, created_ms, created_by, expires_ms, revoked_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, NULL)",
    )
    .bind(&t.id)
    .bind(&t.agent)
    .bind(&t.secret_hash)
    .bind(t.created_ms)
    .bind(&t.created_by)
    .bind(t.expires_ms)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?;
    let mut shortened = 0;
    if let Some(at) = others_expire_ms {
        shortened = sqlx::query(
            "UPDATE agent_tokens SET expires_ms = $1 WHERE agent = $2 AND id != $3 \
             AND revoked_ms IS NULL AND (expires_ms IS NULL OR expires_ms > $1)",
        )
        .bind(at)
        .bind(&t.agent)
        .bind(&t.id)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected();
    }
    tx.audit(std::slice::from_ref(audit)).await?;
    tx.note(Note::PolicyChanged);
    Ok(shortened)
}

async fn revoke(tx: &mut Tx, id: &str, now_ms: i64, audit: &SealedEvent) -> StoreResult<bool> {
    let done =
        sqlx::query("UPDATE agent_tokens SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
            .bind(now_ms)
            .bind(id)
            .execute(tx.conn().await?)
            .await
            .map_err(db)?
            .rows_affected()
            == 1;
    if done {
        tx.audit(std::slice::from_ref(audit)).await?;
        tx.note(Note::PolicyChanged);
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
impl AgentTokens for PgStore {
    async fn issue_token(
        &self,
        t: AgentToken,
        others_expire_ms: Option<i64>,
        audit: AuditEvent,
    ) -> StoreResult<u64> {
        let audit = Arc::new(audit.seal());
        let t = Arc::new(t);
        let n = self
            .write(move |tx| {
                let (t, audit) = (t.clone(), audit.clone());
                Box::pin(async move { issue(tx, &t, others_expire_ms, &audit).await })
            })
            .await?;
        self.publish(Change::PolicyChanged);
        Ok(n)
    }
    async fn revoke_token(&self, id: String, now_ms: i64, audit: AuditEvent) -> StoreResult<bool> {
        let audit = Arc::new(audit.seal());
        let id = Arc::new(id);
        let done = self
            .write(move |tx| {
                let (id, audit) = (id.clone(), audit.clone());
                Box::pin(async move { revoke(tx, &id, now_ms, &audit).await })
            })
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
