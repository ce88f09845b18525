//! End to end: the real `keyturn serve` against the fake Discord when
//! Discord is down, slow or strict: outages at start and while cards are
//! queued, rate limits per bucket and global, and permanent start-up errors.
//! Every wait has a deadline; nothing sleeps but the fake's own outage timer.

mod fake_discord;
mod harness;

use fake_discord::*;
use harness::config::{self, DISCORD_AGENT as AGENT};
use harness::rpc::delete_file;
use harness::{Launch, Server};
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(8);

/// The test config with extra `[discord]` keys (it is the last section).
fn config_with(api_base: &str, extra: &str) -> String {
    format!("{}{extra}\n", config::discord(api_base))
}

async fn spawn(cfg: &str) -> Server {
    Launch::new(tempfile::tempdir().expect("tempdir"), cfg)
        .try_start_async()
        .await
        .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log))
}

fn request_id_of(m: &StoredMessage) -> String {
    m.custom_ids()[0]
        .rsplit(':')
        .next()
        .expect("id")
        .to_string()
}

async fn submit_with_timeout(server: &Server, secs: u64) -> String {
    let mut p = delete_file();
    p["timeout_secs"] = json!(secs);
    server.submit_as(AGENT, p).await["request_id"]
        .as_str()
        .expect("request_id")
        .to_string()
}

/// Waits until `pred` holds for the server's log.
async fn log_until(server: &Server, pred: impl Fn(&str) -> bool) -> String {
    server.wait_log_text_async(pred, WAIT).await
}

/// Issue item 1: cards queued during an outage are all posted within about
/// one bounded pause of the recovery, oldest deadline first, whatever order
/// they were queued in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_every_card_is_posted_promptly_oldest_deadline_first() {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let cfg = config_with(&fake.api_base(), "max_retry_pause = \"1s\"");
    let mut server = spawn(&cfg).await;
    fake.wait_ready(WAIT).await.expect("bot ready");
    let outage = Duration::from_secs(4);
    let recovered = fake.outage(outage, OutageMode::Unavailable);
    // Deadlines opposite to the order they are queued in.
    let mut ids = Vec::new();
    for secs in [600, 500, 400, 300] {
        ids.push(submit_with_timeout(&server, secs).await);
    }
    ids.reverse();
    // The fake's own outage timer; then a card with a later deadline than
    // all others, queued after the recovery, must still go last.
    tokio::time::sleep_until(recovered.into()).await;
    ids.push(submit_with_timeout(&server, 900).await);
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |m| (m.len() == 5).then_some(()),
        WAIT + outage,
    )
    .await
    .expect("all posted");
    let posts: Vec<_> = fake
        .calls_matching("POST /channels/20/messages")
        .into_iter()
        .filter(|c| c.status == 200)
        .collect();
    assert_eq!(posts.len(), 5);
    let failed = fake
        .calls_matching("POST /channels/20/messages")
        .iter()
        .filter(|c| c.status == 503)
        .count();
    assert!(failed >= 1, "the outage was seen");
    let last = posts.iter().map(|c| c.at).max().unwrap();
    let after = last.saturating_duration_since(recovered);
    eprintln!(
        "outage {outage:?}: last card posted {after:?} after recovery, {failed} failed calls"
    );
    assert!(
        after < Duration::from_millis(1800),
        "cards posted {after:?} after recovery (pause bound 1 s)"
    );
    let posted: Vec<String> = fake
        .messages_in(APPROVALS_CHANNEL_ID)
        .iter()
        .map(request_id_of)
        .collect();
    assert_eq!(posted, ids, "oldest deadline first across the outage");
    fake.assert_no_violations();
    server.stop_async().await;
}

