//! The Discord bot: one more way for humans to decide, beside the CLI.
//!
//! It owns the serenity client (the only place serenity is imported), the
//! card outbox, button/modal/slash-command handling and pairing by DM. It
//! calls only [`crate::app::Gateway`] (persistence included: it never holds
//! the store) and follows the app's change feed to know which cards to
//! post or edit; it never talks to the socket, the CLI or the store
//! adapter. Cards are rendered by [`card`] (pure), buttons routed by
//! [`routing`] (pure), and posted/edited by [`outbox`] through [`rest`].

pub mod alerts;
pub mod card;
pub mod chart;
pub mod commands;
pub mod digest;
mod edit;
pub mod escalation;
mod escape;
pub mod outbox;
pub mod rest;
pub mod routing;

use crate::app::connection::ConnectionStatus;
use crate::app::ports::Change;
use crate::app::{now_ms, AppError, Gateway};
use crate::config::DiscordConfig;
use crate::domain::request::RequestId;
use anyhow::Context as _;
use card::CardSettings;
use routing::Route;
use serenity::all::{
    ActionRowComponent, Channel, ChannelId, ClientBuilder, CommandInteraction,
    ComponentInteraction, ComponentInteractionDataKind, Context, CreateActionRow,
    CreateAllowedMentions, CreateAttachment, CreateInputText, CreateInteractionResponse,
    CreateInteractionResponseFollowup, CreateInteractionResponseMessage, CreateMessage,
    CreateModal, EditInteractionResponse, Event, EventHandler, GatewayIntents, GuildId, Http,
    HttpBuilder, InputTextStyle, Interaction, Member, Message, ModalInteraction, Permissions,
    RawEventHandler, Ready, ShardManager, UserId,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch, Mutex, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long start-up checks may take before `serve` goes on without Discord.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between two connection attempts while Discord is unreachable.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(30);
/// How long a click may wait for the store before the reason modal opens anyway.
const MODAL_CHECK: Duration = Duration::from_millis(1500);
/// Longest wait between two gateway sessions after failures.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(300);
/// A session that lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// The running bot; [`Bot::shutdown`] stops it in order.
pub struct Bot {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    status: ConnectionStatus,
}

/// What the event handlers share.
struct Shared {
    gw: Arc<Gateway>,
    cfg: DiscordConfig,
    /// Pokes the outbox after a card was marked due from here.
    wake: Arc<Notify>,
    /// Connected / connecting / failed, for health reports.
    status: ConnectionStatus,
    /// Per-user limits on DM answers and pairing codes.
    dms: Mutex<commands::DmLimiter>,
    /// Whether this process still leads, and the bot's own stop: a click
    /// that reaches a bot which is handing over is refused, not half-done.
    lead: watch::Receiver<bool>,
    stopping: CancellationToken,
}

/// What a click that arrives while leadership moves to another process is
/// answered with (nothing was recorded).
pub const HANDING_OVER: &str = "Keyturn is handing over to another server right now, so your click was not recorded. Try again in a few seconds.";

#[derive(Clone)]
struct Handler(Arc<Shared>);

fn no_mentions() -> CreateAllowedMentions {
    CreateAllowedMentions::new()
        .empty_users()
        .empty_roles()
        .replied_user(false)
}

fn card_settings(cfg: &DiscordConfig) -> CardSettings {
    CardSettings {
        approver_role_id: cfg.approver_role_id,
        admin_role_id: cfg.admin_role_id,
        ping_approvers: cfg.ping_approvers,
        ping_admins: cfg.ping_admins,
    }
}

fn build_http(cfg: &DiscordConfig) -> Http {
    let mut b = HttpBuilder::new(&cfg.token.0);
    if let Some(base) = &cfg.api_base {
        // Routes are "https://discord.com/api/v10/…"; the proxy replaces the
        // origin. serenity's rate limiter builds URLs without the proxy, so it
        // must be off; the outbox has its own 429 handling.
        b = b
            .proxy(base.trim_end_matches('/'))
            .ratelimiter_disabled(true);
    }
    b.build()
}

fn describe(e: &serenity::Error) -> String {
    match e {
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(r)) => {
            match r.status_code.as_u16() {
                401 => "Discord rejected the bot token (HTTP 401); check discord.token or KEYTURN_DISCORD_TOKEN".into(),
                s => format!("Discord answered HTTP {s}: {}", r.error.message),
            }
        }
        other => {
            // serenity's own text is vague ("Error while sending HTTP request"):
            // add the causes (connection refused, DNS, timeout…).
            let mut text = other.to_string();
            let mut last = text.clone();
            let mut cause = std::error::Error::source(other);
            while let Some(c) = cause {
                let t = c.to_string();
                if t != last {
                    text.push_str(": ");
                    text.push_str(&t);
                    last = t;
                }
                cause = c.source();
            }
            text
        }
    }
}

/// Why the start-up checks failed.
#[derive(Debug)]
enum StartError {
    /// Bad token, unknown guild or channel, missing permissions: exit.
    Permanent(String),
    /// Unreachable, 5xx, 429, no answer: serve anyway and keep trying.
    Transient(String),
}

/// Permissions the bot needs in the approvals channel.
fn needed_permissions() -> Permissions {
    Permissions::VIEW_CHANNEL
        | Permissions::SEND_MESSAGES
        | Permissions::EMBED_LINKS
        | Permissions::ATTACH_FILES
        | Permissions::READ_MESSAGE_HISTORY
}

