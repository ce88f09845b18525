//! Flood digests: the store port that keeps them ([`Digests`], part of
//! [`super::ports::Store`]) and the use-cases the Discord outbox and the
//! bulk buttons call through the [`Gateway`]. The grouping is the domain's
//! ([`crate::domain::digest`]); a bulk action is one ordinary vote per
//! request ([`Gateway::vote`]), so every request gets its own decision,
//! rights check and audit entry. Imports no adapter.

use super::ports::StoreResult;
use super::{now_ms, AppError, Gateway};
use crate::domain::digest::{self, BulkReport, BulkStep, NewDigest, Open, Plan, Waiting};
use crate::domain::request::{ApprovalRequest, RequestId};
use async_trait::async_trait;
use uuid::Uuid;

/// A digest as the outbox knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestRow {
    pub id: Uuid,
    pub channel_id: u64,
    pub agent: String,
    pub tool: String,
    /// Set once posted; later changes edit this message.
    pub message_id: Option<u64>,
    /// Requests that joined (the highest `seq`).
    pub members: u32,
    /// Of them, still pending.
    pub pending: u32,
    /// The tally the message shows ([`digest::Tally::key`]).
    pub rendered: Option<String>,
    pub open_until_ms: i64,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub created_ms: i64,
}

/// Digests in the store: one row per digest, one member row per request
/// that moved from its card into a digest.
#[async_trait]
pub trait Digests: Send + Sync + 'static {
    /// Cards never posted (no message yet) of pending requests, oldest
    /// deadline first, at most `limit`, with how many there are in all.
    async fn cards_waiting(&self, limit: u32) -> StoreResult<(u64, Vec<Waiting>)>;
    /// Digests not finished, oldest first, with their pending counts.
    async fn digests_live(&self) -> StoreResult<Vec<DigestRow>>;
    async fn digest(&self, id: Uuid) -> StoreResult<Option<DigestRow>>;
    /// In one transaction: creates `new` (in `channel`), then moves each
    /// joined request from its card into its digest, only if that card is
    /// still unposted and the digest unfinished (else the card stays).
    /// A digest that takes a request stays open until `now_ms + hold_ms`.
    /// Returns how many requests moved.
    async fn digest_apply(
        &self,
        channel: u64,
        new: Vec<NewDigest>,
        joins: Vec<(RequestId, Uuid)>,
        now_ms: i64,
        hold_ms: i64,
    ) -> StoreResult<u64>;
    /// A digest's requests in joining order (the first `n` are the ones a
    /// message showing `n` showed).
    async fn digest_members(&self, id: Uuid) -> StoreResult<Vec<ApprovalRequest>>;
    /// Records a post or edit showing `rendered` of `members` requests;
    /// `all_decided`: the message shows none pending, so the digest is
    /// finished, unless a request joined meanwhile.
    #[allow(clippy::too_many_arguments)]
    async fn digest_done(
        &self,
        id: Uuid,
        message_id: u64,
        rendered: String,
        members: u32,
        all_decided: bool,
        next_attempt_ms: i64,
    ) -> StoreResult<()>;
    /// Records a failed attempt; retried at `next_attempt_ms`. With
    /// `forget_message`, the message is gone and is posted again.
    async fn digest_retry_later(
        &self,
        id: Uuid,
        attempts: i64,
        next_attempt_ms: i64,
        forget_message: bool,
    ) -> StoreResult<()>;
}

/// The requests a bulk action covers: the first `shown` that joined, as
/// the clicked message showed them.
pub fn shown(members: Vec<ApprovalRequest>, shown: u32) -> Vec<ApprovalRequest> {
    members.into_iter().take(shown as usize).collect()
}

