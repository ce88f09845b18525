//! Several `keyturn serve` processes ("replicas") on one PostgreSQL schema:
//! a decision taken through one wakes the agent waiting on another, a
//! revoke through one is in force on the others within `store.recheck`,
//! and when the leader is killed the next one takes over the Discord bot,
//! the card outbox and the deadline sweep, with every request ending once
//! and every card posted and edited once. Timings are printed, never
//! asserted. Each test works in a schema of its own.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::pg::Schema;
use harness::{Launch, Server};
use keyturn::ipc::client::Client;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

/// A replica's config: its own sockets in its own directory, the shared
/// store, `bot` as the agent, `delete_file` (high, granted) and
/// `read_file` (low, not granted: grants for it come from the store).
fn replica_config(url: &str, extra: &str) -> String {
    format!(
        r#"
[server]
socket_path = "k.sock"

[store]
url = "{url}"
recheck = "1s"

[admin]
single_user_demo = true

[risk.high]
timeout = "120s"

[[agents]]
name = "bot"
max_pending = 1000

[[users]]
id = "42"

[[tools]]
name = "read_file"
risk = "low"

[[tools]]
name = "delete_file"
risk = "high"

[[grants]]
scope = "global"
tool = "delete_file"
{extra}
"#
    )
}

async fn start(text: String) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    Launch::new(dir, text)
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log))
}

fn delete_file(n: usize) -> Value {
    json!({
        "agent": "bot",
        "tool": "delete_file",
        "args": {"path": format!("/srv/{n}")},
        "user_id": "42",
        "channel_id": "7",
        "justification": "cleanup",
    })
}

/// The role a replica reports in `health` (admin socket).
async fn role(s: &Server) -> String {
    let h = s.admin_call("health", json!({})).await.expect("health");
    h["role"].as_str().unwrap_or("").to_string()
}

