//! Anomaly alerts on Discord: one message per alert in the security channel
//! (`[anomaly] channel`), posted and kept up to date from the alerts the
//! store holds (persisted before anything is posted, so an outage or a
//! restart loses none), with a Pause agent button for admins.
//!
//! The poster reads due alerts (new, or changed since their message was
//! last written), posts or edits each through [`Rest`] (which paces calls
//! within Discord's limits), and records the version it showed. Edits of one
//! alert are paced too ([`edit_pause`]), so a storm costs a bounded number
//! of edits while the count stays current. Rendering is pure ([`render`]);
//! imports no serenity.

use super::escape::{inline_code, plain, trusted};
use super::rest::{Rest, RestError};
use super::routing::Route;
use crate::app::ports::Alert;
use crate::app::{now_ms, Gateway};
use crate::domain::anomaly::RuleKind;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Alerts read per pass.
const PASS: u32 = 20;
/// Alerts older than this (last changed) are not posted any more: a channel
/// configured later does not receive a backlog of stale alerts.
const MAX_AGE_MS: i64 = 24 * 3600 * 1000;
/// Read the table again at least this often (alerts written by another
/// process sharing the store reach the leader this way).
const POLL: Duration = Duration::from_secs(5);
/// Edits of one alert: the first [`FAST_EDITS`] at most every
/// [`FAST_EDIT_PAUSE`], then every [`SLOW_EDIT_PAUSE`].
const FAST_EDITS: u32 = 10;
const FAST_EDIT_PAUSE: Duration = Duration::from_secs(1);
const SLOW_EDIT_PAUSE: Duration = Duration::from_secs(15);
/// Longest pause after Discord failures.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Alerts whose edit pacing is remembered at most.
const MAX_TRACKED: usize = 1000;

/// How long to wait before the next edit of an alert edited `edits` times.
pub fn edit_pause(edits: u32) -> Duration {
    if edits < FAST_EDITS {
        FAST_EDIT_PAUSE
    } else {
        SLOW_EDIT_PAUSE
    }
}

/// The message body of an alert (content and the Pause agent button while
/// the agent was not paused from it). Pings nobody.
pub fn render(a: &Alert) -> Value {
    let title = a
        .rule
        .parse::<RuleKind>()
        .map(RuleKind::describe)
        .unwrap_or("anomaly");
    let mut lines = vec![
        format!(
            "**⚠ Keyturn anomaly: {title}** (rule {})",
            inline_code(&a.rule, 40)
        ),
        format!(
            "Agent: {} · action: {}",
            inline_code(&a.agent, 100),
            plain(&a.action)
        ),
        format!("Seen: {}", trusted(&a.detail)),
        format!(
            "Count: **{}** since <t:{}:T>",
            a.count,
            a.opened_ms.div_euclid(1000)
        ),
    ];
    if let Some(by) = &a.paused_by {
        lines.push(format!("⏸ Agent paused by {}", who(by)));
    }
    lines.push(format!("-# alert {}", a.id));
    let content = super::escape::fit(&lines.join("\n"), 1900).0;
    let components = if a.paused_by.is_some() {
        json!([])
    } else {
        match uuid::Uuid::parse_str(&a.id) {
            Ok(id) => json!([{"type": 1, "components": [
                {"type": 2, "style": 4, "label": "Pause agent",
                 "custom_id": Route::PauseAgent(id).custom_id()}
            ]}]),
            Err(_) => json!([]),
        }
    };
    json!({
        "content": content,
        "components": components,
        "allowed_mentions": super::card::no_mentions(),
    })
}

/// `discord:ID` as a user mention (rendered, never pinging: the message's
/// allowed mentions are empty); anything else as code.
fn who(by: &str) -> String {
    match by.strip_prefix("discord:") {
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => format!("<@{id}>"),
        _ => inline_code(by, 100),
    }
}

/// Posts and edits alert messages until stopped.
pub struct AlertPoster {
    pub gw: Arc<Gateway>,
    pub rest: Rest,
    pub channel: u64,
    pub wake: Arc<Notify>,
}

/// Per alert: when it was last edited, and how often.
struct Paced {
    at: Instant,
    edits: u32,
}

