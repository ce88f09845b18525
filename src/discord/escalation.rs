//! The escalation worker: sends the steps of the escalation ladder
//! (`[[risk.LEVEL.escalation]]`) that come due for pending requests, run
//! with the leader's other Discord duties beside the card outbox.
//!
//! It sleeps until the next step is due (woken early by the change feed
//! when a request is queued, or after missed changes), never polls
//! tightly. Each step is claimed in the store (audited `escalated`, the
//! card marked due so it shows it) before anyone is pinged, so a step
//! never pings twice across a restart or a change of leader. A claim whose
//! message did not reach Discord (a failure, a crash between the claim and
//! the post) is sent again while the request is pending, with the same
//! message nonce and `enforce_nonce`, so Discord drops the copy if the
//! first post did get through (within Discord's nonce window, minutes).
//! Calls are paced by [`Rest`]; a Discord outage only delays pings, never a
//! deadline (the deadline sweep runs elsewhere).
//!
//! Every message pings exactly the step's targets (explicit
//! `allowed_mentions`), names the request on its own (id, agent, tool: a
//! request may have no card message yet), and escapes the agent's text as
//! the card does. The rendering is pure and unit tested. Imports no serenity.

use super::card::{self, RenderedCard};
use super::escape::{inline_code, SHORT_BUDGET};
use super::rest::{Rest, RestError};
use crate::app::escalation::EscalationJob;
use crate::app::ports::{Change, EscalationRecord};
use crate::app::{now_ms, Gateway};
use crate::domain::escalation::Targets;
use crate::domain::request::ApprovalRequest;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// The longest sleep between two passes: a missed wake-up strands nothing
/// for longer than this.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// The longest pause after failed sends before they are tried again.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How long a pass waits after a request was queued, gathering a burst.
const COALESCE: Duration = Duration::from_millis(100);
/// Escalation lines a card shows (the latest ones).
pub const CARD_LINES: usize = 3;
/// The card field's name.
pub const CARD_FIELD: &str = "Escalated";

/// The worker; [`Escalator::run`] until stopped.
pub struct Escalator {
    pub gw: Arc<Gateway>,
    pub rest: Rest,
    /// The guild, for links to cards.
    pub guild_id: Option<u64>,
    /// The approvals channel: where pings go when a request has no card row.
    pub channel_id: u64,
}

/// How a send ended.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Every message reached Discord.
    Done,
    /// Discord refused for good (e.g. a user who takes no DMs): not retried.
    Refused,
    /// Try again later (network, 5xx, rate limit, the store).
    Later,
}

