//! The escalation ladder: what happens to a request nobody decides. Per
//! risk level the config lists steps (`[[risk.high.escalation]]`), each at
//! a time after the request was created (`after`) or before its deadline
//! (`before_deadline`): re-ping the role that may decide, ping a backup
//! role, DM named approvers, a last warning.
//!
//! This module owns the steps' parsing and validation (names the config key
//! of a bad one), and the timing: given a request's times, its steps, the
//! steps already fired and `now`, which steps are due and when the next one
//! is. A step that would fall at or after the request's own deadline (or at
//! or before its creation) is skipped: a request may ask for a shorter wait
//! than its level's timeout.
//!
//! Pure: no clock (time is a parameter), no I/O.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Most steps per risk level.
pub const MAX_STEPS: usize = 10;
/// Most users one `dm` step may name.
pub const MAX_DM_USERS: usize = 10;

/// One `[[risk.LEVEL.escalation]]` entry as written in the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Time after the request was created, e.g. `3m`.
    pub after: Option<String>,
    /// Time before the request's deadline, e.g. `1m`.
    pub before_deadline: Option<String>,
    /// `reping`, `ping_role`, `dm` or `last_warning`.
    pub action: String,
    /// For `ping_role`: the role id to ping.
    pub role: Option<String>,
    /// For `dm`: the user ids to message.
    #[serde(default)]
    pub users: Vec<String>,
}

/// When a step fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// This long after the request was created.
    After(Duration),
    /// This long before the request's deadline.
    BeforeDeadline(Duration),
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ping the role that may decide the request again (approvers, or
    /// admins for an admins-only request), in the card's channel.
    Reping,
    /// Ping this (backup) role in the card's channel.
    PingRole(u64),
    /// Message these users directly.
    Dm(Vec<u64>),
    /// Ping the deciding role once more, saying the deadline is near.
    LastWarning,
}

impl Action {
    /// The config and audit name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Reping => "reping",
            Action::PingRole(_) => "ping_role",
            Action::Dm(_) => "dm",
            Action::LastWarning => "last_warning",
        }
    }
}

/// One validated step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub when: When,
    pub action: Action,
}

/// Whom a fired step pings: exactly these roles and users, nobody else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    #[serde(default)]
    pub roles: Vec<u64>,
    #[serde(default)]
    pub users: Vec<u64>,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty() && self.users.is_empty()
    }
}

impl Step {
    /// The instant this step fires for a request created at `created_ms`
    /// with its deadline at `deadline_ms`, or `None` when it is skipped: it
    /// would fall at or after the deadline, or at or before the creation.
    pub fn at(&self, created_ms: i64, deadline_ms: i64) -> Option<i64> {
        let at = match self.when {
            When::After(d) => created_ms.saturating_add(ms(d)),
            When::BeforeDeadline(d) => deadline_ms.saturating_sub(ms(d)),
        };
        (at > created_ms && at < deadline_ms).then_some(at)
    }

    /// Whom it pings. `deciders` is the role that may decide the request
    /// (the approver role, or the admin role for an admins-only request);
    /// without one, a re-ping or last warning pings nobody.
    pub fn targets(&self, deciders: Option<u64>) -> Targets {
        match &self.action {
            Action::Reping | Action::LastWarning => Targets {
                roles: deciders.into_iter().collect(),
                users: vec![],
            },
            Action::PingRole(r) => Targets {
                roles: vec![*r],
                users: vec![],
            },
            Action::Dm(users) => Targets {
                roles: vec![],
                users: users.clone(),
            },
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The audit event of a fired step (`escalated`): the request, the step's
/// index and action, and exactly whom it pings (ids as strings).
pub fn audited(
    at_ms: i64,
    request_id: &str,
    step: usize,
    action: &Action,
    targets: &Targets,
) -> crate::domain::audit::AuditEvent {
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>();
    crate::domain::audit::AuditEvent {
        at_ms,
        kind: ESCALATED.into(),
        actor: "system".into(),
        request_id: Some(request_id.to_string()),
        detail: serde_json::json!({
            "step": step,
            "action": action.as_str(),
            "targets": {"roles": ids(&targets.roles), "users": ids(&targets.users)},
        }),
    }
}

/// The audit kind of a fired step.
pub const ESCALATED: &str = "escalated";

/// What is due for one request now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Indexes of the steps due now and not fired yet, in firing order
    /// (by time, then by their order in the config).
    pub due: Vec<usize>,
    /// When the next step not fired yet comes due, if any.
    pub next_ms: Option<i64>,
}

/// Which of `steps` are due at `now_ms` for a request created at
/// `created_ms` with its deadline at `deadline_ms`, given the indexes of the
/// steps already `fired`, and when the next one is.
pub fn plan(
    steps: &[Step],
    created_ms: i64,
    deadline_ms: i64,
    fired: &[usize],
    now_ms: i64,
) -> Plan {
    let mut due: Vec<(i64, usize)> = Vec::new();
    let mut next_ms: Option<i64> = None;
    for (i, step) in steps.iter().enumerate() {
        if fired.contains(&i) {
            continue;
        }
        let Some(at) = step.at(created_ms, deadline_ms) else {
            continue;
        };
        if at <= now_ms {
            due.push((at, i));
        } else {
            next_ms = Some(next_ms.map_or(at, |n| n.min(at)));
        }
    }
    due.sort();
    Plan {
        due: due.into_iter().map(|(_, i)| i).collect(),
        next_ms,
    }
}

/// A Discord id: digits only, a non-zero 64-bit number.
pub fn parse_snowflake(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|v| *v != 0)
}

/// `90s`, `3m`, `1h30m` (a bare number is seconds), as every config
/// duration is written.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("`{t}` is not a duration (e.g. `90s`, `5m`, `1h`): {e}"))
}

