//! Fixture ids and Discord constants.

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

pub(super) const FLAG_EPHEMERAL: u64 = 1 << 6;
pub(super) const FLAG_LOADING: u64 = 1 << 7;
pub(super) const FIRST_SNOWFLAKE: u64 = 1_000_000;
