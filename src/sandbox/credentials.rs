//! The credential broker: reads `[credentials.NAME]` sources, fails over
//! between auth profiles, re-reads on SIGHUP or when a file changes.
//!
//! Values live in this process's memory only: never logged, never in
//! `Debug`, never in an error. Sources: an environment variable of
//! Keyturn's, a file (kept byte-exact: a kubeconfig must stay as written),
//! or a command run without a shell (10 s timeout, stdout capped at
//! 64 KiB, a non-zero exit is a failed read, stderr counted but never
//! logged). Environment and command values lose their trailing newlines;
//! an empty value is a failed read. A profile whose source cannot be read
//! is marked unreadable and skipped (a value it had is kept for the masker
//! only, as are values replaced by a rotation); a credential with no
//! readable profile refuses every fetch (fail closed). Which profile is active is the pure
//! machine in [`crate::domain::credentials`].
//!
//! An adapter: uses `app`, `domain` and `config`, names no other adapter.
//! Locks are `std::sync::Mutex`, never held across an `.await`: sources are
//! read on the blocking pool from a snapshot, and the results applied under
//! the lock afterwards.

use crate::app::ports::{CredentialStatus, Credentials, ExecError, Fetched, ProfileStatus};
use crate::config::{CredentialConfig, CredentialSource};
use crate::domain::credentials::{Change, Failover};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a credential command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes a credential command may print (more is a failed read: a
/// cut credential is a wrong one).
pub const MAX_COMMAND_OUTPUT: usize = 64 * 1024;
/// Most bytes a credential file may hold (more is a failed read).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// How often the watch compares the file sources' (mtime, length, inode).
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Earlier values kept per credential after a rotation, so the masker
/// still hides them in the output of runs that started before it.
const RETIRED_KEPT: usize = 8;

/// Why a source could not be read. The text names the source (variable,
/// path, program), never a value, and is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("environment variable `{0}` is not set")]
    EnvUnset(String),
    #[error("cannot read file `{path}`: {error}")]
    File { path: String, error: String },
    #[error("file `{path}` is larger than {max} bytes")]
    FileTooLarge { path: String, max: u64 },
    #[error("cannot start `{program}`: {error}")]
    Spawn { program: String, error: String },
    #[error("`{program}` did not finish within {secs} s (killed)")]
    Timeout { program: String, secs: u64 },
    #[error("`{program}` printed more than {max} bytes")]
    OutputTooLarge { program: String, max: usize },
    #[error("`{program}` failed ({status}; {stderr_bytes} bytes on stderr, not logged)")]
    Exit {
        program: String,
        status: String,
        stderr_bytes: u64,
    },
    #[error("the source has no configured kind")]
    NoSource,
    #[error("the value is empty")]
    Empty,
}

/// A credential value: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
struct Value(Vec<u8>);

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[hidden, {} bytes]", self.0.len())
    }
}

/// What the watch compares to see that a file changed (followed through
/// symlinks, as rotated secret mounts swap them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    mtime: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

fn stamp(path: &str) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        mtime: m.modified().ok(),
        len: m.len(),
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// One auth profile: where it is read from and what was read.
#[derive(Debug)]
struct Profile {
    name: String,
    source: CredentialSource,
    value: Option<Value>,
    /// The file's stamp when it was last read (file sources only).
    stamp: Option<FileStamp>,
}

/// One credential.
#[derive(Debug)]
struct Entry {
    profiles: Vec<Profile>,
    fail_exit_codes: Vec<i32>,
    fail_pattern: Option<regex::bytes::Regex>,
    failover: Failover,
    /// Values replaced by a rotation, newest last (at most [`RETIRED_KEPT`]).
    retired: Vec<Value>,
    /// Reads handed out, and the newest applied: an older read finishing
    /// late is dropped.
    reads_started: u64,
    reads_applied: u64,
}

/// One credential's sources to re-read: its name, the read's sequence
/// number, and each profile's name and source.
type Snapshot = (String, u64, Vec<(String, CredentialSource)>);

/// A profile's read: its value or why not, and the file's stamp.
struct SourceRead {
    value: Result<Value, ReadError>,
    stamp: Option<FileStamp>,
}

