//! Runs on Discord, end to end: the real `keyturn serve` binary with its bot
//! pointed at the fake Discord in `fake_discord/`. `/runs` and the Kill
//! button are for approvers and admins, answer ephemerally, and say plainly
//! what happened, including for a run Keyturn does not know. Every wait has
//! a deadline; nothing sleeps to hope.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::config;
use harness::{Launch, Server};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(8);

/// A run id no run has (a well-formed UUID v7).
const UNKNOWN_RUN: &str = "01937a4e-8c2b-7f3d-9a1e-0123456789ab";

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

/// A button click as Discord delivers it, on a message of the bot's (the
/// button need not be on it any more: a client may show a stale card).
async fn click(fake: &FakeDiscord, custom_id: &str, user: u64, roles: &[u64]) -> InteractionHandle {
    let roles: Vec<String> = roles.iter().map(u64::to_string).collect();
    fake.inject_interaction(json!({
        "type": 3,
        "data": {"custom_id": custom_id, "component_type": 2},
        "channel_id": APPROVALS_CHANNEL_ID.to_string(),
        "guild_id": GUILD_ID.to_string(),
        "member": {"user": {"id": user.to_string(), "username": format!("user{user}")},
                   "roles": roles, "deaf": false, "mute": false, "flags": 0},
        "message": {"id": "500", "channel_id": APPROVALS_CHANNEL_ID.to_string(),
                    "author": {"id": BOT_USER_ID.to_string(), "username": "keyturn"},
                    "content": "", "timestamp": "2024-01-01T00:00:00Z", "tts": false,
                    "mention_everyone": false, "mentions": [], "mention_roles": [],
                    "attachments": [], "embeds": [], "pinned": false, "type": 0},
    }))
    .await
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
    assert_eq!(resp["type"], 6, "{resp}");
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

/// The answer to a deferred (ephemeral) slash command: the edit of the
/// original response.
async fn command_reply(fake: &FakeDiscord, h: &InteractionHandle) -> String {
    let resp = fake
        .wait_interaction_response(h, WAIT)
        .await
        .expect("command answered");
    if resp["type"] == 4 {
        assert_eq!(resp["data"]["flags"].as_u64().unwrap_or(0) & 64, 64);
        return resp["data"]["content"].as_str().unwrap_or("").to_string();
    }
    assert_eq!(resp["type"], 5, "deferred: {resp}");
    assert_eq!(
        resp["data"]["flags"].as_u64().unwrap_or(0) & 64,
        64,
        "ephemeral"
    );
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .expect("answered");
    assert!(call.body["allowed_mentions"].is_object());
    call.body["content"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_is_registered_for_approvers_and_answers_them() {
    let (fake, mut server) = setup().await;
    let runs = fake
        .guild_commands()
        .into_iter()
        .find(|c| c["name"] == "runs")
        .expect("/runs registered");
    // Approvers need not have Manage Server: the role is checked by Keyturn.
    assert!(
        runs.get("default_member_permissions")
            .is_none_or(Value::is_null),
        "{runs}"
    );

    // Someone without a role is refused, ephemerally, and told why.
    let text = command_reply(&fake, &fake.slash_command("runs", json!([]), BOB).await).await;
    assert!(text.contains("approvers and admins"), "{text}");

    // An approver and an admin get the list.
    for user in [ALICE, CAROL] {
        let text = command_reply(&fake, &fake.slash_command("runs", json!([]), user).await).await;
        assert_eq!(text, "No runs are running.");
    }
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_click_on_an_unknown_run_gets_a_clear_answer() {
    let (fake, mut server) = setup().await;
    let kill = format!("keyturn:v1:kill:{UNKNOWN_RUN}");

    // Not an approver: refused before anything is looked up.
    let text = ephemeral_reply(&fake, &click(&fake, &kill, BOB, &[]).await).await;
    assert_eq!(text, "You need the approver role to kill Keyturn runs.");

    // An approver: told there is no such run, and that nothing was killed.
    let text = ephemeral_reply(
        &fake,
        &click(&fake, &kill, ALICE, &[APPROVER_ROLE_ID]).await,
    )
    .await;
    assert_eq!(
        text,
        format!("Keyturn has no run `{UNKNOWN_RUN}`, so nothing was killed.")
    );

    // A forged or mangled kill id is not one Keyturn knows.
    let text = ephemeral_reply(
        &fake,
        &click(
            &fake,
            "keyturn:v1:kill:not-a-run",
            ALICE,
            &[APPROVER_ROLE_ID],
        )
        .await,
    )
    .await;
    assert!(text.contains("not one Keyturn knows"), "{text}");

    // Clicks are answered, never left to time out, and no card was touched.
    assert!(fake
        .calls()
        .iter()
        .all(|c| !(c.method == "PATCH" && c.path.contains("/channels/"))));
    fake.assert_no_violations();
    server.stop_async().await;
}

/// The Discord test config with a run-tool `sleep` (high risk: a card)
/// that sleeps in bubblewrap until killed.
fn with_sleeper(api_base: &str) -> String {
    format!(
        "{}{}",
        config::discord(api_base),
        r#"
[[tools]]
name = "sleep"
risk = "high"
[tools.run]
argv = ["/bin/sleep", "{secs}"]
timeout = "300s"
[tools.run.slots.secs]
type = "int"
min = 1
max = 600

[[grants]]
scope = "global"
tool = "sleep"
"#
    )
}

fn field(m: &StoredMessage, name: &str) -> String {
    m.embeds[0]["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["name"] == name)
        .and_then(|f| f["value"].as_str())
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_shown_on_its_card_and_killed_from_it() {
    if !std::path::Path::new("/usr/bin/bwrap").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "bubblewrap is required under CI"
        );
        eprintln!("skipped: bwrap is not installed");
        return;
    }
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The run uid must be able to enter the server's directory.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut server = Launch::new(dir, with_sleeper(&fake.api_base()))
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");

    let socket = server.socket().to_path_buf();
    let agent = tokio::spawn(async move {
        let mut c = keyturn::ipc::client::Client::connect(&socket)
            .await
            .expect("connect");
        c.call(
            "run",
            json!({"agent": config::DISCORD_AGENT, "tool": "sleep", "args": {"secs": 300},
                   "justification": "wait a while"}),
        )
        .await
    });

    // The card shows exactly what will run, and where.
    let card = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| ms.iter().find(|m| !m.custom_ids().is_empty()).cloned(),
            WAIT,
        )
        .await
        .expect("card");
    let argv = field(&card, "Will run");
    assert_eq!(argv, "```json\n[\n  \"/bin/sleep\",\n  \"300\"\n]\n```");
    let sandbox = field(&card, "Sandbox");
    assert!(sandbox.contains("bubblewrap"), "{sandbox}");
    assert!(!sandbox.contains("NOT SANDBOXED"), "{sandbox}");

    // Approved, it runs: the card says since when, its pid, and a Kill button.
    let approve = card.custom_ids()[0].clone();
    assert!(approve.starts_with("keyturn:v1:approve:"), "{approve}");
    let h = fake.click_button(card.id, &approve, ALICE).await;
    fake.wait_interaction_response(&h, WAIT)
        .await
        .expect("click answered");
    let running = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                ms.iter()
                    .find(|m| m.id == card.id && field(m, "Run").contains("pid "))
                    .cloned()
            },
            WAIT,
        )
        .await
        .expect("the card shows the run");
    let run = field(&running, "Run");
    assert!(run.contains("**running** since <t:"), "{run}");
    let kill = running.custom_ids();
    assert_eq!(kill.len(), 1, "{kill:?}");
    assert!(kill[0].starts_with("keyturn:v1:kill:"), "{kill:?}");
    let run_id = kill[0].rsplit(':').next().unwrap_or_default().to_string();
    assert!(run.contains(&run_id), "{run}");

    // /runs lists it, with its pid.
    let text = command_reply(&fake, &fake.slash_command("runs", json!([]), DAVE).await).await;
    assert!(text.starts_with("**Running** (1):"), "{text}");
    assert!(text.contains(&run_id) && text.contains("`sleep`"), "{text}");
    assert!(text.contains("pid "), "{text}");

    // A member without the role cannot kill it; an approver can.
    let h = fake.click_button(running.id, &kill[0], BOB).await;
    assert_eq!(
        ephemeral_reply(&fake, &h).await,
        "You need the approver role to kill Keyturn runs."
    );
    let h = fake.click_button(running.id, &kill[0], DAVE).await;
    let text = ephemeral_reply(&fake, &h).await;
    // The answer may already see the end (a sleep dies at once).
    assert!(
        text.starts_with(&format!("Kill sent to run `{run_id}`"))
            || text.starts_with(&format!(
                "Run `{run_id}` (`sleep` from `agent`) has stopped: **killed** by discord:{DAVE}"
            )),
        "{text}"
    );

    // The agent learns it was killed, and the card shows by whom, without a button.
    let answer = tokio::time::timeout(WAIT, agent)
        .await
        .expect("the run ended")
        .expect("task")
        .expect("run answered");
    assert_eq!(answer["run"]["state"], "killed", "{answer:#}");
    let ended = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                ms.iter()
                    .find(|m| m.id == card.id && field(m, "Run").contains("**killed**"))
                    .cloned()
            },
            WAIT,
        )
        .await
        .expect("the card shows the kill");
    let run = field(&ended, "Run");
    assert!(
        run.contains(&format!("**killed** by discord:{DAVE} after ")),
        "{run}"
    );
    assert!(ended.custom_ids().is_empty(), "{:?}", ended.custom_ids());

    // A second click (a stale card) is told the run has ended.
    let h = click(&fake, &kill[0], DAVE, &[APPROVER_ROLE_ID]).await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(
        text.starts_with(&format!(
            "Run `{run_id}` had already ended, so nothing was killed: **killed** by discord:{DAVE}"
        )),
        "{text}"
    );
    fake.assert_no_violations();
    server.stop_async().await;
}

