//! The escalation ladder end to end: the real `keyturn serve` with its bot
//! pointed at the fake Discord. With short steps (re-ping after 1 s, the
//! backup role and DMs after 2 s, a last warning 1 s before the deadline),
//! each step fires once, not before its time, pinging exactly its targets;
//! the card shows it; the audit has one `escalated` per step; a request
//! decided before the first step gets none; a restart repeats nothing.
//! Every wait has a deadline; nothing sleeps to hope.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::config::{self, DISCORD_AGENT as AGENT};
use harness::rpc::delete_file;
use harness::{Launch, Server};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// The backup role of the second step.
const BACKUP: u64 = ADMIN_ROLE_ID;

/// The Discord test config with a ladder for high risk (timeout 30 s).
fn with_ladder(api_base: &str) -> String {
    format!(
        "{}\n{}",
        config::discord(api_base),
        format_args!(
            r#"
[[risk.high.escalation]]
after = "1s"
action = "reping"

[[risk.high.escalation]]
after = "2s"
action = "ping_role"
role = "{BACKUP}"

[[risk.high.escalation]]
after = "2s"
action = "dm"
users = ["{ALICE}", "{DAVE}"]

[[risk.high.escalation]]
before_deadline = "1s"
action = "last_warning"
"#
        )
    )
}

async fn setup() -> (FakeDiscord, Server) {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Launch::new(dir, with_ladder(&fake.api_base()))
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");
    (fake, server)
}

/// Submits a `delete_file` (high) that waits `secs` for a human.
async fn submit(server: &Server, secs: u64) -> Value {
    let mut p = delete_file();
    p["timeout_secs"] = json!(secs);
    let r = server.submit_as(AGENT, p).await;
    assert_eq!(r["state"], "pending", "{r}");
    assert!(r["created_ms"].is_i64() && r["deadline_ms"].is_i64(), "{r}");
    r
}

/// Escalation messages (not cards) in the approvals channel naming `id`
/// and starting with `prefix`.
fn pings(fake: &FakeDiscord, id: &str, prefix: &str) -> Vec<StoredMessage> {
    fake.messages_in(APPROVALS_CHANNEL_ID)
        .into_iter()
        .filter(|m| m.embeds.is_empty() && m.content.contains(id) && m.content.starts_with(prefix))
        .collect()
}

async fn wait_ping(fake: &FakeDiscord, id: &str, prefix: &str) -> StoredMessage {
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| {
            ms.iter()
                .find(|m| {
                    m.embeds.is_empty() && m.content.contains(id) && m.content.starts_with(prefix)
                })
                .cloned()
        },
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("no `{prefix}` message: {e}"))
}

/// The card of request `id`, once it satisfies `pred`.
async fn card_until(
    fake: &FakeDiscord,
    id: &str,
    pred: impl Fn(&StoredMessage) -> bool,
) -> StoredMessage {
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| {
            ms.iter()
                .find(|m| !m.embeds.is_empty() && m.all_text().contains(id) && pred(m))
                .cloned()
        },
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("card of {id}: {e}"))
}

/// The `escalated` audit entries of request `id`, oldest first.
async fn escalated(server: &Server, id: &str) -> Vec<Value> {
    let tail = server
        .admin_call("audit.tail", json!({"n": 500}))
        .await
        .expect("audit");
    tail.as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["kind"] == "escalated" && e["request_id"] == id)
        .cloned()
        .collect()
}

/// Waits until the bot DMed `user` about `id`; returns its DMs about it.
async fn wait_dm(fake: &FakeDiscord, user: u64, id: &str) -> Vec<StoredMessage> {
    let recipient = user.to_string();
    fake.wait_for_call(
        |c| {
            c.status == 200
                && c.matches("POST /users/@me/channels")
                && c.body["recipient_id"] == recipient
        },
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("no DM channel opened to {user}: {e}"));
    let channel = fake.dm_channel_of(user).expect("DM channel");
    fake.wait_for_messages(
        channel,
        |ms| {
            let mine: Vec<StoredMessage> = ms
                .iter()
                .filter(|m| m.content.contains(id))
                .cloned()
                .collect();
            (!mine.is_empty()).then_some(mine)
        },
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("no DM to {user}: {e}"))
}

