//! Edit, then approve, end to end: the real `keyturn serve` binary with its
//! bot pointed at the fake Discord, an agent waiting on the socket. The
//! approver edits the masked arguments in a modal; the agent gets the
//! edited call with its secrets intact; `verify` takes only the edit; the
//! card shows the diff; the audit chain verifies. Bad edits are refused and
//! change nothing. Every wait has a deadline; nothing sleeps to hope.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::config::{self, DISCORD_AGENT as AGENT};
use harness::rpc::delete_file;
use harness::{Launch, Server};
use keyturn::domain::canonical::args_hash;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(8);

const PASSWORD: &str = "hunter2-correct-horse";
const TOKEN: &str = "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789";

/// A high-risk tool Keyturn runs itself, with a typed slot (1..=600).
const SLEEP_TOOL: &str = r#"
[[tools]]
name = "sleep"
risk = "high"
[tools.run]
argv = ["/bin/sleep", "{secs}"]
timeout = "20s"
[tools.run.slots.secs]
type = "int"
min = 1
max = 600

[[grants]]
scope = "global"
tool = "sleep"
"#;

async fn setup_with(extra: &str) -> (FakeDiscord, Server) {
    setup_cfg(|c| format!("{c}\n{extra}")).await
}

async fn setup_cfg(cfg: impl FnOnce(String) -> String) -> (FakeDiscord, Server) {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = cfg(config::discord(&fake.api_base()));
    let server = Launch::new(dir, text)
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");
    fake.wait_for_route("PUT /applications/*/guilds/*/commands", WAIT)
        .await
        .expect("commands registered");
    (fake, server)
}

async fn first_card(fake: &FakeDiscord) -> StoredMessage {
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| ms.iter().find(|m| !m.custom_ids().is_empty()).cloned(),
        WAIT,
    )
    .await
    .expect("card")
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

/// The ephemeral text a user got: the type-4 response, or the follow-up
/// after a type-6 acknowledgement.
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
    assert_eq!(call.body["flags"].as_u64().unwrap_or(0) & 64, 64);
    call.body["content"].as_str().unwrap_or("").to_string()
}

/// Clicks "Edit & approve…" as `user`: the modal's JSON text.
async fn open_edit(fake: &FakeDiscord, card: &StoredMessage, user: u64) -> String {
    let h = fake
        .click_button(card.id, &button(card, "edit"), user)
        .await;
    let resp = fake
        .wait_interaction_response(&h, WAIT)
        .await
        .expect("modal");
    assert_eq!(resp["type"], 9, "a modal opens: {resp}");
    assert_eq!(resp["data"]["custom_id"], button(card, "edit_submit"));
    resp["data"]["components"][0]["components"][0]["value"]
        .as_str()
        .expect("the arguments as text")
        .to_string()
}

/// Submits the edit modal with `text`: the ephemeral answer.
async fn submit_edit(fake: &FakeDiscord, card: &StoredMessage, user: u64, text: &str) -> String {
    let h = fake
        .submit_modal(
            card.id,
            &button(card, "edit_submit"),
            user,
            &[("args", text)],
        )
        .await;
    ephemeral_reply(fake, &h).await
}