impl AlertPoster {
    pub async fn run(self, stop: CancellationToken) {
        let mut paced: HashMap<String, Paced> = HashMap::new();
        let mut backoff = Duration::ZERO;
        loop {
            let mut wait = POLL;
            match self.gw.alerts_due(now_ms() - MAX_AGE_MS, PASS).await {
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the anomaly alerts due; retrying");
                    wait = Duration::from_secs(1);
                }
                Ok(due) => {
                    for a in due {
                        if stop.is_cancelled() {
                            return;
                        }
                        if let Some(p) = paced.get(&a.id) {
                            let next = p.at + edit_pause(p.edits);
                            let now = Instant::now();
                            if a.message_id.is_some() && next > now {
                                wait = wait.min(next - now);
                                continue;
                            }
                        }
                        match self.deliver(&a).await {
                            Ok(()) => {
                                backoff = Duration::ZERO;
                                if paced.len() >= MAX_TRACKED && !paced.contains_key(&a.id) {
                                    paced.clear();
                                }
                                let p = paced.entry(a.id.clone()).or_insert(Paced {
                                    at: Instant::now(),
                                    edits: 0,
                                });
                                if a.message_id.is_some() {
                                    p.edits += 1;
                                }
                                p.at = Instant::now();
                                wait = wait.min(edit_pause(p.edits));
                            }
                            Err(RestError::RateLimited(_)) => {
                                // `Rest` waits before the next call.
                                wait = Duration::ZERO;
                                break;
                            }
                            Err(e @ RestError::Temporary(_)) => {
                                backoff = (backoff * 2)
                                    .max(Duration::from_millis(500))
                                    .min(MAX_BACKOFF);
                                tracing::error!(error = %e, retry_in = ?backoff, "DISCORD FAILED posting an anomaly alert; it stays stored and is retried");
                                wait = backoff;
                                break;
                            }
                            Err(e) => {
                                // Refused for good: recorded as shown, so it is
                                // not retried forever (it is in the audit log
                                // and `keyturn alerts`).
                                tracing::error!(alert.id = %a.id, error = %e, "Discord refused an anomaly alert message");
                                if let Err(e) = self
                                    .gw
                                    .alert_posted(&a.id, a.message_id.unwrap_or(0), a.version)
                                    .await
                                {
                                    tracing::error!(error = %e, "cannot record an alert as shown");
                                }
                            }
                        }
                    }
                }
            }
            if backoff.is_zero() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            } else {
                // Discord is failing: new alerts wait out the pause too (they
                // are stored), so a storm does not hammer it or grow the pause.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    /// Posts the alert's message, or edits it (posting anew if it was
    /// deleted), then records the version shown.
    async fn deliver(&self, a: &Alert) -> Result<(), RestError> {
        let body = render(a);
        let message = match a.message_id.filter(|m| *m != 0) {
            Some(m) => match self.rest.edit_message(self.channel, m, &body).await {
                Ok(()) => m,
                Err(RestError::UnknownMessage) => self.post(&body).await?,
                Err(e) => return Err(e),
            },
            None => self.post(&body).await?,
        };
        if let Err(e) = self.gw.alert_posted(&a.id, message, a.version).await {
            tracing::error!(alert.id = %a.id, error = %e, "cannot record an alert message as posted");
        } else {
            tracing::info!(alert.id = %a.id, count = a.count, "anomaly alert shown on Discord");
        }
        Ok(())
    }

    async fn post(&self, body: &Value) -> Result<u64, RestError> {
        let card = super::card::RenderedCard {
            payload: body.clone(),
            file: None,
            truncated: false,
        };
        self.rest.post_message(self.channel, &card).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert() -> Alert {
        Alert {
            id: "01937a4e-8c2b-7f3d-9a1e-0123456789ab".into(),
            agent: "bot".into(),
            rule: "repeat".into(),
            action: "alert".into(),
            detail: "`deploy` called 5 times with [link](http://x) @everyone <@1>".into(),
            count: 7,
            opened_ms: 1_795_996_800_000,
            updated_ms: 1_795_996_800_000,
            paused_by: None,
            version: 3,
            message_id: None,
            posted_version: 0,
        }
    }

    #[test]
    fn an_alert_escapes_what_was_seen_and_pings_nobody() {
        let v = render(&alert());
        let c = v["content"].as_str().unwrap();
        assert!(c.contains("Count: **7**"), "{c}");
        assert!(c.contains("`deploy`"), "{c}");
        assert!(!c.contains("[link](http://x)"), "{c}");
        assert!(!c.contains("<@1>"), "{c}");
        assert_eq!(v["allowed_mentions"]["parse"], json!([]));
        let button = &v["components"][0]["components"][0];
        assert_eq!(button["label"], "Pause agent");
        assert_eq!(
            Route::parse(button["custom_id"].as_str().unwrap()),
            Ok(Route::PauseAgent(
                uuid::Uuid::parse_str("01937a4e-8c2b-7f3d-9a1e-0123456789ab").unwrap()
            ))
        );
    }

    #[test]
    fn a_paused_alert_says_who_and_has_no_button() {
        let mut a = alert();
        a.paused_by = Some("discord:100".into());
        let v = render(&a);
        assert!(v["content"].as_str().unwrap().contains("paused by <@100>"));
        assert_eq!(v["components"], json!([]));
        a.paused_by = Some("anomaly".into());
        assert!(render(&a)["content"]
            .as_str()
            .unwrap()
            .contains("paused by `anomaly`"));
    }

    #[test]
    fn edits_are_paced_more_slowly_after_the_first_few() {
        assert_eq!(edit_pause(0), FAST_EDIT_PAUSE);
        assert_eq!(edit_pause(FAST_EDITS), SLOW_EDIT_PAUSE);
    }
}
