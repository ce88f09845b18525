//! Flood digests on Discord: when more cards wait than Discord lets the bot
//! post in time (see [`crate::domain::digest::flooded`]), the outbox groups
//! the waiting requests per agent and tool into one digest message each,
//! with **Approve all…** (confirmed in an ephemeral message) and **Deny
//! all**. This file owns the digest's buttons (pure routing), its rendering
//! (pure: everything from the agent escaped, nobody pinged), the step the
//! card outbox runs before each card (group, then post or edit one due
//! digest), and the bulk clicks.
//!
//! A bulk button carries how many requests the message showed: the action
//! covers exactly those (members join in order and never leave), never one
//! that joined after. Each request is decided by its own ordinary vote, with
//! the clicker's rights, so it gets its own decision and audit entry; those
//! decided meanwhile are skipped and counted. Imports no store.

use super::card::{colour, fit, no_mentions, plain, RenderedCard};
use super::escape::{code_block, inline_code, SHORT_BUDGET};
use super::outbox::pause;
use super::rest::{Rest, RestError};
use super::routing::{MAX_CUSTOM_ID, PREFIX};
use crate::app::connection::ConnectionStatus;
use crate::app::digests::DigestRow;
use crate::app::{now_ms, Gateway};
use crate::domain::digest::{self, Tally};
use crate::domain::request::{ApprovalRequest, State};
use crate::domain::Risk;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Shortest time between two renders of one digest: its count changes
/// with every decision, and edits are paced per channel.
pub const EDIT_EVERY: Duration = Duration::from_secs(2);
/// Budget of one sample's arguments.
const SAMPLE_BUDGET: usize = 300;

/// A digest's buttons: the digest and how many requests the clicked
/// message showed (`keyturn:v1:digest_approve:<uuid>:<n>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestRoute {
    /// Opens the confirmation.
    ApproveAll {
        id: Uuid,
        shown: u32,
    },
    /// The confirmation's button: approves.
    Confirm {
        id: Uuid,
        shown: u32,
    },
    DenyAll {
        id: Uuid,
        shown: u32,
    },
}

impl DigestRoute {
    fn parts(&self) -> (&'static str, Uuid, u32) {
        match *self {
            DigestRoute::ApproveAll { id, shown } => ("digest_approve", id, shown),
            DigestRoute::Confirm { id, shown } => ("digest_confirm", id, shown),
            DigestRoute::DenyAll { id, shown } => ("digest_deny", id, shown),
        }
    }

    pub fn digest(&self) -> Uuid {
        self.parts().1
    }

    pub fn shown(&self) -> u32 {
        self.parts().2
    }

    pub fn custom_id(&self) -> String {
        let (action, id, n) = self.parts();
        format!("{PREFIX}{action}:{id}:{n}")
    }

    /// `None` for anything that is not a digest button in its canonical
    /// spelling (then it is routed, or refused, as any other button).
    pub fn parse(custom_id: &str) -> Option<DigestRoute> {
        if custom_id.len() > MAX_CUSTOM_ID {
            return None;
        }
        let rest = custom_id.strip_prefix(PREFIX)?;
        let (action, rest) = rest.split_once(':')?;
        let (id, n) = rest.split_once(':')?;
        let uuid = Uuid::parse_str(id).ok()?;
        if uuid.hyphenated().to_string() != id {
            return None;
        }
        let shown: u32 = n.parse().ok()?;
        if shown == 0 || shown > digest::MAX_MEMBERS || shown.to_string() != n {
            return None;
        }
        Some(match action {
            "digest_approve" => DigestRoute::ApproveAll { id: uuid, shown },
            "digest_confirm" => DigestRoute::Confirm { id: uuid, shown },
            "digest_deny" => DigestRoute::DenyAll { id: uuid, shown },
            _ => return None,
        })
    }
}

/// What the outbox stores as "what the message shows": members and pending.
pub fn shown_key(members: u32, pending: u32) -> String {
    format!("{members}/{pending}")
}

