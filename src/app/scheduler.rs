//! Durable deadlines: pending requests are timed out at their deadline,
//! whoever created them.
//!
//! Deadlines live in the database. The scheduler sweeps the due ones from
//! the store's pending-deadline index (a bounded batch at a time, never a
//! full scan), times them out a few hundred at once (their timeouts are
//! group-committed together), then sleeps until the earliest deadline still
//! pending, or until the change feed says a request was queued with an
//! earlier one. A missed change (`Lagged`) only means a sweep now. So a
//! restart, or a request created by another process on the same database,
//! needs nothing loaded in memory: the next sweep finds it. A timer (at most
//! a minute) sweeps anyway, so a lost notification strands nobody.

use super::ports::Change;
use super::Gateway;
use crate::domain::request::RequestId;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How many expiries run at once (they are group-committed together).
const PARALLEL_EXPIRIES: usize = 256;
/// Due deadlines read per sweep.
const SWEEP_BATCH: u32 = 4096;
/// The longest sleep without a sweep.
const MAX_SLEEP_MS: i64 = 60_000;
/// Pause before sweeping again after the store failed.
const RETRY_MS: i64 = 1000;
/// The same after an error that retrying soon cannot fix (read-only, full,
/// corrupt), so a broken store is not hammered.
const REFUSED_RETRY_MS: i64 = 30_000;
/// `sweep_at` while a batch is being timed out.
const AFTER_BATCH: i64 = i64::MAX;

/// Runs until `stop` is cancelled.
pub async fn run(gw: Arc<Gateway>, stop: CancellationToken) {
    // Subscribed before the first sweep, so nothing queued meanwhile is missed.
    let mut changes = gw.store.subscribe();
    let mut queue: VecDeque<RequestId> = VecDeque::new();
    let mut in_flight: HashSet<RequestId> = HashSet::new();
    let mut running = JoinSet::new();
    // When to sweep next (epoch ms). `AFTER_BATCH`: once the timeouts
    // taken so far are done (sweeping earlier would read them again).
    let mut sweep_at = i64::MIN;
    loop {
        let now = super::now_ms();
        if queue.is_empty() && now >= sweep_at {
            match sweep(&gw, now, &in_flight).await {
                Ok(due) => {
                    queue.extend(due);
                    sweep_at = if !queue.is_empty() || !in_flight.is_empty() {
                        AFTER_BATCH
                    } else {
                        match gw.store.next_deadline().await {
                            Ok(Some(d)) => d.min(now + MAX_SLEEP_MS),
                            Ok(None) => now + MAX_SLEEP_MS,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot read the next deadline; retrying");
                                now + RETRY_MS
                            }
                        }
                    };
                }
                // Nothing would time out: retry every second.
                Err(e) => {
                    tracing::error!(error = %e, "cannot read due deadlines; retrying");
                    sweep_at = now + RETRY_MS;
                }
            }
        }
        while running.len() < PARALLEL_EXPIRIES {
            let Some(id) = queue.pop_front() else { break };
            in_flight.insert(id);
            let gw = gw.clone();
            running.spawn(async move {
                match gw.expire(id).await {
                    Ok(()) => (id, None),
                    Err(super::AppError::Store(e)) if !e.is_retryable() => {
                        // Retrying soon cannot help (read-only, full, corrupt):
                        // the request stays pending, which allows nothing.
                        tracing::error!(request.id = %id, error = %e, "timeout failed; the store refuses it, trying again in 30 s");
                        (id, Some(REFUSED_RETRY_MS))
                    }
                    Err(e) => {
                        tracing::error!(request.id = %id, error = %e, "timeout failed; will retry");
                        (id, Some(RETRY_MS))
                    }
                }
            });
        }
        let wait = if sweep_at == AFTER_BATCH {
            MAX_SLEEP_MS
        } else {
            sweep_at
                .saturating_sub(super::now_ms())
                .clamp(0, MAX_SLEEP_MS)
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            change = changes.recv() => match change {
                Ok(Change::Queued { deadline_ms, .. }) if sweep_at != AFTER_BATCH => {
                    sweep_at = sweep_at.min(deadline_ms);
                }
                Ok(Change::Resync) if sweep_at != AFTER_BATCH => sweep_at = super::now_ms(),
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "change feed lagged; sweeping due deadlines");
                    if sweep_at != AFTER_BATCH {
                        sweep_at = super::now_ms();
                    }
                }
                // The store is gone.
                Err(RecvError::Closed) => break,
            },
            Some(done) = running.join_next(), if !running.is_empty() => {
                let retry = match done {
                    Ok((id, retry)) => {
                        in_flight.remove(&id);
                        retry
                    }
                    Err(_) => Some(RETRY_MS),
                };
                if let Some(pause) = retry {
                    // The store failed: the next sweep finds it, after `pause`.
                    let at = super::now_ms() + pause;
                    sweep_at = if sweep_at == AFTER_BATCH { at } else { sweep_at.min(at) };
                } else if sweep_at == AFTER_BATCH && queue.is_empty() {
                    sweep_at = super::now_ms();
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {
                if sweep_at == AFTER_BATCH && running.is_empty() {
                    sweep_at = super::now_ms();
                }
            }
        }
    }
    running.shutdown().await;
}

/// The due deadlines not already being timed out.
async fn sweep(
    gw: &Gateway,
    now: i64,
    in_flight: &HashSet<RequestId>,
) -> Result<Vec<RequestId>, super::ports::StoreError> {
    // Those being timed out are still pending until their write commits.
    let limit = SWEEP_BATCH + in_flight.len() as u32;
    Ok(gw
        .store
        .due_deadlines(now, limit)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !in_flight.contains(id))
        .collect())
}