/// The credential broker (see the module doc). Build it with
/// [`Broker::load`]; share it as `Arc<Broker>`.
pub struct Broker {
    entries: Mutex<BTreeMap<String, Entry>>,
    /// The origin of the failover machine's milliseconds (monotonic).
    epoch: Instant,
    /// Counts applied re-reads, for whoever waits on a rotation.
    reloads: watch::Sender<u64>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        f.debug_struct("Broker")
            .field("credentials", &names)
            .finish_non_exhaustive()
    }
}

fn log_changes(credential: &str, changes: &[Change], active: Option<&str>) {
    for c in changes {
        match c {
            Change::SetAside { profile } => tracing::warn!(
                credential,
                profile = %profile,
                active = active.unwrap_or("none"),
                "credential profile set aside after repeated failures"
            ),
            Change::Back { profile } => tracing::warn!(
                credential,
                profile = %profile,
                active = active.unwrap_or("none"),
                "credential profile back in use"
            ),
        }
    }
}

impl Broker {
    /// Reads every source of every credential now (commands included, on
    /// this thread: call it at start-up, before serving). Sources that
    /// cannot be read are logged (never a value) and their profiles marked
    /// unreadable; loading itself never fails.
    pub fn load(cfg: &BTreeMap<String, CredentialConfig>) -> Broker {
        let mut entries = BTreeMap::new();
        for (name, c) in cfg {
            let fail_pattern = c.fail_pattern.as_deref().and_then(|p| {
                regex::bytes::Regex::new(p)
                    .map_err(|e| {
                        tracing::error!(
                            credential = %name,
                            error = %e,
                            "credential fail_pattern does not compile; only exit codes count as failures"
                        )
                    })
                    .ok()
            });
            let sources = c.sources();
            let names: Vec<String> = sources.iter().map(|(n, _)| n.clone()).collect();
            let retry_after_ms = c
                .retry_after
                .as_ref()
                .map(|d| i64::try_from(d.0.as_millis()).unwrap_or(i64::MAX));
            let mut failover = Failover::new(&names, c.fail_after, retry_after_ms);
            let mut profiles = Vec::with_capacity(sources.len());
            for (profile, source) in sources {
                let read = read_source(&source);
                let value = match read.value {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::error!(
                            credential = %name,
                            profile = %profile,
                            error = %e,
                            "cannot read credential source; profile skipped"
                        );
                        failover.set_readable(&profile, false);
                        None
                    }
                };
                profiles.push(Profile {
                    name: profile,
                    source,
                    value,
                    stamp: read.stamp,
                });
            }
            if failover.active().is_none() {
                tracing::error!(
                    credential = %name,
                    "no profile of this credential could be read: tools using it will not run"
                );
            }
            entries.insert(
                name.clone(),
                Entry {
                    profiles,
                    fail_exit_codes: c.fail_exit_codes.clone(),
                    fail_pattern,
                    failover,
                    retired: Vec::new(),
                    reads_started: 0,
                    reads_applied: 0,
                },
            );
        }
        Broker {
            entries: Mutex::new(entries),
            epoch: Instant::now(),
            reloads: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock leaves consistent data (every
        // update is a plain assignment), so a poisoned lock is still used.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Bumped each time re-read values are applied (reload, or the watch
    /// seeing a file change): wait on it instead of polling.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Re-reads the named credentials (all with `None`) on the blocking
    /// pool, then applies what was read.
    async fn reread(&self, names: Option<&[String]>) {
        let snapshot: Vec<Snapshot> = {
            let mut entries = self.lock();
            entries
                .iter_mut()
                .filter(|(n, _)| names.is_none_or(|ns| ns.contains(n)))
                .map(|(n, e)| {
                    e.reads_started += 1;
                    let sources = e
                        .profiles
                        .iter()
                        .map(|p| (p.name.clone(), p.source.clone()))
                        .collect();
                    (n.clone(), e.reads_started, sources)
                })
                .collect()
        };
        if snapshot.is_empty() {
            return;
        }
        let read = tokio::task::spawn_blocking(move || {
            snapshot
                .into_iter()
                .map(|(name, seq, sources)| {
                    let reads: Vec<(String, SourceRead)> = sources
                        .into_iter()
                        .map(|(p, s)| {
                            let r = read_source(&s);
                            (p, r)
                        })
                        .collect();
                    (name, seq, reads)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "credential re-read failed; values kept");
                return;
            }
        };
        {
            let mut entries = self.lock();
            for (name, seq, reads) in read {
                let Some(entry) = entries.get_mut(&name) else {
                    continue;
                };
                if seq <= entry.reads_applied {
                    continue;
                }
                entry.reads_applied = seq;
                apply(&name, entry, reads);
            }
        }
        self.reloads.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Polls the file sources' (mtime, length, inode) every [`WATCH_EVERY`]
    /// and re-reads each credential one of whose files changed (appeared,
    /// vanished, was rewritten or replaced). A hand-written poll rather
    /// than inotify: it sees symlink swaps and replaced mounts alike, and a
    /// second's delay is fine for a rotation. Ends when `stop` is cancelled.
    pub fn spawn_watch(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let broker = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                }
                let files: Vec<(String, String, Option<FileStamp>)> = {
                    let entries = broker.lock();
                    entries
                        .iter()
                        .flat_map(|(n, e)| {
                            e.profiles.iter().filter_map(move |p| {
                                p.source
                                    .file
                                    .as_ref()
                                    .map(|f| (n.clone(), f.clone(), p.stamp))
                            })
                        })
                        .collect()
                };
                if files.is_empty() {
                    continue;
                }
                let changed = tokio::task::spawn_blocking(move || {
                    let mut changed: Vec<String> = Vec::new();
                    for (name, path, old) in files {
                        if stamp(&path) != old && !changed.contains(&name) {
                            changed.push(name);
                        }
                    }
                    changed
                })
                .await
                .unwrap_or_default();
                if !changed.is_empty() {
                    tracing::info!(credentials = ?changed, "credential file changed; re-reading");
                    broker.reread(Some(&changed)).await;
                }
            }
        })
    }
}

