//! Anomaly alerts and seen tools in SQLite (migration 0015): written by the
//! writer (an alert with its audit entry), read from the read pool.

use super::writer::Tx;
use super::SqliteStore;
use crate::app::ports::{Alert, Anomalies, StoreResult, MAX_SEEN_TOOLS_PER_AGENT};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::store::anomaly::{self as sql, AlertRow};
use crate::store::error::sqlx as db;
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

/// SQLite numbers `$N` parameters by first appearance, not by `N`; `?N`
/// is by `N`. For statements whose parameters appear out of order.
fn positional(sql: &str) -> String {
    sql.replace('$', "?")
}

fn record(tx: &mut Tx<'_>, a: &Alert, audit: Option<&SealedEvent>) -> StoreResult<()> {
    tx.prepare_cached(sql::UPSERT)?.execute(params![
        a.id,
        a.agent,
        a.rule,
        a.action,
        a.detail,
        a.count as i64,
        a.opened_ms,
        a.updated_ms,
    ])?;
    if let Some(e) = audit {
        tx.audit(std::slice::from_ref(e))?;
    }
    Ok(())
}

fn note_tool(tx: &mut Tx<'_>, agent: &str, tool: &str, now_ms: i64) -> StoreResult<Option<i64>> {
    let known: Option<i64> = tx
        .prepare_cached(sql::KNOWN_TOOL)?
        .query_row(params![agent, tool], |r| r.get(0))
        .optional()?;
    if known.is_some() {
        return Ok(None);
    }
    let (n, first): (i64, Option<i64>) = tx
        .prepare_cached(sql::AGENT_TOOLS)?
        .query_row(params![agent], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if n < MAX_SEEN_TOOLS_PER_AGENT {
        tx.prepare_cached(sql::ADD_TOOL)?
            .execute(params![agent, tool, now_ms])?;
    }
    Ok(Some(first.unwrap_or(now_ms).min(now_ms)))
}

#[async_trait]
impl Anomalies for SqliteStore {
    async fn record_alert(&self, alert: Alert, audit: Option<AuditEvent>) -> StoreResult<()> {
        let audit = audit.map(|e| e.seal());
        self.write(move |tx| record(tx, &alert, audit.as_ref()))
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
        let id = id.to_string();
        self.write(move |tx| {
            tx.prepare_cached(&positional(sql::POSTED))?
                .execute(params![id, message_id as i64, version])?;
            Ok(())
        })
        .await
    }
    async fn alert_paused(&self, id: &str, by: String, now_ms: i64) -> StoreResult<bool> {
        let id = id.to_string();
        self.write(move |tx| {
            Ok(tx
                .prepare_cached(&positional(sql::PAUSED))?
                .execute(params![id, by, now_ms])?
                == 1)
        })
        .await
    }
    async fn note_tool_seen(
        &self,
        agent: &str,
        tool: &str,
        now_ms: i64,
    ) -> StoreResult<Option<i64>> {
        let (agent, tool) = (agent.to_string(), tool.to_string());
        self.write(move |tx| note_tool(tx, &agent, &tool, now_ms))
            .await
    }
}