/// Whether a digest needs a post or an edit now.
pub fn is_due(d: &DigestRow, now: i64) -> bool {
    let stale =
        d.message_id.is_none() || d.rendered.as_deref() != Some(&shown_key(d.members, d.pending));
    stale && d.next_attempt_ms <= now
}

/// When a stale digest may be rendered next, if one is stale.
pub fn next_due(live: &[DigestRow]) -> Option<i64> {
    live.iter()
        .filter(|d| {
            d.message_id.is_none()
                || d.rendered.as_deref() != Some(&shown_key(d.members, d.pending))
        })
        .map(|d| d.next_attempt_ms)
        .min()
}

fn risk_colour(r: Risk) -> u32 {
    match r {
        Risk::Low => colour::LOW,
        Risk::Medium => colour::MEDIUM,
        Risk::High => colour::HIGH,
        Risk::Critical => colour::CRITICAL,
    }
}

/// Renders digest `d` from its requests in joining order. `creating`: a
/// new message (with a nonce, so a retried post is not shown twice).
pub fn render(d: &DigestRow, members: &[ApprovalRequest], creating: bool) -> RenderedCard {
    let t = Tally::of(members);
    let agent = inline_code(&d.agent, SHORT_BUDGET);
    let tool = inline_code(&d.tool, SHORT_BUDGET);
    let headline = if t.done() {
        format!(
            "📦 Digest: all {} requests from agent {agent} for tool {tool} are decided",
            t.total
        )
    } else {
        format!(
            "📦 Digest: {} requests from agent {agent} for tool {tool} ({} pending)",
            t.total, t.pending
        )
    };
    let title = fit(
        &format!(
            "{} requests from {} for {}",
            t.total,
            plain(&d.agent),
            plain(&d.tool)
        ),
        200,
    )
    .0;
    let counts = format!(
        "⏳ {} pending · ✅ {} approved · ⛔ {} denied · ⌛ {} timed out · ✖ {} cancelled",
        t.pending, t.approved, t.denied, t.timed_out, t.cancelled
    );
    let description = format!(
        "{counts}\n\nToo many requests arrived at once to post one card each. \
         **Approve all…** (asks to confirm) and **Deny all** act on the {} requests \
         this message shows, each decided and audited on its own; a request decided \
         meanwhile is skipped.",
        t.total
    );
    let risk = members.iter().map(|r| r.risk).max().unwrap_or(Risk::Low);
    let admin_only = members.iter().any(|r| r.admin_only);
    let risk_text = if admin_only {
        format!("{} (admins only)", risk.as_str().to_uppercase())
    } else {
        risk.as_str().to_uppercase()
    };
    let pending: Vec<&ApprovalRequest> = members
        .iter()
        .filter(|r| r.state == State::Pending)
        .collect();
    let deadline = match pending.iter().map(|r| r.deadline_ms).min() {
        Some(ms) => {
            let s = ms.div_euclid(1000);
            format!("<t:{s}:R> (<t:{s}:f>)")
        }
        None => "—".into(),
    };
    let mut fields = vec![
        json!({"name": "Agent", "value": agent, "inline": true}),
        json!({"name": "Tool", "value": tool, "inline": true}),
        json!({"name": "Risk", "value": risk_text, "inline": true}),
        json!({"name": "Earliest deadline", "value": deadline, "inline": true}),
    ];
    let most = members
        .iter()
        .map(|r| r.approvals_required)
        .max()
        .unwrap_or(1);
    if most > 1 {
        fields.push(json!({"name": "Approvals", "value": format!("up to {most} distinct approvers per request: a bulk approval is one vote each"), "inline": false}));
    }
    let samples: Vec<&ApprovalRequest> = if pending.is_empty() {
        members.iter().take(digest::SAMPLES).collect()
    } else {
        pending.iter().take(digest::SAMPLES).copied().collect()
    };
    for (i, r) in samples.iter().enumerate() {
        let args = serde_json::to_string(&r.args).unwrap_or_else(|_| r.args.to_string());
        fields.push(json!({
            "name": format!("Sample {} (arguments, masked)", i + 1),
            "value": code_block(&args, "json", SAMPLE_BUDGET).0,
            "inline": false,
        }));
    }
    let embed = json!({
        "title": title,
        "description": description,
        "color": if t.done() { colour::TIMED_OUT } else { risk_colour(risk) },
        "fields": fields,
        "footer": {"text": format!("digest {}", d.id)},
    });
    let mut rows = Vec::new();
    if !t.done() {
        let n = t.total.min(digest::MAX_MEMBERS);
        rows.push(json!({
            "type": 1,
            "components": [
                {"type": 2, "style": 3, "label": format!("Approve all {n}…"),
                 "custom_id": DigestRoute::ApproveAll { id: d.id, shown: n }.custom_id()},
                {"type": 2, "style": 4, "label": format!("Deny all {n}"),
                 "custom_id": DigestRoute::DenyAll { id: d.id, shown: n }.custom_id()},
            ]
        }));
    }
    let mut payload = json!({
        "content": fit(&headline, 1900).0,
        "embeds": [embed],
        "components": rows,
        "allowed_mentions": no_mentions(),
    });
    if creating {
        let nonce: String = d.id.simple().to_string().chars().take(25).collect();
        payload["nonce"] = json!(nonce);
        payload["enforce_nonce"] = json!(true);
    }
    RenderedCard {
        payload,
        file: None,
        truncated: false,
    }
}

