//! Stateless routing of buttons and modals: the request id (or, for Kill,
//! the run id) lives in the `custom_id` (`keyturn:v1:<action>:<uuid>`), so a
//! card keeps working after a restart. Pure: no serenity, no I/O.

use crate::domain::request::RequestId;
use crate::domain::timed::TimedScopeKind;
use uuid::Uuid;

/// Every custom id we write starts with this.
pub const PREFIX: &str = "keyturn:v1:";
/// Discord's limit on a component's `custom_id`.
pub const MAX_CUSTOM_ID: usize = 100;
/// The text input of the deny-with-reason modal.
pub const REASON_INPUT: &str = "reason";
/// The text input of the edit modal (the arguments as JSON).
pub const ARGS_INPUT: &str = "args";

/// What a button click or modal submit asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Approve(RequestId),
    Deny(RequestId),
    /// Opens the reason modal.
    DenyWithReason(RequestId),
    /// The reason modal was submitted.
    ReasonSubmit(RequestId),
    /// Kill a running run (the id of its [`crate::app::ports::RunRecord`]).
    Kill(Uuid),
    /// The "Allow for…" select: approve and add a time-boxed grant; the
    /// picked option ([`AllowForOption`]) says how long and how far.
    AllowFor(RequestId),
    /// "Edit & approve…": opens the edit modal.
    Edit(RequestId),
    /// The edit modal was submitted.
    EditSubmit(RequestId),
    /// The Pause agent button of an anomaly alert (the alert's id).
    PauseAgent(Uuid),
}

/// One option of the "Allow for…" select: its value is
/// `<duration>:<scope>` (`1h:agent-tool`), one select for both choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowForOption {
    /// `None`: until revoked.
    pub duration: Option<std::time::Duration>,
    pub scope: TimedScopeKind,
}

/// The durations the card offers (value text, length).
pub const ALLOW_FOR_DURATIONS: [(&str, Option<std::time::Duration>); 4] = [
    ("15m", Some(std::time::Duration::from_secs(900))),
    ("1h", Some(std::time::Duration::from_secs(3600))),
    ("8h", Some(std::time::Duration::from_secs(8 * 3600))),
    ("until_revoked", None),
];

/// Discord's limit on a string select's options.
pub const MAX_SELECT_OPTIONS: usize = 25;
/// Discord's limit on a select option's value.
pub const MAX_OPTION_VALUE: usize = 100;

impl AllowForOption {
    /// Every option the card offers for a request; the user scope only
    /// when the request acts for a user. At most 12, within Discord's 25.
    pub fn offered(has_user: bool) -> Vec<AllowForOption> {
        let mut out = Vec::new();
        for scope in TimedScopeKind::ALL {
            if scope == TimedScopeKind::AgentToolUser && !has_user {
                continue;
            }
            for (_, duration) in ALLOW_FOR_DURATIONS {
                out.push(AllowForOption { duration, scope });
            }
        }
        out
    }

    /// The option's value (`1h:agent-tool`).
    pub fn value(&self) -> String {
        let d = ALLOW_FOR_DURATIONS
            .iter()
            .find(|(_, d)| *d == self.duration)
            .map(|(t, _)| *t)
            .unwrap_or("until_revoked");
        format!("{d}:{}", self.scope)
    }

    /// Parses a value the card wrote; anything else is refused (a forged
    /// value never picks a duration or scope the card does not offer).
    pub fn parse(value: &str) -> Option<AllowForOption> {
        let (d, scope) = value.split_once(':')?;
        let duration = ALLOW_FOR_DURATIONS.iter().find(|(t, _)| *t == d)?.1;
        let scope = scope.parse().ok()?;
        Some(AllowForOption { duration, scope })
    }

    /// `1 h: this tool for this agent`.
    pub fn label(&self) -> String {
        format!(
            "{}: {}",
            crate::domain::timed::duration_label(self.duration),
            self.scope.describe()
        )
    }
}

/// A custom id we do not understand (old version, forged, other bot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown component id `{0}`")]
pub struct UnknownRoute(pub String);

impl Route {
    fn parts(&self) -> (&'static str, Uuid) {
        match *self {
            Route::Approve(id) => ("approve", id.0),
            Route::Deny(id) => ("deny", id.0),
            Route::DenyWithReason(id) => ("deny_reason", id.0),
            Route::ReasonSubmit(id) => ("reason", id.0),
            Route::Kill(run) => ("kill", run),
            Route::AllowFor(id) => ("allow_for", id.0),
            Route::Edit(id) => ("edit", id.0),
            Route::EditSubmit(id) => ("edit_submit", id.0),
            Route::PauseAgent(alert) => ("pause_agent", alert),
        }
    }

    /// The request a route acts on; `None` for [`Route::Kill`] (a run).
    pub fn request_id(&self) -> Option<RequestId> {
        match *self {
            Route::Kill(_) | Route::PauseAgent(_) => None,
            _ => Some(RequestId(self.parts().1)),
        }
    }

    /// The id in the custom id, whatever it names (request or run), for logs.
    pub fn target(&self) -> Uuid {
        self.parts().1
    }