/// Sorts a failed REST call: a 4xx other than 429 cannot heal by itself.
fn classify_start(e: &serenity::Error, what: &str) -> StartError {
    let text = format!("{what}: {}", describe(e));
    match e {
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(r)) => {
            let s = r.status_code.as_u16();
            if (400..500).contains(&s) && s != 429 && s != 408 {
                StartError::Permanent(text)
            } else {
                StartError::Transient(text)
            }
        }
        _ => StartError::Transient(text),
    }
}

/// The start-up checks: the token, the gateway URL, the guild, the
/// approvals channel (in that guild) and the bot's permissions there.
/// Returns the gateway URL.
async fn check(http: &Http, cfg: &DiscordConfig, channel: u64) -> Result<String, StartError> {
    let me = http
        .get_current_user()
        .await
        .map_err(|e| classify_start(&e, "checking the bot token"))?;
    // serenity silently falls back to wss://gateway.discord.gg when this
    // fails, and would then hang; ask ourselves.
    let gateway_url = match &cfg.gateway_url {
        Some(u) => u.clone(),
        None => {
            http.get_gateway()
                .await
                .map_err(|e| classify_start(&e, "getting the gateway URL"))?
                .url
        }
    };
    if let Some(guild) = cfg.guild_id {
        let g = http
            .get_guild(GuildId::new(guild))
            .await
            .map_err(|e| classify_start(&e, &format!("looking up discord.guild_id {guild}")))?;
        let ch = match http.get_channel(ChannelId::new(channel)).await {
            Ok(Channel::Guild(c)) => c,
            Ok(_) => {
                return Err(StartError::Permanent(format!(
                    "discord.approvals_channel_id {channel} is not a server channel"
                )))
            }
            Err(e) => {
                return Err(classify_start(
                    &e,
                    &format!("looking up discord.approvals_channel_id {channel}"),
                ))
            }
        };
        if ch.guild_id.get() != guild {
            return Err(StartError::Permanent(format!(
                "discord.approvals_channel_id {channel} is not in discord.guild_id {guild}"
            )));
        }
        let member = http
            .get_member(GuildId::new(guild), me.id)
            .await
            .map_err(|e| classify_start(&e, "looking up the bot's roles"))?;
        let have = g.user_permissions_in(&ch, &member);
        let missing = needed_permissions() - have;
        if !missing.is_empty() {
            return Err(StartError::Permanent(format!(
                "the bot lacks permissions in the approvals channel #{} ({channel}): {missing}",
                ch.name
            )));
        }
    }
    tracing::info!(bot.id = %me.id, bot.name = %me.name, gateway = %gateway_url, "Discord bot token accepted");
    Ok(gateway_url)
}

/// Starts the bot. Permanent errors (bad token, unknown guild or approvals
/// channel, missing permissions) fail at once with a clear message. A
/// transient one (unreachable, 5xx, no answer within the start timeout) is
/// logged loudly and the bot keeps connecting in the background, so the
/// sockets are served meanwhile; [`Bot::status`] shows where it stands.
///
/// `status` is the connection's state for health reports: `serve` keeps
/// one across the bot's restarts (a process that stops leading stops its
/// bot and shows `standby` there).
pub async fn start(
    gw: Arc<Gateway>,
    parent: &CancellationToken,
    status: ConnectionStatus,
) -> anyhow::Result<Bot> {
    let cfg = gw.config().discord.clone();
    let channel = cfg
        .approvals_channel_id
        .context("discord.approvals_channel_id is not set")?;
    let where_ = cfg
        .api_base
        .clone()
        .unwrap_or_else(|| "https://discord.com".into());
    status.connecting(now_ms());
    let http = build_http(&cfg);
    let start_timeout = cfg.start_timeout.map_or(START_TIMEOUT, |d| d.0);
    let first = match tokio::time::timeout(start_timeout, check(&http, &cfg, channel)).await {
        Ok(Ok(url)) => Some(url),
        Ok(Err(StartError::Permanent(e))) => {
            anyhow::bail!("cannot start the Discord bot ({where_}): {e}")
        }
        Ok(Err(StartError::Transient(e))) => {
            tracing::error!(error = %e, "DISCORD UNREACHABLE at start ({where_}); serving without it and retrying in the background");
            status.failing(now_ms(), e);
            None
        }
        Err(_) => {
            let e = format!("Discord API at {where_} did not answer within {start_timeout:?}");
            tracing::error!(error = %e, "DISCORD UNREACHABLE at start; serving without it and retrying in the background");
            status.failing(now_ms(), e);
            None
        }
    };

    let stop = parent.child_token();
    let wake = Arc::new(Notify::new());
    let changes = gw.changes();
    let shared = Arc::new(Shared {
        gw: gw.clone(),
        cfg: cfg.clone(),
        wake: wake.clone(),
        status: status.clone(),
        dms: Mutex::default(),
        lead: gw.leadership(),
        stopping: stop.clone(),
    });
    let tasks = vec![
        tokio::spawn(wake_on_changes(changes, wake, stop.clone())),
        tokio::spawn(connect(
            Handler(shared),
            http,
            first,
            channel,
            start_timeout,
            stop.clone(),
        )),
    ];
    Ok(Bot {
        stop,
        tasks,
        status,
    })
}

