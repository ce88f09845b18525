//! The state of an outside connection (Discord) as `serve` and a health
//! check see it: connected, or connecting since when and why, or stopped by
//! a permanent error. Written by the adapter that owns the connection, read
//! by anyone holding the [`ConnectionStatus`]; imports nothing but std.

use std::sync::{Arc, Mutex};

/// One snapshot of a connection's state. Times are epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Working; `since` is when it last became so.
    Connected { since_ms: i64 },
    /// Not working yet or any more; retried in the background.
    Connecting {
        since_ms: i64,
        last_error: Option<String>,
    },
    /// A permanent error (bad token, unknown channel…): not retried.
    Failed { since_ms: i64, error: String },
    /// Not connected on purpose: another process sharing the store leads
    /// and holds the connection. Not a fault.
    Standby { since_ms: i64 },
}

impl ConnectionState {
    /// Stable snake_case name for the socket and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            ConnectionState::Connected { .. } => "connected",
            ConnectionState::Connecting { .. } => "connecting",
            ConnectionState::Failed { .. } => "failed",
            ConnectionState::Standby { .. } => "standby",
        }
    }

    /// Every state's name, for metrics.
    pub const NAMES: [&'static str; 4] = ["connected", "connecting", "failed", "standby"];
}

/// A shared, cheaply cloned status cell.
#[derive(Debug, Clone)]
pub struct ConnectionStatus(Arc<Mutex<ConnectionState>>);

impl ConnectionStatus {
    /// Starts as connecting since `now_ms`.
    pub fn new(now_ms: i64) -> ConnectionStatus {
        ConnectionStatus(Arc::new(Mutex::new(ConnectionState::Connecting {
            since_ms: now_ms,
            last_error: None,
        })))
    }

    pub fn get(&self) -> ConnectionState {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Marks it working (keeps the first `since` of a working stretch).
    pub fn connected(&self, now_ms: i64) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*s, ConnectionState::Connected { .. }) {
            *s = ConnectionState::Connected { since_ms: now_ms };
        }
    }

    /// Marks it connecting afresh (the connection is being started), unless
    /// it already is.
    pub fn connecting(&self, now_ms: i64) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*s, ConnectionState::Connecting { .. }) {
            *s = ConnectionState::Connecting {
                since_ms: now_ms,
                last_error: None,
            };
        }
    }

    /// Marks it deliberately not connected: another process leads.
    pub fn standby(&self, now_ms: i64) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*s, ConnectionState::Standby { .. }) {
            *s = ConnectionState::Standby { since_ms: now_ms };
        }
    }

    /// Records a transient failure (keeps the first `since` of a failing stretch).
    pub fn failing(&self, now_ms: i64, error: impl Into<String>) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let since_ms = match &*s {
            ConnectionState::Connecting { since_ms, .. } => *since_ms,
            _ => now_ms,
        };
        *s = ConnectionState::Connecting {
            since_ms,
            last_error: Some(error.into()),
        };
    }

    /// Records a permanent failure.
    pub fn failed(&self, now_ms: i64, error: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = ConnectionState::Failed {
            since_ms: now_ms,
            error: error.into(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_stretch_keeps_its_start() {
        let s = ConnectionStatus::new(1);
        s.failing(5, "503");
        s.failing(9, "refused");
        assert_eq!(
            s.get(),
            ConnectionState::Connecting {
                since_ms: 1,
                last_error: Some("refused".into())
            }
        );
        s.connected(10);
        s.connected(12);
        assert_eq!(s.get(), ConnectionState::Connected { since_ms: 10 });
        s.failing(20, "503");
        assert_eq!(s.get().as_str(), "connecting");
        s.failed(30, "401");
        assert_eq!(s.get().as_str(), "failed");
        s.standby(40);
        s.standby(41);
        assert_eq!(s.get(), ConnectionState::Standby { since_ms: 40 });
        s.connecting(50);
        assert_eq!(
            s.get(),
            ConnectionState::Connecting {
                since_ms: 50,
                last_error: None
            }
        );
    }
}
