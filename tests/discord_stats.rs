//! `/stats` end to end: the real `keyturn serve` with its bot pointed at
//! the fake Discord answers an approver with an embed of the figures and
//! a PNG chart attached, and refuses a member without the approver role.
//! Every wait has a deadline.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::config::{self, DISCORD_AGENT as AGENT};
use harness::rpc::delete_file;
use harness::Launch;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(8);
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_answers_with_an_embed_and_a_png_chart() {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Launch::new(dir, config::discord(&fake.api_base()))
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");
    fake.wait_for_route("PUT /applications/*/guilds/*/commands", WAIT)
        .await
        .expect("commands registered");
    assert!(fake
        .guild_commands()
        .iter()
        .any(|c| c["name"] == "stats" && c["default_member_permissions"].is_null()));

    // One call waiting for a human.
    let r = server.submit_as(AGENT, delete_file()).await;
    assert_eq!(r["state"], "pending", "{r}");

    let h = fake
        .slash_command(
            "stats",
            json!([{"name": "since", "type": 3, "value": "7d"}]),
            ALICE,
        )
        .await;
    let call = fake
        .wait_for_call(
            |c| c.method == "PATCH" && c.path.contains(&h.token) && !c.files.is_empty(),
            WAIT,
        )
        .await
        .expect("answered with a file");
    assert!(call.status < 300, "status {}", call.status);
    let embed = &call.body["embeds"][0];
    assert_eq!(embed["title"], "Keyturn usage, last 7d", "{embed:#}");
    assert_eq!(embed["image"]["url"], "attachment://stats.png");
    let field = |name: &str| -> String {
        embed["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .find(|f| f["name"] == name)
            .and_then(|f| f["value"].as_str())
            .unwrap_or_else(|| panic!("no field {name}: {embed:#}"))
            .to_string()
    };
    assert!(field("Outcomes").contains("pending: **1**"), "{embed:#}");
    assert!(field("By tool").contains("`delete_file`: 1"), "{embed:#}");
    assert!(
        field("By agent").contains(&format!("`{AGENT}`: 1")),
        "{embed:#}"
    );
    assert_eq!(field("Time to a human decision"), "no human decisions");
    let file = &call.files[0];
    assert_eq!(file.filename, "stats.png");
    assert_eq!(file.data[..8], PNG_SIGNATURE);
    // The answer is ephemeral and carries the chart as its attachment.
    let original = fake.original_response(&h).expect("original response");
    assert!(original.is_ephemeral());
    assert_eq!(original.attachments.len(), 1);
    assert_eq!(original.attachments[0].data[..8], PNG_SIGNATURE);

    // A bad window is answered in words.
    let h = fake
        .slash_command(
            "stats",
            json!([{"name": "since", "type": 3, "value": "forever"}]),
            CAROL,
        )
        .await;
    let call = fake
        .wait_for_call(|c| c.method == "PATCH" && c.path.contains(&h.token), WAIT)
        .await
        .expect("answered");
    let text = call.body["content"].as_str().unwrap_or("");
    assert!(text.contains("option `since`"), "{text}");

    // Without the approver role: refused, nothing computed.
    let h = fake.slash_command("stats", json!([]), BOB).await;
    let answer: Value = fake
        .wait_interaction_response(&h, WAIT)
        .await
        .expect("refused");
    let text = answer["data"]["content"].as_str().unwrap_or("");
    assert!(text.contains("approvers"), "{answer}");
    fake.assert_no_violations();
    server.stop_async().await;
}
