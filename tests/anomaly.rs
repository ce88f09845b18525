//! Anomaly alerts end to end through the real binary: each rule fires on
//! its pattern (an audit `anomaly` line, an alert in `alerts.list`) and not
//! on a benign stream (under thresholds, varied arguments, inside hours,
//! known tools, also across a restart); `raise_risk` sends the agent's next
//! allowed call to a person; `pause` pauses the agent. On Discord: a storm
//! of 200 fast calls gives one message per rule whose count reaches the
//! right number, and the Pause agent button works for an admin only. Every
//! wait has a deadline.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::{config, Launch, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// A low-risk call of `bot` (allowed by the file-tools config's grant).
fn read(path: &str) -> Value {
    json!({"tool": "read_file", "args": {"path": path}, "user_id": "42"})
}

async fn call(s: &Server, agent: &str, params: Value) -> Value {
    s.submit_as(agent, params).await
}

/// The audit log's `anomaly` lines, oldest first.
async fn anomaly_lines(s: &Server) -> Vec<Value> {
    let tail = s
        .admin_call("audit.tail", json!({"n": 1000}))
        .await
        .expect("audit.tail");
    tail.as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["kind"] == "anomaly")
        .cloned()
        .collect()
}

/// Waits until the audit log holds an `anomaly` line matching `pred`.
async fn wait_line(s: &Server, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(l) = anomaly_lines(s).await.into_iter().find(|l| pred(l)) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no such anomaly line; have {:#?}",
            anomaly_lines(s).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The audit log's `anomaly` line matching `pred`, which must be there now.
async fn now_line(s: &Server, pred: impl Fn(&Value) -> bool) -> Value {
    let lines = anomaly_lines(s).await;
    lines
        .iter()
        .find(|l| pred(l))
        .cloned()
        .unwrap_or_else(|| panic!("no such anomaly line yet; have {lines:#?}"))
}

fn rule_is(rule: &'static str) -> impl Fn(&Value) -> bool {
    move |l: &Value| l["detail"]["rule"] == rule
}

async fn count_rule(s: &Server, rule: &str) -> usize {
    anomaly_lines(s)
        .await
        .iter()
        .filter(|l| l["detail"]["rule"] == rule)
        .count()
}

async fn alerts(s: &Server) -> Vec<Value> {
    s.admin_call("alerts.list", json!({}))
        .await
        .expect("alerts.list")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_repeat_fire_on_their_pattern_and_not_under_it() {
    let s = Server::start(
        config::files,
        "\n[anomaly.rate]\nper_minute = 20\n\n[anomaly.repeat]\ncount = 5\nwithin = \"1m\"\n",
    );
    // 15 calls with varied arguments, then 4 the same: under both thresholds.
    for i in 0..15 {
        let r = call(&s, "bot", read(&format!("/srv/{i}"))).await;
        assert_eq!(r["state"], "approved", "{r}");
    }
    for _ in 0..4 {
        call(&s, "bot", read("/srv/same")).await;
    }
    // The 5th identical call (20th call: not over 20 a minute) is a loop.
    let fifth = call(&s, "bot", read("/srv/same")).await;
    assert_eq!(fifth["state"], "approved", "alerts only: {fifth}");
    // An alert that opens is stored with its audit line before the call
    // that opened it is answered: no waiting.
    let line = now_line(&s, rule_is("repeat")).await;
    assert_eq!(line["detail"]["agent"], "bot");
    assert_eq!(line["actor"], "anomaly");
    let detail = line["detail"]["detail"].as_str().unwrap();
    assert!(detail.contains("`read_file` called 5 times"), "{detail}");
    assert!(
        !detail.contains("/srv/same"),
        "arguments are never shown: {detail}"
    );
    assert_eq!(count_rule(&s, "rate").await, 0, "20 calls is not over 20");
    // The 21st call within the minute is over the rate.
    call(&s, "bot", read("/srv/other")).await;
    let rate = now_line(&s, rule_is("rate")).await;
    assert!(
        rate["detail"]["detail"]
            .as_str()
            .unwrap()
            .contains("more than 20 calls within a minute"),
        "{rate}"
    );
    // One line per rule (alerts open once per window), and the other agent
    // has none.
    assert_eq!(count_rule(&s, "repeat").await, 1);
    assert_eq!(count_rule(&s, "rate").await, 1);
    assert!(anomaly_lines(&s)
        .await
        .iter()
        .all(|l| l["detail"]["agent"] == "bot"));
    // `alerts.list` has both, the rate one counted once.
    let list = alerts(&s).await;
    let rate = list
        .iter()
        .find(|a| a["rule"] == "rate")
        .expect("rate alert");
    assert_eq!(rate["count"], 1, "{rate}");
    assert_eq!(rate["agent"], "bot");
    // `keyturn alerts --json` shows them too.
    let out = s.cli(&["alerts", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let cli: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(cli.as_array().map(Vec::len), Some(2), "{cli}");
    let out = s.cli(&["alerts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("  rate  x1  "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_denials_fires_policy_and_human_denials_alike() {
    let s = Server::start(
        config::files,
        "\n[anomaly.denials]\ncount = 3\nwithin = \"1m\"\n",
    );
    let delete = |extra: Value| {
        let mut p = json!({"tool": "delete_file", "args": {"path": "/srv/x"}, "user_id": "42"});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    };
    // Two denials by policy (nobody is watching): under the threshold.
    for _ in 0..2 {
        let d = call(&s, "bot", delete(json!({"unattended": true}))).await;
        assert_eq!(d["state"], "denied", "{d}");
    }
    // Allowed calls never count.
    for i in 0..5 {
        call(&s, "bot", read(&format!("/srv/{i}"))).await;
    }
    // The third: a person denies it.
    let p = call(&s, "bot", delete(json!({}))).await;
    assert_eq!(p["state"], "pending", "{p}");
    assert_eq!(
        count_rule(&s, "denials").await,
        0,
        "two denials are not a burst"
    );
    s.deny(p["request_id"].as_str().unwrap(), "no");
    let line = wait_line(&s, rule_is("denials")).await;
    let detail = line["detail"]["detail"].as_str().unwrap();
    assert!(detail.contains("3 denials within 1m"), "{detail}");
    assert!(detail.contains("denied by a person"), "{detail}");
    assert_eq!(count_rule(&s, "denials").await, 1);
    // A timeout is a denial too: it raises the open alert's count.
    let t = call(&s, "bot", delete(json!({"timeout_secs": 1}))).await;
    assert_eq!(t["state"], "pending", "{t}");
    let deadline = Instant::now() + WAIT;
    loop {
        let list = alerts(&s).await;
        let a = list.iter().find(|a| a["rule"] == "denials").expect("alert");
        if a["count"] == 2 {
            assert!(a["detail"].as_str().unwrap().contains("timed out"), "{a}");
            break;
        }
        assert_eq!(a["count"], 1, "{a}");
        assert!(
            Instant::now() < deadline,
            "the timeout was not counted: {a}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_rule(&s, "denials").await, 1, "one alert per window");
}

/// `HH:00-HH:00` hours around now (`inside`) or clear of it, computed from
/// the current UTC time.
fn hours(inside: bool) -> String {
    let h = chrono::Utc::now()
        .format("%H")
        .to_string()
        .parse::<u32>()
        .unwrap();
    let (a, b) = if inside {
        ((h + 23) % 24, (h + 2) % 24)
    } else {
        ((h + 2) % 24, (h + 4) % 24)
    };
    format!("{a:02}:00-{b:02}:00")
}

fn off_hours(hours: &str) -> String {
    format!(
        "\n[anomaly.off_hours]\ntools = [\"delete_*\", \"drop_database\"]\nhours = \"{hours}\"\nutc_offset = \"+00:00\"\n\n[anomaly.new_tool]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensitive_tool_outside_its_hours_fires_inside_them_not() {
    // Outside the hours: a sensitive tool fires; another tool does not.
    // Computed once: an hour may turn during the test.
    let outside = hours(false);
    let s = Server::start(config::files, &off_hours(&outside));
    call(&s, "bot", read("/srv/x")).await;
    call(
        &s,
        "bot",
        json!({"tool": "delete_file", "args": {"path": "/x"}, "user_id": "42"}),
    )
    .await;
    let line = wait_line(&s, rule_is("off_hours")).await;
    let detail = line["detail"]["detail"].as_str().unwrap();
    assert!(detail.contains("`delete_file` called on"), "{detail}");
    assert!(detail.contains(&outside), "{detail}");
    wait_line(&s, |l| {
        l["detail"]["rule"] == "new_tool"
            && l["detail"]["detail"]
                .as_str()
                .unwrap()
                .contains("read_file")
    })
    .await;
    assert_eq!(count_rule(&s, "off_hours").await, 1);
    drop(s);

    // Inside the hours: nothing (the new-tool alert of the same call shows
    // the call was seen).
    let s = Server::start(config::files, &off_hours(&hours(true)));
    call(
        &s,
        "bot",
        json!({"tool": "delete_file", "args": {"path": "/x"}, "user_id": "42"}),
    )
    .await;
    wait_line(&s, rule_is("new_tool")).await;
    assert_eq!(count_rule(&s, "off_hours").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tool_fires_once_and_stays_known_across_a_restart() {
    let mut s = Server::start(config::files, "\n[anomaly.new_tool]\n");
    // A fresh deployment's first call is of a tool never seen: it alerts.
    call(&s, "bot", read("/srv/1")).await;
    let first = wait_line(&s, rule_is("new_tool")).await;
    assert!(first["detail"]["detail"]
        .as_str()
        .unwrap()
        .contains("`read_file`"));
    call(&s, "bot", read("/srv/2")).await;
    s.stop_async().await;
    s.restart_async().await;
    // Known before the restart: quiet (a fresh window would open a new
    // alert, so any match would show); a tool never seen: an alert.
    call(&s, "bot", read("/srv/3")).await;
    call(
        &s,
        "bot",
        json!({"tool": "write_file", "args": {"path": "/x"}, "user_id": "42"}),
    )
    .await;
    wait_line(&s, |l| {
        l["detail"]["rule"] == "new_tool"
            && l["detail"]["detail"]
                .as_str()
                .unwrap()
                .contains("write_file")
    })
    .await;
    let lines = anomaly_lines(&s).await;
    let reads = lines
        .iter()
        .filter(|l| {
            l["detail"]["detail"]
                .as_str()
                .unwrap()
                .contains("read_file")
        })
        .count();
    assert_eq!(reads, 1, "{lines:#?}");
    // Another agent has its own tools: its first read_file is new for it.
    call(&s, "cli", read("/srv/4")).await;
    wait_line(&s, |l| l["detail"]["agent"] == "cli").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raise_risk_sends_the_agents_next_allowed_calls_to_a_person() {
    let mut s = Server::start(
        config::files,
        "\n[anomaly]\nraise_for = \"15m\"\n\n[anomaly.repeat]\ncount = 3\nwithin = \"1m\"\naction = \"raise_risk\"\n",
    );
    for _ in 0..2 {
        let r = call(&s, "bot", read("/srv/same")).await;
        assert_eq!(r["state"], "approved", "{r}");
    }
    // The call that completes the loop, and the next allowed call (other
    // arguments), wait for a person, naming the rule.
    let third = call(&s, "bot", read("/srv/same")).await;
    assert_eq!(third["state"], "pending", "{third}");
    assert_eq!(third["rule"], "anomaly", "{third}");
    let next = call(&s, "bot", read("/srv/other")).await;
    assert_eq!(next["state"], "pending", "{next}");
    assert_eq!(next["rule"], "anomaly", "{next}");
    let why = next["rule_detail"].as_str().unwrap_or_default();
    assert!(why.contains("anomaly alert"), "{next}");
    // Other agents are not affected.
    let other = call(&s, "cli", read("/srv/other")).await;
    assert_eq!(other["state"], "approved", "{other}");
    wait_line(&s, rule_is("repeat")).await;
    // The raised risk is stored: a crash and a restart do not lift it.
    s.kill_and_restart();
    let after = call(&s, "bot", read("/srv/after-restart")).await;
    assert_eq!(after["state"], "pending", "{after}");
    assert_eq!(after["rule"], "anomaly", "{after}");
    let other = call(&s, "cli", read("/srv/after-restart")).await;
    assert_eq!(other["state"], "approved", "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pause_action_pauses_the_agent_as_anomaly() {
    let s = Server::start(
        config::files,
        "\n[anomaly.rate]\nper_minute = 3\naction = \"pause\"\n",
    );
    for i in 0..3 {
        let r = call(&s, "bot", read(&format!("/srv/{i}"))).await;
        assert_eq!(r["state"], "approved", "{r}");
    }
    // The fourth call within a minute pauses the agent: it is denied.
    let fourth = call(&s, "bot", read("/srv/3")).await;
    assert_eq!(fourth["state"], "denied", "{fourth}");
    assert_eq!(fourth["rule"], "agent_paused", "{fourth}");
    let list = s
        .admin_call("agent.list", json!({}))
        .await
        .expect("agent.list");
    let bot = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "bot")
        .cloned()
        .unwrap();
    assert_eq!(bot["paused"]["paused_by"], "anomaly", "{bot}");
    assert!(
        bot["paused"]["reason"]
            .as_str()
            .unwrap()
            .contains("anomaly alert"),
        "{bot}"
    );
    // Audited: the alert, and the pause by `anomaly`.
    wait_line(&s, rule_is("rate")).await;
    let tail = s
        .admin_call("audit.tail", json!({"n": 100}))
        .await
        .expect("audit");
    assert!(
        tail.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "agent_paused" && e["actor"] == "anomaly"),
        "{tail}"
    );
    // The alert records it; other agents go on.
    let a = alerts(&s).await;
    assert_eq!(a[0]["paused_by"], "anomaly", "{a:?}");
    let other = call(&s, "cli", read("/srv/x")).await;
    assert_eq!(other["state"], "approved", "{other}");
}

// ---- Discord ----

const SECURITY_CHANNEL: u64 = 25;

async fn discord_setup() -> (FakeDiscord, Server) {
    let fake = FakeDiscord::start(FakeDiscordConfig {
        extra_channels: vec![(SECURITY_CHANNEL, "security".into())],
        ..FakeDiscordConfig::default()
    })
    .await;
    let text = config::discord(&fake.api_base()).replacen(
        "[discord]\n",
        &format!(
            "[[grants]]\nscope = \"global\"\ntool = \"read_file\"\n\n\
             [anomaly]\nchannel = \"{SECURITY_CHANNEL}\"\nwindow = \"10m\"\n\n\
             [anomaly.rate]\nper_minute = 50\n\n\
             [anomaly.repeat]\ncount = 5\nwithin = \"1m\"\n\n[discord]\n"
        ),
        1,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Launch::new(dir, text)
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log));
    fake.wait_ready(WAIT).await.expect("bot ready");
    (fake, server)
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
    assert_eq!(call.body["flags"].as_u64().unwrap_or(0) & 64, 64);
    call.body["content"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_gives_one_message_per_rule_with_its_count_and_admins_can_pause() {
    let (fake, s) = discord_setup().await;
    let agent = config::DISCORD_AGENT;
    let mut c = s.agent_client().await;
    let started = Instant::now();
    for _ in 0..200 {
        let r = c
            .call(
                "submit",
                json!({"agent": agent, "tool": "read_file", "args": {"path": "/x"}}),
            )
            .await
            .expect("submit");
        assert_eq!(r["state"], "approved", "{r}");
    }
    // 200 calls in well under a minute: calls 51..=200 are over the rate
    // (150), calls 5..=200 repeat the same call (196). One message each.
    let (rate, repeat) = fake
        .wait_for_messages(
            SECURITY_CHANNEL,
            |msgs| {
                let find = |rule: &str, count: u64| {
                    msgs.iter()
                        .find(|m| {
                            m.content.contains(&format!("(rule `{rule}`)"))
                                && m.content.contains(&format!("Count: **{count}**"))
                        })
                        .cloned()
                };
                Some((find("rate", 150)?, find("repeat", 196)?))
            },
            Duration::from_secs(60),
        )
        .await
        .expect("both alerts reach their counts");
    eprintln!(
        "storm: 200 calls and both counts shown after {:?}; edits: rate {}, repeat {}",
        started.elapsed(),
        rate.edit_count,
        repeat.edit_count
    );
    assert_eq!(
        fake.messages_in(SECURITY_CHANNEL).len(),
        2,
        "one message per rule"
    );
    assert!(fake.messages_in(APPROVALS_CHANNEL_ID).is_empty());
    for m in [&rate, &repeat] {
        assert!(
            m.content.contains(&format!("Agent: `{agent}`")),
            "{}",
            m.content
        );
        let am = m.allowed_mentions.clone().expect("allowed_mentions");
        assert_eq!(am["parse"], json!([]), "{am}");
    }
    // Edits are bounded: far fewer than the matches.
    assert!(rate.edit_count < 60, "{} edits", rate.edit_count);
    let custom_id = rate.components[0]["components"][0]["custom_id"]
        .as_str()
        .expect("a Pause agent button")
        .to_string();
    assert_eq!(rate.components[0]["components"][0]["label"], "Pause agent");

    // Not an admin: refused, nothing paused.
    for user in [BOB, ALICE] {
        let h = fake.click_button(rate.id, &custom_id, user).await;
        let text = ephemeral_reply(&fake, &h).await;
        assert!(text.contains("admin role"), "{text}");
    }
    let list = s.admin_call("agent.list", json!({})).await.expect("list");
    assert!(list["agents"][0]["paused"].is_null(), "{list}");

    // An admin pauses the agent; the message then says who.
    let h = fake.click_button(rate.id, &custom_id, CAROL).await;
    let text = ephemeral_reply(&fake, &h).await;
    assert!(text.contains("Paused agent"), "{text}");
    let list = s.admin_call("agent.list", json!({})).await.expect("list");
    assert_eq!(
        list["agents"][0]["paused"]["paused_by"],
        format!("discord:{CAROL}"),
        "{list}"
    );
    assert!(list["agents"][0]["paused"]["reason"]
        .as_str()
        .unwrap()
        .contains("anomaly alert"));
    fake.wait_for_messages(
        SECURITY_CHANNEL,
        |msgs| {
            msgs.iter()
                .find(|m| m.id == rate.id && m.content.contains(&format!("paused by <@{CAROL}>")))
                .map(|m| m.components.is_empty())
        },
        WAIT,
    )
    .await
    .expect("the alert says who paused");
    let denied = c
        .call(
            "submit",
            json!({"agent": agent, "tool": "read_file", "args": {"path": "/y"}}),
        )
        .await
        .expect("submit");
    assert_eq!(denied["rule"], "agent_paused", "{denied}");
    fake.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_raised_during_a_discord_outage_is_posted_after_it() {
    let (fake, s) = discord_setup().await;
    let until = fake.outage(Duration::from_secs(3), OutageMode::Unavailable);
    let mut c = s.agent_client().await;
    // 60 calls with varied arguments: 10 over the rate, no loop.
    for i in 0..60 {
        let r = c
            .call(
                "submit",
                json!({"agent": config::DISCORD_AGENT, "tool": "read_file", "args": {"path": format!("/x/{i}")}}),
            )
            .await
            .expect("submit: the socket is served during the outage");
        assert_eq!(r["state"], "approved", "{r}");
    }
    // Stored and audited at once, whatever Discord does.
    wait_line(&s, rule_is("rate")).await;
    assert!(Instant::now() < until, "the calls outlasted the outage");
    let m = fake
        .wait_for_messages(
            SECURITY_CHANNEL,
            |msgs| {
                msgs.iter()
                    .find(|m| {
                        m.content.contains("(rule `rate`)") && m.content.contains("Count: **10**")
                    })
                    .cloned()
            },
            Duration::from_secs(60),
        )
        .await
        .expect("posted once Discord is back");
    assert!(
        fake.calls_matching(&format!("POST /channels/{SECURITY_CHANNEL}/messages"))
            .iter()
            .any(|c| c.status >= 500),
        "the poster tried during the outage"
    );
    assert_eq!(
        fake.messages_in(SECURITY_CHANNEL).len(),
        1,
        "{:?}",
        m.content
    );
    assert_eq!(count_rule(&s, "repeat").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_not_yet_posted_is_posted_after_a_restart() {
    let (fake, mut s) = discord_setup().await;
    // Discord down for longer than this server lives.
    fake.outage(Duration::from_secs(600), OutageMode::Unavailable);
    let mut c = s.agent_client().await;
    for i in 0..55 {
        c.call(
            "submit",
            json!({"agent": config::DISCORD_AGENT, "tool": "read_file", "args": {"path": format!("/x/{i}")}}),
        )
        .await
        .expect("submit");
    }
    drop(c);
    let line = wait_line(&s, rule_is("rate")).await;
    // Stored with its final count before the stop.
    let deadline = Instant::now() + WAIT;
    while alerts(&s).await.first().map(|a| a["count"].clone()) != Some(json!(5)) {
        assert!(Instant::now() < deadline, "{:?}", alerts(&s).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop_async().await;
    assert!(fake.messages_in(SECURITY_CHANNEL).is_empty());
    fake.end_outage();
    s.restart_async().await;
    let m = fake
        .wait_for_messages(
            SECURITY_CHANNEL,
            |msgs| {
                msgs.iter()
                    .find(|m| {
                        m.content.contains("(rule `rate`)") && m.content.contains("Count: **5**")
                    })
                    .cloned()
            },
            Duration::from_secs(60),
        )
        .await
        .expect("posted by the restarted server");
    assert!(m
        .content
        .contains(line["detail"]["agent"].as_str().unwrap()));
    assert_eq!(fake.messages_in(SECURITY_CHANNEL).len(), 1);
}
