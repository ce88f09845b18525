//! Flood digests in PostgreSQL (migration 0009), as the SQLite store keeps
//! them: reads through the pool, writes by the writer in the batch's
//! transaction (a request leaves its unposted card and joins a digest
//! together, or not at all).

use super::writer::Tx;
use super::PgStore;
use crate::app::digests::{DigestRow, Digests};
use crate::app::ports::StoreResult;
use crate::domain::digest::{NewDigest, Waiting};
use crate::domain::request::{ApprovalRequest, RequestId};
use crate::store::digests::{DigestDbRow, WaitingRow, LIVE, MEMBERS, ONE, WAITING, WAITING_COUNT};
use crate::store::error::sqlx as db;
use crate::store::sqlite::RequestRow;
use async_trait::async_trait;
use std::sync::Arc;
use uuid::Uuid;

async fn apply(
    tx: &mut Tx,
    channel: u64,
    new: &[NewDigest],
    joins: &[(RequestId, Uuid)],
    now: i64,
    hold: i64,
) -> StoreResult<u64> {
    for d in new {
        sqlx::query(
            "INSERT INTO discord_digests (id, channel_id, agent, tool, open_until_ms, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(d.id.to_string())
        .bind(channel as i64)
        .bind(&d.agent)
        .bind(&d.tool)
        .bind(now + hold)
        .bind(now)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?;
    }
    let mut moved = 0;
    for (req, digest) in joins {
        let (req, digest) = (req.to_string(), digest.to_string());
        let gone = sqlx::query(
            "DELETE FROM discord_cards WHERE request_id = $1 AND message_id IS NULL \
             AND EXISTS (SELECT 1 FROM requests r WHERE r.id = $1 AND r.state = 'pending') \
             AND EXISTS (SELECT 1 FROM discord_digests d WHERE d.id = $2 AND d.finished = 0) \
             AND NOT EXISTS (SELECT 1 FROM discord_digest_members m WHERE m.request_id = $1)",
        )
        .bind(&req)
        .bind(&digest)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?
        .rows_affected();
        if gone != 1 {
            continue;
        }
        let seq: Option<(i64,)> = sqlx::query_as(
            "UPDATE discord_digests SET members = members + 1, \
             open_until_ms = GREATEST(open_until_ms, $2) WHERE id = $1 RETURNING members",
        )
        .bind(&digest)
        .bind(now + hold)
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(db)?;
        let Some((seq,)) = seq else { continue };
        sqlx::query(
            "INSERT INTO discord_digest_members (request_id, digest_id, seq) VALUES ($1, $2, $3)",
        )
        .bind(&req)
        .bind(&digest)
        .bind(seq)
        .execute(tx.conn().await?)
        .await
        .map_err(db)?;
        moved += 1;
    }
    Ok(moved)
}

#[async_trait]
impl Digests for PgStore {
    async fn cards_waiting(&self, limit: u32) -> StoreResult<(u64, Vec<Waiting>)> {
        let (n,): (i64,) = sqlx::query_as(WAITING_COUNT)
            .fetch_one(&self.reads)
            .await
            .map_err(db)?;
        let rows = sqlx::query_as::<_, WaitingRow>(WAITING)
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(db)?;
        let waiting = rows
            .into_iter()
            .map(WaitingRow::into_waiting)
            .collect::<StoreResult<_>>()?;
        Ok((n.max(0) as u64, waiting))
    }
    async fn digests_live(&self) -> StoreResult<Vec<DigestRow>> {
        sqlx::query_as::<_, DigestDbRow>(LIVE)
            .fetch_all(&self.reads)
            .await
            .map_err(db)?
            .into_iter()
            .map(DigestDbRow::into_digest)
            .collect()
    }
    async fn digest(&self, id: Uuid) -> StoreResult<Option<DigestRow>> {
        sqlx::query_as::<_, DigestDbRow>(ONE)
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(db)?
            .map(DigestDbRow::into_digest)
            .transpose()
    }
    async fn digest_apply(
        &self,
        channel: u64,
        new: Vec<NewDigest>,
        joins: Vec<(RequestId, Uuid)>,
        now_ms: i64,
        hold_ms: i64,
    ) -> StoreResult<u64> {
        let plan = Arc::new((new, joins));
        self.write(move |tx| {
            let plan = plan.clone();
            Box::pin(async move { apply(tx, channel, &plan.0, &plan.1, now_ms, hold_ms).await })
        })
        .await
    }
    async fn digest_members(&self, id: Uuid) -> StoreResult<Vec<ApprovalRequest>> {
        sqlx::query_as::<_, RequestRow>(MEMBERS)
            .bind(id.to_string())
            .fetch_all(&self.reads)
            .await
            .map_err(db)?
            .into_iter()
            .map(RequestRow::into_request)
            .collect()
    }
    async fn digest_done(
        &self,
        id: Uuid,
        message_id: u64,
        rendered: String,
        members: u32,
        all_decided: bool,
        next_attempt_ms: i64,
    ) -> StoreResult<()> {
        let args = Arc::new((id.to_string(), rendered));
        self.write(move |tx| {
            let args = args.clone();
            Box::pin(async move {
                sqlx::query(
                    "UPDATE discord_digests SET message_id = $1, rendered = $2, attempts = 0, \
                     next_attempt_ms = $3, \
                     finished = CASE WHEN $4 AND members = $5 THEN 1 ELSE 0 END WHERE id = $6",
                )
                .bind(message_id as i64)
                .bind(&args.1)
                .bind(next_attempt_ms)
                .bind(all_decided)
                .bind(i64::from(members))
                .bind(&args.0)
                .execute(tx.conn().await?)
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await
    }
    async fn digest_retry_later(
        &self,
        id: Uuid,
        attempts: i64,
        next_attempt_ms: i64,
        forget_message: bool,
    ) -> StoreResult<()> {
        let id = Arc::new(id.to_string());
        self.write(move |tx| {
            let id = id.clone();
            Box::pin(async move {
                sqlx::query(
                    "UPDATE discord_digests SET attempts = $1, next_attempt_ms = $2, \
                     message_id = CASE WHEN $3 THEN NULL ELSE message_id END WHERE id = $4",
                )
                .bind(attempts)
                .bind(next_attempt_ms)
                .bind(forget_message)
                .bind(&*id)
                .execute(tx.conn().await?)
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await
    }
}