/// A run-tool that prints its credential, approved on Discord: the card,
/// its edits and every other call the bot made never carry the value, nor
/// does the agent's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_printed_by_a_run_never_reaches_discord() {
    if !std::path::Path::new("/usr/bin/bwrap").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "bubblewrap is required under CI"
        );
        eprintln!("skipped: bwrap is not installed");
        return;
    }
    const SECRET: &str = "kt-discord-cred-0f9e8d7c6b5a4938";
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let text = format!(
        "{}{}",
        config::discord(&fake.api_base()),
        r#"
[[tools]]
name = "print_env"
risk = "high"
[tools.run]
argv = ["/usr/bin/env"]
credentials = [{ name = "api", env = "API_TOKEN" }]

[[grants]]
scope = "global"
tool = "print_env"

[credentials.api]
env = "KEYTURN_TEST_DISCORD_CRED"
"#
    );
    let server = Launch::new(dir, text)
        .env("KEYTURN_TEST_DISCORD_CRED", SECRET)
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");
    let socket = server.socket().to_path_buf();
    let agent = tokio::spawn(async move {
        let mut c = keyturn::ipc::client::Client::connect(&socket)
            .await
            .expect("connect");
        c.call(
            "run",
            json!({"agent": config::DISCORD_AGENT, "tool": "print_env", "args": {}}),
        )
        .await
    });
    let card = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| ms.iter().find(|m| !m.custom_ids().is_empty()).cloned(),
            WAIT,
        )
        .await
        .expect("card");
    let approve = card.custom_ids()[0].clone();
    let h = fake.click_button(card.id, &approve, ALICE).await;
    fake.wait_interaction_response(&h, WAIT)
        .await
        .expect("click answered");
    let answer = tokio::time::timeout(WAIT, agent)
        .await
        .expect("the run ended")
        .expect("task")
        .expect("run answered");
    assert_eq!(answer["run"]["exit_code"], 0, "{answer:#}");
    let out = answer["run"]["stdout"]["text"].as_str().unwrap_or_default();
    assert!(out.contains("API_TOKEN=[credential]"), "{out}");
    assert!(!answer.to_string().contains(SECRET));
    // The card is edited with the run's end; then nothing the bot sent holds it.
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| {
            ms.iter()
                .find(|m| m.id == card.id && field(m, "Run").contains("exited"))
                .cloned()
        },
        WAIT,
    )
    .await
    .expect("the card shows the run's end");
    let calls = fake.calls();
    assert!(!calls.is_empty());
    for c in &calls {
        let files: Vec<String> = c
            .files
            .iter()
            .map(|f| String::from_utf8_lossy(&f.data).into_owned())
            .collect();
        assert!(
            !format!("{} {} {} {}", c.method, c.path, c.body, files.join(" ")).contains(SECRET),
            "the credential reached Discord: {} {}",
            c.method,
            c.path
        );
    }
    assert!(!server.log().contains(SECRET));
}
