//! Secrets planted in a request's arguments and justification never reach
//! Discord: not in the card, its edits, its attached JSON, nor any other call.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::config::{self, DISCORD_AGENT as AGENT};
use harness::Launch;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(8);

/// Fake credentials in well-known public formats.
fn planted() -> Vec<&'static str> {
    vec![
        "AKIAQ3EGRT7ZXK4WJ2NB",
        "ghp_R8nX2kLq9VwT4mZp7YcB1sDf6HjK3gNe5aQu",
        "glpat-Xk9mQ2wR7tLp4ZvN8cBs",
        "xoxb-48293016574-5920384716253-Qw8eRt5yUi2oPa7sDf4gHj1k",
        "sk_live_4eC39HqLyjWDarjtT1zdp7dcXk9mQ2wR",
        "sk-proj-Q2wR7tLp4ZvN8cBsX9mK3jH6gF1dS5aP0oI8uY7tR4eW2qZ5xC3vB6nM9lK1jH4g",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "AIzaSyD8x7Qw2Er5Ty8Ui1Op4As7Df0Gh3Jk6Lz",
        "npm_Xk9mQ2wR7tLp4ZvN8cBsY3jH6gF1dS5aP0oI",
        "Hunter2-Pz9xQw7Lm3",
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj",
        "T0pS3cr3tUrlP4ss",
    ]
}

#[tokio::test]
async fn planted_secrets_never_reach_discord() {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Launch::new(dir, config::discord(&fake.api_base()))
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");

    let s = planted();
    let args = json!({
        "aws": {"access_key_id": s[0]},
        "env": format!("GITHUB_TOKEN={} GITLAB={}", s[1], s[2]),
        "slack": s[3],
        "stripe": [s[4]],
        "llm": {"key": s[5]},
        "headers": {"Authorization": format!("Bearer {}", s[6])},
        "maps": format!("https://maps.googleapis.com/maps/api?key={}", s[7]),
        "npmrc": format!("//registry.npmjs.org/:_authToken={}", s[8]),
        "password": s[9],
        "pem": format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----", s[10]),
        "db": format!("postgres://admin:{}@db.internal:5432/prod", s[11]),
        "marker": "harmless-marker-value",
        // Long enough to be truncated on the card, so the JSON file is attached too.
        "padding": "x".repeat(3000),
    });
    let agent = server.submit_waiting_as(
        AGENT,
        json!({
            "tool": "delete_file",
            "args": args,
            "user_id": "42",
            "channel_id": "7",
            "justification": format!("rotate {} and {}", s[1], s[4]),
        }),
    );
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
    fake.wait_interaction_response(&h, WAIT).await.expect("ack");
    let decision = tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent answered")
        .expect("join");
    assert_eq!(decision["state"], "approved");
    // The final edit is what the card shows from now on.
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| {
            ms.iter()
                .find(|m| m.id == card.id && m.custom_ids().is_empty())
                .cloned()
        },
        WAIT,
    )
    .await
    .expect("card edited to its final state");

    let mut sent = String::new();
    let mut files = 0;
    for c in fake.calls() {
        sent.push_str(&c.body.to_string());
        for f in &c.files {
            files += 1;
            sent.push_str(&String::from_utf8_lossy(&f.data));
        }
    }
    for m in fake.all_messages() {
        sent.push_str(&m.content);
        sent.push_str(&json!(m.embeds).to_string());
    }
    assert!(
        files > 0,
        "the truncated card should carry the full (masked) payload as a file"
    );
    assert!(sent.contains("delete_file"), "the scan saw the card");
    assert!(
        sent.contains("harmless-marker-value"),
        "the scan saw the arguments"
    );
    for secret in s {
        assert!(!sent.contains(secret), "secret {secret:?} reached Discord");
    }
    fake.assert_no_violations();
    server.kill();
}