/// Applies one credential's fresh reads: values replaced (a changed value
/// brings its profile back), failed reads marked unreadable, stamps kept.
fn apply(name: &str, entry: &mut Entry, reads: Vec<(String, SourceRead)>) {
    let mut changes = Vec::new();
    for (profile, read) in reads {
        let Some(p) = entry.profiles.iter_mut().find(|p| p.name == profile) else {
            continue;
        };
        p.stamp = read.stamp;
        match read.value {
            Ok(v) => {
                let was_unreadable = entry
                    .failover
                    .profiles()
                    .iter()
                    .any(|f| f.name() == profile && !f.is_readable());
                if let Some(old) = p.value.replace(v.clone()) {
                    if old != v {
                        tracing::info!(credential = name, profile = %profile, "credential value rotated");
                        entry.retired.push(old);
                        changes.extend(entry.failover.rotated(&profile));
                    }
                }
                if was_unreadable {
                    tracing::info!(credential = name, profile = %profile, "credential source readable again");
                }
                entry.failover.set_readable(&profile, true);
            }
            Err(e) => {
                tracing::error!(
                    credential = name,
                    profile = %profile,
                    error = %e,
                    "cannot re-read credential source; profile skipped"
                );
                // The last value is kept, unused, so the masker still hides
                // it and a value that comes back changed counts as rotated.
                entry.failover.set_readable(&profile, false);
            }
        }
    }
    let excess = entry.retired.len().saturating_sub(RETIRED_KEPT);
    entry.retired.drain(..excess);
    log_changes(name, &changes, entry.failover.active());
    if entry.failover.active().is_none() {
        tracing::error!(
            credential = name,
            "no profile of this credential could be read: tools using it will not run"
        );
    }
}

/// Removes trailing `\n` and `\r` (an `echo`ed or exported value).
fn trim_newlines(mut v: Vec<u8>) -> Vec<u8> {
    while matches!(v.last(), Some(b'\n' | b'\r')) {
        v.pop();
    }
    v
}

