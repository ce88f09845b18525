//! Time-boxed grants: what an approver adds with "Allow for…" while
//! approving one request, so that the next matching calls need no human
//! until the grant expires.
//!
//! A time-boxed grant is deliberately narrow and never an allowlist entry:
//! it names one agent and one exact tool (no glob), narrowed further by the
//! approver's pick ([`TimedScope`]). The policy consults it only where it
//! would otherwise ask a human for the risk or autonomy level (see
//! [`crate::domain::policy::evaluate_with_timed`]); it never turns a deny
//! into an allow. Expiry is a plain comparison with the `now` the caller
//! passes, so a grant stops applying at its instant with no sweep.
//!
//! Pure: no clock, no ids drawn here (the caller passes both).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Shortest time box accepted.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
/// Longest time box accepted (longer needs "until revoked", which is explicit).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Most time-boxed grants in force at once: beyond it "Allow for…" is
/// refused (with the way out: revoke some, or let them expire).
pub const MAX_LIVE: usize = 1000;

/// How far a time-boxed grant reaches, as the approver picked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimedScopeKind {
    /// This exact call: same agent, tool and arguments' hash.
    Call,
    /// This tool for this agent, any arguments.
    AgentTool,
    /// This tool for this agent acting for this user.
    AgentToolUser,
}

impl TimedScopeKind {
    /// Every kind, narrowest first.
    pub const ALL: [TimedScopeKind; 3] = [
        TimedScopeKind::Call,
        TimedScopeKind::AgentTool,
        TimedScopeKind::AgentToolUser,
    ];

    /// The wire name (`call`, `agent-tool`, `agent-tool-user`).
    pub fn as_str(self) -> &'static str {
        match self {
            TimedScopeKind::Call => "call",
            TimedScopeKind::AgentTool => "agent-tool",
            TimedScopeKind::AgentToolUser => "agent-tool-user",
        }
    }

    /// What a human reads (`this exact call`, …).
    pub fn describe(self) -> &'static str {
        match self {
            TimedScopeKind::Call => "this exact call",
            TimedScopeKind::AgentTool => "this tool for this agent",
            TimedScopeKind::AgentToolUser => "this tool for this agent and this user",
        }
    }
}

impl fmt::Display for TimedScopeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TimedScopeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TimedScopeKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s.trim())
            .ok_or_else(|| {
                format!("unknown grant scope `{s}` (expected call, agent-tool or agent-tool-user)")
            })
    }
}

/// A time-boxed grant as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedGrant {
    /// Stable id (`tg-…`), named by every call it allows and by `revoke`.
    pub id: String,
    pub agent: String,
    /// An exact tool name, never a pattern.
    pub tool: String,
    pub kind: TimedScopeKind,
    /// Set for [`TimedScopeKind::AgentToolUser`].
    pub user_id: Option<String>,
    /// Set for [`TimedScopeKind::Call`].
    pub args_hash: Option<String>,
    /// `None`: until revoked.
    pub expires_ms: Option<i64>,
    pub created_by: String,
    pub created_ms: i64,
    /// The request whose approval added it.
    pub origin_request: String,
    /// Whether an admin added it: only such a grant may stand in for an
    /// admin's approval (critical tools).
    pub by_admin: bool,
}

/// The facts of a call a time-boxed grant is matched against.
#[derive(Debug, Clone, Copy)]
pub struct TimedCall<'a> {
    pub agent: &'a str,
    pub tool: &'a str,
    pub user: Option<&'a str>,
    pub args_hash: Option<&'a str>,
}

impl TimedGrant {
    /// Whether it is still in force at `now_ms` (it stops at its instant).
    pub fn live_at(&self, now_ms: i64) -> bool {
        self.expires_ms.is_none_or(|e| now_ms < e)
    }

    /// Whether it covers `call` at `now_ms`: exact agent and tool, and
    /// whatever the picked scope narrows to. Never wider than the pick.
    pub fn covers(&self, call: &TimedCall<'_>, now_ms: i64) -> bool {
        if !self.live_at(now_ms) || self.agent != call.agent || self.tool != call.tool {
            return false;
        }
        match self.kind {
            TimedScopeKind::AgentTool => true,
            TimedScopeKind::Call => {
                matches!((&self.args_hash, call.args_hash), (Some(a), Some(b)) if a == b)
            }
            TimedScopeKind::AgentToolUser => {
                matches!((&self.user_id, call.user), (Some(a), Some(b)) if a == b)
            }
        }
    }

    /// `until 14:05Z` / `until revoked`.
    pub fn until(&self) -> String {
        until_label(self.expires_ms)
    }

    /// The detail a call it allowed is recorded with (names the grant).
    pub fn allow_detail(&self) -> String {
        format!(
            "allowed by grant {} ({}, {}; from request {} approved by {})",
            self.id,
            self.until(),
            self.kind.describe(),
            self.origin_request,
            self.created_by
        )
    }
}