    pub fn custom_id(&self) -> String {
        let (action, id) = self.parts();
        format!("{PREFIX}{action}:{id}")
    }

    pub fn parse(custom_id: &str) -> Result<Route, UnknownRoute> {
        let unknown = || UnknownRoute(custom_id.chars().take(MAX_CUSTOM_ID).collect());
        if custom_id.len() > MAX_CUSTOM_ID {
            return Err(unknown());
        }
        let rest = custom_id.strip_prefix(PREFIX).ok_or_else(unknown)?;
        let (action, id) = rest.split_once(':').ok_or_else(unknown)?;
        let uuid = Uuid::parse_str(id).map_err(|_| unknown())?;
        // Only the canonical spelling, so one id means one thing.
        if uuid.hyphenated().to_string() != id {
            return Err(unknown());
        }
        let req = RequestId(uuid);
        Ok(match action {
            "approve" => Route::Approve(req),
            "deny" => Route::Deny(req),
            "deny_reason" => Route::DenyWithReason(req),
            "reason" => Route::ReasonSubmit(req),
            "kill" => Route::Kill(uuid),
            "allow_for" => Route::AllowFor(req),
            "edit" => Route::Edit(req),
            "edit_submit" => Route::EditSubmit(req),
            "pause_agent" => Route::PauseAgent(uuid),
            _ => return Err(unknown()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn id() -> RequestId {
        RequestId(Uuid::from_u128(u128::MAX))
    }

    #[test]
    fn round_trips_and_fits_discord_limits() {
        for r in [
            Route::Approve(id()),
            Route::Deny(id()),
            Route::DenyWithReason(id()),
            Route::ReasonSubmit(id()),
            Route::Kill(Uuid::from_u128(u128::MAX)),
            Route::AllowFor(id()),
            Route::Edit(id()),
            Route::EditSubmit(id()),
            Route::PauseAgent(Uuid::from_u128(u128::MAX)),
        ] {
            let s = r.custom_id();
            assert!(s.len() <= MAX_CUSTOM_ID, "{s}");
            assert_eq!(Route::parse(&s), Ok(r));
        }
        assert_eq!(
            Route::Approve(id()).custom_id(),
            "keyturn:v1:approve:ffffffff-ffff-ffff-ffff-ffffffffffff"
        );
    }

    #[test]
    fn allow_for_options_fit_discord_and_round_trip() {
        let all = AllowForOption::offered(true);
        assert_eq!(all.len(), 12);
        assert!(all.len() <= MAX_SELECT_OPTIONS);
        assert_eq!(AllowForOption::offered(false).len(), 8);
        for o in &all {
            let v = o.value();
            assert!(v.len() <= MAX_OPTION_VALUE, "{v}");
            assert_eq!(AllowForOption::parse(&v), Some(*o));
        }
        assert_eq!(
            AllowForOption::parse("1h:agent-tool").unwrap().label(),
            "1 h: this tool for this agent"
        );
        for bad in [
            "",
            "1h",
            "2s:call",
            "1h:everything",
            "1h:call:x",
            "forever:call",
        ] {
            assert_eq!(AllowForOption::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn kill_names_the_run_and_round_trips() {
        // A run id is a UUID v7, written lowercase and hyphenated.
        let run = Uuid::parse_str("01937a4e-8c2b-7f3d-9a1e-0123456789ab").unwrap();
        let r = Route::Kill(run);
        let s = r.custom_id();
        assert_eq!(s, "keyturn:v1:kill:01937a4e-8c2b-7f3d-9a1e-0123456789ab");
        assert!(s.len() <= MAX_CUSTOM_ID, "{s}");
        assert_eq!(Route::parse(&s), Ok(r));
        assert_eq!(r.request_id(), None);
        assert_eq!(r.target(), run);
        assert_eq!(Route::Approve(id()).request_id(), Some(id()));
        for bad in [
            "keyturn:v1:kill:01937A4E-8C2B-7F3D-9A1E-0123456789AB",
            "keyturn:v1:kill:01937a4e8c2b7f3d9a1e0123456789ab",
            "keyturn:v1:kill:",
            "keyturn:v1:kill:1",
            "keyturn:v1:kill:01937a4e-8c2b-7f3d-9a1e-0123456789ab:x",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_ids_are_errors_not_panics() {
        let good = Route::Approve(id()).custom_id();
        for bad in [
            "",
            "approve:1",
            "keyturn:v2:approve:ffffffff-ffff-ffff-ffff-ffffffffffff",
            "keyturn:v1:launch:ffffffff-ffff-ffff-ffff-ffffffffffff",
            "keyturn:v1:approve:not-a-uuid",
            "keyturn:v1:approve:FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
            "keyturn:v1:approve: ffffffff-ffff-ffff-ffff-ffffffffffff",
            "keyturn:v1:approve",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad}");
        }
        // At the limit and one past it.
        let at = format!("{good}{}", "x".repeat(MAX_CUSTOM_ID - good.len()));
        assert_eq!(at.len(), MAX_CUSTOM_ID);
        assert!(Route::parse(&at).is_err());
        let past = format!("{at}x");
        assert!(Route::parse(&past).is_err());
        assert!(Route::parse(&"é".repeat(200)).is_err());
    }
}
