//! A fake Discord for integration tests: the REST API under `/api/v10` and the gateway
//! websocket, both on `127.0.0.1:<free port>`, good enough for an unmodified serenity 0.12.5
//! client pointed at it with `HttpBuilder::proxy(api_base).ratelimiter_disabled(true)`.
//!
//! It keeps the state a test wants to look at (every REST call, the current messages per
//! channel, interaction responses) and enforces the Discord rules a bot most easily breaks
//! (one initial response per interaction within 3 s, message/embed/component/modal limits,
//! `allowed_mentions` on every message). Breaches are answered the way Discord answers them
//! and also recorded in [`FakeDiscord::violations`], which tests assert to be empty.
//!
//! Every gateway dispatch and every REST reply it produces is checked at runtime to
//! deserialize with serenity's own types; a failure is recorded as a `FAKE BUG` violation,
//! because serenity would silently drop the event (`Event::Unknown`) and the test would only
//! see a timeout.
//!
//! This file is shared verbatim between crates (`mod support;`): it must not import anything
//! from the crate under test. Dependencies: tokio, axum (feature `ws`), serde, serde_json,
//! serenity (payload self-checks only).
//!
//! Usage (the bot side must use `HttpBuilder::new(DEFAULT_TOKEN).proxy(fake.api_base())
//! .ratelimiter_disabled(true)`; the rate limiter ignores the proxy):
//!
//! ```text
//! let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
//! /* start the bot against fake.api_base() */
//! fake.wait_ready(Duration::from_secs(5)).await?;
//! let card = fake.wait_for_messages(APPROVALS_CHANNEL_ID, |m| m.first().cloned(), secs(5)).await?;
//! let h = fake.click_button(card.id, "keyturn:v1:approve:…", ALICE).await;
//! let resp = fake.wait_interaction_response(&h, secs(5)).await?;   // the callback body
//! fake.assert_no_violations();
//! ```
//!
//! Predicates passed to the `wait_*` methods run under the fake's lock: they must not call
//! back into the fake.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, State as AxumState};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

// ---------------------------------------------------------------------------------------------
// Fixture ids and Discord constants
// ---------------------------------------------------------------------------------------------

/// Default fixture: the guild.
pub const GUILD_ID: u64 = 10;
/// Default fixture: the `#approvals` text channel.
pub const APPROVALS_CHANNEL_ID: u64 = 20;
/// Default fixture: the bot's user id.
pub const BOT_USER_ID: u64 = 1;
/// Default fixture: the application id (READY `application.id`).
pub const APPLICATION_ID: u64 = 2;
/// Default fixture: the managed `bot` role given to the bot's member entry.
pub const BOT_ROLE_ID: u64 = 29;
/// Default fixture: the `approver` role.
pub const APPROVER_ROLE_ID: u64 = 30;
/// Default fixture: the `admin` role.
pub const ADMIN_ROLE_ID: u64 = 31;
/// Default fixture members.
pub const ALICE: u64 = 100;
pub const BOB: u64 = 101;
pub const CAROL: u64 = 102;
pub const DAVE: u64 = 103;
/// Token the default fixture expects (`Authorization: Bot fake-token`).
pub const DEFAULT_TOKEN: &str = "fake-token";

/// Permission bits (Discord docs, "Permissions").
pub mod perm {
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const MANAGE_GUILD: u64 = 1 << 5;
    pub const VIEW_CHANNEL: u64 = 1 << 10;
    pub const SEND_MESSAGES: u64 = 1 << 11;
    pub const EMBED_LINKS: u64 = 1 << 14;
    pub const ATTACH_FILES: u64 = 1 << 15;
    pub const READ_MESSAGE_HISTORY: u64 = 1 << 16;
    pub const USE_APPLICATION_COMMANDS: u64 = 1 << 31;
}

/// Gateway intent bits the fake honours when delivering message events.
pub mod intent {
    pub const GUILDS: u64 = 1;
    pub const GUILD_MESSAGES: u64 = 1 << 9;
    pub const DIRECT_MESSAGES: u64 = 1 << 12;
    pub const MESSAGE_CONTENT: u64 = 1 << 15;
}

/// Discord limits enforced by the fake (Discord docs: message, embed, component, modal).
pub mod limits {
    pub const CONTENT: usize = 2000;
    pub const EMBEDS: usize = 10;
    pub const EMBED_TITLE: usize = 256;
    pub const EMBED_DESCRIPTION: usize = 4096;
    pub const EMBED_FIELDS: usize = 25;
    pub const EMBED_FIELD_NAME: usize = 256;
    pub const EMBED_FIELD_VALUE: usize = 1024;
    pub const EMBED_FOOTER: usize = 2048;
    pub const EMBED_AUTHOR: usize = 256;
    pub const EMBED_TOTAL: usize = 6000;
    pub const ACTION_ROWS: usize = 5;
    pub const ROW_BUTTONS: usize = 5;
    pub const CUSTOM_ID: usize = 100;
    pub const BUTTON_LABEL: usize = 80;
    pub const SELECT_OPTIONS: usize = 25;
    pub const SELECT_PLACEHOLDER: usize = 150;
    pub const MODAL_TITLE: usize = 45;
    pub const TEXT_INPUT_LABEL: usize = 45;
    pub const TEXT_INPUT_PLACEHOLDER: usize = 100;
    pub const TEXT_INPUT_VALUE: usize = 4000;
    pub const COMMAND_NAME: usize = 32;
    pub const COMMAND_DESCRIPTION: usize = 100;
    pub const COMMAND_OPTIONS: usize = 25;
}

const FLAG_EPHEMERAL: u64 = 1 << 6;
const FLAG_LOADING: u64 = 1 << 7;
const FIRST_SNOWFLAKE: u64 = 1_000_000;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// A guild role in the fixture.
#[derive(Clone, Debug)]
pub struct FakeRole {
    pub id: u64,
    pub name: String,
    /// Permission bits, see [`perm`].
    pub permissions: u64,
    pub position: u16,
}

impl FakeRole {
    pub fn new(id: u64, name: &str, permissions: u64, position: u16) -> Self {
        Self {
            id,
            name: name.to_string(),
            permissions,
            position,
        }
    }
}

/// A human guild member in the fixture (the bot's own member entry is added automatically).
#[derive(Clone, Debug)]
pub struct FakeMember {
    pub user_id: u64,
    pub username: String,
    pub roles: Vec<u64>,
    /// When false, sending to this user's DM channel fails with 403 / 50007, as Discord does
    /// for users who closed their DMs. This is not a violation: the bot must cope with it.
    pub dms_open: bool,
}

impl FakeMember {
    pub fn new(user_id: u64, username: &str, roles: &[u64]) -> Self {
        Self {
            user_id,
            username: username.to_string(),
            roles: roles.to_vec(),
            dms_open: true,
        }
    }
}

/// What the fake Discord looks like. `Default` gives guild 10 with `#approvals` (20), bot
/// user 1, application 2, roles `@everyone`, `bot` (29), `approver` (30), `admin` (31) and
/// members alice (100, approver), bob (101, none), carol (102, admin+approver), dave (103,
/// approver).
#[derive(Clone, Debug)]
pub struct FakeDiscordConfig {
    /// Expected bot token (REST `Authorization: Bot <token>`, gateway IDENTIFY/RESUME).
    pub token: String,
    pub guild_id: u64,
    pub guild_name: String,
    /// Not a fixture member by default, so nobody gets the owner's implicit permissions.
    pub owner_id: u64,
    pub approvals_channel_id: u64,
    pub approvals_channel_name: String,
    /// Further guild text channels: (id, name).
    pub extra_channels: Vec<(u64, String)>,
    pub bot_user_id: u64,
    pub bot_username: String,
    pub bot_role_id: u64,
    pub application_id: u64,
    pub members: Vec<FakeMember>,
    /// Guild roles. `@everyone` (id = guild id) and the bot role are added if missing.
    pub roles: Vec<FakeRole>,
    /// Sent in HELLO.
    pub heartbeat_interval_ms: u64,
    /// Discord's limit for the initial interaction response.
    pub interaction_deadline: Duration,
    /// Rate limits enforced on bot REST calls (not webhooks/interactions), with Discord's
    /// headers on every reply. `None`: no limits, no headers.
    pub rate_limits: Option<FakeRateLimits>,
    /// Bind this port instead of a free one (to start a fake where a bot already points).
    pub port: Option<u16>,
}

/// Discord-like rate limits: a fixed window per bucket and major parameter (reported in
/// `X-RateLimit-*` headers), and a global limit per rolling second that is never
/// advertised (Discord's 50/s). Excess calls get a 429 and are counted
/// ([`FakeDiscord::rate_limited_count`]).
#[derive(Clone, Debug)]
pub struct FakeRateLimits {
    pub bucket_limit: u32,
    pub bucket_window: Duration,
    pub global_per_sec: usize,
}

impl Default for FakeRateLimits {
    fn default() -> Self {
        Self {
            bucket_limit: 50,
            bucket_window: Duration::from_secs(1),
            global_per_sec: 50,
        }
    }
}

/// How the fake misbehaves during an outage ([`FakeDiscord::outage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutageMode {
    /// Every REST call gets 503.
    Unavailable,
    /// REST calls get no answer until the outage ends.
    Silence,
}

impl Default for FakeDiscordConfig {
    fn default() -> Self {
        let everyone = perm::VIEW_CHANNEL
            | perm::SEND_MESSAGES
            | perm::READ_MESSAGE_HISTORY
            | perm::USE_APPLICATION_COMMANDS;
        let bot = perm::VIEW_CHANNEL
            | perm::SEND_MESSAGES
            | perm::EMBED_LINKS
            | perm::ATTACH_FILES
            | perm::READ_MESSAGE_HISTORY;
        Self {
            token: DEFAULT_TOKEN.to_string(),
            guild_id: GUILD_ID,
            guild_name: "keyturn-test".to_string(),
            owner_id: 99,
            approvals_channel_id: APPROVALS_CHANNEL_ID,
            approvals_channel_name: "approvals".to_string(),
            extra_channels: Vec::new(),
            bot_user_id: BOT_USER_ID,
            bot_username: "keyturn".to_string(),
            bot_role_id: BOT_ROLE_ID,
            application_id: APPLICATION_ID,
            members: vec![
                FakeMember::new(ALICE, "alice", &[APPROVER_ROLE_ID]),
                FakeMember::new(BOB, "bob", &[]),
                FakeMember::new(CAROL, "carol", &[ADMIN_ROLE_ID, APPROVER_ROLE_ID]),
                FakeMember::new(DAVE, "dave", &[APPROVER_ROLE_ID]),
            ],
            roles: vec![
                FakeRole::new(GUILD_ID, "@everyone", everyone, 0),
                FakeRole::new(BOT_ROLE_ID, "bot", bot, 1),
                FakeRole::new(APPROVER_ROLE_ID, "approver", 0, 2),
                FakeRole::new(ADMIN_ROLE_ID, "admin", perm::MANAGE_GUILD, 3),
            ],
            heartbeat_interval_ms: 1000,
            interaction_deadline: Duration::from_secs(3),
            rate_limits: Some(FakeRateLimits::default()),
            port: None,
        }
    }
}

impl FakeDiscordConfig {
    fn normalized(mut self) -> Self {
        if !self.roles.iter().any(|r| r.id == self.guild_id) {
            let p = perm::VIEW_CHANNEL | perm::SEND_MESSAGES | perm::READ_MESSAGE_HISTORY;
            self.roles
                .insert(0, FakeRole::new(self.guild_id, "@everyone", p, 0));
        }
        if !self.roles.iter().any(|r| r.id == self.bot_role_id) {
            let p = perm::VIEW_CHANNEL
                | perm::SEND_MESSAGES
                | perm::EMBED_LINKS
                | perm::ATTACH_FILES
                | perm::READ_MESSAGE_HISTORY;
            self.roles
                .push(FakeRole::new(self.bot_role_id, "bot", p, 1));
        }
        self
    }

    fn member(&self, user_id: u64) -> Option<&FakeMember> {
        self.members.iter().find(|m| m.user_id == user_id)
    }

    fn username(&self, user_id: u64) -> String {
        if user_id == self.bot_user_id {
            return self.bot_username.clone();
        }
        self.member(user_id)
            .map_or_else(|| format!("user{user_id}"), |m| m.username.clone())
    }

    fn member_roles(&self, user_id: u64) -> Option<Vec<u64>> {
        if user_id == self.bot_user_id {
            return Some(vec![self.bot_role_id]);
        }
        self.member(user_id).map(|m| m.roles.clone())
    }

    /// Guild-level permissions of a member (`@everyone` | roles; admin and owner get all).
    pub fn permissions_of(&self, user_id: u64) -> u64 {
        if user_id == self.owner_id {
            return u64::MAX >> 13;
        }
        let roles = self.member_roles(user_id).unwrap_or_default();
        let mut p = 0;
        for r in &self.roles {
            if r.id == self.guild_id || roles.contains(&r.id) {
                p |= r.permissions;
            }
        }
        if p & perm::ADMINISTRATOR != 0 {
            u64::MAX >> 13
        } else {
            p
        }
    }

    fn text_channels(&self) -> Vec<(u64, String)> {
        let mut v = vec![(
            self.approvals_channel_id,
            self.approvals_channel_name.clone(),
        )];
        v.extend(self.extra_channels.iter().cloned());
        v
    }

    fn is_guild_channel(&self, id: u64) -> bool {
        self.text_channels().iter().any(|(c, _)| *c == id)
    }
}

// ---------------------------------------------------------------------------------------------
// Public records
// ---------------------------------------------------------------------------------------------

/// A file part of a multipart request.
#[derive(Clone, Debug)]
pub struct RecordedFile {
    /// Form field name, e.g. `files[0]`.
    pub field: String,
    pub filename: String,
    pub content_type: String,
    pub data: Vec<u8>,
}

/// One REST call as the fake saw it.
#[derive(Clone, Debug)]
pub struct RecordedCall {
    /// Position in [`FakeDiscord::calls`].
    pub index: usize,
    pub method: String,
    /// Path without the `/api/v10` prefix, e.g. `/channels/20/messages`.
    pub path: String,
    /// Raw query string without `?` (serenity sends `&limit=50`).
    pub query: String,
    /// JSON body (`payload_json` for multipart), `Null` when empty.
    pub body: Value,
    /// File parts of a multipart body.
    pub files: Vec<RecordedFile>,
    /// Status the fake answered with.
    pub status: u16,
    /// True when the answer came from [`FakeDiscord::fail_next`].
    pub injected_failure: bool,
    pub at: Instant,
}

impl RecordedCall {
    /// `"POST /channels/*/messages"`: method (or `*`), then path segments where `*` matches one
    /// segment and a final `**` matches the rest.
    pub fn matches(&self, pattern: &str) -> bool {
        pattern_matches(pattern, &self.method, &self.path)
    }
}

/// An uploaded attachment as stored on a message.
#[derive(Clone, Debug)]
pub struct StoredAttachment {
    pub id: u64,
    pub filename: String,
    pub description: Option<String>,
    pub content_type: String,
    pub data: Vec<u8>,
}

impl StoredAttachment {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A message in the fake's state, after all edits.
#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub id: u64,
    pub channel_id: u64,
    pub guild_id: Option<u64>,
    pub author_id: u64,
    pub content: String,
    pub embeds: Vec<Value>,
    pub components: Vec<Value>,
    /// The `allowed_mentions` of the latest create/edit that carried one.
    pub allowed_mentions: Option<Value>,
    pub attachments: Vec<StoredAttachment>,
    pub flags: u64,
    pub edit_count: u32,
    /// Set for interaction responses and follow-ups.
    pub interaction_id: Option<u64>,
    interaction_metadata: Option<Value>,
    kind: u8,
    created_ms: i64,
    edited_ms: Option<i64>,
}

impl StoredMessage {
    pub fn is_ephemeral(&self) -> bool {
        self.flags & FLAG_EPHEMERAL != 0
    }

