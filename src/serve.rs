//! `keyturn serve`: wire the store, the gateway, the scheduler and the two
//! sockets (agent and admin) together, and shut them down in order.
//!
//! When several processes share the store, only the one that leads runs
//! the Discord bot, the card outbox, the deadline sweep and retention
//! (started when it wins leadership, cancelled the moment it loses it);
//! every process serves both sockets in full.
//!
//! With `src/main.rs`, the composition root: the one place outside
//! `src/store` that names the store adapter (opening it for `serve`,
//! `init` and `db check`); everything else reaches persistence through the
//! app's ports.

use crate::app::connection::ConnectionStatus;
use crate::app::health::{role, HealthProbe};
use crate::app::now_ms;
use crate::app::ports::Store;
use crate::app::{retention, scheduler, Gateway};
use crate::config::Config;
use crate::ipc::handler::Handler;
use crate::ipc::server::{self, SocketOptions};
use crate::ipc::tcp;
use crate::store::check;
use crate::store::files::{self, Access, Create};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Runs until SIGINT or SIGTERM (a second signal exits at once); SIGHUP is
/// ignored (logged).
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let hup = spawn_signal_handler(stop.clone());
    run_inner(cfg, stop, None, Some((None, hup))).await
}

/// Like [`run`], and SIGHUP re-reads `path` and applies what can be applied
/// while running: config grants, tool risks, agents' tokens and uids, and
/// the log level. A file that does not load changes nothing.
pub async fn run_reloading(cfg: Config, path: PathBuf) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let hup = spawn_signal_handler(stop.clone());
    run_inner(cfg, stop, None, Some((Some(path), hup))).await
}

