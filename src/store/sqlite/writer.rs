//! The one SQLite writer: a dedicated thread that owns the write connection
//! and group-commits.
//!
//! It takes every write waiting (up to `max_batch`), runs them in one
//! transaction with their audit entries, and answers each only after the
//! commit: many callers, one commit. A write is a [`Job`]: one typed
//! function of [`super::write`] with the caller's arguments, answered on its
//! own typed channel, so the writer knows nothing of what the writes are.
//! If a batch fails, each of its writes runs again alone, so one bad write
//! fails only its own caller. Writes run on rusqlite, synchronously:
//! sqlx hands every statement to its own worker thread and back, and on the
//! hot path those hand-offs cost more than SQLite itself (measured with
//! `keyturn bench`: see the README). Reads, migrations and the checkpointer
//! stay on sqlx.

use crate::app::ports::{StoreError, StoreResult};
use crate::domain::audit::{self, AuditEvent, SealedEvent};
use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Writes waiting for the writer; beyond this, callers wait (backpressure).
const WRITE_QUEUE: usize = 8192;

pub(super) enum Msg {
    Job(Box<dyn Job>),
    /// Refuse new writes, commit everything already queued, then stop.
    Stop,
}

/// The running writer, as the store holds it.
pub(super) struct Started {
    pub jobs: mpsc::Sender<Msg>,
    /// Fires once the last queued write has committed and the WAL has been
    /// folded back into the database file.
    pub done: oneshot::Receiver<()>,
    /// Whether the database file is still the one the writer opened.
    pub guard: Arc<FileGuard>,
}

/// Opens the write and checkpoint connections on `path` (already migrated)
/// and starts their threads.
pub(super) fn start(
    path: &Path,
    synchronous_full: bool,
    max_batch: usize,
    tuning: WalTuning,
) -> StoreResult<Started> {
    let conn = open_writer(path, synchronous_full)?;
    let guard = Arc::new(FileGuard::new(path)?);
    let catch_up = Arc::new(AtomicBool::new(false));
    let checkpointer = Checkpointer::start(path, catch_up.clone(), guard.clone(), tuning)?;
    let (jobs, rx) = mpsc::channel(WRITE_QUEUE);
    let (done_tx, done) = oneshot::channel();
    let reopen = path.to_path_buf();
    let kept = guard.clone();
    std::thread::Builder::new()
        .name("keyturn-writer".into())
        .spawn(move || {
            let mut conn = conn;
            let writable = Writable {
                path: reopen,
                synchronous_full,
            };
            run(
                &mut conn,
                rx,
                max_batch.max(1),
                &catch_up,
                &guard,
                &writable,
            );
            // The final checkpoint must be the only one: a background round
            // still running would leave it unfinished (busy), and the next
            // start would rebuild its WAL index from a log of any size.
            checkpointer.stop();
            close(conn);
            let _ = done_tx.send(());
        })
        .map_err(|e| StoreError::Failed(format!("cannot start the writer thread: {e}")))?;
    Ok(Started {
        jobs,
        done,
        guard: kept,
    })
}

/// How to reopen the write connection. SQLite opens a file it may not write
/// read-only, and such a connection stays read-only after the file becomes
/// writable: the writer reopens it before a batch, so a server started on
/// read-only files recovers like one whose files turned read-only while
/// it ran (those writes fail, later ones succeed).
struct Writable {
    path: std::path::PathBuf,
    synchronous_full: bool,
}

impl Writable {
    /// A fresh read-write connection in place of a read-only `conn`, when
    /// the file can be written now; otherwise `conn` stays (its writes fail
    /// with SQLite's read-only error, and nothing is acknowledged).
    fn refresh(&self, conn: &mut Connection) {
        if !conn
            .is_readonly(rusqlite::DatabaseName::Main)
            .unwrap_or(false)
        {
            return;
        }
        match open_writer(&self.path, self.synchronous_full) {
            Ok(fresh)
                if !fresh
                    .is_readonly(rusqlite::DatabaseName::Main)
                    .unwrap_or(true) =>
            {
                tracing::info!(
                    database = %self.path.display(),
                    "the database can be written again; writes resume"
                );
                let old = std::mem::replace(conn, fresh);
                let _ = old.close();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot reopen the database for writing"),
        }
    }
}

/// The write connection, configured: WAL, synchronous, no autocheckpoint.
fn open_writer(path: &Path, synchronous_full: bool) -> StoreResult<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Failed(format!(
            "could not switch the database to WAL (journal_mode is {mode})"
        )));
    }
    let sync = if synchronous_full { "FULL" } else { "NORMAL" };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;"
    ))?;
    // The writer never checkpoints on its own (see `Checkpointer`). A WAL
    // file larger than this is cut back when the log restarts.
    conn.query_row("PRAGMA wal_autocheckpoint = 0", [], |_| Ok(()))?;
    conn.query_row(
        &format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}"),
        [],
        |_| Ok(()),
    )?;
    Ok(conn)
}