/// Waits until `pred` holds, polling every 10 ms, at most `within`.
async fn until<F, Fut>(within: Duration, what: &str, mut pred: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !pred().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Submits with `wait` on `s` in the background; answers with the decision
/// and when it arrived.
fn submit_waiting(s: &Server, p: Value) -> tokio::task::JoinHandle<(Value, Instant)> {
    let socket = s.socket().to_path_buf();
    let mut p = p;
    p["wait"] = json!(true);
    tokio::spawn(async move {
        let mut c = Client::connect(&socket).await.expect("connect");
        let v = c.call("submit", p).await.expect("submit");
        (v, Instant::now())
    })
}

/// The id of the next request queued on `s` (from its log).
async fn queued(s: &Server) -> String {
    let line = s
        .wait_log_async(|l| l.contains("queued for approval"), WAIT)
        .await;
    let at = line.find("request.id=").expect("request.id in log") + "request.id=".len();
    line[at..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Waits until `sql` (a count) answers `want`, polling every 20 ms.
async fn until_count(
    db: &mut sqlx::PgConnection,
    sql: &str,
    want: i64,
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&mut *db).await.unwrap();
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {n}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `sql` (a count) until it is at least `want`, failing after `within`.
async fn until_count_at_least(
    db: &mut sqlx::PgConnection,
    sql: &str,
    want: i64,
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&mut *db).await.unwrap();
        if n >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {n}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A connection to the test's schema, to look at what the replicas wrote.
async fn connect(schema: &Schema) -> sqlx::PgConnection {
    use sqlx::ConnectOptions;
    let opts: sqlx::postgres::PgConnectOptions = schema.url().parse().expect("url");
    opts.connect().await.expect("connect to the test schema")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Submits on `on` (waiting), approves through `via`'s admin socket, `n`
/// times; the first approval goes through `via`'s CLI. Prints the wake-up
/// latencies.
async fn wake_ups(label: &str, on: &Server, via: &Server, n: usize) {
    assert!(n >= 2);
    let mut from_commit = Vec::new();
    let mut from_call = Vec::new();
    let mut through_cli = Duration::ZERO;
    for i in 0..n {
        let waiting = submit_waiting(on, delete_file(i));
        let id = queued(on).await;
        let started = Instant::now();
        if i == 0 {
            let via_cfg = via.config.clone();
            let id2 = id.clone();
            let out = tokio::task::spawn_blocking(move || {
                harness::run(&["approve", &id2, "--reason", "fine"], &via_cfg)
            })
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "keyturn approve through the other replica: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let v = via
                .admin_call(
                    "approve",
                    json!({"id": id, "reason": "fine", "operator": "alice"}),
                )
                .await
                .expect("approve");
            assert_eq!(v["decision"]["state"], "approved");
        }
        let committed = Instant::now();
        let (d, at) = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the waiting agent wakes")
            .unwrap();
        assert_eq!(d["state"], "approved", "{d}");
        assert_eq!(d["request_id"].as_str(), Some(id.as_str()));
        if i == 0 {
            through_cli = at.saturating_duration_since(started);
        } else {
            from_call.push(at.saturating_duration_since(started));
            from_commit.push(at.saturating_duration_since(committed));
        }
    }
    from_call.sort();
    from_commit.sort();
    eprintln!(
        "{label}: wake-up on another replica over {} approvals on its admin socket, approve call → answer: p50 {:?}, p99 {:?}, max {:?}; approve returned → answer: p50 {:?}, p99 {:?} (one more through `keyturn approve`, process start included: {through_cli:?})",
        from_call.len(),
        percentile(&from_call, 0.5),
        percentile(&from_call, 0.99),
        from_call.last().unwrap(),
        percentile(&from_commit, 0.5),
        percentile(&from_commit, 0.99),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_through_one_replica_wakes_the_agent_on_another() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let url = schema.url();
    let a = start(replica_config(&url, "")).await;
    let b = start(replica_config(&url, "")).await;
    let roles = [role(&a).await, role(&b).await];
    assert!(
        roles.contains(&"leader".to_string()) && roles.contains(&"follower".to_string()),
        "one leader, one follower: {roles:?}"
    );
    // `keyturn health` names the role; a follower is healthy.
    for (s, r) in [(&a, &roles[0]), (&b, &roles[1])] {
        let out = s.cli(&["health"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains(&format!("role: {r}")), "{text}");
    }
    wake_ups("two replicas", &a, &b, 20).await;
    wake_ups("two replicas, the other way", &b, &a, 20).await;

    let c = start(replica_config(&url, "")).await;
    let roles = [role(&a).await, role(&b).await, role(&c).await];
    assert_eq!(
        roles.iter().filter(|r| *r == "leader").count(),
        1,
        "{roles:?}"
    );
    wake_ups("three replicas", &a, &c, 20).await;
    // A cancel through one replica wakes the waiter on another, too.
    let waiting = submit_waiting(&c, delete_file(99));
    let id = queued(&c).await;
    b.admin_call("cancel", json!({"id": id, "reason": "not needed"}))
        .await
        .expect("cancel");
    let (d, _) = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(d["state"], "cancelled", "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_through_one_replica_holds_on_the_others_within_the_recheck() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let url = schema.url();
    let a = start(replica_config(&url, "")).await;
    let b = start(replica_config(&url, "")).await;
    let read = json!({"agent": "bot", "tool": "read_file", "args": {"path": "/srv/a"},
        "user_id": "42", "channel_id": "7", "justification": "look"});
    let state = |v: Value| v["state"].as_str().unwrap_or("").to_string();
    assert_eq!(
        state(a.agent_call("submit", read.clone()).await.unwrap()),
        "denied",
        "not granted yet"
    );
    let out = b.cli(&["grant", "--scope", "global", "--tool", "read_file"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let granted = Instant::now();
    until(WAIT, "the grant reaches the other replica", || {
        let (a, read) = (&a, read.clone());
        async move { state(a.agent_call("submit", read).await.unwrap()) == "approved" }
    })
    .await;
    eprintln!(
        "a grant through B is in force on A after {:?}",
        granted.elapsed()
    );

    let out = b.cli(&["revoke", "--scope", "global", "--tool", "read_file"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = Instant::now();
    let first = state(a.agent_call("submit", read.clone()).await.unwrap());
    let first_at = revoked.elapsed();
    // Within the re-check period (1 s) it must be denied, whatever
    // notifications did; a deadline a little past it allows for the
    // refresh itself.
    let mut denied_at = (first == "denied").then_some(first_at);
    while denied_at.is_none() {
        let elapsed = revoked.elapsed();
        assert!(
            elapsed < Duration::from_millis(1500),
            "the revoked tool is still allowed on A {elapsed:?} after the revoke"
        );
        if state(a.agent_call("submit", read.clone()).await.unwrap()) == "denied" {
            denied_at = Some(revoked.elapsed());
        }
    }
    eprintln!(
        "a revoke through B: the first call on A {first_at:?} after it was {first}; denied on A from {:?}",
        denied_at.unwrap()
    );
    // And stays denied.
    for _ in 0..5 {
        assert_eq!(
            state(a.agent_call("submit", read.clone()).await.unwrap()),
            "denied"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_through_one_replica_answers_the_waiters_and_denies_on_the_others() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let url = schema.url();
    let a = start(replica_config(&url, "")).await;
    let b = start(replica_config(&url, "")).await;
    // An agent waits on A.
    let waiting = submit_waiting(&a, delete_file(1));
    queued(&a).await;
    let out = b.cli(&["agent", "pause", "bot", "--reason", "incident"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (v, _) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiter on A is answered")
        .expect("waiter");
    assert_eq!(v["state"], "cancelled", "{v}");
    until(WAIT, "the pause is in force on A", || {
        let a = &a;
        async move {
            let d = a.agent_call("submit", delete_file(2)).await.unwrap();
            d["rule"] == "agent_paused"
        }
    })
    .await;
    // Nothing of the paused agent stays pending anywhere.
    let pending = b.admin_call("pending", json!({})).await.expect("pending");
    assert_eq!(pending.as_array().map(Vec::len), Some(0), "{pending}");
    let out = a.cli(&["agent", "resume", "bot"]);
    assert!(out.status.success());
    until(WAIT, "the resume is in force on B", || {
        let b = &b;
        async move {
            let d = b.agent_call("submit", delete_file(3)).await.unwrap();
            d["state"] == "pending"
        }
    })
    .await;
}

/// The Discord config of a replica pointed at `fake`, on the shared store.
fn discord_replica(url: &str, api_base: &str, timeout: &str) -> String {
    harness::config::discord(api_base)
        .replace(
            "url = \"sqlite://k.db\"",
            &format!("url = \"{url}\"\nrecheck = \"1s\""),
        )
        .replace("timeout = \"30s\"", &format!("timeout = \"{timeout}\""))
}

/// Every card's request id, from its buttons (`keyturn:v1:ACTION:ID`).
/// Accepted posts to the approvals channel.
fn posts(fake: &FakeDiscord) -> usize {
    fake.calls_matching("POST /channels/20/messages")
        .iter()
        .filter(|c| (200..300).contains(&c.status))
        .count()
}

fn card_request(m: &StoredMessage) -> Option<String> {
    m.custom_ids()
        .first()
        .and_then(|c| c.rsplit(':').next())
        .map(str::to_string)
}

/// The replica that leads, and the other.
async fn leader_of(x: Server, y: Server) -> (Server, Server) {
    let deadline = Instant::now() + WAIT;
    loop {
        if role(&x).await == "leader" {
            return (x, y);
        }
        if role(&y).await == "leader" {
            return (y, x);
        }
        assert!(Instant::now() < deadline, "no leader within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_with_100_pending_every_request_ends_once_and_every_card_once() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let url = schema.url();
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let cfg = discord_replica(&url, &fake.api_base(), "45s");
    let x = start(cfg.clone()).await;
    let y = start(cfg).await;
    let (leader, heir) = leader_of(x, y).await;
    fake.wait_ready(WAIT)
        .await
        .expect("the leader's bot is ready");
    assert_eq!(fake.identify_count(), 1, "only the leader connects");
    let h = heir.admin_call("health", json!({})).await.unwrap();
    assert_eq!(h["discord"]["state"], "standby", "{h}");
    assert_eq!(h["ok"], true, "a follower's Discord is not a fault: {h}");

    // 100 requests, half through each replica.
    let mut ids = Vec::new();
    for n in 0..100 {
        let on = if n % 2 == 0 { &leader } else { &heir };
        let r = on
            .agent_call("submit", {
                let mut p = delete_file(n);
                p["agent"] = json!(harness::config::DISCORD_AGENT);
                p
            })
            .await
            .expect("submit");
        assert_eq!(r["state"], "pending", "{r}");
        ids.push(r["request_id"].as_str().unwrap().to_string());
    }
    // Killed while the outbox is posting: some cards are posted and
    // recorded, the rest are not, and one may be posted but not yet
    // recorded. The heir posts the rest; a card posted again carries the
    // same nonce, so Discord (and the fake) gives back the first message.
    let mut db = connect(&schema).await;
    until_count_at_least(
        &mut db,
        "SELECT count(*) FROM discord_cards WHERE message_id IS NOT NULL",
        20,
        Duration::from_secs(60),
        "cards posted and recorded",
    )
    .await;
    let posted_before = posts(&fake);

    // SIGKILL the leader; the other takes over.
    let mut leader = leader;
    let killed = Instant::now();
    leader.kill();
    until(WAIT, "the other replica leads", || async {
        role(&heir).await == "leader"
    })
    .await;
    let took_over = killed.elapsed();
    until(WAIT, "the new leader's bot connects", || async {
        fake.identify_count() == 2
    })
    .await;
    fake.wait_ready(WAIT)
        .await
        .expect("the new leader's bot is ready");
    let connected = killed.elapsed();
    eprintln!(
        "takeover after SIGKILL of the leader: leads after {took_over:?}, its bot connected after {connected:?}"
    );

    // 40 approved and 30 denied through the survivor; 30 left to time out.
    for (i, id) in ids.iter().enumerate().take(70) {
        let method = if i < 40 { "approve" } else { "deny" };
        let v = heir
            .admin_call(
                method,
                json!({"id": id, "reason": "r", "operator": "alice"}),
            )
            .await
            .unwrap_or_else(|e| panic!("{method} {id}: {e:?}"));
        assert!(v["decision"]["state"] != "pending", "{v}");
    }
    until(Duration::from_secs(90), "all 100 decided", || async {
        let p = heir.admin_call("pending", json!({})).await.unwrap();
        p.as_array().is_some_and(Vec::is_empty)
    })
    .await;

    // Every request ended once: one resolution in the audit log each.
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT request_id, min(kind), count(*) FROM audit \
         WHERE kind IN ('approved', 'denied', 'timed_out', 'cancelled') GROUP BY request_id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let ended: HashMap<String, (String, i64)> =
        rows.into_iter().map(|(id, k, n)| (id, (k, n))).collect();
    for (i, id) in ids.iter().enumerate() {
        let want = match i {
            0..40 => "approved",
            40..70 => "denied",
            _ => "timed_out",
        };
        assert_eq!(
            ended.get(id),
            Some(&(want.to_string(), 1)),
            "request {i} ({id})"
        );
    }
    // Timed out at their deadline: by the new leader, within the takeover.
    let late: Vec<(i64, i64)> =
        sqlx::query_as("SELECT deadline_ms, decided_ms FROM requests WHERE state = 'timed_out'")
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert_eq!(late.len(), 30);
    let worst = late.iter().map(|(d, at)| at - d).max().unwrap();
    eprintln!("timeouts after the takeover: at most {worst} ms past their deadline");

    // Every card posted once and edited to its final state once.
    // Every card shows its final state: edited once if it was posted while
    // pending, posted once in its final state if its request was decided
    // before the heir got to post it.
    let final_of = |i: usize| match i {
        0..40 => "approved",
        40..70 => "denied",
        _ => "timed out",
    };
    // Which message is whose card, as the outbox recorded it (a final card
    // has no buttons left to name its request).
    let rows: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT request_id, message_id FROM discord_cards")
            .fetch_all(&mut db)
            .await
            .unwrap();
    let card_of: HashMap<String, u64> = rows
        .into_iter()
        .map(|(id, m)| (id, m.expect("every card posted") as u64))
        .collect();
    until(
        Duration::from_secs(60),
        "every card shows its final state",
        || async {
            ids.iter().enumerate().all(|(i, id)| {
                fake.message(card_of[id])
                    .is_some_and(|m| m.all_text().to_lowercase().contains(final_of(i)))
            })
        },
    )
    .await;
    // The outbox is idle: nothing more is due.
    until_count(
        &mut db,
        "SELECT count(*) FROM discord_cards WHERE want > done",
        0,
        WAIT,
        "cards still due",
    )
    .await;
    // One message per card, whatever was posted twice across the kill.
    assert_eq!(card_of.len(), 100, "a card for each request");
    assert_eq!(
        fake.messages_in(APPROVALS_CHANNEL_ID).len(),
        100,
        "no card posted twice"
    );
    eprintln!(
        "cards posted before the kill: {posted_before}; create calls in all: {}",
        posts(&fake)
    );
    // Accepted edits (a 429 from the rate limits is not an edit).
    let edits: Vec<RecordedCall> = fake
        .calls_matching("PATCH /channels/20/messages/*")
        .into_iter()
        .filter(|c| (200..300).contains(&c.status))
        .collect();
    let mut per_message: HashMap<u64, usize> = HashMap::new();
    for e in &edits {
        let m: u64 = e.path.rsplit('/').next().unwrap().parse().unwrap();
        *per_message.entry(m).or_default() += 1;
    }
    let mut posted_pending = 0;
    for (i, id) in ids.iter().enumerate() {
        let m = fake
            .message(card_of[id])
            .unwrap_or_else(|| panic!("the card of request {i} ({id}) is gone"));
        assert!(
            m.edit_count <= 1,
            "card of request {i} edited {} times",
            m.edit_count
        );
        assert_eq!(
            per_message.get(&m.id).copied().unwrap_or(0),
            m.edit_count as usize,
            "PATCHes for request {i}"
        );
        posted_pending += m.edit_count as usize;
        assert!(
            m.all_text().to_lowercase().contains(final_of(i)),
            "card of request {i} shows {}: {}",
            final_of(i),
            m.all_text()
        );
    }
    eprintln!(
        "cards posted while pending and edited once: {posted_pending}; posted once already decided: {}",
        100 - posted_pending
    );
    fake.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_while_leadership_moves_is_applied_once_or_refused_clearly() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let url = schema.url();
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let cfg = discord_replica(&url, &fake.api_base(), "120s");
    let x = start(cfg.clone()).await;
    let y = start(cfg).await;
    let (leader, other) = leader_of(x, y).await;
    fake.wait_ready(WAIT).await.expect("bot ready");
    let mut p = delete_file(1);
    p["agent"] = json!(harness::config::DISCORD_AGENT);
    let r = other.agent_call("submit", p).await.unwrap();
    let id = r["request_id"].as_str().unwrap().to_string();
    let card = fake
        .wait_for_messages(
            APPROVALS_CHANNEL_ID,
            |ms| {
                ms.iter()
                    .find(|m| card_request(m).as_deref() == Some(id.as_str()))
                    .cloned()
            },
            WAIT,
        )
        .await
        .expect("card");
    let approve = format!("keyturn:v1:approve:{id}");

    // Leadership moves: the leader's lock connection is cut, so it stops
    // leading within a second and either replica wins it again.
    let mut db = connect(&schema).await;
    let key = keyturn::store::postgres::leader::key_for_schema(schema.name());
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted \
         AND ((classid::bigint << 32) | objid::bigint) = $1 AND objsubid = 1) t",
    )
    .bind(key)
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(cut, 1, "the leader's lock connection was found");
    leader
        .wait_log_async(|l| l.contains("LEADERSHIP LOST"), WAIT)
        .await;
    // The click lands while the old leader hands over.
    let h = fake.click_button(card.id, &approve, ALICE).await;
    let answer = fake
        .wait_interaction_response(&h, Duration::from_secs(5))
        .await;
    let state = |v: &Value| v["state"].as_str().unwrap_or("").to_string();
    let status = || async { other.admin_call("status", json!({"id": id})).await.unwrap() };
    match &answer {
        // Acknowledged: the vote was applied.
        Ok(v) if v["type"] == 6 => {
            until(WAIT, "the approval is stored", || async {
                state(&status().await) == "approved"
            })
            .await;
            eprintln!("the click during the handover was applied");
        }
        // Refused with a reason: nothing was recorded.
        Ok(v) => {
            let text = v["data"]["content"].as_str().unwrap_or("");
            assert!(text.contains("handing over"), "a clear refusal: {v}");
            assert_eq!(state(&status().await), "pending");
            eprintln!("the click during the handover was refused: {text}");
        }
        // Not delivered to any bot (between two gateway sessions): Discord
        // itself tells the clicker the interaction failed; nothing recorded.
        Err(e) => {
            assert_eq!(state(&status().await), "pending", "{e}");
            let v = fake.take_violations();
            assert!(
                v.iter().all(|v| v.contains("unanswered")
                    || v.contains("not answered")
                    || v.contains("no response")),
                "{v:?}"
            );
            eprintln!("the click during the handover reached no bot: {e}");
        }
    }
    // Whoever leads now: a click not applied before is applied now, once.
    let applied = matches!(&answer, Ok(v) if v["type"] == 6);
    let (now_leader, _) = leader_of(leader, other).await;
    if !applied {
        until(WAIT, "a bot is connected again", || async {
            fake.wait_ready(Duration::from_millis(100)).await.is_ok()
        })
        .await;
        let again = fake.click_button(card.id, &approve, DAVE).await;
        let v = fake
            .wait_interaction_response(&again, WAIT)
            .await
            .expect("an answer");
        assert_eq!(v["type"], 6, "acknowledged: {v}");
    }
    until(WAIT, "approved", || async {
        state(
            &now_leader
                .admin_call("status", json!({"id": id}))
                .await
                .unwrap(),
        ) == "approved"
    })
    .await;
    let votes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit WHERE request_id = $1 AND kind = 'approved'",
    )
    .bind(&id)
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(votes, 1, "approved once");
}

/// The escalation messages (not cards) in the approvals channel that name
/// `id` and start with `prefix`.
fn escalation_pings(fake: &FakeDiscord, id: &str, prefix: &str) -> usize {
    fake.messages_in(APPROVALS_CHANNEL_ID)
        .iter()
        .filter(|m| m.embeds.is_empty() && m.content.contains(id) && m.content.starts_with(prefix))
        .count()
}

/// The escalation ladder across a leader change: a step the killed leader
/// sent is not sent again by the new one, and the later step is sent once,
/// by the new leader, with one `escalated` audit entry per step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_steps_fire_once_across_a_leader_change() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let url = schema.url();
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let cfg = format!(
        "{}\n[[risk.high.escalation]]\nafter = \"1s\"\naction = \"reping\"\n\n\
         [[risk.high.escalation]]\nafter = \"15s\"\naction = \"ping_role\"\nrole = \"{ADMIN_ROLE_ID}\"\n",
        discord_replica(&url, &fake.api_base(), "45s")
    );
    let x = start(cfg.clone()).await;
    let y = start(cfg).await;
    let (leader, heir) = leader_of(x, y).await;
    fake.wait_ready(WAIT)
        .await
        .expect("the leader's bot is ready");
    let r = heir
        .agent_call("submit", {
            let mut p = delete_file(1);
            p["agent"] = json!(harness::config::DISCORD_AGENT);
            p
        })
        .await
        .expect("submit");
    assert_eq!(r["state"], "pending", "{r}");
    let id = r["request_id"].as_str().unwrap().to_string();
    // The first step, sent by the leader.
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| {
            ms.iter()
                .find(|m| {
                    m.embeds.is_empty() && m.content.contains(&id) && m.content.starts_with('🔔')
                })
                .cloned()
        },
        WAIT,
    )
    .await
    .expect("the first step's ping");

    let mut leader = leader;
    leader.kill();
    until(WAIT, "the other replica leads", || async {
        role(&heir).await == "leader"
    })
    .await;
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |ms| {
            ms.iter()
                .find(|m| {
                    m.embeds.is_empty() && m.content.contains(&id) && m.content.starts_with('⏫')
                })
                .cloned()
        },
        Duration::from_secs(40),
    )
    .await
    .expect("the second step's ping, from the new leader");
    assert_eq!(fake.identify_count(), 2, "the new leader's bot sent it");
    assert_eq!(escalation_pings(&fake, &id, "🔔"), 1, "step 1 once");
    assert_eq!(escalation_pings(&fake, &id, "⏫"), 1, "step 2 once");
    let mut db = connect(&schema).await;
    let steps: Vec<(i64,)> = sqlx::query_as(
        "SELECT count(*) FROM audit WHERE kind = 'escalated' AND request_id = $1 \
         GROUP BY detail::jsonb->>'step' ORDER BY detail::jsonb->>'step'",
    )
    .bind(&id)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(steps, vec![(1,), (1,)], "one audit entry per step");
    fake.assert_no_violations();
}