async fn status(server: &Server, id: &str) -> Value {
    server
        .admin_call("status", json!({"id": id}))
        .await
        .expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_approval_runs_the_edit_with_its_secrets_and_only_it_verifies() {
    let (fake, mut server) = setup_with("").await;
    let original = json!({
        "path": "/srv/x",
        "password": PASSWORD,
        "note": format!("token {TOKEN} for the deploy"),
    });
    let mut p = delete_file();
    p["args"] = original.clone();
    let agent = server.submit_waiting_as(AGENT, p);
    let card = first_card(&fake).await;
    let id = request_id(&card);

    // The form holds the arguments masked exactly as the card shows them.
    let text = open_edit(&fake, &card, DAVE).await;
    assert!(
        !text.contains(PASSWORD) && !text.contains(&TOKEN[4..]),
        "{text}"
    );
    let shown: Value = serde_json::from_str(&text).expect("pretty JSON");
    assert_eq!(shown["path"], "/srv/x");
    assert_ne!(shown["password"], PASSWORD, "masked");
    let note = shown["note"].as_str().unwrap().to_string();
    assert!(
        note.starts_with("token [") && note.ends_with("] for the deploy"),
        "{note}"
    );

    // Edit the path and the text around the masked token; keep the masks.
    let mut edited = shown.clone();
    edited["path"] = json!("/srv/y");
    edited["note"] = json!(note.replace("for the deploy", "for the rollback"));
    let answer = submit_edit(
        &fake,
        &card,
        DAVE,
        &serde_json::to_string_pretty(&edited).unwrap(),
    )
    .await;
    assert!(answer.contains("Approved with your edits"), "{answer}");

    // The waiting agent gets the edited call, secrets intact.
    let expected = json!({
        "path": "/srv/y",
        "password": PASSWORD,
        "note": format!("token {TOKEN} for the rollback"),
    });
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "approved", "{decision}");
    assert_eq!(decision["edited"], true);
    assert_eq!(decision["args"], expected);
    assert_eq!(decision["args_hash"], args_hash(&expected));
    assert_eq!(decision["original_args_hash"], args_hash(&original));
    assert!(
        decision["summary"]
            .as_str()
            .unwrap()
            .contains("approved with edits by"),
        "{decision}"
    );

    // Only the edited arguments verify.
    let verify = |args: Value| {
        let server = &server;
        let id = id.clone();
        async move {
            server
                .agent_call("verify", json!({"agent": AGENT, "id": id, "args": args}))
                .await
                .expect("verify")
        }
    };
    let old = verify(original.clone()).await;
    assert_eq!(old["matches"], false, "{old}");
    let new = verify(expected.clone()).await;
    assert_eq!(new["matches"], true, "{new}");
    assert_eq!(new["approved"], true);

    // The card shows the change (masked) and who approved with edits.
    let done = card_until(&fake, card.id, |m| {
        m.components.is_empty() && m.all_text().contains("Approved with edits")
    })
    .await;
    let all = done.all_text();
    assert!(all.contains("/srv/y") && all.contains("/srv/x"), "{all}");
    assert!(all.contains("rollback"), "{all}");
    assert!(all.contains("discord:103"), "{all}");
    assert!(
        !all.contains(PASSWORD) && !all.contains(&TOKEN[4..]),
        "{all}"
    );

    // The status keeps the original hash; the audit chain still verifies.
    let st = status(&server, &id).await;
    assert_eq!(st["edited"], true);
    assert!(st.get("args").is_none(), "no arguments to an admin: {st}");
    let out = server.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let export = String::from_utf8_lossy(&server.cli(&["audit", "export"]).stdout).into_owned();
    assert!(export.contains("\"args_edited\""), "{export}");
    assert!(!export.contains(PASSWORD) && !export.contains(&TOKEN[4..]));
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_edits_are_refused_and_the_request_stays_pending() {
    let (fake, mut server) = setup_with(&format!(
        "{SLEEP_TOOL}\n[content]\ndeny_on_flags = [\"invisible_unicode\"]"
    ))
    .await;
    let mut p = delete_file();
    p["args"] = json!({"path": "/srv/x", "password": PASSWORD});
    let _agent = server.submit_waiting_as(AGENT, p);
    let card = first_card(&fake).await;
    let id = request_id(&card);
    let before = status(&server, &id).await;
    let text = open_edit(&fake, &card, DAVE).await;
    let shown: Value = serde_json::from_str(&text).unwrap();

    let mut removed = shown.clone();
    removed.as_object_mut().unwrap().remove("password");
    let mut overwritten = shown.clone();
    overwritten["password"] = json!("guess");
    let mut moved = shown.clone();
    moved["path"] = shown["password"].clone();
    moved["password"] = json!("/srv/x");
    // An edit the policy would deny (here: a content flag it denies on).
    let mut denied = shown.clone();
    denied["path"] = json!("/srv/x\u{200b}y");
    let cases = [
        ("{\"path\": ", "not valid JSON"),
        (
            &serde_json::to_string(&denied).unwrap(),
            "policy would deny",
        ),
        ("[1, 2]", "JSON object"),
        (&serde_json::to_string(&removed).unwrap(), "removed"),
        (
            &serde_json::to_string(&overwritten).unwrap(),
            "masked value",
        ),
        (&serde_json::to_string(&moved).unwrap(), "mask"),
        (&text, "changes nothing"),
    ];
    for (edit, why) in cases {
        let answer = submit_edit(&fake, &card, DAVE, edit).await;
        assert!(
            answer.contains("Edit refused") && answer.contains(why),
            "{edit}: {answer}"
        );
        assert!(!answer.contains(PASSWORD), "{answer}");
    }
    let after = status(&server, &id).await;
    assert_eq!(after["state"], "pending");
    assert_eq!(after["args_hash"], before["args_hash"]);
    assert!(after.get("edited").is_none(), "{after}");

    // Too large for a Discord form: said at once, nothing opens.
    let mut big = delete_file();
    big["args"] = json!({"path": "/srv/x", "content": "y".repeat(5000)});
    let _big_agent = server.submit_waiting_as(AGENT, big);
    let big_card = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                ms.iter()
                    .find(|m| m.id != card.id && !m.custom_ids().is_empty())
                    .cloned()
            },
            WAIT,
        )
        .await
        .expect("second card");
    let h = fake
        .click_button(big_card.id, &button(&big_card, "edit"), DAVE)
        .await;
    let answer = ephemeral_reply(&fake, &h).await;
    assert!(answer.contains("too large to edit on Discord"), "{answer}");

    // A run-tool's slot rules hold for the edit: out of range is refused.
    let run_agent = {
        let socket_params = json!({
            "agent": AGENT, "tool": "sleep", "args": {"secs": 5},
            "justification": "wait a bit",
        });
        let mut c = server.agent_client().await;
        tokio::spawn(async move { c.call("run", socket_params).await })
    };
    let run_card = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                ms.iter()
                    .find(|m| m.all_text().contains("Will run") && !m.custom_ids().is_empty())
                    .cloned()
            },
            WAIT,
        )
        .await
        .expect("run card");
    let run_id = request_id(&run_card);
    let text = open_edit(&fake, &run_card, DAVE).await;
    let mut slow: Value = serde_json::from_str(&text).unwrap();
    slow["secs"] = json!(9999);
    let answer = submit_edit(
        &fake,
        &run_card,
        DAVE,
        &serde_json::to_string(&slow).unwrap(),
    )
    .await;
    assert!(
        answer.contains("Edit refused") && answer.contains("secs"),
        "{answer}"
    );
    assert_eq!(status(&server, &run_id).await["state"], "pending");
    run_agent.abort();
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_person_edit_is_the_first_approval_and_the_second_sees_it() {
    let (fake, mut server) = setup_cfg(|c| {
        c.replace(
            "[risk.high]\ntimeout = \"30s\"",
            "[risk.high]\ntimeout = \"30s\"\napprovals = 2",
        )
    })
    .await;
    let mut p = delete_file();
    p["args"] = json!({"path": "/srv/x", "password": PASSWORD});
    let agent = server.submit_waiting_as(AGENT, p);
    let card = first_card(&fake).await;
    let text = open_edit(&fake, &card, DAVE).await;
    let mut edited: Value = serde_json::from_str(&text).unwrap();
    edited["path"] = json!("/srv/y");
    let answer = submit_edit(&fake, &card, DAVE, &edited.to_string()).await;
    assert!(answer.contains("1 of 2"), "{answer}");
    // Still pending; the card shows the edited arguments to the second approver.
    let shown = card_until(&fake, card.id, |m| {
        !m.components.is_empty() && m.all_text().contains("/srv/y")
    })
    .await;
    assert!(shown.all_text().contains("1 of 2"), "{}", shown.all_text());
    // Edited once: no second edit.
    let h = fake
        .click_button(card.id, &button(&card, "edit"), ALICE)
        .await;
    let refused = ephemeral_reply(&fake, &h).await;
    assert!(refused.contains("already edited"), "{refused}");
    // The second approval approves the edited call.
    let h = fake
        .click_button(card.id, &button(&card, "approve"), ALICE)
        .await;
    fake.wait_interaction_response(&h, WAIT).await.unwrap();
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["state"], "approved", "{decision}");
    assert_eq!(decision["edited"], true);
    assert_eq!(
        decision["args"],
        json!({"path": "/srv/y", "password": PASSWORD})
    );
    let out = server.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fake.assert_no_violations();
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_run_tool_call_runs_the_edited_argv() {
    if !std::process::Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "bwrap is required under CI"
        );
        eprintln!("skipped: bwrap is not installed");
        return;
    }
    let (fake, mut server) = setup_with(SLEEP_TOOL).await;
    let params =
        json!({"agent": AGENT, "tool": "sleep", "args": {"secs": 30}, "justification": "nap"});
    let mut c = server.agent_client().await;
    let run = tokio::spawn(async move { c.call("run", params).await });
    let card = first_card(&fake).await;
    let id = request_id(&card);
    assert!(card.all_text().contains("\"30\""), "{}", card.all_text());
    let answer = server
        .admin_call(
            "approve",
            json!({"id": id, "args": {"secs": 1}, "operator": "alice"}),
        )
        .await
        .expect("approve with edits");
    assert_eq!(answer["decision"]["state"], "approved", "{answer}");
    let done = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the run ends")
        .unwrap()
        .expect("run answer");
    assert_eq!(done["decision"]["edited"], true, "{done}");
    assert_eq!(done["decision"]["args"], json!({"secs": 1}));
    assert_eq!(done["run"]["state"], "exited", "{done}");
    assert_eq!(done["run"]["exit_code"], 0, "{done}");
    let runs = server
        .admin_call("runs.list", json!({"limit": 5}))
        .await
        .expect("runs.list");
    assert_eq!(runs[0]["argv"], json!(["/bin/sleep", "1"]), "{runs}");
    // The card shows the argv that ran.
    let edited = card_until(&fake, card.id, |m| {
        m.all_text().contains("Approved with edits")
    })
    .await;
    assert!(edited.all_text().contains("\"1\""), "{}", edited.all_text());
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyturn_approve_with_an_args_file_approves_the_edit() {
    let (fake, mut server) = setup_with("").await;
    let mut p = delete_file();
    p["args"] = json!({"path": "/srv/x", "password": PASSWORD});
    let agent = server.submit_waiting_as(AGENT, p);
    let card = first_card(&fake).await;
    let id = request_id(&card);
    // The arguments as `pending` shows them (masked), edited.
    let pending = server
        .admin_call("pending", json!({}))
        .await
        .expect("pending");
    let mut args = pending[0]["args"].clone();
    assert_ne!(args["password"], PASSWORD, "masked: {args}");
    args["path"] = json!("/srv/z");
    let file = server.dir.path().join("edit.json");
    std::fs::write(&file, serde_json::to_string_pretty(&args).unwrap()).unwrap();
    // A file that is not JSON changes nothing.
    let bad = server.dir.path().join("bad.json");
    std::fs::write(&bad, "{\"path\": ").unwrap();
    let out = server.cli(&["approve", &id, "--args-file", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert_eq!(status(&server, &id).await["state"], "pending");
    let out = server.cli(&["approve", &id, "--args-file", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(decision["edited"], true, "{decision}");
    assert_eq!(
        decision["args"],
        json!({"path": "/srv/z", "password": PASSWORD})
    );
    server.stop_async().await;
}
