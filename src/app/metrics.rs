//! The metrics port: counters and histograms the app and the adapters
//! record into, read by whichever adapter exports them (the HTTP listener
//! in `crate::http`, Prometheus text). Plain atomics, no locks and no
//! allocation per call, so recording costs nothing measurable on the
//! submit path. Imports nothing but std and the domain.
//!
//! One process serves one gateway, so the metrics live in one static
//! ([`global`]), as with the `metrics` crate's recorder: the store's writer
//! thread and the socket server record without a handle being threaded
//! through every constructor.

use crate::domain::request::{ApprovalRequest, DecidedBy, State};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Terminal outcomes, in label order.
pub const OUTCOMES: [State; 4] = [
    State::Approved,
    State::Denied,
    State::TimedOut,
    State::Cancelled,
];
/// Who decided, in label order.
pub const DECIDERS: [DecidedBy; 4] = [
    DecidedBy::Policy,
    DecidedBy::Human,
    DecidedBy::Timeout,
    DecidedBy::Cancel,
];

/// Upper bounds (seconds) of the time-to-decision buckets (human decisions).
pub const DECISION_BOUNDS_S: [f64; 11] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 86400.0,
];
/// Upper bounds (seconds) of the commit-latency buckets (one group commit).
pub const COMMIT_BOUNDS_S: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The most buckets a histogram has (plus one for +Inf).
const MAX_BUCKETS: usize = 16;

/// A histogram over fixed bounds, counted in microseconds.
pub struct Histogram {
    bounds_s: &'static [f64],
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; MAX_BUCKETS],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// What an exporter reads of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_s: f64,
    pub count: u64,
    /// (upper bound in seconds, observations in this bucket alone); the last
    /// bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    const fn new(bounds_s: &'static [f64]) -> Histogram {
        assert!(bounds_s.len() < MAX_BUCKETS);
        Histogram {
            bounds_s,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation of `micros` microseconds.
    pub fn observe_micros(&self, micros: u64) {
        let s = micros as f64 / 1e6;
        let i = self
            .bounds_s
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(self.bounds_s.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets: Vec<(f64, u64)> = self
            .bounds_s
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, self.buckets[i].load(Relaxed)))
            .collect();
        buckets.push((
            f64::INFINITY,
            self.buckets[self.bounds_s.len()].load(Relaxed),
        ));
        HistogramSnapshot {
            sum_s: self.sum_micros.load(Relaxed) as f64 / 1e6,
            count: self.count.load(Relaxed),
            buckets,
        }
    }
}

/// Everything recorded as it happens. Gauges that are cheaper to read than
/// to track (pending requests, outbox backlog, Discord state) are read by
/// the exporter at scrape time instead.
pub struct Metrics {
    /// `[outcome][decider]`, indexed as [`OUTCOMES`] × [`DECIDERS`].
    decisions: [[AtomicU64; DECIDERS.len()]; OUTCOMES.len()],
    /// From creation to a person's deciding vote.
    pub time_to_decision: Histogram,
    /// One group commit of the store's writer.
    pub commit_latency: Histogram,
    /// Open connections: `[agent socket, admin socket]`.
    connections: [AtomicI64; 2],
}

static METRICS: Metrics = Metrics {
    decisions: [const { [const { AtomicU64::new(0) }; DECIDERS.len()] }; OUTCOMES.len()],
    time_to_decision: Histogram::new(&DECISION_BOUNDS_S),
    commit_latency: Histogram::new(&COMMIT_BOUNDS_S),
    connections: [const { AtomicI64::new(0) }; 2],
};

/// This process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Counts a request that reached its terminal state (once per request:
    /// called where the transition is stored, never for a replayed answer).
    pub fn decided(&self, r: &ApprovalRequest) {
        let (Some(o), Some(by)) = (
            OUTCOMES.iter().position(|s| *s == r.state),
            r.decided_by
                .and_then(|d| DECIDERS.iter().position(|x| *x == d)),
        ) else {
            return;
        };
        self.decisions[o][by].fetch_add(1, Relaxed);
        if r.decided_by == Some(DecidedBy::Human) {
            if let Some(at) = r.decided_ms {
                let ms = (at - r.created_ms).max(0) as u64;
                self.time_to_decision
                    .observe_micros(ms.saturating_mul(1000));
            }
        }
    }

    /// Decisions so far, as (outcome, decider, count) for every pair.
    pub fn decisions(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::with_capacity(OUTCOMES.len() * DECIDERS.len());
        for (o, outcome) in OUTCOMES.iter().enumerate() {
            for (d, by) in DECIDERS.iter().enumerate() {
                out.push((
                    outcome.as_str(),
                    by.as_str(),
                    self.decisions[o][d].load(Relaxed),
                ));
            }
        }
        out
    }

    /// Marks a connection open until the returned guard drops.
    pub fn connection(&'static self, admin_socket: bool) -> ConnectionGuard {
        let slot = &self.connections[usize::from(admin_socket)];
        slot.fetch_add(1, Relaxed);
        ConnectionGuard(slot)
    }

    /// Open connections on (agent socket, admin socket).
    pub fn connections(&self) -> (i64, i64) {
        (
            self.connections[0].load(Relaxed),
            self.connections[1].load(Relaxed),
        )
    }
}

/// Counts one open connection while it lives.
pub struct ConnectionGuard(&'static AtomicI64);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        static H: Histogram = Histogram::new(&COMMIT_BOUNDS_S);
        H.observe_micros(500); // 0.0005 s: on the first bound
        H.observe_micros(501);
        H.observe_micros(10_000_000); // 10 s: past the last bound
        let s = H.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.0005, 1));
        assert_eq!(s.buckets[1], (0.001, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.buckets.len(), COMMIT_BOUNDS_S.len() + 1);
        assert!((s.sum_s - 10.001001).abs() < 1e-9);
    }
}