    /// All components inside the action rows (buttons, selects), in order.
    pub fn inner_components(&self) -> Vec<Value> {
        self.components
            .iter()
            .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// `custom_id`s of all components.
    pub fn custom_ids(&self) -> Vec<String> {
        self.inner_components()
            .iter()
            .filter_map(|c| c["custom_id"].as_str().map(str::to_string))
            .collect()
    }

    /// The component with this `custom_id`.
    pub fn component(&self, custom_id: &str) -> Option<Value> {
        self.inner_components()
            .into_iter()
            .find(|c| c["custom_id"] == custom_id)
    }

    /// All text a human would read: content plus embed titles, descriptions, fields, footer.
    pub fn all_text(&self) -> String {
        let mut s = self.content.clone();
        for e in &self.embeds {
            for k in ["title", "description"] {
                if let Some(t) = e[k].as_str() {
                    s.push('\n');
                    s.push_str(t);
                }
            }
            for f in e["fields"].as_array().into_iter().flatten() {
                s.push('\n');
                s.push_str(f["name"].as_str().unwrap_or(""));
                s.push('\n');
                s.push_str(f["value"].as_str().unwrap_or(""));
            }
            if let Some(t) = e["footer"]["text"].as_str() {
                s.push('\n');
                s.push_str(t);
            }
        }
        s
    }
}

/// Identifies an injected interaction.
#[derive(Clone, Debug)]
pub struct InteractionHandle {
    pub id: u64,
    pub token: String,
    /// 2 = application command, 3 = component, 5 = modal submit.
    pub kind: u8,
    pub channel_id: u64,
    /// The message the component/modal belongs to, if any.
    pub message_id: Option<u64>,
    pub user_id: u64,
    /// Gateway sequence number of the INTERACTION_CREATE dispatch.
    pub seq: u64,
}

/// Gateway counters.
#[derive(Clone, Debug, Default)]
pub struct GatewayStats {
    pub connected: bool,
    pub session_id: Option<String>,
    pub identify_count: usize,
    pub resume_count: usize,
    pub heartbeat_count: usize,
    pub last_seq: u64,
    /// Highest sequence number written to the current socket.
    pub delivered_seq: u64,
    pub intents: u64,
    /// The last IDENTIFY `d` payload.
    pub identify: Option<Value>,
}

// ---------------------------------------------------------------------------------------------
// Internal state
// ---------------------------------------------------------------------------------------------

enum Outbound {
    Text(String, Option<u64>),
    Close(u16, String),
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Outbound>,
}

#[derive(Default)]
struct GatewayState {
    session_id: Option<String>,
    seq: u64,
    log: Vec<(u64, String)>,
    conn: Option<Conn>,
    next_conn_id: u64,
    closed_conns: Vec<u64>,
    identify_count: usize,
    resume_count: usize,
    heartbeat_count: usize,
    ready_seq: u64,
    delivered_seq: u64,
    intents: u64,
    identify: Option<Value>,
    ack_heartbeats: bool,
}

struct InteractionState {
    handle: InteractionHandle,
    label: String,
    guild: bool,
    injected_at: Instant,
    initial: Option<Value>,
    rejections: Vec<String>,
    original_message_id: Option<u64>,
    modal: Option<Value>,
    metadata: Value,
    reported_unanswered: bool,
}

struct FailRule {
    pattern: String,
    status: u16,
    body: Value,
}

struct FakeState {
    next_id: u64,
    calls: Vec<RecordedCall>,
    violations: Vec<String>,
    messages: BTreeMap<u64, StoredMessage>,
    dm_channels: BTreeMap<u64, u64>,
    interactions: BTreeMap<u64, InteractionState>,
    failures: Vec<FailRule>,
    /// Per bucket and major parameter: (window end, calls in the window).
    buckets: BTreeMap<String, (Instant, u32)>,
    /// Arrival times of recent calls, for the global limit.
    global_recent: std::collections::VecDeque<Instant>,
    /// 429s the rate limits produced (not injected ones).
    rate_limited: usize,
    /// An outage in progress: its end and mode.
    outage: Option<(Instant, OutageMode)>,
    guild_commands: Vec<Value>,
    global_commands: Vec<Value>,
    gw: GatewayState,
}

impl FakeState {
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn dm_recipient(&self, channel_id: u64) -> Option<u64> {
        self.dm_channels
            .iter()
            .find(|(_, c)| **c == channel_id)
            .map(|(u, _)| *u)
    }

    fn dm_channel(&mut self, user_id: u64) -> u64 {
        if let Some(c) = self.dm_channels.get(&user_id) {
            return *c;
        }
        let id = self.new_id();
        self.dm_channels.insert(user_id, id);
        id
    }

    fn interaction_by_token(&self, token: &str) -> Option<u64> {
        self.interactions
            .values()
            .find(|i| i.handle.token == token)
            .map(|i| i.handle.id)
    }
}

struct Inner {
    cfg: FakeDiscordConfig,
    port: u16,
    state: Mutex<FakeState>,
    changed: watch::Sender<u64>,
}

// ---------------------------------------------------------------------------------------------
// The fake
// ---------------------------------------------------------------------------------------------

/// A running fake Discord. Dropping it stops the HTTP server.
pub struct FakeDiscord {
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        // Close the bot's socket too: it lives in its own task, not in the server task.
        if let Some(c) = self.inner.lock().gw.conn.take() {
            let _ =
                c.tx.send(Outbound::Close(1001, "fake discord stopped".into()));
        }
        self.server.abort();
    }
}

impl FakeDiscord {
    /// Binds `127.0.0.1:0` and serves REST and the gateway.
    pub async fn start(cfg: FakeDiscordConfig) -> FakeDiscord {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", cfg.port.unwrap_or(0)))
            .await
            .expect("fake discord: bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("fake discord: local addr")
            .port();
        let (changed, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            cfg: cfg.normalized(),
            port,
            state: Mutex::new(FakeState {
                next_id: FIRST_SNOWFLAKE,
                calls: Vec::new(),
                violations: Vec::new(),
                messages: BTreeMap::new(),
                dm_channels: BTreeMap::new(),
                interactions: BTreeMap::new(),
                failures: Vec::new(),
                buckets: BTreeMap::new(),
                global_recent: std::collections::VecDeque::new(),
                rate_limited: 0,
                outage: None,
                guild_commands: Vec::new(),
                global_commands: Vec::new(),
                gw: GatewayState {
                    ack_heartbeats: true,
                    ..GatewayState::default()
                },
            }),
            changed,
        });
        let app = Router::new()
            .route("/gateway", get(gateway_upgrade))
            .route(
                "/attachments/{channel}/{id}/{filename}",
                get(attachment_download),
            )
            .fallback(rest_entry)
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        FakeDiscord { inner, server }
    }

    /// The value for `HttpBuilder::proxy`: `http://127.0.0.1:PORT`.
    pub fn api_base(&self) -> String {
        self.inner.api_base()
    }

    /// What `GET /api/v10/gateway` returns: `ws://127.0.0.1:PORT/gateway`.
    pub fn gateway_url(&self) -> String {
        self.inner.gateway_url()
    }

    pub fn config(&self) -> &FakeDiscordConfig {
        &self.inner.cfg
    }

    /// Waits until a bot identified and READY + GUILD_CREATE were written to its socket.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        self.inner
            .wait_until(timeout, |st| {
                let g = &st.gw;
                (g.conn.is_some() && g.ready_seq > 0 && g.delivered_seq >= g.ready_seq)
                    .then_some(())
            })
            .await
            .map_err(|_| {
                let g = self.gateway_stats();
                format!("no bot became ready within {timeout:?} (gateway: {g:?})")
            })
    }

    /// Waits for a REST call matching `pred` (calls already made count too).
    pub async fn wait_for_call(
        &self,
        pred: impl Fn(&RecordedCall) -> bool,
        timeout: Duration,
    ) -> Result<RecordedCall, String> {
        self.inner
            .wait_until(timeout, |st| st.calls.iter().find(|c| pred(c)).cloned())
            .await
            .map_err(|_| {
                let calls: Vec<String> = self
                    .calls()
                    .iter()
                    .map(|c| format!("{} {} -> {}", c.method, c.path, c.status))
                    .collect();
                format!("no matching REST call within {timeout:?}; calls so far: {calls:#?}")
            })
    }

    /// Waits for a REST call matching a [`RecordedCall::matches`] pattern.
    pub async fn wait_for_route(
        &self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<RecordedCall, String> {
        self.wait_for_call(|c| c.matches(pattern), timeout).await
    }

    /// Waits until `pred` holds for the messages currently in `channel_id`.
    pub async fn wait_for_messages<T>(
        &self,
        channel_id: u64,
        pred: impl Fn(&[StoredMessage]) -> Option<T>,
        timeout: Duration,
    ) -> Result<T, String> {
        self.inner
            .wait_until(timeout, |st| pred(&channel_messages(st, channel_id)))
            .await
            .map_err(|_| {
                let msgs: Vec<String> = self
                    .messages_in(channel_id)
                    .iter()
                    .map(|m| format!("{}: {:?}", m.id, m.all_text()))
                    .collect();
                format!("channel {channel_id}: condition not met within {timeout:?}; messages: {msgs:#?}")
            })
    }

    /// Waits until the gateway counters satisfy `pred`.
    pub async fn wait_gateway(
        &self,
        pred: impl Fn(&GatewayStats) -> bool,
        timeout: Duration,
    ) -> Result<GatewayStats, String> {
        self.inner
            .wait_until(timeout, |st| {
                let s = gateway_stats(&st.gw);
                pred(&s).then_some(s)
            })
            .await
            .map_err(|_| {
                format!(
                    "gateway condition not met within {timeout:?}: {:?}",
                    self.gateway_stats()
                )
            })
    }

    /// Every REST call so far, in arrival order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.inner.lock().calls.clone()
    }

    /// REST calls matching a [`RecordedCall::matches`] pattern.
    pub fn calls_matching(&self, pattern: &str) -> Vec<RecordedCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.matches(pattern))
            .collect()
    }

    /// Commands registered with `PUT /applications/{app}/guilds/{g}/commands` (as echoed).
    pub fn guild_commands(&self) -> Vec<Value> {
        self.inner.lock().guild_commands.clone()
    }

    /// Commands registered with `PUT /applications/{app}/commands` (as echoed).
    pub fn global_commands(&self) -> Vec<Value> {
        self.inner.lock().global_commands.clone()
    }

    /// Injects a button (or select) click on a stored message: INTERACTION_CREATE type 3 with
    /// the member (roles from the config) and the message as currently stored. Panics if the
    /// message or an enabled component with `custom_id` does not exist (Discord could not
    /// deliver such a click); use [`FakeDiscord::inject_interaction`] to forge one.
    pub async fn click_button(
        &self,
        message_id: u64,
        custom_id: &str,
        user_id: u64,
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .click_locked(&mut st, message_id, custom_id, user_id)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord click_button: {e}"))
    }

    /// Injects a MODAL_SUBMIT (type 5) for a modal the bot opened (type-9 response) from a
    /// component on `message_id`. `fields` are (text input custom_id, value); inputs not
    /// given are submitted empty. Panics if no such modal was opened for this user.
    pub async fn submit_modal(
        &self,
        message_id: u64,
        custom_id: &str,
        user_id: u64,
        fields: &[(&str, &str)],
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .modal_locked(&mut st, Some(message_id), custom_id, user_id, fields)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord submit_modal: {e}"))
    }

    /// Like [`FakeDiscord::submit_modal`] for a modal opened from a slash command.
    pub async fn submit_command_modal(
        &self,
        custom_id: &str,
        user_id: u64,
        fields: &[(&str, &str)],
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .modal_locked(&mut st, None, custom_id, user_id, fields)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord submit_command_modal: {e}"))
    }

    /// Injects a slash command (type 2) in the approvals channel. `options` is the Discord
    /// `data.options` array (e.g. `[{"name":"user","type":6,"value":"100"}]`); user, role,
    /// mentionable and channel options get `data.resolved` filled in. Using a command that
    /// was never registered is recorded as a violation.
    pub async fn slash_command(
        &self,
        name: &str,
        options: Value,
        user_id: u64,
    ) -> InteractionHandle {
        let channel = self.inner.cfg.approvals_channel_id;
        self.slash_command_in(channel, name, options, user_id).await
    }

    /// [`FakeDiscord::slash_command`] in any channel; a DM channel id (see
    /// [`FakeDiscord::dm_channel_of`]) gives a DM command without `guild_id`/`member`.
    pub async fn slash_command_in(
        &self,
        channel_id: u64,
        name: &str,
        options: Value,
        user_id: u64,
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .command_locked(&mut st, channel_id, name, options, user_id)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord slash_command: {e}"))
    }

    /// Low-level escape hatch: dispatches INTERACTION_CREATE with `d` as given, after filling
    /// in `id`, `token`, `application_id`, `version`, `locale`, `entitlements` and
    /// `attachment_size_limit` when absent. The interaction is tracked like any other.
    pub async fn inject_interaction(&self, d: Value) -> InteractionHandle {
        let h = {
            let mut st = self.inner.lock();
            self.inner.inject_raw_locked(&mut st, d)
        };
        self.inner.bump();
        h
    }

    /// A user DMs the bot: MESSAGE_CREATE without `guild_id`. Returns the message id.
    pub async fn send_dm(&self, user_id: u64, content: &str) -> u64 {
        let id = {
            let mut st = self.inner.lock();
            let channel = st.dm_channel(user_id);
            self.inner
                .user_message_locked(&mut st, channel, user_id, content)
        };
        self.inner.bump();
        id
    }

    /// A member posts in a guild channel: MESSAGE_CREATE with `guild_id` and `member`
    /// (content empty unless the bot asked for MESSAGE_CONTENT). Returns the message id.
    pub async fn post_as(&self, channel_id: u64, user_id: u64, content: &str) -> u64 {
        let id = {
            let mut st = self.inner.lock();
            self.inner
                .user_message_locked(&mut st, channel_id, user_id, content)
        };
        self.inner.bump();
        id
    }

    /// Waits for the accepted initial response (the callback body) of an interaction. Fails
    /// early if a response was rejected (late, invalid) and none was accepted.
    pub async fn wait_interaction_response(
        &self,
        h: &InteractionHandle,
        timeout: Duration,
    ) -> Result<Value, String> {
        let id = h.id;
        let r = self
            .inner
            .wait_until(timeout, |st| {
                let i = st.interactions.get(&id)?;
                if let Some(v) = &i.initial {
                    return Some(Ok(v.clone()));
                }
                (!i.rejections.is_empty()).then(|| Err(i.rejections.join("; ")))
            })
            .await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("interaction {id}: response rejected: {e}")),
            Err(_) => Err(format!("interaction {id}: no response within {timeout:?}")),
        }
    }

    /// The accepted initial response of an interaction, if any.
    pub fn interaction_response(&self, h: &InteractionHandle) -> Option<Value> {
        self.inner
            .lock()
            .interactions
            .get(&h.id)
            .and_then(|i| i.initial.clone())
    }

    /// The message the interaction's `@original` refers to (the reply, or the clicked
    /// message for type 6/7 responses).
    pub fn original_response(&self, h: &InteractionHandle) -> Option<StoredMessage> {
        let st = self.inner.lock();
        let mid = st.interactions.get(&h.id)?.original_message_id?;
        st.messages.get(&mid).cloned()
    }

    /// Non-ephemeral messages currently in a channel, oldest first.
    pub fn messages_in(&self, channel_id: u64) -> Vec<StoredMessage> {
        channel_messages(&self.inner.lock(), channel_id)
    }

    /// Every stored message (including ephemeral ones and DMs), oldest first.
    pub fn all_messages(&self) -> Vec<StoredMessage> {
        self.inner.lock().messages.values().cloned().collect()
    }

    pub fn message(&self, message_id: u64) -> Option<StoredMessage> {
        self.inner.lock().messages.get(&message_id).cloned()
    }

    /// The DM channel id of a user, once one was opened (by the bot or by [`Self::send_dm`]).
    pub fn dm_channel_of(&self, user_id: u64) -> Option<u64> {
        self.inner.lock().dm_channels.get(&user_id).copied()
    }

    /// Messages the bot sent to a user's DM channel, oldest first.
    pub fn dms_to(&self, user_id: u64) -> Vec<StoredMessage> {
        let st = self.inner.lock();
        let Some(c) = st.dm_channels.get(&user_id).copied() else {
            return Vec::new();
        };
        let bot = self.inner.cfg.bot_user_id;
        st.messages
            .values()
            .filter(|m| m.channel_id == c && m.author_id == bot)
            .cloned()
            .collect()
    }

    /// The next REST call matching `pattern` (see [`RecordedCall::matches`]) gets `status`
    /// with `body` instead of being served. A 429 gets `Retry-After` (from
    /// `body.retry_after`) and rate-limit headers. One-shot; several calls queue.
    pub fn fail_next(&self, pattern: &str, status: u16, body: Value) {
        self.inner.lock().failures.push(FailRule {
            pattern: pattern.to_string(),
            status,
            body,
        });
    }

    /// From now on, for `length`, every REST call fails the way `mode` says; then the fake
    /// recovers by itself. Returns the instant of recovery.
    pub fn outage(&self, length: Duration, mode: OutageMode) -> Instant {
        let until = Instant::now() + length;
        self.inner.lock().outage = Some((until, mode));
        until
    }

    /// Ends an outage now.
    pub fn end_outage(&self) {
        self.inner.lock().outage = None;
        self.inner.bump();
    }

    /// How many 429s the rate limits produced so far.
    pub fn rate_limited_count(&self) -> usize {
        self.inner.lock().rate_limited
    }

    /// A ready-made Discord 429 body.
    pub fn rate_limit_body(retry_after: f64) -> Value {
        json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": false})
    }

    /// Closes the bot's gateway socket with code 4000 (resumable) and waits until it is closed.
    /// Dispatches injected meanwhile are replayed when the bot RESUMEs.
    pub async fn disconnect_gateway(&self) {
        self.close_gateway(4000, "fake discord: disconnect").await;
    }

    /// Closes the bot's gateway socket with any close code and waits until it is closed.
    pub async fn close_gateway(&self, code: u16, reason: &str) {
        let conn_id = {
            let mut st = self.inner.lock();
            st.gw.conn.take().map(|c| {
                let _ = c.tx.send(Outbound::Close(code, reason.to_string()));
                c.id
            })
        };
        self.inner.bump();
        if let Some(id) = conn_id {
            let r = self
                .inner
                .wait_until(Duration::from_secs(5), |st| {
                    st.gw.closed_conns.contains(&id).then_some(())
                })
                .await;
            assert!(
                r.is_ok(),
                "fake discord: gateway connection {id} did not close"
            );
        }
    }

    /// Whether heartbeats are ACKed (default true). Without ACKs serenity reconnects.
    pub fn set_heartbeat_ack(&self, ack: bool) {
        self.inner.lock().gw.ack_heartbeats = ack;
    }

    pub fn identify_count(&self) -> usize {
        self.inner.lock().gw.identify_count
    }

    pub fn resume_count(&self) -> usize {
        self.inner.lock().gw.resume_count
    }

    pub fn gateway_stats(&self) -> GatewayStats {
        gateway_stats(&self.inner.lock().gw)
    }

    /// Rule breaches so far, including interactions left unanswered past the deadline.
    pub fn violations(&self) -> Vec<String> {
        let mut st = self.inner.lock();
        let mut v = st.violations.clone();
        v.extend(unanswered(&mut st, &self.inner.cfg, false));
        v
    }

    /// Returns the violations and forgets them (for tests that provoke one on purpose).
    pub fn take_violations(&self) -> Vec<String> {
        let mut st = self.inner.lock();
        let mut v = std::mem::take(&mut st.violations);
        v.extend(unanswered(&mut st, &self.inner.cfg, true));
        v
    }

    /// Panics with the list of violations, if any.
    pub fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "fake discord recorded {} violation(s):\n{}",
            v.len(),
            v.join("\n")
        );
    }
}