/// Issue item 2: a flood of 200 cards follows the bucket headers and the
/// global limit: no 429 at all, oldest deadline first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_cards_draws_no_429_and_goes_oldest_deadline_first() {
    const N: u64 = 200;
    let fake = FakeDiscord::start(FakeDiscordConfig {
        // The bucket binds in a burst, the global limit after it.
        rate_limits: Some(FakeRateLimits {
            bucket_limit: 30,
            bucket_window: Duration::from_millis(500),
            global_per_sec: 50,
        }),
        ..FakeDiscordConfig::default()
    })
    .await;
    let cfg = config::discord(&fake.api_base());
    // Queue the flood with the bot off, deadlines in a scrambled order
    // 10 s apart (more than the whole submission takes).
    let no_bot = cfg.replace("token = \"fake-token\"", "token = \"\"");
    let mut quiet = spawn(&no_bot).await;
    let mut by_deadline = Vec::new();
    for i in 0..N {
        let slot = (i * 7) % N;
        let id = submit_with_timeout(&quiet, 300 + slot * 10).await;
        by_deadline.push((slot, id));
    }
    quiet.stop_async().await;
    by_deadline.sort();
    let expected: Vec<String> = by_deadline.into_iter().map(|(_, id)| id).collect();

    let started = Instant::now();
    let mut server = quiet;
    server.rewrite_config(&cfg);
    server.restart_async().await;
    fake.wait_for_messages(
        APPROVALS_CHANNEL_ID,
        |m| (m.len() == N as usize).then_some(()),
        Duration::from_secs(30),
    )
    .await
    .expect("all posted");
    let took = started.elapsed();
    let limited = fake.rate_limited_count();
    let any_429 = fake.calls().iter().filter(|c| c.status == 429).count();
    for c in fake.calls().iter().filter(|c| c.status == 429) {
        eprintln!("429: {} {} (call {})", c.method, c.path, c.index);
    }
    let posts = fake.calls_matching("POST /channels/20/messages");
    let first = posts.first().unwrap().at;
    let last = posts.last().unwrap().at;
    eprintln!(
        "{N} cards in {took:?} ({:?} from first to last post), 429s: {any_429}",
        last - first
    );
    assert_eq!(limited, 0, "the fake's limits were hit");
    assert_eq!(any_429, 0);
    assert_eq!(posts.len(), N as usize, "each card posted once");
    // Paced: 200 calls at <= 50/s take at least 3 s.
    assert!(last - first >= Duration::from_secs(3), "{:?}", last - first);
    let posted: Vec<String> = fake
        .messages_in(APPROVALS_CHANNEL_ID)
        .iter()
        .map(request_id_of)
        .collect();
    assert_eq!(posted, expected, "oldest deadline first");
    fake.assert_no_violations();
    server.stop_async().await;
}

/// Issue item 3: connection refused, 503s and silence at start leave the
/// socket served; the bot connects once Discord is back and posts the card
/// queued meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discord_outage_at_start_does_not_stop_serve() {
    // Connection refused: nothing listens on the port yet.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = format!("http://127.0.0.1:{port}");
    let mut server = spawn(&config_with(&base, "start_timeout = \"1s\"")).await;
    log_until(&server, |l| l.contains("DISCORD UNREACHABLE")).await;
    // The socket answers meanwhile.
    let id = submit_with_timeout(&server, 600).await;
    let fake = FakeDiscord::start(FakeDiscordConfig {
        port: Some(port),
        ..FakeDiscordConfig::default()
    })
    .await;
    fake.wait_ready(WAIT * 2)
        .await
        .expect("bot connected later");
    let card = fake
        .wait_for_messages(APPROVALS_CHANNEL_ID, |m| m.first().cloned(), WAIT)
        .await
        .expect("card");
    assert_eq!(request_id_of(&card), id);
    fake.assert_no_violations();
    server.stop_async().await;

    // 503s, then silence, at start.
    for mode in [OutageMode::Unavailable, OutageMode::Silence] {
        let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
        let recovered = fake.outage(Duration::from_secs(3), mode);
        let started = Instant::now();
        let mut server = spawn(&config_with(&fake.api_base(), "start_timeout = \"1s\"")).await;
        let up = started.elapsed();
        assert!(
            Instant::now() < recovered,
            "{mode:?}: serve waited for Discord ({up:?})"
        );
        log_until(&server, |l| l.contains("DISCORD UNREACHABLE")).await;
        let id = submit_with_timeout(&server, 600).await;
        fake.wait_ready(WAIT).await.expect("bot connected later");
        let card = fake
            .wait_for_messages(APPROVALS_CHANNEL_ID, |m| m.first().cloned(), WAIT)
            .await
            .expect("card");
        assert_eq!(request_id_of(&card), id);
        eprintln!("{mode:?}: socket up {up:?} after start");
        fake.assert_no_violations();
        server.stop_async().await;
    }
}

