//! Durable deadlines: one ordered timer structure for every pending request.
//!
//! Deadlines live in the database; this keeps them in a `BTreeSet` ordered
//! by time and sleeps until the earliest. At start it loads every pending
//! deadline, so overdue requests time out at once and the rest keep theirs.

use super::Gateway;
use crate::domain::request::RequestId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How many expiries run at once (they are group-committed together).
const PARALLEL_EXPIRIES: usize = 256;

/// Runs until `stop` is cancelled.
pub async fn run(
    gw: Arc<Gateway>,
    mut adds: mpsc::Receiver<(i64, RequestId)>,
    stop: CancellationToken,
) {
    let mut due: BTreeSet<(i64, RequestId)> = BTreeSet::new();
    let mut loaded = false;
    let mut running = JoinSet::new();
    loop {
        if !loaded {
            match gw.store().pending_deadlines().await {
                Ok(list) => {
                    tracing::info!(pending = list.len(), "loaded pending deadlines");
                    due.extend(list.into_iter().map(|(id, d)| (d, id)));
                    loaded = true;
                }
                // Without the list nothing would time out: retry every second.
                Err(e) => tracing::error!(error = %e, "cannot load pending deadlines; retrying"),
            }
        }
        let now = super::now_ms();
        while running.len() < PARALLEL_EXPIRIES {
            let Some(&(deadline, id)) = due.first() else {
                break;
            };
            if deadline > now {
                break;
            }
            due.pop_first();
            let gw = gw.clone();
            running.spawn(async move {
                match gw.expire(id).await {
                    Ok(()) => None,
                    Err(super::AppError::Store(e)) if !e.is_retryable() => {
                        // Retrying cannot help (read-only, full, corrupt):
                        // the request stays pending, which allows nothing.
                        tracing::error!(request.id = %id, error = %e, "timeout failed; not retried");
                        None
                    }
                    Err(e) => {
                        tracing::error!(request.id = %id, error = %e, "timeout failed; will retry");
                        Some((deadline, id))
                    }
                }
            });
        }
        let wait = match due.first() {
            Some((d, _)) if running.len() < PARALLEL_EXPIRIES => {
                Duration::from_millis((d - now).clamp(0, 60_000) as u64)
            }
            _ if !loaded => Duration::from_secs(1),
            _ => Duration::from_secs(60),
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            add = adds.recv() => match add {
                Some((d, id)) => { due.insert((d, id)); }
                None => break,
            },
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok(Some((d, id))) = done {
                    // Retry a failed timeout a second later (the store was down).
                    due.insert((d.max(super::now_ms() + 1000), id));
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
    running.shutdown().await;
}