/// The database file as it was opened. If its path stops naming that file
/// (deleted, or replaced by another), SQLite would go on writing into the
/// orphaned file, and everything acknowledged from then on would be gone at
/// the next start. So the writer checks after every commit, before it
/// answers (one `stat`: measured in the README), and the checkpointer every
/// round, so an idle server notices too. Once lost, the store stays failed:
/// every write is refused until the database is restored and the server
/// restarted.
pub(super) struct FileGuard {
    /// `None` for an in-memory database.
    file: Option<(PathBuf, u64, u64)>,
    lost: OnceLock<String>,
}

impl FileGuard {
    fn new(path: &Path) -> StoreResult<FileGuard> {
        let file = if path == Path::new(":memory:") {
            None
        } else {
            let m = std::fs::metadata(path).map_err(|e| {
                StoreError::unavailable(format!("cannot stat the database {}: {e}", path.display()))
            })?;
            Some((path.to_path_buf(), m.dev(), m.ino()))
        };
        Ok(FileGuard {
            file,
            lost: OnceLock::new(),
        })
    }

    /// Why the store is failed, without looking at the disk.
    pub(super) fn lost(&self) -> Option<StoreError> {
        self.lost.get().map(|why| StoreError::FileLost(why.clone()))
    }

    /// Looks at the disk: is the path still the file the store writes to?
    fn check(&self) -> StoreResult<()> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        let Some((path, dev, ino)) = &self.file else {
            return Ok(());
        };
        let why = match std::fs::metadata(path) {
            Ok(m) if (m.dev(), m.ino()) == (*dev, *ino) => return Ok(()),
            Ok(_) => format!("{} was replaced by another file", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                format!("{} was deleted", path.display())
            }
            Err(e) => format!("{} can no longer be checked ({e})", path.display()),
        };
        if self.lost.set(why.clone()).is_ok() {
            tracing::error!(
                problem = %why,
                "THE DATABASE FILE IS GONE while the server runs: every write is refused \
                 from now on (calls are denied). Stop the server, restore the database \
                 from a backup (or run `keyturn init` to start an empty one), then start it again"
            );
        }
        Err(self.lost().unwrap_or(StoreError::FileLost(why)))
    }
}

/// When the WAL is checkpointed and restarted.
#[derive(Debug, Clone, Copy)]
pub struct WalTuning {
    /// How often a background checkpoint round runs. Longer rounds fold
    /// many rewrites of the same hot pages into one copy; measured with
    /// `keyturn bench` (16 clients, 10 s runs), p99 was 2.9 ms at 250 ms
    /// and 1.9-2.2 ms at 1 s.
    pub checkpoint_every: Duration,
    /// The log is restarted once it holds this many frames.
    pub restart_frames: i64,
}

impl Default for WalTuning {
    fn default() -> Self {
        WalTuning {
            checkpoint_every: Duration::from_secs(1),
            // About 64 MB of 4 KiB pages.
            restart_frames: 16_384,
        }
    }
}

/// Bytes of WAL file kept after the log restarts (above the restart size,
/// so a restarted log reuses its file instead of truncating and regrowing).
const WAL_SIZE_LIMIT: u64 = 128 << 20;
/// The group-commit delay, and the batch size below which it applies.
/// Measured with `keyturn bench` (16 clients, 8 s runs): p99 2.06-2.15 ms
/// without it, 1.84-1.85 ms with 50 µs, 1.80-1.85 ms but 12 % fewer calls
/// with 150 µs.
const LINGER: Duration = Duration::from_micros(50);
const LINGER_BELOW: usize = 8;
/// A round hands over to the writer once one pass had fewer new frames than this.
const CATCH_UP_FRAMES: i64 = 512;
/// Passes per round at most.
const CHECKPOINT_PASSES: usize = 4;