/// Reads one source (blocking: a command may take up to its timeout).
fn read_source(s: &CredentialSource) -> SourceRead {
    let (value, file_stamp) = if let Some(var) = &s.env {
        let v = std::env::var_os(var)
            .map(|v| trim_newlines(std::os::unix::ffi::OsStringExt::into_vec(v)))
            .ok_or_else(|| ReadError::EnvUnset(var.clone()));
        (v, None)
    } else if let Some(path) = &s.file {
        // Stamp first: a change between the stamp and the read is seen
        // again by the next poll (one extra read), never missed.
        let st = stamp(path);
        (read_file(path), st)
    } else if let Some(argv) = &s.command {
        (
            run_command(argv, COMMAND_TIMEOUT, MAX_COMMAND_OUTPUT).map(trim_newlines),
            None,
        )
    } else {
        (Err(ReadError::NoSource), None)
    };
    let value = value.and_then(|v| {
        if v.is_empty() {
            Err(ReadError::Empty)
        } else {
            Ok(Value(v))
        }
    });
    SourceRead {
        value,
        stamp: file_stamp,
    }
}

/// A file's whole content, byte-exact, at most [`MAX_FILE_BYTES`].
fn read_file(path: &str) -> Result<Vec<u8>, ReadError> {
    let err = |e: std::io::Error| ReadError::File {
        path: path.to_string(),
        error: e.to_string(),
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::FileTooLarge {
            path: path.to_string(),
            max: MAX_FILE_BYTES,
        });
    }
    Ok(buf)
}

/// Runs `argv` (no shell, stdin empty, its own process group) and returns
/// its stdout: a non-zero exit, more than `cap` bytes or running past
/// `timeout` (the whole group is then killed) is a failed read. Stderr is
/// counted, never kept.
fn run_command(argv: &[String], timeout: Duration, cap: usize) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let program = argv.first().cloned().unwrap_or_default();
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(&program)
        .args(argv.iter().skip(1))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| ReadError::Spawn {
            program: program.clone(),
            error: e.to_string(),
        })?;
    let kill = |child: &mut std::process::Child| {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    };
    let (out_tx, out_rx) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let r = stdout.take(cap as u64 + 1).read_to_end(&mut buf);
            let _ = out_tx.send(r.map(|_| buf));
        });
    }
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    if let Some(mut stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            let n = std::io::copy(&mut stderr, &mut std::io::sink()).unwrap_or(0);
            let _ = err_tx.send(n);
        });
    }
    let timed_out = || ReadError::Timeout {
        program: program.clone(),
        secs: timeout.as_secs(),
    };
    let out = match out_rx.recv_timeout(timeout) {
        Ok(Ok(buf)) => buf,
        Ok(Err(e)) => {
            kill(&mut child);
            return Err(ReadError::Spawn {
                program: program.clone(),
                error: format!("reading its output: {e}"),
            });
        }
        Err(_) => {
            kill(&mut child);
            return Err(timed_out());
        }
    };
    if out.len() > cap {
        kill(&mut child);
        return Err(ReadError::OutputTooLarge { program, max: cap });
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill(&mut child);
                return Err(timed_out());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill(&mut child);
                return Err(ReadError::Spawn {
                    program,
                    error: e.to_string(),
                });
            }
        }
    };
    if !status.success() {
        let stderr_bytes = err_rx.recv_timeout(Duration::from_millis(500)).unwrap_or(0);
        return Err(ReadError::Exit {
            program,
            status: status.to_string(),
            stderr_bytes,
        });
    }
    Ok(out)
}