/// Each step's audit entry, by index: exactly one per step, at (not
/// before) its time and before the deadline.
fn check_audit(entries: &[Value], created_ms: i64, deadline_ms: i64) {
    let steps: Vec<i64> = entries
        .iter()
        .map(|e| e["detail"]["step"].as_i64().unwrap())
        .collect();
    let mut sorted = steps.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2, 3], "one entry per step: {entries:?}");
    for e in entries {
        let at = e["at_ms"].as_i64().unwrap();
        let due = match e["detail"]["step"].as_i64().unwrap() {
            0 => created_ms + 1_000,
            1 | 2 => created_ms + 2_000,
            _ => deadline_ms - 1_000,
        };
        assert!(at >= due, "fired before its time: {e} (due {due})");
        assert!(at < deadline_ms, "fired after the deadline: {e}");
    }
    let by_step = |s: i64| {
        entries
            .iter()
            .find(|e| e["detail"]["step"] == s)
            .unwrap()
            .clone()
    };
    assert_eq!(by_step(0)["detail"]["action"], "reping");
    assert_eq!(
        by_step(0)["detail"]["targets"],
        json!({"roles": [APPROVER_ROLE_ID.to_string()], "users": []})
    );
    assert_eq!(
        by_step(1)["detail"]["targets"],
        json!({"roles": [BACKUP.to_string()], "users": []})
    );
    assert_eq!(
        by_step(2)["detail"]["targets"],
        json!({"roles": [], "users": [ALICE.to_string(), DAVE.to_string()]})
    );
    assert_eq!(by_step(3)["detail"]["action"], "last_warning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_step_fires_once_at_its_time_pinging_exactly_its_targets() {
    let (fake, mut server) = setup().await;
    let r = submit(&server, 5).await;
    let id = r["request_id"].as_str().expect("id").to_string();
    let (created, deadline) = (
        r["created_ms"].as_i64().unwrap(),
        r["deadline_ms"].as_i64().unwrap(),
    );

    // Step 0: the approver role again, in the channel, naming the request.
    let reping = wait_ping(&fake, &id, "🔔").await;
    assert!(reping.content.contains(&format!("<@&{APPROVER_ROLE_ID}>")));
    assert!(reping.content.contains("`delete_file`") && reping.content.contains("`agent`"));
    assert_eq!(
        reping.allowed_mentions.as_ref().unwrap()["roles"],
        json!([APPROVER_ROLE_ID.to_string()])
    );
    // Steps 1 and 2: the backup role, and DMs to the named approvers.
    let backup = wait_ping(&fake, &id, "⏫").await;
    assert!(backup.content.contains(&format!("<@&{BACKUP}>")));
    let am = backup.allowed_mentions.clone().unwrap();
    assert_eq!(am["roles"], json!([BACKUP.to_string()]));
    assert_eq!(am["users"], json!([]));
    assert_eq!(am["parse"], json!([]));
    for user in [ALICE, DAVE] {
        let dm = wait_dm(&fake, user, &id).await;
        assert_eq!(dm.len(), 1, "one DM to {user}");
        assert_eq!(dm[0].allowed_mentions.as_ref().unwrap()["roles"], json!([]));
    }
    assert!(fake.dms_to(BOB).is_empty());
    // Step 3: the last warning.
    let warning = wait_ping(&fake, &id, "⚠️").await;
    assert!(warning.content.contains("Last warning"));

    // The request times out; its decided card keeps the escalation.
    let card = card_until(&fake, &id, |m| {
        m.components.is_empty() && m.all_text().contains("Last warning to")
    })
    .await;
    let text = card.all_text();
    assert!(text.contains("Escalated"), "{text}");
    assert!(
        text.contains(&format!("Escalated to <@&{BACKUP}> at <t:")),
        "{text}"
    );
    assert_eq!(card.allowed_mentions.as_ref().unwrap()["roles"], json!([]));

    // Each step fired once: one message each, one audit entry each, at its time.
    for prefix in ["🔔", "⏫", "⚠️"] {
        assert_eq!(pings(&fake, &id, prefix).len(), 1, "{prefix}");
    }
    for user in [ALICE, DAVE] {
        assert_eq!(fake.dms_to(user).len(), 1);
    }
    check_audit(&escalated(&server, &id).await, created, deadline);
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_decided_before_the_first_step_gets_no_ping() {
    let (fake, mut server) = setup().await;
    let first = submit(&server, 20).await;
    let first_id = first["request_id"].as_str().unwrap().to_string();
    server
        .admin_call("approve", json!({"id": first_id, "reason": "fine"}))
        .await
        .expect("approve");
    card_until(&fake, &first_id, |m| m.components.is_empty()).await;
    // A later request's first step is the barrier: the first request's
    // would have come a moment before it.
    let second = submit(&server, 20).await;
    let second_id = second["request_id"].as_str().unwrap().to_string();
    wait_ping(&fake, &second_id, "🔔").await;
    let about_first: Vec<StoredMessage> = fake
        .all_messages()
        .into_iter()
        .filter(|m| m.embeds.is_empty() && m.content.contains(&first_id))
        .collect();
    assert!(about_first.is_empty(), "{about_first:?}");
    assert!(escalated(&server, &first_id).await.is_empty());
    assert!(!card_until(&fake, &first_id, |_| true)
        .await
        .all_text()
        .contains("Escalated"));
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_repeats_no_step_and_fires_the_rest_once() {
    let (fake, mut server) = setup().await;
    // Steps at 1 s, 2 s, 2 s and 9 s.
    let r = submit(&server, 10).await;
    let id = r["request_id"].as_str().unwrap().to_string();
    let (created, deadline) = (
        r["created_ms"].as_i64().unwrap(),
        r["deadline_ms"].as_i64().unwrap(),
    );
    wait_ping(&fake, &id, "🔔").await;
    server.stop_async().await;
    server.restart_async().await;

    wait_ping(&fake, &id, "⏫").await;
    for user in [ALICE, DAVE] {
        wait_dm(&fake, user, &id).await;
    }
    wait_ping(&fake, &id, "⚠️").await;
    for prefix in ["🔔", "⏫", "⚠️"] {
        assert_eq!(pings(&fake, &id, prefix).len(), 1, "{prefix}");
    }
    for user in [ALICE, DAVE] {
        assert_eq!(fake.dms_to(user).len(), 1);
    }
    check_audit(&escalated(&server, &id).await, created, deadline);
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_delays_the_pings_never_the_deadline_and_sends_each_once() {
    let (fake, mut server) = setup().await;
    // Steps at 1 s, 2 s, 2 s and 9 s.
    let r = submit(&server, 10).await;
    let id = r["request_id"].as_str().unwrap().to_string();
    let (created, deadline) = (
        r["created_ms"].as_i64().unwrap(),
        r["deadline_ms"].as_i64().unwrap(),
    );
    card_until(&fake, &id, |_| true).await;
    // Discord answers 503 to everything across the first three steps.
    fake.outage(Duration::from_secs(3), OutageMode::Unavailable);
    let tried = fake
        .wait_for_call(
            |c| {
                c.status == 503
                    && c.matches("POST /channels/*/messages")
                    && c.body["content"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("🔔"))
            },
            WAIT,
        )
        .await
        .expect("the re-ping was tried during the outage");
    assert!(tried.body["content"].as_str().unwrap().contains(&id));

    // Once Discord answers, each step arrives, once.
    wait_ping(&fake, &id, "🔔").await;
    wait_ping(&fake, &id, "⏫").await;
    for user in [ALICE, DAVE] {
        wait_dm(&fake, user, &id).await;
    }
    let s = server
        .admin_call("status", json!({"id": id}))
        .await
        .expect("status");
    assert_eq!(s["state"], "pending");
    assert_eq!(
        s["deadline_ms"], r["deadline_ms"],
        "the deadline never moves"
    );
    wait_ping(&fake, &id, "⚠️").await;
    for prefix in ["🔔", "⏫", "⚠️"] {
        assert_eq!(pings(&fake, &id, prefix).len(), 1, "{prefix}");
    }
    for user in [ALICE, DAVE] {
        assert_eq!(fake.dms_to(user).len(), 1);
    }
    // Claimed (and audited) at their time, during the outage.
    check_audit(&escalated(&server, &id).await, created, deadline);
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_claimed_but_not_sent_before_a_crash_is_sent_once_after_it() {
    let (fake, mut server) = setup().await;
    let r = submit(&server, 10).await;
    let id = r["request_id"].as_str().unwrap().to_string();
    card_until(&fake, &id, |_| true).await;
    // The re-ping (the next message post) fails; the process dies before
    // its retry: the step is claimed and not sent.
    fake.fail_next("POST /channels/*/messages", 503, json!({"message": "down"}));
    let tried = fake
        .wait_for_call(|c| c.injected_failure && c.status == 503, WAIT)
        .await
        .expect("the re-ping was tried");
    server.kill();
    server.restart_async().await;

    wait_ping(&fake, &id, "🔔").await;
    wait_ping(&fake, &id, "⏫").await;
    assert_eq!(pings(&fake, &id, "🔔").len(), 1);
    // Sent again with the same nonce: had the first post reached Discord,
    // Discord would have dropped this one.
    let sent: Vec<RecordedCall> = fake
        .calls_matching("POST /channels/*/messages")
        .into_iter()
        .filter(|c| {
            c.body["content"]
                .as_str()
                .is_some_and(|t| t.starts_with("🔔"))
        })
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].index, tried.index);
    assert!(sent[0].body["nonce"].is_string());
    assert_eq!(sent[0].body["nonce"], sent[1].body["nonce"]);
    assert_eq!(sent[1].body["enforce_nonce"], json!(true));
    let entries = escalated(&server, &id).await;
    assert_eq!(
        entries.iter().filter(|e| e["detail"]["step"] == 0).count(),
        1,
        "claimed once: {entries:?}"
    );
    fake.assert_no_violations();
    server.stop_async().await;
}