/// Folds the WAL back into the database file, off the commit path.
///
/// A WAL only restarts from its beginning when a write transaction starts
/// with every frame already checkpointed. Under steady load a background
/// checkpoint is always behind the writer, so the log would grow without
/// bound (measured: 120,000 frames, 480 MB, after 5 s of `keyturn bench`).
/// So a round runs PASSIVE checkpoints here, where their fsyncs cost the
/// commit path nothing, until one pass finds only a few new frames; then it
/// asks the writer to copy that small remainder between two batches, after
/// which the writer's next transaction restarts the log.
struct CheckpointerHandle {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl CheckpointerHandle {
    /// Stops the checkpointer and waits until its connection is closed.
    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

struct Checkpointer {
    conn: Connection,
    catch_up: Arc<AtomicBool>,
    guard: Arc<FileGuard>,
    tuning: WalTuning,
}

impl Checkpointer {
    fn start(
        path: &Path,
        catch_up: Arc<AtomicBool>,
        guard: Arc<FileGuard>,
        tuning: WalTuning,
    ) -> StoreResult<CheckpointerHandle> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let mut me = Checkpointer {
            conn,
            catch_up,
            guard,
            tuning,
        };
        let thread = std::thread::Builder::new()
            .name("keyturn-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(me.tuning.checkpoint_every)
                {
                    me.round();
                }
            })
            .map_err(|e| {
                StoreError::Failed(format!("cannot start the checkpointer thread: {e}"))
            })?;
        Ok(CheckpointerHandle { stop, thread })
    }

    fn round(&mut self) {
        // Nothing is copied into a file the path no longer names.
        if self.guard.check().is_err() {
            return;
        }
        let mut seen = 0;
        for pass in 0..CHECKPOINT_PASSES {
            let log = match checkpoint(&self.conn, "background") {
                Ok(Some(log)) => log,
                // Empty log (nothing to do), or a reader held it back.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                    return;
                }
            };
            // A short log is left to grow: restarting it costs the writer a
            // pause (its own small checkpoint), so it is paid once per
            // `restart_frames`, not once per round.
            if pass == 0 && log < self.tuning.restart_frames {
                return;
            }
            // The log restarted since the last pass if it shrank.
            let fresh = if log >= seen { log - seen } else { log };
            seen = log;
            if fresh < CATCH_UP_FRAMES {
                break;
            }
        }
        self.catch_up.store(true, Ordering::Release);
    }
}

/// One PASSIVE checkpoint: never blocks the writer or readers. Returns the
/// frames in the log if all of them were copied.
fn checkpoint(conn: &Connection, who: &str) -> rusqlite::Result<Option<i64>> {
    let started = std::time::Instant::now();
    let (busy, log, copied): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    tracing::trace!(
        who,
        wal_frames = log,
        copied,
        micros = started.elapsed().as_micros() as u64,
        "checkpoint"
    );
    Ok((busy == 0 && log > 0 && copied == log).then_some(log))
}

/// Adds a queued message to the batch (a stop closes the queue).
fn take(msg: Msg, rx: &mut mpsc::Receiver<Msg>, jobs: &mut Vec<Box<dyn Job>>) {
    match msg {
        Msg::Job(job) => jobs.push(job),
        Msg::Stop => rx.close(),
    }
}

/// Takes what is queued, up to `max_batch` jobs in all.
fn drain(rx: &mut mpsc::Receiver<Msg>, jobs: &mut Vec<Box<dyn Job>>, max_batch: usize) {
    while jobs.len() < max_batch {
        match rx.try_recv() {
            Ok(msg) => take(msg, rx, jobs),
            Err(_) => break,
        }
    }
}

