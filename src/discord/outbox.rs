//! The card outbox worker: posts and edits approval cards from the durable
//! `discord_cards` table, one at a time, oldest deadline first.
//!
//! A card is rendered from the request as stored (never from what a click
//! assumed). A post's message id is recorded before the next card is
//! touched, so a card is never posted twice; every failure is retried with
//! backoff (a 429 waits its `retry_after`), and a restart resumes where the
//! table says. Imports no serenity: the REST calls are in [`super::rest`].

use super::card::{self, CardSettings};
use super::rest::{Rest, RestError};
use crate::app::{now_ms, Gateway};
use crate::store::CardRow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Tries within one pass before a card is put back with a later retry time.
const INLINE_TRIES: u32 = 5;
/// Longest wait between retries of one card.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub struct Outbox {
    pub gw: Arc<Gateway>,
    pub rest: Rest,
    pub settings: CardSettings,
    pub wake: Arc<Notify>,
}

/// Exponential backoff: 250 ms, 500 ms, 1 s, … capped at [`MAX_BACKOFF`].
pub fn backoff(attempt: u32) -> Duration {
    let ms = 250u64.saturating_mul(1u64 << attempt.min(20));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}

impl Outbox {
    /// Runs until `stop` is cancelled. Unfinished cards stay in the table.
    pub async fn run(self, stop: CancellationToken) {
        let store = self.gw.store().clone();
        loop {
            if stop.is_cancelled() {
                break;
            }
            let due = match store.cards_due(now_ms(), 64).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the card outbox; retrying");
                    if sleep_or_stop(Duration::from_secs(1), &stop).await {
                        break;
                    }
                    continue;
                }
            };
            if !due.is_empty() {
                for c in due {
                    if stop.is_cancelled() {
                        break;
                    }
                    self.deliver(c, &stop).await;
                }
                continue;
            }
            let wait = match store.card_next_attempt().await {
                Ok(Some(at)) => Duration::from_millis((at - now_ms()).clamp(1, 60_000) as u64),
                _ => Duration::from_secs(60),
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn deliver(&self, mut c: CardRow, stop: &CancellationToken) {
        let store = self.gw.store();
        let req = match self.gw.status(c.request_id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(request.id = %c.request_id, error = %e, "cannot load the request of a card");
                self.later(&c, c.attempts + 1).await;
                return;
            }
        };
        // Who approved so far, for cards that need several approvals.
        let approvers: Vec<String> = if req.approvals_required > 1 && !req.state.is_terminal() {
            match store.votes(req.id).await {
                Ok(v) => v
                    .iter()
                    .filter(|v| v.approve)
                    .map(|v| v.display())
                    .collect(),
                Err(e) => {
                    tracing::warn!(request.id = %req.id, error = %e, "cannot load votes for a card");
                    vec![]
                }
            }
        } else {
            vec![]
        };
        let mut tries = 0;
        loop {
            let result = match c.message_id {
                None => {
                    let r = card::render_with_votes(&req, &self.settings, true, &approvers);
                    self.rest.post_message(c.channel_id, &r).await
                }
                Some(m) => {
                    let r = card::render_with_votes(&req, &self.settings, false, &approvers);
                    self.rest
                        .edit_message(c.channel_id, m, &r.payload)
                        .await
                        .map(|_| m)
                }
            };
            let wait = match result {
                Ok(message_id) => {
                    if c.message_id.is_none() {
                        tracing::info!(request.id = %req.id, message.id = message_id, "card posted");
                    } else {
                        tracing::debug!(request.id = %req.id, state = %req.state, "card edited");
                    }
                    // The message exists now: record it before anything else,
                    // retrying, so it is never posted again.
                    let mut n = 0;
                    while let Err(e) = store
                        .card_done(c.request_id, message_id, c.want, req.state.as_str().into())
                        .await
                    {
                        tracing::error!(request.id = %req.id, error = %e, "cannot record the card; retrying");
                        n += 1;
                        if sleep_or_stop(backoff(n), stop).await {
                            return;
                        }
                    }
                    return;
                }
                Err(RestError::RateLimited(d)) => {
                    tracing::warn!(request.id = %req.id, retry_after = ?d, "Discord rate limit; waiting");
                    d.min(MAX_BACKOFF)
                }
                Err(RestError::UnknownMessage) => {
                    tracing::warn!(request.id = %req.id, "the card was deleted; posting it again");
                    c.message_id = None;
                    continue;
                }
                Err(RestError::Temporary(e)) => {
                    tracing::warn!(request.id = %req.id, error = %e, "card delivery failed; will retry");
                    backoff(tries)
                }
                Err(RestError::Refused(status, e)) => {
                    tracing::error!(request.id = %req.id, status, error = %e, "Discord refused the card; will retry later");
                    self.later(&c, c.attempts + 1).await;
                    return;
                }
            };
            tries += 1;
            if tries >= INLINE_TRIES {
                self.later(&c, c.attempts + i64::from(tries)).await;
                return;
            }
            if sleep_or_stop(wait, stop).await {
                return;
            }
        }
    }

    async fn later(&self, c: &CardRow, attempts: i64) {
        let at = now_ms() + backoff(attempts.clamp(0, 30) as u32).as_millis() as i64;
        if let Err(e) = self
            .gw
            .store()
            .card_retry_later(c.request_id, attempts, at)
            .await
        {
            tracing::error!(request.id = %c.request_id, error = %e, "cannot record a card retry");
        }
    }
}

/// Sleeps; `true` when stopped meanwhile.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(30), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
