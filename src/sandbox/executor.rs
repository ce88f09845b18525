//! The executor: builds the bubblewrap (or `host`) command for a job, starts
//! it in its own process group, caps and hashes its output, enforces the
//! timeout, and kills whole process groups.
//!
//! An adapter: implements [`crate::app::ports::Executor`]; names no other
//! adapter. The launch chain is `keyturn sandbox-child <setup> -- bwrap …
//! -- program …` (see [`crate::sandbox::child`]): the child sets the limits,
//! drops to the run uid and arms `PR_SET_PDEATHSIG` before it execs, so no
//! `pre_exec` (and no `unsafe`) is needed here.
//!
//! Children are spawned from one long-lived thread: `PR_SET_PDEATHSIG`
//! fires when the *thread* that forked the child exits, and a tokio
//! blocking-pool thread may exit while the run goes on.
//!
//! Killing: SIGTERM to the process group, SIGKILL after `[run] kill_grace`.
//! For bwrap the group is bwrap itself (the sandbox runs `--new-session`);
//! bwrap's death kills the sandbox's pid 1 (`--die-with-parent`) and so the
//! whole PID namespace, wherever its processes moved. For the host profile
//! the group is everything the program started that stayed in it. When the
//! process ends, the group gets a SIGKILL for whatever is left, before the
//! pid is reaped (so the pgid cannot have been recycled).

mod capture;
mod leftover;
mod paths;
mod profile;

pub use leftover::kill_leftover;
pub use paths::resolve_path;

use crate::app::ports::{ExecError, Executor, Finished, Job, KillSwitch, Started};
use crate::config::RunConfig;
use crate::domain::run::{Profile, RunState};
use crate::sandbox::child::{Setup, SUBCOMMAND};
use async_trait::async_trait;
use capture::Capture;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use profile::Staged;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

/// The uid and gid runs use when Keyturn runs as root and `[run] uid/gid`
/// are not set (`nobody`, `nogroup`).
pub const DEFAULT_RUN_ID: u32 = 65534;

/// Runs jobs under bubblewrap (or, for the `host` profile, without
/// namespaces), as described in the module documentation.
pub struct Sandbox {
    cfg: RunConfig,
    self_exe: PathBuf,
    hidden_default: Vec<String>,
    /// The bwrap binary, resolved at construction (or why it was not found).
    bwrap: Result<PathBuf, String>,
    ids: (Option<u32>, Option<u32>),
    running: Arc<AtomicUsize>,
    spawner: Arc<Spawner>,
    /// Pids of the runs' own processes (bwrap or the host program), which
    /// their supervisors reap; [`reap_orphans`] leaves them alone.
    supervised: Arc<Mutex<std::collections::HashSet<i32>>>,
}

impl Sandbox {
    /// An executor starting runs through `self_exe sandbox-child`; paths in
    /// `hidden_default` (Keyturn's database, config, sockets) are hidden in
    /// every bwrap sandbox.
    pub fn new(cfg: &RunConfig, self_exe: PathBuf, hidden_default: Vec<String>) -> Sandbox {
        let mut hidden_default = hidden_default;
        if let Some(s) = scratch_base(cfg) {
            hidden_default.push(s.to_string_lossy().into_owned());
        }
        Sandbox {
            cfg: cfg.clone(),
            self_exe,
            hidden_default,
            bwrap: find_bwrap(&cfg.bwrap),
            ids: run_ids(cfg),
            running: Arc::new(AtomicUsize::new(0)),
            spawner: Arc::new(Spawner::start()),
            supervised: supervised_pids(),
        }
    }

    /// Makes this process the reaper of its runs' orphans, and reaps them
    /// every second from now on. When bubblewrap's outer process exits,
    /// the sandbox's init (its child) is orphaned as a zombie; left to
    /// PID 1, which in a container may reap late or never, such zombies
    /// pile up against the run uid's process limit until runs cannot fork.
    pub fn reap_orphans_from_now(&self) {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become the reaper of runs' orphans; PID 1 reaps them");
            return;
        }
        let supervised = self.supervised.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let s = supervised.clone();
                let _ = tokio::task::spawn_blocking(move || reap_orphans(&s)).await;
            }
        });
    }
}

/// The one set of supervised pids of this process (several executors may
/// share it, e.g. in the bench; the reaper is process-wide).
fn supervised_pids() -> Arc<Mutex<std::collections::HashSet<i32>>> {
    static SET: std::sync::OnceLock<Arc<Mutex<std::collections::HashSet<i32>>>> =
        std::sync::OnceLock::new();
    SET.get_or_init(Arc::default).clone()
}