/// Validates the steps of one level (`key` is e.g. `risk.high.escalation`)
/// against that level's `timeout`. An error names the key of the bad entry
/// (`risk.high.escalation[1].after`) and says what is wrong.
pub fn parse_ladder(
    key: &str,
    steps: &[StepConfig],
    timeout: Duration,
) -> Result<Vec<Step>, (String, String)> {
    if steps.len() > MAX_STEPS {
        return Err((
            key.to_string(),
            format!("at most {MAX_STEPS} steps (got {})", steps.len()),
        ));
    }
    let mut out = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let k = |field: &str| format!("{key}[{i}].{field}");
        let when = match (&s.after, &s.before_deadline) {
            (Some(a), None) => When::After(parse_duration(a).map_err(|e| (k("after"), e))?),
            (None, Some(b)) => {
                When::BeforeDeadline(parse_duration(b).map_err(|e| (k("before_deadline"), e))?)
            }
            _ => {
                return Err((
                    format!("{key}[{i}]"),
                    "needs exactly one of `after` and `before_deadline`".into(),
                ))
            }
        };
        let (field, d) = match when {
            When::After(d) => ("after", d),
            When::BeforeDeadline(d) => ("before_deadline", d),
        };
        if d.is_zero() || d >= timeout {
            return Err((
                k(field),
                format!(
                    "must be more than 0s and less than the level's timeout ({})",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        let action = match s.action.as_str() {
            "reping" | "last_warning" => {
                if s.role.is_some() || !s.users.is_empty() {
                    return Err((
                        k("action"),
                        format!(
                            "`{}` pings the role that may decide the request; it takes no \
                             `role` or `users` (use `ping_role` or `dm`)",
                            s.action
                        ),
                    ));
                }
                if s.action == "reping" {
                    Action::Reping
                } else {
                    Action::LastWarning
                }
            }
            "ping_role" => {
                if !s.users.is_empty() {
                    return Err((k("users"), "is only for `action = \"dm\"`".into()));
                }
                let role = s
                    .role
                    .as_deref()
                    .ok_or_else(|| (k("role"), "is required for `ping_role`".to_string()))?;
                Action::PingRole(parse_snowflake(role).ok_or_else(|| {
                    (
                        k("role"),
                        format!(
                            "`{}` is not a Discord role id (digits only)",
                            role.escape_default()
                        ),
                    )
                })?)
            }
            "dm" => {
                if s.role.is_some() {
                    return Err((k("role"), "is only for `action = \"ping_role\"`".into()));
                }
                if s.users.is_empty() || s.users.len() > MAX_DM_USERS {
                    return Err((
                        k("users"),
                        format!("`dm` needs 1 to {MAX_DM_USERS} user ids"),
                    ));
                }
                let mut users = Vec::with_capacity(s.users.len());
                for (j, u) in s.users.iter().enumerate() {
                    let id = parse_snowflake(u).ok_or_else(|| {
                        (
                            format!("{key}[{i}].users[{j}]"),
                            format!(
                                "`{}` is not a Discord user id (digits only)",
                                u.escape_default()
                            ),
                        )
                    })?;
                    if !users.contains(&id) {
                        users.push(id);
                    }
                }
                Action::Dm(users)
            }
            other => {
                return Err((
                    k("action"),
                    format!(
                        "unknown action `{}` (expected reping, ping_role, dm or last_warning)",
                        other.escape_default()
                    ),
                ))
            }
        };
        out.push(Step { when, action });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn cfg(after: Option<&str>, before: Option<&str>, action: &str) -> StepConfig {
        StepConfig {
            after: after.map(str::to_string),
            before_deadline: before.map(str::to_string),
            action: action.into(),
            ..StepConfig::default()
        }
    }

    fn ladder() -> Vec<Step> {
        vec![
            Step {
                when: When::After(Duration::from_secs(1)),
                action: Action::Reping,
            },
            Step {
                when: When::After(Duration::from_secs(2)),
                action: Action::PingRole(7),
            },
            Step {
                when: When::After(Duration::from_secs(2)),
                action: Action::Dm(vec![9]),
            },
            Step {
                when: When::BeforeDeadline(Duration::from_secs(1)),
                action: Action::LastWarning,
            },
        ]
    }

    #[test]
    fn steps_come_due_at_not_before_their_time() {
        let steps = ladder();
        // Created at 10 s, deadline at 15 s.
        let (c, d) = (10_000, 15_000);
        assert_eq!(
            plan(&steps, c, d, &[], 10_999),
            Plan {
                due: vec![],
                next_ms: Some(11_000)
            }
        );
        assert_eq!(
            plan(&steps, c, d, &[], 11_000),
            Plan {
                due: vec![0],
                next_ms: Some(12_000)
            }
        );
        assert_eq!(
            plan(&steps, c, d, &[0], 12_000),
            Plan {
                due: vec![1, 2],
                next_ms: Some(14_000)
            }
        );
        assert_eq!(plan(&steps, c, d, &[0, 1, 2], 13_999).next_ms, Some(14_000));
        assert_eq!(
            plan(&steps, c, d, &[0, 1, 2], 14_000),
            Plan {
                due: vec![3],
                next_ms: None
            }
        );
        assert_eq!(plan(&steps, c, d, &[0, 1, 2, 3], 99_000), Plan::default());
    }

    #[test]
    fn late_steps_fire_in_time_order_once() {
        // A restart long after: everything not fired is due, earliest first.
        let steps = ladder();
        let p = plan(&steps, 10_000, 15_000, &[0], 14_500);
        assert_eq!(p.due, vec![1, 2, 3]);
        assert_eq!(p.next_ms, None);
    }

    #[test]
    fn a_short_deadline_skips_steps_past_it() {
        let steps = ladder();
        // Deadline 1.5 s after creation: only the first step fits; the last
        // warning would fall at 0.5 s, still after creation, so it stays.
        let p = plan(&steps, 0, 1_500, &[], 0);
        assert_eq!(p.next_ms, Some(500));
        assert_eq!(steps[1].at(0, 1_500), None);
        assert_eq!(steps[2].at(0, 1_500), None);
        assert_eq!(steps[0].at(0, 1_500), Some(1_000));
        assert_eq!(steps[3].at(0, 1_500), Some(500));
        // A last warning longer than the whole wait is skipped, not fired at once.
        assert_eq!(steps[3].at(0, 1_000), None);
        assert_eq!(
            steps[0].at(0, 1_000),
            None,
            "at the deadline itself: skipped"
        );
    }

    #[test]
    fn targets_are_exactly_the_step_s() {
        let s = ladder();
        assert_eq!(s[0].targets(Some(30)).roles, vec![30]);
        assert!(s[0].targets(None).is_empty());
        assert_eq!(s[1].targets(Some(30)).roles, vec![7]);
        assert_eq!(
            s[2].targets(Some(30)),
            Targets {
                roles: vec![],
                users: vec![9]
            }
        );
        assert_eq!(s[3].targets(Some(31)).roles, vec![31]);
    }

    #[test]
    fn the_suggested_ladder_parses() {
        let steps = vec![
            cfg(Some("3m"), None, "reping"),
            StepConfig {
                role: Some("123456789012345678".into()),
                ..cfg(Some("6m"), None, "ping_role")
            },
            StepConfig {
                users: vec!["111111111111111111".into(), "111111111111111111".into()],
                ..cfg(Some("6m"), None, "dm")
            },
            cfg(None, Some("1m"), "last_warning"),
        ];
        let l = parse_ladder("risk.high.escalation", &steps, 10 * MIN).unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l[0].when, When::After(3 * MIN));
        assert_eq!(l[1].action, Action::PingRole(123_456_789_012_345_678));
        assert_eq!(l[2].action, Action::Dm(vec![111_111_111_111_111_111]));
        assert_eq!(l[3].when, When::BeforeDeadline(MIN));
        assert!(parse_ladder("k", &[], MIN).unwrap().is_empty());
    }

    fn err(steps: &[StepConfig]) -> (String, String) {
        parse_ladder("risk.high.escalation", steps, 5 * MIN).unwrap_err()
    }

    #[test]
    fn bad_steps_are_refused_naming_the_key() {
        let (k, m) = err(&[cfg(Some("1m"), Some("1m"), "reping")]);
        assert_eq!(k, "risk.high.escalation[0]");
        assert!(m.contains("exactly one"), "{m}");
        let (k, _) = err(&[cfg(None, None, "reping")]);
        assert_eq!(k, "risk.high.escalation[0]");
        let (k, m) = err(&[
            cfg(Some("1m"), None, "reping"),
            cfg(Some("5m"), None, "reping"),
        ]);
        assert_eq!(k, "risk.high.escalation[1].after");
        assert!(m.contains("less than the level's timeout"), "{m}");
        let (k, _) = err(&[cfg(None, Some("6m"), "last_warning")]);
        assert_eq!(k, "risk.high.escalation[0].before_deadline");
        let (k, _) = err(&[cfg(Some("0s"), None, "reping")]);
        assert_eq!(k, "risk.high.escalation[0].after");
        let (k, m) = err(&[cfg(Some("soon"), None, "reping")]);
        assert_eq!(k, "risk.high.escalation[0].after");
        assert!(m.contains("not a duration"), "{m}");
        let (k, m) = err(&[cfg(Some("1m"), None, "shout")]);
        assert_eq!(k, "risk.high.escalation[0].action");
        assert!(m.contains("unknown action"), "{m}");
        let (k, _) = err(&[cfg(Some("1m"), None, "ping_role")]);
        assert_eq!(k, "risk.high.escalation[0].role");
        for bad in ["@backup", "12a", "0", "-5", "123456789012345678901", ""] {
            let (k, m) = err(&[StepConfig {
                role: Some(bad.into()),
                ..cfg(Some("1m"), None, "ping_role")
            }]);
            assert_eq!(k, "risk.high.escalation[0].role", "{bad}");
            assert!(m.contains("not a Discord role id"), "{m}");
        }
        let (k, _) = err(&[StepConfig {
            users: vec!["1".into(), "<@2>".into()],
            ..cfg(Some("1m"), None, "dm")
        }]);
        assert_eq!(k, "risk.high.escalation[0].users[1]");
        let (k, _) = err(&[cfg(Some("1m"), None, "dm")]);
        assert_eq!(k, "risk.high.escalation[0].users");
        let (k, _) = err(&[StepConfig {
            users: (1..=MAX_DM_USERS as u64 + 1)
                .map(|u| u.to_string())
                .collect(),
            ..cfg(Some("1m"), None, "dm")
        }]);
        assert_eq!(k, "risk.high.escalation[0].users");
        let (k, _) = err(&[StepConfig {
            role: Some("5".into()),
            ..cfg(Some("1m"), None, "reping")
        }]);
        assert_eq!(k, "risk.high.escalation[0].action");
        let (k, _) = err(&[StepConfig {
            users: vec!["5".into()],
            role: Some("5".into()),
            ..cfg(Some("1m"), None, "ping_role")
        }]);
        assert_eq!(k, "risk.high.escalation[0].users");
    }

    #[test]
    fn the_number_of_steps_is_bounded() {
        let at_max = vec![cfg(Some("1m"), None, "reping"); MAX_STEPS];
        assert_eq!(
            parse_ladder("k", &at_max, 5 * MIN).unwrap().len(),
            MAX_STEPS
        );
        let over = vec![cfg(Some("1m"), None, "reping"); MAX_STEPS + 1];
        let (k, m) = parse_ladder("risk.critical.escalation", &over, 5 * MIN).unwrap_err();
        assert_eq!(k, "risk.critical.escalation");
        assert!(m.contains("at most 10"), "{m}");
    }

    #[test]
    fn snowflakes() {
        assert_eq!(parse_snowflake("123"), Some(123));
        assert_eq!(parse_snowflake(" 42 "), Some(42));
        assert_eq!(parse_snowflake("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "0", "18446744073709551616", "1e3", "+1", "１"] {
            assert_eq!(parse_snowflake(bad), None, "{bad}");
        }
    }
}
