//! End to end: a flood of requests against the fake Discord with Discord's
//! real message rate (5 posts per 5 s per channel) turned on. The bot
//! posts one digest per agent and tool instead of hundreds of cards, long
//! before the cards could have been posted, without a rate-limit
//! violation; Deny all and Approve all (confirmed) decide exactly the
//! requests their digest showed, each once, with its own audit entry; a
//! non-approver's bulk click is refused. Every wait has a deadline.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::config;
use harness::{Launch, Server};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);
const FLOOD: usize = 500;

/// Two agents, two tools (both high risk, allowed): four groups.
fn flood_config(api_base: &str) -> String {
    config::discord(api_base).replace(
        "[discord]\n",
        r#"
[[agents]]
name = "agent2"
max_pending = 1000

[[tools]]
name = "write_file"
risk = "high"

[[grants]]
scope = "global"
tool = "write_file"

[discord]
"#,
    )
}

async fn submit(server: &Server, agent: &str, tool: &str, n: usize, secs: u64) -> String {
    let p = json!({
        "agent": agent, "tool": tool, "args": {"path": format!("/srv/{n}"), "token": "sk-live-abcdefabcdefabcdefabcdef"},
        "user_id": "42", "justification": "bulk", "timeout_secs": secs,
    });
    server.agent_call("submit", p).await.expect("submit")["request_id"]
        .as_str()
        .expect("request_id")
        .to_string()
}

/// The digest messages in the channel, by their footer's digest id.
fn digests(fake: &FakeDiscord) -> Vec<StoredMessage> {
    fake.messages_in(APPROVALS_CHANNEL_ID)
        .into_iter()
        .filter(|m| m.content.contains("Digest"))
        .collect()
}

fn is_group(m: &StoredMessage, agent: &str, tool: &str) -> bool {
    m.content
        .contains(&format!("agent `{agent}` for tool `{tool}`"))
}

fn digest_id(m: &StoredMessage) -> String {
    m.embeds[0]["footer"]["text"]
        .as_str()
        .unwrap()
        .trim_start_matches("digest ")
        .to_string()
}

fn button_of(m: &StoredMessage, prefix: &str) -> Option<String> {
    m.custom_ids().into_iter().find(|c| c.starts_with(prefix))
}

/// The ephemeral text a user got: a type-4 answer, or the follow-up.
async fn answer(fake: &FakeDiscord, h: &InteractionHandle, within: Duration) -> Value {
    let resp = fake
        .wait_interaction_response(h, within)
        .await
        .expect("answered");
    if resp["type"] == 4 {
        return resp["data"].clone();
    }
    let path = format!("/webhooks/{APPLICATION_ID}/{}", h.token);
    fake.wait_for_call(|c| c.method == "POST" && c.path == path, within)
        .await
        .expect("follow-up")
        .body
}

/// A click as Discord delivers it from an ephemeral message (which the
/// fake does not store), on behalf of `user` with `roles`.
async fn click_ephemeral(
    fake: &FakeDiscord,
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
        "message": {"id": "1", "channel_id": APPROVALS_CHANNEL_ID.to_string(),
                    "author": {"id": BOT_USER_ID.to_string(), "username": "keyturn"},
                    "content": "", "timestamp": "2024-01-01T00:00:00Z", "tts": false,
                    "mention_everyone": false, "mentions": [], "mention_roles": [],
                    "attachments": [], "embeds": [], "pinned": false, "type": 0, "flags": 64},
    }))
    .await
}

