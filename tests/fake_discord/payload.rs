//! Payload builders: the JSON the fake sends (users, members, guilds, messages, READY).

use super::*;

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(super) fn timestamp(ms: i64) -> String {
    serenity::model::Timestamp::from_millis(ms)
        .ok()
        .and_then(|t| t.to_rfc3339())
        .unwrap_or_else(|| "2024-01-01T00:00:00.000Z".to_string())
}

/// A snowflake from a JSON string or number.
pub(super) fn sf(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

pub(super) fn dummy_message() -> StoredMessage {
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

pub(super) fn normalize_embeds(v: &Value) -> Vec<Value> {
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

pub(super) fn user_json(cfg: &FakeDiscordConfig, id: u64) -> Value {
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

pub(super) fn current_user_json(cfg: &FakeDiscordConfig) -> Value {
    let mut u = user_json(cfg, cfg.bot_user_id);
    u["verified"] = json!(true);
    u["mfa_enabled"] = json!(false);
    u["flags"] = json!(0);
    u
}

pub(super) fn app_info_json(cfg: &FakeDiscordConfig) -> Value {
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
pub(super) fn member_json(
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

pub(super) fn role_json(cfg: &FakeDiscordConfig, r: &FakeRole) -> Value {
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

pub(super) fn guild_channel_json(
    cfg: &FakeDiscordConfig,
    id: u64,
    name: &str,
    position: usize,
) -> Value {
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

pub(super) fn dm_channel_json(cfg: &FakeDiscordConfig, channel_id: u64, user_id: u64) -> Value {
    json!({
        "id": channel_id.to_string(),
        "type": 1,
        "last_message_id": null,
        "recipients": [user_json(cfg, user_id)],
        "flags": 0,
    })
}

pub(super) fn guild_json(cfg: &FakeDiscordConfig, gateway: bool) -> Value {
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

pub(super) fn ready_json(
    cfg: &FakeDiscordConfig,
    session_id: &str,
    gateway_url: &str,
    shard: Value,
) -> Value {
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

pub(super) fn message_json(cfg: &FakeDiscordConfig, api_base: &str, m: &StoredMessage) -> Value {
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
