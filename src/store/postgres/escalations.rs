//! The escalation ladder in PostgreSQL (migration 0006), as the SQLite
//! store keeps it: a step is claimed by the writer in the batch's
//! transaction with its audit entry and the card's bump (and a `CardsDue`
//! note for the process whose outbox posts cards), and read for the worker
//! and the card.

use super::notify::Note;
use super::writer::Tx;
use super::PgStore;
use crate::app::ports::{Change, EscalationRecord, Escalations, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::domain::request::RequestId;
use crate::store::error::sqlx as db;
use crate::store::escalations::{self as sql, EscalationRow};
use async_trait::async_trait;
use std::sync::Arc;

/// Claims the step; `(claimed, card_bumped)`.
async fn claim(
    tx: &mut Tx,
    r: &EscalationRecord,
    audit: &SealedEvent,
) -> StoreResult<(bool, bool)> {
    let id = sql::id(r.request_id);
    let claimed = sqlx::query(sql::CLAIM)
        .bind(&id)
        .bind(r.step as i64)
        .bind(&r.action)
        .bind(sql::targets_json(&r.targets))
        .bind(r.claimed_ms)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected()
        == 1;
    if !claimed {
        return Ok((false, false));
    }
    tx.audit(std::slice::from_ref(audit)).await?;
    let bumped = sqlx::query(sql::BUMP_CARD)
        .bind(&id)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected()
        > 0;
    if bumped {
        tx.note(Note::CardsDue);
    }
    Ok((true, bumped))
}

#[async_trait]
impl Escalations for PgStore {
    async fn claim_escalation(
        &self,
        record: EscalationRecord,
        audit: AuditEvent,
    ) -> StoreResult<bool> {
        let audit = Arc::new(audit.seal());
        let record = Arc::new(record);
        let (claimed, bumped) = self
            .write(move |tx| {
                let (record, audit) = (record.clone(), audit.clone());
                Box::pin(async move { claim(tx, &record, &audit).await })
            })
            .await?;
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
        let id = Arc::new(sql::id(request_id));
        self.write(move |tx| {
            let id = id.clone();
            Box::pin(async move {
                sqlx::query(sql::SENT)
                    .bind(sent_ms)
                    .bind(id.as_str())
                    .bind(step as i64)
                    .execute(tx.conn().await?)
                    .await
                    .map_err(db)?;
                Ok(())
            })
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
