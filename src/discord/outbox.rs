//! The card outbox worker: posts and edits approval cards from the durable
//! `discord_cards` table, one at a time, oldest deadline first.
//!
//! A card is rendered from the request as stored (never from what a click
//! assumed), with, for a run-tool request, its run as the registry has it.
//! A post's message id is recorded before the next card is touched, so a
//! card is never posted twice; a restart resumes where the table says. Pacing within Discord's rate limits is done by [`super::rest`].
//!
//! When Discord fails (network error, 5xx) the whole outbox pauses, not the
//! one card: the pause grows per failed pass (not per card try), is bounded
//! by `max_pause` and by a fraction of the oldest card's remaining deadline,
//! and the next pass starts again with the oldest deadline, so an outage
//! never reorders cards. The first success after failures makes every
//! waiting card due at once. Imports no serenity.

use super::card::{self, CardSettings};
use super::rest::{Rest, RestError};
use crate::app::connection::ConnectionStatus;
use crate::app::ports::CardRow;
use crate::app::{now_ms, Gateway};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Default longest pause of a card that waits for Discord.
pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(10);
/// Cards read at a time: the table is read again before every call, so a
/// card queued meanwhile with an older deadline goes next, even in a flood.
const PASS: u32 = 1;
/// Shortest pause after a failure.
const MIN_PAUSE: Duration = Duration::from_millis(100);

pub struct Outbox {
    pub gw: Arc<Gateway>,
    pub rest: Rest,
    pub settings: CardSettings,
    pub wake: Arc<Notify>,
    pub status: ConnectionStatus,
    /// The longest a waiting card is left alone ([`DEFAULT_MAX_PAUSE`]).
    pub max_pause: Duration,
    /// Flood digests, stepped before each card ([`super::digest`]).
    pub digests: Option<super::digest::DigestWorker>,
}

/// What one delivery attempt means for the outbox.
enum Outcome {
    /// Posted or edited, and recorded.
    Delivered,
    /// This card alone was refused and rescheduled.
    CardLater,
    /// Discord did not answer properly: pause the whole outbox.
    Outage,
    /// A rate limit: the next call waits in [`Rest`]; go on.
    Paced,
    /// Not posted: an open digest takes this request (next pass).
    ToDigest,
    Stopped,
}

/// Exponential backoff per failed pass: 250 ms, 500 ms, 1 s, … capped at
/// `max`, and at a quarter of the remaining deadline (never under
/// [`MIN_PAUSE`]) so a pending card is shown pending well before it expires.
pub fn pause(failed_passes: u32, max: Duration, remaining_ms: i64) -> Duration {
    let exp = 250u64.saturating_mul(1u64 << failed_passes.saturating_sub(1).min(20));
    let by_deadline = Duration::from_millis((remaining_ms.max(0) / 4) as u64);
    Duration::from_millis(exp)
        .min(max)
        .min(by_deadline)
        .max(MIN_PAUSE)
        .min(max.max(MIN_PAUSE))
}