/// Reaps zombie children of this process that are orphaned sandbox
/// processes (`bwrap`, or anything running as the run uid) and not a run
/// a supervisor waits for. Children Keyturn started for itself (credential
/// commands) are left to whoever waits for them.
fn reap_orphans(supervised: &Mutex<std::collections::HashSet<i32>>) -> usize {
    let me = std::process::id() as i64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for p in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat
            .get(stat.find('(').map_or(0, |i| i + 1)..close)
            .unwrap_or("");
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|v| v.parse::<i64>().ok()));
        if state != Some("Z") || ppid != Some(me) || comm != "bwrap" {
            continue;
        }
        if supervised.lock().map(|s| s.contains(&p)).unwrap_or(true) {
            continue;
        }
        if nix::sys::wait::waitpid(Pid::from_raw(p), Some(nix::sys::wait::WaitPidFlag::WNOHANG))
            .is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Checks that bubblewrap is there and can create the namespaces runs use,
/// as the run uid. The error says what is missing and how to fix it.
/// Keyturn never falls back to running tools unsandboxed.
pub fn probe(cfg: &RunConfig) -> Result<(), String> {
    let bwrap = find_bwrap(&cfg.bwrap)?;
    let (uid, gid) = run_ids(cfg);
    let mut cmd = Command::new(&bwrap);
    cmd.args([
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--",
        "true",
    ])
    .env_clear()
    .env("PATH", "/usr/bin:/bin")
    .current_dir("/")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let (Some(u), Some(g)) = (uid, gid) {
        cmd.uid(u).gid(g);
    }
    let as_whom = uid.map_or_else(|| "Keyturn's uid".to_string(), |u| format!("uid {u}"));
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", bwrap.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said: String = said.trim().chars().take(300).collect();
    Err(format!(
        "bubblewrap cannot create the sandbox's namespaces as {as_whom} ({}: {said}). \
         Unprivileged user namespaces must be allowed: `sysctl user.max_user_namespaces` must be \
         above 0 (and `kernel.unprivileged_userns_clone=1` on older Debian kernels; on Ubuntu \
         24.04+ `kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile for bwrap). \
         Keyturn does not run tools unsandboxed.",
        out.status
    ))
}

/// The bwrap binary: `name` if it is a path, else looked up on Keyturn's
/// `PATH`.
fn find_bwrap(name: &str) -> Result<PathBuf, String> {
    let missing = || {
        format!(
            "bubblewrap (`{name}`) was not found: install Debian's `bubblewrap` package \
             (`apt install bubblewrap`) or set `[run] bwrap` to its path"
        )
    };
    let is_exe = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if is_exe(&p) { Ok(p) } else { Err(missing()) };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_absolute() && is_exe(p))
        .ok_or_else(missing)
}

/// The uid/gid runs drop to: only when Keyturn runs as root.
fn run_ids(cfg: &RunConfig) -> (Option<u32>, Option<u32>) {
    if nix::unistd::geteuid().is_root() {
        (
            Some(cfg.uid.unwrap_or(DEFAULT_RUN_ID)),
            Some(cfg.gid.unwrap_or(DEFAULT_RUN_ID)),
        )
    } else {
        (None, None)
    }
}

/// Where credential files are staged: `[run] scratch_dir`, else `/dev/shm`.
fn scratch_base(cfg: &RunConfig) -> Option<PathBuf> {
    match &cfg.scratch_dir {
        Some(s) => Some(PathBuf::from(s)),
        None => Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()),
    }
}

/// A job's credential files, written to a fresh 0700 directory as 0400
/// files owned by the run uid; the directory is removed when dropped.
struct Scratch {
    dir: Option<PathBuf>,
    staged: Vec<Staged>,
}