/// What the database says of a digest's requests: id → (state, resolution
/// audit entries).
fn members(db: &std::path::Path, digest: &str) -> HashMap<String, (String, i64)> {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = c
        .prepare(
            "SELECT r.id, r.state, (SELECT COUNT(*) FROM audit a WHERE a.request_id = r.id \
             AND a.kind IN ('approved', 'denied', 'timed_out', 'cancelled')) \
             FROM discord_digest_members m JOIN requests r ON r.id = m.request_id \
             WHERE m.digest_id = ?1",
        )
        .unwrap();
    st.query_map([digest], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Requests with a card row (posted or waiting) that are also in a digest.
fn carded_and_digested(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(
        "SELECT COUNT(*) FROM discord_cards c JOIN discord_digest_members m \
         ON m.request_id = c.request_id",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_becomes_digests_whose_bulk_actions_decide_each_request_once() {
    let fake = FakeDiscord::start(FakeDiscordConfig {
        // Discord's limit on creating messages in one channel.
        rate_limits: Some(FakeRateLimits {
            bucket_limit: 5,
            bucket_window: Duration::from_secs(5),
            global_per_sec: 50,
        }),
        ..FakeDiscordConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Launch::new(dir, flood_config(&fake.api_base()))
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    let db = server.dir.path().join("k.db");
    fake.wait_ready(WAIT).await.expect("bot ready");

    // A small burst: single cards, as before.
    for n in 0..3 {
        submit(&server, "agent", "delete_file", n, 900).await;
    }
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| {
            (ms.iter()
                .filter(|m| m.custom_ids().iter().any(|c| c.contains(":approve:")))
                .count()
                == 3)
                .then_some(())
        },
        WAIT,
    )
    .await
    .expect("three single cards");

    // The flood: four groups, interleaved; 20 agents wait for their answer
    // (10 in each group acted on below), submitted mid-flood.
    let groups = [
        ("agent", "delete_file"),
        ("agent2", "write_file"),
        ("agent", "write_file"),
        ("agent2", "delete_file"),
    ];
    let started = Instant::now();
    let mut waiters = Vec::new();
    for n in 0..FLOOD {
        if n == FLOOD / 2 {
            for i in 0..20 {
                let (agent, tool) = groups[i % 2];
                let p = json!({"tool": tool, "args": {"path": format!("/w/{i}")},
                    "user_id": "42", "justification": "waits", "timeout_secs": 900});
                waiters.push(server.submit_waiting_as(agent, p));
            }
        }
        let (agent, tool) = groups[n % 4];
        submit(&server, agent, tool, 1000 + n, 600).await;
    }
    let submitted = started.elapsed();
    let all = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                let d: Vec<StoredMessage> = ms
                    .iter()
                    .filter(|m| m.content.contains("Digest"))
                    .cloned()
                    .collect();
                (groups
                    .iter()
                    .all(|(a, t)| d.iter().any(|m| is_group(m, a, t))))
                .then_some(d)
            },
            Duration::from_secs(60),
        )
        .await
        .expect("a digest per group");
    let took = started.elapsed();
    let posts = fake.calls_matching("POST /channels/20/messages").len();
    eprintln!(
        "{FLOOD} requests submitted in {submitted:?}; every group's digest posted after {took:?}, \
         {posts} messages posted in all"
    );
    assert_eq!(all.len(), 4, "one digest per group");
    // One card a second would have needed over 8 minutes.
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(posts < 60, "{posts} posts: digests, not cards");

    // Every request of the flood is in a digest (or, the first few before
    // the flood was seen, a card): never both.
    let in_digests = |db: &std::path::Path| -> usize {
        digests(&fake)
            .iter()
            .map(|m| members(db, &digest_id(m)).len())
            .sum()
    };
    let settled = Instant::now() + WAIT;
    loop {
        let n = in_digests(&db);
        let cards = fake
            .messages_in(APPROVALS_CHANNEL_ID)
            .iter()
            .filter(|m| m.custom_ids().iter().any(|c| c.contains(":approve:")))
            .count();
        if n + cards >= FLOOD + 20 + 3 {
            eprintln!("{n} requests in digests, {cards} single cards");
            break;
        }
        assert!(Instant::now() < settled, "{n} in digests, {cards} cards");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(carded_and_digested(&db), 0);

    let find = |agent: &str, tool: &str| {
        digests(&fake)
            .into_iter()
            .find(|m| is_group(m, agent, tool))
            .expect("digest")
    };

    // A non-approver's bulk click is refused; nothing is decided.
    let other = find("agent", "write_file");
    let deny_other = button_of(&other, "keyturn:v1:digest_deny:").expect("deny all");
    let h = fake.click_button(other.id, &deny_other, BOB).await;
    let text = answer(&fake, &h, WAIT).await["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(text.contains("approver role"), "{text}");
    let other_members = members(&db, &digest_id(&other));
    assert!(other_members.values().all(|(s, _)| s == "pending"));

    // Deny all on one digest: exactly the requests it showed.
    let target = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                ms.iter()
                    .find(|m| is_group(m, "agent", "delete_file"))
                    .filter(|m| {
                        let shown: usize = button_of(m, "keyturn:v1:digest_deny:")
                            .and_then(|c| c.rsplit(':').next()?.parse().ok())
                            .unwrap_or(0);
                        shown > 0 && shown == members(&db, &digest_id(m)).len()
                    })
                    .cloned()
            },
            WAIT,
        )
        .await
        .expect("the digest shows all its requests");
    let deny_id = digest_id(&target);
    let shown = members(&db, &deny_id).len();
    let deny = button_of(&target, "keyturn:v1:digest_deny:").unwrap();
    let h = fake.click_button(target.id, &deny, ALICE).await;
    let text = answer(&fake, &h, WAIT).await["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(text, format!("Denied {shown}."));

    // Approve all, confirmed, on another.
    let target2 = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                ms.iter()
                    .find(|m| is_group(m, "agent2", "write_file"))
                    .filter(|m| {
                        let shown: usize = button_of(m, "keyturn:v1:digest_approve:")
                            .and_then(|c| c.rsplit(':').next()?.parse().ok())
                            .unwrap_or(0);
                        shown > 0 && shown == members(&db, &digest_id(m)).len()
                    })
                    .cloned()
            },
            WAIT,
        )
        .await
        .expect("the digest shows all its requests");
    let approve_id = digest_id(&target2);
    let shown2 = members(&db, &approve_id).len();
    let open = button_of(&target2, "keyturn:v1:digest_approve:").unwrap();
    let h = fake.click_button(target2.id, &open, CAROL).await;
    let confirm = answer(&fake, &h, WAIT).await;
    let ask = confirm["content"].as_str().unwrap_or("");
    assert!(
        ask.contains(&format!("Approve these {shown2} requests")),
        "{ask}"
    );
    assert_eq!(confirm["flags"].as_u64().unwrap_or(0) & 64, 64, "ephemeral");
    let confirm_id = confirm["components"][0]["components"][0]["custom_id"]
        .as_str()
        .expect("a confirm button")
        .to_string();
    assert!(confirm_id.starts_with("keyturn:v1:digest_confirm:"));
    // Nothing is approved before the confirmation.
    assert!(members(&db, &approve_id)
        .values()
        .all(|(s, _)| s == "pending"));
    let h = click_ephemeral(
        &fake,
        &confirm_id,
        CAROL,
        &[ADMIN_ROLE_ID, APPROVER_ROLE_ID],
    )
    .await;
    let text = answer(&fake, &h, WAIT).await["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(text, format!("Approved {shown2}."));
    // Confirming again decides nothing twice.
    let h = click_ephemeral(
        &fake,
        &confirm_id,
        CAROL,
        &[ADMIN_ROLE_ID, APPROVER_ROLE_ID],
    )
    .await;
    let text = answer(&fake, &h, WAIT).await["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(text, format!("Approved 0, {shown2} were already decided."));

    // Each request in them ended once, with one resolution audit entry.
    for (id, want, n) in [
        (&deny_id, "denied", shown),
        (&approve_id, "approved", shown2),
    ] {
        let m = members(&db, id);
        assert_eq!(m.len(), n);
        for (req, (state, resolutions)) in &m {
            assert_eq!(state, want, "{req}");
            assert_eq!(*resolutions, 1, "{req}");
        }
    }
    // Each waiting agent got its answer, once.
    let deadline = Instant::now() + WAIT;
    for w in waiters {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, w)
            .await
            .expect("the waiting agent is answered")
            .expect("task");
        let state = r["state"].as_str().unwrap_or("").to_string();
        assert!(state == "denied" || state == "approved", "{r}");
    }

    // The digests show the final counts, without buttons.
    for (agent, tool, word) in [
        ("agent", "delete_file", format!("⛔ {shown} denied")),
        ("agent2", "write_file", format!("✅ {shown2} approved")),
    ] {
        let m = fake
            .wait_for_messages(
                APPROVALS_CHANNEL_ID,
                |ms| {
                    ms.iter()
                        .find(|m| is_group(m, agent, tool) && m.content.contains("are decided"))
                        .cloned()
                },
                WAIT,
            )
            .await
            .expect("final counts");
        assert!(m.custom_ids().is_empty(), "buttons gone");
        let desc = m.embeds[0]["description"].as_str().unwrap();
        assert!(desc.contains("⏳ 0 pending"), "{desc}");
        assert!(desc.contains(&word), "{desc}");
        assert_eq!(
            m.allowed_mentions,
            Some(json!({"parse": [], "users": [], "roles": [], "replied_user": false}))
        );
        let all = m.all_text();
        assert!(!all.contains("sk-live-abcdef"), "secrets masked: {all}");
    }

    let out = server.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let limited = fake.rate_limited_count();
    eprintln!("429s: {limited}");
    assert!(limited <= 3, "{limited} calls were rate limited");
    fake.assert_no_violations();
    let mut server = server;
    server.stop_async().await;
}

/// Cards not posted yet (pending or not).
fn unposted_cards(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(
        "SELECT COUNT(*) FROM discord_cards WHERE message_id IS NULL",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// The digest row as stored: (message id, rendered key).
fn stored_digest(db: &std::path::Path, digest: &str) -> (Option<i64>, Option<String>) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(
        "SELECT message_id, rendered FROM discord_digests WHERE id = ?1",
        [digest],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// The shown count on a digest's Deny all button.
fn shown_on(m: &StoredMessage) -> usize {
    button_of(m, "keyturn:v1:digest_deny:")
        .and_then(|c| c.rsplit(':').next()?.parse().ok())
        .unwrap_or(0)
}

/// Durable: a digest survives a crash. After a SIGKILL and a restart the
/// same message is edited (nothing is posted again, no member gets a card)
/// and new requests of its group still join it; Deny all then decides them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_survives_a_restart_and_keeps_its_requests() {
    let fake = FakeDiscord::start(FakeDiscordConfig {
        rate_limits: Some(FakeRateLimits {
            bucket_limit: 5,
            bucket_window: Duration::from_secs(5),
            global_per_sec: 50,
        }),
        ..FakeDiscordConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Launch::new(dir, flood_config(&fake.api_base()))
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    let db = server.dir.path().join("k.db");
    fake.wait_ready(WAIT).await.expect("bot ready");
    // One card first (it teaches the bot the channel's rate), then a flood.
    submit(&server, "agent", "delete_file", 0, 900).await;
    fake.wait_for_messages(APPROVALS_CHANNEL_ID, |ms| ms.first().cloned(), WAIT)
        .await
        .expect("a card");
    for n in 1..=40 {
        submit(&server, "agent", "delete_file", n, 600).await;
    }
    let digest = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| ms.iter().find(|m| m.content.contains("Digest")).cloned(),
            WAIT,
        )
        .await
        .expect("a digest");
    let id = digest_id(&digest);
    // Wait until the store records what the message shows.
    let settled = Instant::now() + WAIT;
    loop {
        let m = fake.message(digest.id).expect("digest message");
        let n = members(&db, &id).len();
        let (message, rendered) = stored_digest(&db, &id);
        if message == Some(digest.id as i64)
            && shown_on(&m) == n
            && rendered.as_deref() == Some(format!("{n}/{n}").as_str())
        {
            break;
        }
        assert!(Instant::now() < settled, "digest not settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = members(&db, &id).len();
    let messages = fake.messages_in(APPROVALS_CHANNEL_ID).len();
    let posts = fake.calls_matching("POST /channels/20/messages").len();

    server.kill();
    server.restart_async().await;
    fake.wait_ready(WAIT).await.expect("bot ready again");
    for n in 100..105 {
        submit(&server, "agent", "delete_file", n, 600).await;
    }
    let m = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                ms.iter()
                    .find(|m| m.id == digest.id && shown_on(m) == before + 5)
                    .cloned()
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the new requests joined the same digest: {e}\n{}",
                server.log()
            )
        });
    assert_eq!(members(&db, &id).len(), before + 5);
    assert_eq!(
        fake.calls_matching("POST /channels/20/messages").len(),
        posts,
        "nothing posted again after the restart"
    );
    assert_eq!(fake.messages_in(APPROVALS_CHANNEL_ID).len(), messages);
    assert_eq!(carded_and_digested(&db), 0);

    let deny = button_of(&m, "keyturn:v1:digest_deny:").unwrap();
    let h = fake.click_button(m.id, &deny, DAVE).await;
    let text = answer(&fake, &h, WAIT).await["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(text, format!("Denied {}.", before + 5));
    assert!(members(&db, &id)
        .values()
        .all(|(s, n)| s == "denied" && *n == 1));
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| {
            ms.iter()
                .find(|m| m.id == digest.id && m.content.contains("are decided"))
                .cloned()
        },
        WAIT,
    )
    .await
    .expect("final counts");
    fake.assert_no_violations();
    server.stop_async().await;
}

/// Approve all then confirm, as `user` with `roles`: the answer's text.
async fn approve_all(fake: &FakeDiscord, m: &StoredMessage, user: u64, roles: &[u64]) -> String {
    let open = button_of(m, "keyturn:v1:digest_approve:").expect("approve all");
    let h = fake.click_button(m.id, &open, user).await;
    let confirm = answer(fake, &h, WAIT).await;
    let id = confirm["components"][0]["components"][0]["custom_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a confirm button: {confirm}"))
        .to_string();
    let h = click_ephemeral(fake, &id, user, roles).await;
    answer(fake, &h, WAIT).await["content"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// A bulk approval has a card's rights checks, one request at a time: a
/// critical request needs an admin, and nobody approves a request made on
/// their own behalf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_approval_keeps_the_rights_of_a_single_click() {
    let fake = FakeDiscord::start(FakeDiscordConfig {
        rate_limits: Some(FakeRateLimits {
            bucket_limit: 5,
            bucket_window: Duration::from_secs(5),
            global_per_sec: 50,
        }),
        ..FakeDiscordConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Launch::new(dir, flood_config(&fake.api_base()))
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    let db = server.dir.path().join("k.db");
    fake.wait_ready(WAIT).await.expect("bot ready");
    submit(&server, "agent", "delete_file", 0, 900).await;
    fake.wait_for_messages(APPROVALS_CHANNEL_ID, |ms| ms.first().cloned(), WAIT)
        .await
        .expect("a card");
    const N: usize = 30;
    for n in 0..N {
        submit(&server, "agent", "drop_db", n, 600).await;
        let p = json!({"agent": "agent2", "tool": "delete_file", "args": {"path": format!("/a/{n}")},
            "user_id": ALICE.to_string(), "justification": "for alice", "timeout_secs": 600});
        server.agent_call("submit", p).await.expect("submit");
    }
    // Settled: no card waits to be posted, and each digest shows all its
    // requests (the first few of each group went out as cards).
    let settled = |agent: &'static str, tool: &'static str| {
        let db = db.clone();
        move |ms: &[StoredMessage]| {
            ms.iter()
                .find(|m| is_group(m, agent, tool))
                .filter(|m| {
                    unposted_cards(&db) == 0 && shown_on(m) == members(&db, &digest_id(m)).len()
                })
                .cloned()
        }
    };
    let critical = fake
        .wait_for_messages(APPROVALS_CHANNEL_ID, settled("agent", "drop_db"), WAIT)
        .await
        .expect("the critical digest");
    let alices = fake
        .wait_for_messages(APPROVALS_CHANNEL_ID, settled("agent2", "delete_file"), WAIT)
        .await
        .expect("the digest of alice's requests");
    assert!(critical.embeds[0]
        .to_string()
        .contains("CRITICAL (admins only)"));
    let (nc, na) = (shown_on(&critical), shown_on(&alices));
    assert!(nc > N / 2 && na > N / 2, "{nc} and {na} of {N} in digests");

    let text = approve_all(&fake, &critical, ALICE, &[APPROVER_ROLE_ID]).await;
    assert!(
        text.starts_with(&format!("Approved 0, {nc} were not yours to decide")),
        "{text}"
    );
    let text = approve_all(&fake, &alices, ALICE, &[APPROVER_ROLE_ID]).await;
    assert!(
        text.starts_with(&format!("Approved 0, {na} were not yours to decide")),
        "{text}"
    );
    for m in [&critical, &alices] {
        assert!(members(&db, &digest_id(m))
            .values()
            .all(|(s, n)| s == "pending" && *n == 0));
    }
    let text = approve_all(&fake, &critical, CAROL, &[ADMIN_ROLE_ID, APPROVER_ROLE_ID]).await;
    assert_eq!(text, format!("Approved {nc}."));
    let text = approve_all(&fake, &alices, DAVE, &[APPROVER_ROLE_ID]).await;
    assert_eq!(text, format!("Approved {na}."));
    for m in [&critical, &alices] {
        assert!(members(&db, &digest_id(m))
            .values()
            .all(|(s, n)| s == "approved" && *n == 1));
    }
    fake.assert_no_violations();
    server.stop_async().await;
}

/// The `vote` audit entries of each request in a digest, by request id.
fn votes(db: &std::path::Path, digest: &str) -> HashMap<String, i64> {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = c
        .prepare(
            "SELECT m.request_id, (SELECT COUNT(*) FROM audit a WHERE a.request_id = m.request_id \
             AND a.kind = 'vote') FROM discord_digest_members m WHERE m.digest_id = ?1",
        )
        .unwrap();
    st.query_map([digest], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A two-person rule holds in bulk: one approver's Approve all records one
/// approval on each request and decides none; the same approver again is
/// refused on each; a second approver's Approve all decides them all, each
/// with its two votes and exactly one resolution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_approval_of_two_person_requests_needs_two_people() {
    let fake = FakeDiscord::start(FakeDiscordConfig {
        rate_limits: Some(FakeRateLimits {
            bucket_limit: 5,
            bucket_window: Duration::from_secs(5),
            global_per_sec: 50,
        }),
        ..FakeDiscordConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = flood_config(&fake.api_base()).replace(
        "[risk.high]\ntimeout = \"30s\"\n",
        "[risk.high]\ntimeout = \"30s\"\napprovals = 2\n",
    );
    assert!(cfg.contains("approvals = 2"), "the config changed shape");
    let mut server = Launch::new(dir, cfg)
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    let db = server.dir.path().join("k.db");
    fake.wait_ready(WAIT).await.expect("bot ready");
    const N: usize = 30;
    for n in 0..N {
        submit(&server, "agent", "delete_file", n, 600).await;
    }
    let digest = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms: &[StoredMessage]| {
                ms.iter()
                    .find(|m| is_group(m, "agent", "delete_file"))
                    .filter(|m| {
                        unposted_cards(&db) == 0 && shown_on(m) == members(&db, &digest_id(m)).len()
                    })
                    .cloned()
            },
            WAIT,
        )
        .await
        .expect("the digest");
    let n = shown_on(&digest);
    assert!(n > N / 2, "{n} of {N} in the digest");
    let id = digest_id(&digest);

    let text = approve_all(&fake, &digest, DAVE, &[APPROVER_ROLE_ID]).await;
    assert_eq!(
        text,
        format!("Approved 0, {n} approvals recorded (more are needed)."),
    );
    assert!(members(&db, &id)
        .values()
        .all(|(s, r)| s == "pending" && *r == 0));
    assert!(votes(&db, &id).values().all(|v| *v == 1));

    let text = approve_all(&fake, &digest, DAVE, &[APPROVER_ROLE_ID]).await;
    assert!(
        text.starts_with(&format!("Approved 0, {n} were not yours to decide")),
        "{text}"
    );
    assert!(votes(&db, &id).values().all(|v| *v == 1));

    let text = approve_all(&fake, &digest, CAROL, &[APPROVER_ROLE_ID]).await;
    assert_eq!(text, format!("Approved {n}."));
    assert!(members(&db, &id)
        .values()
        .all(|(s, r)| s == "approved" && *r == 1));
    assert!(votes(&db, &id).values().all(|v| *v == 2));
    fake.assert_no_violations();
    server.stop_async().await;
}