/// `until 2026-11-29 14:05:00Z` for an instant, `until revoked` for none.
pub fn until_label(expires_ms: Option<i64>) -> String {
    match expires_ms {
        None => "until revoked".into(),
        Some(ms) => match chrono::DateTime::from_timestamp_millis(ms) {
            Some(t) => format!("until {}", t.format("%Y-%m-%d %H:%M:%SZ")),
            None => format!("until {ms} ms"),
        },
    }
}

/// Parses `15m`, `1h`, `8h`, `2s`, `1d` (or `until_revoked`, giving `None`).
/// Bounded by [`MIN_DURATION`] and [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if matches!(s, "until_revoked" | "until-revoked" | "forever") {
        return Ok(None);
    }
    let err = || {
        format!(
            "grant duration `{}` must be a number and a unit (s, m, h, d), e.g. 15m, 1h, 8h, \
             or until_revoked",
            s.escape_default()
        )
    };
    if s.is_empty() || s.len() > 12 {
        return Err(err());
    }
    let (num, unit) = s.split_at(s.len() - 1);
    let n: u64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => return Err(err()),
    }
    .ok_or_else(err)?;
    let d = Duration::from_secs(secs);
    if d < MIN_DURATION || d > MAX_DURATION {
        return Err(format!(
            "grant duration `{s}` must be between 1s and 30d (or until_revoked)"
        ));
    }
    Ok(Some(d))
}

/// `15 min`, `1 h`, `2 s`, `until revoked`: how a card shows a duration.
pub fn duration_label(d: Option<Duration>) -> String {
    let Some(d) = d else {
        return "until revoked".into();
    };
    let s = d.as_secs();
    if s % 86_400 == 0 {
        format!("{} d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{} h", s / 3600)
    } else if s % 60 == 0 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn grant(kind: TimedScopeKind, expires_ms: Option<i64>) -> TimedGrant {
        TimedGrant {
            id: "tg-1".into(),
            agent: "bot".into(),
            tool: "shell".into(),
            kind,
            user_id: (kind == TimedScopeKind::AgentToolUser).then(|| "42".into()),
            args_hash: (kind == TimedScopeKind::Call).then(|| "h1".into()),
            expires_ms,
            created_by: "uid:1".into(),
            created_ms: 0,
            origin_request: "r1".into(),
            by_admin: false,
        }
    }

    fn call<'a>(agent: &'a str, tool: &'a str, user: Option<&'a str>, h: &'a str) -> TimedCall<'a> {
        TimedCall {
            agent,
            tool,
            user,
            args_hash: Some(h),
        }
    }

    #[test]
    fn expiry_applies_at_its_instant() {
        let g = grant(TimedScopeKind::AgentTool, Some(1000));
        let c = call("bot", "shell", None, "h1");
        assert!(g.covers(&c, 0));
        assert!(g.covers(&c, 999));
        assert!(!g.covers(&c, 1000));
        assert!(!g.covers(&c, 5000));
        let forever = grant(TimedScopeKind::AgentTool, None);
        assert!(forever.covers(&c, i64::MAX));
    }

    #[test]
    fn scopes_never_widen() {
        let exact = grant(TimedScopeKind::Call, None);
        assert!(exact.covers(&call("bot", "shell", None, "h1"), 0));
        assert!(!exact.covers(&call("bot", "shell", None, "h2"), 0));
        assert!(!exact.covers(&call("other", "shell", None, "h1"), 0));
        assert!(!exact.covers(&call("bot", "shell2", None, "h1"), 0));
        let no_hash = TimedCall {
            args_hash: None,
            ..call("bot", "shell", None, "h1")
        };
        assert!(!exact.covers(&no_hash, 0));

        let tool = grant(TimedScopeKind::AgentTool, None);
        assert!(tool.covers(&call("bot", "shell", Some("9"), "h2"), 0));
        assert!(!tool.covers(&call("bot2", "shell", None, "h1"), 0));
        assert!(!tool.covers(&call("bot", "fs.read", None, "h1"), 0));

        let user = grant(TimedScopeKind::AgentToolUser, None);
        assert!(user.covers(&call("bot", "shell", Some("42"), "h2"), 0));
        assert!(!user.covers(&call("bot", "shell", Some("43"), "h1"), 0));
        assert!(!user.covers(&call("bot", "shell", None, "h1"), 0));
    }

    #[test]
    fn durations_parse_within_bounds() {
        assert_eq!(
            parse_duration("15m").unwrap(),
            Some(Duration::from_secs(900))
        );
        assert_eq!(
            parse_duration("1h").unwrap(),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_duration("2s").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("until_revoked").unwrap(), None);
        assert_eq!(parse_duration("30d").unwrap(), Some(MAX_DURATION));
        for bad in ["", "0s", "31d", "1x", "h", "-1h", "99999999999999h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(until_label(None), "until revoked");
        assert_eq!(until_label(Some(0)), "until 1970-01-01 00:00:00Z");
        assert_eq!(duration_label(Some(Duration::from_secs(900))), "15 min");
        assert_eq!(duration_label(Some(Duration::from_secs(3600))), "1 h");
        assert_eq!(duration_label(None), "until revoked");
        for k in TimedScopeKind::ALL {
            assert_eq!(k.as_str().parse::<TimedScopeKind>().unwrap(), k);
        }
    }
}
