//! A real `keyturn serve` in a temp directory: started with a config text,
//! waited for on its ready line, its stdout and stderr read line by line
//! into one log that tests wait on (a condition variable for sync tests, a
//! `Notify` for async ones: never a sleep), killed or stopped and restarted
//! on the same directory and database.

use super::rpc;
use keyturn::ipc::client::{Client, ClientError};
use serde_json::{json, Value};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keyturn");

/// How long `serve` may take to print its ready line.
const START: Duration = Duration::from_secs(30);
/// How long [`Server::stop`] waits for the exit after SIGTERM.
const STOP: Duration = Duration::from_secs(20);

/// `keyturn serve --config CONFIG` as the harness runs it: debug logs of
/// the `keyturn` crate, no colour, no Discord token from the environment,
/// stdin closed. For tests that run it to completion (refusals at start).
pub fn serve_command(config: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["serve", "--config"])
        .arg(config)
        .env("KEYTURN_LOG", "keyturn=debug")
        .env("NO_COLOR", "1")
        .env_remove("KEYTURN_DISCORD_TOKEN")
        .stdin(Stdio::null());
    c
}

/// Where `serve`'s stderr goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stderr {
    /// Into the log with stdout (the default).
    Log,
    /// A pipe the test takes with [`Server::take_stderr`].
    Pipe,
    /// A pipe whose read end is already closed: every write fails (EPIPE).
    Closed,
    /// `/dev/null`.
    Null,
}

/// How to start a server: the directory (the server owns it from then on),
/// the config text written to `config.toml` there, environment changes and
/// where stderr goes. They hold for every restart.
pub struct Launch {
    dir: TempDir,
    text: String,
    env: Vec<(OsString, Option<OsString>)>,
    stderr: Stderr,
}

impl Launch {
    pub fn new(dir: TempDir, text: impl Into<String>) -> Launch {
        Launch {
            dir,
            text: text.into(),
            env: Vec::new(),
            stderr: Stderr::Log,
        }
    }

    /// Sets `key` in serve's environment (over the harness's own settings).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Launch {
        self.env
            .push((key.into(), Some(value.as_ref().to_os_string())));
        self
    }

    /// Removes `key` from serve's environment (also one the harness sets).
    pub fn env_remove(mut self, key: &str) -> Launch {
        self.env.push((key.into(), None));
        self
    }

    pub fn stderr(mut self, to: Stderr) -> Launch {
        self.stderr = to;
        self
    }

    /// Starts and waits for the ready line; panics with the log if `serve`
    /// does not come up.
    pub fn start(self) -> Server {
        self.try_start()
            .unwrap_or_else(|f| panic!("serve did not start: {:?}\n{}", f.status, f.log))
    }

    /// Starts and waits for the ready line, or reports why not.
    pub fn try_start(self) -> Result<Server, StartFailure> {
        let (s, from) = self.spawn();
        let up = s.log.wait(START, ready(from));
        s.started(up)
    }

    /// [`Launch::try_start`] for async tests: the wait does not block the
    /// runtime's thread.
    pub async fn try_start_async(self) -> Result<Server, StartFailure> {
        let (s, from) = self.spawn();
        let up = s.log.wait_async(START, ready(from)).await;
        s.started(up)
    }

    fn spawn(self) -> (Server, usize) {
        let config = self.dir.path().join("config.toml");
        super::config::write_config(&config, &self.text);
        let admin_socket = self.dir.path().join("keyturn-admin.sock");
        let mut s = Server {
            socket: self.dir.path().join("k.sock"),
            admin_socket,
            config,
            dir: self.dir,
            env: self.env,
            stderr_to: self.stderr,
            log: Arc::new(Log::default()),
            cursor: AtomicUsize::new(0),
            proc: None,
        };
        let from = s.spawn();
        (s, from)
    }
}

/// Why `serve` did not come up: its exit status (`None`: it was still
/// running at the deadline and was killed), its log (stdout and stderr),
/// and its directory, to look at what it left.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub log: String,
    pub dir: TempDir,
}

/// A running `keyturn serve`.
pub struct Server {
    pub dir: TempDir,
    /// The config file (`config.toml` in [`Server::dir`]).
    pub config: PathBuf,
    socket: PathBuf,
    admin_socket: PathBuf,
    env: Vec<(OsString, Option<OsString>)>,
    stderr_to: Stderr,
    log: Arc<Log>,
    /// Lines before this index were read by [`Server::wait_log`].
    cursor: AtomicUsize,
    proc: Option<Proc>,
}

