//! `keyturn bench`: measures the gateway over its real socket.
//!
//! Starts an in-process server on a temporary directory, then:
//! 1. N concurrent clients submit calls the policy decides alone (half
//!    allowed low-risk, half denied not-allowed); every one is committed to
//!    the audit log before its reply. Reports throughput and latency.
//! 2. Approval wake-up: an agent waits on a pending request, an admin
//!    approves; reports the time from the approval's reply (its commit) to
//!    the agent receiving the decision.
//! 3. With `--replicas N` on PostgreSQL: N servers on the same schema; the
//!    load spread over them, an agent on one woken by an approval through
//!    another, and the time until another leads once the leader stops.

use crate::config::Config;
use crate::ipc::client::Client;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct BenchOptions {
    /// The store to measure: `None` for a SQLite file in the bench's temp
    /// directory; a `postgres://` URL runs in a schema of the bench's own
    /// (`keyturn_bench_<pid>`), dropped at the end.
    pub store: Option<String>,
    pub clients: usize,
    pub seconds: u64,
    pub wakeups: usize,
    /// Pending requests to create, then reload and expire after a restart.
    pub pending: usize,
    /// With a PostgreSQL store: then run this many replicas on it (2 or
    /// more) and measure the load spread over them, the wake-up of an
    /// agent on one by an approval through another, and the leader's
    /// takeover.
    pub replicas: usize,
    /// Then time this many runs of an allowed `/bin/true` each way: `run`
    /// through bubblewrap, `run` with the `host` profile, and `keyturn
    /// exec` (the agent runs it itself), interleaved.
    pub runs: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(o: BenchOptions) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let (store, schema) = match o.store.as_deref() {
        None => (format!("sqlite://{}", dir.join("bench.db").display()), None),
        Some(url) if url.starts_with("sqlite:") => (url.to_string(), None),
        Some(url) => {
            let schema = format!("keyturn_bench_{}", std::process::id());
            let sep = if url.contains('?') { '&' } else { '?' };
            (
                format!("{url}{sep}options=-c%20search_path%3D{schema}"),
                Some(schema),
            )
        }
    };
    let ran = run_on(&o, &dir, &store).await;
    if schema.is_some() {
        if let Err(e) = crate::serve::drop_store_schema(&store).await {
            eprintln!("keyturn bench: could not drop its schema: {e:#}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    ran
}

/// The bench server's config on `store`, its sockets named after `name`
/// in `dir` (each replica has its own).
fn config_text(dir: &std::path::Path, store: &str, name: &str) -> String {
    format!(
        r#"
[server]
socket_path = "{sock}"
max_connections = 1024
max_connections_per_uid = 1024
[store]
url = {store}
[admin]
socket_path = "{admin_sock}"
# The bench's agents and its approver are this one process.
single_user_demo = true
[[agents]]
name = "bench"
max_pending = 1000000
[[tools]]
name = "fast_read"
risk = "low"
[[tools]]
name = "gated"
risk = "high"
[[grants]]
scope = "global"
tool = "fast_read"
[[grants]]
scope = "global"
tool = "gated"
"#,
        sock = dir.join(format!("{name}.sock")).display(),
        admin_sock = dir.join(format!("{name}-admin.sock")).display(),
        store = toml::Value::String(store.to_string()),
    )
}

async fn run_on(o: &BenchOptions, dir: &std::path::Path, store: &str) -> anyhow::Result<()> {
    let text = config_text(dir, store, "bench");
    let cfg = Config::parse(&text).map_err(anyhow::Error::msg)?;
    cfg.validate()?;
    println!("== store: {}", crate::serve::store_name(&cfg));
    let sock = cfg.server.socket_path.clone();
    let admin_sock = cfg.admin.socket_path.clone();
    let (stop, server) = start(&text).await?;

    println!("== policy-decided calls: {} clients for {} s (each committed to the audit log before its reply)", o.clients, o.seconds);
    policy_load(std::slice::from_ref(&sock), o.clients, o.seconds).await?;

    println!("== approval wake-up: {} rounds", o.wakeups);
    let mut admin = Client::connect(&admin_sock).await?;
    let mut after_commit = Vec::new();
    let mut end_to_end = Vec::new();
    for _ in 0..o.wakeups {
        let r = admin
            .call(
                "submit",
                json!({"agent": "bench", "tool": "gated", "args": {}}),
            )
            .await?;
        let id = r["request_id"].as_str().unwrap_or_default().to_string();
        let mut agent = Client::connect(&sock).await?;
        let wid = id.clone();
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let v = agent
                .call("wait", json!({"agent": "bench", "id": wid}))
                .await;
            let _ = got_tx.send((Instant::now(), v));
        });
        // Give the waiter time to register (this is a benchmark, not a test).
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t0 = Instant::now();
        admin.call("approve", json!({"id": id})).await?;
        let t1 = Instant::now();
        let (t2, v) = got_rx.await?;
        anyhow::ensure!(v?["state"] == "approved", "waiter did not see the approval");
        after_commit.push(t2.saturating_duration_since(t1));
        end_to_end.push(t2 - t0);
    }
    after_commit.sort();
    end_to_end.sort();
    println!(
        "approve sent -> agent has decision: p50 {}  p99 {}  max {}",
        ms(percentile(&end_to_end, 0.5)),
        ms(percentile(&end_to_end, 0.99)),
        ms(*end_to_end.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "approve committed (reply received) -> agent has decision: p50 {}  p99 {}  max {}",
        ms(percentile(&after_commit, 0.5)),
        ms(percentile(&after_commit, 0.99)),
        ms(*after_commit.last().unwrap_or(&Duration::ZERO))
    );
    stop.cancel();
    server.await??;

    if o.replicas >= 2 {
        replicas_phase(o, dir, store).await?;
    }
    if o.pending > 0 {
        pending_phase(&text, &sock, &admin_sock, o.pending, o.clients).await?;
    }
    if o.runs > 0 {
        runs_phase(dir, store, o.runs).await?;
    }
    Ok(())
}

/// The sandbox's cost: `/bin/true`, allowed by the policy, run `n` times
/// each way, interleaved so the machine's noise falls on all alike. First
/// over one socket connection (the gateway's own cost), then as whole
/// `keyturn run` / `keyturn exec` commands (what an agent sees).
async fn runs_phase(dir: &std::path::Path, store: &str, n: usize) -> anyhow::Result<()> {
    let text = format!(
        "{}\n{}",
        config_text(dir, store, "runs"),
        r#"
[[tools]]
name = "true_bwrap"
risk = "low"
[tools.run]
argv = ["/bin/true"]
[[tools]]
name = "true_host"
risk = "low"
[tools.run]
argv = ["/bin/true"]
profile = "host"
writable = ["/tmp"]
[[tools]]
name = "true_exec"
risk = "low"
[[grants]]
scope = "global"
tool = "true_*"
"#
    );
    let cfg = Config::parse(&text).map_err(anyhow::Error::msg)?;
    cfg.validate()?;
    let sock = cfg.server.socket_path.clone();
    let (stop, server) = start(&text).await?;
    println!("== runs of an allowed /bin/true: {n} each way, interleaved");
    let mut client = Client::connect(&sock).await?;
    let mut socket_lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut cli_lat: [Vec<Duration>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let exe = std::env::current_exe()?;
    for _ in 0..n {
        for (i, tool) in ["true_bwrap", "true_host"].into_iter().enumerate() {
            let t0 = Instant::now();
            let v = client
                .call("run", json!({"agent": "bench", "tool": tool, "args": {}}))
                .await?;
            socket_lat[i].push(t0.elapsed());
            anyhow::ensure!(v["run"]["exit_code"] == 0, "{tool} did not run: {}", v);
        }
        for (i, (sub, args)) in [
            ("run", vec!["--tool", "true_bwrap"]),
            ("run", vec!["--tool", "true_host"]),
            ("exec", vec!["--tool", "true_exec", "--", "/bin/true"]),
        ]
        .into_iter()
        .enumerate()
        {
            let t0 = Instant::now();
            let st = tokio::process::Command::new(&exe)
                .arg(sub)
                .arg("--socket")
                .arg(&sock)
                .args(["--agent", "bench"])
                .args(&args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .status()
                .await?;
            cli_lat[i].push(t0.elapsed());
            anyhow::ensure!(
                st.success(),
                "keyturn {sub} {} failed: {st}",
                args.join(" ")
            );
        }
    }
    let line = |what: &str, v: &mut Vec<Duration>| {
        v.sort();
        println!(
            "{what:<44} median {}  p99 {}",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99))
        );
    };
    line("run over the socket, bubblewrap:", &mut socket_lat[0]);
    line("run over the socket, host profile:", &mut socket_lat[1]);
    line("keyturn run (a command), bubblewrap:", &mut cli_lat[0]);
    line("keyturn run (a command), host profile:", &mut cli_lat[1]);
    line(
        "keyturn exec -- /bin/true (agent runs it):",
        &mut cli_lat[2],
    );
    stop.cancel();
    server.await??;
    Ok(())
}

/// `clients` concurrent clients (spread over `socks`, one replica each)
/// submit calls the policy decides alone for `seconds`; prints throughput
/// and latency.
async fn policy_load(
    socks: &[std::path::PathBuf],
    clients: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let sock = socks[c % socks.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&sock).await?;
            let mut lat = Vec::with_capacity(100_000);
            let mut i = 0u64;
            while Instant::now() < until {
                let tool = if i % 2 == 0 {
                    "fast_read"
                } else {
                    "not_allowed"
                };
                let t = Instant::now();
                let v = client
                    .call(
                        "submit",
                        json!({"agent": "bench", "tool": tool, "args": {"client": c, "i": i}}),
                    )
                    .await?;
                lat.push(t.elapsed());
                anyhow::ensure!(
                    v["state"] == if i % 2 == 0 { "approved" } else { "denied" },
                    "unexpected {v}"
                );
                i += 1;
            }
            anyhow::Ok(lat)
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed();
    all.sort();
    println!(
        "calls: {}  throughput: {:.0}/s",
        all.len(),
        all.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        ms(percentile(&all, 0.5)),
        ms(percentile(&all, 0.9)),
        ms(percentile(&all, 0.99)),
        ms(percentile(&all, 0.999)),
        ms(*all.last().unwrap_or(&Duration::ZERO))
    );
    Ok(())
}

/// Several replicas on one PostgreSQL schema (in this process, each with
/// its own store, sockets and leadership connection, as separate processes
/// would have).
async fn replicas_phase(
    o: &BenchOptions,
    dir: &std::path::Path,
    store: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        store.starts_with("postgres"),
        "--replicas needs a postgres:// --store (a SQLite file has one process)"
    );
    let n = o.replicas;
    println!("== {n} replicas on one database");
    let mut replicas = Vec::new();
    for r in 0..n {
        let text = config_text(dir, store, &format!("replica{r}"));
        let cfg = Config::parse(&text).map_err(anyhow::Error::msg)?;
        let (stop, server) = start(&text).await?;
        replicas.push((cfg.server.socket_path, cfg.admin.socket_path, stop, server));
    }
    let socks: Vec<_> = replicas.iter().map(|r| r.0.clone()).collect();
    println!(
        "policy-decided calls: {} clients spread over {n} replicas for {} s",
        o.clients, o.seconds
    );
    policy_load(&socks, o.clients, o.seconds).await?;

    println!("approval wake-up across replicas: {} rounds (agent on replica 0, approval through replica 1)", o.wakeups);
    let mut admin = Client::connect(&replicas[1].1).await?;
    let mut watch = Client::connect(&replicas[0].1).await?;
    let mut after_commit = Vec::new();
    for _ in 0..o.wakeups {
        let r = watch
            .call(
                "submit",
                json!({"agent": "bench", "tool": "gated", "args": {}, "wait": false}),
            )
            .await?;
        let id = r["request_id"].as_str().unwrap_or_default().to_string();
        let mut agent = Client::connect(&replicas[0].0).await?;
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        let wid = id.clone();
        tokio::spawn(async move {
            let v = agent
                .call("wait", json!({"agent": "bench", "id": wid}))
                .await;
            let _ = got_tx.send((Instant::now(), v));
        });
        // Approve only once the agent waits on replica 0.
        while watch.call("stats", json!({})).await?["waiting"] != 1 {
            tokio::task::yield_now().await;
        }
        admin.call("approve", json!({"id": id})).await?;
        let t1 = Instant::now();
        let (t2, v) = got_rx.await?;
        anyhow::ensure!(v?["state"] == "approved", "waiter did not see the approval");
        after_commit.push(t2.saturating_duration_since(t1));
    }
    after_commit.sort();
    println!(
        "approve committed on replica 1 -> agent on replica 0 has decision: p50 {}  p90 {}  p99 {}  max {}",
        ms(percentile(&after_commit, 0.5)),
        ms(percentile(&after_commit, 0.9)),
        ms(percentile(&after_commit, 0.99)),
        ms(*after_commit.last().unwrap_or(&Duration::ZERO))
    );

    let leader = match leader_of(&replicas).await? {
        Some(i) => i,
        None => anyhow::bail!("no replica leads"),
    };
    let (_, _, stop, server) = replicas.remove(leader);
    let t0 = Instant::now();
    stop.cancel();
    let deadline = t0 + Duration::from_secs(30);
    let next = loop {
        if let Some(i) = leader_of(&replicas).await? {
            break i;
        }
        anyhow::ensure!(Instant::now() < deadline, "nobody took over within 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!(
        "leader (replica {leader}) told to stop -> replica {} leads: {}",
        if next >= leader { next + 1 } else { next },
        ms(t0.elapsed()),
    );
    server.await??;
    for (_, _, stop, server) in replicas {
        stop.cancel();
        server.await??;
    }
    Ok(())
}

/// The index of the replica whose health says it leads, if one does.
async fn leader_of(
    replicas: &[(
        std::path::PathBuf,
        std::path::PathBuf,
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )],
) -> anyhow::Result<Option<usize>> {
    for (i, r) in replicas.iter().enumerate() {
        let mut c = Client::connect(&r.1).await?;
        if c.call("health", json!({})).await?["role"] == "leader" {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Starts the server on `text`'s config; returns its stop token and task.
async fn start(
    text: &str,
) -> anyhow::Result<(
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let cfg = Config::parse(text).map_err(anyhow::Error::msg)?;
    let stop = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(crate::serve::run_until(cfg, stop.clone(), Some(ready_tx)));
    ready_rx.await?;
    Ok((stop, server))
}

/// Many pending requests: create them, restart, and time the reload and
/// the expiry of every one (their deadline passes while the server is down).
async fn pending_phase(
    text: &str,
    sock: &std::path::Path,
    admin_sock: &std::path::Path,
    n: usize,
    clients: usize,
) -> anyhow::Result<()> {
    println!("== {n} pending requests: create, restart, expire");
    let (stop, server) = start(text).await?;
    let t = Instant::now();
    // Every deadline falls shortly after creation should end, so they pass
    // while the server is down (assuming at least 2,000 creations a second).
    let target = crate::app::now_ms() + (n as i64 / 2) + 5_000;
    let per = n.div_ceil(clients);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let sock = sock.to_path_buf();
        let count = per.min(n.saturating_sub(c * per));
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&sock).await?;
            for _ in 0..count {
                let secs = ((target - crate::app::now_ms()) / 1000).max(1);
                client
                    .call("submit", json!({"agent": "bench", "tool": "gated", "args": {}, "timeout_secs": secs}))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!("created {n} pending in {:.2} s", t.elapsed().as_secs_f64());
    let mut admin = Client::connect(admin_sock).await?;
    let still = admin.call("stats", json!({})).await?["pending"]
        .as_u64()
        .unwrap_or(0);
    stop.cancel();
    server.await??;
    // Stay down past every deadline.
    let wait_ms = (target - crate::app::now_ms() + 1_000).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let t = Instant::now();
    let (stop, server) = start(text).await?;
    println!(
        "{still} were pending at shutdown; restart to ready: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let mut admin = Client::connect(admin_sock).await?;
    loop {
        let left = admin.call("stats", json!({})).await?["pending"]
            .as_u64()
            .unwrap_or(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "all {still} overdue requests timed out {:.2} s after the restart began",
        t.elapsed().as_secs_f64()
    );
    stop.cancel();
    server.await??;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let base = std::env::temp_dir().join(format!("keyturn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(base)
}