impl Outbox {
    /// Runs until `stop` is cancelled. Unfinished cards stay in the table.
    pub async fn run(self, stop: CancellationToken) {
        let gw = &self.gw;
        let mut failed_passes: u32 = 0;
        loop {
            if stop.is_cancelled() {
                break;
            }
            // Digests first: waiting cards may move into one before any is posted.
            let (digest_worked, digest_next) = match &self.digests {
                Some(d) => match d.step().await {
                    super::digest::Step::Worked => (true, None),
                    super::digest::Step::Idle(next) => (false, next),
                },
                None => (false, None),
            };
            let due = match gw.cards_due(PASS).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the card outbox; retrying");
                    // A transient failure soon; anything else (corrupt,
                    // misconfigured) only slowly, so it does not spin.
                    let wait = if e.is_retryable() { 1 } else { 30 };
                    if sleep_or_stop(Duration::from_secs(wait), &stop).await {
                        break;
                    }
                    continue;
                }
            };
            if !due.is_empty() {
                for c in due {
                    if stop.is_cancelled() {
                        return;
                    }
                    let deadline_ms = c.deadline_ms;
                    match self.deliver(c, &stop).await {
                        Outcome::Delivered => {
                            if failed_passes > 0 {
                                failed_passes = 0;
                                tracing::warn!("Discord answers again; sending every waiting card");
                                if let Err(e) = gw.cards_retry_now().await {
                                    tracing::error!(error = %e, "cannot make waiting cards due");
                                }
                                // Start again from the oldest deadline.
                                break;
                            }
                        }
                        Outcome::CardLater => {}
                        Outcome::Paced | Outcome::ToDigest => break,
                        Outcome::Outage => {
                            failed_passes = failed_passes.saturating_add(1);
                            let p = pause(failed_passes, self.max_pause, deadline_ms - now_ms());
                            tracing::warn!(pause = ?p, failed_passes, "Discord is failing; card outbox paused");
                            if sleep_or_stop(p, &stop).await {
                                return;
                            }
                            break;
                        }
                        Outcome::Stopped => return,
                    }
                }
                continue;
            }
            if digest_worked {
                continue;
            }
            let next = match gw.card_next_attempt().await {
                Ok(Some(at)) => Some(at),
                _ => None,
            };
            let next = match (next, digest_next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = match next {
                Some(at) => Duration::from_millis((at - now_ms()).clamp(1, 60_000) as u64),
                None => Duration::from_secs(60),
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn deliver(&self, mut c: CardRow, stop: &CancellationToken) -> Outcome {
        let gw = &self.gw;
        let req = match self.gw.status(c.request_id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(request.id = %c.request_id, error = %e, "cannot load the request of a card");
                self.later(&c).await;
                return Outcome::CardLater;
            }
        };
        // Queued after the digest step looked: an open digest of its group
        // takes it rather than a card.
        if let (None, Some(d)) = (c.message_id, &self.digests) {
            if d.takes(&req).await {
                return Outcome::ToDigest;
            }
        }
        // Who approved so far, for cards that need several approvals.
        let approvers: Vec<String> = if req.approvals_required > 1 && !req.state.is_terminal() {
            match gw.votes(req.id).await {
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
        // A run-tool request's run, once started: a failure to load it
        // shows the card without it rather than hold the card back.
        let run = if req.run.is_some() {
            match gw.run_of_request(req.id).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(request.id = %req.id, error = %e, "cannot load the run of a card; rendering without it");
                    None
                }
            }
        } else {
            None
        };
        // The escalation steps fired, shown on the card (a failure to load
        // them shows the card without them rather than hold it back).
        let fired = gw.escalations_of(req.id).await.unwrap_or_else(|e| {
            tracing::warn!(request.id = %req.id, error = %e, "cannot load a card's escalations; rendering without them");
            vec![]
        });
        loop {
            let result = match c.message_id {
                None => {
                    let mut r =
                        card::render_card(&req, &self.settings, true, &approvers, run.as_ref());
                    super::escalation::show_on_card(&mut r.payload, &fired);
                    self.rest.post_message(c.channel_id, &r).await
                }
                Some(m) => {
                    let mut r =
                        card::render_card(&req, &self.settings, false, &approvers, run.as_ref());
                    super::escalation::show_on_card(&mut r.payload, &fired);
                    self.rest
                        .edit_message(c.channel_id, m, &r.payload)
                        .await
                        .map(|_| m)
                }
            };
            return match result {
                Ok(message_id) => {
                    self.status.connected(now_ms());
                    if c.message_id.is_none() {
                        tracing::info!(request.id = %req.id, message.id = message_id, "card posted");
                    } else {
                        tracing::debug!(request.id = %req.id, state = %req.state, "card edited");
                    }
                    // The message exists now: record it before anything else,
                    // retrying, so it is never posted again.
                    let mut n = 0;
                    while let Err(e) = gw
                        .card_done(c.request_id, message_id, c.want, req.state.as_str().into())
                        .await
                    {
                        // Never posted twice: nothing else is posted until
                        // this is recorded. An error that retrying soon
                        // cannot fix (read-only, disk full) is retried
                        // slowly, so the outbox resumes by itself once the
                        // store is writable again.
                        let longest = if e.is_retryable() {
                            tracing::error!(request.id = %req.id, error = %e, "cannot record the card; retrying");
                            Duration::from_secs(5)
                        } else {
                            tracing::error!(request.id = %req.id, error = %e, "CANNOT RECORD A POSTED CARD: the store refuses writes; the card outbox waits until it accepts them");
                            Duration::from_secs(30)
                        };
                        n += 1;
                        if sleep_or_stop(pause(n, longest, i64::MAX), stop).await {
                            return Outcome::Stopped;
                        }
                    }
                    Outcome::Delivered
                }
                Err(RestError::RateLimited(d)) => {
                    tracing::warn!(request.id = %req.id, retry_after = ?d, "Discord rate limit; pacing");
                    Outcome::Paced
                }
                Err(RestError::UnknownMessage) => {
                    tracing::warn!(request.id = %req.id, "the card was deleted; posting it again");
                    c.message_id = None;
                    continue;
                }
                Err(RestError::Temporary(e)) => {
                    tracing::warn!(request.id = %req.id, error = %e, "card delivery failed; will retry");
                    self.status.failing(now_ms(), format!("card delivery: {e}"));
                    Outcome::Outage
                }
                Err(RestError::Refused(status, e)) => {
                    tracing::error!(request.id = %req.id, status, error = %e, "Discord refused the card; will retry later");
                    self.status
                        .failing(now_ms(), format!("Discord refused a card (HTTP {status})"));
                    self.later(&c).await;
                    Outcome::CardLater
                }
            };
        }
    }

    /// Puts one card back with a bounded per-card backoff.
    async fn later(&self, c: &CardRow) {
        let attempts = c.attempts.saturating_add(1);
        let wait = pause(
            attempts.clamp(0, 30) as u32,
            self.max_pause,
            c.deadline_ms - now_ms(),
        );
        let at = now_ms() + wait.as_millis() as i64;
        if let Err(e) = self.gw.card_retry_later(c.request_id, attempts, at).await {
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

    const FAR: i64 = 1 << 40;

    #[test]
    fn pause_grows_per_pass_and_is_capped() {
        let max = DEFAULT_MAX_PAUSE;
        assert_eq!(pause(1, max, FAR), Duration::from_millis(250));
        assert_eq!(pause(3, max, FAR), Duration::from_secs(1));
        assert_eq!(pause(30, max, FAR), max);
        assert_eq!(pause(u32::MAX, max, FAR), max);
    }

    #[test]
    fn pause_stays_well_under_the_remaining_deadline() {
        let max = DEFAULT_MAX_PAUSE;
        // The case: 16 s into an outage with 254 s left the next
        // try was 226 s away; now it is at most 10 s.
        assert!(pause(7, max, 254_000) <= Duration::from_secs(10));
        assert_eq!(pause(30, max, 8_000), Duration::from_secs(2));
        assert_eq!(pause(30, max, 0), MIN_PAUSE);
        assert_eq!(pause(30, max, -5), MIN_PAUSE);
        assert_eq!(pause(30, Duration::from_millis(1), FAR), MIN_PAUSE);
    }
}
