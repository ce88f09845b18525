//! End to end: the real `keyturn serve` binary with its Discord bot pointed
//! at the fake Discord in `fake_discord/`, agents on its socket.
//! Every wait has a deadline; nothing sleeps to hope.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::config::{self, DISCORD_AGENT as AGENT};
use harness::rpc::delete_file;
use harness::{Launch, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(8);

async fn setup() -> (FakeDiscord, Server) {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Launch::new(dir, config::discord(&fake.api_base()))
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");
    fake.wait_for_route("PUT /applications/*/guilds/*/commands", WAIT)
        .await
        .expect("commands registered");
    (fake, server)
}

/// The first card whose buttons name a request matching `pred`.
async fn card_where(fake: &FakeDiscord, pred: impl Fn(&StoredMessage) -> bool) -> StoredMessage {
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| ms.iter().find(|m| pred(m)).cloned(),
        WAIT,
    )
    .await
    .expect("card")
}

async fn first_card(fake: &FakeDiscord) -> StoredMessage {
    card_where(fake, |m| !m.custom_ids().is_empty()).await
}

fn request_id(card: &StoredMessage) -> String {
    card.custom_ids()[0]
        .rsplit(':')
        .next()
        .expect("id")
        .to_string()
}

fn button(card: &StoredMessage, action: &str) -> String {
    format!("keyturn:v1:{action}:{}", request_id(card))
}

/// Waits until card `id` satisfies `pred`.
async fn card_until(
    fake: &FakeDiscord,
    id: u64,
    pred: impl Fn(&StoredMessage) -> bool,
) -> StoredMessage {
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| ms.iter().find(|m| m.id == id && pred(m)).cloned(),
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("card {id}: {e}"))
}

/// Asks `/pending` until it links `n` cards (their message ids are stored).
async fn cards_recorded(fake: &FakeDiscord, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = fake.slash_command("pending", json!([]), CAROL).await;
        let call = fake
            .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
            .await
            .expect("/pending answered");
        let text = call.body["content"].as_str().unwrap_or("").to_string();
        if text.matches("https://discord.com/channels/").count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "cards not recorded: {text}");
    }
}

/// A click on a card as it was rendered earlier (its buttons may be gone
/// by now, which `click_button` refuses): Discord delivers these when a
/// client shows a stale message.
async fn stale_click(
    fake: &FakeDiscord,
    card: &StoredMessage,
    custom_id: &str,
    user: u64,
    roles: &[u64],
) -> InteractionHandle {
    let roles: Vec<String> = roles.iter().map(u64::to_string).collect();
    fake.inject_interaction(json!({
        "type": 3,
        "data": {"custom_id": custom_id, "component_type": 2},
        "channel_id": APPROVALS_CHANNEL_ID.to_string(),
        "guild_id": GUILD_ID.to_string(),
        "member": {"user": {"id": user.to_string(), "username": format!("user{user}")},
                   "roles": roles, "deaf": false, "mute": false, "flags": 0},
        "message": {"id": card.id.to_string(), "channel_id": APPROVALS_CHANNEL_ID.to_string(),
                    "author": {"id": BOT_USER_ID.to_string(), "username": "keyturn"},
                    "content": "", "timestamp": "2024-01-01T00:00:00Z", "tts": false,
                    "mention_everyone": false, "mentions": [], "mention_roles": [],
                    "attachments": [], "embeds": [], "pinned": false, "type": 0},
    }))
    .await
}

fn title(m: &StoredMessage) -> String {
    m.embeds[0]["title"].as_str().unwrap_or("").to_string()
}

/// The ephemeral text a user got for an interaction: the initial type-4
/// response, or the follow-up after a type-6 acknowledgement.
async fn ephemeral_reply(fake: &FakeDiscord, h: &InteractionHandle) -> String {
    let resp = fake
        .wait_interaction_response(h, WAIT)
        .await
        .expect("interaction answered");
    if resp["type"] == 4 {
        assert_eq!(resp["data"]["flags"].as_u64().unwrap_or(0) & 64, 64);
        return resp["data"]["content"].as_str().unwrap_or("").to_string();
    }
    let path = format!("/webhooks/{APPLICATION_ID}/{}", h.token);
    let call = fake
        .wait_for_call(|c| c.method == "POST" && c.path == path, WAIT)
        .await
        .expect("follow-up");
    assert_eq!(
        call.body["flags"].as_u64().unwrap_or(0) & 64,
        64,
        "ephemeral"
    );
    assert!(call.body["allowed_mentions"].is_object());
    call.body["content"].as_str().unwrap_or("").to_string()
}