fn channel_messages(st: &FakeState, channel_id: u64) -> Vec<StoredMessage> {
    st.messages
        .values()
        .filter(|m| m.channel_id == channel_id && !m.is_ephemeral())
        .cloned()
        .collect()
}

fn gateway_stats(g: &GatewayState) -> GatewayStats {
    GatewayStats {
        connected: g.conn.is_some(),
        session_id: g.session_id.clone(),
        identify_count: g.identify_count,
        resume_count: g.resume_count,
        heartbeat_count: g.heartbeat_count,
        last_seq: g.seq,
        delivered_seq: g.delivered_seq,
        intents: g.intents,
        identify: g.identify.clone(),
    }
}

fn unanswered(st: &mut FakeState, cfg: &FakeDiscordConfig, mark: bool) -> Vec<String> {
    let mut out = Vec::new();
    for i in st.interactions.values_mut() {
        if i.initial.is_none()
            && !i.reported_unanswered
            && i.injected_at.elapsed() > cfg.interaction_deadline
        {
            out.push(format!(
                "interaction {} ({}) was not answered within {:?}",
                i.handle.id, i.label, cfg.interaction_deadline
            ));
            if mark {
                i.reported_unanswered = true;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Inner: waiting, gateway, injection
// ---------------------------------------------------------------------------------------------

impl Inner {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn api_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn gateway_url(&self) -> String {
        format!("ws://127.0.0.1:{}/gateway", self.port)
    }

    /// Event-driven wait: re-checks `check` after every state change, until `timeout`.
    async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&mut FakeState) -> Option<T>,
    ) -> Result<T, ()> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = check(&mut self.lock()) {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return check(&mut self.lock()).ok_or(()),
            }
        }
    }

    fn violation(&self, st: &mut FakeState, text: String) {
        eprintln!("fake discord violation: {text}");
        st.violations.push(text);
    }

    /// Sends a dispatch (op 0) to the current connection and logs it for RESUME replay.
    fn dispatch(&self, st: &mut FakeState, t: &str, d: Value) -> u64 {
        if st.gw.session_id.is_none() {
            self.violation(
                st,
                format!("test bug: {t} dispatched before any bot identified"),
            );
        }
        st.gw.seq += 1;
        let seq = st.gw.seq;
        let frame = json!({"op": 0, "s": seq, "t": t, "d": d});
        if let Err(e) = check_dispatch(&frame) {
            self.violation(
                st,
                format!("FAKE BUG: {t} dispatch does not deserialize in serenity: {e}"),
            );
        }
        let text = frame.to_string();
        st.gw.log.push((seq, text.clone()));
        if let Some(c) = &st.gw.conn {
            let _ = c.tx.send(Outbound::Text(text, Some(seq)));
        }
        seq
    }

    fn on_gateway_frame(&self, conn_id: u64, tx: &mpsc::UnboundedSender<Outbound>, text: &str) {
        let mut st = self.lock();
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.violation(
                    &mut st,
                    format!("gateway: bot sent invalid JSON ({e}): {text}"),
                );
                let _ = tx.send(Outbound::Close(
                    4002,
                    "Error while decoding payload.".into(),
                ));
                return;
            }
        };
        let op = v["op"].as_u64().unwrap_or(u64::MAX);
        let d = &v["d"];
        match op {
            1 => {
                st.gw.heartbeat_count += 1;
                if st.gw.ack_heartbeats {
                    let _ = tx.send(Outbound::Text(json!({"op": 11}).to_string(), None));
                }
            }
            2 => self.identify(&mut st, conn_id, tx, d),
            6 => self.resume(&mut st, conn_id, tx, d),
            3 | 4 | 8 | 31 => {}
            _ => {
                self.violation(&mut st, format!("gateway: unexpected opcode {op}: {text}"));
                let _ = tx.send(Outbound::Close(4001, "Unknown opcode.".into()));
            }
        }
    }

    fn token_ok(&self, token: &str) -> bool {
        let t = &self.cfg.token;
        token == t || token.strip_prefix("Bot ") == Some(t.as_str())
    }

    fn identify(
        &self,
        st: &mut FakeState,
        conn_id: u64,
        tx: &mpsc::UnboundedSender<Outbound>,
        d: &Value,
    ) {
        if !self.token_ok(d["token"].as_str().unwrap_or("")) {
            self.violation(st, "gateway: IDENTIFY with a wrong token".to_string());
            let _ = tx.send(Outbound::Close(4004, "Authentication failed.".into()));
            return;
        }
        st.gw.identify_count += 1;
        let session = format!("fake-session-{}", st.gw.identify_count);
        st.gw.session_id = Some(session.clone());
        st.gw.seq = 0;
        st.gw.log.clear();
        st.gw.delivered_seq = 0;
        st.gw.intents = d["intents"].as_u64().unwrap_or(0);
        st.gw.identify = Some(d.clone());
        st.gw.conn = Some(Conn {
            id: conn_id,
            tx: tx.clone(),
        });
        let shard = d.get("shard").cloned().unwrap_or_else(|| json!([0, 1]));
        self.dispatch(
            st,
            "READY",
            ready_json(&self.cfg, &session, &self.gateway_url(), shard),
        );
        st.gw.ready_seq = self.dispatch(st, "GUILD_CREATE", guild_json(&self.cfg, true));
    }

    fn resume(
        &self,
        st: &mut FakeState,
        conn_id: u64,
        tx: &mpsc::UnboundedSender<Outbound>,
        d: &Value,
    ) {
        let ok = self.token_ok(d["token"].as_str().unwrap_or(""))
            && st.gw.session_id.is_some()
            && d["session_id"].as_str() == st.gw.session_id.as_deref();
        if !ok {
            let _ = tx.send(Outbound::Text(
                json!({"op": 9, "d": false}).to_string(),
                None,
            ));
            return;
        }
        st.gw.resume_count += 1;
        let from = d["seq"].as_u64().unwrap_or(0);
        st.gw.conn = Some(Conn {
            id: conn_id,
            tx: tx.clone(),
        });
        st.gw.delivered_seq = from;
        for (seq, text) in st.gw.log.iter().filter(|(s, _)| *s > from) {
            let _ = tx.send(Outbound::Text(text.clone(), Some(*seq)));
        }
        self.dispatch(st, "RESUMED", json!({"_trace": ["fake-discord"]}));
    }

    fn conn_wrote(&self, conn_id: u64, seq: u64) {
        let mut st = self.lock();
        if st.gw.conn.as_ref().is_some_and(|c| c.id == conn_id) && seq > st.gw.delivered_seq {
            st.gw.delivered_seq = seq;
        }
    }

    fn conn_closed(&self, conn_id: u64) {
        let mut st = self.lock();
        if st.gw.conn.as_ref().is_some_and(|c| c.id == conn_id) {
            st.gw.conn = None;
        }
        st.gw.closed_conns.push(conn_id);
    }

    fn new_interaction(&self, st: &mut FakeState) -> (u64, String) {
        let id = st.new_id();
        (id, format!("fake-interaction-token-{id}"))
    }

    #[allow(clippy::too_many_arguments)]
    fn register_and_dispatch(
        &self,
        st: &mut FakeState,
        d: Value,
        kind: u8,
        channel_id: u64,
        message_id: Option<u64>,
        user_id: u64,
        label: String,
        metadata: Value,
    ) -> InteractionHandle {
        let id = sf(&d["id"]).unwrap_or_default();
        let token = d["token"].as_str().unwrap_or_default().to_string();
        let guild = d.get("guild_id").is_some_and(|g| !g.is_null());
        let seq = self.dispatch(st, "INTERACTION_CREATE", d);
        let handle = InteractionHandle {
            id,
            token,
            kind,
            channel_id,
            message_id,
            user_id,
            seq,
        };
        st.interactions.insert(
            id,
            InteractionState {
                handle: handle.clone(),
                label,
                guild,
                injected_at: Instant::now(),
                initial: None,
                rejections: Vec::new(),
                original_message_id: None,
                modal: None,
                metadata,
                reported_unanswered: false,
            },
        );
        handle
    }

    /// The parts of an interaction that depend on where it happens and who acts.
    fn interaction_envelope(
        &self,
        st: &FakeState,
        id: u64,
        token: &str,
        kind: u8,
        channel_id: u64,
        user_id: u64,
    ) -> Result<(Value, Value), String> {
        let cfg = &self.cfg;
        let mut d = json!({
            "id": id.to_string(),
            "application_id": cfg.application_id.to_string(),
            "type": kind,
            "channel_id": channel_id.to_string(),
            "token": token,
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 10_485_760,
            "app_permissions": cfg.permissions_of(cfg.bot_user_id).to_string(),
        });
        let owners;
        if let Some(recipient) = st.dm_recipient(channel_id) {
            if recipient != user_id {
                return Err(format!(
                    "user {user_id} cannot see DM channel {channel_id} of user {recipient}"
                ));
            }
            d["user"] = user_json(cfg, user_id);
            d["channel"] = json!({"id": channel_id.to_string(), "type": 1});
            d["context"] = json!(1);
            owners = json!({"0": "0"});
        } else if cfg.is_guild_channel(channel_id) {
            let Some(member) = member_json(cfg, user_id, true, true) else {
                return Err(format!(
                    "user {user_id} is not a member of the fixture guild"
                ));
            };
            d["guild_id"] = json!(cfg.guild_id.to_string());
            d["guild_locale"] = json!("en-US");
            d["guild"] = json!({"id": cfg.guild_id.to_string(), "locale": "en-US", "features": []});
            d["member"] = member;
            let name = cfg
                .text_channels()
                .into_iter()
                .find(|(c, _)| *c == channel_id)
                .map(|(_, n)| n);
            d["channel"] = json!({"id": channel_id.to_string(), "type": 0, "name": name,
                "guild_id": cfg.guild_id.to_string()});
            d["context"] = json!(0);
            owners = json!({"0": cfg.guild_id.to_string()});
        } else {
            return Err(format!(
                "channel {channel_id} is neither a fixture channel nor a DM channel"
            ));
        }
        d["authorizing_integration_owners"] = owners.clone();
        Ok((d, owners))
    }

    fn click_locked(
        &self,
        st: &mut FakeState,
        message_id: u64,
        custom_id: &str,
        user_id: u64,
    ) -> Result<InteractionHandle, String> {
        let msg = st
            .messages
            .get(&message_id)
            .cloned()
            .ok_or_else(|| format!("no message {message_id}"))?;
        let comp = msg.component(custom_id).ok_or_else(|| {
            format!(
                "message {message_id} has no component {custom_id:?}; it has {:?}",
                msg.custom_ids()
            )
        })?;
        if comp["disabled"].as_bool() == Some(true) {
            return Err(format!(
                "component {custom_id:?} on message {message_id} is disabled"
            ));
        }
        let component_type = comp["type"].as_u64().unwrap_or(2);
        let (id, token) = self.new_interaction(st);
        let (mut d, owners) =
            self.interaction_envelope(st, id, &token, 3, msg.channel_id, user_id)?;
        let mut data = json!({"custom_id": custom_id, "component_type": component_type});
        if component_type != 2 {
            data["values"] = json!([]);
        }
        d["data"] = data;
        d["message"] = message_json(&self.cfg, &self.api_base(), &msg);
        let metadata = json!({"id": id.to_string(), "type": 3, "user": user_json(&self.cfg, user_id),
            "authorizing_integration_owners": owners, "interacted_message_id": message_id.to_string()});
        let label = format!("component {custom_id} on message {message_id}");
        Ok(self.register_and_dispatch(
            st,
            d,
            3,
            msg.channel_id,
            Some(message_id),
            user_id,
            label,
            metadata,
        ))
    }

    fn modal_locked(
        &self,
        st: &mut FakeState,
        message_id: Option<u64>,
        custom_id: &str,
        user_id: u64,
        fields: &[(&str, &str)],
    ) -> Result<InteractionHandle, String> {
        let opener = st
            .interactions
            .values()
            .rev()
            .find(|i| {
                i.handle.user_id == user_id
                    && i.handle.message_id == message_id
                    && i.modal
                        .as_ref()
                        .is_some_and(|m| m["custom_id"] == custom_id)
            })
            .map(|i| {
                (
                    i.modal.clone().unwrap_or_default(),
                    i.metadata.clone(),
                    i.handle.channel_id,
                )
            });
        let Some((modal, opener_meta, channel_id)) = opener else {
            let opened: Vec<String> = st
                .interactions
                .values()
                .filter_map(|i| {
                    i.modal.as_ref().map(|m| {
                        format!(
                            "{} for user {} on {:?}",
                            m["custom_id"], i.handle.user_id, i.handle.message_id
                        )
                    })
                })
                .collect();
            return Err(format!(
                "no modal {custom_id:?} was opened for user {user_id} on message {message_id:?}; opened: {opened:?}"
            ));
        };
        let inputs: Vec<String> = modal["components"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["custom_id"].as_str().map(str::to_string))
            .collect();
        for (k, _) in fields {
            if !inputs.iter().any(|i| i == k) {
                return Err(format!(
                    "modal {custom_id:?} has no text input {k:?}; it has {inputs:?}"
                ));
            }
        }
        let rows: Vec<Value> = inputs
            .iter()
            .map(|input| {
                let value = fields
                    .iter()
                    .find(|(k, _)| k == input)
                    .map_or("", |(_, v)| *v);
                json!({"type": 1, "components": [{"type": 4, "custom_id": input, "value": value}]})
            })
            .collect();
        let (id, token) = self.new_interaction(st);
        let (mut d, owners) = self.interaction_envelope(st, id, &token, 5, channel_id, user_id)?;
        d["data"] = json!({"custom_id": custom_id, "components": rows});
        if let Some(mid) = message_id {
            let msg = st
                .messages
                .get(&mid)
                .cloned()
                .ok_or_else(|| format!("message {mid} no longer exists"))?;
            d["message"] = message_json(&self.cfg, &self.api_base(), &msg);
        }
        let metadata = json!({"id": id.to_string(), "type": 5, "user": user_json(&self.cfg, user_id),
            "authorizing_integration_owners": owners, "triggering_interaction_metadata": opener_meta});
        let label = format!("modal submit {custom_id}");
        Ok(self.register_and_dispatch(st, d, 5, channel_id, message_id, user_id, label, metadata))
    }

    fn command_locked(
        &self,
        st: &mut FakeState,
        channel_id: u64,
        name: &str,
        options: Value,
        user_id: u64,
    ) -> Result<InteractionHandle, String> {
        let cfg = &self.cfg;
        let registered = st
            .guild_commands
            .iter()
            .map(|c| (c, true))
            .chain(st.global_commands.iter().map(|c| (c, false)))
            .find(|(c, _)| c["name"] == name)
            .map(|(c, g)| (sf(&c["id"]).unwrap_or_default(), g));
        let (command_id, is_guild) = match registered {
            Some(r) => r,
            None => {
                self.violation(
                    st,
                    format!("slash command /{name} was used but never registered"),
                );
                (st.new_id(), false)
            }
        };
        let mut options = options;
        if options.is_null() {
            options = json!([]);
        }
        let mut resolved = Resolved::default();
        normalize_options(&mut options, &mut resolved);
        let (id, token) = self.new_interaction(st);
        let (mut d, owners) = self.interaction_envelope(st, id, &token, 2, channel_id, user_id)?;
        let mut data =
            json!({"id": command_id.to_string(), "name": name, "type": 1, "options": options});
        if is_guild {
            data["guild_id"] = json!(cfg.guild_id.to_string());
        }
        let r = resolved.to_json(cfg);
        if !r.as_object().is_some_and(Map::is_empty) {
            data["resolved"] = r;
        }
        d["data"] = data;
        let metadata = json!({"id": id.to_string(), "type": 2, "user": user_json(cfg, user_id),
            "authorizing_integration_owners": owners});
        let label = format!("slash command /{name}");
        Ok(self.register_and_dispatch(st, d, 2, channel_id, None, user_id, label, metadata))
    }

    fn inject_raw_locked(&self, st: &mut FakeState, mut d: Value) -> InteractionHandle {
        let (id, token) = self.new_interaction(st);
        let defaults = [
            ("id", json!(id.to_string())),
            ("token", json!(token)),
            ("application_id", json!(self.cfg.application_id.to_string())),
            ("version", json!(1)),
            ("locale", json!("en-US")),
            ("entitlements", json!([])),
            ("attachment_size_limit", json!(10_485_760)),
        ];
        if let Some(obj) = d.as_object_mut() {
            for (k, v) in defaults {
                obj.entry(k).or_insert(v);
            }
        }
        let kind = d["type"].as_u64().unwrap_or(0) as u8;
        let channel_id = sf(&d["channel_id"]).unwrap_or_default();
        let message_id = sf(&d["message"]["id"]);
        let user_id = sf(&d["member"]["user"]["id"])
            .or_else(|| sf(&d["user"]["id"]))
            .unwrap_or_default();
        let metadata = json!({"id": d["id"].clone(), "type": kind, "user": user_json(&self.cfg, user_id),
            "authorizing_integration_owners": d.get("authorizing_integration_owners").cloned().unwrap_or_else(|| json!({})),
            "interacted_message_id": message_id.map(|m| m.to_string())});
        let label = format!("raw interaction type {kind}");
        self.register_and_dispatch(
            st, d, kind, channel_id, message_id, user_id, label, metadata,
        )
    }

    fn user_message_locked(
        &self,
        st: &mut FakeState,
        channel_id: u64,
        user_id: u64,
        content: &str,
    ) -> u64 {
        let cfg = &self.cfg;
        let id = st.new_id();
        let dm = st.dm_recipient(channel_id).is_some();
        if st.gw.session_id.is_none() {
            self.violation(
                st,
                format!("test bug: message {id} injected before any bot identified"),
            );
            return id;
        }
        let msg = StoredMessage {
            id,
            channel_id,
            guild_id: (!dm).then_some(cfg.guild_id),
            author_id: user_id,
            content: content.to_string(),
            embeds: Vec::new(),
            components: Vec::new(),
            allowed_mentions: None,
            attachments: Vec::new(),
            flags: 0,
            edit_count: 0,
            interaction_id: None,
            interaction_metadata: None,
            kind: 0,
            created_ms: now_ms(),
            edited_ms: None,
        };
        st.messages.insert(id, msg.clone());
        let needed = if dm {
            intent::DIRECT_MESSAGES
        } else {
            intent::GUILD_MESSAGES
        };
        if st.gw.intents & needed == 0 {
            let which = if dm {
                "DIRECT_MESSAGES"
            } else {
                "GUILD_MESSAGES"
            };
            self.violation(
                st,
                format!(
                    "message {id} not delivered: the bot did not identify with the {which} intent"
                ),
            );
            return id;
        }
        let mut d = message_json(cfg, &self.api_base(), &msg);
        if !dm {
            // Without MESSAGE_CONTENT, content is only delivered when the bot is mentioned.
            let mentioned = content.contains(&format!("<@{}>", cfg.bot_user_id));
            if st.gw.intents & intent::MESSAGE_CONTENT == 0 && !mentioned {
                d["content"] = json!("");
            }
            if let Some(m) = member_json(cfg, user_id, false, false) {
                d["member"] = m;
            }
        }
        self.dispatch(st, "MESSAGE_CREATE", d);
        id
    }

    /// MESSAGE_CREATE/UPDATE for a bot message, when the identified intents would deliver it.
    fn echo_bot_message(&self, st: &mut FakeState, t: &str, msg: &StoredMessage) {
        if msg.is_ephemeral() || st.gw.session_id.is_none() {
            return;
        }
        let needed = if msg.guild_id.is_some() {
            intent::GUILD_MESSAGES
        } else {
            intent::DIRECT_MESSAGES
        };
        if st.gw.intents & needed != 0 {
            let d = message_json(&self.cfg, &self.api_base(), msg);
            self.dispatch(st, t, d);
        }
    }
}