impl Escalator {
    /// Runs until `stop` is cancelled. Steps not sent stay claimed in the
    /// store for the next leader.
    pub async fn run(self, stop: CancellationToken) {
        if !self.gw.escalation_configured() {
            return;
        }
        let mut changes = self.gw.changes();
        let mut failures: u32 = 0;
        tracing::info!("escalation ladder running");
        loop {
            if stop.is_cancelled() {
                return;
            }
            let now = now_ms();
            let mut wait = MAX_SLEEP;
            match self.gw.escalation_pass(now).await {
                Ok(pass) => {
                    let mut failed = false;
                    for job in &pass.unsent {
                        if stop.is_cancelled() {
                            return;
                        }
                        failed |= self.send(job).await == Sent::Later;
                    }
                    for job in &pass.due {
                        if stop.is_cancelled() {
                            return;
                        }
                        match self.gw.claim_escalation(job).await {
                            Ok(true) => {
                                tracing::info!(
                                    request.id = %job.request.id,
                                    step = job.record.step,
                                    action = %job.record.action,
                                    "escalated"
                                );
                                failed |= self.send(job).await == Sent::Later;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::error!(request.id = %job.request.id, step = job.record.step, error = %e, "cannot claim an escalation step; retrying");
                                failed = true;
                            }
                        }
                    }
                    if let Some(next) = pass.next_ms {
                        wait = Duration::from_millis((next - now_ms()).clamp(1, 60_000) as u64);
                    }
                    if failed {
                        failures = failures.saturating_add(1);
                        wait = wait.min(retry_pause(failures));
                    } else {
                        failures = 0;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read what to escalate; retrying");
                    failures = failures.saturating_add(1);
                    wait = retry_pause(failures);
                }
            }
            if wait_for_work(&mut changes, wait, &stop).await {
                return;
            }
        }
    }

    /// Sends a claimed step's message(s) and records it as sent.
    async fn send(&self, job: &EscalationJob) -> Sent {
        let req = &job.request;
        let r = &job.record;
        let card = match self.gw.card(req.id).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(request.id = %req.id, error = %e, "cannot read the card of an escalation; sending without a link");
                None
            }
        };
        let channel = card.as_ref().map_or(self.channel_id, |c| c.channel_id);
        let link = match (self.guild_id, card.as_ref().and_then(|c| c.message_id)) {
            (Some(g), Some(m)) => Some(format!("https://discord.com/channels/{g}/{channel}/{m}")),
            _ => None,
        };
        let mut outcome = Sent::Done;
        let result = if r.action == "dm" {
            let mut result = Ok(());
            for &user in &r.targets.users {
                let payload = dm_message(req, r, link.as_deref(), channel, user);
                let sent = match self.rest.open_dm(user).await {
                    Ok(dm) => self.post(dm, payload).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = sent {
                    match e {
                        RestError::Refused(..) | RestError::UnknownMessage => {
                            tracing::error!(request.id = %req.id, step = r.step, user, error = %e, "Discord refused an escalation DM; not retried");
                            outcome = Sent::Refused;
                        }
                        other => {
                            result = Err(other);
                            break;
                        }
                    }
                }
            }
            result
        } else {
            let payload = channel_message(req, r, link.as_deref());
            match self.post(channel, payload).await {
                Err(e @ (RestError::Refused(..) | RestError::UnknownMessage)) => {
                    tracing::error!(request.id = %req.id, step = r.step, error = %e, "Discord refused an escalation message; not retried");
                    outcome = Sent::Refused;
                    Ok(())
                }
                other => other,
            }
        };
        if let Err(e) = result {
            tracing::warn!(request.id = %req.id, step = r.step, error = %e, "escalation not delivered; will retry");
            return Sent::Later;
        }
        if let Err(e) = self.gw.escalation_sent(req.id, r.step, now_ms()).await {
            // Sent again later with the same nonce: Discord drops the copy.
            tracing::error!(request.id = %req.id, step = r.step, error = %e, "cannot record a sent escalation; retrying");
            return Sent::Later;
        }
        outcome
    }

    async fn post(&self, channel: u64, payload: Value) -> Result<(), RestError> {
        let msg = RenderedCard {
            payload,
            file: None,
            truncated: false,
        };
        self.rest.post_message(channel, &msg).await.map(|_| ())
    }
}

/// Pause after `failures` failed passes: 500 ms, 1 s, 2 s, … up to 30 s.
fn retry_pause(failures: u32) -> Duration {
    let ms = 250u64.saturating_mul(1u64 << failures.min(20));
    Duration::from_millis(ms).min(MAX_RETRY)
}

/// Sleeps `wait`, waking early (within [`COALESCE`]) when a request is
/// queued or changes may have been missed: a burst of new requests costs
/// one pass, not one each. `true` when stopped.
async fn wait_for_work(
    changes: &mut broadcast::Receiver<Change>,
    wait: Duration,
    stop: &CancellationToken,
) -> bool {
    let mut until = tokio::time::Instant::now() + wait;
    let mut open = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return true,
            _ = tokio::time::sleep_until(until) => return false,
            c = changes.recv(), if open => match c {
                Ok(Change::Queued { .. } | Change::Resync)
                | Err(broadcast::error::RecvError::Lagged(_)) => {
                    until = until.min(tokio::time::Instant::now() + COALESCE);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Closed) => open = false,
            },
        }
    }
}

