//! The kill switch in PostgreSQL (migration 0004), as the SQLite store
//! keeps it: pauses written by the writer in the batch's transaction with
//! their audit entry and a `PolicyChanged` note (so every process sharing
//! the database denies the paused agent), and read for the policy view.

use super::notify::Note;
use super::writer::Tx;
use super::PgStore;
use crate::app::ports::{AgentPauses, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::domain::policy::Pause;
use crate::store::error::sqlx as db;
use async_trait::async_trait;
use std::sync::Arc;

async fn pause(tx: &mut Tx, p: &Pause, audit: &SealedEvent) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO agent_pauses (agent, paused_by, since_ms, reason) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (agent) DO NOTHING",
    )
    .bind(&p.agent)
    .bind(&p.paused_by)
    .bind(p.since_ms)
    .bind(&p.reason)
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

async fn resume(tx: &mut Tx, agent: &str, audit: &SealedEvent) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM agent_pauses WHERE agent = $1")
        .bind(agent)
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

#[async_trait]
impl AgentPauses for PgStore {
    async fn pause_agent(&self, p: Pause, audit: AuditEvent) -> StoreResult<bool> {
        let audit = Arc::new(audit.seal());
        let p = Arc::new(p);
        let done = self
            .write(move |tx| {
                let (p, audit) = (p.clone(), audit.clone());
                Box::pin(async move { pause(tx, &p, &audit).await })
            })
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn resume_agent(&self, agent: String, audit: AuditEvent) -> StoreResult<bool> {
        let audit = Arc::new(audit.seal());
        let agent = Arc::new(agent);
        let done = self
            .write(move |tx| {
                let (agent, audit) = (agent.clone(), audit.clone());
                Box::pin(async move { resume(tx, &agent, &audit).await })
            })
            .await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn pauses(&self) -> StoreResult<Vec<Pause>> {
        let rows: Vec<(String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT agent, paused_by, since_ms, reason FROM agent_pauses ORDER BY since_ms, agent",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(agent, paused_by, since_ms, reason)| Pause {
                agent,
                paused_by,
                since_ms,
                reason,
            })
            .collect())
    }
}