/// Runs until `stop` is cancelled. `ready` is told once the socket accepts.
pub async fn run_until(
    cfg: Config,
    stop: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<()> {
    run_inner(cfg, stop, ready, None).await
}

async fn run_inner(
    cfg: Config,
    stop: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
    reload: Option<(Option<PathBuf>, mpsc::Receiver<()>)>,
) -> anyhow::Result<()> {
    let uid = nix::unistd::getuid().as_raw();
    // Before anything is opened: a config where agents would be admins (or
    // could open the database) does not start.
    cfg.check_uids(uid)?;
    if cfg.admin.single_user_demo {
        tracing::warn!("{}", crate::config::SINGLE_USER_DEMO_WARNING);
    }
    let cfg = Arc::new(cfg);
    let store = open_store(&cfg, Create::IfNeverExisted).await?;
    let gw = Gateway::new(cfg.clone(), store.clone(), uid)
        .await
        .context("while loading the policy")?;
    start_runner(&cfg, &gw, &stop).await?;
    // Bound before anything else listens, so a taken port fails the start
    // with nothing left behind.
    let monitor_listener = match cfg.metrics.listen_addr()? {
        Some(addr) => Some(crate::monitor::bind(addr).await?),
        None => None,
    };
    // The TCP listener's certificate and key are read now: an unreadable
    // or invalid one fails the start, naming the key.
    let tcp_listener = match cfg.tcp.listener()? {
        Some((addr, files)) => {
            let tls = files.as_ref().map(tcp::load_tls).transpose()?;
            Some((tcp::bind(addr).await?, tls))
        }
        None => None,
    };

    // Only the process that leads those sharing the store runs the Discord
    // bot (with the card outbox), the deadline sweep and retention; a store
    // one process uses always leads. Its first answer is awaited briefly,
    // so a leader starts the bot before the socket is bound, like a lone
    // process: a bad token, an unknown channel or missing permissions then
    // fail `serve` at once, leaving nothing behind. An unreachable Discord
    // does not: the bot keeps connecting in the background and
    // `discord_status` shows where it stands.
    let mut lead = gw.leadership();
    let leading = first_answer(&mut lead).await;
    tracing::info!(
        role = role(leading),
        "{}",
        if leading {
            "this process leads"
        } else {
            "another process leads; this one follows"
        }
    );
    // Read by health reports and metrics; kept across the bot's restarts.
    let discord_status = cfg
        .discord_enabled()
        .then(|| ConnectionStatus::new(now_ms()));
    let bot = match &discord_status {
        Some(status) if leading => Some(
            crate::discord::start(gw.clone(), &stop, status.clone())
                .await
                .context("while starting the Discord bot")?,
        ),
        Some(status) => {
            status.standby(now_ms());
            None
        }
        None => None,
    };

    let opts = SocketOptions {
        path: cfg.server.socket_path.clone(),
        admin: false,
        mode: cfg.socket_mode()?,
        group: cfg.server.socket_group.clone(),
        max_connections: cfg.server.max_connections,
        max_line_bytes: cfg.server.max_line_bytes,
        max_inflight: cfg.server.max_inflight_per_connection,
        max_connections_per_uid: cfg.server.max_connections_per_uid,
        max_inflight_bytes_per_connection: cfg.server.max_inflight_bytes_per_connection,
        max_inflight_bytes: cfg.server.max_inflight_bytes,
        idle_timeout: cfg.server.idle_timeout.0,
        shutdown_drain: cfg.server.shutdown_drain.0,
    };
    // The admin socket shares the agent socket's limits; only its path,
    // mode and group are its own.
    let admin_opts = SocketOptions {
        path: cfg.admin.socket_path.clone(),
        admin: true,
        mode: cfg.admin_socket_mode()?,
        group: cfg.admin.socket_group.clone(),
        ..opts.clone()
    };
    let admin_listener = server::bind(&admin_opts).await?;
    let listener = match server::bind(&opts).await {
        Ok(l) => l,
        Err(e) => {
            // Leave nothing behind.
            drop(admin_listener);
            let _ = std::fs::remove_file(&admin_opts.path);
            return Err(e.into());
        }
    };

    // The scheduler and retention outlive the sockets' drain: a request's
    // deadline still expires it while calls in flight finish.
    let background = CancellationToken::new();
    let duties = tokio::spawn(follow_leadership(
        Leading {
            gw: gw.clone(),
            status: discord_status.clone(),
            stop: stop.clone(),
            background: background.clone(),
        },
        lead,
        leading.then(|| Duties::start(&gw, &background, bot)),
    ));

    tracing::info!(
        socket = %opts.path.display(),
        admin_socket = %admin_opts.path.display(),
        store = %store_name(&cfg),
        "keyturn is ready"
    );
    if let Some((path, hup)) = reload {
        tokio::spawn(reload_on_hup(gw.clone(), path, hup));
    }
    // A line on stdout that scripts and tests can wait for; a closed stdout
    // does not stop the daemon.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Some((l, tls)) = &tcp_listener {
            let addr = l
                .local_addr()
                .context("while reading the TCP listener's address")?;
            let scheme = if tls.is_some() {
                "keyturn+tls"
            } else {
                "keyturn+tcp"
            };
            tracing::info!(%addr, tls = tls.is_some(), "agents may connect over TCP");
            let _ = writeln!(out, "keyturn: tcp on {scheme}://{addr}");
        }
        let _ = writeln!(out, "keyturn: listening on {}", opts.path.display());
        let _ = out.flush();
    }
    if let Some(r) = ready {
        let _ = r.send(());
    }

    let monitor = match monitor_listener {
        Some(l) => {
            let addr = l
                .local_addr()
                .context("while reading the metrics address")?;
            tracing::info!(%addr, "health and metrics listening on http://{addr}/healthz and /metrics");
            {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "keyturn: metrics on http://{addr}");
                let _ = out.flush();
            }
            let m = crate::monitor::Monitor {
                gw: gw.clone(),
                probe: HealthProbe::new(gw.clone(), discord_status.clone()),
                discord: discord_status.clone(),
                socket_path: opts.path.clone(),
            };
            Some(tokio::spawn(crate::monitor::serve(l, m, stop.clone())))
        }
        None => None,
    };

    let handler = Arc::new(Handler::new(gw.clone()).with_discord(discord_status));
    let tcp_served = async {
        let Some((l, tls)) = tcp_listener else { return };
        let Ok(addr) = l.local_addr() else { return };
        let t = tcp::TcpOptions {
            addr,
            tls,
            max_connections_per_ip: cfg.tcp.max_connections_per_ip,
            socket: opts.clone(),
        };
        tcp::serve(l, t, handler.clone(), stop.clone()).await
    };
    tokio::join!(
        server::serve(listener, opts.clone(), handler.clone(), stop.clone()),
        server::serve(admin_listener, admin_opts, handler.clone(), stop.clone()),
        tcp_served,
    );
    stop.cancel();
    background.cancel();
    let _ = duties.await;
    if let Some(m) = monitor {
        let _ = m.await;
    }
    store.close().await;
    tracing::info!("stopped; pending requests stay pending in the store");
    Ok(())
}