/// Finishes the start in the background: repeats the checks until they
/// pass (if the first try failed), brings the outbox up to date, then runs
/// the outbox and the gateway sessions until stopped.
async fn connect(
    handler: Handler,
    http: Http,
    first: Option<String>,
    channel: u64,
    start_timeout: Duration,
    stop: CancellationToken,
) {
    let sh = handler.0.clone();
    let gateway_url = match first {
        Some(u) => u,
        None => {
            let mut wait = Duration::from_millis(500);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                match tokio::time::timeout(start_timeout, check(&http, &sh.cfg, channel)).await {
                    Ok(Ok(u)) => {
                        tracing::warn!("Discord reachable again; the bot is starting");
                        break u;
                    }
                    Ok(Err(StartError::Permanent(e))) => {
                        tracing::error!(error = %e, "DISCORD REFUSES the bot; fix the configuration (retrying slowly)");
                        sh.status.failed(now_ms(), e);
                        wait = MAX_CONNECT_BACKOFF;
                    }
                    Ok(Err(StartError::Transient(e))) => {
                        tracing::error!(error = %e, retry_in = ?wait, "DISCORD STILL UNREACHABLE; cards wait, the sockets are served");
                        sh.status.failing(now_ms(), e);
                        wait = (wait * 2).min(MAX_CONNECT_BACKOFF);
                    }
                    Err(_) => {
                        let e = format!("Discord did not answer within {start_timeout:?}");
                        tracing::error!(error = %e, retry_in = ?wait, "DISCORD STILL UNREACHABLE; cards wait, the sockets are served");
                        sh.status.failing(now_ms(), e);
                        wait = (wait * 2).min(MAX_CONNECT_BACKOFF);
                    }
                }
            }
        }
    };
    // Requests queued or decided while the bot was down.
    loop {
        match sh.gw.card_reconcile(channel).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(cards = n, "cards to post or update after start");
                }
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot bring the card outbox up to date; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    // One client, so the card outbox, the digests, the escalations and the
    // alert poster share its pacing.
    let rest = rest::Rest::new(&sh.cfg.token.0, sh.cfg.api_base.as_deref());
    let max_pause = sh
        .cfg
        .max_retry_pause
        .map_or(outbox::DEFAULT_MAX_PAUSE, |d| d.0);
    let outbox = outbox::Outbox {
        gw: sh.gw.clone(),
        rest: rest.clone(),
        settings: card_settings(&sh.cfg),
        wake: sh.wake.clone(),
        status: sh.status.clone(),
        max_pause,
        digests: Some(digest::DigestWorker {
            gw: sh.gw.clone(),
            rest: rest.clone(),
            channel,
            threshold: sh
                .cfg
                .digest_threshold
                .unwrap_or(crate::domain::digest::DEFAULT_THRESHOLD),
            max_pause,
            status: sh.status.clone(),
        }),
    };
    let outbox = tokio::spawn(outbox.run(stop.clone()));
    let escalator = escalation::Escalator {
        gw: sh.gw.clone(),
        // The same rate limits as the cards: one bot, one budget.
        rest: rest.clone(),
        guild_id: sh.cfg.guild_id,
        channel_id: channel,
    };
    let escalator = tokio::spawn(escalator.run(stop.clone()));
    // Anomaly alerts, when a security channel is configured.
    let alerts = match (sh.gw.config().anomaly.channel, sh.gw.alerts_wake()) {
        (Some(channel), Some(wake)) => Some(tokio::spawn(
            alerts::AlertPoster {
                gw: sh.gw.clone(),
                rest,
                channel: channel.0,
                wake,
            }
            .run(stop.clone()),
        )),
        _ => None,
    };
    run_gateway(handler, gateway_url, stop).await;
    let _ = outbox.await;
    let _ = escalator.await;
    if let Some(alerts) = alerts {
        let _ = alerts.await;
    }
}

impl Bot {
    /// The Discord connection's state, for health reports.
    pub fn status(&self) -> ConnectionStatus {
        self.status.clone()
    }

    /// Closes the gateway session and stops the outbox; cards not yet
    /// delivered stay in the store for the next start.
    pub async fn shutdown(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        tracing::info!("Discord bot stopped");
    }
}

