//! Usage statistics over a window of requests (`/stats`, `keyturn stats`):
//! calls by outcome, by tool and by agent, time to decision (overall and
//! per approver), timeouts, calls approved by each policy rule, and the
//! most denied tools.
//!
//! Pure: the rows and the window's end (`until_ms`) are parameters; no
//! clock, no I/O. Imports only the request types of the domain.

use super::request::{DecidedBy, State};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The most rows a report reads; a busier window is cut to its newest
/// rows and the report says so ([`StatsReport::truncated`]).
pub const MAX_ROWS: usize = 100_000;
/// How many tools [`StatsReport::top_denied_tools`] lists.
pub const TOP_DENIED: usize = 10;
/// The most tools, agents, approvers or rules one list holds; the rest are
/// counted in the list's `*_omitted` field.
pub const MAX_LISTED: usize = 100;
/// The longest window a report covers.
pub const MAX_WINDOW_SECS: u64 = 366 * 86_400;
/// The window when none is given: the last 24 hours.
pub const DEFAULT_WINDOW_SECS: u64 = 86_400;

/// What a report needs of one request, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub state: State,
    pub decided_by: Option<DecidedBy>,
    /// Approvers joined by `", "` (names never hold a comma), the denier,
    /// or the canceller.
    pub decided_who: Option<String>,
    pub tool: String,
    pub agent: String,
    /// The policy rule that decided or asked.
    pub rule: String,
    pub created_ms: i64,
    pub decided_ms: Option<i64>,
}

/// Calls by outcome. A terminal request decided by anyone but the policy
/// (or with no decider recorded) counts as decided by a human.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    pub approved_by_policy: u64,
    pub approved_by_human: u64,
    pub denied_by_policy: u64,
    pub denied_by_human: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    pub pending: u64,
}

/// The outcome a call counts under, in [`Outcomes`]' field order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    ApprovedByPolicy,
    ApprovedByHuman,
    DeniedByPolicy,
    DeniedByHuman,
    TimedOut,
    Cancelled,
    Pending,
}

impl Outcome {
    /// Every outcome, in display order.
    pub const ALL: [Outcome; 7] = [
        Outcome::ApprovedByPolicy,
        Outcome::ApprovedByHuman,
        Outcome::DeniedByPolicy,
        Outcome::DeniedByHuman,
        Outcome::TimedOut,
        Outcome::Cancelled,
        Outcome::Pending,
    ];

    /// The outcome of a request in `state`, decided by `by`.
    pub fn of(state: State, by: Option<DecidedBy>) -> Outcome {
        let policy = by == Some(DecidedBy::Policy);
        match state {
            State::Approved if policy => Outcome::ApprovedByPolicy,
            State::Approved => Outcome::ApprovedByHuman,
            State::Denied if policy => Outcome::DeniedByPolicy,
            State::Denied => Outcome::DeniedByHuman,
            State::TimedOut => Outcome::TimedOut,
            State::Cancelled => Outcome::Cancelled,
            State::Pending => Outcome::Pending,
        }
    }

    /// The field name in [`Outcomes`], e.g. `approved_by_policy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::ApprovedByPolicy => "approved_by_policy",
            Outcome::ApprovedByHuman => "approved_by_human",
            Outcome::DeniedByPolicy => "denied_by_policy",
            Outcome::DeniedByHuman => "denied_by_human",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::Pending => "pending",
        }
    }

    /// Words for people, e.g. `approved by policy`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::ApprovedByPolicy => "approved by policy",
            Outcome::ApprovedByHuman => "approved by a human",
            Outcome::DeniedByPolicy => "denied by policy",
            Outcome::DeniedByHuman => "denied by a human",
            Outcome::TimedOut => "timed out",
            Outcome::Cancelled => "cancelled",
            Outcome::Pending => "pending",
        }
    }
}

impl Outcomes {
    fn add(&mut self, o: Outcome) {
        *self.slot(o) += 1;
    }

    fn slot(&mut self, o: Outcome) -> &mut u64 {
        match o {
            Outcome::ApprovedByPolicy => &mut self.approved_by_policy,
            Outcome::ApprovedByHuman => &mut self.approved_by_human,
            Outcome::DeniedByPolicy => &mut self.denied_by_policy,
            Outcome::DeniedByHuman => &mut self.denied_by_human,
            Outcome::TimedOut => &mut self.timed_out,
            Outcome::Cancelled => &mut self.cancelled,
            Outcome::Pending => &mut self.pending,
        }
    }

