//! Following the store's change feed: what this process keeps in memory is
//! brought up to date from committed changes, whoever committed them.
//!
//! [`Gateway::new`] starts one task that follows
//! [`super::ports::Changes::subscribe`]:
//! - `Resolved` wakes the agents waiting on the request and counts the
//!   decision in the metrics, once per resolution this process made;
//!   `DecidedElsewhere` (another replica decided) only wakes them, so the
//!   replicas' metrics add up;
//! - `PolicyChanged` refreshes the policy view (through a second task, so a
//!   slow store never holds up waking waiters), and a pause new to this
//!   process cancels the pending requests it covers;
//! - on `Lagged` (changes were missed) or `Resync` (another process's changes
//!   may have been missed, or the periodic re-check of a shared store) every
//!   waiter re-reads its request and the policy view is refreshed.
//!
//! The deadline scheduler ([`super::scheduler`]) and the Discord outbox
//! follow the same feed on their own, because their lifetimes are `serve`'s.
//! The tasks hold the gateway weakly and end when it is dropped or the feed
//! closes. Imports no adapter.

use super::ports::Change;
use super::Gateway;
use crate::domain::request::ApprovalRequest;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, Notify};

/// First and longest pause between two failed policy refreshes.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Subscribes now (before anything is loaded, so nothing committed from
/// here on is missed) and starts the follower tasks.
pub(super) fn start(gw: &Arc<Gateway>) {
    let changes = gw.store.subscribe();
    let refresh = gw.policy_due.clone();
    tokio::spawn(follow(Arc::downgrade(gw), changes, refresh.clone()));
    tokio::spawn(refresh_policy(Arc::downgrade(gw), refresh));
}

async fn follow(gw: Weak<Gateway>, mut changes: broadcast::Receiver<Change>, policy: Arc<Notify>) {
    loop {
        let change = changes.recv().await;
        let Some(gw) = gw.upgrade() else { break };
        match change {
            Ok(Change::Resolved(r)) => gw.resolved(&r),
            Ok(Change::DecidedElsewhere(r)) => gw.waiters.wake(&r),
            Ok(Change::PolicyChanged) => policy.notify_one(),
            Ok(Change::KillRun { run_id }) => gw.kill_local(&run_id),
            Ok(Change::Queued { .. } | Change::Voted { .. } | Change::CardsDue) => {}
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "change feed lagged; re-reading waiters, pending counts and the policy"
                );
                policy.notify_one();
                gw.catch_up().await;
                gw.recheck_kills().await;
            }
            Ok(Change::Resync) => {
                policy.notify_one();
                gw.catch_up().await;
                gw.recheck_kills().await;
            }
            Err(RecvError::Closed) => break,
        }
    }
}

/// Refreshes the policy view when asked; while it is unavailable (the last
/// refresh failed, so every call is denied), retries with a growing pause.
async fn refresh_policy(gw: Weak<Gateway>, due: Arc<Notify>) {
    let mut pause = RETRY_FIRST;
    loop {
        let failing = match gw.upgrade() {
            Some(gw) => gw.policy_unavailable().is_some(),
            None => break,
        };
        if failing {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        } else {
            pause = RETRY_FIRST;
            // Looks again every second: a refresh made by a use-case (after
            // a local write) may have failed meanwhile, and the gateway may
            // be gone.
            if tokio::time::timeout(Duration::from_secs(1), due.notified())
                .await
                .is_err()
            {
                continue;
            }
        }
        let Some(gw) = gw.upgrade() else { break };
        // A failure is logged and marks the view unavailable.
        let before = gw.pauses_in_view();
        if gw.refresh_policy().await.is_ok() {
            // A pause made elsewhere (another process sharing the store):
            // its sweep there may have missed a request this process was
            // storing meanwhile, so this process sweeps too.
            gw.sweep_new_pauses(&before).await;
        }
    }
}

impl Gateway {
    /// What follows a request's resolution, once per resolution: metrics
    /// and the agents waiting on it.
    fn resolved(&self, r: &ApprovalRequest) {
        super::metrics::global().decided(r);
        self.waiters.wake(r);
    }

    /// After missed changes: every waiter re-reads its request (and is woken
    /// if it is decided).
    async fn catch_up(&self) {
        let ids = self.waiters.ids();
        for chunk in ids.chunks(1000) {
            match self.store.decided_among(chunk).await {
                Ok(decided) => decided.iter().for_each(|r| self.waiters.wake(r)),
                // The waiters still wake at their deadline (plus a grace).
                Err(e) => {
                    tracing::error!(waiters = chunk.len(), error = %e, "cannot re-read waited-on requests")
                }
            }
        }
    }
}