/// The message nonce of one message of a step: the same for every resend,
/// so Discord (`enforce_nonce`) keeps only the first. At most 25 characters.
pub fn nonce(r: &EscalationRecord, target: u64) -> String {
    let mut h = Sha256::new();
    h.update(format!("keyturn-escalation:{}:{}:{target}", r.request_id, r.step).as_bytes());
    hex::encode(h.finalize())[..25].to_string()
}

/// `allowed_mentions` that lets exactly these roles and users be pinged.
fn mentions(t: &Targets) -> Value {
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>();
    json!({"parse": [], "roles": ids(&t.roles), "users": ids(&t.users), "replied_user": false})
}

/// The request named on its own: tool, agent (both escaped) and id.
fn naming(req: &ApprovalRequest) -> String {
    format!(
        "{} from agent {} (request `{}`)",
        inline_code(&req.tool, SHORT_BUDGET),
        inline_code(&req.agent, SHORT_BUDGET),
        req.id
    )
}

fn card_line(link: Option<&str>) -> String {
    match link {
        Some(l) => format!("\nCard: {l}"),
        None => "\nDecide it on its card in the approvals channel, or with `keyturn approve`/`keyturn deny`.".into(),
    }
}

/// The message a channel step (re-ping, backup role, last warning) posts.
pub fn channel_message(req: &ApprovalRequest, r: &EscalationRecord, link: Option<&str>) -> Value {
    let pings: String = r
        .targets
        .roles
        .iter()
        .map(|role| format!("<@&{role}> "))
        .collect();
    let deadline = req.deadline_ms.div_euclid(1000);
    let since = req.created_ms.div_euclid(1000);
    let what = naming(req);
    let text = match r.action.as_str() {
        "last_warning" => format!(
            "⚠️ {pings}Last warning: {what} times out <t:{deadline}:R> and is then denied."
        ),
        "reping" => format!(
            "🔔 {pings}Still waiting for a decision: {what}, waiting since <t:{since}:R>; times out <t:{deadline}:R>."
        ),
        _ => format!(
            "⏫ {pings}Escalated to you: nobody has decided {what}, waiting since <t:{since}:R>; times out <t:{deadline}:R>."
        ),
    };
    let target = r.targets.roles.first().copied().unwrap_or(0);
    json!({
        "content": card::fit(&format!("{text}{}", card_line(link)), card::limits::CONTENT).0,
        "allowed_mentions": mentions(&Targets { roles: r.targets.roles.clone(), users: vec![] }),
        "nonce": nonce(r, target),
        "enforce_nonce": true,
    })
}

/// The DM a `dm` step sends to `user` (it pings nobody: a DM notifies).
pub fn dm_message(
    req: &ApprovalRequest,
    r: &EscalationRecord,
    link: Option<&str>,
    channel: u64,
    user: u64,
) -> Value {
    let deadline = req.deadline_ms.div_euclid(1000);
    let since = req.created_ms.div_euclid(1000);
    let text = format!(
        "⏫ Escalated to you: nobody has decided {} in <#{channel}>, waiting since <t:{since}:R>; times out <t:{deadline}:R>.{}",
        naming(req),
        card_line(link)
    );
    json!({
        "content": card::fit(&text, card::limits::CONTENT).0,
        "allowed_mentions": card::no_mentions(),
        "nonce": nonce(r, user),
        "enforce_nonce": true,
    })
}