    /// The count of one outcome.
    pub fn get(&self, o: Outcome) -> u64 {
        match o {
            Outcome::ApprovedByPolicy => self.approved_by_policy,
            Outcome::ApprovedByHuman => self.approved_by_human,
            Outcome::DeniedByPolicy => self.denied_by_policy,
            Outcome::DeniedByHuman => self.denied_by_human,
            Outcome::TimedOut => self.timed_out,
            Outcome::Cancelled => self.cancelled,
            Outcome::Pending => self.pending,
        }
    }

    /// Every call counted.
    pub fn total(&self) -> u64 {
        Outcome::ALL.iter().map(|o| self.get(*o)).sum()
    }
}

/// Calls of one tool or one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedOutcomes {
    pub name: String,
    pub total: u64,
    #[serde(flatten)]
    pub outcomes: Outcomes,
}

/// Time from a request's creation to its decision, in milliseconds,
/// nearest-rank percentiles (see [`nearest_rank`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Decisions measured.
    pub count: u64,
    pub p50_ms: i64,
    pub p90_ms: i64,
}

/// One approver's decisions (as named in `decided_who`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproverStats {
    pub approver: String,
    /// Requests this approver's vote approved (with the others', when
    /// several approvals were needed).
    pub approved: u64,
    pub denied: u64,
    pub time_to_decision: Latency,
}

/// A count under a name (a rule, a tool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedCount {
    pub name: String,
    pub calls: u64,
}

/// Everything `/stats` and `keyturn stats` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// The window: requests created in `[since_ms, until_ms]`.
    pub since_ms: i64,
    pub until_ms: i64,
    /// The window held more than [`MAX_ROWS`] requests: only the newest
    /// were counted.
    pub truncated: bool,
    pub total: u64,
    pub outcomes: Outcomes,
    /// Most calls first, then by name.
    pub by_tool: Vec<NamedOutcomes>,
    pub by_tool_omitted: u64,
    pub by_agent: Vec<NamedOutcomes>,
    pub by_agent_omitted: u64,
    /// Over requests decided by humans (approved or denied), one sample
    /// each; `None` when there were none.
    pub time_to_decision: Option<Latency>,
    /// Most decisions first, then by name.
    pub by_approver: Vec<ApproverStats>,
    pub by_approver_omitted: u64,
    /// Requests nobody decided before their deadline.
    pub timeouts: u64,
    /// Calls approved by the policy, per rule that allowed them (a grant
    /// shows as the rule it matched under). Most calls first.
    pub grants_used: Vec<NamedCount>,
    pub grants_used_omitted: u64,
    /// The [`TOP_DENIED`] tools denied most (by policy or human), most
    /// first, then by name.
    pub top_denied_tools: Vec<NamedCount>,
}

/// The nearest-rank percentile `p` (1..=100) of `sorted` (ascending): the
/// value at 1-based rank `ceil(p / 100 × n)`. `None` for no values. For
/// `[1, 2, 3, 4]`, p50 is 2 (rank 2) and p90 is 4 (rank ceil(3.6) = 4).
pub fn nearest_rank(sorted: &[i64], p: u32) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u64;
    let p = u64::from(p.clamp(1, 100));
    // ceil(p * n / 100) in integers, at least rank 1.
    let rank = (p * n).div_ceil(100).max(1);
    sorted.get((rank - 1) as usize).copied()
}

fn latency(mut samples: Vec<i64>) -> Option<Latency> {
    samples.sort_unstable();
    Some(Latency {
        count: samples.len() as u64,
        p50_ms: nearest_rank(&samples, 50)?,
        p90_ms: nearest_rank(&samples, 90)?,
    })
}

/// Sorts `(name, count)` most first then by name, and keeps [`MAX_LISTED`]
/// (or `keep`); returns the kept ones and how many were left out.
fn ranked<T>(
    map: BTreeMap<String, T>,
    count: impl Fn(&T) -> u64,
    keep: usize,
) -> (Vec<(String, T)>, u64) {
    let mut v: Vec<(String, T)> = map.into_iter().collect();
    // BTreeMap order is by name; a stable sort by count keeps it for ties.
    v.sort_by_key(|(_, t)| std::cmp::Reverse(count(t)));
    let omitted = v.len().saturating_sub(keep) as u64;
    v.truncate(keep);
    (v, omitted)
}