/// The child process, killed when dropped.
struct Proc {
    child: Child,
    stderr: Option<ChildStderr>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ready line from the run whose first line is at `from`: the agent
/// socket's path, or `Err` once every pipe closed (the process ended).
fn ready(from: usize) -> impl FnMut(&LogState) -> Option<Result<(usize, PathBuf), ()>> {
    move |st| {
        for (i, l) in st.lines.iter().enumerate().skip(from) {
            if let Some(p) = l.strip_prefix("keyturn: listening on ") {
                return Some(Ok((i + 1, PathBuf::from(p.trim()))));
            }
        }
        (st.open == 0).then_some(Err(()))
    }
}

impl Server {
    /// The file-tools or coding-agent base config (a function of
    /// [`super::config`]) in a fresh temp dir, plus `extra`.
    pub fn start(base: fn(&Path, &str) -> String, extra: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = base(dir.path(), extra);
        Launch::new(dir, text).start()
    }

    /// `text` as the config, in `dir`.
    pub fn start_in(dir: TempDir, text: &str) -> Server {
        Launch::new(dir, text).start()
    }

    /// Spawns the process (its pipes read into the log); returns the index
    /// of its first log line.
    fn spawn(&mut self) -> usize {
        let mut cmd = serve_command(&self.config);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdout(Stdio::piped());
        match self.stderr_to {
            Stderr::Log | Stderr::Pipe => cmd.stderr(Stdio::piped()),
            Stderr::Null => cmd.stderr(Stdio::null()),
            Stderr::Closed => cmd.stderr(closed_pipe()),
        };
        let from = {
            let mut st = self.log.lock();
            st.open += if self.stderr_to == Stderr::Log { 2 } else { 1 };
            st.lines.len()
        };
        let mut child = cmd.spawn().expect("spawn keyturn serve");
        let out = child.stdout.take().expect("stdout");
        self.log.read(out);
        let mut stderr = None;
        if let Some(err) = child.stderr.take() {
            if self.stderr_to == Stderr::Log {
                self.log.read(err);
            } else {
                stderr = Some(err);
            }
        }
        self.proc = Some(Proc { child, stderr });
        from
    }

    fn started(mut self, up: Option<Result<(usize, PathBuf), ()>>) -> Result<Server, StartFailure> {
        match up {
            Some(Ok((next, socket))) => {
                self.socket = if socket.is_absolute() {
                    socket
                } else {
                    self.dir.path().join(socket)
                };
                self.cursor.store(next, Ordering::SeqCst);
                Ok(self)
            }
            Some(Err(())) => {
                let status = self.child().wait().ok();
                Err(StartFailure {
                    status,
                    log: self.log(),
                    dir: self.dir,
                })
            }
            None => {
                self.proc = None; // killed
                Err(StartFailure {
                    status: None,
                    log: self.log(),
                    dir: self.dir,
                })
            }
        }
    }

    fn child(&mut self) -> &mut Child {
        &mut self.proc.as_mut().expect("serve was started").child
    }

    /// The agent socket (from the ready line).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The admin socket: the default `[admin] socket_path`, beside the config.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("serve was started").child.id()
    }

    /// Serve's stderr, with [`Stderr::Pipe`].
    pub fn take_stderr(&mut self) -> ChildStderr {
        self.proc
            .as_mut()
            .and_then(|p| p.stderr.take())
            .expect("stderr is a pipe (Stderr::Pipe) not yet taken")
    }

    // ---- the log ----

    /// Everything serve wrote on stdout and stderr so far, every run.
    pub fn log(&self) -> String {
        let st = self.log.lock();
        let mut s = st.lines.join("\n");
        s.push('\n');
        s
    }

    /// Waits for the next log line (after those an earlier wait read)
    /// matching `pred` and returns it; `pred` sees each line once, in order.
    /// Panics at the deadline or if the server exits first.
    pub fn wait_log(&self, pred: impl FnMut(&str) -> bool, within: Duration) -> String {
        let found = self.log.wait(within, self.next_line(pred));
        self.found_line(found, within)
    }