/// Wakes the outbox whenever the store commits a change that marks cards
/// due: the store creates and bumps card rows itself, in the transaction of
/// the request's change, so there is nothing to write here. A lag only
/// means missed wake-ups: wake once and carry on (the outbox reads what is due).
async fn wake_on_changes(
    mut changes: broadcast::Receiver<Change>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => break,
            c = changes.recv() => c,
        };
        match change {
            Ok(
                Change::Queued { .. }
                | Change::Voted { .. }
                | Change::Resolved(_)
                | Change::DecidedElsewhere(_)
                | Change::CardsDue
                | Change::Resync,
            )
            | Err(broadcast::error::RecvError::Lagged(_)) => wake.notify_one(),
            Ok(Change::PolicyChanged | Change::KillRun { .. }) => {}
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// Logs events serenity could not parse (it drops them at DEBUG otherwise).
struct UnknownEvents;

#[serenity::async_trait]
impl RawEventHandler for UnknownEvents {
    async fn raw_event(&self, _ctx: Context, ev: Event) {
        if let Event::Unknown(u) = ev {
            tracing::warn!(kind = %u.kind, "Discord sent an event serenity could not parse");
        }
    }
}

/// Runs gateway sessions until stopped, backing off between failed ones so
/// a crash loop does not burn the daily IDENTIFY quota.
async fn run_gateway(handler: Handler, gateway_url: String, stop: CancellationToken) {
    let intents = GatewayIntents::GUILDS | GatewayIntents::DIRECT_MESSAGES;
    let mut backoff = Duration::from_secs(1);
    let shards: Arc<Mutex<Option<Arc<ShardManager>>>> = Arc::default();
    loop {
        let started = Instant::now();
        let built = ClientBuilder::new_with_http(build_http(&handler.0.cfg), intents)
            .event_handler(handler.clone())
            .raw_event_handler(UnknownEvents)
            .await;
        match built {
            Ok(mut client) => {
                *client.ws_url.lock().await = gateway_url.clone();
                *shards.lock().await = Some(client.shard_manager.clone());
                let mgr = client.shard_manager.clone();
                let result = tokio::select! {
                    r = client.start() => Some(r),
                    _ = stop.cancelled() => None,
                };
                match result {
                    None => {
                        mgr.shutdown_all().await;
                        break;
                    }
                    Some(Ok(())) => {
                        tracing::warn!("Discord gateway session ended");
                        handler.0.status.failing(now_ms(), "gateway session ended");
                    }
                    Some(Err(e)) => {
                        let e = describe(&e);
                        tracing::error!(error = %e, "Discord gateway session failed");
                        handler.0.status.failing(now_ms(), format!("gateway: {e}"));
                    }
                }
            }
            Err(e) => {
                let e = describe(&e);
                tracing::error!(error = %e, "cannot build the Discord client");
                handler.0.status.failing(now_ms(), format!("gateway: {e}"));
            }
        }
        if started.elapsed() > HEALTHY_SESSION {
            backoff = Duration::from_secs(1);
        }
        tracing::info!(wait = ?backoff, "reconnecting to Discord after a pause");
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
    }
}

/// The roles of whoever clicked: `(is_approver, is_admin)`; `None` outside a guild.
fn roles_of(cfg: &DiscordConfig, member: Option<&Member>) -> Option<(bool, bool)> {
    let m = member?;
    let has = |role: Option<u64>| role.is_some_and(|r| m.roles.iter().any(|x| x.get() == r));
    let admin = has(cfg.admin_role_id);
    Some((admin || has(cfg.approver_role_id), admin))
}

fn ephemeral(text: impl Into<String>) -> CreateInteractionResponse {
    CreateInteractionResponse::Message(
        CreateInteractionResponseMessage::new()
            .content(card::fit(&text.into(), 1900).0)
            .ephemeral(true)
            .allowed_mentions(no_mentions()),
    )
}

fn followup(text: impl Into<String>) -> CreateInteractionResponseFollowup {
    CreateInteractionResponseFollowup::new()
        .content(card::fit(&text.into(), 1900).0)
        .ephemeral(true)
        .allowed_mentions(no_mentions())
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        tracing::info!(bot = %ready.user.name, "Discord gateway ready");
        self.0.status.connected(now_ms());
        // Discord answers: nothing should sit out a backoff any longer.
        match self.0.gw.cards_retry_now().await {
            Ok(n) if n > 0 => self.0.wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot make waiting cards due"),
        }
        if let Some(guild) = self.0.cfg.guild_id {
            match GuildId::new(guild)
                .set_commands(&ctx.http, commands::definitions())
                .await
            {
                Ok(c) => tracing::info!(commands = c.len(), "slash commands registered"),
                Err(e) => {
                    tracing::error!(error = %describe(&e), "cannot register slash commands")
                }
            }
        }
    }

    async fn message(&self, ctx: Context, msg: Message) {
        // Only DMs from people; never our own echoes.
        if msg.guild_id.is_some() || msg.author.bot || msg.author.id == ctx.cache.current_user().id
        {
            return;
        }
        let gw = &self.0.gw;
        let user = msg.author.id.get().to_string();
        // DMs are answered in a small burst, then one every few seconds per
        // user, so a flood of DMs is not a flood of Discord calls.
        if !self.0.dms.lock().await.reply(&user, Instant::now()) {
            tracing::debug!(user.id = %user, "DM ignored: answered one moments ago");
            return;
        }
        let wants_new = commands::asks_new_code(&msg.content);
        if !wants_new {
            // A second "hi" must not kill the code the first one gave.
            match gw.pairing_codes().await {
                Ok(live) => {
                    if let Some(p) = live.iter().find(|p| p.user_id == user) {
                        self.answer_dm(&ctx, &msg, commands::live_code_text(p.expires_ms))
                            .await;
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot look up pairing codes");
                    self.answer_dm(&ctx, &msg, "Something went wrong; try again later.".into())
                        .await;
                    return;
                }
            }
        }
        if let Err(wait) = self.0.dms.lock().await.new_code(&user, Instant::now()) {
            tracing::info!(user.id = %user, "pairing code refused: too many for this user");
            let at = now_ms() + wait.as_millis() as i64;
            self.answer_dm(
                &ctx,
                &msg,
                format!(
                    "You have asked for too many pairing codes; try again <t:{}:R>.",
                    at.div_euclid(1000) + 1
                ),
            )
            .await;
            return;
        }
        let result = gw
            .request_pairing(&user, Some(msg.author.name.clone()))
            .await;
        if result.is_err() {
            self.0.dms.lock().await.refund(&user);
        }
        let text = match result {
            Ok((code, expires)) => commands::pairing_text(&code, expires),
            Err(AppError::Pairing(m)) if m.contains("already paired") => {
                "You are already paired with Keyturn.".to_string()
            }
            Err(AppError::Store(e)) => {
                tracing::error!(error = %e, "pairing request failed");
                "Something went wrong; try again later.".to_string()
            }
            Err(e) => format!("Cannot give you a pairing code: {e}"),
        };
        self.answer_dm(&ctx, &msg, text).await;
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        match interaction {
            Interaction::Component(c) => self.component(&ctx, c).await,
            Interaction::Modal(m) => self.modal(&ctx, m).await,
            Interaction::Command(c) => self.command(&ctx, c).await,
            _ => {}
        }
    }
}

impl Handler {
    async fn answer_dm(&self, ctx: &Context, msg: &Message, text: String) {
        let reply = CreateMessage::new()
            .content(text)
            .allowed_mentions(no_mentions());
        if let Err(e) = msg.channel_id.send_message(&ctx.http, reply).await {
            tracing::warn!(error = %describe(&e), "cannot answer a DM");
        }
    }
}

/// One interaction's reply channel, whatever its kind.
enum Reply<'a> {
    Component(&'a ComponentInteraction),
    Modal(&'a ModalInteraction),
}

impl Reply<'_> {
    async fn respond(&self, http: &Http, r: CreateInteractionResponse) {
        let res = match self {
            Reply::Component(c) => c.create_response(http, r).await,
            Reply::Modal(m) => m.create_response(http, r).await,
        };
        if let Err(e) = res {
            tracing::warn!(error = %describe(&e), "cannot answer an interaction");
        }
    }

    async fn follow(&self, http: &Http, text: String) {
        let res = match self {
            Reply::Component(c) => c.create_followup(http, followup(text)).await,
            Reply::Modal(m) => m.create_followup(http, followup(text)).await,
        };
        if let Err(e) = res {
            tracing::warn!(error = %describe(&e), "cannot send an interaction follow-up");
        }
    }
}

impl Handler {
    /// Whether the member may decide requests at all (approver role). On
    /// `None` the refusal has been answered; `Some(is_admin)` otherwise.
    /// `kill`: the click is a Kill button (same roles, its own wording).
    async fn may_decide(
        &self,
        ctx: &Context,
        reply: &Reply<'_>,
        member: Option<&Member>,
        kill: bool,
    ) -> Option<bool> {
        let Some((approver, admin)) = roles_of(&self.0.cfg, member) else {
            let text = if kill {
                "Runs are killed in the server."
            } else {
                "Requests are decided in the server."
            };
            reply.respond(&ctx.http, ephemeral(text)).await;
            return None;
        };
        if !approver {
            let text = if kill {
                "You need the approver role to kill Keyturn runs."
            } else {
                "You need the approver role to decide Keyturn requests."
            };
            reply.respond(&ctx.http, ephemeral(text)).await;
            return None;
        }
        Some(admin)
    }

    async fn component(&self, ctx: &Context, c: ComponentInteraction) {
        let reply = Reply::Component(&c);
        if let Some(route) = digest::DigestRoute::parse(&c.data.custom_id) {
            return self.digest_click(ctx, &reply, &c, route).await;
        }
        let route = match Route::parse(&c.data.custom_id) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, user.id = %c.user.id, "unknown button");
                reply
                    .respond(
                        &ctx.http,
                        ephemeral("This button is not one Keyturn knows."),
                    )
                    .await;
                return;
            }
        };
        if let Route::PauseAgent(alert) = route {
            self.pause_from_alert(ctx, &reply, &c, alert).await;
            return;
        }
        let kill = matches!(route, Route::Kill(_));
        let Some(admin) = self.may_decide(ctx, &reply, c.member.as_ref(), kill).await else {
            tracing::info!(target.id = %route.target(), user.id = %c.user.id, "click refused: not an approver");
            return;
        };
        match route {
            Route::Approve(id) => {
                self.decide(ctx, &reply, &c.user, id, true, None, admin)
                    .await
            }
            Route::Deny(id) => {
                self.decide(ctx, &reply, &c.user, id, false, None, admin)
                    .await
            }
            Route::DenyWithReason(id) => {
                // A modal cannot follow a deferral, so check the state first,
                // but never so long that the 3-second window closes: a slow
                // store just means the modal opens and the submit is refused.
                let status = tokio::time::timeout(MODAL_CHECK, self.0.gw.status(id)).await;
                if let Ok(Ok(r)) = status {
                    if r.state.is_terminal() {
                        reply.respond(&ctx.http, ephemeral(already(&r))).await;
                        return;
                    }
                }
                let modal = CreateModal::new(Route::ReasonSubmit(id).custom_id(), "Deny request")
                    .components(vec![CreateActionRow::InputText(
                        CreateInputText::new(
                            InputTextStyle::Paragraph,
                            "Reason",
                            routing::REASON_INPUT,
                        )
                        .required(true)
                        .max_length(1000),
                    )]);
                reply
                    .respond(&ctx.http, CreateInteractionResponse::Modal(modal))
                    .await;
            }
            Route::ReasonSubmit(_) => {
                reply
                    .respond(
                        &ctx.http,
                        ephemeral("This button is not one Keyturn knows."),
                    )
                    .await;
            }
            Route::Kill(run) => self.kill(ctx, &reply, &c.user, run).await,
            Route::AllowFor(id) => self.allow_for(ctx, &reply, &c, id, admin).await,
            Route::Edit(id) => self.edit_open(ctx, &reply, &c, id, admin).await,
            Route::EditSubmit(_) => {
                reply
                    .respond(
                        &ctx.http,
                        ephemeral("This button is not one Keyturn knows."),
                    )
                    .await;
            }
            Route::PauseAgent(_) => {}
        }
    }

    /// The "Allow for…" select (approvers; admins only on a critical
    /// request): approves the request and adds the time-boxed grant the
    /// picked option names. Refusals are ephemeral; the card is edited by
    /// the outbox from the stored state, and its approval reason names the
    /// grant.
    async fn allow_for(
        &self,
        ctx: &Context,
        reply: &Reply<'_>,
        c: &ComponentInteraction,
        id: RequestId,
        admin: bool,
    ) {
        let picked = match &c.data.kind {
            ComponentInteractionDataKind::StringSelect { values } if values.len() == 1 => {
                routing::AllowForOption::parse(&values[0])
            }
            _ => None,
        };
        let Some(picked) = picked else {
            tracing::warn!(request.id = %id, user.id = %c.user.id, "allow-for select with an unknown value");
            reply
                .respond(
                    &ctx.http,
                    ephemeral("That choice is not one Keyturn offers."),
                )
                .await;
            return;
        };
        if self.0.stopping.is_cancelled() || !*self.0.lead.borrow() {
            reply.respond(&ctx.http, ephemeral(HANDING_OVER)).await;
            return;
        }
        let gw = &self.0.gw;
        // Checked before the acknowledgement so the refusal is ephemeral
        // at once; the store checks admin-only again in the vote.
        match tokio::time::timeout(MODAL_CHECK, gw.status(id)).await {
            Ok(Ok(r)) if r.state.is_terminal() => {
                reply.respond(&ctx.http, ephemeral(already(&r))).await;
                return;
            }
            Ok(Ok(r)) if r.admin_only && !admin => {
                tracing::info!(request.id = %id, user.id = %c.user.id, "allow-for refused: critical tool, not an admin");
                reply
                    .respond(
                        &ctx.http,
                        ephemeral("Only an admin may allow a critical tool for a time."),
                    )
                    .await;
                return;
            }
            Ok(Ok(r))
                if !self.0.cfg.allow_self_approval
                    && r.user_id.as_deref() == Some(c.user.id.to_string().as_str()) =>
            {
                reply
                    .respond(
                        &ctx.http,
                        ephemeral("You cannot approve a request made on your own behalf."),
                    )
                    .await;
                return;
            }
            _ => {}
        }
        let ack = reply.respond(&ctx.http, CreateInteractionResponse::Acknowledge);
        let voter = format!("discord:{}", c.user.id);
        let work = gw.approve_for(
            id,
            &voter,
            Some(c.user.name.clone()),
            None,
            admin,
            picked.duration,
            picked.scope,
        );
        let ((), outcome) = tokio::join!(ack, work);
        let text = match outcome {
            Ok(a) => {
                tracing::info!(request.id = %id, voter = %voter, grant.id = %a.grant.id, "approved and allowed for a time on Discord");
                format!(
                    "Approved, and allowed {}: {} (grant `{}`).",
                    a.grant.until(),
                    picked.scope.describe(),
                    a.grant.id
                )
            }
            Err(AppError::AlreadyDecided(_)) => match gw.status(id).await {
                Ok(r) => already(&r),
                Err(_) => "This request is already decided.".into(),
            },
            Err(AppError::AdminOnly) => {
                "Only an admin may allow a critical tool for a time.".into()
            }
            Err(AppError::SelfApproval(_)) => {
                "You cannot approve a request made on your own behalf.".into()
            }
            Err(AppError::InvalidParams(m)) => m,
            Err(e) => {
                tracing::error!(request.id = %id, voter = %voter, error = %e, "allow-for on Discord failed");
                "Something went wrong; nothing was allowed beyond what the card shows.".into()
            }
        };
        reply.follow(&ctx.http, text).await;
    }

    /// The Pause agent button of an anomaly alert: admins only. Acknowledges
    /// at once, pauses the alert's agent (reason naming the alert) and tells
    /// the clicker ephemerally; the alert's message is edited by the alert
    /// poster from the stored alert (it then says who paused).
    async fn pause_from_alert(
        &self,
        ctx: &Context,
        reply: &Reply<'_>,
        c: &ComponentInteraction,
        alert: uuid::Uuid,
    ) {
        let refusal = match roles_of(&self.0.cfg, c.member.as_ref()) {
            None => Some("Agents are paused in the server."),
            Some((_, false)) => Some("You need the admin role to pause an agent."),
            Some((_, true)) => None,
        };
        if let Some(text) = refusal {
            tracing::info!(alert.id = %alert, user.id = %c.user.id, "pause from an alert refused: not an admin");
            reply.respond(&ctx.http, ephemeral(text)).await;
            return;
        }
        if self.0.stopping.is_cancelled() || !*self.0.lead.borrow() {
            reply.respond(&ctx.http, ephemeral(HANDING_OVER)).await;
            return;
        }
        let id = alert.hyphenated().to_string();
        let by = format!("discord:{}", c.user.id);
        let ack = reply.respond(&ctx.http, CreateInteractionResponse::Acknowledge);
        let ((), outcome) = tokio::join!(ack, self.0.gw.pause_from_alert(&id, &by));
        let text = match outcome {
            Ok((a, answer)) => {
                tracing::warn!(alert.id = %id, agent = %a.agent, by = %by, "agent paused from an anomaly alert");
                format!(
                    "Paused agent `{}`{}: its calls are denied until `keyturn agent resume {}`; {} pending request(s) cancelled.",
                    escape::single_line(&a.agent).replace('`', "ˋ"),
                    if answer.paused { "" } else { " (it was already paused)" },
                    escape::single_line(&a.agent).replace('`', "ˋ"),
                    answer.cancelled
                )
            }
            Err(AppError::NotFound(_)) => "Keyturn has no such alert.".to_string(),
            Err(e) => {
                tracing::error!(alert.id = %id, by = %by, error = %e, "pause from an alert failed");
                format!("The agent could not be paused: {e}")
            }
        };
        reply.follow(&ctx.http, text).await;
    }

    /// The Kill button (approvers and admins, checked by the caller):
    /// acknowledges at once, asks the app to kill the run wherever it runs,
    /// and tells the clicker the outcome ephemerally. The card shows the
    /// run's end when the outbox re-renders it from the store.
    async fn kill(
        &self,
        ctx: &Context,
        reply: &Reply<'_>,
        user: &serenity::all::User,
        run: uuid::Uuid,
    ) {
        let id = run.hyphenated().to_string();
        let by = format!("discord:{}", user.id);
        let ack = reply.respond(&ctx.http, CreateInteractionResponse::Acknowledge);
        let work = async {
            match self.0.gw.kill_run(&id, &by).await {
                Ok(r) => Ok((r, true)),
                // Say how it ended, when the registry can tell.
                Err(
                    e @ AppError::Run {
                        code: "not_running",
                        ..
                    },
                ) => match self.0.gw.run_record(&id).await {
                    Ok(Some(r)) if r.state != crate::domain::run::RunState::Running => {
                        Ok((r, false))
                    }
                    _ => Err(e),
                },
                Err(e) => Err(e),
            }
        };
        let ((), outcome) = tokio::join!(ack, work);
        match &outcome {
            Ok((_, true)) => tracing::warn!(run.id = %id, by = %by, "kill asked for on Discord"),
            Ok((_, false)) => {
                tracing::info!(run.id = %id, by = %by, "kill from Discord: the run had ended")
            }
            Err(AppError::Store(e)) => {
                tracing::error!(run.id = %id, by = %by, error = %e, "kill from Discord failed")
            }
            Err(e) => {
                tracing::info!(run.id = %id, by = %by, code = e.code(), "kill from Discord refused")
            }
        }
        reply
            .follow(&ctx.http, commands::kill_answer(&id, &outcome))
            .await;
    }

    async fn modal(&self, ctx: &Context, m: ModalInteraction) {
        let reply = Reply::Modal(&m);
        let route = Route::parse(&m.data.custom_id);
        let id = match route {
            Ok(Route::ReasonSubmit(id) | Route::EditSubmit(id)) => id,
            _ => {
                tracing::warn!(custom_id = %m.data.custom_id.chars().take(100).collect::<String>(), "unknown modal");
                reply
                    .respond(&ctx.http, ephemeral("This form is not one Keyturn knows."))
                    .await;
                return;
            }
        };
        let Some(admin) = self.may_decide(ctx, &reply, m.member.as_ref(), false).await else {
            return;
        };
        if let Ok(Route::EditSubmit(_)) = route {
            return self.edit_submit(ctx, &m, id, admin).await;
        }
        let reason = m
            .data
            .components
            .iter()
            .flat_map(|row| row.components.iter())
            .find_map(|c| match c {
                ActionRowComponent::InputText(t) if t.custom_id == routing::REASON_INPUT => {
                    t.value.clone()
                }
                _ => None,
            });
        self.decide(ctx, &reply, &m.user, id, false, reason, admin)
            .await;
    }

    /// Acknowledges at once (type 6) while the vote runs; refusals go out as
    /// ephemeral follow-ups. The card itself is edited by the outbox, from
    /// the stored state, when the request resolves.
    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        ctx: &Context,
        reply: &Reply<'_>,
        user: &serenity::all::User,
        id: RequestId,
        approve: bool,
        reason: Option<String>,
        admin: bool,
    ) {
        let gw = &self.0.gw;
        // A vote is one conditional transaction in the store, so a click is
        // applied once wherever it lands; but a bot that no longer leads
        // (or is stopping) refuses it with a reason, rather than record it
        // while its card is someone else's to edit.
        if self.0.stopping.is_cancelled() || !*self.0.lead.borrow() {
            tracing::info!(request.id = %id, user.id = %user.id, "click refused: leadership is moving to another process");
            reply.respond(&ctx.http, ephemeral(HANDING_OVER)).await;
            return;
        }
        let ack = reply.respond(&ctx.http, CreateInteractionResponse::Acknowledge);
        let voter = format!("discord:{}", user.id);
        let work = async {
            let r = gw.status(id).await?;
            if approve
                && !self.0.cfg.allow_self_approval
                && r.user_id.as_deref() == Some(user.id.to_string().as_str())
            {
                return Ok(Err(r));
            }
            gw.vote(id, &voter, Some(user.name.clone()), approve, reason, admin)
                .await
                .map(Ok)
        };
        let ((), outcome) = tokio::join!(ack, work);
        let text = match outcome {
            Ok(Ok(v)) if v.request.state.is_terminal() => {
                tracing::info!(request.id = %id, voter = %voter, state = %v.request.state, "decided on Discord");
                return;
            }
            Ok(Ok(v)) => {
                // Not decided yet: the store marked the card due with the
                // vote, so the outbox shows the count.
                format!(
                    "Your approval is recorded ({} of {} needed).",
                    v.have, v.need
                )
            }
            Ok(Err(_)) => {
                tracing::info!(request.id = %id, voter = %voter, "self-approval refused");
                "You cannot approve a request made on your own behalf.".to_string()
            }
            Err(AppError::AlreadyDecided(_)) => match gw.status(id).await {
                Ok(r) => already(&r),
                Err(_) => "This request is already decided.".into(),
            },
            Err(AppError::AdminOnly) => {
                "This is a critical request: only a Keyturn admin may decide it.".into()
            }
            Err(AppError::AlreadyVoted(_)) => "You have already voted on this request.".into(),
            Err(AppError::SelfApproval(_)) => {
                "You made this request, so you may not vote on it.".into()
            }
            Err(AppError::NotFound(_)) => "Keyturn has no such request.".into(),
            Err(e) => {
                tracing::error!(request.id = %id, error = %e, "vote failed");
                "Something went wrong; the decision was not recorded.".into()
            }
        };
        reply.follow(&ctx.http, text).await;
    }

    async fn command(&self, ctx: &Context, c: CommandInteraction) {
        let name = c.data.name.clone();
        if commands::is_admin_command(&name) {
            let admin = roles_of(&self.0.cfg, c.member.as_deref()).is_some_and(|(_, a)| a);
            if !admin {
                tracing::info!(user.id = %c.user.id, command = %name, "command refused: not an admin");
                if let Err(e) = c
                    .create_response(
                        &ctx.http,
                        ephemeral(
                            "This command is for Keyturn admins (the configured admin role).",
                        ),
                    )
                    .await
                {
                    tracing::warn!(error = %describe(&e), "cannot answer a command");
                }
                return;
            }
        }
        if commands::is_approver_command(&name) {
            let approver = roles_of(&self.0.cfg, c.member.as_deref()).is_some_and(|(a, _)| a);
            if !approver {
                tracing::info!(user.id = %c.user.id, command = %name, "command refused: not an approver");
                if let Err(e) = c
                    .create_response(
                        &ctx.http,
                        ephemeral(
                            "This command is for Keyturn approvers and admins (the configured roles).",
                        ),
                    )
                    .await
                {
                    tracing::warn!(error = %describe(&e), "cannot answer a command");
                }
                return;
            }
            if name == "stats" {
                self.stats(ctx, &c).await;
                return;
            }
        }
        if name == "pair" {
            // An explicit request, but limited per user like DMs.
            let uid = c.user.id.get().to_string();
            if let Err(wait) = self.0.dms.lock().await.new_code(&uid, Instant::now()) {
                tracing::info!(user.id = %uid, "pairing code refused: too many for this user");
                let at = (now_ms() + wait.as_millis() as i64).div_euclid(1000) + 1;
                if let Err(e) = c
                    .create_response(
                        &ctx.http,
                        ephemeral(format!(
                            "You have asked for too many pairing codes; try again <t:{at}:R>."
                        )),
                    )
                    .await
                {
                    tracing::warn!(error = %describe(&e), "cannot answer a command");
                }
                return;
            }
        }
        if let Err(e) = c.defer_ephemeral(&ctx.http).await {
            tracing::warn!(error = %describe(&e), "cannot defer a command");
            return;
        }
        let inv = commands::Invocation::from_options(&name, &c.data.options);
        let guild = self.0.cfg.guild_id.unwrap_or(0);
        let link = move |ch: u64, m: u64| format!("https://discord.com/channels/{guild}/{ch}/{m}");
        let out = commands::run(&self.0.gw, &inv, c.user.id.get(), &c.user.name, link).await;
        let text = match &out {
            Ok(o) => o.reply.clone(),
            Err(e) => format!("⚠️ {e}"),
        };
        if let Err(e) = c
            .edit_response(
                &ctx.http,
                EditInteractionResponse::new()
                    .content(card::fit(&text, 1900).0)
                    .allowed_mentions(no_mentions()),
            )
            .await
        {
            tracing::warn!(error = %describe(&e), "cannot answer a command");
        }
        if let Ok(commands::Outcome {
            dm: Some((user, text)),
            ..
        }) = out
        {
            if let Ok(uid) = user.parse::<u64>() {
                let msg = CreateMessage::new()
                    .content(text)
                    .allowed_mentions(no_mentions());
                if let Err(e) = UserId::new(uid).direct_message(&ctx.http, msg).await {
                    tracing::warn!(user.id = uid, error = %describe(&e), "cannot DM a paired user");
                }
            }
        }
    }
}