#[async_trait]
impl Credentials for Broker {
    async fn fetch(&self, name: &str) -> Result<Fetched, ExecError> {
        let now = self.now();
        let mut entries = self.lock();
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ExecError(format!("credential `{name}` is not configured")))?;
        let changes = entry.failover.expire(now);
        log_changes(name, &changes, entry.failover.active());
        let no_value = || {
            ExecError(format!(
                "credential `{name}` has no readable source (see the server log); the tool was not run"
            ))
        };
        let active = entry.failover.active().ok_or_else(no_value)?;
        let profile = entry
            .profiles
            .iter()
            .find(|p| p.name == active)
            .ok_or_else(no_value)?;
        let value = profile.value.as_ref().ok_or_else(no_value)?;
        Ok(Fetched {
            profile: profile.name.clone(),
            value: value.0.clone(),
        })
    }

    fn report(&self, name: &str, profile: &str, exit_code: Option<i32>, output: &[u8]) {
        let now = self.now();
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(name) else {
            tracing::debug!(
                credential = name,
                "report for an unknown credential ignored"
            );
            return;
        };
        let failed = exit_code.is_some_and(|c| entry.fail_exit_codes.contains(&c))
            || entry
                .fail_pattern
                .as_ref()
                .is_some_and(|re| re.is_match(output));
        let change = if failed {
            tracing::info!(
                credential = name,
                profile,
                exit_code,
                "run counted as a credential failure"
            );
            entry.failover.failure(profile, now)
        } else {
            entry.failover.success(profile)
        };
        let changes: Vec<Change> = change.into_iter().collect();
        log_changes(name, &changes, entry.failover.active());
    }

    fn values(&self) -> Vec<Vec<u8>> {
        let entries = self.lock();
        entries
            .values()
            .flat_map(|e| {
                e.profiles
                    .iter()
                    .filter_map(|p| p.value.as_ref())
                    .chain(e.retired.iter())
                    .map(|v| v.0.clone())
            })
            .collect()
    }

    fn status(&self) -> Vec<CredentialStatus> {
        let now = self.now();
        let mut entries = self.lock();
        entries
            .iter_mut()
            .map(|(name, e)| {
                let changes = e.failover.expire(now);
                log_changes(name, &changes, e.failover.active());
                // `active` is empty when no profile is readable.
                CredentialStatus {
                    name: name.clone(),
                    active: e.failover.active().unwrap_or_default().to_string(),
                    profiles: e
                        .failover
                        .profiles()
                        .iter()
                        .map(|p| ProfileStatus {
                            name: p.name().to_string(),
                            failures: p.failures(),
                            set_aside: p.is_set_aside(),
                            unreadable: !p.is_readable(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    fn reset(&self, name: &str) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(name) else {
            return false;
        };
        let changes = entry.failover.reset();
        log_changes(name, &changes, entry.failover.active());
        true
    }

    async fn reload(&self) {
        self.reread(None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_command_prints_the_value() {
        let out = run_command(
            &argv(&["sh", "-c", "printf 's3cr3t\\n'"]),
            COMMAND_TIMEOUT,
            64,
        )
        .unwrap();
        assert_eq!(trim_newlines(out), b"s3cr3t");
    }

    #[test]
    fn a_failing_command_is_a_failed_read_without_its_stderr() {
        let e = run_command(
            &argv(&["sh", "-c", "echo topsecret >&2; exit 3"]),
            COMMAND_TIMEOUT,
            64,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::Exit {
                    stderr_bytes: 10,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!e.to_string().contains("topsecret"));
    }

    #[test]
    fn a_slow_command_is_killed_at_the_timeout() {
        let e = run_command(
            &argv(&["sh", "-c", "sleep 30"]),
            Duration::from_millis(200),
            64,
        )
        .unwrap_err();
        assert!(matches!(e, ReadError::Timeout { .. }), "{e:?}");
    }

    #[test]
    fn a_command_holding_stdout_open_is_killed_at_the_timeout() {
        let e = run_command(
            &argv(&["sh", "-c", "echo x; exec sleep 30"]),
            Duration::from_millis(200),
            64,
        )
        .unwrap_err();
        assert!(matches!(e, ReadError::Timeout { .. }), "{e:?}");
    }

    #[test]
    fn too_much_output_is_a_failed_read() {
        let e = run_command(
            &argv(&["sh", "-c", "head -c 100 /dev/zero"]),
            COMMAND_TIMEOUT,
            64,
        )
        .unwrap_err();
        assert!(
            matches!(e, ReadError::OutputTooLarge { max: 64, .. }),
            "{e:?}"
        );
        let e = run_command(&argv(&["/nonexistent/prog"]), COMMAND_TIMEOUT, 64).unwrap_err();
        assert!(matches!(e, ReadError::Spawn { .. }), "{e:?}");
    }

    #[test]
    fn values_never_show_in_debug() {
        assert_eq!(format!("{:?}", Value(b"abc".to_vec())), "[hidden, 3 bytes]");
    }
}
