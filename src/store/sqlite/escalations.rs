//! The escalation ladder in SQLite (migration 0013): a step is claimed by
//! the writer with its audit entry and the card's bump in one transaction,
//! and read for the worker and the card.

use super::writer::Tx;
use super::SqliteStore;
use crate::app::ports::{Change, EscalationRecord, Escalations, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::domain::request::RequestId;
use crate::store::error::sqlx as db;
use crate::store::escalations::{self as sql, EscalationRow};
use async_trait::async_trait;
use rusqlite::params;

/// Claims the step; `(claimed, card_bumped)`.
fn claim(tx: &mut Tx<'_>, r: &EscalationRecord, audit: &SealedEvent) -> StoreResult<(bool, bool)> {
    let id = sql::id(r.request_id);
    let claimed = tx.prepare_cached(sql::CLAIM)?.execute(params![
        id,
        r.step as i64,
        r.action,
        sql::targets_json(&r.targets),
        r.claimed_ms
    ])? == 1;
    if !claimed {
        return Ok((false, false));
    }
    tx.audit(std::slice::from_ref(audit))?;
    let bumped = tx.prepare_cached(sql::BUMP_CARD)?.execute(params![id])? > 0;
    Ok((true, bumped))
}

#[async_trait]
impl Escalations for SqliteStore {
    async fn claim_escalation(
        &self,
        record: EscalationRecord,
        audit: AuditEvent,
    ) -> StoreResult<bool> {
        let audit = audit.seal();
        let (claimed, bumped) = self.write(move |tx| claim(tx, &record, &audit)).await?;
        if bumped {
            self.publish(Change::CardsDue);
        }
        Ok(claimed)
    }
    async fn escalation_sent(
        &self,
        request_id: RequestId,
        step: u32,
        sent_ms: i64,
    ) -> StoreResult<()> {
        let id = sql::id(request_id);
        self.write(move |tx| {
            tx.prepare_cached(sql::SENT)?
                .execute(params![sent_ms, id, step as i64])?;
            Ok(())
        })
        .await
    }
    async fn escalations_of(&self, request_id: RequestId) -> StoreResult<Vec<EscalationRecord>> {
        sqlx::query_as::<_, EscalationRow>(&sql::of_request())
            .bind(sql::id(request_id))
            .fetch_all(&self.reads)
            .await
            .map_err(db)?
            .into_iter()
            .map(EscalationRow::into_record)
            .collect()
    }
    async fn pending_escalations(&self, limit: u32) -> StoreResult<Vec<EscalationRecord>> {
        sqlx::query_as::<_, EscalationRow>(&sql::of_pending())
            .bind(limit as i64)
            .fetch_all(&self.reads)
            .await
            .map_err(db)?
            .into_iter()
            .map(EscalationRow::into_record)
            .collect()
    }
}