impl Handler {
    /// `/stats`: deferred (the report reads the store), then answered with
    /// the embed and the chart attached.
    async fn stats(&self, ctx: &Context, c: &CommandInteraction) {
        if let Err(e) = c.defer_ephemeral(&ctx.http).await {
            tracing::warn!(error = %describe(&e), "cannot defer a command");
            return;
        }
        let inv = commands::Invocation::from_options(&c.data.name, &c.data.options);
        let edit = match commands::stats_command(&self.0.gw, &inv).await {
            Ok(answer) => {
                let mut edit = EditInteractionResponse::new()
                    .content("")
                    .embed(answer.embed)
                    .allowed_mentions(no_mentions());
                if let Some(png) = answer.chart {
                    edit = edit.new_attachment(CreateAttachment::bytes(png, commands::CHART_FILE));
                }
                edit
            }
            Err(e) => EditInteractionResponse::new()
                .content(card::fit(&format!("⚠️ {e}"), 1900).0)
                .allowed_mentions(no_mentions()),
        };
        if let Err(e) = c.edit_response(&ctx.http, edit).await {
            tracing::warn!(error = %describe(&e), "cannot answer a command");
        }
    }
}

/// "already decided: approved by … <t:…>".
fn already(r: &crate::domain::request::ApprovalRequest) -> String {
    let who = r
        .decided_who
        .as_deref()
        .map(|w| format!(" by {}", card::plain(w)))
        .unwrap_or_default();
    let when = r
        .decided_ms
        .map(|ms| format!(" <t:{}:R>", ms.div_euclid(1000)))
        .unwrap_or_default();
    format!("Already decided: {}{who}{when}.", r.state)
}
