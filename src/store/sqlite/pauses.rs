//! The kill switch in SQLite (migration 0011): pauses written by the
//! writer with their audit entry, and read for the policy view.

use super::writer::Tx;
use super::SqliteStore;
use crate::app::ports::{AgentPauses, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::domain::policy::Pause;
use crate::store::error::sqlx as db;
use async_trait::async_trait;
use rusqlite::params;

fn pause(tx: &mut Tx<'_>, p: &Pause, audit: &SealedEvent) -> StoreResult<bool> {
    let done = tx
        .prepare_cached(
            "INSERT INTO agent_pauses (agent, paused_by, since_ms, reason) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (agent) DO NOTHING",
        )?
        .execute(params![p.agent, p.paused_by, p.since_ms, p.reason])?
        == 1;
    if done {
        tx.audit(std::slice::from_ref(audit))?;
    }
    Ok(done)
}

fn resume(tx: &mut Tx<'_>, agent: &str, audit: &SealedEvent) -> StoreResult<bool> {
    let done = tx
        .prepare_cached("DELETE FROM agent_pauses WHERE agent = ?1")?
        .execute(params![agent])?
        == 1;
    if done {
        tx.audit(std::slice::from_ref(audit))?;
    }
    Ok(done)
}

#[async_trait]
impl AgentPauses for SqliteStore {
    async fn pause_agent(&self, p: Pause, audit: AuditEvent) -> StoreResult<bool> {
        let audit = audit.seal();
        let done = self.write(move |tx| pause(tx, &p, &audit)).await?;
        self.policy_changed(done);
        Ok(done)
    }
    async fn resume_agent(&self, agent: String, audit: AuditEvent) -> StoreResult<bool> {
        let audit = audit.seal();
        let done = self.write(move |tx| resume(tx, &agent, &audit)).await?;
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
