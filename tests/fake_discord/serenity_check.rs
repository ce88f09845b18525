//! Self-checks against serenity's own types: every dispatch and reply the fake produces
//! must deserialize, or serenity would drop it silently.

use super::*;

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
pub(super) fn check_reply(req: &Req, body: &Value) -> Result<(), String> {
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
            state: Mutex::new(FakeState::new(GatewayState {
                session_id: Some("s".into()),
                intents: intent::GUILD_MESSAGES | intent::DIRECT_MESSAGES,
                ..GatewayState::default()
            })),
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