#[derive(Default)]
struct Resolved {
    users: Vec<u64>,
    roles: Vec<u64>,
    channels: Vec<u64>,
}

impl Resolved {
    fn to_json(&self, cfg: &FakeDiscordConfig) -> Value {
        let mut r = Map::new();
        if !self.users.is_empty() {
            let users: Map<String, Value> = self
                .users
                .iter()
                .map(|u| (u.to_string(), user_json(cfg, *u)))
                .collect();
            let members: Map<String, Value> = self
                .users
                .iter()
                .filter_map(|u| member_json(cfg, *u, false, true).map(|m| (u.to_string(), m)))
                .collect();
            r.insert("users".into(), Value::Object(users));
            if !members.is_empty() {
                r.insert("members".into(), Value::Object(members));
            }
        }
        if !self.roles.is_empty() {
            let roles: Map<String, Value> = self
                .roles
                .iter()
                .filter_map(|id| cfg.roles.iter().find(|r| r.id == *id))
                .map(|role| (role.id.to_string(), role_json(cfg, role)))
                .collect();
            r.insert("roles".into(), Value::Object(roles));
        }
        if !self.channels.is_empty() {
            let channels: Map<String, Value> = self
                .channels
                .iter()
                .map(|c| {
                    let name = cfg
                        .text_channels()
                        .into_iter()
                        .find(|(id, _)| id == c)
                        .map(|(_, n)| n);
                    (
                        c.to_string(),
                        json!({"id": c.to_string(), "type": 0, "name": name, "permissions": "0"}),
                    )
                })
                .collect();
            r.insert("channels".into(), Value::Object(channels));
        }
        Value::Object(r)
    }
}

/// Turns snowflake option values into strings and collects what `resolved` needs.
fn normalize_options(options: &mut Value, resolved: &mut Resolved) {
    for o in options.as_array_mut().into_iter().flatten() {
        let kind = o["type"].as_u64().unwrap_or(0);
        if matches!(kind, 6..=9) {
            if let Some(id) = sf(&o["value"]) {
                o["value"] = json!(id.to_string());
                match kind {
                    6 => resolved.users.push(id),
                    7 => resolved.channels.push(id),
                    8 => resolved.roles.push(id),
                    _ => resolved.users.push(id),
                }
            }
        }
        if let Some(sub) = o.get_mut("options") {
            normalize_options(sub, resolved);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway websocket
// ---------------------------------------------------------------------------------------------

async fn gateway_upgrade(
    AxumState(inner): AxumState<Arc<Inner>>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |socket| gateway_connection(inner, socket))
}

async fn gateway_connection(inner: Arc<Inner>, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let conn_id = {
        let mut st = inner.lock();
        st.gw.next_conn_id += 1;
        st.gw.next_conn_id
    };
    let hello = json!({"op": 10, "d": {"heartbeat_interval": inner.cfg.heartbeat_interval_ms}});
    if socket
        .send(WsMessage::Text(hello.to_string().into()))
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                incoming = socket.recv() => match incoming {
                    Some(Ok(WsMessage::Text(t))) => {
                        inner.on_gateway_frame(conn_id, &tx, t.as_str());
                        inner.bump();
                    }
                    Some(Ok(WsMessage::Binary(_))) => {
                        let mut st = inner.lock();
                        inner.violation(&mut st, "gateway: bot sent a binary frame".into());
                    }
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                out = rx.recv() => match out {
                    Some(Outbound::Text(text, seq)) => {
                        if socket.send(WsMessage::Text(text.into())).await.is_err() {
                            break;
                        }
                        if let Some(seq) = seq {
                            inner.conn_wrote(conn_id, seq);
                            inner.bump();
                        }
                    }
                    Some(Outbound::Close(code, reason)) => {
                        let frame = CloseFrame { code, reason: reason.into() };
                        let _ = socket.send(WsMessage::Close(Some(frame))).await;
                        break;
                    }
                    None => break,
                },
            }
        }
    }
    inner.conn_closed(conn_id);
    inner.bump();
}