impl Scratch {
    fn stage(
        base: Option<PathBuf>,
        job: &Job,
        ids: (Option<u32>, Option<u32>),
    ) -> Result<Scratch, String> {
        let mut s = Scratch {
            dir: None,
            staged: Vec::new(),
        };
        if job.files.is_empty() {
            return Ok(s);
        }
        let base = base.ok_or_else(|| {
            "credential files need a scratch directory: /dev/shm is missing, set `[run] scratch_dir`"
                .to_string()
        })?;
        let tag: String = job
            .run_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        let dir = base.join(format!("keyturn-run-{tag}-{:016x}", rand::random::<u64>()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                format!(
                    "cannot create a scratch directory in `{}`: {e}",
                    base.display()
                )
            })?;
        s.dir = Some(dir.clone());
        if let (Some(u), Some(g)) = ids {
            std::os::unix::fs::chown(&dir, Some(u), Some(g))
                .map_err(|e| format!("cannot hand the scratch directory to uid {u}: {e}"))?;
        }
        for (i, (dest, content)) in job.files.iter().enumerate() {
            if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
                return Err(format!(
                    "credential file path `{dest}` must be absolute, without `..`"
                ));
            }
            let source = dir.join(format!("f{i}"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&source)
                .map_err(|e| format!("cannot stage credential file `{dest}`: {e}"))?;
            f.write_all(content)
                .map_err(|e| format!("cannot stage credential file `{dest}`: {e}"))?;
            if let (Some(u), Some(g)) = ids {
                std::os::unix::fs::fchown(&f, Some(u), Some(g))
                    .map_err(|e| format!("cannot stage credential file `{dest}`: {e}"))?;
            }
            s.staged.push(Staged {
                source,
                dest: dest.clone(),
            });
        }
        Ok(s)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!(path = %dir.display(), error = %e, "cannot remove staged credential files");
            }
        }
    }
}

type SpawnReply = oneshot::Sender<std::io::Result<std::process::Child>>;

/// The one thread runs are forked from (see the module documentation). It
/// lives as long as any run or the [`Sandbox`] holds it.
struct Spawner {
    tx: Mutex<mpsc::Sender<(Command, SpawnReply)>>,
}

impl Spawner {
    fn start() -> Spawner {
        let (tx, rx) = mpsc::channel::<(Command, SpawnReply)>();
        let spawned = std::thread::Builder::new()
            .name("keyturn-run-spawner".into())
            .spawn(move || {
                while let Ok((mut cmd, reply)) = rx.recv() {
                    // The starter went away (its future was dropped): nobody
                    // would watch this run, so it must not run.
                    if let Err(Ok(mut child)) = reply.send(cmd.spawn()) {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            });
        if let Err(e) = spawned {
            // Every start will then fail with "the spawner is gone".
            tracing::error!(error = %e, "cannot start the run spawner thread");
        }
        Spawner { tx: Mutex::new(tx) }
    }

    async fn spawn(&self, cmd: Command) -> std::io::Result<std::process::Child> {
        let (reply, rx) = oneshot::channel();
        let gone = || std::io::Error::other("the run spawner thread is gone");
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send((cmd, reply))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Holds one slot of `[run] max_concurrent` while a run lives.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a run is being killed, and whether its process is gone already.
struct Control {
    pgid: Pid,
    state: Mutex<ControlState>,
    /// Wakes the supervisor to schedule the SIGKILL.
    wake: Notify,
    run_id: String,
}

struct ControlState {
    /// Set once the process has exited (not yet reaped): no more signals.
    exited: bool,
    reason: Option<RunState>,
}

impl Control {
    /// Starts killing for `reason` (the first reason wins); false when the
    /// process is gone or already being killed.
    fn terminate(&self, reason: RunState) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.exited || s.reason.is_some() {
            return false;
        }
        s.reason = Some(reason);
        self.signal_locked(&s, Signal::SIGTERM);
        true
    }

    fn signal(&self, sig: Signal) {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.signal_locked(&s, sig);
    }

    fn signal_locked(&self, s: &ControlState, sig: Signal) {
        if s.exited {
            return;
        }
        match killpg(self.pgid, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(run.id = %self.run_id, signal = %sig, error = %e, "signalling the run failed")
            }
        }
    }

    /// The process has exited (it is a zombie until reaped): SIGKILL what
    /// is left of its group, then refuse further signals.
    fn exited(&self) -> Option<RunState> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.signal_locked(&s, Signal::SIGKILL);
        s.exited = true;
        s.reason
    }
}

#[async_trait]
impl Executor for Sandbox {
    fn resolve_path(
        &self,
        path: &str,
        roots: &[String],
        must_exist: bool,
    ) -> Result<String, String> {
        resolve_path(path, roots, must_exist)
    }