    /// [`Server::wait_log`] for async tests.
    pub async fn wait_log_async(&self, pred: impl FnMut(&str) -> bool, within: Duration) -> String {
        let found = self.log.wait_async(within, self.next_line(pred)).await;
        self.found_line(found, within)
    }

    fn next_line<'a>(
        &'a self,
        mut pred: impl FnMut(&str) -> bool + 'a,
    ) -> impl FnMut(&LogState) -> Option<Result<String, ()>> + 'a {
        move |st| {
            let from = self.cursor.load(Ordering::SeqCst);
            for (i, l) in st.lines.iter().enumerate().skip(from) {
                self.cursor.store(i + 1, Ordering::SeqCst);
                if pred(l) {
                    return Some(Ok(l.clone()));
                }
            }
            (st.open == 0).then_some(Err(()))
        }
    }

    fn found_line(&self, found: Option<Result<String, ()>>, within: Duration) -> String {
        match found {
            Some(Ok(l)) => l,
            Some(Err(())) => panic!("the server exited; log:\n{}", self.log()),
            None => panic!(
                "no matching server log line within {within:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// Waits until the whole log (every line so far, as [`Server::log`]
    /// gives it) satisfies `pred`, and returns it. Panics at the deadline.
    pub fn wait_log_text(&self, mut pred: impl FnMut(&str) -> bool, within: Duration) -> String {
        let found = self.log.wait(within, |st| {
            let mut s = st.lines.join("\n");
            s.push('\n');
            pred(&s).then_some(s)
        });
        found.unwrap_or_else(|| panic!("the log never matched within {within:?}:\n{}", self.log()))
    }

    /// [`Server::wait_log_text`] for async tests.
    pub async fn wait_log_text_async(
        &self,
        mut pred: impl FnMut(&str) -> bool,
        within: Duration,
    ) -> String {
        let found = self
            .log
            .wait_async(within, |st| {
                let mut s = st.lines.join("\n");
                s.push('\n');
                pred(&s).then_some(s)
            })
            .await;
        found.unwrap_or_else(|| panic!("the log never matched within {within:?}:\n{}", self.log()))
    }

    /// Waits until a request for `tool` is queued for a human; returns its id.
    pub fn wait_queued(&self, tool: &str) -> String {
        let needle = format!("tool={tool} ");
        let line = self.wait_log(
            |l| l.contains("queued for approval") && l.contains(&needle),
            Duration::from_secs(10),
        );
        let at = line.find("request.id=").expect("request.id in log") + "request.id=".len();
        line[at..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    }

    // ---- the process ----

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig)
            .expect("signal serve");
    }

    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// The exit status if serve has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().expect("try_wait")
    }

    /// Waits until serve exits (its output pipes close), then reaps it;
    /// `None` if it still runs at the deadline.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let closed = self.log.wait(within, |st| (st.open == 0).then_some(()));
        closed.and_then(|()| self.child().wait().ok())
    }

    /// [`Server::wait_exit`] for async tests.
    pub async fn wait_exit_async(&mut self, within: Duration) -> Option<ExitStatus> {
        let log = self.log.clone();
        let closed = log
            .wait_async(within, |st| (st.open == 0).then_some(()))
            .await;
        closed.and_then(|()| self.child().wait().ok())
    }

    /// SIGTERM, and the exit status (within 20 s, or a panic).
    pub fn stop(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait_exit(STOP)
            .unwrap_or_else(|| panic!("serve did not stop within {STOP:?}; log:\n{}", self.log()))
    }

    /// [`Server::stop`] for async tests.
    pub async fn stop_async(&mut self) -> ExitStatus {
        self.sigterm();
        match self.wait_exit_async(STOP).await {
            Some(st) => st,
            None => panic!("serve did not stop within {STOP:?}; log:\n{}", self.log()),
        }
    }

    /// SIGKILL: no shutdown at all.
    pub fn kill(&mut self) {
        let c = self.child();
        c.kill().expect("kill");
        c.wait().expect("wait");
    }

    /// Starts serve again on the same directory and config (after a kill
    /// or a stop); panics if it does not come up.
    pub fn restart(&mut self) {
        let from = self.spawn();
        let up = self.log.wait(START, ready(from));
        self.restarted(up);
    }

    /// [`Server::restart`] for async tests.
    pub async fn restart_async(&mut self) {
        let from = self.spawn();
        let log = self.log.clone();
        let up = log.wait_async(START, ready(from)).await;
        self.restarted(up);
    }

    fn restarted(&mut self, up: Option<Result<(usize, PathBuf), ()>>) {
        match up {
            Some(Ok((next, _))) => self.cursor.store(next, Ordering::SeqCst),
            _ => panic!("serve did not start again; log:\n{}", self.log()),
        }
    }

    /// SIGKILL, then start again on the same directory.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// Replaces the config file's text (owner-only), for the next start.
    pub fn rewrite_config(&self, text: &str) {
        super::config::write_config(&self.config, text);
    }

    // ---- calls ----

    /// One call on a fresh connection, as the server's own uid: admin calls
    /// ([`rpc::is_admin_call`]) on the admin socket, the rest on the agent
    /// socket.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        let socket = if rpc::is_admin_call(method, &params) {
            &self.admin_socket
        } else {
            &self.socket
        };
        rpc::call(socket, method, params)
    }

    /// One call on a fresh connection to the agent socket.
    pub fn agent_rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        rpc::call(&self.socket, method, params)
    }

    /// One call on a fresh connection to the admin socket.
    pub fn admin_rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        rpc::call(&self.admin_socket, method, params)
    }

    pub fn approve(&self, id: &str, reason: &str) -> Value {
        self.rpc(
            "approve",
            json!({"id": id, "reason": reason, "operator": "alice"}),
        )
        .expect("approve")
    }

    pub fn deny(&self, id: &str, reason: &str) -> Value {
        self.rpc(
            "deny",
            json!({"id": id, "reason": reason, "operator": "bob"}),
        )
        .expect("deny")
    }

    /// A connection to the admin socket: every method, as an admin.
    pub async fn client(&self) -> Client {
        Client::connect(&self.admin_socket).await.expect("connect")
    }

    /// A connection to the agent socket: agent methods only.
    pub async fn agent_client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect")
    }

    /// One call on a fresh admin connection.
    pub async fn admin_call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.client().await.call(method, params).await
    }

    /// One call on a fresh agent connection.
    pub async fn agent_call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.agent_client().await.call(method, params).await
    }

    /// Submits `params` as `agent` without waiting.
    pub async fn submit_as(&self, agent: &str, params: Value) -> Value {
        let mut p = params;
        p["agent"] = json!(agent);
        self.agent_call("submit", p).await.expect("submit")
    }

    /// Submits `params` as `agent` and blocks until decided, in the background.
    pub fn submit_waiting_as(&self, agent: &str, params: Value) -> tokio::task::JoinHandle<Value> {
        let socket = self.socket.clone();
        let mut p = params;
        p["agent"] = json!(agent);
        p["wait"] = json!(true);
        tokio::spawn(async move {
            let mut c = Client::connect(&socket).await.expect("connect");
            c.call("submit", p).await.expect("submit")
        })
    }

    /// Runs `keyturn ARGS --config CONFIG` against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        super::cli(&self.config, args).output().expect("run cli")
    }
}

