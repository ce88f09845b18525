//! Configuration: the fixture guild, its roles and members, rate limits and outages.

use super::*;

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
    pub(super) fn normalized(mut self) -> Self {
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

    pub(super) fn member(&self, user_id: u64) -> Option<&FakeMember> {
        self.members.iter().find(|m| m.user_id == user_id)
    }

    pub(super) fn username(&self, user_id: u64) -> String {
        if user_id == self.bot_user_id {
            return self.bot_username.clone();
        }
        self.member(user_id)
            .map_or_else(|| format!("user{user_id}"), |m| m.username.clone())
    }

    pub(super) fn member_roles(&self, user_id: u64) -> Option<Vec<u64>> {
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

    pub(super) fn text_channels(&self) -> Vec<(u64, String)> {
        let mut v = vec![(
            self.approvals_channel_id,
            self.approvals_channel_name.clone(),
        )];
        v.extend(self.extra_channels.iter().cloned());
        v
    }

    pub(super) fn is_guild_channel(&self, id: u64) -> bool {
        self.text_channels().iter().any(|(c, _)| *c == id)
    }
}