    async fn start(&self, job: Job) -> Result<Started, ExecError> {
        let slot = Slot(self.running.clone());
        if self.running.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_concurrent {
            return Err(ExecError(format!(
                "too_many_runs: {} runs are already running (`[run] max_concurrent`)",
                self.cfg.max_concurrent
            )));
        }
        let bwrap = match job.spec.profile {
            Profile::Bwrap => self.bwrap.clone().map_err(ExecError)?,
            Profile::Host => PathBuf::new(),
        };
        let scratch = Scratch::stage(scratch_base(&self.cfg), &job, self.ids).map_err(ExecError)?;
        let plan = profile::plan(&job, &bwrap, &self.hidden_default, &scratch.staged)
            .map_err(ExecError)?;
        let limits = &job.spec.limits;
        let setup = Setup {
            cpu_secs: limits.cpu_secs,
            memory_mb: limits.memory_mb,
            open_files: limits.open_files,
            processes: limits.processes,
            uid: self.ids.0,
            gid: self.ids.1,
            parent: std::process::id() as i32,
        };
        let mut cmd = Command::new(&self.self_exe);
        cmd.arg(SUBCOMMAND)
            .arg(setup.encode())
            .arg("--")
            .args(&plan.command)
            .env_clear()
            .envs(job.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&plan.host_cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let began = Instant::now();
        let mut child = self
            .spawner
            .spawn(cmd)
            .await
            .map_err(|e| ExecError(format!("cannot start the run: {e}")))?;
        let pid = child.id();
        let pgid = Pid::from_raw(pid as i32);
        let ctl = Arc::new(Control {
            pgid,
            state: Mutex::new(ControlState {
                exited: false,
                reason: None,
            }),
            wake: Notify::new(),
            run_id: job.run_id.clone(),
        });
        let streams = (child.stdout.take(), child.stderr.take());
        // The pid is reaped by the supervisor (waitpid), not through `child`.
        drop(child);
        let (Some(out), Some(err)) = streams else {
            abandon(&ctl);
            return Err(ExecError("the run's output pipes are missing".into()));
        };
        let cap = job.max_output_bytes;
        let (out_cap, err_cap) = (Capture::new(cap), Capture::new(cap));
        let out_task = match tokio::process::ChildStdout::from_std(out) {
            Ok(s) => tokio::spawn(capture::drain(
                s,
                out_cap.clone(),
                job.run_id.clone(),
                "stdout",
            )),
            Err(e) => {
                abandon(&ctl);
                return Err(ExecError(format!("cannot read the run's output: {e}")));
            }
        };
        let err_task = match tokio::process::ChildStderr::from_std(err) {
            Ok(s) => tokio::spawn(capture::drain(
                s,
                err_cap.clone(),
                job.run_id.clone(),
                "stderr",
            )),
            Err(e) => {
                abandon(&ctl);
                return Err(ExecError(format!("cannot read the run's output: {e}")));
            }
        };
        tracing::info!(
            run.id = %job.run_id,
            run.pid = pid,
            run.profile = job.spec.profile.as_str(),
            "run started"
        );
        let (done_tx, done_rx) = oneshot::channel();
        let kill = {
            let ctl = ctl.clone();
            KillSwitch(Arc::new(move || {
                if ctl.terminate(RunState::Killed) {
                    tracing::info!(run.id = %ctl.run_id, "run kill requested");
                }
                ctl.wake.notify_one();
            }))
        };
        if let Ok(mut s) = self.supervised.lock() {
            s.insert(pgid.as_raw());
        }
        let sup = Supervisor {
            supervised: self.supervised.clone(),
            ctl,
            pid: pgid,
            began,
            timeout: Duration::from_millis(job.spec.timeout_ms),
            grace: self.cfg.kill_grace.0,
            run_uid: Some(
                self.ids
                    .0
                    .unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
            ),
            streams: [(out_task, out_cap), (err_task, err_cap)],
            _keep: (slot, scratch, self.spawner.clone()),
        };
        tokio::spawn(async move {
            let finished = sup.run().await;
            let _ = done_tx.send(finished);
        });
        Ok(Started {
            pid,
            kill,
            finished: done_rx,
        })
    }

    fn process_exists(&self, pid: i64) -> bool {
        i32::try_from(pid)
            .is_ok_and(|p| p > 0 && std::path::Path::new(&format!("/proc/{p}")).exists())
    }

    fn kill_leftover(&self, run_id: &str, pid: i64, started_ms: i64) {
        let uid = self
            .ids
            .0
            .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
        if pid > 0 {
            leftover::kill_leftover_as(pid, started_ms, Some(uid));
        }
        leftover::kill_by_run_id(run_id, Some(uid));
    }
}

/// Watches one run to its end.
struct Supervisor {
    ctl: Arc<Control>,
    pid: Pid,
    began: Instant,
    timeout: Duration,
    grace: Duration,
    /// The uid the run's processes have (for the leftover sweep).
    run_uid: Option<u32>,
    /// The runs' own pids (see [`Sandbox::supervised`]).
    supervised: Arc<Mutex<std::collections::HashSet<i32>>>,
    streams: [(tokio::task::JoinHandle<()>, Arc<Mutex<Capture>>); 2],
    /// Released when the run is over: the concurrency slot, the staged
    /// files (removed), the spawner thread (the children's parent).
    _keep: (Slot, Scratch, Arc<Spawner>),
}

impl Supervisor {
    async fn run(self) -> Finished {
        let pid = self.pid;
        let mut exit = tokio::task::spawn_blocking(move || wait_exit(pid));
        // A timeout too large for the clock is as good as none.
        let deadline = tokio::time::Instant::from_std(
            self.began
                .checked_add(self.timeout)
                .unwrap_or(self.began + Duration::from_secs(100 * 365 * 86_400)),
        );
        let grace = self.grace.min(Duration::from_secs(365 * 86_400));
        let mut escalate: Option<tokio::time::Instant> = None;
        let mut timed_out = false;
        let mut hard_sent = false;
        let status = loop {
            tokio::select! {
                r = &mut exit => break r.unwrap_or(None),
                _ = tokio::time::sleep_until(deadline), if !timed_out => {
                    timed_out = true;
                    if self.ctl.terminate(RunState::TimedOut) {
                        tracing::info!(run.id = %self.ctl.run_id, "run timed out");
                    }
                    escalate.get_or_insert(tokio::time::Instant::now() + grace);
                }
                _ = self.ctl.wake.notified() => {
                    escalate.get_or_insert(tokio::time::Instant::now() + grace);
                }
                _ = sleep_until_opt(escalate), if escalate.is_some() && !hard_sent => {
                    hard_sent = true;
                    self.ctl.signal(Signal::SIGKILL);
                }
            }
        };
        let reason = self.ctl.exited();
        if reason.is_some() {
            // Killed or timed out: a sandbox caught mid-setup may have left
            // the group (bubblewrap's own session); find it by the run id.
            let (run_id, uid) = (self.ctl.run_id.clone(), self.run_uid);
            let _ =
                tokio::task::spawn_blocking(move || leftover::kill_by_run_id(&run_id, uid)).await;
        }
        // Reap (the zombie kept the pid, so the SIGKILL above hit our group).
        let pid = self.pid;
        let supervised = self.supervised.clone();
        let _ = tokio::task::spawn_blocking(move || {
            while let Err(nix::errno::Errno::EINTR) = waitpid(pid, None) {}
            if let Ok(mut s) = supervised.lock() {
                s.remove(&pid.as_raw());
            }
            // The sandbox's init, orphaned when bwrap exited (when this
            // process is their reaper; see `reap_orphans_from_now`).
            reap_orphans(&supervised);
        })
        .await;
        let duration_ms = self.began.elapsed().as_millis() as u64;
        let (exit_code, signal) = match status {
            Some(WaitStatus::Exited(_, c)) => (Some(c), None),
            Some(WaitStatus::Signaled(_, s, _)) => (None, Some(s as i32)),
            _ => (None, None),
        };
        // Output ends when the last holder of the pipes is gone; a process
        // that left the group may keep them open: stop reading after a while.
        let [(mut out_task, out_cap), (mut err_task, err_cap)] = self.streams;
        let drained = tokio::time::timeout(grace.max(Duration::from_millis(500)), async {
            let _ = (&mut out_task).await;
            let _ = (&mut err_task).await;
        })
        .await;
        if drained.is_err() {
            out_task.abort();
            err_task.abort();
            tracing::warn!(run.id = %self.ctl.run_id, "run output still open after it ended; stopped reading");
        }
        let (stdout, stdout_size, stdout_sha256) = Capture::finish(&out_cap);
        let (stderr, stderr_size, stderr_sha256) = Capture::finish(&err_cap);
        let state = reason.unwrap_or(RunState::Exited);
        tracing::info!(
            run.id = %self.ctl.run_id,
            run.state = state.as_str(),
            run.exit_code = ?exit_code,
            run.signal = ?signal,
            run.duration_ms = duration_ms,
            "run finished"
        );
        Finished {
            state,
            exit_code,
            signal,
            duration_ms,
            stdout,
            stdout_size,
            stdout_sha256,
            stderr,
            stderr_size,
            stderr_sha256,
        }
    }
}

/// Kills a run that started but cannot be watched, and reaps it.
fn abandon(ctl: &Arc<Control>) {
    ctl.signal(Signal::SIGKILL);
    let pid = ctl.pgid;
    tokio::task::spawn_blocking(
        move || {
            while let Err(nix::errno::Errno::EINTR) = waitpid(pid, None) {}
        },
    );
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Blocks until `pid` exits, leaving it a zombie (WNOWAIT) so its pid, and
/// so its process group id, cannot be reused before we reap it.
fn wait_exit(pid: Pid) -> Option<WaitStatus> {
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Some(s),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(run.pid = pid.as_raw(), error = %e, "waiting for the run failed");
                return None;
            }
        }
    }
}
