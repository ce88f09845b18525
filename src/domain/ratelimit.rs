//! Token buckets and per-task budgets. Time is a parameter (milliseconds).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// A rate such as `60/min`: `count` tokens refilled evenly over `per_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    pub count: u32,
    pub per_ms: u64,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a rate (expected e.g. `60/min`, `10/s`, `1000/hour`)");
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per_ms = match unit.trim() {
            "s" | "sec" | "second" => 1_000,
            "m" | "min" | "minute" => 60_000,
            "h" | "hour" => 3_600_000,
            "d" | "day" => 86_400_000,
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!("`{s}`: a rate must allow at least 1 call"));
        }
        Ok(Rate { count, per_ms })
    }
}

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> String {
        r.to_string()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per_ms {
            1_000 => "s",
            60_000 => "min",
            3_600_000 => "hour",
            86_400_000 => "day",
            _ => return write!(f, "{}/{}ms", self.count, self.per_ms),
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

/// A token bucket: holds up to `count` tokens, refilled continuously.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last_ms: i64,
}

/// Rate-limit state for many keys (agents or users).
#[derive(Debug, Default)]
pub struct Buckets {
    buckets: HashMap<String, Bucket>,
}

impl Buckets {
    /// Takes one token for `key` at `now_ms`; `false` when the bucket is empty.
    /// With `dry_run`, answers without taking.
    pub fn take(&mut self, key: &str, rate: Rate, now_ms: i64, dry_run: bool) -> bool {
        let cap = f64::from(rate.count);
        let b = self.buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: cap,
            last_ms: now_ms,
        });
        let elapsed = (now_ms - b.last_ms).max(0) as f64;
        let tokens = (b.tokens + elapsed * cap / rate.per_ms as f64).min(cap);
        let ok = tokens >= 1.0;
        if !dry_run {
            b.tokens = if ok { tokens - 1.0 } else { tokens };
            b.last_ms = now_ms.max(b.last_ms);
        }
        ok
    }

    /// Drops buckets that are full again, so memory stays bounded by the
    /// number of keys active within one refill period.
    pub fn prune(&mut self, rate: Rate, now_ms: i64) {
        self.buckets
            .retain(|_, b| (now_ms - b.last_ms) < rate.per_ms as i64);
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Steps and cost used so far by one task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskUsage {
    pub steps: u64,
    pub cost: f64,
}

/// Why a task may not take another step.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetExceeded {
    Steps { used: u64, max: u64 },
    Cost { used: f64, adding: f64, max: f64 },
}

/// Checks one more step of `cost` against the limits (`None` = unlimited).
pub fn check_budget(
    usage: &TaskUsage,
    cost: f64,
    max_steps: Option<u64>,
    max_cost: Option<f64>,
) -> Result<(), BudgetExceeded> {
    if let Some(max) = max_steps {
        if usage.steps >= max {
            return Err(BudgetExceeded::Steps {
                used: usage.steps,
                max,
            });
        }
    }
    if let Some(max) = max_cost {
        if usage.cost + cost > max {
            return Err(BudgetExceeded::Cost {
                used: usage.cost,
                adding: cost,
                max,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!(
            "60/min".parse::<Rate>().unwrap(),
            Rate {
                count: 60,
                per_ms: 60_000
            }
        );
        assert_eq!("10/s".parse::<Rate>().unwrap().per_ms, 1_000);
        assert!("0/min".parse::<Rate>().is_err());
        assert!("60 per minute".parse::<Rate>().is_err());
        assert!("60/fortnight".parse::<Rate>().is_err());
    }

    #[test]
    fn bucket_allows_burst_then_refills() {
        let rate: Rate = "3/s".parse().unwrap();
        let mut b = Buckets::default();
        assert!(b.take("a", rate, 0, false));
        assert!(b.take("a", rate, 0, false));
        assert!(b.take("a", rate, 0, false));
        assert!(!b.take("a", rate, 0, false));
        // Another key has its own bucket.
        assert!(b.take("b", rate, 0, false));
        // One token every 333 ms.
        assert!(!b.take("a", rate, 300, false));
        assert!(b.take("a", rate, 340, false));
    }

    #[test]
    fn dry_run_does_not_consume() {
        let rate: Rate = "1/s".parse().unwrap();
        let mut b = Buckets::default();
        assert!(b.take("a", rate, 0, true));
        assert!(b.take("a", rate, 0, true));
        assert!(b.take("a", rate, 0, false));
        assert!(!b.take("a", rate, 0, true));
    }

    #[test]
    fn prune_forgets_idle_keys() {
        let rate: Rate = "1/s".parse().unwrap();
        let mut b = Buckets::default();
        b.take("a", rate, 0, false);
        b.prune(rate, 500);
        assert_eq!(b.len(), 1);
        b.prune(rate, 1_000);
        assert!(b.is_empty());
    }

    #[test]
    fn budget_limits_steps_and_cost() {
        let used = TaskUsage {
            steps: 2,
            cost: 1.5,
        };
        assert!(check_budget(&used, 0.4, Some(3), Some(2.0)).is_ok());
        assert_eq!(
            check_budget(&used, 0.0, Some(2), None),
            Err(BudgetExceeded::Steps { used: 2, max: 2 })
        );
        assert!(matches!(
            check_budget(&used, 0.6, None, Some(2.0)),
            Err(BudgetExceeded::Cost { .. })
        ));
        assert!(check_budget(&used, 1e9, None, None).is_ok());
    }
}