/// A pipe whose read end is already closed: every write to it fails with
/// EPIPE, from the first byte on (no race with a reader).
pub fn closed_pipe() -> Stdio {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    drop(r);
    Stdio::from(w)
}

/// Every line serve wrote, and how many of its pipes are still open.
#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    open: usize,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changed.notify_all();
        self.notify.notify_waiters();
    }

    /// Reads `pipe` line by line into the log, on a thread of its own.
    fn read(self: &Arc<Self>, pipe: impl std::io::Read + Send + 'static) {
        let log = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                log.lock().lines.push(line);
                log.changed();
            }
            log.lock().open -= 1;
            log.changed();
        });
    }

    /// Waits until `check` answers, at most `within`.
    fn wait<T>(
        &self,
        within: Duration,
        mut check: impl FnMut(&LogState) -> Option<T>,
    ) -> Option<T> {
        let until = Instant::now() + within;
        let mut st = self.lock();
        loop {
            if let Some(t) = check(&st) {
                return Some(t);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// [`Log::wait`] without blocking the async runtime.
    async fn wait_async<T>(
        &self,
        within: Duration,
        mut check: impl FnMut(&LogState) -> Option<T>,
    ) -> Option<T> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(t) = check(&self.lock()) {
                return Some(t);
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return check(&self.lock());
            }
        }
    }
}