/// One card line for a fired step: `Escalated to <@&7> at <t:…:t>`.
fn describe(r: &EscalationRecord) -> String {
    let at = r.claimed_ms.div_euclid(1000);
    let whom: Vec<String> = r
        .targets
        .roles
        .iter()
        .map(|x| format!("<@&{x}>"))
        .chain(r.targets.users.iter().map(|x| format!("<@{x}>")))
        .collect();
    let whom = if whom.is_empty() {
        "nobody (no role configured)".to_string()
    } else {
        whom.join(", ")
    };
    match r.action.as_str() {
        "reping" => format!("Re-pinged {whom} at <t:{at}:t>"),
        "last_warning" => format!("Last warning to {whom} at <t:{at}:t>"),
        "dm" => format!("Escalated to {whom} by DM at <t:{at}:t>"),
        _ => format!("Escalated to {whom} at <t:{at}:t>"),
    }
}

/// Adds the "Escalated" field (the latest [`CARD_LINES`] steps) to a
/// rendered card, decided or not; nothing when no step fired or when the
/// field would not fit the embed's limits. Mentions in an embed never ping.
pub fn show_on_card(payload: &mut Value, fired: &[EscalationRecord]) {
    if fired.is_empty() {
        return;
    }
    let mut fired: Vec<&EscalationRecord> = fired.iter().collect();
    fired.sort_by_key(|r| (r.claimed_ms, r.step));
    let skip = fired.len().saturating_sub(CARD_LINES);
    let mut lines: Vec<String> = fired[skip..].iter().map(|r| describe(r)).collect();
    if skip > 0 {
        lines.insert(0, format!("… and {skip} earlier"));
    }
    let value = card::fit(&lines.join("\n"), card::limits::EMBED_FIELD_VALUE).0;
    let Some(embed) = payload["embeds"].get_mut(0) else {
        return;
    };
    let Some(fields) = embed["fields"].as_array() else {
        return;
    };
    if fields.len() >= card::limits::EMBED_FIELDS {
        return;
    }
    let field = json!({"name": CARD_FIELD, "value": value, "inline": false});
    let mut grown = embed.clone();
    if let Some(f) = grown["fields"].as_array_mut() {
        f.push(field);
    }
    if card::embed_size(&grown) <= card::limits::EMBED_TOTAL {
        *embed = grown;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::RequestId;

    fn request() -> ApprovalRequest {
        ApprovalRequest {
            id: RequestId(uuid::Uuid::from_u128(0x1234)),
            agent: "evil **agent**".into(),
            tool: "delete`file <@&1> @everyone".into(),
            args: json!({"path": "/srv/x"}),
            args_hash: "h".into(),
            user_id: None,
            channel_id: None,
            justification: "cleanup".into(),
            task_id: None,
            idempotency_key: None,
            risk: crate::domain::Risk::High,
            approvals_required: 1,
            admin_only: false,
            rule: "risk_high".into(),
            rule_detail: "high risk asks an approver".into(),
            flags: vec![],
            created_ms: 1_000_000,
            deadline_ms: 1_300_000,
            state: crate::domain::request::State::Pending,
            decided_by: None,
            decided_who: None,
            decided_reason: None,
            decided_ms: None,
            requester_uid: None,
            run: None,
            edit: None,
        }
    }

    fn record(action: &str, targets: Targets) -> EscalationRecord {
        EscalationRecord {
            request_id: RequestId(uuid::Uuid::from_u128(7)),
            step: 1,
            action: action.into(),
            targets,
            claimed_ms: 1_120_000,
            sent_ms: None,
        }
    }

    fn role(r: u64) -> Targets {
        Targets {
            roles: vec![r],
            users: vec![],
        }
    }

    #[test]
    fn a_channel_step_pings_exactly_its_role_and_escapes_the_request() {
        let req = request();
        let r = record("ping_role", role(123));
        let m = channel_message(&req, &r, Some("https://discord.com/channels/1/2/3"));
        let text = m["content"].as_str().unwrap();
        assert!(text.starts_with("⏫ <@&123> Escalated to you"), "{text}");
        assert_eq!(m["allowed_mentions"]["roles"], json!(["123"]));
        assert_eq!(m["allowed_mentions"]["users"], json!([]));
        assert_eq!(m["allowed_mentions"]["parse"], json!([]));
        assert_eq!(m["enforce_nonce"], json!(true));
        // The agent's text is inside code spans: no mention, no markdown.
        assert!(text.contains("`deleteˋfile <@&1> @everyone`"), "{text}");
        assert!(text.contains(&format!("request `{}`", req.id)), "{text}");
        assert!(text.contains("`evil **agent**`"), "{text}");
        assert!(
            text.contains("Card: https://discord.com/channels/1/2/3"),
            "{text}"
        );
        // No card yet: the message still names the request on its own.
        let alone = channel_message(&req, &r, None);
        let t = alone["content"].as_str().unwrap();
        assert!(
            t.contains(&req.id.to_string()) && t.contains("keyturn approve"),
            "{t}"
        );
    }

    #[test]
    fn reping_and_last_warning_say_what_they_are() {
        let req = request();
        let m = channel_message(&req, &record("reping", role(30)), None);
        assert!(m["content"]
            .as_str()
            .unwrap()
            .starts_with("🔔 <@&30> Still waiting"));
        let m = channel_message(&req, &record("last_warning", role(30)), None);
        let t = m["content"].as_str().unwrap();
        assert!(t.starts_with("⚠️ <@&30> Last warning"), "{t}");
        assert!(t.contains("<t:1300:R>"), "{t}");
        // No role to ping: nobody is.
        let m = channel_message(&req, &record("reping", Targets::default()), None);
        assert_eq!(m["allowed_mentions"]["roles"], json!([]));
    }

    #[test]
    fn a_dm_pings_nobody_and_nonces_differ_per_user_and_step() {
        let req = request();
        let t = Targets {
            roles: vec![],
            users: vec![5, 6],
        };
        let r = record("dm", t);
        let a = dm_message(&req, &r, None, 20, 5);
        assert_eq!(a["allowed_mentions"], card::no_mentions());
        assert!(a["content"].as_str().unwrap().contains("<#20>"));
        let b = dm_message(&req, &r, None, 20, 6);
        assert_ne!(a["nonce"], b["nonce"]);
        assert_eq!(a["nonce"], dm_message(&req, &r, None, 20, 5)["nonce"]);
        let mut other = r.clone();
        other.step = 2;
        assert_ne!(nonce(&r, 5), nonce(&other, 5));
        assert_eq!(nonce(&r, 5).len(), 25);
    }

    #[test]
    fn the_card_shows_the_latest_steps() {
        let req = request();
        let mut payload = card::render(&req, &card::CardSettings::default(), false).payload;
        let before = payload["embeds"][0]["fields"].as_array().unwrap().len();
        show_on_card(&mut payload, &[]);
        assert_eq!(
            payload["embeds"][0]["fields"].as_array().unwrap().len(),
            before
        );
        let fired: Vec<EscalationRecord> = (0..5u32)
            .map(|i| EscalationRecord {
                step: i,
                claimed_ms: 1_000_000 + i64::from(i) * 1000,
                ..record("ping_role", role(100 + u64::from(i)))
            })
            .collect();
        show_on_card(&mut payload, &fired);
        let fields = payload["embeds"][0]["fields"].as_array().unwrap();
        assert_eq!(fields.len(), before + 1);
        let f = fields.last().unwrap();
        assert_eq!(f["name"], CARD_FIELD);
        let v = f["value"].as_str().unwrap();
        assert!(
            v.starts_with("… and 2 earlier\nEscalated to <@&102> at <t:1002:t>"),
            "{v}"
        );
        assert!(v.ends_with("Escalated to <@&104> at <t:1004:t>"), "{v}");
        // Mentions in an embed ping nobody; the card's own rule stands.
        assert_eq!(payload["allowed_mentions"]["parse"], json!([]));
    }
}