/// How long `serve` waits at start for the store to say whether this
/// process leads.
const FIRST_ANSWER: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether this process leads, once the store has first said so (or
/// [`FIRST_ANSWER`] passed).
async fn first_answer(lead: &mut watch::Receiver<bool>) -> bool {
    if *lead.borrow_and_update() {
        return true;
    }
    let _ = tokio::time::timeout(FIRST_ANSWER, lead.changed()).await;
    *lead.borrow_and_update()
}

/// What only the leader runs, while it leads.
struct Duties {
    stop: CancellationToken,
    sched: JoinHandle<()>,
    retention: JoinHandle<()>,
    bot: Option<crate::discord::Bot>,
}

impl Duties {
    fn start(
        gw: &Arc<Gateway>,
        background: &CancellationToken,
        bot: Option<crate::discord::Bot>,
    ) -> Duties {
        let stop = background.child_token();
        Duties {
            sched: tokio::spawn(scheduler::run(gw.clone(), stop.clone())),
            retention: tokio::spawn(retention::run(gw.clone(), stop.clone())),
            bot,
            stop,
        }
    }

    /// Cancels everything at once (nothing more is posted, timed out or
    /// pruned from here on), then waits for the tasks to end.
    async fn stop(self) {
        self.stop.cancel();
        if let Some(bot) = self.bot {
            bot.shutdown().await;
        }
        let _ = self.sched.await;
        let _ = self.retention.await;
    }
}

/// What starting the leader's duties needs.
struct Leading {
    gw: Arc<Gateway>,
    /// The Discord connection's state, when Discord is configured.
    status: Option<ConnectionStatus>,
    /// `serve`'s stop: the bot stops with the sockets.
    stop: CancellationToken,
    /// Cancelled after the sockets drained: the end of every duty.
    background: CancellationToken,
}

/// Starts the leader's duties when leadership is won, cancels them the
/// moment it is lost, and starts them again when it is won again, until
/// `serve` stops.
async fn follow_leadership(l: Leading, mut lead: watch::Receiver<bool>, first: Option<Duties>) {
    let mut duties = first;
    loop {
        let changed = tokio::select! {
            _ = l.background.cancelled() => break,
            c = lead.changed() => c,
        };
        if changed.is_err() {
            // Leadership never changes any more (a store one process uses).
            l.background.cancelled().await;
            break;
        }
        let leading = *lead.borrow_and_update();
        if leading == duties.is_some() {
            continue;
        }
        if leading {
            tracing::info!(role = role(true), "leadership won: starting the deadline sweep, retention and (when configured) the Discord bot and card outbox");
            let bot = match &l.status {
                Some(status) => {
                    match crate::discord::start(l.gw.clone(), &l.stop, status.clone()).await {
                        Ok(bot) => Some(bot),
                        Err(e) => {
                            // The bot cannot start here (its checks refused
                            // the config): the rest of the duties still run.
                            tracing::error!(error = format!("{e:#}"), "THE DISCORD BOT CANNOT START on this leader; cards wait in the store");
                            status.failed(now_ms(), format!("{e:#}"));
                            None
                        }
                    }
                }
                None => None,
            };
            duties = Some(Duties::start(&l.gw, &l.background, bot));
        } else {
            tracing::info!(role = role(false), "leadership lost: the Discord bot, card outbox, deadline sweep and retention stop now");
            if let Some(d) = duties.take() {
                d.stop().await;
            }
            if let Some(status) = &l.status {
                status.standby(now_ms());
            }
            tracing::info!("the leader's duties have stopped here");
        }
    }
    if let Some(d) = duties.take() {
        d.stop().await;
    }
}

/// Opens the store with its files owner-only (or shared with `store.group`):
/// sets the process umask to match, refuses to create a database where one
/// existed (see [`crate::store::files`]), tightens modes that are too open.
pub async fn open_store(cfg: &Config, create: Create) -> anyhow::Result<Arc<dyn Store>> {
    let access = Access::new(cfg.store.group.as_deref())?;
    // Whatever this process creates from now on (the database's -wal and
    // -shm included) is no more open than the database itself.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(access.umask()));
    let db = cfg.store_path();
    if let Some(db) = &db {
        let p = files::prepare(db, access, create)?;
        for f in &p.fixed {
            tracing::warn!(file = %f, "database file was too open; fixed");
        }
        if p.created {
            tracing::info!(database = %db.display(), "created a new, empty database");
        }
        if let Some(m) = &p.marked {
            tracing::info!(
                marker = %m.display(),
                "wrote the marker that stops a later start from replacing this database with an empty one"
            );
        }
    }
    if let Some(db) = db.as_ref().filter(|d| has_content(d)) {
        // Before anything is loaded: a database with damaged pages would
        // start "ready", then fail to list or expire its pending requests.
        let r = check::check(&cfg.store.url, check::Depth::Quick, START_CHECK_LIMIT).await;
        if r.timed_out {
            tracing::warn!(
                database = %db.display(),
                "the start-up integrity check did not finish within {START_CHECK_LIMIT:?}; starting anyway (run `keyturn db check` for a full check)"
            );
        } else if !r.ok() {
            anyhow::bail!(
                "the database {} is damaged, so `serve` does not start on it: {}. \
                 Stop here: run `keyturn db check --config FILE` for the full report, \
                 then restore the database from a backup (or `keyturn init` to start over)",
                db.display(),
                r.problems.join("; ")
            );
        }
    }
    let store = crate::store::open(cfg)
        .await
        .with_context(|| format!("while opening the store {}", store_name(cfg)))?;
    if let Some(db) = &db {
        // The -wal and -shm SQLite just created carry the database's mode,
        // but this process's group: give them the store's group.
        for f in files::secure(db, access)? {
            tracing::debug!(file = %f, "database file adjusted");
        }
    }
    Ok(store)
}

/// `keyturn check-config`: the TCP listener's settings, and its certificate
/// and key read as `serve` reads them.
pub fn check_tcp(cfg: &Config) -> anyhow::Result<()> {
    if let Some((_, Some(files))) = cfg.tcp.listener()? {
        tcp::load_tls(&files)?;
    }
    Ok(())
}

/// The store's URL as errors and logs show it (without a password).
pub fn store_name(cfg: &Config) -> String {
    crate::store::redact_url(&cfg.store.url)
}

/// Whether the store is a PostgreSQL database (nothing on local disk).
pub fn is_postgres(cfg: &Config) -> bool {
    matches!(
        cfg.store.url.split_once("://").map(|(s, _)| s),
        Some("postgres" | "postgresql")
    )
}

/// `keyturn init`: creates the database (a SQLite file: refusing one that
/// exists or existed; PostgreSQL: the schema the URL names, if missing),
/// migrated and closed.
pub async fn init_store(cfg: &Config) -> anyhow::Result<()> {
    let store = open_store(cfg, Create::Fresh).await?;
    store.close().await;
    Ok(())
}

/// Drops the schema a PostgreSQL store URL's `search_path` names, with
/// everything in it (`keyturn bench` cleaning up its own schema).
pub async fn drop_store_schema(url: &str) -> anyhow::Result<()> {
    crate::store::postgres::drop_schema(url)
        .await
        .with_context(|| {
            format!(
                "while dropping the schema of {}",
                crate::store::redact_url(url)
            )
        })
}

/// `keyturn db check`: the full integrity check, however long it takes
/// (PostgreSQL: migrations applied, every pending row readable).
pub async fn check_store(cfg: &Config) -> check::Report {
    if is_postgres(cfg) {
        return crate::store::postgres::check(&cfg.store.url).await;
    }
    check::check(
        &cfg.store.url,
        check::Depth::Full,
        std::time::Duration::from_secs(24 * 3600),
    )
    .await
}

/// How long the start-up `quick_check` may take; a larger database starts
/// anyway, with a warning, and `keyturn db check` checks it in full.
pub const START_CHECK_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

fn has_content(db: &std::path::Path) -> bool {
    std::fs::metadata(db).map(|m| m.len() > 0).unwrap_or(false)
}

/// Fails when a tool runs in the bubblewrap sandbox and bubblewrap is
/// missing or cannot create the namespaces runs use: Keyturn never falls
/// back to running such a tool unsandboxed (`serve` and `check-config`).
pub fn check_run(cfg: &Config) -> anyhow::Result<()> {
    if cfg.uses_bwrap() {
        crate::sandbox::executor::probe(&cfg.run).map_err(|e| {
            anyhow::anyhow!(
                "a tool runs in the bubblewrap sandbox ([tools.run] profile \"bwrap\"), but {e}; \
                 Keyturn never runs it unsandboxed instead"
            )
        })?;
    }
    Ok(())
}

/// Gives the gateway what runs tools: the sandbox (probed first, see
/// [`check_run`]) and the credential broker (which follows its files), then
/// records runs a Keyturn process on this host left behind (a crash, a
/// SIGKILL) as interrupted, killing what is left of them.
async fn start_runner(
    cfg: &Arc<Config>,
    gw: &Arc<Gateway>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    check_run(cfg)?;
    let broker = Arc::new(crate::sandbox::credentials::Broker::load(&cfg.credentials));
    broker.spawn_watch(stop.clone());
    let hidden = cfg.paths_hidden_from_runs();
    let exe = std::env::current_exe()
        .context("while finding the keyturn binary (runs start through it)")?;
    let sandbox = crate::sandbox::executor::Sandbox::new(&cfg.run, exe, hidden.clone());
    sandbox.reap_orphans_from_now();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    gw.set_runner(crate::app::run::Runner::new(
        Arc::new(sandbox),
        broker,
        hidden,
        host,
        i64::from(std::process::id()),
        cfg.run.max_concurrent,
    ));
    match gw.recover_runs().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            runs = n,
            "runs interrupted by a previous keyturn process were recorded as interrupted"
        ),
        Err(e) => {
            tracing::error!(error = %e, "could not check for runs a previous keyturn process left")
        }
    }
    Ok(())
}

