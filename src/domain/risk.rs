//! Risk levels and what each one means for a call.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How dangerous a tool is. Unknown tools are `High`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum Risk {
    /// Allowed without asking.
    Low,
    /// Allowed without asking, and logged prominently.
    Medium,
    /// Asks an approver.
    High,
    /// Asks an admin.
    Critical,
}

/// Unknown tools are high risk.
impl Default for Risk {
    fn default() -> Self {
        Risk::High
    }
}

impl Risk {
    pub const ALL: [Risk; 4] = [Risk::Low, Risk::Medium, Risk::High, Risk::Critical];

    /// One level up, saturating at `Critical`.
    pub fn raised(self) -> Risk {
        match self {
            Risk::Low => Risk::Medium,
            Risk::Medium => Risk::High,
            Risk::High | Risk::Critical => Risk::Critical,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
            Risk::Critical => "critical",
        }
    }
}

impl TryFrom<String> for Risk {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Risk {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Risk::Low),
            "medium" => Ok(Risk::Medium),
            "high" => Ok(Risk::High),
            "critical" => Ok(Risk::Critical),
            other => Err(format!(
                "unknown risk level `{other}` (expected low, medium, high or critical)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_saturates_at_critical() {
        assert_eq!(Risk::Low.raised(), Risk::Medium);
        assert_eq!(Risk::High.raised(), Risk::Critical);
        assert_eq!(Risk::Critical.raised(), Risk::Critical);
    }

    #[test]
    fn parses_every_level_and_rejects_others() {
        for r in Risk::ALL {
            assert_eq!(r.as_str().parse::<Risk>().unwrap(), r);
        }
        assert!("HIGH".parse::<Risk>().is_err());
    }
}