/// Issue item 3: permanent errors are found at start and make `serve` exit
/// with a message naming the cause, leaving no socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_discord_errors_make_serve_exit() {
    let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
    let base = fake.api_base();
    let cases = [
        (
            config::discord(&base).replace("fake-token", "wrong-token"),
            "401",
        ),
        (
            config::discord(&base)
                .replace("approvals_channel_id = 20", "approvals_channel_id = 999"),
            "approvals_channel_id 999",
        ),
        (
            config::discord(&base).replace("guild_id = 10", "guild_id = 999"),
            "guild_id 999",
        ),
    ];
    for (cfg, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let err = match Launch::new(dir, cfg).try_start_async().await {
            Ok(_) => panic!("serve started ({needle})"),
            Err(e) => e,
        };
        assert!(!err.status.expect("exited").success());
        assert!(err.log.contains(needle), "{needle}: {}", err.log);
        assert!(!err.dir.path().join("k.sock").exists());
    }
    fake.take_violations();

    // The bot may not post in the channel.
    let mut fc = FakeDiscordConfig::default();
    for r in &mut fc.roles {
        r.permissions &= !(perm::SEND_MESSAGES | perm::EMBED_LINKS);
    }
    let fake = FakeDiscord::start(fc).await;
    let dir = tempfile::tempdir().unwrap();
    let err = match Launch::new(dir, config::discord(&fake.api_base()))
        .try_start_async()
        .await
    {
        Ok(_) => panic!("serve started without permission to post"),
        Err(e) => e,
    };
    assert!(!err.status.expect("exited").success());
    assert!(err.log.contains("lacks permissions"), "{}", err.log);
    assert!(
        err.log.contains("SEND_MESSAGES") || err.log.contains("Send Messages"),
        "{}",
        err.log
    );
}

/// `keyturn health` on this server's agent socket: (exit code, JSON).
fn health(server: &Server) -> (Option<i32>, serde_json::Value) {
    let out = std::process::Command::new(harness::BIN)
        .args(["health", "--json", "--socket"])
        .arg(server.socket())
        .output()
        .expect("run keyturn health");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.code(), v)
}

/// A plain HTTP/1.1 GET on the metrics listener: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// Health and metrics item: with Discord configured but unreachable, serve
/// keeps serving while `keyturn health` exits 1 and `/healthz` answers 503,
/// both naming Discord; once Discord is back, both say healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_an_unreachable_discord_and_its_recovery() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = format!("http://127.0.0.1:{port}");
    let cfg = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        config_with(&base, "start_timeout = \"1s\"")
    );
    let mut server = spawn(&cfg).await;
    let log = log_until(&server, |l| {
        l.contains("DISCORD UNREACHABLE") && l.contains("metrics listening on http://")
    })
    .await;
    let addr = log
        .split("metrics listening on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("metrics address in the log")
        .to_string();

    let (code, v) = health(&server);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["down"], json!(["discord"]));
    assert_eq!(v["discord"]["state"], "connecting");
    assert_eq!(v["store"]["up"], true);
    // The agent socket says what is down, not why.
    assert!(v["discord"].get("detail").is_none(), "{v}");
    let (status, body) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || http_get(&addr, "/healthz")
    })
    .await
    .unwrap();
    assert_eq!(status, 503, "{body}");
    let hv: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(hv["down"], json!(["discord"]));
    let (status, text) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || http_get(&addr, "/metrics")
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert!(
        text.contains("keyturn_discord_state{state=\"connecting\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("keyturn_discord_state{state=\"connected\"} 0"),
        "{text}"
    );
    // The socket answers meanwhile, and its card waits in the outbox (the
    // card row follows the request's commit: polled, with a deadline).
    submit_with_timeout(&server, 600).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, text) = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || http_get(&addr, "/metrics")
        })
        .await
        .unwrap();
        if text.contains("keyturn_discord_outbox_backlog 1\n") {
            break;
        }
        assert!(Instant::now() < deadline, "no card in the backlog:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Discord comes back.
    let fake = FakeDiscord::start(FakeDiscordConfig {
        port: Some(port),
        ..FakeDiscordConfig::default()
    })
    .await;
    fake.wait_ready(WAIT * 2)
        .await
        .expect("bot connected later");
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, v) = health(&server);
        if code == Some(0) {
            assert_eq!(v["discord"]["state"], "connected");
            break;
        }
        assert!(Instant::now() < deadline, "still unhealthy: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = tokio::task::spawn_blocking(move || http_get(&addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    fake.assert_no_violations();
    server.stop_async().await;
}