impl Gateway {
    /// One pass of the grouping: reads the waiting cards and open digests,
    /// plans ([`digest::plan`]) and applies. `posts_per_sec`: the rate
    /// Discord allows new messages in the channel, once known. Returns how
    /// many moved.
    pub async fn digest_pass(
        &self,
        channel: u64,
        threshold: u32,
        posts_per_sec: Option<f64>,
    ) -> StoreResult<u64> {
        let now = now_ms();
        let live = self.store.digests_live().await?;
        let open: Vec<Open> = live
            .iter()
            .filter(|d| d.open_until_ms > now && d.pending > 0 && d.channel_id == channel)
            .map(|d| Open {
                id: d.id,
                agent: d.agent.clone(),
                tool: d.tool.clone(),
                members: d.members,
            })
            .collect();
        // Counted first: listing the waiting cards only when some may move.
        let (count, _) = self.store.cards_waiting(0).await?;
        let flooded = digest::flooded(count, threshold, posts_per_sec);
        if count == 0 || (open.is_empty() && !flooded) {
            return Ok(0);
        }
        let (_, waiting) = self.store.cards_waiting(digest::MAX_MEMBERS * 5).await?;
        let mut ids = std::iter::repeat_with(Uuid::now_v7);
        let Plan { new, joins } = digest::plan(&waiting, &open, flooded, &mut ids);
        if joins.is_empty() {
            return Ok(0);
        }
        self.store
            .digest_apply(channel, new, joins, now, digest::HOLD_MS)
            .await
    }

    pub async fn digests_live(&self) -> StoreResult<Vec<DigestRow>> {
        self.store.digests_live().await
    }

    pub async fn digest(&self, id: Uuid) -> StoreResult<Option<DigestRow>> {
        self.store.digest(id).await
    }

    pub async fn digest_members(&self, id: Uuid) -> StoreResult<Vec<ApprovalRequest>> {
        self.store.digest_members(id).await
    }

    pub async fn digest_done(
        &self,
        id: Uuid,
        message_id: u64,
        rendered: String,
        members: u32,
        all_decided: bool,
        next_attempt_ms: i64,
    ) -> StoreResult<()> {
        self.store
            .digest_done(
                id,
                message_id,
                rendered,
                members,
                all_decided,
                next_attempt_ms,
            )
            .await
    }

    pub async fn digest_retry_later(
        &self,
        id: Uuid,
        attempts: i64,
        next_attempt_ms: i64,
        forget_message: bool,
    ) -> StoreResult<()> {
        self.store
            .digest_retry_later(id, attempts, next_attempt_ms, forget_message)
            .await
    }

    /// A bulk action on the first `shown` requests of digest `id`: one
    /// [`Gateway::vote`] each, with the voter's rights (`is_admin`) and
    /// `self_user` (the voter's user id when self-approval is not allowed:
    /// a request made on their behalf is refused to them, as on a card).
    /// Requests decided meanwhile are skipped and counted. An error stops
    /// the action: the rest stay pending (they time out as denials) and the
    /// report says how many were decided. `Err` only when the digest cannot
    /// be read at all (nothing was decided).
    #[allow(clippy::too_many_arguments)]
    pub async fn digest_bulk(
        &self,
        id: Uuid,
        shown_count: u32,
        voter: &str,
        name: Option<String>,
        approve: bool,
        is_admin: bool,
        self_user: Option<&str>,
    ) -> Result<(BulkReport, bool), AppError> {
        let members = shown(self.store.digest_members(id).await?, shown_count);
        let mut report = BulkReport::default();
        let total = members.len() as u32;
        let mut done = 0u32;
        for r in members {
            done += 1;
            if r.state.is_terminal() {
                report.add(BulkStep::AlreadyDecided);
                continue;
            }
            if approve && self_user.is_some() && r.user_id.as_deref() == self_user {
                report.add(BulkStep::Refused);
                continue;
            }
            let step = match self
                .vote(r.id, voter, name.clone(), approve, None, is_admin)
                .await
            {
                Ok(v) if v.request.state.is_terminal() => BulkStep::Decided,
                Ok(_) => BulkStep::Counted,
                Err(AppError::AlreadyDecided(_)) => BulkStep::AlreadyDecided,
                Err(
                    AppError::AdminOnly | AppError::SelfApproval(_) | AppError::AlreadyVoted(_),
                ) => BulkStep::Refused,
                Err(e) => {
                    tracing::error!(digest.id = %id, request.id = %r.id, error = %e, "bulk action stopped");
                    report.left = total - done + 1;
                    return Ok((report, true));
                }
            };
            report.add(step);
        }
        Ok((report, false))
    }
}