async fn attachment_download(
    AxumState(inner): AxumState<Arc<Inner>>,
    Path((_channel, id, _filename)): Path<(u64, u64, String)>,
) -> Response {
    let st = inner.lock();
    let found = st
        .messages
        .values()
        .flat_map(|m| m.attachments.iter())
        .find(|a| a.id == id);
    match found {
        Some(a) => ([("content-type", a.content_type.clone())], a.data.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

struct Reply {
    status: u16,
    body: Option<Value>,
    headers: Vec<(String, String)>,
}

impl Reply {
    fn json(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Some(body),
            headers: Vec::new(),
        }
    }

    fn no_content() -> Reply {
        Reply {
            status: 204,
            body: None,
            headers: Vec::new(),
        }
    }

    fn error(status: u16, code: u64, message: &str) -> Reply {
        Reply {
            status,
            body: Some(json!({"message": message, "code": code})),
            headers: Vec::new(),
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut builder = Response::builder().status(status);
        for (k, v) in &self.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let resp = match self.body {
            Some(b) => builder
                .header("content-type", "application/json")
                .body(b.to_string().into()),
            None => builder.body(axum::body::Body::empty()),
        };
        resp.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

struct Req {
    method: String,
    path: String,
    segs: Vec<String>,
    query: String,
    body: Value,
    files: Vec<RecordedFile>,
}

impl Req {
    fn what(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// One field-level validation failure, reported in Discord's "Invalid Form Body" shape.
struct Problem {
    path: String,
    code: &'static str,
    message: String,
}

async fn rest_entry(
    AxumState(inner): AxumState<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let silent_until = {
        let st = inner.lock();
        match st.outage {
            Some((until, OutageMode::Silence)) if until > Instant::now() => Some(until),
            _ => None,
        }
    };
    if let Some(until) = silent_until {
        tokio::time::sleep_until(until.into()).await;
    }
    let reply = inner.handle_rest(method.as_str(), &uri, &headers, &body);
    inner.bump();
    reply.into_response()
}

impl Inner {
    fn handle_rest(&self, method: &str, uri: &Uri, headers: &HeaderMap, raw: &[u8]) -> Reply {
        let full = uri.path();
        let (path, prefixed) = match full.strip_prefix("/api/v10") {
            Some(p) => (p.to_string(), true),
            None => (full.to_string(), false),
        };
        let query = uri.query().unwrap_or("").to_string();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut st = self.lock();
        let (body, files) = match parse_body(&content_type, raw) {
            Ok(x) => x,
            Err(e) => {
                self.violation(&mut st, format!("{method} {path}: unparseable body: {e}"));
                (Value::Null, Vec::new())
            }
        };
        let segs: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let req = Req {
            method: method.to_string(),
            path,
            segs,
            query,
            body,
            files,
        };
        let mut injected = false;
        let is_webhook = req
            .segs
            .first()
            .is_some_and(|s| s == "webhooks" || s == "interactions");
        let reply = if !prefixed {
            self.violation(&mut st, format!("{}: not under /api/v10", req.what()));
            Reply::error(404, 0, "404: Not Found")
        } else if !is_webhook && !self.token_ok(auth.strip_prefix("Bot ").unwrap_or("\u{0}")) {
            self.violation(
                &mut st,
                format!("{}: bad Authorization header {auth:?}", req.what()),
            );
            Reply::error(401, 0, "401: Unauthorized")
        } else if matches!(st.outage, Some((until, OutageMode::Unavailable)) if until > Instant::now())
        {
            injected = true;
            Reply::error(503, 0, "503: Service Unavailable")
        } else if let Some(pos) = st
            .failures
            .iter()
            .position(|f| pattern_matches(&f.pattern, &req.method, &req.path))
        {
            injected = true;
            let rule = st.failures.remove(pos);
            failure_reply(rule)
        } else if is_webhook {
            self.route(&mut st, &req)
        } else {
            match self.rate_limit(&mut st, &req) {
                Err(limited) => limited,
                Ok(headers) => {
                    let mut r = self.route(&mut st, &req);
                    r.headers.extend(headers);
                    r
                }
            }
        };
        if let Some(b) = &reply.body {
            if reply.status < 300 {
                if let Err(e) = check_reply(&req, b) {
                    self.violation(
                        &mut st,
                        format!(
                            "FAKE BUG: reply to {} does not deserialize in serenity: {e}",
                            req.what()
                        ),
                    );
                }
            }
        }
        let index = st.calls.len();
        st.calls.push(RecordedCall {
            index,
            method: req.method,
            path: req.path,
            query: req.query,
            body: req.body,
            files: req.files,
            status: reply.status,
            injected_failure: injected,
            at: Instant::now(),
        });
        reply
    }

    /// Applies the rate limits to a bot call: the headers to add, or the 429.
    fn rate_limit(&self, st: &mut FakeState, req: &Req) -> Result<Vec<(String, String)>, Reply> {
        let Some(rl) = &self.cfg.rate_limits else {
            return Ok(Vec::new());
        };
        let now = Instant::now();
        // Global: a rolling second, never advertised.
        while st
            .global_recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            st.global_recent.pop_front();
        }
        if st.global_recent.len() >= rl.global_per_sec {
            st.rate_limited += 1;
            let retry = st.global_recent.front().map_or(Duration::ZERO, |t| {
                (*t + Duration::from_secs(1)).duration_since(now)
            });
            let secs = retry.as_secs_f64();
            return Err(Reply {
                status: 429,
                body: Some(
                    json!({"message": "You are being rate limited.", "retry_after": secs, "global": true}),
                ),
                headers: vec![
                    ("retry-after".into(), format!("{}", secs.ceil() as u64)),
                    ("x-ratelimit-global".into(), "true".into()),
                    ("x-ratelimit-scope".into(), "global".into()),
                ],
            });
        }
        st.global_recent.push_back(now);
        // Bucket: the route with ids after the major parameter (segment 1) wildcarded.
        let template: Vec<&str> = req
            .segs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if i >= 2 && x.parse::<u64>().is_ok() {
                    "*"
                } else if i == 1 && x.parse::<u64>().is_ok() {
                    "{major}"
                } else {
                    x.as_str()
                }
            })
            .collect();
        let template = format!("{} /{}", req.method, template.join("/"));
        let bucket_id = format!("{:016x}", fnv(&template));
        let major = req.segs.get(1).cloned().unwrap_or_default();
        let key = format!("{bucket_id}:{major}");
        let entry = st.buckets.entry(key).or_insert((now, 0));
        if now >= entry.0 {
            *entry = (now + rl.bucket_window, 0);
        }
        let reset_after = entry.0.duration_since(now).as_secs_f64();
        let mut headers = vec![
            ("x-ratelimit-limit".to_string(), rl.bucket_limit.to_string()),
            ("x-ratelimit-bucket".to_string(), bucket_id),
            (
                "x-ratelimit-reset-after".to_string(),
                format!("{reset_after:.3}"),
            ),
        ];
        if entry.1 >= rl.bucket_limit {
            st.rate_limited += 1;
            headers.push(("x-ratelimit-remaining".into(), "0".into()));
            headers.push((
                "retry-after".into(),
                format!("{}", reset_after.ceil() as u64),
            ));
            headers.push(("x-ratelimit-scope".into(), "user".into()));
            return Err(Reply {
                status: 429,
                body: Some(
                    json!({"message": "You are being rate limited.", "retry_after": reset_after, "global": false}),
                ),
                headers,
            });
        }
        entry.1 += 1;
        headers.push((
            "x-ratelimit-remaining".to_string(),
            (rl.bucket_limit - entry.1).to_string(),
        ));
        Ok(headers)
    }

    fn route(&self, st: &mut FakeState, req: &Req) -> Reply {
        let cfg = &self.cfg;
        let s: Vec<&str> = req.segs.iter().map(String::as_str).collect();
        let m = req.method.as_str();
        let id = |i: usize| s.get(i).and_then(|x| x.parse::<u64>().ok());
        match (m, s.as_slice()) {
            ("GET", ["gateway"]) => Reply::json(json!({"url": self.gateway_url()})),
            ("GET", ["gateway", "bot"]) => {
                Reply::json(json!({"url": self.gateway_url(), "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1}}))
            }
            ("GET", ["users", "@me"]) => Reply::json(current_user_json(cfg)),
            ("GET", ["users", _]) => match id(1) {
                Some(u) if u == cfg.bot_user_id || cfg.member(u).is_some() => {
                    Reply::json(user_json(cfg, u))
                }
                _ => Reply::error(404, 10013, "Unknown User"),
            },
            ("GET", ["oauth2", "applications", "@me"]) => Reply::json(app_info_json(cfg)),
            ("POST", ["users", "@me", "channels"]) => {
                let Some(user) = sf(&req.body["recipient_id"]) else {
                    return self.reject(
                        st,
                        req,
                        vec![problem(
                            "recipient_id",
                            "BASE_TYPE_REQUIRED",
                            "This field is required".into(),
                        )],
                    );
                };
                let channel = st.dm_channel(user);
                Reply::json(dm_channel_json(cfg, channel, user))
            }
            ("GET", ["channels", _]) => {
                let c = id(1).unwrap_or_default();
                if let Some(name) = cfg
                    .text_channels()
                    .into_iter()
                    .find(|(x, _)| *x == c)
                    .map(|(_, n)| n)
                {
                    Reply::json(guild_channel_json(cfg, c, &name, 0))
                } else if let Some(u) = st.dm_recipient(c) {
                    Reply::json(dm_channel_json(cfg, c, u))
                } else {
                    // Not a violation: a bot checking a configured channel id is legitimate.
                    Reply::error(404, 10003, "Unknown Channel")
                }
            }
            ("POST", ["channels", _, "messages"]) => {
                self.create_channel_message(st, req, id(1).unwrap_or_default())
            }
            ("GET", ["channels", _, "messages"]) => {
                let c = id(1).unwrap_or_default();
                let limit = query_param(&req.query, "limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(50usize);
                let mut msgs = channel_messages(st, c);
                msgs.reverse();
                msgs.truncate(limit.min(100));
                Reply::json(Value::Array(
                    msgs.iter()
                        .map(|m| message_json(cfg, &self.api_base(), m))
                        .collect(),
                ))
            }
            ("GET", ["channels", _, "messages", _]) => match self.find_message(st, id(1), id(3)) {
                Some(msg) => Reply::json(message_json(cfg, &self.api_base(), &msg)),
                None => self.not_found(st, req, 10008, "Unknown Message"),
            },
            ("PATCH", ["channels", _, "messages", _]) => {
                match self.find_message(st, id(1), id(3)) {
                    Some(msg) if msg.author_id != cfg.bot_user_id => {
                        self.violation(
                            st,
                            format!("{}: editing a message authored by another user", req.what()),
                        );
                        Reply::error(403, 50005, "Cannot edit a message authored by another user")
                    }
                    Some(msg) => self.edit_message(st, req, &req.body, msg.id),
                    None => self.not_found(st, req, 10008, "Unknown Message"),
                }
            }
            ("DELETE", ["channels", _, "messages", _]) => match self.find_message(st, id(1), id(3))
            {
                Some(msg) => {
                    st.messages.remove(&msg.id);
                    if st.gw.session_id.is_some() {
                        let mut d = json!({"id": msg.id.to_string(), "channel_id": msg.channel_id.to_string()});
                        if let Some(g) = msg.guild_id {
                            d["guild_id"] = json!(g.to_string());
                        }
                        self.dispatch(st, "MESSAGE_DELETE", d);
                    }
                    Reply::no_content()
                }
                None => self.not_found(st, req, 10008, "Unknown Message"),
            },
            ("POST", ["interactions", _, token, "callback"]) => {
                self.interaction_callback(st, req, id(1), token)
            }
            ("POST", ["webhooks", _, token]) => self.followup(st, req, id(1), token),
            ("GET" | "PATCH" | "DELETE", ["webhooks", _, token, "messages", which]) => {
                self.webhook_message(st, req, id(1), token, which)
            }
            ("PUT", ["applications", _, "commands"]) => self.put_commands(st, req, id(1), false),
            ("PUT", ["applications", _, "guilds", _, "commands"]) => {
                if id(3) != Some(cfg.guild_id) {
                    return self.not_found(st, req, 10004, "Unknown Guild");
                }
                self.put_commands(st, req, id(1), true)
            }
            ("GET", ["applications", _, "commands"]) => {
                Reply::json(Value::Array(st.global_commands.clone()))
            }
            ("GET", ["applications", _, "guilds", _, "commands"]) => {
                Reply::json(Value::Array(st.guild_commands.clone()))
            }
            ("GET", ["guilds", _]) if id(1) == Some(cfg.guild_id) => {
                Reply::json(guild_json(cfg, false))
            }
            ("GET", ["guilds", _, "roles"]) if id(1) == Some(cfg.guild_id) => Reply::json(
                Value::Array(cfg.roles.iter().map(|r| role_json(cfg, r)).collect()),
            ),
            ("GET", ["guilds", _, "channels"]) if id(1) == Some(cfg.guild_id) => {
                Reply::json(Value::Array(
                    cfg.text_channels()
                        .iter()
                        .enumerate()
                        .map(|(i, (c, n))| guild_channel_json(cfg, *c, n, i))
                        .collect(),
                ))
            }
            // Looking up a guild the bot is not in is legitimate (a wrong guild_id).
            ("GET", ["guilds", _]) => Reply::error(404, 10004, "Unknown Guild"),
            ("GET", ["guilds", _, "members", _]) if id(1) == Some(cfg.guild_id) => {
                match id(3).and_then(|u| member_json(cfg, u, true, false)) {
                    Some(mut m) => {
                        m["guild_id"] = json!(cfg.guild_id.to_string());
                        Reply::json(m)
                    }
                    // Not a violation: looking up someone who left is legitimate.
                    None => Reply::error(404, 10007, "Unknown Member"),
                }
            }
            _ => {
                self.violation(
                    st,
                    format!(
                        "{}: route not implemented by the fake (or not a Discord route)",
                        req.what()
                    ),
                );
                Reply::error(404, 0, "404: Not Found")
            }
        }
    }

    fn not_found(&self, st: &mut FakeState, req: &Req, code: u64, message: &str) -> Reply {
        self.violation(st, format!("{}: {message}", req.what()));
        Reply::error(404, code, message)
    }

    fn reject(&self, st: &mut FakeState, req: &Req, problems: Vec<Problem>) -> Reply {
        let mut errors = Map::new();
        for p in &problems {
            self.violation(st, format!("{}: {}: {}", req.what(), p.path, p.message));
            insert_error(&mut errors, &p.path, p.code, &p.message);
        }
        Reply {
            status: 400,
            body: Some(json!({"message": "Invalid Form Body", "code": 50035, "errors": errors})),
            headers: Vec::new(),
        }
    }

    fn find_message(
        &self,
        st: &FakeState,
        channel: Option<u64>,
        message: Option<u64>,
    ) -> Option<StoredMessage> {
        st.messages
            .get(&message?)
            .filter(|m| Some(m.channel_id) == channel)
            .cloned()
    }

    fn require_allowed_mentions(
        &self,
        st: &mut FakeState,
        req: &Req,
        body: &Value,
        creating: bool,
    ) {
        let has_content = body.get("content").is_some_and(|c| !c.is_null());
        if (creating || has_content) && body.get("allowed_mentions").is_none_or(Value::is_null) {
            let what = if creating {
                "message sent"
            } else {
                "message content edited"
            };
            self.violation(
                st,
                format!(
                    "{}: {what} without an explicit allowed_mentions",
                    req.what()
                ),
            );
        }
    }

    fn create_channel_message(&self, st: &mut FakeState, req: &Req, channel: u64) -> Reply {
        let cfg = &self.cfg;
        let guild_id = if cfg.is_guild_channel(channel) {
            Some(cfg.guild_id)
        } else if let Some(user) = st.dm_recipient(channel) {
            if !cfg.member(user).is_some_and(|m| m.dms_open) {
                // A real-world condition the bot must handle, not a violation.
                return Reply::error(403, 50007, "Cannot send messages to this user");
            }
            None
        } else {
            return self.not_found(st, req, 10003, "Unknown Channel");
        };
        let mut problems = validate_message(&req.body, true, !req.files.is_empty());
        let attachments = match self.build_attachments(st, &req.body, &req.files, &[]) {
            Ok(a) => a,
            Err(p) => {
                problems.push(p);
                Vec::new()
            }
        };
        if !problems.is_empty() {
            return self.reject_message(st, req, problems);
        }
        self.require_allowed_mentions(st, req, &req.body, true);
        let msg =
            self.store_new_message(st, channel, guild_id, &req.body, attachments, None, None, 0);
        self.echo_bot_message(st, "MESSAGE_CREATE", &msg);
        Reply::json(message_json(cfg, &self.api_base(), &msg))
    }

    fn reject_message(&self, st: &mut FakeState, req: &Req, problems: Vec<Problem>) -> Reply {
        if let Some(p) = problems.iter().find(|p| p.code == "EMPTY_MESSAGE") {
            self.violation(st, format!("{}: {}", req.what(), p.message));
            return Reply::error(400, 50006, "Cannot send an empty message");
        }
        self.reject(st, req, problems)
    }

    #[allow(clippy::too_many_arguments)]
    fn store_new_message(
        &self,
        st: &mut FakeState,
        channel: u64,
        guild_id: Option<u64>,
        body: &Value,
        attachments: Vec<StoredAttachment>,
        interaction_id: Option<u64>,
        interaction_metadata: Option<Value>,
        kind: u8,
    ) -> StoredMessage {
        let id = st.new_id();
        let msg = StoredMessage {
            id,
            channel_id: channel,
            guild_id,
            author_id: self.cfg.bot_user_id,
            content: body["content"].as_str().unwrap_or("").to_string(),
            embeds: normalize_embeds(&body["embeds"]),
            components: body["components"].as_array().cloned().unwrap_or_default(),
            allowed_mentions: body
                .get("allowed_mentions")
                .filter(|v| !v.is_null())
                .cloned(),
            attachments,
            flags: body["flags"].as_u64().unwrap_or(0),
            edit_count: 0,
            interaction_id,
            interaction_metadata,
            kind,
            created_ms: now_ms(),
            edited_ms: None,
        };
        st.messages.insert(id, msg.clone());
        msg
    }

    /// Applies an edit body to a stored bot message (PATCH message, @original, type 7).
    fn edit_message(&self, st: &mut FakeState, req: &Req, body: &Value, message_id: u64) -> Reply {
        let Some(existing) = st.messages.get(&message_id).cloned() else {
            return self.not_found(st, req, 10008, "Unknown Message");
        };
        let mut problems = validate_message(body, false, !req.files.is_empty());
        let attachments = match self.build_attachments(st, body, &req.files, &existing.attachments)
        {
            Ok(a) => a,
            Err(p) => {
                problems.push(p);
                Vec::new()
            }
        };
        if !problems.is_empty() {
            return self.reject_message(st, req, problems);
        }
        self.require_allowed_mentions(st, req, body, false);
        let msg = self.apply_edit(st, message_id, body, attachments);
        Reply::json(message_json(&self.cfg, &self.api_base(), &msg))
    }

    fn apply_edit(
        &self,
        st: &mut FakeState,
        message_id: u64,
        body: &Value,
        attachments: Vec<StoredAttachment>,
    ) -> StoredMessage {
        let Some(msg) = st.messages.get_mut(&message_id) else {
            return dummy_message();
        };
        if let Some(c) = body.get("content") {
            msg.content = c.as_str().unwrap_or("").to_string();
        }
        if body.get("embeds").is_some() {
            msg.embeds = normalize_embeds(&body["embeds"]);
        }
        if body.get("components").is_some() {
            msg.components = body["components"].as_array().cloned().unwrap_or_default();
        }
        if let Some(a) = body.get("allowed_mentions").filter(|v| !v.is_null()) {
            msg.allowed_mentions = Some(a.clone());
        }
        if let Some(f) = body.get("flags").and_then(Value::as_u64) {
            msg.flags = (msg.flags & FLAG_EPHEMERAL) | (f & !FLAG_EPHEMERAL);
        }
        msg.flags &= !FLAG_LOADING;
        msg.attachments = attachments;
        msg.edit_count += 1;
        msg.edited_ms = Some(now_ms());
        let msg = msg.clone();
        self.echo_bot_message(st, "MESSAGE_UPDATE", &msg);
        msg
    }

    /// Resolves `attachments` + `files[n]` into the message's attachment list. For edits,
    /// existing attachments survive only if listed (Discord semantics) or if `attachments`
    /// is absent.
    fn build_attachments(
        &self,
        st: &mut FakeState,
        body: &Value,
        files: &[RecordedFile],
        existing: &[StoredAttachment],
    ) -> Result<Vec<StoredAttachment>, Problem> {
        let mut used = vec![false; files.len()];
        let mut out = Vec::new();
        let new_file = |st: &mut FakeState,
                        f: &RecordedFile,
                        filename: Option<&str>,
                        desc: Option<String>| StoredAttachment {
            id: st.new_id(),
            filename: filename.unwrap_or(&f.filename).to_string(),
            description: desc,
            content_type: f.content_type.clone(),
            data: f.data.clone(),
        };
        match body.get("attachments").and_then(Value::as_array) {
            Some(list) => {
                for (i, a) in list.iter().enumerate() {
                    if let Some(filename) = a["filename"].as_str() {
                        let n = sf(&a["id"]).unwrap_or(i as u64);
                        let field = format!("files[{n}]");
                        let Some(pos) = files.iter().position(|f| f.field == field) else {
                            return Err(problem(&format!("attachments.{i}"), "ATTACHMENT_NOT_FOUND",
                                format!("attachment {filename:?} refers to {field}, which was not uploaded")));
                        };
                        used[pos] = true;
                        let desc = a["description"].as_str().map(str::to_string);
                        out.push(new_file(st, &files[pos], Some(filename), desc));
                    } else {
                        let id = sf(&a["id"]).unwrap_or_default();
                        match existing.iter().find(|e| e.id == id) {
                            Some(e) => out.push(e.clone()),
                            None => {
                                return Err(problem(
                                    &format!("attachments.{i}"),
                                    "ATTACHMENT_NOT_FOUND",
                                    format!("unknown existing attachment id {id}"),
                                ));
                            }
                        }
                    }
                }
            }
            None => out.extend(existing.iter().cloned()),
        }
        for (i, f) in files.iter().enumerate() {
            if !used[i] && f.field.starts_with("files[") {
                out.push(new_file(st, f, None, None));
            }
        }
        Ok(out)
    }

    fn interaction_callback(
        &self,
        st: &mut FakeState,
        req: &Req,
        id: Option<u64>,
        token: &str,
    ) -> Reply {
        let cfg = &self.cfg;
        let Some(i) = id
            .and_then(|id| st.interactions.get(&id))
            .filter(|i| i.handle.token == token)
        else {
            return self.not_found(st, req, 10062, "Unknown interaction");
        };
        let iid = i.handle.id;
        let kind = i.handle.kind;
        let label = i.label.clone();
        let elapsed = i.injected_at.elapsed();
        let channel = i.handle.channel_id;
        let source_message = i.handle.message_id;
        let guild = i.guild;
        let metadata = i.metadata.clone();
        let already = i.initial.is_some();
        let reject = |st: &mut FakeState, text: String| {
            if let Some(i) = st.interactions.get_mut(&iid) {
                i.rejections.push(text);
            }
        };
        if already {
            let text = format!(
                "interaction {iid} ({label}) answered twice: initial response already sent"
            );
            reject(st, text.clone());
            self.violation(st, text);
            return Reply::error(400, 40060, "Interaction has already been acknowledged.");
        }
        if elapsed > cfg.interaction_deadline {
            let text = format!(
                "interaction {iid} ({label}) answered after {elapsed:?} (limit {:?})",
                cfg.interaction_deadline
            );
            reject(st, text.clone());
            if let Some(i) = st.interactions.get_mut(&iid) {
                // One violation per late interaction, not also "never answered".
                i.reported_unanswered = true;
            }
            self.violation(st, text);
            return Reply::error(404, 10062, "Unknown interaction");
        }
        let rtype = req.body["type"].as_u64().unwrap_or(0);
        let data = req.body.get("data").cloned().unwrap_or(Value::Null);
        let allowed = match rtype {
            4 | 5 => matches!(kind, 2..=5),
            6 | 7 => kind == 3 || (kind == 5 && source_message.is_some()),
            8 => kind == 4,
            9 => matches!(kind, 2 | 3),
            _ => false,
        };
        if !allowed {
            let text = format!("interaction {iid} ({label}): response type {rtype} is not valid for interaction type {kind}");
            reject(st, text.clone());
            return self.reject(
                st,
                req,
                vec![problem("type", "INTERACTION_RESPONSE_TYPE_INVALID", text)],
            );
        }
        let mut problems = match rtype {
            4 | 7 => validate_message(&data, rtype == 4, !req.files.is_empty()),
            9 => validate_modal(&data),
            _ => Vec::new(),
        }
        .into_iter()
        .map(|mut p| {
            p.path = format!("data.{}", p.path);
            p
        })
        .collect::<Vec<_>>();
        let existing = source_message
            .and_then(|m| st.messages.get(&m))
            .map(|m| m.attachments.clone())
            .unwrap_or_default();
        let attachments = if matches!(rtype, 4 | 7) {
            match self.build_attachments(
                st,
                &data,
                &req.files,
                if rtype == 7 { &existing } else { &[] },
            ) {
                Ok(a) => a,
                Err(p) => {
                    problems.push(p);
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        if !problems.is_empty() {
            reject(
                st,
                format!(
                    "invalid response: {}",
                    problems
                        .iter()
                        .map(|p| p.message.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            );
            return self.reject_message(st, req, problems);
        }
        if matches!(rtype, 4 | 7) {
            self.require_allowed_mentions(st, req, &data, rtype == 4);
        }
        let guild_id = guild.then_some(cfg.guild_id);
        let original = match rtype {
            4 | 5 => {
                let mut body = if rtype == 4 {
                    data.clone()
                } else {
                    json!({"content": ""})
                };
                let f = data["flags"].as_u64().unwrap_or(0);
                body["flags"] = json!(if rtype == 5 {
                    (f & FLAG_EPHEMERAL) | FLAG_LOADING
                } else {
                    f
                });
                let kind_of_msg = if kind == 2 { 20 } else { 19 };
                let msg = self.store_new_message(
                    st,
                    channel,
                    guild_id,
                    &body,
                    attachments,
                    Some(iid),
                    Some(metadata),
                    kind_of_msg,
                );
                self.echo_bot_message(st, "MESSAGE_CREATE", &msg);
                Some(msg.id)
            }
            6 => source_message,
            7 => {
                if let Some(mid) = source_message {
                    self.apply_edit(st, mid, &data, attachments);
                }
                source_message
            }
            _ => None,
        };
        if let Some(i) = st.interactions.get_mut(&iid) {
            i.initial = Some(req.body.clone());
            i.original_message_id = original;
            if rtype == 9 {
                i.modal = Some(data);
            }
        }
        Reply::no_content()
    }

    fn webhook_interaction(
        &self,
        st: &mut FakeState,
        req: &Req,
        app: Option<u64>,
        token: &str,
    ) -> Result<u64, Reply> {
        match st.interaction_by_token(token) {
            Some(iid) if app == Some(self.cfg.application_id) => Ok(iid),
            _ => Err(self.not_found(st, req, 10015, "Unknown Webhook")),
        }
    }

    fn followup(&self, st: &mut FakeState, req: &Req, app: Option<u64>, token: &str) -> Reply {
        let iid = match self.webhook_interaction(st, req, app, token) {
            Ok(i) => i,
            Err(r) => return r,
        };
        let Some(i) = st.interactions.get(&iid) else {
            return Reply::error(404, 10015, "Unknown Webhook");
        };
        if i.initial.is_none() {
            let text = format!(
                "interaction {iid} ({}): follow-up before the initial response",
                i.label
            );
            self.violation(st, text);
            return Reply::error(404, 10015, "Unknown Webhook");
        }
        let channel = i.handle.channel_id;
        let guild_id = i.guild.then_some(self.cfg.guild_id);
        let mut metadata = i.metadata.clone();
        if let Some(o) = i.original_message_id {
            metadata["original_response_message_id"] = json!(o.to_string());
        }
        let mut problems = validate_message(&req.body, true, !req.files.is_empty());
        let attachments = match self.build_attachments(st, &req.body, &req.files, &[]) {
            Ok(a) => a,
            Err(p) => {
                problems.push(p);
                Vec::new()
            }
        };
        if !problems.is_empty() {
            return self.reject_message(st, req, problems);
        }
        self.require_allowed_mentions(st, req, &req.body, true);
        let msg = self.store_new_message(
            st,
            channel,
            guild_id,
            &req.body,
            attachments,
            Some(iid),
            Some(metadata),
            0,
        );
        self.echo_bot_message(st, "MESSAGE_CREATE", &msg);
        Reply::json(message_json(&self.cfg, &self.api_base(), &msg))
    }

    fn webhook_message(
        &self,
        st: &mut FakeState,
        req: &Req,
        app: Option<u64>,
        token: &str,
        which: &str,
    ) -> Reply {
        let iid = match self.webhook_interaction(st, req, app, token) {
            Ok(i) => i,
            Err(r) => return r,
        };
        let Some(i) = st.interactions.get(&iid) else {
            return Reply::error(404, 10015, "Unknown Webhook");
        };
        let target = if which == "@original" {
            if i.initial.is_none() {
                let text = format!(
                    "interaction {iid} ({}): @original used before the initial response",
                    i.label
                );
                self.violation(st, text);
                return Reply::error(404, 10008, "Unknown Message");
            }
            i.original_message_id
        } else {
            which.parse::<u64>().ok().filter(|m| {
                st.messages
                    .get(m)
                    .is_some_and(|msg| msg.interaction_id == Some(iid))
            })
        };
        let Some(mid) = target.filter(|m| st.messages.contains_key(m)) else {
            return self.not_found(st, req, 10008, "Unknown Message");
        };
        match req.method.as_str() {
            "GET" => {
                let msg = st.messages.get(&mid).cloned().unwrap_or_else(dummy_message);
                Reply::json(message_json(&self.cfg, &self.api_base(), &msg))
            }
            "DELETE" => {
                st.messages.remove(&mid);
                Reply::no_content()
            }
            _ => self.edit_message(st, req, &req.body, mid),
        }
    }

    fn put_commands(&self, st: &mut FakeState, req: &Req, app: Option<u64>, guild: bool) -> Reply {
        let cfg = &self.cfg;
        if app != Some(cfg.application_id) {
            return self.not_found(st, req, 10002, "Unknown Application");
        }
        let Some(list) = req.body.as_array() else {
            return self.reject(
                st,
                req,
                vec![problem("", "BASE_TYPE_ARRAY", "Must be an array".into())],
            );
        };
        let problems = validate_commands(list);
        if !problems.is_empty() {
            return self.reject(st, req, problems);
        }
        let previous = if guild {
            st.guild_commands.clone()
        } else {
            st.global_commands.clone()
        };
        let mut echoed = Vec::new();
        for c in list {
            let name = c["name"].as_str().unwrap_or("").to_string();
            let id = previous
                .iter()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| sf(&p["id"]))
                .unwrap_or_else(|| st.new_id());
            let version = st.new_id();
            let mut e = json!({
                "id": id.to_string(),
                "application_id": cfg.application_id.to_string(),
                "version": version.to_string(),
                "type": c["type"].as_u64().unwrap_or(1),
                "name": name,
                "description": c["description"].as_str().unwrap_or(""),
                "options": c["options"].as_array().cloned().unwrap_or_default(),
                "default_member_permissions": c.get("default_member_permissions").cloned().unwrap_or(Value::Null),
                "dm_permission": c.get("dm_permission").cloned().unwrap_or(json!(true)),
                "nsfw": c.get("nsfw").cloned().unwrap_or(json!(false)),
            });
            if guild {
                e["guild_id"] = json!(cfg.guild_id.to_string());
            }
            echoed.push(e);
        }
        if guild {
            st.guild_commands = echoed.clone();
        } else {
            st.global_commands = echoed.clone();
        }
        Reply::json(Value::Array(echoed))
    }
}

/// FNV-1a, for stable fake bucket ids.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn failure_reply(rule: FailRule) -> Reply {
    let mut headers = Vec::new();
    if rule.status == 429 {
        let retry = rule.body["retry_after"].as_f64().unwrap_or(1.0);
        headers.push((
            "retry-after".to_string(),
            format!("{}", retry.ceil() as u64),
        ));
        headers.push(("x-ratelimit-limit".to_string(), "5".to_string()));
        headers.push(("x-ratelimit-remaining".to_string(), "0".to_string()));
        headers.push(("x-ratelimit-reset-after".to_string(), format!("{retry:.3}")));
        headers.push(("x-ratelimit-bucket".to_string(), "fake-bucket".to_string()));
        let global = rule.body["global"].as_bool().unwrap_or(false);
        headers.push((
            "x-ratelimit-scope".to_string(),
            if global { "global" } else { "user" }.to_string(),
        ));
        if global {
            headers.push(("x-ratelimit-global".to_string(), "true".to_string()));
        }
    }
    Reply {
        status: rule.status,
        body: Some(rule.body),
        headers,
    }
}

fn pattern_matches(pattern: &str, method: &str, path: &str) -> bool {
    let pattern = pattern.trim();
    let (pm, pp) = match pattern.split_once(' ') {
        Some((m, p)) => (m.trim(), p.trim()),
        None if pattern.starts_with('/') => ("*", pattern),
        None => (pattern, "/**"),
    };
    if pm != "*" && !pm.eq_ignore_ascii_case(method) {
        return false;
    }
    let pp = pp.strip_prefix("/api/v10").unwrap_or(pp);
    let pat: Vec<&str> = pp.split('/').filter(|s| !s.is_empty()).collect();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, p) in pat.iter().enumerate() {
        if *p == "**" {
            return true;
        }
        let Some(s) = segs.get(i) else { return false };
        let wildcard = *p == "*" || (p.starts_with('{') && p.ends_with('}'));
        if !wildcard && p != s {
            return false;
        }
    }
    pat.len() == segs.len()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

// ---------------------------------------------------------------------------------------------
// Request bodies (JSON and multipart/form-data)
// ---------------------------------------------------------------------------------------------

fn parse_body(content_type: &str, raw: &[u8]) -> Result<(Value, Vec<RecordedFile>), String> {
    if content_type.starts_with("multipart/form-data") {
        let boundary = content_type
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("boundary="))
            .next()
            .ok_or("multipart without boundary")?
            .trim_matches('"')
            .to_string();
        let parts = parse_multipart(raw, &boundary)?;
        let mut body = Value::Null;
        let mut files = Vec::new();
        for (headers, data) in parts {
            let disposition = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-disposition"))
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let name = disposition_param(&disposition, "name").unwrap_or_default();
            if name == "payload_json" {
                body = serde_json::from_slice(&data).map_err(|e| format!("payload_json: {e}"))?;
            } else {
                let content_type = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map_or_else(
                        || "application/octet-stream".to_string(),
                        |(_, v)| v.clone(),
                    );
                files.push(RecordedFile {
                    filename: disposition_param(&disposition, "filename").unwrap_or_default(),
                    field: name,
                    content_type,
                    data,
                });
            }
        }
        return Ok((body, files));
    }
    if raw.is_empty() {
        return Ok((Value::Null, Vec::new()));
    }
    serde_json::from_slice(raw)
        .map(|v| (v, Vec::new()))
        .map_err(|e| format!("JSON: {e}"))
}

type Part = (Vec<(String, String)>, Vec<u8>);

fn parse_multipart(raw: &[u8], boundary: &str) -> Result<Vec<Part>, String> {
    let delim = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let mut pos = find(raw, &delim, 0).ok_or("multipart: no opening boundary")? + delim.len();
    loop {
        if raw[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        let start = pos
            + if raw[pos..].starts_with(b"\r\n") {
                2
            } else {
                0
            };
        let next = find(raw, &delim, start).ok_or("multipart: unterminated part")?;
        let mut part = &raw[start..next];
        if part.ends_with(b"\r\n") {
            part = &part[..part.len() - 2];
        }
        let split = find(part, b"\r\n\r\n", 0).ok_or("multipart: part without header end")?;
        let headers = String::from_utf8_lossy(&part[..split])
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        parts.push((headers, part[split + 4..].to_vec()));
        pos = next + delim.len();
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn disposition_param(disposition: &str, key: &str) -> Option<String> {
    disposition.split(';').map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

// ---------------------------------------------------------------------------------------------
// Validation (Discord limits)
// ---------------------------------------------------------------------------------------------

fn problem(path: &str, code: &'static str, message: String) -> Problem {
    Problem {
        path: path.to_string(),
        code,
        message,
    }
}

fn check_len(out: &mut Vec<Problem>, path: &str, v: &Value, max: usize) -> usize {
    let n = v.as_str().map_or(0, |s| s.chars().count());
    if n > max {
        out.push(problem(
            path,
            "BASE_TYPE_MAX_LENGTH",
            format!("Must be {max} or fewer in length (got {n})."),
        ));
    }
    n
}

fn check_count(out: &mut Vec<Problem>, path: &str, v: &Value, min: usize, max: usize) {
    let n = v.as_array().map_or(0, Vec::len);
    if n < min || n > max {
        out.push(problem(
            path,
            "BASE_TYPE_BAD_LENGTH",
            format!("Must be between {min} and {max} in length (got {n})."),
        ));
    }
}

/// Checks a message create/edit body (also `data` of interaction responses 4 and 7).
pub fn validate_message_body(body: &Value, creating: bool, has_files: bool) -> Vec<String> {
    validate_message(body, creating, has_files)
        .into_iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect()
}

fn validate_message(body: &Value, creating: bool, has_files: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    check_len(&mut out, "content", &body["content"], limits::CONTENT);
    let embeds = &body["embeds"];
    if let Some(list) = embeds.as_array() {
        check_count(&mut out, "embeds", embeds, 0, limits::EMBEDS);
        let mut total = 0;
        for (i, e) in list.iter().enumerate() {
            let p = |k: &str| format!("embeds.{i}.{k}");
            total += check_len(&mut out, &p("title"), &e["title"], limits::EMBED_TITLE);
            total += check_len(
                &mut out,
                &p("description"),
                &e["description"],
                limits::EMBED_DESCRIPTION,
            );
            total += check_len(
                &mut out,
                &p("footer.text"),
                &e["footer"]["text"],
                limits::EMBED_FOOTER,
            );
            total += check_len(
                &mut out,
                &p("author.name"),
                &e["author"]["name"],
                limits::EMBED_AUTHOR,
            );
            if let Some(fields) = e["fields"].as_array() {
                check_count(
                    &mut out,
                    &p("fields"),
                    &e["fields"],
                    0,
                    limits::EMBED_FIELDS,
                );
                for (j, f) in fields.iter().enumerate() {
                    total += check_len(
                        &mut out,
                        &p(&format!("fields.{j}.name")),
                        &f["name"],
                        limits::EMBED_FIELD_NAME,
                    );
                    total += check_len(
                        &mut out,
                        &p(&format!("fields.{j}.value")),
                        &f["value"],
                        limits::EMBED_FIELD_VALUE,
                    );
                    for k in ["name", "value"] {
                        if f[k].as_str().is_none_or(|s| s.trim().is_empty()) {
                            out.push(problem(
                                &p(&format!("fields.{j}.{k}")),
                                "BASE_TYPE_REQUIRED",
                                "This field is required".into(),
                            ));
                        }
                    }
                }
            }
        }
        if total > limits::EMBED_TOTAL {
            out.push(problem(
                "embeds",
                "MAX_EMBED_SIZE_EXCEEDED",
                format!(
                    "Embed size exceeds maximum size of {} (got {total}).",
                    limits::EMBED_TOTAL
                ),
            ));
        }
    }
    if body.get("components").is_some_and(|c| !c.is_null()) {
        validate_components(&mut out, &body["components"]);
    }
    let am = &body["allowed_mentions"];
    if am.is_object() {
        let parse: Vec<&str> = am["parse"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for (kind, list) in [("users", &am["users"]), ("roles", &am["roles"])] {
            let n = list.as_array().map_or(0, Vec::len);
            if n > 0 && parse.contains(&kind) {
                out.push(problem(
                    &format!("allowed_mentions.{kind}"),
                    "ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                    format!("parse:[\"{kind}\"] and {kind}: [...] are mutually exclusive."),
                ));
            }
            if n > 100 {
                out.push(problem(
                    &format!("allowed_mentions.{kind}"),
                    "BASE_TYPE_MAX_LENGTH",
                    "Must be 100 or fewer in length.".into(),
                ));
            }
        }
    }
    if creating && out.is_empty() {
        let non_empty = |k: &str| match &body[k] {
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => false,
        };
        let has_attachments = has_files || non_empty("attachments");
        if !(non_empty("content")
            || non_empty("embeds")
            || non_empty("components")
            || non_empty("sticker_ids")
            || has_attachments
            || body.get("poll").is_some_and(|p| !p.is_null()))
        {
            out.push(problem(
                "",
                "EMPTY_MESSAGE",
                "Cannot send an empty message".into(),
            ));
        }
    }
    out
}

fn validate_components(out: &mut Vec<Problem>, rows: &Value) {
    check_count(out, "components", rows, 0, limits::ACTION_ROWS);
    let mut seen: Vec<String> = Vec::new();
    for (i, row) in rows.as_array().into_iter().flatten().enumerate() {
        let rp = format!("components.{i}");
        if row["type"].as_u64() != Some(1) {
            out.push(problem(
                &rp,
                "COMPONENT_LAYOUT_INVALID",
                "Top-level components must be action rows (type 1).".into(),
            ));
            continue;
        }
        let comps = row["components"].as_array().cloned().unwrap_or_default();
        let has_select = comps
            .iter()
            .any(|c| matches!(c["type"].as_u64(), Some(3 | 5..=8)));
        let max = if has_select { 1 } else { limits::ROW_BUTTONS };
        check_count(out, &format!("{rp}.components"), &row["components"], 1, max);
        for (j, c) in comps.iter().enumerate() {
            let cp = format!("{rp}.components.{j}");
            if let Some(id) = c["custom_id"].as_str() {
                check_len(
                    out,
                    &format!("{cp}.custom_id"),
                    &c["custom_id"],
                    limits::CUSTOM_ID,
                );
                if id.is_empty() {
                    out.push(problem(
                        &format!("{cp}.custom_id"),
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.".into(),
                    ));
                }
                if seen.iter().any(|s| s == id) {
                    out.push(problem(
                        &format!("{cp}.custom_id"),
                        "COMPONENT_CUSTOM_ID_DUPLICATED",
                        format!("Component custom id {id:?} cannot be duplicated."),
                    ));
                }
                seen.push(id.to_string());
            }
            match c["type"].as_u64() {
                Some(2) => {
                    check_len(
                        out,
                        &format!("{cp}.label"),
                        &c["label"],
                        limits::BUTTON_LABEL,
                    );
                    let style = c["style"].as_u64().unwrap_or(0);
                    let ok = match style {
                        1..=4 => c["custom_id"].is_string() && c["url"].is_null(),
                        5 => c["url"].is_string() && c["custom_id"].is_null(),
                        6 => c["sku_id"].is_string() || c["sku_id"].is_number(),
                        _ => false,
                    };
                    if !ok {
                        out.push(problem(&cp, "BUTTON_COMPONENT_INVALID",
                            format!("Button style {style} needs exactly one of custom_id (styles 1-4) or url (style 5).")));
                    }
                }
                Some(3 | 5..=8) => {
                    if !c["custom_id"].is_string() {
                        out.push(problem(
                            &format!("{cp}.custom_id"),
                            "BASE_TYPE_REQUIRED",
                            "This field is required".into(),
                        ));
                    }
                    check_len(
                        out,
                        &format!("{cp}.placeholder"),
                        &c["placeholder"],
                        limits::SELECT_PLACEHOLDER,
                    );
                    if c["type"].as_u64() == Some(3) {
                        check_count(
                            out,
                            &format!("{cp}.options"),
                            &c["options"],
                            1,
                            limits::SELECT_OPTIONS,
                        );
                    }
                }
                other => out.push(problem(
                    &cp,
                    "COMPONENT_TYPE_INVALID",
                    format!("Component type {other:?} is not allowed in a message action row."),
                )),
            }
        }
    }
}

fn validate_modal(data: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    for (k, max) in [
        ("title", limits::MODAL_TITLE),
        ("custom_id", limits::CUSTOM_ID),
    ] {
        let n = check_len(&mut out, k, &data[k], max);
        if n == 0 {
            out.push(problem(
                k,
                "BASE_TYPE_REQUIRED",
                "This field is required".into(),
            ));
        }
    }
    check_count(&mut out, "components", &data["components"], 1, 5);
    for (i, row) in data["components"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let rp = format!("components.{i}");
        check_count(
            &mut out,
            &format!("{rp}.components"),
            &row["components"],
            1,
            1,
        );
        for (j, c) in row["components"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let cp = format!("{rp}.components.{j}");
            if row["type"].as_u64() != Some(1) || c["type"].as_u64() != Some(4) {
                out.push(problem(
                    &cp,
                    "COMPONENT_LAYOUT_INVALID",
                    "Modals take action rows holding one text input (type 4).".into(),
                ));
                continue;
            }
            if check_len(
                &mut out,
                &format!("{cp}.label"),
                &c["label"],
                limits::TEXT_INPUT_LABEL,
            ) == 0
            {
                out.push(problem(
                    &format!("{cp}.label"),
                    "BASE_TYPE_REQUIRED",
                    "This field is required".into(),
                ));
            }
            if check_len(
                &mut out,
                &format!("{cp}.custom_id"),
                &c["custom_id"],
                limits::CUSTOM_ID,
            ) == 0
            {
                out.push(problem(
                    &format!("{cp}.custom_id"),
                    "BASE_TYPE_REQUIRED",
                    "This field is required".into(),
                ));
            }
            check_len(
                &mut out,
                &format!("{cp}.placeholder"),
                &c["placeholder"],
                limits::TEXT_INPUT_PLACEHOLDER,
            );
            check_len(
                &mut out,
                &format!("{cp}.value"),
                &c["value"],
                limits::TEXT_INPUT_VALUE,
            );
            if !matches!(c["style"].as_u64(), Some(1 | 2)) {
                out.push(problem(
                    &format!("{cp}.style"),
                    "BASE_TYPE_CHOICES",
                    "Value must be one of {1, 2}.".into(),
                ));
            }
        }
    }
    out
}

fn valid_command_name(name: &str) -> bool {
    let n = name.chars().count();
    (1..=limits::COMMAND_NAME).contains(&n)
        && name.chars().all(|c| {
            c == '-' || c == '_' || c.is_numeric() || (c.is_alphabetic() && !c.is_uppercase())
        })
}

fn validate_options(out: &mut Vec<Problem>, path: &str, options: &Value) {
    check_count(out, path, options, 0, limits::COMMAND_OPTIONS);
    let mut optional_seen = false;
    for (i, o) in options.as_array().into_iter().flatten().enumerate() {
        let op = format!("{path}.{i}");
        if !valid_command_name(o["name"].as_str().unwrap_or("")) {
            out.push(problem(
                &format!("{op}.name"),
                "APPLICATION_COMMAND_INVALID_NAME",
                format!("Invalid option name {:?}.", o["name"]),
            ));
        }
        let d = o["description"].as_str().map_or(0, |s| s.chars().count());
        if !(1..=limits::COMMAND_DESCRIPTION).contains(&d) {
            out.push(problem(
                &format!("{op}.description"),
                "BASE_TYPE_BAD_LENGTH",
                "Must be between 1 and 100 in length.".into(),
            ));
        }
        let kind = o["type"].as_u64().unwrap_or(0);
        if matches!(kind, 1 | 2) {
            validate_options(out, &format!("{op}.options"), &o["options"]);
        } else {
            let required = o["required"].as_bool().unwrap_or(false);
            if required && optional_seen {
                out.push(problem(
                    &op,
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                    "Required options must be placed before non-required options.".into(),
                ));
            }
            optional_seen |= !required;
        }
        if o["choices"].is_array() {
            check_count(out, &format!("{op}.choices"), &o["choices"], 0, 25);
        }
    }
}

fn validate_commands(list: &[Value]) -> Vec<Problem> {
    let mut out = Vec::new();
    if list.len() > 100 {
        out.push(problem(
            "",
            "BASE_TYPE_MAX_LENGTH",
            "Must be 100 or fewer in length.".into(),
        ));
    }
    let mut names: Vec<(u64, String)> = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let kind = c["type"].as_u64().unwrap_or(1);
        let name = c["name"].as_str().unwrap_or("").to_string();
        if kind == 1 && !valid_command_name(&name) {
            out.push(problem(
                &format!("{i}.name"),
                "APPLICATION_COMMAND_INVALID_NAME",
                format!("Invalid command name {name:?}."),
            ));
        }
        let d = c["description"].as_str().map_or(0, |s| s.chars().count());
        if kind == 1 && !(1..=limits::COMMAND_DESCRIPTION).contains(&d) {
            out.push(problem(
                &format!("{i}.description"),
                "BASE_TYPE_BAD_LENGTH",
                "Must be between 1 and 100 in length.".into(),
            ));
        }
        if names.contains(&(kind, name.clone())) {
            out.push(problem(
                &format!("{i}.name"),
                "APPLICATION_COMMANDS_DUPLICATE_NAME",
                format!("Command name {name:?} is already used."),
            ));
        }
        names.push((kind, name));
        if c["options"].is_array() {
            validate_options(&mut out, &format!("{i}.options"), &c["options"]);
        }
    }
    out
}

fn insert_error(errors: &mut Map<String, Value>, path: &str, code: &str, message: &str) {
    let mut cur = errors;
    for key in path.split('.').filter(|k| !k.is_empty()) {
        let entry = cur.entry(key.to_string()).or_insert_with(|| json!({}));
        if !entry.is_object() {
            *entry = json!({});
        }
        cur = match entry.as_object_mut() {
            Some(m) => m,
            None => return,
        };
    }
    let list = cur.entry("_errors").or_insert_with(|| json!([]));
    if let Some(a) = list.as_array_mut() {
        a.push(json!({"code": code, "message": message}));
    }
}

// ---------------------------------------------------------------------------------------------
// Payload builders
// ---------------------------------------------------------------------------------------------

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn timestamp(ms: i64) -> String {
    serenity::model::Timestamp::from_millis(ms)
        .ok()
        .and_then(|t| t.to_rfc3339())
        .unwrap_or_else(|| "2024-01-01T00:00:00.000Z".to_string())
}

/// A snowflake from a JSON string or number.
fn sf(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn dummy_message() -> StoredMessage {
    StoredMessage {
        id: 0,
        channel_id: 0,
        guild_id: None,
        author_id: 0,
        content: String::new(),
        embeds: Vec::new(),
        components: Vec::new(),
        allowed_mentions: None,
        attachments: Vec::new(),
        flags: 0,
        edit_count: 0,
        interaction_id: None,
        interaction_metadata: None,
        kind: 0,
        created_ms: 0,
        edited_ms: None,
    }
}

fn normalize_embeds(v: &Value) -> Vec<Value> {
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut e| {
            if let Some(o) = e.as_object_mut() {
                o.entry("type").or_insert(json!("rich"));
            }
            e
        })
        .collect()
}

fn user_json(cfg: &FakeDiscordConfig, id: u64) -> Value {
    json!({
        "id": id.to_string(),
        "username": cfg.username(id),
        "global_name": null,
        "discriminator": "0",
        "avatar": null,
        "bot": id == cfg.bot_user_id,
        "public_flags": 0,
    })
}

fn current_user_json(cfg: &FakeDiscordConfig) -> Value {
    let mut u = user_json(cfg, cfg.bot_user_id);
    u["verified"] = json!(true);
    u["mfa_enabled"] = json!(false);
    u["flags"] = json!(0);
    u
}

fn app_info_json(cfg: &FakeDiscordConfig) -> Value {
    json!({
        "id": cfg.application_id.to_string(),
        "name": cfg.bot_username,
        "icon": null,
        "description": "",
        "rpc_origins": [],
        "bot_public": false,
        "bot_require_code_grant": false,
        "verify_key": "0000000000000000000000000000000000000000000000000000000000000000",
        "owner": user_json(cfg, cfg.owner_id),
        "team": null,
        "flags": 0,
        "bot": user_json(cfg, cfg.bot_user_id),
    })
}

/// A member object; `with_user` adds `user`, `with_permissions` adds the interaction-only
/// `permissions` string. `None` for users that are not in the guild.
fn member_json(
    cfg: &FakeDiscordConfig,
    user_id: u64,
    with_user: bool,
    with_permissions: bool,
) -> Option<Value> {
    let roles = cfg.member_roles(user_id)?;
    let mut m = json!({
        "nick": null,
        "avatar": null,
        "roles": roles.iter().map(u64::to_string).collect::<Vec<_>>(),
        "joined_at": "2024-01-01T00:00:00.000Z",
        "premium_since": null,
        "deaf": false,
        "mute": false,
        "flags": 0,
        "pending": false,
    });
    if with_user {
        m["user"] = user_json(cfg, user_id);
    }
    if with_permissions {
        m["permissions"] = json!(cfg.permissions_of(user_id).to_string());
    }
    Some(m)
}

fn role_json(cfg: &FakeDiscordConfig, r: &FakeRole) -> Value {
    let managed = r.id == cfg.bot_role_id;
    let mut v = json!({
        "id": r.id.to_string(),
        "name": r.name,
        "color": 0,
        "colors": {"primary_color": 0, "secondary_color": null, "tertiary_color": null},
        "hoist": false,
        "icon": null,
        "unicode_emoji": null,
        "position": r.position,
        "permissions": r.permissions.to_string(),
        "managed": managed,
        "mentionable": false,
        "flags": 0,
    });
    if managed {
        v["tags"] = json!({"bot_id": cfg.bot_user_id.to_string()});
    }
    v
}

fn guild_channel_json(cfg: &FakeDiscordConfig, id: u64, name: &str, position: usize) -> Value {
    json!({
        "id": id.to_string(),
        "type": 0,
        "guild_id": cfg.guild_id.to_string(),
        "name": name,
        "position": position,
        "permission_overwrites": [],
        "nsfw": false,
        "topic": null,
        "last_message_id": null,
        "rate_limit_per_user": 0,
        "parent_id": null,
        "flags": 0,
    })
}

fn dm_channel_json(cfg: &FakeDiscordConfig, channel_id: u64, user_id: u64) -> Value {
    json!({
        "id": channel_id.to_string(),
        "type": 1,
        "last_message_id": null,
        "recipients": [user_json(cfg, user_id)],
        "flags": 0,
    })
}

fn guild_json(cfg: &FakeDiscordConfig, gateway: bool) -> Value {
    let mut g = json!({
        "id": cfg.guild_id.to_string(),
        "name": cfg.guild_name,
        "icon": null,
        "splash": null,
        "discovery_splash": null,
        "owner_id": cfg.owner_id.to_string(),
        "afk_channel_id": null,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "roles": cfg.roles.iter().map(|r| role_json(cfg, r)).collect::<Vec<_>>(),
        "emojis": [],
        "features": [],
        "mfa_level": 0,
        "application_id": null,
        "system_channel_id": null,
        "system_channel_flags": 0,
        "rules_channel_id": null,
        "vanity_url_code": null,
        "description": null,
        "banner": null,
        "premium_tier": 0,
        "premium_subscription_count": 0,
        "preferred_locale": "en-US",
        "public_updates_channel_id": null,
        "nsfw_level": 0,
        "stickers": [],
        "premium_progress_bar_enabled": false,
    });
    if gateway {
        let mut members: Vec<Value> = cfg
            .members
            .iter()
            .filter_map(|m| member_json(cfg, m.user_id, true, false))
            .collect();
        members.extend(member_json(cfg, cfg.bot_user_id, true, false));
        let channels: Vec<Value> = cfg
            .text_channels()
            .iter()
            .enumerate()
            .map(|(i, (c, n))| guild_channel_json(cfg, *c, n, i))
            .collect();
        let extra = json!({
            "joined_at": "2024-01-01T00:00:00.000Z",
            "large": false,
            "unavailable": false,
            "member_count": members.len(),
            "voice_states": [],
            "members": members,
            "channels": channels,
            "threads": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
        });
        if let (Some(o), Value::Object(e)) = (g.as_object_mut(), extra) {
            o.extend(e);
        }
    }
    g
}

fn ready_json(cfg: &FakeDiscordConfig, session_id: &str, gateway_url: &str, shard: Value) -> Value {
    json!({
        "v": 10,
        "user": current_user_json(cfg),
        "guilds": [{"id": cfg.guild_id.to_string(), "unavailable": true}],
        "session_id": session_id,
        "resume_gateway_url": gateway_url,
        "shard": shard,
        "application": {"id": cfg.application_id.to_string(), "flags": 0},
        "private_channels": [],
        "relationships": [],
        "presences": [],
        "_trace": ["fake-discord"],
    })
}

fn message_json(cfg: &FakeDiscordConfig, api_base: &str, m: &StoredMessage) -> Value {
    let attachments: Vec<Value> = m
        .attachments
        .iter()
        .map(|a| {
            let url = format!(
                "{api_base}/attachments/{}/{}/{}",
                m.channel_id, a.id, a.filename
            );
            json!({"id": a.id.to_string(), "filename": a.filename, "description": a.description,
                "content_type": a.content_type, "size": a.data.len(), "url": url, "proxy_url": url})
        })
        .collect();
    let mut v = json!({
        "id": m.id.to_string(),
        "channel_id": m.channel_id.to_string(),
        "author": user_json(cfg, m.author_id),
        "content": m.content,
        "timestamp": timestamp(m.created_ms),
        "edited_timestamp": m.edited_ms.map(timestamp),
        "tts": false,
        "mention_everyone": false,
        "mentions": [],
        "mention_roles": [],
        "attachments": attachments,
        "embeds": m.embeds,
        "components": m.components,
        "pinned": false,
        "type": m.kind,
        "flags": m.flags,
    });
    if let Some(g) = m.guild_id {
        v["guild_id"] = json!(g.to_string());
    }
    if m.interaction_id.is_some() {
        v["webhook_id"] = json!(cfg.application_id.to_string());
        v["application_id"] = json!(cfg.application_id.to_string());
    }
    if let Some(meta) = &m.interaction_metadata {
        v["interaction_metadata"] = meta.clone();
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Self-checks against serenity's own types
// ---------------------------------------------------------------------------------------------

/// Checks that a gateway dispatch frame deserializes with serenity and is not
/// `Event::Unknown` (which serenity would drop silently). On failure, re-parses with the
/// specific type to return the real serde error.
pub fn check_dispatch(frame: &Value) -> Result<(), String> {
    use serenity::model::event::{Event, GatewayEvent};
    match serde_json::from_value::<GatewayEvent>(frame.clone()) {
        Ok(GatewayEvent::Dispatch(_, Event::Unknown(_))) => {}
        Ok(GatewayEvent::Dispatch(_, _)) => return Ok(()),
        Ok(other) => return Err(format!("not a dispatch: {other:?}")),
        Err(e) => return Err(e.to_string()),
    }
    let d = frame["d"].clone();
    let t = frame["t"].as_str().unwrap_or("");
    let detail = match t {
        "READY" => serde_json::from_value::<serenity::model::gateway::Ready>(d).err(),
        "GUILD_CREATE" => serde_json::from_value::<serenity::model::guild::Guild>(d).err(),
        "INTERACTION_CREATE" => {
            serde_json::from_value::<serenity::model::application::Interaction>(d).err()
        }
        "MESSAGE_CREATE" => serde_json::from_value::<serenity::model::channel::Message>(d).err(),
        "MESSAGE_UPDATE" => {
            serde_json::from_value::<serenity::model::event::MessageUpdateEvent>(d).err()
        }
        "MESSAGE_DELETE" => {
            serde_json::from_value::<serenity::model::event::MessageDeleteEvent>(d).err()
        }
        _ => None,
    };
    Err(match detail {
        Some(e) => format!("Event::Unknown: {e}"),
        None => "Event::Unknown".to_string(),
    })
}

/// Checks a successful REST reply against the serenity type that serenity parses it into.
fn check_reply(req: &Req, body: &Value) -> Result<(), String> {
    use serenity::model::prelude as m;
    fn de<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
        serde_json::from_value::<T>(v.clone())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    let s: Vec<&str> = req.segs.iter().map(String::as_str).collect();
    match (req.method.as_str(), s.as_slice()) {
        ("GET", ["gateway"]) => de::<m::Gateway>(body),
        ("GET", ["gateway", "bot"]) => de::<m::BotGateway>(body),
        ("GET", ["users", "@me"]) => de::<m::CurrentUser>(body),
        ("GET", ["users", _]) => de::<m::User>(body),
        ("GET", ["oauth2", "applications", "@me"]) => de::<m::CurrentApplicationInfo>(body),
        ("POST", ["users", "@me", "channels"]) => de::<m::PrivateChannel>(body),
        ("GET", ["channels", _]) => de::<m::Channel>(body),
        ("GET", ["channels", _, "messages"]) => de::<Vec<m::Message>>(body),
        (_, ["channels", _, "messages", ..]) | (_, ["webhooks", ..]) => de::<m::Message>(body),
        (_, ["applications", ..]) => de::<Vec<m::Command>>(body),
        ("GET", ["guilds", _]) => de::<m::PartialGuild>(body),
        ("GET", ["guilds", _, "roles"]) => de::<Vec<m::Role>>(body),
        ("GET", ["guilds", _, "channels"]) => de::<Vec<m::GuildChannel>>(body),
        ("GET", ["guilds", _, "members", _]) => de::<m::Member>(body),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod self_check {
    //! Every payload kind the fake produces deserializes with serenity's own types.
    use super::*;

    fn cfg() -> FakeDiscordConfig {
        FakeDiscordConfig::default().normalized()
    }

    fn frame(t: &str, d: Value) -> Value {
        json!({"op": 0, "s": 1, "t": t, "d": d})
    }

    fn sample_message(cfg: &FakeDiscordConfig) -> StoredMessage {
        let mut m = dummy_message();
        m.id = 500;
        m.channel_id = cfg.approvals_channel_id;
        m.guild_id = Some(cfg.guild_id);
        m.author_id = cfg.bot_user_id;
        m.content = "card".into();
        m.embeds = normalize_embeds(
            &json!([{"title": "t", "fields": [{"name": "a", "value": "b", "inline": false}]}]),
        );
        m.components = vec![json!({"type": 1, "components": [
            {"type": 2, "style": 3, "custom_id": "approve", "label": "Approve", "disabled": false},
            {"type": 2, "style": 5, "url": "https://example.com", "label": "Docs"}]})];
        m.attachments = vec![StoredAttachment {
            id: 900,
            filename: "req.json".into(),
            description: None,
            content_type: "application/json".into(),
            data: b"{}".to_vec(),
        }];
        m.created_ms = now_ms();
        m
    }

    fn assert_dispatch(t: &str, d: Value) {
        if let Err(e) = check_dispatch(&frame(t, d.clone())) {
            panic!("{t} does not deserialize: {e}\n{d:#}");
        }
    }

    #[test]
    fn ready_and_guild_create_deserialize() {
        let c = cfg();
        assert_dispatch(
            "READY",
            ready_json(&c, "s", "ws://127.0.0.1:1/gateway", json!([0, 1])),
        );
        assert_dispatch("GUILD_CREATE", guild_json(&c, true));
        assert_dispatch("RESUMED", json!({"_trace": []}));
    }

    #[test]
    fn message_events_deserialize() {
        let c = cfg();
        let mut m = sample_message(&c);
        assert_dispatch("MESSAGE_CREATE", message_json(&c, "http://x", &m));
        m.edited_ms = Some(now_ms());
        m.interaction_id = Some(600);
        m.interaction_metadata = Some(json!({"id": "600", "type": 3, "user": user_json(&c, ALICE),
            "authorizing_integration_owners": {"0": "10"}, "interacted_message_id": "500"}));
        assert_dispatch("MESSAGE_UPDATE", message_json(&c, "http://x", &m));
        assert_dispatch(
            "MESSAGE_DELETE",
            json!({"id": "500", "channel_id": "20", "guild_id": "10"}),
        );
        let mut dm = dummy_message();
        dm.id = 501;
        dm.channel_id = 77;
        dm.author_id = BOB;
        dm.content = "hi".into();
        assert_dispatch("MESSAGE_CREATE", message_json(&c, "http://x", &dm));
    }

    #[test]
    fn interactions_deserialize() {
        let c = cfg();
        let inner = Inner {
            cfg: c.clone(),
            port: 1,
            state: Mutex::new(FakeState {
                next_id: FIRST_SNOWFLAKE,
                calls: Vec::new(),
                violations: Vec::new(),
                messages: BTreeMap::new(),
                dm_channels: BTreeMap::new(),
                interactions: BTreeMap::new(),
                failures: Vec::new(),
                buckets: BTreeMap::new(),
                global_recent: std::collections::VecDeque::new(),
                rate_limited: 0,
                outage: None,
                guild_commands: Vec::new(),
                global_commands: Vec::new(),
                gw: GatewayState {
                    session_id: Some("s".into()),
                    intents: intent::GUILD_MESSAGES | intent::DIRECT_MESSAGES,
                    ..GatewayState::default()
                },
            }),
            changed: watch::channel(0).0,
        };
        let mut st = inner.lock();
        let m = sample_message(&c);
        st.messages.insert(m.id, m);
        // Button click (guild), then a modal opened from it and submitted.
        let h = inner
            .click_locked(&mut st, 500, "approve", ALICE)
            .expect("click");
        st.interactions.get_mut(&h.id).expect("tracked").modal = Some(
            json!({"custom_id": "why", "title": "Why",
            "components": [{"type": 1, "components": [{"type": 4, "custom_id": "reason", "style": 2, "label": "Reason"}]}]}),
        );
        inner
            .modal_locked(&mut st, Some(500), "why", ALICE, &[("reason", "because")])
            .expect("modal");
        // Slash command with user, role, channel and subcommand options.
        inner
            .command_locked(&mut st, c.approvals_channel_id, "tools", json!([{"name": "grant", "type": 1, "options": [
                {"name": "user", "type": 6, "value": 100}, {"name": "role", "type": 8, "value": "30"},
                {"name": "where", "type": 7, "value": "20"}, {"name": "tool", "type": 3, "value": "shell"}]}]), ALICE)
            .expect("command");
        // DM click and DM command.
        let dm = st.dm_channel(BOB);
        let mut dmm = sample_message(&c);
        dmm.id = 502;
        dmm.channel_id = dm;
        dmm.guild_id = None;
        st.messages.insert(502, dmm);
        inner
            .click_locked(&mut st, 502, "approve", BOB)
            .expect("dm click");
        inner
            .command_locked(&mut st, dm, "status", json!([]), BOB)
            .expect("dm command");
        // Raw injection.
        inner.inject_raw_locked(&mut st, json!({"type": 3, "channel_id": "20", "guild_id": "10",
            "member": member_json(&c, ALICE, true, true), "data": {"custom_id": "x", "component_type": 2},
            "message": message_json(&c, "http://x", &sample_message(&c))}));
        // User messages in the guild (with member) and in a DM.
        inner.user_message_locked(&mut st, c.approvals_channel_id, BOB, "hello <@1>");
        inner.user_message_locked(&mut st, dm, BOB, "pair 123");
        let bad: Vec<&String> = st
            .violations
            .iter()
            .filter(|v| v.contains("FAKE BUG"))
            .collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert_eq!(st.gw.log.len(), 8);
        assert!(
            st.gw.log[6].1.contains("hello <@1>"),
            "mention keeps content"
        );
    }

    #[test]
    fn rest_replies_deserialize() {
        use serenity::model::prelude as m;
        let c = cfg();
        fn ok<T: serde::de::DeserializeOwned>(what: &str, v: Value) {
            if let Err(e) = serde_json::from_value::<T>(v.clone()) {
                panic!("{what}: {e}\n{v:#}");
            }
        }
        ok::<m::CurrentUser>("current user", current_user_json(&c));
        ok::<m::User>("user", user_json(&c, ALICE));
        ok::<m::CurrentApplicationInfo>("app info", app_info_json(&c));
        ok::<m::PrivateChannel>("dm channel", dm_channel_json(&c, 77, BOB));
        ok::<m::Channel>("guild channel", guild_channel_json(&c, 20, "approvals", 0));
        ok::<m::Channel>("dm channel as Channel", dm_channel_json(&c, 77, BOB));
        ok::<m::Message>("message", message_json(&c, "http://x", &sample_message(&c)));
        ok::<m::PartialGuild>("partial guild", guild_json(&c, false));
        ok::<m::Member>("member", {
            let mut v = member_json(&c, ALICE, true, false).expect("member");
            v["guild_id"] = json!("10");
            v
        });
        ok::<Vec<m::Role>>(
            "roles",
            Value::Array(c.roles.iter().map(|r| role_json(&c, r)).collect()),
        );
        ok::<m::Gateway>("gateway", json!({"url": "ws://127.0.0.1:1/gateway"}));
        ok::<m::BotGateway>(
            "bot gateway",
            json!({"url": "ws://x", "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 1, "max_concurrency": 1}}),
        );
        ok::<Vec<m::Command>>(
            "commands",
            json!([{"id": "5", "application_id": "2", "version": "6", "type": 1,
            "name": "tools", "description": "d", "guild_id": "10", "options": [{"type": 3, "name": "x", "description": "y"}],
            "default_member_permissions": null, "dm_permission": true, "nsfw": false}]),
        );
    }

    #[test]
    fn check_dispatch_rejects_what_serenity_would_drop() {
        // The notes' minimal button click is accepted ...
        let mut d = json!({"id": "600", "application_id": "2", "type": 3,
            "data": {"custom_id": "approve:1", "component_type": 2}, "channel_id": "20", "guild_id": "10",
            "member": {"user": {"id": "100", "username": "alice"}, "roles": ["30"], "deaf": false, "mute": false, "flags": 0},
            "token": "tok", "version": 1, "locale": "en-US", "entitlements": [], "attachment_size_limit": 0,
            "message": {"id": "500", "channel_id": "20", "author": {"id": "1", "username": "bot"}, "content": "",
                "timestamp": "2024-01-01T00:00:00Z", "tts": false, "mention_everyone": false, "mentions": [],
                "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0}});
        assert!(check_dispatch(&frame("INTERACTION_CREATE", d.clone())).is_ok());
        // ... and without `locale` it would become Event::Unknown.
        d.as_object_mut().expect("object").remove("locale");
        let err = check_dispatch(&frame("INTERACTION_CREATE", d)).expect_err("must fail");
        assert!(err.contains("locale"), "{err}");
        // A dispatch without `s` does not parse at all.
        let no_seq = json!({"op": 0, "t": "RESUMED", "d": {}});
        assert!(check_dispatch(&no_seq).is_err());
    }

    #[test]
    fn limits_are_enforced_at_the_boundary() {
        let ok = |b: Value| validate_message(&b, true, false).is_empty();
        let am = json!({"parse": []});
        assert!(ok(
            json!({"content": "x".repeat(2000), "allowed_mentions": am})
        ));
        assert!(!ok(json!({"content": "x".repeat(2001)})));
        assert!(ok(json!({"embeds": [{"title": "t".repeat(256)}]})));
        assert!(!ok(json!({"embeds": [{"title": "t".repeat(257)}]})));
        assert!(!ok(json!({"embeds": [{"description": "d".repeat(4097)}]})));
        assert!(!ok(
            json!({"embeds": [{"footer": {"text": "f".repeat(2049)}}]})
        ));
        assert!(!ok(
            json!({"embeds": [{"author": {"name": "a".repeat(257)}}]})
        ));
        assert!(!ok(
            json!({"embeds": (0..11).map(|_| json!({"title": "t"})).collect::<Vec<_>>()})
        ));
        let fields = |n: usize, name: usize, value: usize| {
            json!({"embeds": [{"fields": (0..n)
            .map(|_| json!({"name": "n".repeat(name), "value": "v".repeat(value)})).collect::<Vec<_>>()}]})
        };
        assert!(
            !ok(fields(25, 256, 1024)),
            "25 full fields exceed the 6000 total"
        );
        assert!(ok(fields(25, 10, 10)));
        assert!(!ok(fields(26, 1, 1)));
        assert!(!ok(fields(1, 257, 1)));
        assert!(!ok(fields(1, 1, 1025)));
        let button =
            |id: &str, label: &str| json!({"type": 2, "style": 1, "custom_id": id, "label": label});
        let row = |n: usize, p: &str| json!({"type": 1, "components": (0..n).map(|i| button(&format!("{p}{i}"), "l")).collect::<Vec<_>>()});
        assert!(ok(
            json!({"components": (0..5).map(|r| row(5, &format!("r{r}-"))).collect::<Vec<_>>()})
        ));
        assert!(!ok(
            json!({"components": (0..6).map(|r| row(1, &format!("r{r}-"))).collect::<Vec<_>>()})
        ));
        assert!(!ok(json!({"components": [row(6, "a")]})));
        assert!(ok(
            json!({"components": [{"type": 1, "components": [button(&"c".repeat(100), &"l".repeat(80))]}]})
        ));
        assert!(!ok(
            json!({"components": [{"type": 1, "components": [button(&"c".repeat(101), "l")]}]})
        ));
        assert!(!ok(
            json!({"components": [{"type": 1, "components": [button("c", &"l".repeat(81))]}]})
        ));
        assert!(!ok(
            json!({"components": [{"type": 1, "components": [button("c", "a"), button("c", "b")]}]})
        ));
        assert!(!ok(json!({"content": ""})), "empty message");
        let modal = |title: usize, label: usize| {
            json!({"custom_id": "m", "title": "t".repeat(title), "components": [
            {"type": 1, "components": [{"type": 4, "custom_id": "r", "style": 1, "label": "l".repeat(label)}]}]})
        };
        assert!(validate_modal(&modal(45, 45)).is_empty());
        assert!(!validate_modal(&modal(46, 45)).is_empty());
        assert!(!validate_modal(&modal(45, 46)).is_empty());
    }

    #[test]
    fn multipart_and_patterns() {
        let raw = b"--XY\r\nContent-Disposition: form-data; name=\"files[0]\"; filename=\"a.json\"\r\nContent-Type: application/json\r\n\r\n{\"a\":1}\r\n--XY\r\nContent-Disposition: form-data; name=\"payload_json\"\r\n\r\n{\"content\":\"hi\"}\r\n--XY--\r\n";
        let (body, files) = parse_body("multipart/form-data; boundary=XY", raw).expect("parse");
        assert_eq!(body["content"], "hi");
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].filename, "a.json");
        assert_eq!(files[0].data, b"{\"a\":1}");
        assert!(pattern_matches(
            "POST /channels/*/messages",
            "POST",
            "/channels/20/messages"
        ));
        assert!(!pattern_matches(
            "POST /channels/*/messages",
            "PATCH",
            "/channels/20/messages"
        ));
        assert!(pattern_matches(
            "* /channels/**",
            "PATCH",
            "/channels/20/messages/5"
        ));
        assert!(pattern_matches(
            "/webhooks/{app}/{token}",
            "POST",
            "/webhooks/2/tok"
        ));
        assert!(!pattern_matches(
            "POST /channels/*",
            "POST",
            "/channels/20/messages"
        ));
    }
}