fn run(
    conn: &mut Connection,
    mut rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    catch_up: &AtomicBool,
    guard: &FileGuard,
    writable: &Writable,
) {
    let mut jobs: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    let mut head: Head = None;
    // Recent batch size (moving average): a lone caller never waits.
    let mut mean_batch = 1.0;
    while let Some(first) = rx.blocking_recv() {
        take(first, &mut rx, &mut jobs);
        // Whatever queued while the last batch committed joins this one.
        drain(&mut rx, &mut jobs, max_batch);
        // Group-commit delay (PostgreSQL's commit_delay, commit_siblings):
        // when callers have been writing concurrently but few are queued yet,
        // wait a moment for more, so one commit carries more calls. Fewer,
        // larger commits mean fewer WAL pages to write and checkpoint.
        if mean_batch >= 2.0 && jobs.len() < LINGER_BELOW && !rx.is_closed() {
            std::thread::sleep(LINGER);
            drain(&mut rx, &mut jobs, max_batch);
        }
        mean_batch = 0.9 * mean_batch + 0.1 * jobs.len() as f64;
        if !jobs.is_empty() {
            writable.refresh(conn);
            write_batch(conn, &mut jobs, &mut head, guard);
        }
        // Between batches nothing is being written: copy the last frames the
        // checkpointer left, so the next transaction restarts the log.
        if catch_up.swap(false, Ordering::Acquire) && guard.lost().is_none() {
            if let Err(e) = checkpoint(conn, "writer") {
                tracing::warn!(error = %e, "WAL checkpoint failed");
            }
        }
    }
}

/// Folds the WAL back into the main file so the database is one file at rest.
fn close(conn: Connection) {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => {}
        Ok(_) => tracing::warn!("final checkpoint could not finish (the database is busy)"),
        Err(e) => tracing::warn!(error = %e, "final checkpoint failed"),
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the database failed");
    }
}

fn write_batch(
    conn: &mut Connection,
    jobs: &mut Vec<Box<dyn Job>>,
    head: &mut Head,
    guard: &FileGuard,
) {
    // A lost database file refuses everything, without touching it.
    if let Some(why) = guard.lost.get() {
        refuse_all(jobs, why);
        return;
    }
    let started = std::time::Instant::now();
    // Committed is not enough: the commit must have gone into the file the
    // path names, or nothing of it survives a restart (see `FileGuard`).
    match run_batch(conn, jobs, head).and_then(|()| guard.check()) {
        Ok(()) => {
            let micros = started.elapsed().as_micros() as u64;
            crate::app::metrics::global()
                .commit_latency
                .observe_micros(micros);
            tracing::trace!(batch = jobs.len(), micros, "committed");
            for job in jobs.drain(..) {
                job.answer(Ok(()));
            }
        }
        // Not the batch's fault: retrying would only write into the lost file again.
        Err(StoreError::FileLost(why)) => refuse_all(jobs, &why),
        Err(e) if jobs.len() == 1 => {
            tracing::error!(error = %e, "store write failed");
            if let Some(job) = jobs.pop() {
                job.answer(Err(e));
            }
        }
        Err(e) => {
            // One bad write must not fail its neighbours: retry each alone.
            tracing::warn!(error = %e, batch = jobs.len(), "batch failed; retrying writes one by one");
            for mut job in jobs.drain(..) {
                let r = run_batch(conn, std::slice::from_mut(&mut job), head)
                    .and_then(|()| guard.check());
                if let Err(e) = &r {
                    tracing::error!(error = %e, "store write failed");
                }
                job.answer(r);
            }
        }
    }
}

fn refuse_all(jobs: &mut Vec<Box<dyn Job>>, why: &str) {
    for job in jobs.drain(..) {
        job.answer(Err(StoreError::FileLost(why.to_string())));
    }
}

/// The audit chain head as of the last commit, known only to the writer
/// (the one connection that appends), so a batch need not read it back.
type Head = Option<(i64, String)>;

/// Runs `jobs` in one transaction and commits it.
fn run_batch(conn: &mut Connection, jobs: &mut [Box<dyn Job>], head: &mut Head) -> StoreResult<()> {
    let known = head.take();
    // On error the transaction rolls back and the head is read again next time.
    let mut tx = Tx {
        sql: conn.transaction_with_behavior(TransactionBehavior::Immediate)?,
        head: known.clone(),
        appended: false,
    };
    for job in jobs.iter_mut() {
        job.run(&mut tx)?;
    }
    let new_head = tx.commit()?;
    *head = new_head.or(known);
    Ok(())
}