/// Applies what SIGHUP may change, once per signal (signals that arrive
/// during a reload are folded into the next one).
async fn reload_on_hup(gw: Arc<Gateway>, path: Option<PathBuf>, mut hup: mpsc::Receiver<()>) {
    while hup.recv().await.is_some() {
        // Credentials are re-read on every SIGHUP (rotation), whatever
        // becomes of the config file.
        gw.reload_credentials().await;
        tracing::info!("SIGHUP: credentials re-read from their sources");
        let Some(path) = &path else {
            tracing::info!("SIGHUP: nothing to reload (no config file); ignored");
            continue;
        };
        let cfg = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    config = %path.display(),
                    "SIGHUP: config not reloaded, nothing changed: {e}"
                );
                continue;
            }
        };
        // As at start: a file holding tokens that others can read is refused.
        match cfg.check_file_permissions(path) {
            Ok(Some(w)) => tracing::warn!("{w}"),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(
                    config = %path.display(),
                    "SIGHUP: config not reloaded, nothing changed: {e}"
                );
                continue;
            }
        }
        let level = cfg.log.level.clone();
        match gw.reload_config(cfg).await {
            Ok(what) => {
                let log = crate::logging::set_level(level.as_deref()).map_or_else(
                    |why| format!("log level {why}"),
                    |l| format!("log level {l}"),
                );
                tracing::info!(
                    config = %path.display(),
                    "SIGHUP: reloaded {what}; {log}; other settings need a restart"
                );
            }
            Err(e) => tracing::error!(
                config = %path.display(),
                "SIGHUP: config not reloaded, nothing changed: {e}"
            ),
        }
    }
}

/// SIGINT and SIGTERM cancel `stop` (a second one exits at once); SIGHUP is
/// passed on through the returned channel. The task never ends on its own:
/// its logging cannot fail (see [`crate::logging`]).
fn spawn_signal_handler(stop: CancellationToken) -> mpsc::Receiver<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::channel(1);
    let installed = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    );
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = installed else {
        tracing::error!("cannot install signal handlers");
        return rx;
    };
    tokio::spawn(async move {
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {
                    // Full means a reload is already due: it will read the
                    // file as it is now.
                    let _ = tx.try_send(());
                    continue;
                }
            }
            if stopping {
                std::process::exit(130);
            }
            stopping = true;
            tracing::info!("shutting down (send the signal again to exit at once)");
            stop.cancel();
        }
    });
    rx
}