/// Computes the report over the requests created in `[since_ms, until_ms]`
/// among `records` (others are ignored). `truncated` says the caller cut
/// the rows at [`MAX_ROWS`].
pub fn compute(
    records: &[CallRecord],
    since_ms: i64,
    until_ms: i64,
    truncated: bool,
) -> StatsReport {
    let mut outcomes = Outcomes::default();
    let mut tools: BTreeMap<String, Outcomes> = BTreeMap::new();
    let mut agents: BTreeMap<String, Outcomes> = BTreeMap::new();
    let mut human_ms = Vec::new();
    let mut approvers: BTreeMap<String, (u64, u64, Vec<i64>)> = BTreeMap::new();
    let mut rules: BTreeMap<String, u64> = BTreeMap::new();
    let mut denied: BTreeMap<String, u64> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.created_ms >= since_ms && r.created_ms <= until_ms)
    {
        let o = Outcome::of(r.state, r.decided_by);
        outcomes.add(o);
        tools.entry(r.tool.clone()).or_default().add(o);
        agents.entry(r.agent.clone()).or_default().add(o);
        match o {
            Outcome::ApprovedByPolicy => *rules.entry(r.rule.clone()).or_default() += 1,
            Outcome::DeniedByPolicy => *denied.entry(r.tool.clone()).or_default() += 1,
            Outcome::ApprovedByHuman | Outcome::DeniedByHuman => {
                *denied.entry(r.tool.clone()).or_default() +=
                    u64::from(o == Outcome::DeniedByHuman);
                let took = r.decided_ms.map(|d| (d - r.created_ms).max(0));
                if let Some(ms) = took {
                    human_ms.push(ms);
                }
                let who = r.decided_who.as_deref().unwrap_or("");
                for name in who.split(", ").map(str::trim).filter(|n| !n.is_empty()) {
                    let a = approvers.entry(name.to_string()).or_default();
                    if o == Outcome::ApprovedByHuman {
                        a.0 += 1;
                    } else {
                        a.1 += 1;
                    }
                    a.2.extend(took);
                }
            }
            Outcome::TimedOut | Outcome::Cancelled | Outcome::Pending => {}
        }
    }
    denied.retain(|_, n| *n > 0);
    let named = |(name, outcomes): (String, Outcomes)| NamedOutcomes {
        name,
        total: outcomes.total(),
        outcomes,
    };
    let counted = |(name, calls): (String, u64)| NamedCount { name, calls };
    let (by_tool, by_tool_omitted) = ranked(tools, Outcomes::total, MAX_LISTED);
    let (by_agent, by_agent_omitted) = ranked(agents, Outcomes::total, MAX_LISTED);
    let (by_approver, by_approver_omitted) = ranked(approvers, |a| a.0 + a.1, MAX_LISTED);
    let (grants_used, grants_used_omitted) = ranked(rules, |n| *n, MAX_LISTED);
    let (top_denied, _) = ranked(denied, |n| *n, TOP_DENIED);
    StatsReport {
        since_ms,
        until_ms,
        truncated,
        total: outcomes.total(),
        timeouts: outcomes.timed_out,
        outcomes,
        by_tool: by_tool.into_iter().map(named).collect(),
        by_tool_omitted,
        by_agent: by_agent.into_iter().map(named).collect(),
        by_agent_omitted,
        time_to_decision: latency(human_ms),
        by_approver: by_approver
            .into_iter()
            .map(|(approver, (approved, denied, samples))| ApproverStats {
                approver,
                approved,
                denied,
                time_to_decision: latency(samples).unwrap_or(Latency {
                    count: 0,
                    p50_ms: 0,
                    p90_ms: 0,
                }),
            })
            .collect(),
        by_approver_omitted,
        grants_used: grants_used.into_iter().map(counted).collect(),
        grants_used_omitted,
        top_denied_tools: top_denied.into_iter().map(counted).collect(),
    }
}