/// What the confirmation asks.
pub fn confirm_text(d: &DigestRow, shown: &[ApprovalRequest]) -> String {
    let t = Tally::of(shown);
    let mut text = format!(
        "Approve these {} requests from agent {} for tool {}?",
        t.pending,
        inline_code(&d.agent, SHORT_BUDGET),
        inline_code(&d.tool, SHORT_BUDGET)
    );
    let already = t.total - t.pending;
    if already > 0 {
        text.push_str(&format!(
            " ({already} of the {} shown {} already decided.)",
            t.total,
            if already == 1 { "is" } else { "are" }
        ));
    }
    text.push_str(" Each is approved by its own vote, as if you clicked its card.");
    text
}

/// The digest part of the card outbox: groups waiting cards and keeps the
/// digest messages true. Runs inside the outbox's task, between cards, so
/// a card is never being posted while its request moves into a digest.
pub struct DigestWorker {
    pub gw: Arc<Gateway>,
    pub rest: Rest,
    pub channel: u64,
    /// `discord.digest_threshold` (0: never digest).
    pub threshold: u32,
    pub max_pause: Duration,
    pub status: ConnectionStatus,
}

/// What one step did.
pub enum Step {
    /// Posted or edited a digest (or tried and must pace): step again.
    Worked,
    /// Nothing due; the next render is due then, if any.
    Idle(Option<i64>),
}

