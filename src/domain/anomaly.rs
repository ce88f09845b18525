//! Anomaly rules over the stream of calls: an agent's call rate, a burst of
//! denials, a sensitive tool outside configured hours, a tool never seen for
//! the agent, the same call repeated (a loop). Each rule is off unless
//! configured.
//!
//! The [`Detector`] keeps bounded sliding windows per agent and turns
//! matches into [`Hit`]s, rate limited to one alert per rule per agent per
//! window: later matches in the window raise that alert's count instead of
//! opening another. Pure: time is a parameter, alert ids are made by the
//! caller; no clock, no I/O, no runtime.

use super::policy::ToolPattern;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fmt;

/// Agents tracked at most; past it the agent seen least recently is
/// forgotten (its windows start again).
pub const MAX_AGENTS: usize = 1024;
/// Calls kept per agent for the repeat rule; past it the oldest go, so a
/// loop spread over more calls than this within `within` is under-counted.
pub const MAX_REPEAT_CALLS: usize = 1024;
/// Largest threshold a rule accepts (`per_minute`, `count`): it bounds the
/// per-agent windows.
pub const MAX_THRESHOLD: u32 = 10_000;
/// The rule name a call forced to a person by `raise_risk` carries.
pub const ANOMALY_RULE: &str = "anomaly";

/// One rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Rate,
    Denials,
    OffHours,
    NewTool,
    Repeat,
}

impl RuleKind {
    pub const ALL: [RuleKind; 5] = [
        RuleKind::Rate,
        RuleKind::Denials,
        RuleKind::OffHours,
        RuleKind::NewTool,
        RuleKind::Repeat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Rate => "rate",
            RuleKind::Denials => "denials",
            RuleKind::OffHours => "off_hours",
            RuleKind::NewTool => "new_tool",
            RuleKind::Repeat => "repeat",
        }
    }

    /// What the alert's title says.
    pub fn describe(self) -> &'static str {
        match self {
            RuleKind::Rate => "call rate",
            RuleKind::Denials => "burst of denials",
            RuleKind::OffHours => "sensitive tool outside hours",
            RuleKind::NewTool => "tool never seen for this agent",
            RuleKind::Repeat => "same call repeated (a loop?)",
        }
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RuleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RuleKind::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown anomaly rule `{}`", s.escape_default()))
    }
}

/// What a rule does besides alerting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Only the alert.
    #[default]
    Alert,
    /// For `raise_for`, every call of the agent goes to a person.
    RaiseRisk,
    /// The agent is paused (by `anomaly`).
    Pause,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::RaiseRisk => "raise_risk",
            Action::Pause => "pause",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "alert" => Ok(Action::Alert),
            "raise_risk" => Ok(Action::RaiseRisk),
            "pause" => Ok(Action::Pause),
            _ => Err(format!("unknown anomaly action `{}`", s.escape_default())),
        }
    }
}

/// More than `per_minute` calls of one agent within a minute.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRule {
    pub per_minute: u32,
    pub action: Action,
}

/// `count` events within `within_ms` (denials; the same call repeated).
#[derive(Debug, Clone, PartialEq)]
pub struct CountRule {
    pub count: u32,
    pub within_ms: i64,
    pub action: Action,
}

/// Hours of a week, in a fixed UTC offset.
#[derive(Debug, Clone, PartialEq)]
pub struct Hours {
    /// Minutes after midnight the hours start (inclusive).
    pub start_min: u32,
    /// Minutes after midnight they end (exclusive); before `start_min`
    /// means they run past midnight (`22:00-06:00`).
    pub end_min: u32,
    /// Monday first; a day is the day the hours start on.
    pub days: [bool; 7],
    /// Local time = UTC + this.
    pub utc_offset_min: i32,
}

