//! Anomaly alerts and seen tools in PostgreSQL (migration 0008), as the
//! SQLite store keeps them: written by the writer in the batch's
//! transaction (an alert with its audit entry), read from the read pool.

use super::writer::Tx;
use super::PgStore;
use crate::app::ports::{Alert, Anomalies, StoreResult, MAX_SEEN_TOOLS_PER_AGENT};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::store::anomaly::{self as sql, AlertRow};
use crate::store::error::sqlx as db;
use async_trait::async_trait;
use std::sync::Arc;

async fn record(tx: &mut Tx, a: &Alert, audit: Option<&SealedEvent>) -> StoreResult<()> {
    sqlx::query(sql::UPSERT)
        .bind(&a.id)
        .bind(&a.agent)
        .bind(&a.rule)
        .bind(&a.action)
        .bind(&a.detail)
        .bind(a.count as i64)
        .bind(a.opened_ms)
        .bind(a.updated_ms)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?;
    if let Some(e) = audit {
        tx.audit(std::slice::from_ref(e)).await?;
    }
    Ok(())
}

async fn note_tool(tx: &mut Tx, agent: &str, tool: &str, now_ms: i64) -> StoreResult<Option<i64>> {
    let known: Option<(i64,)> = sqlx::query_as(sql::KNOWN_TOOL)
        .bind(agent)
        .bind(tool)
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(db)?;
    if known.is_some() {
        return Ok(None);
    }
    let (n, first): (i64, Option<i64>) = sqlx::query_as(sql::AGENT_TOOLS)
        .bind(agent)
        .fetch_one(tx.conn().await?)
        .await
        .map_err(db)?;
    if n < MAX_SEEN_TOOLS_PER_AGENT {
        sqlx::query(sql::ADD_TOOL)
            .bind(agent)
            .bind(tool)
            .bind(now_ms)
            .execute(tx.conn().await?)
            .await
            .map_err(db)?;
    }
    Ok(Some(first.unwrap_or(now_ms).min(now_ms)))
}

#[async_trait]
impl Anomalies for PgStore {
    async fn record_alert(&self, alert: Alert, audit: Option<AuditEvent>) -> StoreResult<()> {
        let audit = Arc::new(audit.map(|e| e.seal()));
        let alert = Arc::new(alert);
        self.write(move |tx| {
            let (alert, audit) = (alert.clone(), audit.clone());
            Box::pin(async move { record(tx, &alert, audit.as_ref().as_ref()).await })
        })
        .await
    }
    async fn alert(&self, id: &str) -> StoreResult<Option<Alert>> {
        let row: Option<AlertRow> = sqlx::query_as(&sql::select_one())
            .bind(id)
            .fetch_optional(&self.reads)
            .await
            .map_err(db)?;
        Ok(row.map(AlertRow::into_alert))
    }
    async fn alerts(&self, limit: u32) -> StoreResult<Vec<Alert>> {
        let rows: Vec<AlertRow> = sqlx::query_as(&sql::select_newest())
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(db)?;
        Ok(rows.into_iter().map(AlertRow::into_alert).collect())
    }
    async fn alerts_due(&self, since_ms: i64, limit: u32) -> StoreResult<Vec<Alert>> {
        let rows: Vec<AlertRow> = sqlx::query_as(&sql::select_due())
            .bind(since_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(db)?;
        Ok(rows.into_iter().map(AlertRow::into_alert).collect())
    }
    async fn raised_alerts(&self, since_ms: i64, limit: u32) -> StoreResult<Vec<Alert>> {
        let rows: Vec<AlertRow> = sqlx::query_as(&sql::select_raised())
            .bind(since_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(db)?;
        Ok(rows.into_iter().map(AlertRow::into_alert).collect())
    }
    async fn alert_posted(&self, id: &str, message_id: u64, version: i64) -> StoreResult<()> {
        let id = Arc::new(id.to_string());
        self.write(move |tx| {
            let id = id.clone();
            Box::pin(async move {
                sqlx::query(sql::POSTED)
                    .bind(id.as_str())
                    .bind(message_id as i64)
                    .bind(version)
                    .execute(tx.conn().await?)
                    .await
                    .map_err(db)?;
                Ok(())
            })
        })
        .await
    }
    async fn alert_paused(&self, id: &str, by: String, now_ms: i64) -> StoreResult<bool> {
        let (id, by) = (Arc::new(id.to_string()), Arc::new(by));
        self.write(move |tx| {
            let (id, by) = (id.clone(), by.clone());
            Box::pin(async move {
                Ok(sqlx::query(sql::PAUSED)
                    .bind(id.as_str())
                    .bind(by.as_str())
                    .bind(now_ms)
                    .execute(tx.conn().await?)
                    .await
                    .map_err(db)?
                    .rows_affected()
                    == 1)
            })
        })
        .await
    }
    async fn note_tool_seen(
        &self,
        agent: &str,
        tool: &str,
        now_ms: i64,
    ) -> StoreResult<Option<i64>> {
        let (agent, tool) = (Arc::new(agent.to_string()), Arc::new(tool.to_string()));
        self.write(move |tx| {
            let (agent, tool) = (agent.clone(), tool.clone());
            Box::pin(async move { note_tool(tx, &agent, &tool, now_ms).await })
        })
        .await
    }
}
