//! Agents blocked on a request, woken the moment its decision commits (by
//! the follower of the change feed, see `follow`).

use crate::domain::request::{ApprovalRequest, RequestId};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::oneshot;

/// Registered waiters per request. A waiter registers *before* it reads the
/// request's state, so a decision between the two cannot be missed.
#[derive(Default)]
pub struct Waiters {
    inner: Mutex<HashMap<RequestId, Vec<oneshot::Sender<ApprovalRequest>>>>,
}

impl Waiters {
    pub fn register(&self, id: RequestId) -> oneshot::Receiver<ApprovalRequest> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(id).or_default();
        // Waiters whose agent went away are dropped here, so the list stays bounded.
        list.retain(|w| !w.is_closed());
        list.push(tx);
        rx
    }

    /// How many agents wait, on any request.
    pub fn count(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|l| l.iter().filter(|w| !w.is_closed()).count())
            .sum()
    }

    /// The requests someone waits on (to re-read after missed changes).
    pub fn ids(&self) -> Vec<RequestId> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Wakes everyone waiting on `req` with its terminal state.
    pub fn wake(&self, req: &ApprovalRequest) {
        let list = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req.id);
        for w in list.into_iter().flatten() {
            let _ = w.send(req.clone());
        }
    }
}