impl DigestWorker {
    /// Groups what waits, then posts or edits one due digest.
    pub async fn step(&self) -> Step {
        let rate = self.rest.posts_per_sec(self.channel);
        match self
            .gw
            .digest_pass(self.channel, self.threshold, rate)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                requests = n,
                "flood: requests moved from cards into digests"
            ),
            Err(e) => tracing::error!(error = %e, "cannot group waiting cards into digests"),
        }
        let live = match self.gw.digests_live().await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the digests");
                return Step::Idle(Some(now_ms() + 1000));
            }
        };
        let now = now_ms();
        let Some(d) = live.iter().find(|d| is_due(d, now)) else {
            return Step::Idle(next_due(&live));
        };
        self.deliver(d).await;
        Step::Worked
    }

    /// Whether an open digest of `req`'s group would take it (then its card
    /// is not posted: the next step moves it). A failed read says no.
    pub async fn takes(&self, req: &ApprovalRequest) -> bool {
        if req.state != State::Pending {
            return false;
        }
        let now = now_ms();
        match self.gw.digests_live().await {
            Ok(live) => live.iter().any(|d| {
                d.channel_id == self.channel
                    && d.open_until_ms > now
                    && d.pending > 0
                    && d.members < digest::MAX_MEMBERS
                    && d.agent == req.agent
                    && d.tool == req.tool
            }),
            Err(_) => false,
        }
    }

    async fn deliver(&self, d: &DigestRow) {
        let members = match self.gw.digest_members(d.id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(digest.id = %d.id, error = %e, "cannot load a digest's requests");
                self.later(d, false).await;
                return;
            }
        };
        let t = Tally::of(&members);
        let result = match d.message_id {
            None => {
                self.rest
                    .post_message(d.channel_id, &render(d, &members, true))
                    .await
            }
            Some(m) => self
                .rest
                .edit_message(d.channel_id, m, &render(d, &members, false).payload)
                .await
                .map(|()| m),
        };
        match result {
            Ok(message_id) => {
                self.status.connected(now_ms());
                if d.message_id.is_none() {
                    tracing::info!(digest.id = %d.id, message.id = message_id, requests = t.total, "digest posted");
                }
                let next = now_ms() + EDIT_EVERY.as_millis() as i64;
                let mut n = 0;
                while let Err(e) = self
                    .gw
                    .digest_done(
                        d.id,
                        message_id,
                        shown_key(t.total, t.pending),
                        t.total,
                        t.done(),
                        next,
                    )
                    .await
                {
                    // Never posted twice: nothing else goes until this is
                    // recorded.
                    tracing::error!(digest.id = %d.id, error = %e, "cannot record the digest; retrying");
                    n += 1;
                    tokio::time::sleep(pause(n, Duration::from_secs(5), i64::MAX)).await;
                }
            }
            Err(RestError::RateLimited(wait)) => {
                tracing::warn!(digest.id = %d.id, retry_after = ?wait, "Discord rate limit; pacing");
            }
            Err(RestError::UnknownMessage) => {
                tracing::warn!(digest.id = %d.id, "the digest was deleted; posting it again");
                self.later(d, true).await;
            }
            Err(RestError::Temporary(e)) => {
                tracing::warn!(digest.id = %d.id, error = %e, "digest delivery failed; will retry");
                self.status
                    .failing(now_ms(), format!("digest delivery: {e}"));
                self.later(d, false).await;
            }
            Err(RestError::Refused(status, e)) => {
                tracing::error!(digest.id = %d.id, status, error = %e, "Discord refused the digest; will retry later");
                self.later(d, false).await;
            }
        }
    }

    async fn later(&self, d: &DigestRow, forget_message: bool) {
        let attempts = d.attempts.saturating_add(1);
        let wait = if forget_message {
            Duration::ZERO
        } else {
            pause(attempts.clamp(0, 30) as u32, self.max_pause, i64::MAX)
        };
        let at = now_ms() + wait.as_millis() as i64;
        if let Err(e) = self
            .gw
            .digest_retry_later(d.id, attempts, at, forget_message)
            .await
        {
            tracing::error!(digest.id = %d.id, error = %e, "cannot record a digest retry");
        }
    }
}