/// Day names, Monday first, as the config writes them.
pub const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Hours {
    /// Parses `08:00-18:00`, day names and `+02:00`.
    pub fn parse(hours: &str, days: &[String], utc_offset: &str) -> Result<Hours, String> {
        let (a, b) = hours
            .split_once('-')
            .ok_or_else(|| format!("`{hours}` is not HH:MM-HH:MM"))?;
        let start_min = clock(a.trim())?;
        let end_min = clock(b.trim())?;
        if start_min == end_min {
            return Err(format!("`{hours}` is an empty range"));
        }
        let mut set = [false; 7];
        if days.is_empty() {
            set = [true; 7];
        }
        for d in days {
            let i = DAYS
                .iter()
                .position(|n| n.eq_ignore_ascii_case(d.trim()))
                .ok_or_else(|| format!("`{d}` is not a day (mon, tue, … sun)"))?;
            set[i] = true;
        }
        Ok(Hours {
            start_min,
            end_min,
            days: set,
            utc_offset_min: offset(utc_offset)?,
        })
    }

    /// Whether `at_ms` (UTC) falls within the hours.
    pub fn contains(&self, at_ms: i64) -> bool {
        let (day, min) = local(at_ms, self.utc_offset_min);
        if self.start_min < self.end_min {
            self.days[day] && min >= self.start_min && min < self.end_min
        } else {
            // Past midnight: the evening of an allowed day, or the morning
            // after one.
            let yesterday = (day + 6) % 7;
            (self.days[day] && min >= self.start_min)
                || (self.days[yesterday] && min < self.end_min)
        }
    }

    /// `08:00-18:00 mon,tue (+01:00)`.
    pub fn describe(&self) -> String {
        let days: Vec<&str> = DAYS
            .iter()
            .zip(self.days)
            .filter(|(_, on)| *on)
            .map(|(d, _)| *d)
            .collect();
        format!(
            "{}-{} {} ({})",
            hhmm(self.start_min),
            hhmm(self.end_min),
            days.join(","),
            offset_label(self.utc_offset_min)
        )
    }
}

fn clock(s: &str) -> Result<u32, String> {
    let bad = || format!("`{s}` is not a time HH:MM");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn offset(s: &str) -> Result<i32, String> {
    let bad = || format!("`{s}` is not a UTC offset like +02:00");
    let s = s.trim();
    if s.eq_ignore_ascii_case("z") || s.is_empty() {
        return Ok(0);
    }
    let (sign, rest) = match s.as_bytes()[0] {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 60 + m))
}

fn hhmm(min: u32) -> String {
    format!("{:02}:{:02}", min / 60, min % 60)
}

fn offset_label(min: i32) -> String {
    let sign = if min < 0 { '-' } else { '+' };
    let a = min.unsigned_abs();
    format!("{sign}{:02}:{:02}", a / 60, a % 60)
}

/// The local weekday (0 = Monday) and minute of the day of `at_ms`.
pub fn local(at_ms: i64, utc_offset_min: i32) -> (usize, u32) {
    let min = at_ms.div_euclid(60_000) + i64::from(utc_offset_min);
    let days = min.div_euclid(1440);
    // 1970-01-01 was a Thursday (3, Monday first).
    let day = (days + 3).rem_euclid(7) as usize;
    (day, min.rem_euclid(1440) as u32)
}

/// A sensitive tool called outside the hours.
#[derive(Debug, Clone, PartialEq)]
pub struct OffHoursRule {
    pub tools: Vec<ToolPattern>,
    pub hours: Hours,
    pub action: Action,
}

/// A tool the agent was never seen calling.
#[derive(Debug, Clone, PartialEq)]
pub struct NewToolRule {
    /// Tools first seen within this long of the agent's first call are
    /// learnt quietly; 0: the very first call alerts too.
    pub learn_for_ms: i64,
    pub action: Action,
}

/// Every configured rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// One alert per rule per agent per this window.
    pub window_ms: i64,
    /// How long `raise_risk` lasts.
    pub raise_for_ms: i64,
    pub rate: Option<RateRule>,
    pub denials: Option<CountRule>,
    pub off_hours: Option<OffHoursRule>,
    pub new_tool: Option<NewToolRule>,
    pub repeat: Option<CountRule>,
}

impl Rules {
    /// Whether any rule is on.
    pub fn any(&self) -> bool {
        self.rate.is_some()
            || self.denials.is_some()
            || self.off_hours.is_some()
            || self.new_tool.is_some()
            || self.repeat.is_some()
    }

    /// Whether any rule's action is `raise_risk`.
    pub fn raises_risk(&self) -> bool {
        RuleKind::ALL
            .into_iter()
            .any(|r| self.action(r) == Action::RaiseRisk)
    }

    fn action(&self, rule: RuleKind) -> Action {
        match rule {
            RuleKind::Rate => self.rate.as_ref().map(|r| r.action),
            RuleKind::Denials => self.denials.as_ref().map(|r| r.action),
            RuleKind::OffHours => self.off_hours.as_ref().map(|r| r.action),
            RuleKind::NewTool => self.new_tool.as_ref().map(|r| r.action),
            RuleKind::Repeat => self.repeat.as_ref().map(|r| r.action),
        }
        .unwrap_or_default()
    }
}

