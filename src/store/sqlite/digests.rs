//! Flood digests in SQLite (migration 0016): reads through the pool,
//! writes by the writer thread, each in one transaction (a request leaves
//! its unposted card and joins a digest together, or not at all).

use super::writer::Tx;
use super::{RequestRow, SqliteStore};
use crate::app::digests::{DigestRow, Digests};
use crate::app::ports::StoreResult;
use crate::domain::digest::{NewDigest, Waiting};
use crate::domain::request::{ApprovalRequest, RequestId};
use crate::store::digests::{DigestDbRow, WaitingRow, LIVE, MEMBERS, ONE, WAITING, WAITING_COUNT};
use crate::store::error::sqlx as db;
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use uuid::Uuid;

fn apply(
    tx: &mut Tx<'_>,
    channel: u64,
    new: &[NewDigest],
    joins: &[(RequestId, Uuid)],
    now: i64,
    hold: i64,
) -> StoreResult<u64> {
    for d in new {
        tx.prepare_cached(
            "INSERT INTO discord_digests (id, channel_id, agent, tool, open_until_ms, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            d.id.to_string(),
            channel as i64,
            d.agent,
            d.tool,
            now + hold,
            now
        ])?;
    }
    let mut moved = 0;
    for (req, digest) in joins {
        let (req, digest) = (req.to_string(), digest.to_string());
        let gone = tx
            .prepare_cached(
                "DELETE FROM discord_cards WHERE request_id = ?1 AND message_id IS NULL \
                 AND EXISTS (SELECT 1 FROM requests r WHERE r.id = ?1 AND r.state = 'pending') \
                 AND EXISTS (SELECT 1 FROM discord_digests d WHERE d.id = ?2 AND d.finished = 0) \
                 AND NOT EXISTS (SELECT 1 FROM discord_digest_members m WHERE m.request_id = ?1)",
            )?
            .execute(params![req, digest])?;
        if gone != 1 {
            continue;
        }
        let seq: Option<i64> = tx
            .prepare_cached(
                "UPDATE discord_digests SET members = members + 1, \
                 open_until_ms = MAX(open_until_ms, ?2) WHERE id = ?1 RETURNING members",
            )?
            .query_row(params![digest, now + hold], |r| r.get(0))
            .optional()?;
        let Some(seq) = seq else { continue };
        tx.prepare_cached(
            "INSERT INTO discord_digest_members (request_id, digest_id, seq) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![req, digest, seq])?;
        moved += 1;
    }
    Ok(moved)
}

#[async_trait]
impl Digests for SqliteStore {
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
        self.write(move |tx| apply(tx, channel, &new, &joins, now_ms, hold_ms))
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
        let id = id.to_string();
        self.write(move |tx| {
            tx.prepare_cached(
                "UPDATE discord_digests SET message_id = ?1, rendered = ?2, attempts = 0, \
                 next_attempt_ms = ?3, \
                 finished = CASE WHEN ?4 AND members = ?5 THEN 1 ELSE 0 END WHERE id = ?6",
            )?
            .execute(params![
                message_id as i64,
                rendered,
                next_attempt_ms,
                all_decided,
                i64::from(members),
                id
            ])?;
            Ok(())
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
        let id = id.to_string();
        self.write(move |tx| {
            tx.prepare_cached(
                "UPDATE discord_digests SET attempts = ?1, next_attempt_ms = ?2, \
                 message_id = CASE WHEN ?3 THEN NULL ELSE message_id END WHERE id = ?4",
            )?
            .execute(params![attempts, next_attempt_ms, forget_message, id])?;
            Ok(())
        })
        .await
    }
}