/// The bulk clicks, answered like a card's (approver role checked first,
/// refusals ephemeral, nothing recorded while leadership moves).
impl super::Handler {
    pub(super) async fn digest_click(
        &self,
        ctx: &serenity::all::Context,
        reply: &super::Reply<'_>,
        c: &serenity::all::ComponentInteraction,
        route: DigestRoute,
    ) {
        use serenity::all::{
            ButtonStyle, CreateActionRow, CreateButton, CreateInteractionResponse,
            CreateInteractionResponseMessage,
        };
        let Some(admin) = self.may_decide(ctx, reply, c.member.as_ref(), false).await else {
            tracing::info!(digest.id = %route.digest(), user.id = %c.user.id, "bulk click refused: not an approver");
            return;
        };
        if self.0.stopping.is_cancelled() || !*self.0.lead.borrow() {
            reply
                .respond(&ctx.http, super::ephemeral(super::HANDING_OVER))
                .await;
            return;
        }
        let gw = &self.0.gw;
        let id = route.digest();
        if let DigestRoute::ApproveAll { shown, .. } = route {
            // The confirmation is the first answer: read within the window.
            let read = tokio::time::timeout(super::MODAL_CHECK, async {
                let d = gw.digest(id).await?;
                let m = gw.digest_members(id).await?;
                Ok::<_, crate::app::ports::StoreError>((d, m))
            })
            .await;
            let (d, members) = match read {
                Ok(Ok((Some(d), m))) => (d, crate::app::digests::shown(m, shown)),
                Ok(Ok((None, _))) => {
                    reply
                        .respond(&ctx.http, super::ephemeral("Keyturn has no such digest."))
                        .await;
                    return;
                }
                Ok(Err(e)) => {
                    tracing::error!(digest.id = %id, error = %e, "cannot read a digest");
                    reply
                        .respond(
                            &ctx.http,
                            super::ephemeral("Something went wrong; nothing was approved."),
                        )
                        .await;
                    return;
                }
                Err(_) => {
                    reply
                        .respond(
                            &ctx.http,
                            super::ephemeral("Keyturn is busy; nothing was approved. Try again."),
                        )
                        .await;
                    return;
                }
            };
            let t = Tally::of(&members);
            if t.pending == 0 {
                reply
                    .respond(
                        &ctx.http,
                        super::ephemeral(format!(
                            "Nothing to approve: all {} requests shown are already decided.",
                            t.total
                        )),
                    )
                    .await;
                return;
            }
            let confirm = DigestRoute::Confirm { id, shown };
            let msg = CreateInteractionResponseMessage::new()
                .content(fit(&confirm_text(&d, &members), 1900).0)
                .ephemeral(true)
                .allowed_mentions(super::no_mentions())
                .components(vec![CreateActionRow::Buttons(vec![CreateButton::new(
                    confirm.custom_id(),
                )
                .label(format!("Confirm: approve {}", t.pending))
                .style(ButtonStyle::Success)])]);
            reply
                .respond(&ctx.http, CreateInteractionResponse::Message(msg))
                .await;
            return;
        }
        let approve = matches!(route, DigestRoute::Confirm { .. });
        let ack = reply.respond(&ctx.http, CreateInteractionResponse::Acknowledge);
        let voter = format!("discord:{}", c.user.id);
        let me = c.user.id.to_string();
        let self_user = (!self.0.cfg.allow_self_approval).then_some(me.as_str());
        let work = gw.digest_bulk(
            id,
            route.shown(),
            &voter,
            Some(c.user.name.clone()),
            approve,
            admin,
            self_user,
        );
        let ((), outcome) = tokio::join!(ack, work);
        let text = match outcome {
            Ok((report, failed)) => {
                tracing::info!(digest.id = %id, voter = %voter, approve, decided = report.decided,
                    already = report.already, refused = report.refused, failed, "bulk action on a digest");
                report.text(approve, failed)
            }
            Err(e) => {
                tracing::error!(digest.id = %id, voter = %voter, error = %e, "bulk action failed");
                "Something went wrong; nothing was decided.".to_string()
            }
        };
        self.0.wake.notify_one();
        reply.follow(&ctx.http, text).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::RequestId;
    use serde_json::Value;

    fn id() -> Uuid {
        Uuid::from_u128(u128::MAX)
    }

    fn row() -> DigestRow {
        DigestRow {
            id: id(),
            channel_id: 20,
            agent: "agent".into(),
            tool: "delete_file".into(),
            message_id: None,
            members: 0,
            pending: 0,
            rendered: None,
            open_until_ms: 0,
            attempts: 0,
            next_attempt_ms: 0,
            created_ms: 0,
        }
    }

    fn req(n: u128, state: State, args: Value) -> ApprovalRequest {
        let mut r: ApprovalRequest = serde_json::from_value(json!({
            "id": Uuid::from_u128(n), "agent": "agent", "tool": "delete_file", "args": args,
            "args_hash": "h", "user_id": null, "channel_id": null, "justification": "",
            "task_id": null, "idempotency_key": null, "risk": "high", "approvals_required": 1,
            "admin_only": false, "rule": "r", "rule_detail": "d", "flags": [],
            "created_ms": 0, "deadline_ms": 1_700_000_000_000i64, "state": "pending",
            "decided_by": null, "decided_who": null, "decided_reason": null, "decided_ms": null,
        }))
        .expect("request");
        r.state = state;
        r.id = RequestId(Uuid::from_u128(n));
        r
    }

    #[test]
    fn routes_round_trip_and_fit_discord() {
        for r in [
            DigestRoute::ApproveAll {
                id: id(),
                shown: digest::MAX_MEMBERS,
            },
            DigestRoute::Confirm { id: id(), shown: 1 },
            DigestRoute::DenyAll {
                id: id(),
                shown: 37,
            },
        ] {
            let s = r.custom_id();
            assert!(s.len() <= MAX_CUSTOM_ID, "{s}");
            assert_eq!(DigestRoute::parse(&s), Some(r));
        }
        let good = DigestRoute::DenyAll {
            id: id(),
            shown: 37,
        }
        .custom_id();
        for bad in [
            good.replace(":37", ":0"),
            good.replace(":37", ":037"),
            good.replace(":37", ":+37"),
            good.replace(":37", ":1001"),
            good.replace(":37", ""),
            good.replace("ffff", "FFFF"),
            good.replace("digest_deny", "digest_launch"),
            "keyturn:v1:approve:ffffffff-ffff-ffff-ffff-ffffffffffff".into(),
            format!("{good}:1"),
        ] {
            assert_eq!(DigestRoute::parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn a_digest_shows_counts_samples_and_buttons_while_pending() {
        let evil = json!({"path": "```@everyone <@&1> https://x.y"});
        let members = vec![
            req(1, State::Pending, evil),
            req(2, State::Denied, json!({})),
            req(3, State::Pending, json!({"n": 3})),
        ];
        let r = render(&row(), &members, true);
        let p = &r.payload;
        let content = p["content"].as_str().unwrap();
        assert!(content.contains("3 requests"), "{content}");
        assert!(content.contains("(2 pending)"), "{content}");
        assert_eq!(p["allowed_mentions"], no_mentions());
        let all = p.to_string();
        assert!(!all.contains("```@everyone"), "the fence cannot be closed");
        let ids: Vec<&str> = p["components"][0]["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            vec![
                DigestRoute::ApproveAll { id: id(), shown: 3 }.custom_id(),
                DigestRoute::DenyAll { id: id(), shown: 3 }.custom_id()
            ]
        );
        assert!(p["nonce"].is_string());
        let desc = p["embeds"][0]["description"].as_str().unwrap();
        assert!(desc.contains("⏳ 2 pending"), "{desc}");
        assert!(desc.contains("⛔ 1 denied"), "{desc}");
    }

    #[test]
    fn a_finished_digest_says_so_and_has_no_buttons() {
        let members = vec![
            req(1, State::Approved, json!({})),
            req(2, State::TimedOut, json!({})),
        ];
        let r = render(&row(), &members, false);
        assert!(r.payload["content"]
            .as_str()
            .unwrap()
            .contains("all 2 requests"));
        assert_eq!(r.payload["components"], json!([]));
        assert!(r.payload.get("nonce").is_none());
    }

    #[test]
    fn due_when_stale_and_not_paced() {
        let mut d = row();
        assert!(is_due(&d, 0), "never posted");
        d.message_id = Some(5);
        d.members = 3;
        d.pending = 2;
        d.rendered = Some(shown_key(3, 2));
        assert!(!is_due(&d, 0));
        d.pending = 1;
        d.next_attempt_ms = 10;
        assert!(!is_due(&d, 5), "paced");
        assert!(is_due(&d, 10));
        assert_eq!(next_due(&[d]), Some(10));
    }
}