/// Reads a window length such as `24h`, `7d`, `90m`, `2w` or `3600s`
/// (a whole number and one unit) into seconds, at most [`MAX_WINDOW_SECS`].
pub fn parse_window(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let shown: String = t.chars().take(32).collect();
    let bad = || {
        format!(
            "`{}` is not a window: use a number and a unit, e.g. 90m, 24h, 7d or 2w",
            shown.escape_debug()
        )
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(per).ok_or_else(bad)?;
    if secs == 0 || secs > MAX_WINDOW_SECS {
        return Err(format!(
            "the window must be between 1s and {} days",
            MAX_WINDOW_SECS / 86_400
        ));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        tool: &str,
        agent: &str,
        state: State,
        by: Option<DecidedBy>,
        who: Option<&str>,
        created: i64,
        decided: Option<i64>,
    ) -> CallRecord {
        CallRecord {
            state,
            decided_by: by,
            decided_who: who.map(str::to_string),
            tool: tool.into(),
            agent: agent.into(),
            rule: if by == Some(DecidedBy::Policy) {
                if state == State::Approved {
                    "risk_low".into()
                } else {
                    "tool_denied".into()
                }
            } else {
                "risk_high".into()
            },
            created_ms: created,
            decided_ms: decided,
        }
    }

    #[test]
    fn nearest_rank_on_literal_data() {
        assert_eq!(nearest_rank(&[], 50), None);
        assert_eq!(nearest_rank(&[7], 50), Some(7));
        assert_eq!(nearest_rank(&[7], 90), Some(7));
        assert_eq!(nearest_rank(&[1, 2, 3, 4], 50), Some(2));
        assert_eq!(nearest_rank(&[1, 2, 3, 4], 90), Some(4));
        let ten: Vec<i64> = (1..=10).map(|i| i * 100).collect();
        assert_eq!(nearest_rank(&ten, 50), Some(500));
        assert_eq!(nearest_rank(&ten, 90), Some(900));
        assert_eq!(nearest_rank(&ten, 91), Some(1000));
        assert_eq!(nearest_rank(&ten, 100), Some(1000));
        assert_eq!(nearest_rank(&ten, 1), Some(100));
        // The classic example: 15, 20, 35, 40, 50.
        let five = [15, 20, 35, 40, 50];
        assert_eq!(nearest_rank(&five, 30), Some(20));
        assert_eq!(nearest_rank(&five, 40), Some(20));
        assert_eq!(nearest_rank(&five, 50), Some(35));
        assert_eq!(nearest_rank(&five, 90), Some(50));
    }

    #[test]
    fn a_known_sequence_gives_exact_figures() {
        use DecidedBy::*;
        use State::*;
        let recs = vec![
            rec(
                "fs.read",
                "bot",
                Approved,
                Some(Policy),
                None,
                1_000,
                Some(1_000),
            ),
            rec(
                "fs.read",
                "bot",
                Approved,
                Some(Policy),
                None,
                1_100,
                Some(1_100),
            ),
            rec(
                "shell",
                "bot",
                Denied,
                Some(Policy),
                None,
                1_200,
                Some(1_200),
            ),
            rec(
                "shell",
                "ci",
                Approved,
                Some(Human),
                Some("alice (uid:1)"),
                2_000,
                Some(5_000),
            ),
            rec(
                "shell",
                "ci",
                Denied,
                Some(Human),
                Some("bob (uid:2)"),
                2_000,
                Some(3_000),
            ),
            rec(
                "deploy",
                "ci",
                Approved,
                Some(Human),
                Some("alice (uid:1), bob (uid:2)"),
                2_000,
                Some(12_000),
            ),
            rec(
                "deploy",
                "bot",
                Denied,
                Some(Human),
                Some("alice (uid:1)"),
                2_000,
                Some(2_500),
            ),
            rec(
                "deploy",
                "bot",
                TimedOut,
                Some(Timeout),
                None,
                3_000,
                Some(63_000),
            ),
            rec(
                "fs.read",
                "ci",
                Cancelled,
                Some(Cancel),
                Some("agent:ci"),
                3_000,
                Some(3_100),
            ),
            rec("fs.write", "ci", Pending, None, None, 4_000, None),
            // Outside the window on both sides: ignored.
            rec("shell", "bot", Denied, Some(Policy), None, 999, Some(999)),
            rec(
                "shell",
                "bot",
                Denied,
                Some(Policy),
                None,
                10_001,
                Some(10_001),
            ),
        ];
        let r = compute(&recs, 1_000, 10_000, false);
        assert_eq!(
            r.outcomes,
            Outcomes {
                approved_by_policy: 2,
                approved_by_human: 2,
                denied_by_policy: 1,
                denied_by_human: 2,
                timed_out: 1,
                cancelled: 1,
                pending: 1,
            }
        );
        assert_eq!(r.total, 10);
        assert_eq!(r.timeouts, 1);
        assert!(!r.truncated);
        let tools: Vec<(&str, u64)> = r
            .by_tool
            .iter()
            .map(|t| (t.name.as_str(), t.total))
            .collect();
        assert_eq!(
            tools,
            [("deploy", 3), ("fs.read", 3), ("shell", 3), ("fs.write", 1)]
        );
        let shell = &r.by_tool[2].outcomes;
        assert_eq!(
            (
                shell.denied_by_policy,
                shell.approved_by_human,
                shell.denied_by_human
            ),
            (1, 1, 1)
        );
        let agents: Vec<(&str, u64)> = r
            .by_agent
            .iter()
            .map(|t| (t.name.as_str(), t.total))
            .collect();
        assert_eq!(agents, [("bot", 5), ("ci", 5)]);
        // Human decisions took 3000, 1000, 10000, 500 ms: sorted 500, 1000,
        // 3000, 10000; p50 = rank 2, p90 = rank 4.
        assert_eq!(
            r.time_to_decision,
            Some(Latency {
                count: 4,
                p50_ms: 1_000,
                p90_ms: 10_000
            })
        );
        assert_eq!(
            r.by_approver,
            vec![
                ApproverStats {
                    approver: "alice (uid:1)".into(),
                    approved: 2,
                    denied: 1,
                    // 500, 3000, 10000
                    time_to_decision: Latency {
                        count: 3,
                        p50_ms: 3_000,
                        p90_ms: 10_000
                    },
                },
                ApproverStats {
                    approver: "bob (uid:2)".into(),
                    approved: 1,
                    denied: 1,
                    // 1000, 10000
                    time_to_decision: Latency {
                        count: 2,
                        p50_ms: 1_000,
                        p90_ms: 10_000
                    },
                },
            ]
        );
        assert_eq!(
            r.grants_used,
            vec![NamedCount {
                name: "risk_low".into(),
                calls: 2
            }]
        );
        assert_eq!(
            r.top_denied_tools,
            vec![
                NamedCount {
                    name: "shell".into(),
                    calls: 2
                },
                NamedCount {
                    name: "deploy".into(),
                    calls: 1
                },
            ]
        );
    }

    #[test]
    fn top_denied_keeps_ten_and_lists_are_bounded() {
        let mut recs = Vec::new();
        for i in 0..(MAX_LISTED + 5) {
            for _ in 0..=(i % 3) {
                recs.push(rec(
                    &format!("t{i:03}"),
                    "bot",
                    State::Denied,
                    Some(DecidedBy::Policy),
                    None,
                    0,
                    Some(0),
                ));
            }
        }
        let r = compute(&recs, 0, 0, true);
        assert!(r.truncated);
        assert_eq!(r.top_denied_tools.len(), TOP_DENIED);
        assert!(r.top_denied_tools.iter().all(|t| t.calls == 3));
        assert_eq!(r.top_denied_tools[0].name, "t002");
        assert_eq!(r.by_tool.len(), MAX_LISTED);
        assert_eq!(r.by_tool_omitted, 5);
        assert_eq!(r.time_to_decision, None);
        assert!(r.by_approver.is_empty() && r.grants_used.is_empty());
    }

    #[test]
    fn windows_parse_with_a_unit() {
        assert_eq!(parse_window("24h"), Ok(86_400));
        assert_eq!(parse_window(" 7d "), Ok(7 * 86_400));
        assert_eq!(parse_window("90m"), Ok(5_400));
        assert_eq!(parse_window("2w"), Ok(14 * 86_400));
        assert_eq!(parse_window("30s"), Ok(30));
        for bad in [
            "",
            "h",
            "24",
            "1y",
            "-1h",
            "0h",
            "367d",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }
}
