//! Injection: interactions (clicks, modals, commands) and user messages sent to the bot.

use super::*;

impl Inner {
    pub(super) fn new_interaction(&self, st: &mut FakeState) -> (u64, String) {
        let id = st.new_id();
        (id, format!("fake-interaction-token-{id}"))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn register_and_dispatch(
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
    pub(super) fn interaction_envelope(
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

    pub(super) fn click_locked(
        &self,
        st: &mut FakeState,
        message_id: u64,
        custom_id: &str,
        user_id: u64,
    ) -> Result<InteractionHandle, String> {
        self.select_locked(st, message_id, custom_id, user_id, &[])
    }

    /// A component interaction; for a select, `values` are the picked
    /// options' values, each checked against the options the message offers.
    pub(super) fn select_locked(
        &self,
        st: &mut FakeState,
        message_id: u64,
        custom_id: &str,
        user_id: u64,
        values: &[&str],
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
            if component_type == 3 {
                for v in values {
                    let offered = comp["options"]
                        .as_array()
                        .is_some_and(|o| o.iter().any(|o| o["value"] == *v));
                    if !offered {
                        return Err(format!(
                            "select {custom_id:?} on message {message_id} offers no option {v:?}"
                        ));
                    }
                }
            }
            data["values"] = json!(values);
        } else if !values.is_empty() {
            return Err(format!("component {custom_id:?} is a button, not a select"));
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

    pub(super) fn modal_locked(
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

    pub(super) fn command_locked(
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

    pub(super) fn inject_raw_locked(&self, st: &mut FakeState, mut d: Value) -> InteractionHandle {
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

    pub(super) fn user_message_locked(
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
    pub(super) fn echo_bot_message(&self, st: &mut FakeState, t: &str, msg: &StoredMessage) {
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
pub(super) struct Resolved {
    pub(super) users: Vec<u64>,
    pub(super) roles: Vec<u64>,
    pub(super) channels: Vec<u64>,
}

impl Resolved {
    pub(super) fn to_json(&self, cfg: &FakeDiscordConfig) -> Value {
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
pub(super) fn normalize_options(options: &mut Value, resolved: &mut Resolved) {
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