/// A rule matched: a new alert (`opened`) or one more match of the alert
/// open for this rule and agent (its count raised).
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub alert_id: String,
    pub agent: String,
    pub rule: RuleKind,
    pub action: Action,
    /// What was seen (tool names, counts; never arguments).
    pub detail: String,
    /// Matches in this alert's window so far.
    pub count: u64,
    pub opened: bool,
    pub opened_ms: i64,
}

#[derive(Debug, Clone)]
struct Open {
    id: String,
    opened_ms: i64,
    count: u64,
}

#[derive(Debug, Default)]
struct AgentState {
    last_ms: i64,
    /// Times of the latest calls (at most `per_minute + 1`).
    calls: VecDeque<i64>,
    /// Times of the latest denials (at most `count`).
    denials: VecDeque<i64>,
    /// (time, call key) of the latest calls (at most [`MAX_REPEAT_CALLS`]).
    repeats: VecDeque<(i64, u64)>,
    open: HashMap<RuleKind, Open>,
}

/// One call as the detector sees it.
#[derive(Debug, Clone, Copy)]
pub struct CallSeen<'a> {
    pub agent: &'a str,
    pub tool: &'a str,
    pub args_hash: &'a str,
}

/// The rules' state: bounded windows per agent (see [`MAX_AGENTS`]).
#[derive(Debug)]
pub struct Detector {
    rules: Rules,
    agents: HashMap<String, AgentState>,
}

