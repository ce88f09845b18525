//! The Discord card outbox's use of the store, through the app: the outbox
//! (an adapter) never holds the store itself. Errors keep the store's text,
//! for the adapter's log; none of these decide anything.

use super::ports::{CardRow, StoreResult};
use super::{now_ms, Gateway};
use crate::domain::request::{RequestId, Vote};

impl Gateway {
    /// After a start: a row for every pending request without one, and every
    /// card showing a stale state due again. How many rows changed.
    pub async fn card_reconcile(&self, channel_id: u64) -> StoreResult<u64> {
        self.store.card_reconcile(channel_id).await
    }

    /// Cards due now, oldest deadline first.
    pub async fn cards_due(&self, limit: u32) -> StoreResult<Vec<CardRow>> {
        self.store.cards_due(now_ms(), limit).await
    }

    /// How many cards wait to be posted or edited (for metrics).
    pub async fn cards_backlog(&self) -> StoreResult<u64> {
        self.store.cards_backlog().await
    }

    /// The earliest retry time among due cards, if any.
    pub async fn card_next_attempt(&self) -> StoreResult<Option<i64>> {
        self.store.card_next_attempt().await
    }

    /// A request's card, if it has one.
    pub async fn card(&self, request_id: RequestId) -> StoreResult<Option<CardRow>> {
        self.store.card(request_id).await
    }

    /// Records a successful post or edit of `version`.
    pub async fn card_done(
        &self,
        request_id: RequestId,
        message_id: u64,
        version: i64,
        rendered_state: String,
    ) -> StoreResult<()> {
        self.store
            .card_done(request_id, message_id, version, rendered_state)
            .await
    }

    /// Makes every waiting card due now; how many were waiting.
    pub async fn cards_retry_now(&self) -> StoreResult<u64> {
        self.store.cards_retry_now(now_ms()).await
    }

    /// Records a failed attempt; the card is retried at `next_attempt_ms`.
    pub async fn card_retry_later(
        &self,
        request_id: RequestId,
        attempts: i64,
        next_attempt_ms: i64,
    ) -> StoreResult<()> {
        self.store
            .card_retry_later(request_id, attempts, next_attempt_ms)
            .await
    }

    /// The votes recorded on a request (who approved so far, on a card).
    pub async fn votes(&self, id: RequestId) -> StoreResult<Vec<Vote>> {
        self.store.votes(id).await
    }
}
