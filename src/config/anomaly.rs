//! `[anomaly]`: the anomaly rules (see `crate::domain::anomaly`) as the
//! config file writes them, checked and turned into the domain's
//! [`Rules`]. Every rule is off unless its table is present.

use super::{invalid, ConfigError, Dur};
use crate::domain::anomaly::{
    Action, CountRule, Hours, NewToolRule, OffHoursRule, RateRule, Rules, MAX_THRESHOLD,
};
use crate::domain::policy::ToolPattern;
use serde::Deserialize;
use std::time::Duration;

/// Default `window`: one alert per rule per agent per this long.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// Default `raise_for`.
pub const DEFAULT_RAISE_FOR: Duration = Duration::from_secs(900);
/// Longest `window`, `within`, `raise_for` or `learn_for` accepted.
const MAX_SPAN: Duration = Duration::from_secs(7 * 24 * 3600);

/// A Discord id written as a string (`"1234"`, as Discord shows it) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelId(pub u64);

impl<'de> Deserialize<'de> for ChannelId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ChannelId(n)),
            Raw::S(s) => s.trim().parse().map(ChannelId).map_err(|_| {
                serde::de::Error::custom(format!("`{s}` is not a Discord channel id"))
            }),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// The security channel alerts are posted to (Discord). Unset: alerts
    /// go to the audit log and the server log only.
    pub channel: Option<ChannelId>,
    /// One message per rule per agent per window (default 10m).
    pub window: Option<Dur>,
    /// How long `action = "raise_risk"` sends every call to a person (default 15m).
    pub raise_for: Option<Dur>,
    pub rate: Option<RateConfig>,
    pub denials: Option<CountConfig>,
    pub off_hours: Option<OffHoursConfig>,
    pub new_tool: Option<NewToolConfig>,
    pub repeat: Option<CountConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub per_minute: u32,
    #[serde(default)]
    pub action: Action,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountConfig {
    pub count: u32,
    pub within: Dur,
    #[serde(default)]
    pub action: Action,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffHoursConfig {
    /// Tool names or patterns (`db_*`).
    pub tools: Vec<ToolPattern>,
    /// `08:00-18:00` (may run past midnight: `22:00-06:00`).
    pub hours: String,
    /// Default every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// Default `+00:00`.
    #[serde(default)]
    pub utc_offset: Option<String>,
    #[serde(default)]
    pub action: Action,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewToolConfig {
    /// Tools first seen within this long of an agent's first call are learnt
    /// without an alert (default 0: a fresh deployment's first calls alert).
    pub learn_for: Option<Dur>,
    #[serde(default)]
    pub action: Action,
}

fn span(key: &str, d: Duration, min: Duration) -> Result<i64, ConfigError> {
    if d < min || d > MAX_SPAN {
        return Err(invalid(key, format!("must be between {min:?} and 7 days")));
    }
    Ok(d.as_millis() as i64)
}

fn threshold(key: &str, n: u32) -> Result<u32, ConfigError> {
    if n == 0 || n > MAX_THRESHOLD {
        return Err(invalid(key, format!("must be 1-{MAX_THRESHOLD}")));
    }
    Ok(n)
}

impl AnomalyConfig {
    /// The rules, checked; each error names its key.
    pub fn rules(&self) -> Result<Rules, ConfigError> {
        let second = Duration::from_secs(1);
        let window_ms = span(
            "anomaly.window",
            self.window.map_or(DEFAULT_WINDOW, |d| d.0),
            second,
        )?;
        let raise_for_ms = span(
            "anomaly.raise_for",
            self.raise_for.map_or(DEFAULT_RAISE_FOR, |d| d.0),
            second,
        )?;
        let count =
            |key: &str, c: &Option<CountConfig>| -> Result<Option<CountRule>, ConfigError> {
                c.as_ref()
                    .map(|c| {
                        Ok(CountRule {
                            count: threshold(&format!("anomaly.{key}.count"), c.count)?,
                            within_ms: span(&format!("anomaly.{key}.within"), c.within.0, second)?,
                            action: c.action,
                        })
                    })
                    .transpose()
            };
        let rate = self
            .rate
            .as_ref()
            .map(|r| {
                Ok::<_, ConfigError>(RateRule {
                    per_minute: threshold("anomaly.rate.per_minute", r.per_minute)?,
                    action: r.action,
                })
            })
            .transpose()?;
        let off_hours = self
            .off_hours
            .as_ref()
            .map(|o| {
                if o.tools.is_empty() {
                    return Err(invalid("anomaly.off_hours.tools", "name at least one tool"));
                }
                let hours = Hours::parse(
                    &o.hours,
                    &o.days,
                    o.utc_offset.as_deref().unwrap_or("+00:00"),
                )
                .map_err(|m| invalid("anomaly.off_hours", m))?;
                Ok(OffHoursRule {
                    tools: o.tools.clone(),
                    hours,
                    action: o.action,
                })
            })
            .transpose()?;
        let new_tool = self
            .new_tool
            .as_ref()
            .map(|n| {
                let learn_for_ms = match n.learn_for {
                    Some(d) => span("anomaly.new_tool.learn_for", d.0, Duration::ZERO)?,
                    None => 0,
                };
                Ok::<_, ConfigError>(NewToolRule {
                    learn_for_ms,
                    action: n.action,
                })
            })
            .transpose()?;
        Ok(Rules {
            window_ms,
            raise_for_ms,
            rate,
            denials: count("denials", &self.denials)?,
            off_hours,
            new_tool,
            repeat: count("repeat", &self.repeat)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Rules, String> {
        let c: AnomalyConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.rules().map_err(|e| e.to_string())
    }

    #[test]
    fn everything_off_by_default() {
        let r = parse("").unwrap();
        assert!(!r.any());
        assert_eq!(r.window_ms, 600_000);
    }

    #[test]
    fn the_documented_example_parses() {
        let r = parse(
            r#"
channel = "123456789012345678"
window = "10m"
[rate]
per_minute = 60
action = "alert"
[denials]
count = 5
within = "1m"
[off_hours]
tools = ["deploy", "db_*"]
hours = "08:00-18:00"
days = ["mon", "tue", "wed", "thu", "fri"]
utc_offset = "+00:00"
[new_tool]
[repeat]
count = 5
within = "1m"
action = "raise_risk"
"#,
        )
        .unwrap();
        assert!(r.any());
        assert_eq!(r.repeat.unwrap().action, Action::RaiseRisk);
        assert_eq!(r.new_tool.unwrap().learn_for_ms, 0);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("[rate]\nper_minute = 0\n").unwrap_err();
        assert!(e.contains("anomaly.rate.per_minute"), "{e}");
        let e = parse("[repeat]\ncount = 3\nwithin = \"0s\"\n").unwrap_err();
        assert!(e.contains("anomaly.repeat.within"), "{e}");
        let e = parse("[off_hours]\ntools = [\"x\"]\nhours = \"9-5\"\n").unwrap_err();
        assert!(e.contains("anomaly.off_hours"), "{e}");
        assert!(parse("[rate]\nper_minute = 5\naction = \"explode\"\n").is_err());
        assert!(parse("channel = \"abc\"\n").is_err());
        assert!(parse("bogus = 1\n").is_err());
    }
}