/// A write waiting for the writer: runs inside a batch's transaction (again,
/// alone, if its batch failed), and is answered once that has committed.
pub(super) trait Job: Send {
    /// Runs the write in `tx`, keeping its answer until [`Job::answer`].
    fn run(&mut self, tx: &mut Tx<'_>) -> StoreResult<()>;
    /// Answers the caller: the kept answer if `outcome` (the commit) is `Ok`.
    fn answer(self: Box<Self>, outcome: StoreResult<()>);
}

/// A typed write function and the caller waiting for its answer.
struct Call<A, F> {
    write: F,
    kept: Option<A>,
    reply: oneshot::Sender<StoreResult<A>>,
}

impl<A, F> Job for Call<A, F>
where
    A: Send,
    F: FnMut(&mut Tx<'_>) -> StoreResult<A> + Send,
{
    fn run(&mut self, tx: &mut Tx<'_>) -> StoreResult<()> {
        self.kept = Some((self.write)(tx)?);
        Ok(())
    }

    fn answer(self: Box<Self>, outcome: StoreResult<()>) {
        let Call {
            write, kept, reply, ..
        } = *self;
        // Let go of what the write captured (the caller's request, for an
        // insert) before the caller wakes, so it need not copy it.
        drop(write);
        let answer = outcome.and_then(|()| {
            kept.ok_or_else(|| StoreError::Failed("the writer lost an answer".into()))
        });
        let _ = reply.send(answer);
    }
}

/// A job for `write`, and where its answer arrives after the commit.
pub(super) fn job<A, F>(write: F) -> (Box<dyn Job>, oneshot::Receiver<StoreResult<A>>)
where
    A: Send + 'static,
    F: FnMut(&mut Tx<'_>) -> StoreResult<A> + Send + 'static,
{
    let (reply, rx) = oneshot::channel();
    (
        Box::new(Call {
            write,
            kept: None,
            reply,
        }),
        rx,
    )
}

/// A batch's write transaction, with the audit chain's head: each write
/// appends its audit entries as it runs ([`Tx::audit`]), and the head row is
/// updated once, at commit.
pub(super) struct Tx<'c> {
    sql: Transaction<'c>,
    /// The chain head: as of the last commit, then as appended (`None`
    /// until known: read on the first append).
    head: Head,
    appended: bool,
}

impl<'c> std::ops::Deref for Tx<'c> {
    type Target = Transaction<'c>;
    fn deref(&self) -> &Transaction<'c> {
        &self.sql
    }
}

impl Tx<'_> {
    /// Appends sealed events to the audit chain, in this transaction.
    pub(super) fn audit(&mut self, list: &[SealedEvent]) -> StoreResult<()> {
        if list.is_empty() {
            return Ok(());
        }
        let (seq, hash) = match self.head.take() {
            Some(h) => h,
            None => self
                .sql
                .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?,
        };
        let links = audit::chain(seq, &hash, list, |seq, prev, e| {
            audit::sealed_hash(seq, prev, e)
        });
        let mut insert = self.sql.prepare_cached(
            "INSERT INTO audit (seq, at_ms, kind, actor, request_id, detail, prev_hash, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for (e, l) in list.iter().zip(&links) {
            insert.execute(params![
                l.seq,
                e.at_ms,
                e.kind,
                e.actor,
                e.request_id,
                e.detail,
                l.prev_hash,
                l.hash,
            ])?;
        }
        drop(insert);
        self.head = links.last().map(|l| (l.seq, l.hash.clone()));
        self.appended = true;
        Ok(())
    }

    /// Appends events made in the writer (sealed here).
    pub(super) fn audit_events(&mut self, list: &[AuditEvent]) -> StoreResult<()> {
        let sealed: Vec<SealedEvent> = list.iter().map(AuditEvent::seal).collect();
        self.audit(&sealed)
    }

    /// Records the new chain head and commits; returns the head if it moved.
    fn commit(self) -> StoreResult<Head> {
        if self.appended {
            if let Some((seq, hash)) = &self.head {
                self.sql
                    .prepare_cached("UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1")?
                    .execute(params![seq, hash])?;
            }
        }
        self.sql.commit()?;
        Ok(if self.appended { self.head } else { None })
    }
}