/// A stable 64-bit key of (tool, args hash): FNV-1a, so it is the same in
/// every process and needs no random seed.
fn call_key(tool: &str, args_hash: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tool.bytes().chain([0u8]).chain(args_hash.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Detector {
    pub fn new(rules: Rules) -> Detector {
        Detector {
            rules,
            agents: HashMap::new(),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Agents tracked now (at most [`MAX_AGENTS`]).
    pub fn tracked(&self) -> usize {
        self.agents.len()
    }

    fn agent(&mut self, agent: &str, now_ms: i64) -> &mut AgentState {
        if !self.agents.contains_key(agent) && self.agents.len() >= MAX_AGENTS {
            if let Some(oldest) = self
                .agents
                .iter()
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(k, _)| k.clone())
            {
                self.agents.remove(&oldest);
            }
        }
        let st = self.agents.entry(agent.to_string()).or_default();
        st.last_ms = st.last_ms.max(now_ms);
        st
    }

    /// One match of `rule` for `agent`: opens an alert, or counts one more
    /// in the alert open for it.
    fn fire(
        &mut self,
        agent: &str,
        rule: RuleKind,
        detail: String,
        now_ms: i64,
        new_id: &mut dyn FnMut() -> String,
    ) -> Hit {
        let window = self.rules.window_ms;
        let action = self.rules.action(rule);
        let st = self.agent(agent, now_ms);
        let (open, opened) = match st.open.get_mut(&rule) {
            Some(o) if now_ms < o.opened_ms + window => {
                o.count += 1;
                (o.clone(), false)
            }
            _ => {
                let o = Open {
                    id: new_id(),
                    opened_ms: now_ms,
                    count: 1,
                };
                st.open.insert(rule, o.clone());
                (o, true)
            }
        };
        Hit {
            alert_id: open.id,
            agent: agent.to_string(),
            rule,
            action,
            detail,
            count: open.count,
            opened,
            opened_ms: open.opened_ms,
        }
    }

    /// A call arrived (before the policy decides it): the rate, repeat and
    /// off-hours rules.
    pub fn on_call(
        &mut self,
        call: CallSeen<'_>,
        now_ms: i64,
        new_id: &mut dyn FnMut() -> String,
    ) -> Vec<Hit> {
        let mut hits = Vec::new();
        let rules = self.rules.clone();
        if let Some(r) = &rules.rate {
            let st = self.agent(call.agent, now_ms);
            st.calls.push_back(now_ms);
            while st.calls.front().is_some_and(|t| {
                *t <= now_ms - 60_000 || st.calls.len() > r.per_minute as usize + 1
            }) {
                st.calls.pop_front();
            }
            if st.calls.len() > r.per_minute as usize {
                let detail = format!(
                    "more than {} calls within a minute (latest: `{}`)",
                    r.per_minute, call.tool
                );
                hits.push(self.fire(call.agent, RuleKind::Rate, detail, now_ms, new_id));
            }
        }
        if let Some(r) = &rules.repeat {
            let key = call_key(call.tool, call.args_hash);
            let st = self.agent(call.agent, now_ms);
            st.repeats.push_back((now_ms, key));
            while st
                .repeats
                .front()
                .is_some_and(|(t, _)| *t <= now_ms - r.within_ms)
                || st.repeats.len() > MAX_REPEAT_CALLS
            {
                st.repeats.pop_front();
            }
            let same = st.repeats.iter().filter(|(_, k)| *k == key).count();
            if same >= r.count as usize {
                let short: String = call.args_hash.chars().take(12).collect();
                let detail = format!(
                    "`{}` called {same} times with the same arguments (args hash {short}…) within {}",
                    call.tool,
                    duration_label(r.within_ms)
                );
                hits.push(self.fire(call.agent, RuleKind::Repeat, detail, now_ms, new_id));
            }
        }
        if let Some(r) = &rules.off_hours {
            if r.tools.iter().any(|p| p.matches(call.tool)) && !r.hours.contains(now_ms) {
                let (day, min) = local(now_ms, r.hours.utc_offset_min);
                let detail = format!(
                    "`{}` called on {} at {}; its hours are {}",
                    call.tool,
                    DAYS[day],
                    hhmm(min),
                    r.hours.describe()
                );
                hits.push(self.fire(call.agent, RuleKind::OffHours, detail, now_ms, new_id));
            }
        }
        hits
    }

    /// A call of `agent` was denied or timed out (`what` says which, for
    /// the detail): the denials rule.
    pub fn on_denial(
        &mut self,
        agent: &str,
        what: &str,
        now_ms: i64,
        new_id: &mut dyn FnMut() -> String,
    ) -> Option<Hit> {
        let r = self.rules.denials.clone()?;
        let st = self.agent(agent, now_ms);
        st.denials.push_back(now_ms);
        while st
            .denials
            .front()
            .is_some_and(|t| *t <= now_ms - r.within_ms || st.denials.len() > r.count as usize)
        {
            st.denials.pop_front();
        }
        if st.denials.len() < r.count as usize {
            return None;
        }
        let detail = format!(
            "{} denials within {} (latest: {what})",
            r.count,
            duration_label(r.within_ms)
        );
        Some(self.fire(agent, RuleKind::Denials, detail, now_ms, new_id))
    }

    /// `agent` called `tool` for the first time (the caller knows, from
    /// what it persisted); `agent_first_ms` is when the agent was first
    /// seen at all, for `learn_for`.
    pub fn on_new_tool(
        &mut self,
        agent: &str,
        tool: &str,
        agent_first_ms: i64,
        now_ms: i64,
        new_id: &mut dyn FnMut() -> String,
    ) -> Option<Hit> {
        let r = self.rules.new_tool.clone()?;
        if now_ms < agent_first_ms + r.learn_for_ms {
            return None;
        }
        let detail = format!("first call of `{tool}` by this agent");
        Some(self.fire(agent, RuleKind::NewTool, detail, now_ms, new_id))
    }
}

/// `90s`, `10m`, `2h`: the largest whole unit.
pub fn duration_label(ms: i64) -> String {
    let s = ms / 1000;
    if s > 0 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s > 0 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else if ms % 1000 == 0 {
        format!("{s}s")
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    /// 2026-11-30 was a Monday; 00:00 UTC.
    const MONDAY: i64 = 1_795_996_800_000;

    fn rules() -> Rules {
        Rules {
            window_ms: 10 * MIN,
            raise_for_ms: 15 * MIN,
            rate: None,
            denials: None,
            off_hours: None,
            new_tool: None,
            repeat: None,
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("a{n}")
        }
    }

    fn call<'a>(tool: &'a str, hash: &'a str) -> CallSeen<'a> {
        CallSeen {
            agent: "bot",
            tool,
            args_hash: hash,
        }
    }

    #[test]
    fn the_reference_instant_is_a_monday() {
        assert_eq!(local(MONDAY, 0), (0, 0));
        assert_eq!(local(MONDAY + 6 * 1440 * MIN + 61 * MIN, 0), (6, 61));
        assert_eq!(local(MONDAY, -60), (6, 23 * 60));
        assert_eq!(local(MONDAY, 90), (0, 90));
    }

    #[test]
    fn rate_fires_past_the_threshold_once_per_window_and_counts() {
        let mut d = Detector::new(Rules {
            rate: Some(RateRule {
                per_minute: 10,
                action: Action::Alert,
            }),
            ..rules()
        });
        let mut id = ids();
        let mut hits = Vec::new();
        for i in 0..30 {
            hits.extend(d.on_call(call("read", "h"), MONDAY + i * 100, &mut id));
        }
        assert_eq!(hits.len(), 20, "calls 11..=30 match");
        assert!(hits[0].opened);
        assert!(hits[1..].iter().all(|h| !h.opened && h.alert_id == "a1"));
        assert_eq!(hits.last().unwrap().count, 20);
        assert_eq!(hits[0].rule, RuleKind::Rate);
        // After the window, a new alert.
        let later = MONDAY + 11 * MIN;
        for i in 0..11 {
            hits = d.on_call(call("read", "h"), later + i, &mut id);
        }
        assert_eq!(hits.len(), 1);
        assert!(hits[0].opened);
        assert_eq!(hits[0].alert_id, "a2");
    }

    #[test]
    fn rate_is_quiet_for_a_benign_stream() {
        let mut d = Detector::new(Rules {
            rate: Some(RateRule {
                per_minute: 10,
                action: Action::Alert,
            }),
            ..rules()
        });
        let mut id = ids();
        // 10 a minute for an hour: never more than 10 within one minute.
        for i in 0..600 {
            let hits = d.on_call(call("read", "h"), MONDAY + i * 6_000, &mut id);
            assert!(hits.is_empty(), "call {i}: {hits:?}");
        }
    }

    #[test]
    fn repeat_fires_on_the_same_call_not_on_varied_args() {
        let mut d = Detector::new(Rules {
            repeat: Some(CountRule {
                count: 5,
                within_ms: MIN,
                action: Action::Alert,
            }),
            ..rules()
        });
        let mut id = ids();
        for i in 0..50 {
            let h = format!("h{i}");
            assert!(d.on_call(call("write", &h), MONDAY + i, &mut id).is_empty());
        }
        let mut hits = Vec::new();
        for i in 0..7 {
            hits.extend(d.on_call(call("write", "same"), MONDAY + 100 + i, &mut id));
        }
        assert_eq!(hits.len(), 3, "the 5th, 6th, 7th");
        assert_eq!(hits[2].count, 3);
        assert!(
            hits[0].detail.contains("`write` called 5 times"),
            "{}",
            hits[0].detail
        );
        // The same arguments spread out (one a minute) never match.
        let mut d = Detector::new(d.rules().clone());
        for i in 0..20 {
            assert!(d
                .on_call(call("write", "same"), MONDAY + i * MIN, &mut id)
                .is_empty());
        }
    }

    #[test]
    fn denials_fire_on_a_burst_not_when_spread() {
        let mut d = Detector::new(Rules {
            denials: Some(CountRule {
                count: 3,
                within_ms: MIN,
                action: Action::Pause,
            }),
            ..rules()
        });
        let mut id = ids();
        for i in 0..10 {
            assert!(d.on_denial("bot", "x", MONDAY + i * MIN, &mut id).is_none());
        }
        assert!(d
            .on_denial("bot", "x", MONDAY + 20 * MIN, &mut id)
            .is_none());
        assert!(d
            .on_denial("bot", "x", MONDAY + 20 * MIN + 1, &mut id)
            .is_none());
        let h = d
            .on_denial("bot", "`rm` denied", MONDAY + 20 * MIN + 2, &mut id)
            .expect("third within a minute");
        assert_eq!(h.action, Action::Pause);
        assert!(h.detail.contains("3 denials within 1m"), "{}", h.detail);
        // Other agents have their own windows.
        assert!(d
            .on_denial("cli", "x", MONDAY + 20 * MIN + 3, &mut id)
            .is_none());
    }

    #[test]
    fn off_hours_fire_outside_hours_for_sensitive_tools_only() {
        let hours = Hours::parse(
            "08:00-18:00",
            &[
                "mon".into(),
                "tue".into(),
                "wed".into(),
                "thu".into(),
                "fri".into(),
            ],
            "+01:00",
        )
        .unwrap();
        let mut d = Detector::new(Rules {
            off_hours: Some(OffHoursRule {
                tools: vec!["deploy".parse().unwrap(), "db_*".parse().unwrap()],
                hours,
                action: Action::Alert,
            }),
            ..rules()
        });
        let mut id = ids();
        // Monday 10:00 local (09:00 UTC): inside.
        let inside = MONDAY + 9 * 60 * MIN;
        assert!(d.on_call(call("deploy", "h"), inside, &mut id).is_empty());
        assert!(d.on_call(call("db_drop", "h"), inside, &mut id).is_empty());
        // Monday 07:30 local: outside; a tool not listed is never matched.
        let early = MONDAY + 6 * 60 * MIN + 30 * MIN;
        assert!(d.on_call(call("read", "h"), early, &mut id).is_empty());
        let h = d.on_call(call("db_drop", "h"), early, &mut id);
        assert_eq!(h.len(), 1);
        assert!(h[0].detail.contains("mon at 07:30"), "{}", h[0].detail);
        // Saturday noon: outside.
        let sat = MONDAY + 5 * 1440 * MIN + 11 * 60 * MIN;
        assert_eq!(d.on_call(call("deploy", "h"), sat, &mut id).len(), 1);
    }

    #[test]
    fn hours_past_midnight_and_bad_input() {
        let h = Hours::parse("22:00-06:00", &["mon".into()], "+00:00").unwrap();
        assert!(h.contains(MONDAY + 23 * 60 * MIN));
        assert!(
            h.contains(MONDAY + 1440 * MIN + 5 * 60 * MIN),
            "tuesday morning"
        );
        assert!(
            !h.contains(MONDAY + 5 * 60 * MIN),
            "monday morning: sunday's night"
        );
        assert!(!h.contains(MONDAY + 12 * 60 * MIN));
        assert!(Hours::parse("8-18", &[], "+00:00").is_err());
        assert!(Hours::parse("08:00-08:00", &[], "+00:00").is_err());
        assert!(Hours::parse("08:00-18:00", &["funday".into()], "+00:00").is_err());
        assert!(Hours::parse("08:00-18:00", &[], "0200").is_err());
        assert!(Hours::parse("08:00-25:00", &[], "+00:00").is_err());
    }

    #[test]
    fn new_tool_respects_learn_for() {
        let mut d = Detector::new(Rules {
            new_tool: Some(NewToolRule {
                learn_for_ms: 5 * MIN,
                action: Action::RaiseRisk,
            }),
            ..rules()
        });
        let mut id = ids();
        assert!(d
            .on_new_tool("bot", "a", MONDAY, MONDAY + MIN, &mut id)
            .is_none());
        let h = d
            .on_new_tool("bot", "b", MONDAY, MONDAY + 6 * MIN, &mut id)
            .unwrap();
        assert_eq!(h.action, Action::RaiseRisk);
        assert!(h.detail.contains("`b`"));
    }

    #[test]
    fn agents_are_bounded() {
        let mut d = Detector::new(Rules {
            rate: Some(RateRule {
                per_minute: 100,
                action: Action::Alert,
            }),
            ..rules()
        });
        let mut id = ids();
        for i in 0..(MAX_AGENTS as i64 + 50) {
            let agent = format!("agent{i}");
            d.on_call(
                CallSeen {
                    agent: &agent,
                    tool: "t",
                    args_hash: "h",
                },
                MONDAY + i,
                &mut id,
            );
        }
        assert_eq!(d.tracked(), MAX_AGENTS);
        assert!(d.agents.contains_key("agent1073"));
        assert!(!d.agents.contains_key("agent0"));
    }

    #[test]
    fn repeat_window_is_bounded() {
        let mut d = Detector::new(Rules {
            repeat: Some(CountRule {
                count: 3,
                within_ms: 60 * MIN,
                action: Action::Alert,
            }),
            ..rules()
        });
        let mut id = ids();
        for i in 0..5000 {
            let h = format!("h{i}");
            d.on_call(call("t", &h), MONDAY + i, &mut id);
        }
        assert_eq!(d.agents["bot"].repeats.len(), MAX_REPEAT_CALLS);
    }

    #[test]
    fn names_round_trip() {
        for r in RuleKind::ALL {
            assert_eq!(r.as_str().parse::<RuleKind>().unwrap(), r);
        }
        assert_eq!("raise_risk".parse::<Action>().unwrap(), Action::RaiseRisk);
        assert!("nope".parse::<Action>().is_err());
        assert_eq!(duration_label(60_000), "1m");
        assert_eq!(duration_label(90_000), "90s");
    }
}