/// Every message the bot sent carried `allowed_mentions`.
fn all_posts_have_allowed_mentions(fake: &FakeDiscord) {
    for c in fake.calls() {
        let creates = (c.method == "POST" && c.path.ends_with("/messages"))
            || (c.method == "PATCH" && c.path.contains("/messages/"));
        if creates && c.status < 300 {
            assert!(
                c.body["allowed_mentions"].is_object(),
                "{} {} without allowed_mentions",
                c.method,
                c.path
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_is_posted_and_an_approver_click_unblocks_the_agent() {
    let (fake, mut server) = setup().await;
    let agent = server.submit_waiting_as(AGENT, delete_file());
    let card = first_card(&fake).await;

    // Fields, buttons, mentions.
    let e = &card.embeds[0];
    let text = card.all_text();
    for name in [
        "Tool",
        "Risk",
        "Agent",
        "On behalf of",
        "Channel",
        "Deadline",
        "Why policy asked",
        "Arguments",
    ] {
        assert!(
            e["fields"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["name"] == name),
            "{name}"
        );
    }
    assert!(text.contains("delete_file") && text.contains("/srv/x"));
    assert!(text.contains("cleanup of old builds"));
    assert!(text.contains("<@42>"), "on whose behalf, as a mention");
    assert!(text.contains(":R>"), "relative deadline");
    assert!(text.contains(&request_id(&card)));
    assert_eq!(e["color"], 0xE6_7E_22, "high risk colour");
    let ids = card.custom_ids();
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert!(ids[0].starts_with("keyturn:v1:approve:"));
    assert!(ids[1].starts_with("keyturn:v1:deny:"));
    assert!(ids[2].starts_with("keyturn:v1:deny_reason:"));
    assert!(ids[3].starts_with("keyturn:v1:edit:"));
    assert!(ids[4].starts_with("keyturn:v1:allow_for:"));
    let am = card.allowed_mentions.clone().expect("allowed_mentions");
    assert_eq!(am["parse"], json!([]));
    assert_eq!(am["users"], json!([]));
    assert_eq!(am["roles"], json!([APPROVER_ROLE_ID.to_string()]));
    assert!(card.content.starts_with(&format!("<@&{APPROVER_ROLE_ID}>")));

    // Alice approves: the agent unblocks with approved, the card is edited.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    let resp = fake.wait_interaction_response(&h, WAIT).await.expect("ack");
    assert_eq!(resp["type"], 6);
    let decision = tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent unblocked")
        .expect("join");
    assert_eq!(decision["state"], "approved");
    assert_eq!(decision["approved"], true);
    assert!(decision["who"].as_str().unwrap().contains("discord:100"));
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    assert!(title(&edited).contains("Approved"), "{}", title(&edited));
    assert!(edited.all_text().contains("discord:100"));
    assert_eq!(edited.embeds[0]["color"], 0x1F_8B_4C);
    assert_eq!(fake.messages_in(APPROVALS_CHANNEL_ID).len(), 1);

    // Dave clicks the stale card (a client with an old render): refused.
    // (The fake refuses clicks on removed buttons, so forge one.)
    let h2 = stale_click(
        &fake,
        &card,
        &button(&card, "deny"),
        DAVE,
        &[APPROVER_ROLE_ID],
    )
    .await;
    let text = ephemeral_reply(&fake, &h2).await;
    assert!(text.starts_with("Already decided: approved"), "{text}");
    let status = server
        .admin_call("status", json!({"id": request_id(&card)}))
        .await
        .expect("status");
    assert_eq!(status["state"], "approved");

    all_posts_have_allowed_mentions(&fake);
    fake.assert_no_violations();
    assert!(
        server.stop_async().await.success(),
        "clean shutdown with the bot running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_with_reason_goes_through_the_modal() {
    let (fake, mut server) = setup().await;
    let agent = server.submit_waiting_as(AGENT, delete_file());
    let card = first_card(&fake).await;
    let h = fake
        .click_button(card.id, &button(&card, "deny_reason"), DAVE)
        .await;
    let resp = fake
        .wait_interaction_response(&h, WAIT)
        .await
        .expect("modal");
    assert_eq!(resp["type"], 9);
    let modal_id = button(&card, "reason");
    assert_eq!(resp["data"]["custom_id"], modal_id);
    let m = fake
        .submit_modal(
            card.id,
            &modal_id,
            DAVE,
            &[("reason", "not on a **Friday**")],
        )
        .await;
    fake.wait_interaction_response(&m, WAIT).await.expect("ack");
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "denied");
    assert_eq!(decision["reason"], "not on a **Friday**");
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    assert!(title(&edited).contains("Denied"));
    assert!(
        edited.all_text().contains("not on a **Friday**"),
        "reason in a code block"
    );
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_approvers_self_approval_and_double_clicks_are_refused() {
    let (fake, mut server) = setup().await;
    // On behalf of alice (100), who is also an approver.
    let mut p = delete_file();
    p["user_id"] = json!(ALICE.to_string());
    let agent = server.submit_waiting_as(AGENT, p);
    let card = first_card(&fake).await;

    // Bob has no role.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), BOB)
        .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.contains("approver role"), "{text}");
    // Alice may not approve her own request.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.contains("own behalf"), "{text}");
    let s = server
        .admin_call("status", json!({"id": request_id(&card)}))
        .await
        .unwrap();
    assert_eq!(s["state"], "pending", "refusals change nothing");

    // Dave approves; Carol's click a moment later is too late.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), DAVE)
        .await;
    fake.wait_interaction_response(&h, WAIT).await.unwrap();
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "approved");
    assert!(decision["who"].as_str().unwrap().contains("discord:103"));
    // Carol clicks the card as she saw it before the edit.
    let h = stale_click(
        &fake,
        &card,
        &button(&card, "deny"),
        CAROL,
        &[ADMIN_ROLE_ID, APPROVER_ROLE_ID],
    )
    .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.starts_with("Already decided: approved"), "{text}");
    card_until(&fake, card.id, |m| m.components.is_empty()).await;
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_edits_the_card_and_late_clicks_are_refused() {
    let (fake, mut server) = setup().await;
    let mut p = delete_file();
    p["timeout_secs"] = json!(1);
    let agent = server.submit_waiting_as(AGENT, p);
    let card = first_card(&fake).await;
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "timed_out");
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    assert!(title(&edited).contains("Timed out"), "{}", title(&edited));
    assert_eq!(edited.embeds[0]["color"], 0x95_A5_A6);

    // A click on a card rendered before the timeout (forged: the buttons are gone).
    let h = stale_click(
        &fake,
        &card,
        &button(&card, "approve"),
        ALICE,
        &[APPROVER_ROLE_ID],
    )
    .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.starts_with("Already decided: timed_out"), "{text}");
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_and_the_card_says_so() {
    let (fake, mut server) = setup().await;
    let agent = server.submit_waiting_as(AGENT, delete_file());
    let card = first_card(&fake).await;
    // The agent's process dies mid-wait: its connection closes.
    agent.abort();
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    assert!(title(&edited).contains("Cancelled"), "{}", title(&edited));
    assert!(
        edited
            .all_text()
            .contains("cancelled: the agent's client went away"),
        "{}",
        edited.all_text()
    );
    // An approver who clicks the orphan's (now stale) button is refused.
    let h = stale_click(
        &fake,
        &card,
        &button(&card, "approve"),
        ALICE,
        &[APPROVER_ROLE_ID],
    )
    .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.starts_with("Already decided: cancelled"), "{text}");
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_decision_edits_the_card() {
    let (fake, mut server) = setup().await;
    let agent = server.submit_waiting_as(AGENT, delete_file());
    let card = first_card(&fake).await;
    let r = server
        .admin_call(
            "deny",
            json!({"id": request_id(&card), "operator": "ops", "reason": "from the CLI"}),
        )
        .await
        .expect("deny");
    assert_eq!(r["decision"]["state"], "denied");
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "denied");
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    assert!(title(&edited).contains("Denied"));
    assert!(edited.all_text().contains("from the CLI"));
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_card_and_its_deadline_and_catches_up() {
    let (fake, mut server) = setup().await;
    let first = server.submit_as(AGENT, delete_file()).await;
    let card = card_where(&fake, |m| {
        m.custom_ids()
            .iter()
            .any(|c| c.ends_with(first["request_id"].as_str().unwrap()))
    })
    .await;
    let second = server.submit_as(AGENT, delete_file()).await;
    let card2 = card_where(&fake, |m| {
        m.custom_ids()
            .iter()
            .any(|c| c.ends_with(second["request_id"].as_str().unwrap()))
    })
    .await;
    // Both message ids are recorded (the /pending links) before the crash.
    cards_recorded(&fake, 2).await;
    server.kill();

    // While keyturn is down, Discord stays up; the card still shows pending.
    let cfg = config::discord(&fake.api_base());
    // Decide the second request with the bot unable to post: start without
    // Discord, deny over the socket, stop.
    let no_bot = cfg.replace("token = \"fake-token\"", "token = \"\"");
    server.rewrite_config(&no_bot);
    server.restart_async().await;
    let mut quiet = server;
    quiet
        .admin_call(
            "deny",
            json!({"id": second["request_id"], "reason": "while the bot was down"}),
        )
        .await
        .expect("deny");
    // A request queued while the bot is down.
    let third = quiet.submit_as(AGENT, delete_file()).await;
    quiet.stop_async().await;
    assert_eq!(
        fake.message(card2.id).unwrap().custom_ids().len(),
        5,
        "not yet edited"
    );

    let posts_before = fake.calls_matching("POST /channels/*/messages").len();
    let mut server = quiet;
    server.rewrite_config(&cfg);
    server.restart_async().await;
    // The stale card is brought up to date, the unposted one is posted.
    let edited = card_until(&fake, card2.id, |m| m.components.is_empty()).await;
    assert!(edited.all_text().contains("while the bot was down"));
    card_where(&fake, |m| {
        m.custom_ids()
            .iter()
            .any(|c| c.ends_with(third["request_id"].as_str().unwrap()))
    })
    .await;
    fake.wait_ready(WAIT).await.expect("reconnected");
    // The first card was not posted again, and its deadline is unchanged.
    let posts = fake.calls_matching("POST /channels/*/messages");
    assert_eq!(
        posts.len(),
        posts_before + 1,
        "only the missing card is posted"
    );
    let s = server
        .admin_call("status", json!({"id": first["request_id"]}))
        .await
        .unwrap();
    assert_eq!(s["state"], "pending");
    assert_eq!(s["deadline_ms"], first["deadline_ms"]);
    // Its buttons still work after the restart.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    fake.wait_interaction_response(&h, WAIT).await.unwrap();
    card_until(&fake, card.id, |m| m.components.is_empty()).await;
    let s = server
        .admin_call("status", json!({"id": first["request_id"]}))
        .await
        .unwrap();
    assert_eq!(s["state"], "approved");
    assert_eq!(fake.messages_in(APPROVALS_CHANNEL_ID).len(), 3);
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_by_dm_then_admin_approval() {
    let (fake, mut server) = setup().await;
    fake.send_dm(BOB, "hello, can I use keyturn?").await;
    let dm = fake
        .wait_for_call(
            |c| {
                c.method == "POST"
                    && c.path.ends_with("/messages")
                    && c.body["content"]
                        .as_str()
                        .is_some_and(|t| t.contains("pairing code"))
            },
            WAIT,
        )
        .await
        .expect("code DM'd");
    let text = fake.dms_to(BOB)[0].content.clone();
    assert!(dm.body["allowed_mentions"].is_object());
    let code = text
        .split('`')
        .nth(1)
        .expect("code in backticks")
        .to_string();
    assert!(code.replace('-', "").len() >= 8, "{code}");

    // A non-admin cannot approve it.
    let h = fake
        .slash_command(
            "pairing",
            json!([{"name": "approve", "type": 1, "options": [{"name": "code", "type": 3, "value": code}]}]),
            ALICE,
        )
        .await;
    assert!(ephemeral_reply(&fake, &h).await.contains("admins"));

    // Carol (admin) approves; Bob is paired and told.
    let h = fake
        .slash_command(
            "pairing",
            json!([{"name": "approve", "type": 1, "options": [{"name": "code", "type": 3, "value": code}]}]),
            CAROL,
        )
        .await;
    let resp = fake.wait_interaction_response(&h, WAIT).await.unwrap();
    assert_eq!(resp["type"], 5, "deferred");
    let edit = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .unwrap();
    assert!(
        edit.body["content"]
            .as_str()
            .unwrap()
            .contains("Paired user"),
        "{}",
        edit.body
    );
    fake.wait_for_call(
        |c| {
            c.method == "POST"
                && c.body["content"]
                    .as_str()
                    .is_some_and(|t| t.contains("now paired"))
        },
        WAIT,
    )
    .await
    .expect("paired DM");
    assert!(fake
        .dms_to(BOB)
        .iter()
        .any(|m| m.content.contains("now paired")));
    let list = server.admin_call("pairing.list", json!({})).await.unwrap();
    assert!(list["paired"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["user_id"].as_str() == Some(BOB.to_string().as_str())));
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_grant_allows_and_revoke_denies() {
    let (fake, mut server) = setup().await;
    // Commands were registered as guild commands, admin-only by default.
    fake.wait_for_route("PUT /applications/*/guilds/*/commands", WAIT)
        .await
        .unwrap();
    let cmds = fake.guild_commands();
    let tools = cmds.iter().find(|c| c["name"] == "tools").expect("/tools");
    assert_eq!(
        tools["default_member_permissions"],
        json!((1u64 << 5).to_string())
    );

    let read = json!({"tool": "read_file", "args": {"path": "/etc/motd"}, "user_id": "42", "justification": "read"});
    let r = server.submit_as(AGENT, read.clone()).await;
    assert_eq!(r["state"], "denied", "{r}");

    let grant = |sub: &str| {
        json!([{"name": sub, "type": 1, "options": [
            {"name": "scope", "type": 3, "value": "user"},
            {"name": "target", "type": 3, "value": "42"},
            {"name": "tool", "type": 3, "value": "read_file"},
        ]}])
    };
    let h = fake.slash_command("tools", grant("grant"), CAROL).await;
    fake.wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .unwrap();
    let r = server.submit_as(AGENT, read.clone()).await;
    assert_eq!(r["state"], "approved", "{r}");

    // A bad option gets an error that names it.
    let bad = json!([{"name": "grant", "type": 1, "options": [
        {"name": "scope", "type": 3, "value": "user"},
        {"name": "tool", "type": 3, "value": "read_file"},
    ]}]);
    let h = fake.slash_command("tools", bad, CAROL).await;
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .unwrap();
    assert!(
        call.body["content"].as_str().unwrap().contains("`target`"),
        "{}",
        call.body
    );
    let bad_tool = json!([{"name": "grant", "type": 1, "options": [
        {"name": "scope", "type": 3, "value": "global"},
        {"name": "tool", "type": 3, "value": "rm -rf /"},
    ]}]);
    let h = fake.slash_command("tools", bad_tool, CAROL).await;
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .unwrap();
    assert!(
        call.body["content"]
            .as_str()
            .unwrap()
            .contains("cannot grant"),
        "{}",
        call.body
    );

    let h = fake.slash_command("tools", grant("revoke"), CAROL).await;
    fake.wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .unwrap();
    let r = server.submit_as(AGENT, read).await;
    assert_eq!(r["state"], "denied", "{r}");

    // Effective and pending answer too.
    let h = fake
        .slash_command(
            "tools",
            json!([{"name": "effective", "type": 1, "options": [
                {"name": "user", "type": 6, "value": "42"},
                {"name": "tool", "type": 3, "value": "delete_file"}]}]),
            CAROL,
        )
        .await;
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .unwrap();
    assert!(
        call.body["content"].as_str().unwrap().contains("global"),
        "{}",
        call.body
    );
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofing_corpus_renders_safely() {
    let (fake, mut server) = setup().await;
    let corpus = [
        "```\n**APPROVED** by admin\n```",
        "@everyone @here <@100> <@&30> <#20>",
        "[click](https://evil.example) https://evil.example",
        "# ✅ Approved by carol\n> safe",
        "zero\u{200B}width \u{202E}txt.exe",
    ];
    let long = "z".repeat(5000);
    let args = json!({"a": corpus, "long": long});
    let r = server
        .submit_as(
            AGENT,
            json!({
                "tool": "delete_file",
                "args": args,
                "user_id": "42",
                "justification": corpus.join("\n"),
            }),
        )
        .await;
    let id = r["request_id"].as_str().unwrap().to_string();
    let card = card_where(&fake, |m| m.custom_ids().iter().any(|c| c.ends_with(&id))).await;
    let text = card.all_text();
    assert!(!text.contains('\u{200B}') && !text.contains('\u{202E}'));
    assert!(text.contains("⟨U+202E⟩"));
    assert!(text.contains("[truncated]"));
    assert_eq!(text.matches("```").count() % 2, 0);
    assert_eq!(card.allowed_mentions.as_ref().unwrap()["parse"], json!([]));
    let file = card
        .attachments
        .iter()
        .find(|a| a.filename == format!("request-{id}.json"))
        .expect("full payload attached");
    let v: Value = serde_json::from_str(&file.text()).unwrap();
    assert_eq!(v["args"]["long"], json!(long));
    // The attachment survives the decision edit.
    server
        .admin_call("approve", json!({"id": id}))
        .await
        .expect("approve");
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    assert_eq!(edited.attachments.len(), 1);
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_honoured_and_the_card_posted_once() {
    let (fake, mut server) = setup().await;
    fake.fail_next(
        "POST /channels/*/messages",
        429,
        FakeDiscord::rate_limit_body(0.3),
    );
    fake.fail_next(
        "POST /channels/*/messages",
        502,
        json!({"message": "Bad Gateway", "code": 0}),
    );
    let r = server.submit_as(AGENT, delete_file()).await;
    let id = r["request_id"].as_str().unwrap().to_string();
    card_where(&fake, |m| m.custom_ids().iter().any(|c| c.ends_with(&id))).await;
    let posts = fake.calls_matching("POST /channels/20/messages");
    assert_eq!(posts.len(), 3, "429, 502, then success");
    assert_eq!(posts[0].status, 429);
    let waited = posts[1].at.duration_since(posts[0].at);
    assert!(
        waited >= Duration::from_millis(300),
        "retry_after honoured: {waited:?}"
    );
    assert_eq!(fake.messages_in(APPROVALS_CHANNEL_ID).len(), 1);
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_makes_serve_fail_fast() {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config::discord(&fake.api_base()).replace("fake-token", "wrong-token");
    let err = match Launch::new(dir, cfg).try_start_async().await {
        Ok(_) => panic!("serve started with a bad token"),
        Err(e) => e,
    };
    let status = err.status.expect("exited");
    assert!(!status.success());
    assert!(
        err.log.contains("401") || err.log.contains("token"),
        "{}",
        err.log
    );
    // Nothing was left behind.
    assert!(!err.dir.path().join("k.sock").exists());

    // An unreachable API no longer stops serve: see tests/discord_outage.rs.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_during_a_gateway_disconnect_is_not_lost() {
    let (fake, mut server) = setup().await;
    let agent = server.submit_waiting_as(AGENT, delete_file());
    let card = first_card(&fake).await;
    fake.disconnect_gateway().await;
    // Injected while the bot is disconnected: replayed when it resumes.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    fake.wait_gateway(|g| g.connected && g.resume_count >= 1, WAIT)
        .await
        .expect("resumed");
    fake.wait_interaction_response(&h, WAIT).await.expect("ack");
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "approved");
    card_until(&fake, card.id, |m| m.components.is_empty()).await;
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_posted_oldest_deadline_first() {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config::discord(&fake.api_base());
    // Discord unusable: queue requests whose deadlines run opposite to
    // their submission order.
    let no_bot = cfg.replace("token = \"fake-token\"", "token = \"\"");
    let mut quiet = Launch::new(dir, &no_bot)
        .try_start_async()
        .await
        .expect("start");
    let mut ids = Vec::new();
    for secs in [600, 500, 400, 300, 200] {
        let mut p = delete_file();
        p["timeout_secs"] = json!(secs);
        ids.push(
            quiet.submit_as(AGENT, p).await["request_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    quiet.stop_async().await;
    let mut server = quiet;
    server.rewrite_config(&cfg);
    server.restart_async().await;
    fake.wait_for_messages(APPROVALS_CHANNEL_ID, |m| (m.len() == 5).then_some(()), WAIT)
        .await
        .expect("all posted");
    let posted: Vec<String> = fake
        .messages_in(APPROVALS_CHANNEL_ID)
        .iter()
        .map(request_id)
        .collect();
    ids.reverse();
    assert_eq!(posted, ids, "oldest deadline first");
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_for_approves_and_adds_a_time_boxed_grant() {
    let (fake, mut server) = setup().await;
    let agent = server.submit_waiting_as(AGENT, delete_file());
    let card = first_card(&fake).await;
    let h = fake
        .select_option(
            card.id,
            &button(&card, "allow_for"),
            ALICE,
            &["1h:agent-tool"],
        )
        .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.contains("Approved, and allowed until"), "{text}");
    assert!(text.contains("this tool for this agent"), "{text}");
    let grant = text
        .split('`')
        .find(|w| w.starts_with("tg-"))
        .expect("grant id in the reply")
        .to_string();
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "approved", "{decision}");
    assert!(decision["who"].as_str().unwrap().contains("discord:100"));
    // The card says who approved and what was allowed, naming the grant.
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    let shown = edited.all_text();
    assert!(
        shown.contains("allowed for 1 h: this tool for this agent") && shown.contains(&grant),
        "{shown}"
    );
    // The next call of the tool by this agent, other arguments, is allowed
    // by policy and names the grant.
    let next = server
        .submit_as(
            AGENT,
            json!({"tool": "delete_file", "args": {"path": "/srv/other"}, "user_id": "42",
                   "justification": "more cleanup"}),
        )
        .await;
    assert_eq!(next["state"], "approved", "{next}");
    assert_eq!(next["rule"], "timed_grant");
    assert!(next["rule_detail"].as_str().unwrap().contains(&grant));
    // /tools list shows it with its expiry.
    let h = fake
        .slash_command(
            "tools",
            json!([{"name": "list", "type": 1, "options": []}]),
            CAROL,
        )
        .await;
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .expect("/tools list answered");
    let listed = call.body["content"].as_str().unwrap_or("").to_string();
    assert!(
        listed.contains(&grant) && listed.contains("until 2"),
        "{listed}"
    );
    // Revoked by its id, the next call asks again.
    let h = fake
        .slash_command(
            "tools",
            json!([{"name": "revoke_grant", "type": 1, "options": [
                {"name": "grant", "type": 3, "value": grant}]}]),
            CAROL,
        )
        .await;
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .expect("/tools revoke_grant answered");
    let answer = call.body["content"].as_str().unwrap_or("").to_string();
    assert!(answer.contains("Revoked grant"), "{answer}");
    let asked = server
        .submit_as(
            AGENT,
            json!({"tool": "delete_file", "args": {"path": "/srv/third"}, "user_id": "42",
                   "justification": "more cleanup"}),
        )
        .await;
    assert_eq!(asked["state"], "pending", "{asked}");
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_for_on_a_critical_tool_is_for_admins_only() {
    let (fake, mut server) = setup().await;
    let agent = server.submit_waiting_as(
        AGENT,
        json!({"tool": "drop_db", "args": {"db": "prod"}, "user_id": "42", "justification": "reset"}),
    );
    let card = first_card(&fake).await;
    // Alice is an approver but not an admin: refused, nothing decided.
    let h = fake
        .select_option(card.id, &button(&card, "allow_for"), ALICE, &["15m:call"])
        .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.contains("Only an admin"), "{text}");
    let st = server
        .admin_call("status", json!({"id": request_id(&card)}))
        .await
        .expect("status");
    assert_eq!(st["state"], "pending", "{st}");
    // Carol is an admin: approved, and the exact call is allowed for 15 min.
    let h = fake
        .select_option(card.id, &button(&card, "allow_for"), CAROL, &["15m:call"])
        .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.contains("this exact call"), "{text}");
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "approved");
    let again = server
        .submit_as(
            AGENT,
            json!({"tool": "drop_db", "args": {"db": "prod"}, "user_id": "42", "justification": "reset"}),
        )
        .await;
    assert_eq!(again["rule"], "timed_grant", "{again}");
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_requests_need_the_admin_role() {
    let (fake, mut server) = setup().await;
    let agent = server.submit_waiting_as(
        AGENT,
        json!({
            "tool": "drop_db", "args": {"db": "prod"}, "user_id": "42", "justification": "reset",
        }),
    );
    let card = first_card(&fake).await;
    assert_eq!(card.embeds[0]["color"], 0xE7_4C_3C);
    let am = card.allowed_mentions.clone().unwrap();
    assert_eq!(
        am["roles"],
        json!([ADMIN_ROLE_ID.to_string()]),
        "pings admins only"
    );
    // Alice is an approver but not an admin.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.contains("only a Keyturn admin"), "{text}");
    let h = fake
        .click_button(card.id, &button(&card, "approve"), CAROL)
        .await;
    fake.wait_interaction_response(&h, WAIT).await.unwrap();
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "approved");
    assert!(decision["who"].as_str().unwrap().contains("discord:102"));
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_discord_failing_requests_still_time_out_on_schedule() {
    let (fake, mut server) = setup().await;
    for _ in 0..3 {
        fake.fail_next(
            "POST /channels/*/messages",
            503,
            json!({"message": "unavailable", "code": 0}),
        );
    }
    let mut p = delete_file();
    p["timeout_secs"] = json!(1);
    let started = Instant::now();
    let agent = server.submit_waiting_as(AGENT, p);
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "timed_out");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The card is delivered in the end, showing the truth.
    let card = card_where(&fake, |m| {
        m.embeds
            .iter()
            .any(|e| e["title"].as_str().unwrap_or("").contains("Timed out"))
    })
    .await;
    assert!(card.components.is_empty());
    assert_eq!(fake.messages_in(APPROVALS_CHANNEL_ID).len(), 1);
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_gateway_close_reconnects_after_a_pause() {
    let (fake, mut server) = setup().await;
    assert_eq!(fake.identify_count(), 1);
    let closed = Instant::now();
    fake.close_gateway(4004, "Authentication failed.").await;
    fake.wait_gateway(|g| g.identify_count >= 2 && g.connected, WAIT)
        .await
        .expect("a new session");
    let gap = closed.elapsed();
    assert!(
        gap >= Duration::from_millis(900),
        "no pause before re-identifying: {gap:?}"
    );
    // The new session works.
    let agent = server.submit_waiting_as(AGENT, delete_file());
    let card = first_card(&fake).await;
    fake.wait_ready(WAIT).await.unwrap();
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    fake.wait_interaction_response(&h, WAIT).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, agent).await.unwrap().unwrap()["state"],
        "approved"
    );
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_person_rule_shows_the_count_on_the_card() {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config::discord(&fake.api_base()).replace(
        "[risk.high]\ntimeout = \"30s\"",
        "[risk.high]\ntimeout = \"30s\"\napprovals = 2",
    );
    let mut server = Launch::new(dir, cfg)
        .try_start_async()
        .await
        .expect("start");
    fake.wait_ready(WAIT).await.unwrap();
    let agent = server.submit_waiting_as(AGENT, delete_file());
    let card = first_card(&fake).await;
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.contains("1 of 2"), "{text}");
    let shown = card_until(&fake, card.id, |m| m.all_text().contains("1 of 2")).await;
    assert!(shown.all_text().contains("discord:100"));
    assert_eq!(shown.custom_ids().len(), 4, "still open");
    // The same person cannot approve twice.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    assert!(ephemeral_reply(&fake, &h).await.contains("already voted"));
    let h = fake
        .click_button(card.id, &button(&card, "approve"), DAVE)
        .await;
    fake.wait_interaction_response(&h, WAIT).await.unwrap();
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "approved");
    card_until(&fake, card.id, |m| m.components.is_empty()).await;
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cancel_edits_the_card() {
    let (fake, mut server) = setup().await;
    let r = server.submit_as(AGENT, delete_file()).await;
    let id = r["request_id"].as_str().unwrap().to_string();
    let card = card_where(&fake, |m| m.custom_ids().iter().any(|c| c.ends_with(&id))).await;
    server
        .admin_call(
            "cancel",
            json!({"id": id, "agent": AGENT, "reason": "task finished"}),
        )
        .await
        .expect("cancel");
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    assert!(title(&edited).contains("Cancelled"));
    assert!(edited.all_text().contains("task finished"));
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_pending_audit_and_list_commands_answer() {
    let (fake, mut server) = setup().await;
    let reply = |h: InteractionHandle| {
        let fake = &fake;
        async move {
            let call = fake
                .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
                .await
                .expect("answered");
            call.body["content"].as_str().unwrap_or("").to_string()
        }
    };
    fake.wait_for_route("PUT /applications/*/guilds/*/commands", WAIT)
        .await
        .unwrap();
    // /pair works for anyone and gives a code.
    let text = reply(fake.slash_command("pair", json!([]), BOB).await).await;
    assert!(text.contains("pairing code"), "{text}");
    // Already-paired alice is told so.
    let text = reply(fake.slash_command("pair", json!([]), ALICE).await).await;
    assert!(text.contains("already paired"), "{text}");

    let r = server.submit_as(AGENT, delete_file()).await;
    let id = r["request_id"].as_str().unwrap().to_string();
    let card = card_where(&fake, |m| m.custom_ids().iter().any(|c| c.ends_with(&id))).await;
    cards_recorded(&fake, 1).await;
    let text = reply(fake.slash_command("pending", json!([]), CAROL).await).await;
    assert!(
        text.contains(&format!(
            "https://discord.com/channels/{GUILD_ID}/{APPROVALS_CHANNEL_ID}/{}",
            card.id
        )),
        "{text}"
    );
    let text = reply(
        fake.slash_command(
            "audit",
            json!([{"name": "recent", "type": 1, "options": [{"name": "count", "type": 4, "value": 5}]}]),
            CAROL,
        )
        .await,
    )
    .await;
    assert!(
        text.contains("```") && text.contains("submitted") || text.contains(&id),
        "{text}"
    );
    let text = reply(
        fake.slash_command(
            "tools",
            json!([{"name": "list", "type": 1, "options": []}]),
            CAROL,
        )
        .await,
    )
    .await;
    assert!(
        text.contains("delete_file") && text.contains("global"),
        "{text}"
    );
    let text = reply(
        fake.slash_command(
            "pairing",
            json!([{"name": "list", "type": 1, "options": []}]),
            CAROL,
        )
        .await,
    )
    .await;
    assert!(text.contains(&BOB.to_string()), "{text}");
    fake.assert_no_violations();
    server.stop_async().await;
}

/// Click-to-agent latency. Run with `cargo test --release --test discord_cards -- --ignored --nocapture`;
/// with `KEYTURN_BENCH_STORE=postgres` the server runs on the test
/// PostgreSQL (a schema of its own) instead of SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_click_to_agent_latency() {
    let schema = match std::env::var("KEYTURN_BENCH_STORE").as_deref() {
        Ok("postgres") => Some(harness::pg::Schema::new().await.expect("PostgreSQL")),
        _ => None,
    };
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let mut text = config::discord(&fake.api_base());
    if let Some(schema) = &schema {
        text = text.replace(
            "url = \"sqlite://k.db\"",
            &format!("url = \"{}\"", schema.url()),
        );
        assert!(text.contains("search_path"), "{text}");
    }
    println!(
        "store: {}",
        if schema.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Launch::new(dir, text)
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");
    let n = 200;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let agent = server.submit_waiting_as(AGENT, delete_file());
        let card = card_where(&fake, |m| !m.custom_ids().is_empty()).await;
        let start = Instant::now();
        fake.click_button(card.id, &button(&card, "approve"), ALICE)
            .await;
        let d = agent.await.unwrap();
        samples.push(start.elapsed());
        assert_eq!(d["state"], "approved");
        card_until(&fake, card.id, |m| m.components.is_empty()).await;
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "click -> agent over {n}: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        p(0.5),
        p(0.9),
        p(0.99),
        samples[n - 1]
    );
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_card_shows_big_integers_exactly_and_verify_binds_them() {
    const APPROVED: &str = "123456789012345678901";
    let (fake, server) = setup().await;
    let args: Value = serde_json::from_str(&format!(
        r#"{{"path":"/srv/x","keep_bytes":{APPROVED},"ratio":1.0}}"#
    ))
    .expect("args");
    let mut p = delete_file();
    p["args"] = args.clone();
    let agent = server.submit_waiting_as(AGENT, p);
    let card = first_card(&fake).await;
    let text = card.all_text();
    assert!(text.contains(APPROVED), "{text}");
    assert!(!text.contains("e+20") && !text.contains("e20"), "{text}");
    assert!(text.contains("1.0"), "{text}");

    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    fake.wait_interaction_response(&h, WAIT).await.expect("ack");
    let decision = tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent unblocked")
        .expect("join");
    assert_eq!(decision["approved"], true, "{decision}");

    let verify = |args: Value| {
        server.admin_call(
            "verify",
            json!({"agent": AGENT, "id": request_id(&card), "args": args}),
        )
    };
    let ok = verify(args.clone()).await.expect("verify");
    assert_eq!(
        (&ok["matches"], &ok["approved"]),
        (&json!(true), &json!(true))
    );
    let off: Value =
        serde_json::from_str(r#"{"path":"/srv/x","keep_bytes":123456789012345678900,"ratio":1.0}"#)
            .expect("args");
    let v = verify(off).await.expect("verify");
    assert_eq!(v["matches"], false, "{v}");
    let as_int: Value = serde_json::from_str(&format!(
        r#"{{"path":"/srv/x","keep_bytes":{APPROVED},"ratio":1}}"#
    ))
    .expect("args");
    let v = verify(as_int).await.expect("verify");
    assert_eq!(v["matches"], false, "1 is not 1.0: {v}");
    fake.assert_no_violations();
}

/// Issue item 5: blank justifications collapse, Keyturn's rule text shows
/// real code spans, the exfiltration flag names the host without the `)`
/// around it, and an edited card promises only a file it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_details_are_compact_honest_and_readable() {
    let (fake, mut server) = setup().await;
    let mut p = delete_file();
    p["justification"] = json!(format!("first{}last   word", "\n   \n\t".repeat(200)));
    p["args"] = json!({"path": "/srv/x", "note": "(see https://evil.example)"});
    let agent = server.submit_waiting_as(AGENT, p);
    let card = first_card(&fake).await;
    let embed = &card.embeds[0];
    let description = embed["description"].as_str().unwrap();
    assert!(
        description.contains("first\n\nlast word"),
        "blank runs collapse: {description:?}"
    );
    assert!(description.lines().count() < 10, "{description:?}");
    let field = |m: &StoredMessage, name: &str| -> String {
        m.embeds[0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["value"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let why = field(&card, "Why policy asked");
    assert!(
        why.contains('`') && !why.contains('ˋ'),
        "real code spans: {why}"
    );
    let flags = field(&card, "Flags");
    assert!(flags.contains("evil.example"), "{flags}");
    assert!(!flags.contains("evil.example)"), "stray paren: {flags}");
    assert!(card.attachments.is_empty(), "nothing was cut at creation");

    // A long reason is cut on the edited card, which has no attachment:
    // the footer must not promise one.
    let modal_id = button(&card, "reason");
    let h = fake
        .click_button(card.id, &button(&card, "deny_reason"), DAVE)
        .await;
    fake.wait_interaction_response(&h, WAIT)
        .await
        .expect("modal");
    let reason = "no ".repeat(300);
    let m = fake
        .submit_modal(card.id, &modal_id, DAVE, &[("reason", reason.trim())])
        .await;
    fake.wait_interaction_response(&m, WAIT).await.expect("ack");
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "denied");
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    let footer = edited.embeds[0]["footer"]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(edited.attachments.is_empty());
    assert!(
        !footer.contains(".json"),
        "promises a file never attached: {footer}"
    );
    assert!(footer.contains("reason truncated"), "{footer}");
    fake.assert_no_violations();
    server.stop_async().await;
}

/// Issue item 4: a second DM does not kill the live code; a new code only
/// on request, and only a few per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_dm_keeps_the_live_pairing_code() {
    let (fake, mut server) = setup().await;
    // The n-th answer the bot sent Bob.
    let answers = |n: usize| {
        let fake = &fake;
        async move {
            let ch = fake.dm_channel_of(BOB).expect("DM channel");
            fake.wait_for_messages(
                ch,
                |ms| {
                    ms.iter()
                        .filter(|m| m.author_id == BOT_USER_ID)
                        .nth(n - 1)
                        .map(|m| m.content.clone())
                },
                WAIT,
            )
            .await
            .unwrap_or_else(|e| panic!("answer {n}: {e}"))
        }
    };
    let code_in = |text: &str| {
        text.split('`')
            .nth(1)
            .expect("code in backticks")
            .to_string()
    };

    fake.send_dm(BOB, "hi").await;
    let first = answers(1).await;
    assert!(first.contains("pairing code"), "{first}");
    let code1 = code_in(&first);
    fake.send_dm(BOB, "thanks").await;
    let second = answers(2).await;
    assert!(second.contains("already have a live"), "{second}");
    assert!(second.contains("<t:"), "says when it expires: {second}");
    fake.send_dm(BOB, "New code").await;
    let third = answers(3).await;
    let code2 = code_in(&third);
    assert_ne!(code1, code2);
    fake.send_dm(BOB, "new code").await;
    assert!(answers(4).await.contains("pairing code"));
    fake.send_dm(BOB, "new code").await;
    let fifth = answers(5).await;
    assert!(fifth.contains("too many"), "rate limited: {fifth}");

    // Only the newest code pairs.
    let approve = |code: String| {
        let fake = &fake;
        async move {
            let h = fake
                .slash_command(
                    "pairing",
                    json!([{"name": "approve", "type": 1, "options": [{"name": "code", "type": 3, "value": code}]}]),
                    CAROL,
                )
                .await;
            fake.wait_interaction_response(&h, WAIT).await.unwrap();
            let edit = fake
                .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
                .await
                .unwrap();
            edit.body["content"].as_str().unwrap_or("").to_string()
        }
    };
    let newest = code_in(&fake.dms_to(BOB)[3].content);
    assert!(!approve(code1).await.contains("Paired user"));
    assert!(approve(newest).await.contains("Paired user"));
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_pause_from_discord_cancels_the_card_and_refuses_a_non_admin() {
    let (fake, mut server) = setup().await;
    let cmds = fake.guild_commands();
    let agent_cmd = cmds.iter().find(|c| c["name"] == "agent").expect("/agent");
    assert_eq!(
        agent_cmd["default_member_permissions"],
        json!((1u64 << 5).to_string())
    );
    let r = server.submit_as(AGENT, delete_file()).await;
    let id = r["request_id"].as_str().unwrap().to_string();
    let card = card_where(&fake, |m| m.custom_ids().iter().any(|c| c.ends_with(&id))).await;
    let pause = |reason: &str| {
        json!([{"name": "pause", "type": 1, "options": [
            {"name": "name", "type": 3, "value": AGENT},
            {"name": "reason", "type": 3, "value": reason},
        ]}])
    };

    // Bob is no admin: refused, ephemeral, and nothing is paused.
    let h = fake
        .slash_command("agent", pause("@everyone stop"), BOB)
        .await;
    let call = fake
        .wait_for_call(
            |c| c.method == "POST" && c.path.contains(&h.token) && c.path.ends_with("/callback"),
            WAIT,
        )
        .await
        .expect("refusal");
    assert_eq!(call.body["data"]["flags"], 64, "{}", call.body);
    assert!(
        call.body["data"]["content"]
            .as_str()
            .unwrap_or("")
            .contains("for Keyturn admins"),
        "{}",
        call.body
    );
    let st = server
        .admin_call("status", json!({"id": id}))
        .await
        .expect("status");
    assert_eq!(st["state"], "pending", "{st}");

    // Carol is: the agent is paused, its pending card cancelled.
    let h = fake
        .slash_command("agent", pause("@everyone runaway <@100>"), CAROL)
        .await;
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .expect("answered");
    let text = call.body["content"].as_str().unwrap_or("").to_string();
    assert!(
        text.contains("is now paused") && text.contains("1 pending request(s) cancelled"),
        "{text}"
    );
    // The untrusted reason is escaped: it cannot ping anyone.
    assert!(
        text.contains(r"\@everyone runaway") && !text.contains(" @everyone"),
        "{text}"
    );
    let edited = card_until(&fake, card.id, |m| m.components.is_empty()).await;
    assert!(
        edited.all_text().contains("agent_paused"),
        "{}",
        edited.all_text()
    );
    let d = server.submit_as(AGENT, delete_file()).await;
    assert_eq!(d["rule"], "agent_paused", "{d}");
    assert!(
        d["rule_detail"]
            .as_str()
            .unwrap()
            .contains(&format!("discord:{CAROL}")),
        "{d}"
    );

    // Resume from Discord restores.
    let h = fake
        .slash_command(
            "agent",
            json!([{"name": "resume", "type": 1, "options": [
                {"name": "name", "type": 3, "value": AGENT}]}]),
            CAROL,
        )
        .await;
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .expect("answered");
    assert!(
        call.body["content"]
            .as_str()
            .unwrap_or("")
            .contains("is resumed"),
        "{}",
        call.body
    );
    let r = server.submit_as(AGENT, delete_file()).await;
    assert_eq!(r["state"], "pending", "{r}");
    fake.assert_no_violations();
    server.stop_async().await;
}
