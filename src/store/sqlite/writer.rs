//! The one SQLite writer: a dedicated thread that owns the write connection
//! and group-commits.
//!
//! It takes every write waiting (up to `max_batch`), runs them in one
//! transaction with their audit entries, and answers each only after the
//! commit: many callers, one commit. Writes run on rusqlite, synchronously:
//! sqlx hands every statement to its own worker thread and back, and on the
//! hot path those hand-offs cost more than SQLite itself (measured with
//! `keyturn bench`: see the README). Reads, migrations and the checkpointer
//! stay on sqlx.

use super::RequestRow;
use crate::app::ports::{PairedUser, PairingRefused, Pruned, StoreError, StoreResult, Voted};
use crate::domain::audit::{self, events, SealedEvent};
use crate::domain::pairing;
use crate::domain::policy::{Effect, Grant, Scope, ToolPattern};
use crate::domain::request::{self, ApprovalRequest, RequestId, TransitionError, Vote, VoteEffect};
use crate::domain::trifecta::{self, Guard, ToolTag};
use crate::domain::Risk;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::json;
use std::borrow::Cow;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Writes waiting for the writer; beyond this, callers wait (backpressure).
const WRITE_QUEUE: usize = 8192;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

pub(super) enum Msg {
    Job(Job),
    /// Refuse new writes, commit everything already queued, then stop.
    Stop,
}

pub(super) struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<StoreResult<Reply>>,
}

pub(super) enum Op {
    /// The caller keeps its own handle on the request, so the writer never
    /// copies it (unless the trifecta guard changes it).
    Insert(Arc<ApprovalRequest>, Vec<SealedEvent>, Option<Guard>),
    Vote(RequestId, Vote),
    Cancel(RequestId, String, Option<String>, i64),
    TimeOut(RequestId, i64),
    AddGrant(Grant, String, i64),
    RemoveGrant(Scope, ToolPattern, Effect, String, i64),
    SetRisk(String, Option<Risk>, String, i64),
    Pair(PairedUser),
    Unpair(String, String, i64),
    CreateCode {
        user_id: String,
        display_name: Option<String>,
        code_hash: String,
        now_ms: i64,
        expires_ms: i64,
        max_live: usize,
    },
    Redeem(String, String, i64),
    Audit(Vec<SealedEvent>),
    PruneAudit(i64, i64),
    CardTouch(RequestId, u64, i64),
    CardReconcile(u64),
    CardDone(RequestId, u64, i64, String),
    /// Every waiting card due now (Discord answered again).
    CardsRetryNow(i64),
    CardRetry(RequestId, i64, i64),
}

pub(super) enum Reply {
    /// Stored as new: the caller's request as it sent it.
    InsertedNew,
    /// Stored as new, as the trifecta guard changed it.
    Guarded(ApprovalRequest),
    /// The agent had already submitted this idempotency key for this call.
    Existing(ApprovalRequest),
    /// The key was used for a different call: refused and audited.
    Conflict(ApprovalRequest),
    Voted(Result<Voted, TransitionError>),
    Finished(Result<ApprovalRequest, TransitionError>),
    Bool(bool),
    Unit,
    Code(Result<(), PairingRefused>),
    Redeemed(Option<PairedUser>),
    Pruned(Option<Pruned>),
    Count(u64),
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
        .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
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
        return Err(StoreError::Database(format!(
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
                StoreError::Database(format!("cannot stat the database {}: {e}", path.display()))
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
                StoreError::Database(format!("cannot start the checkpointer thread: {e}"))
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
fn take(msg: Msg, rx: &mut mpsc::Receiver<Msg>, jobs: &mut Vec<Job>) {
    match msg {
        Msg::Job(job) => jobs.push(job),
        Msg::Stop => rx.close(),
    }
}

/// Takes what is queued, up to `max_batch` jobs in all.
fn drain(rx: &mut mpsc::Receiver<Msg>, jobs: &mut Vec<Job>, max_batch: usize) {
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
    let mut jobs: Vec<Job> = Vec::with_capacity(max_batch);
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

fn write_batch(conn: &mut Connection, jobs: &mut Vec<Job>, head: &mut Head, guard: &FileGuard) {
    // A lost database file refuses everything, without touching it.
    if let Some(why) = guard.lost.get() {
        refuse_all(jobs, why);
        return;
    }
    let ops: Vec<&Op> = jobs.iter().map(|j| &j.op).collect();
    let started = std::time::Instant::now();
    // Committed is not enough: the commit must have gone into the file the
    // path names, or nothing of it survives a restart (see `FileGuard`).
    match run_batch(conn, &ops, head).and_then(|r| guard.check().map(|()| r)) {
        Ok(replies) => {
            let micros = started.elapsed().as_micros() as u64;
            crate::app::metrics::global()
                .commit_latency
                .observe_micros(micros);
            tracing::trace!(batch = ops.len(), micros, "committed");
            for (Job { op, reply: tx }, reply) in jobs.drain(..).zip(replies) {
                // Let go of the caller's request before it wakes (see `Op::Insert`).
                drop(op);
                let _ = tx.send(Ok(reply));
            }
        }
        // Not the batch's fault: retrying would only write into the lost file again.
        Err(StoreError::FileLost(why)) => refuse_all(jobs, &why),
        Err(e) if jobs.len() == 1 => {
            tracing::error!(error = %e, "store write failed");
            if let Some(job) = jobs.pop() {
                let _ = job.reply.send(Err(e));
            }
        }
        Err(e) => {
            // One bad write must not fail its neighbours: retry each alone.
            tracing::warn!(error = %e, batch = jobs.len(), "batch failed; retrying writes one by one");
            for job in jobs.drain(..) {
                let r = run_batch(conn, &[&job.op], head)
                    .and_then(|r| guard.check().map(|()| r))
                    .and_then(|mut v| {
                        v.pop()
                            .ok_or_else(|| StoreError::Database("the writer lost a reply".into()))
                    });
                if let Err(e) = &r {
                    tracing::error!(error = %e, "store write failed");
                }
                let _ = job.reply.send(r);
            }
        }
    }
}

fn refuse_all(jobs: &mut Vec<Job>, why: &str) {
    for job in jobs.drain(..) {
        let _ = job.reply.send(Err(StoreError::FileLost(why.to_string())));
    }
}

/// The audit chain head as of the last commit, known only to the writer
/// (the one connection that appends), so a batch need not read it back.
type Head = Option<(i64, String)>;

fn run_batch(conn: &mut Connection, ops: &[&Op], head: &mut Head) -> StoreResult<Vec<Reply>> {
    let known = head.take();
    // On error the transaction rolls back and the head is read again next time.
    let (replies, new_head) = run_batch_inner(conn, ops, known.clone())?;
    *head = new_head.or(known);
    Ok(replies)
}

fn run_batch_inner(
    conn: &mut Connection,
    ops: &[&Op],
    head: Head,
) -> StoreResult<(Vec<Reply>, Head)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut replies = Vec::with_capacity(ops.len());
    let mut audit_events = Vec::new();
    for op in ops {
        replies.push(exec(&tx, op, &mut audit_events)?);
    }
    let mut new_head = None;
    if !audit_events.is_empty() {
        new_head = Some(append_audit(&tx, audit_events, head)?);
    }
    tx.commit()?;
    Ok((replies, new_head))
}

/// A batch's audit events: those its callers sealed, borrowed, and those the
/// writer makes (votes, resolutions, admin changes).
type Events<'a> = Vec<Cow<'a, SealedEvent>>;

fn exec<'a>(tx: &Transaction<'_>, op: &'a Op, ev: &mut Events<'a>) -> StoreResult<Reply> {
    Ok(match op {
        Op::Insert(req, audit, guard) => {
            // Looked up and inserted in one write transaction by the one
            // writer: a concurrent submit with the same key sees this row.
            let fingerprint = req.idempotency_key.as_ref().map(|_| req.fingerprint());
            if let (Some(key), Some(fp)) = (&req.idempotency_key, &fingerprint) {
                let existing = tx
                    .prepare_cached(
                        "SELECT * FROM requests WHERE agent = ?1 AND idempotency_key = ?2",
                    )?
                    .query_row(params![req.agent, key], |r| {
                        Ok((
                            request_row(r)?,
                            r.get::<_, Option<String>>("idempotency_fp")?,
                        ))
                    })
                    .optional()?;
                if let Some((row, stored)) = existing {
                    let existing = row.into_request()?;
                    // A row without a fingerprint cannot prove it was this call.
                    if stored.as_deref() == Some(fp.as_str()) {
                        return Ok(Reply::Existing(existing));
                    }
                    ev.push(Cow::Owned(
                        events::idempotency_conflict(
                            req.created_ms,
                            &existing,
                            &req.tool,
                            &req.args_hash,
                        )
                        .seal(),
                    ));
                    return Ok(Reply::Conflict(existing));
                }
            }
            let caps = guard.as_ref().map_or(0, |g| trifecta::bits(&g.tags));
            if let Some(g) = guard {
                // Read and decided in this transaction: a call stored earlier
                // in the same batch is already in the history.
                let history = trifecta_history(tx, req, g.since_ms)?;
                if let Some((changed, events)) = trifecta::guard(req, &history, g) {
                    insert_request(tx, &changed, caps, fingerprint.as_deref())?;
                    ev.extend(events.iter().map(|e| Cow::Owned(e.seal())));
                    return Ok(Reply::Guarded(changed));
                }
            }
            insert_request(tx, req, caps, fingerprint.as_deref())?;
            ev.extend(audit.iter().map(Cow::Borrowed));
            Reply::InsertedNew
        }
        Op::Vote(id, vote) => {
            let Some(mut req) = load(tx, *id)? else {
                return Ok(Reply::Voted(Err(TransitionError::NotFound)));
            };
            let earlier = load_votes(tx, *id)?;
            let effect = match request::apply_vote(&req, &earlier, vote) {
                Ok(e) => e,
                Err(e) => return Ok(Reply::Voted(Err(e))),
            };
            tx.prepare_cached(
                "INSERT INTO votes (request_id, voter, name, approve, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![id.to_string(), vote.voter, vote.name, vote.approve, vote.reason, vote.at_ms])?;
            ev.push(Cow::Owned(events::vote(&req, vote).seal()));
            let (have, need) = match effect {
                VoteEffect::Recorded { have, need } => (have, need),
                VoteEffect::Resolved(res) => {
                    req.resolve(&res);
                    resolve(tx, &req)?;
                    ev.push(Cow::Owned(events::resolved(&req).seal()));
                    let need = req.approvals_required.max(1);
                    (if vote.approve { need } else { 0 }, need)
                }
            };
            Reply::Voted(Ok(Voted {
                request: req,
                have,
                need,
            }))
        }
        Op::Cancel(id, who, reason, now) => finish(tx, *id, ev, |r| {
            request::cancel(r, who, reason.clone(), *now)
        })?,
        Op::TimeOut(id, now) => finish(tx, *id, ev, |r| request::time_out(r, *now))?,
        Op::AddGrant(g, by, now) => {
            let done = tx
                .prepare_cached(
                    "INSERT INTO grants (scope, tool, effect, created_by, created_ms) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )?
                .execute(params![g.scope.to_string(), g.tool.as_str(), effect_str(g.effect), by, now])?
                == 1;
            if done {
                ev.push(Cow::Owned(
                    events::admin(
                        *now,
                        "grant_added",
                        by,
                        json!({"scope": g.scope, "tool": g.tool, "effect": g.effect}),
                    )
                    .seal(),
                ));
            }
            Reply::Bool(done)
        }
        Op::RemoveGrant(scope, tool, effect, by, now) => {
            let done =
                tx.prepare_cached(
                    "DELETE FROM grants WHERE scope = ?1 AND tool = ?2 AND effect = ?3",
                )?
                .execute(params![
                    scope.to_string(),
                    tool.as_str(),
                    effect_str(*effect)
                ])? == 1;
            if done {
                ev.push(Cow::Owned(
                    events::admin(
                        *now,
                        "grant_removed",
                        by,
                        json!({"scope": scope, "tool": tool, "effect": effect}),
                    )
                    .seal(),
                ));
            }
            Reply::Bool(done)
        }
        Op::SetRisk(tool, risk, by, now) => {
            match risk {
                Some(r) => {
                    tx.prepare_cached(
                        "INSERT INTO tool_risks (tool, risk, set_by, set_ms) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (tool) DO UPDATE SET risk = excluded.risk, set_by = excluded.set_by, set_ms = excluded.set_ms",
                    )?
                    .execute(params![tool, r.as_str(), by, now])?;
                }
                None => {
                    tx.prepare_cached("DELETE FROM tool_risks WHERE tool = ?1")?
                        .execute(params![tool])?;
                }
            }
            ev.push(Cow::Owned(
                events::admin(*now, "risk_set", by, json!({"tool": tool, "risk": risk})).seal(),
            ));
            Reply::Unit
        }
        Op::Pair(u) => {
            let done = insert_paired(tx, u)?;
            if done {
                ev.push(Cow::Owned(
                    events::admin(
                        u.paired_ms,
                        "user_paired",
                        &u.paired_by,
                        json!({"user_id": u.user_id, "roles": u.roles}),
                    )
                    .seal(),
                ));
            }
            Reply::Bool(done)
        }
        Op::Unpair(user_id, by, now) => {
            let done = tx
                .prepare_cached("DELETE FROM paired_users WHERE user_id = ?1")?
                .execute(params![user_id])?
                == 1;
            tx.prepare_cached("DELETE FROM pairing_codes WHERE user_id = ?1")?
                .execute(params![user_id])?;
            if done {
                ev.push(Cow::Owned(
                    events::admin(*now, "pairing_revoked", by, json!({"user_id": user_id})).seal(),
                ));
            }
            Reply::Bool(done)
        }
        Op::CreateCode {
            user_id,
            display_name,
            code_hash,
            now_ms,
            expires_ms,
            max_live,
        } => {
            let paired = tx
                .prepare_cached("SELECT 1 FROM paired_users WHERE user_id = ?1")?
                .exists(params![user_id])?;
            if paired {
                return Ok(Reply::Code(Err(PairingRefused::AlreadyPaired(
                    user_id.clone(),
                ))));
            }
            tx.prepare_cached("DELETE FROM pairing_codes WHERE expires_ms <= ?1 OR user_id = ?2")?
                .execute(params![now_ms, user_id])?;
            let live: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM pairing_codes")?
                .query_row([], |r| r.get(0))?;
            if live as usize >= *max_live {
                return Ok(Reply::Code(Err(PairingRefused::TooManyCodes(*max_live))));
            }
            tx.prepare_cached(
                "INSERT INTO pairing_codes (code_hash, user_id, display_name, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![code_hash, user_id, display_name, now_ms, expires_ms])?;
            ev.push(Cow::Owned(
                events::admin(
                    *now_ms,
                    "pairing_requested",
                    &format!("user:{user_id}"),
                    json!({"user_id": user_id, "expires_ms": expires_ms}),
                )
                .seal(),
            ));
            Reply::Code(Ok(()))
        }
        Op::Redeem(code, by, now) => {
            let live: Vec<(String, String, Option<String>)> = tx
                .prepare_cached(
                    "SELECT code_hash, user_id, display_name FROM pairing_codes WHERE expires_ms > ?1",
                )?
                .query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            // Compare against every live hash in constant time; no early exit.
            let mut found = None;
            for (hash, user_id, name) in live {
                if pairing::matches(code, &hash) {
                    found = Some((hash, user_id, name));
                }
            }
            let Some((hash, user_id, display_name)) = found else {
                return Ok(Reply::Redeemed(None));
            };
            tx.prepare_cached("DELETE FROM pairing_codes WHERE code_hash = ?1")?
                .execute(params![hash])?;
            let user = PairedUser {
                user_id,
                roles: vec![],
                display_name,
                paired_by: by.clone(),
                paired_ms: *now,
            };
            insert_paired(tx, &user)?;
            ev.push(Cow::Owned(
                events::admin(
                    *now,
                    "pairing_approved",
                    by,
                    json!({"user_id": user.user_id}),
                )
                .seal(),
            ));
            Reply::Redeemed(Some(user))
        }
        Op::Audit(list) => {
            ev.extend(list.iter().map(Cow::Borrowed));
            Reply::Unit
        }
        Op::PruneAudit(cutoff, now) => Reply::Pruned(prune_audit(tx, ev, *cutoff, *now)?),
        Op::CardTouch(id, channel, deadline) => {
            tx.prepare_cached(
                "INSERT INTO discord_cards (request_id, channel_id, deadline_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (request_id) DO UPDATE SET want = want + 1, attempts = 0, next_attempt_ms = 0",
            )?
            .execute(params![id.to_string(), *channel as i64, deadline])?;
            Reply::Unit
        }
        Op::CardReconcile(channel) => {
            let added = tx
                .prepare_cached(
                    "INSERT INTO discord_cards (request_id, channel_id, deadline_ms) \
                     SELECT id, ?1, deadline_ms FROM requests r WHERE r.state = 'pending' \
                     AND NOT EXISTS (SELECT 1 FROM discord_cards c WHERE c.request_id = r.id)",
                )?
                .execute(params![*channel as i64])?;
            let stale = tx
                .prepare_cached(
                    "UPDATE discord_cards SET want = done + 1, attempts = 0, next_attempt_ms = 0 \
                     WHERE want <= done AND rendered_state IS NOT \
                     (SELECT state FROM requests r WHERE r.id = discord_cards.request_id)",
                )?
                .execute([])?;
            Reply::Count((added + stale) as u64)
        }
        Op::CardDone(id, message, version, state) => {
            tx.prepare_cached(
                "UPDATE discord_cards SET message_id = ?1, done = MAX(done, ?2), rendered_state = ?3, \
                 attempts = 0, next_attempt_ms = 0 WHERE request_id = ?4",
            )?
            .execute(params![*message as i64, version, state, id.to_string()])?;
            Reply::Unit
        }
        Op::CardsRetryNow(now) => {
            let n = tx
                .prepare_cached(
                    "UPDATE discord_cards SET next_attempt_ms = 0 \
                     WHERE want > done AND next_attempt_ms > ?1",
                )?
                .execute(params![now])?;
            Reply::Count(n as u64)
        }
        Op::CardRetry(id, attempts, next) => {
            tx.prepare_cached(
                "UPDATE discord_cards SET attempts = ?1, next_attempt_ms = ?2 WHERE request_id = ?3",
            )?
            .execute(params![attempts, next, id.to_string()])?;
            Reply::Unit
        }
    })
}

/// Deletes the oldest prefix of the log older than `cutoff` and queues the
/// checkpoint that accounts for it (appended with this batch's events).
fn prune_audit(
    tx: &Transaction<'_>,
    ev: &mut Events<'_>,
    cutoff: i64,
    now: i64,
) -> StoreResult<Option<Pruned>> {
    // The prefix ends just before the first entry that is young enough.
    let young: Option<i64> = tx
        .prepare_cached("SELECT MIN(seq) FROM audit WHERE at_ms >= ?1")?
        .query_row(params![cutoff], |r| r.get(0))?;
    let last: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, hash FROM audit WHERE seq < ?1 ORDER BY seq DESC LIMIT 1")?
        .query_row(params![young.unwrap_or(i64::MAX)], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((through_seq, through_hash)) = last else {
        return Ok(None);
    };
    let entries = tx
        .prepare_cached("DELETE FROM audit WHERE seq <= ?1")?
        .execute(params![through_seq])? as u64;
    ev.push(Cow::Owned(
        audit::checkpoint(now, (through_seq, &through_hash), entries, cutoff).seal(),
    ));
    Ok(Some(Pruned {
        entries,
        through_seq,
        through_hash,
    }))
}

fn finish(
    tx: &Transaction<'_>,
    id: RequestId,
    ev: &mut Events<'_>,
    transition: impl FnOnce(&ApprovalRequest) -> Result<request::Resolution, TransitionError>,
) -> StoreResult<Reply> {
    let Some(mut req) = load(tx, id)? else {
        return Ok(Reply::Finished(Err(TransitionError::NotFound)));
    };
    match transition(&req) {
        Ok(res) => {
            req.resolve(&res);
            resolve(tx, &req)?;
            ev.push(Cow::Owned(events::resolved(&req).seal()));
            Ok(Reply::Finished(Ok(req)))
        }
        Err(e) => Ok(Reply::Finished(Err(e))),
    }
}

fn insert_paired(tx: &Transaction<'_>, u: &PairedUser) -> StoreResult<bool> {
    let roles = serde_json::to_string(&u.roles).unwrap_or_else(|_| "[]".into());
    Ok(tx
        .prepare_cached(
            "INSERT INTO paired_users (user_id, roles, display_name, paired_by, paired_ms) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )?
        .execute(params![u.user_id, roles, u.display_name, u.paired_by, u.paired_ms])?
        == 1)
}

fn effect_str(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}

/// The trifecta history of `req`'s agent and user, in this transaction.
fn trifecta_history(
    tx: &Transaction<'_>,
    req: &ApprovalRequest,
    since_ms: i64,
) -> StoreResult<Vec<(String, Vec<ToolTag>)>> {
    let mut out = Vec::new();
    for tag in trifecta::ALL_TAGS {
        for (column, key) in [
            ("agent", Some(req.agent.as_str())),
            ("user_id", req.user_id.as_deref()),
        ] {
            let Some(key) = key else { continue };
            let mut stmt = tx.prepare_cached(&super::history_sql(column, tag.bit()))?;
            let rows = stmt.query_map(params![key, since_ms], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            for row in rows {
                out.push(super::history_entry(&req.agent, tag, row?));
            }
        }
    }
    Ok(out)
}

fn insert_request(
    tx: &Transaction<'_>,
    r: &ApprovalRequest,
    caps: i64,
    idempotency_fp: Option<&str>,
) -> StoreResult<()> {
    let flags = serde_json::Value::Array(r.flags.clone()).to_string();
    tx.prepare_cached(
        "INSERT INTO requests (id, agent, tool, args, args_hash, user_id, channel_id, justification, \
         task_id, idempotency_key, risk, approvals_required, admin_only, rule, rule_detail, flags, \
         created_ms, deadline_ms, state, decided_by, decided_who, decided_reason, decided_ms, \
         requester_uid, caps, idempotency_fp) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)",
    )?
    .execute(params![
        r.id.to_string(),
        r.agent,
        r.tool,
        r.args.to_string(),
        r.args_hash,
        r.user_id,
        r.channel_id,
        r.justification,
        r.task_id,
        r.idempotency_key,
        r.risk.as_str(),
        r.approvals_required as i64,
        r.admin_only,
        r.rule,
        r.rule_detail,
        flags,
        r.created_ms,
        r.deadline_ms,
        r.state.as_str(),
        r.decided_by.map(|d| d.as_str()),
        r.decided_who,
        r.decided_reason,
        r.decided_ms,
        r.requester_uid,
        caps,
        idempotency_fp,
    ])?;
    Ok(())
}

/// The conditional update that makes exactly one terminal state win.
fn resolve(tx: &Transaction<'_>, r: &ApprovalRequest) -> StoreResult<()> {
    let n = tx
        .prepare_cached(
            "UPDATE requests SET state = ?1, decided_by = ?2, decided_who = ?3, decided_reason = ?4, decided_ms = ?5 \
             WHERE id = ?6 AND state = 'pending'",
        )?
        .execute(params![
            r.state.as_str(),
            r.decided_by.map(|d| d.as_str()),
            r.decided_who,
            r.decided_reason,
            r.decided_ms,
            r.id.to_string(),
        ])?;
    if n != 1 {
        // Cannot happen with one writer; if it does, refuse rather than report a win.
        return Err(StoreError::Database(format!(
            "request {} was no longer pending",
            r.id
        )));
    }
    Ok(())
}

fn load(tx: &Transaction<'_>, id: RequestId) -> StoreResult<Option<ApprovalRequest>> {
    tx.prepare_cached("SELECT * FROM requests WHERE id = ?1")?
        .query_row(params![id.to_string()], request_row)
        .optional()?
        .map(RequestRow::into_request)
        .transpose()
}

fn load_votes(tx: &Transaction<'_>, id: RequestId) -> StoreResult<Vec<Vote>> {
    let mut stmt = tx.prepare_cached(
        "SELECT voter, name, approve, reason, at_ms FROM votes WHERE request_id = ?1 ORDER BY at_ms, voter",
    )?;
    let rows = stmt.query_map(params![id.to_string()], |r| {
        Ok(Vote {
            voter: r.get(0)?,
            name: r.get(1)?,
            approve: r.get(2)?,
            reason: r.get(3)?,
            at_ms: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn request_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRow> {
    Ok(RequestRow {
        id: r.get("id")?,
        agent: r.get("agent")?,
        tool: r.get("tool")?,
        args: r.get("args")?,
        args_hash: r.get("args_hash")?,
        user_id: r.get("user_id")?,
        channel_id: r.get("channel_id")?,
        justification: r.get("justification")?,
        task_id: r.get("task_id")?,
        idempotency_key: r.get("idempotency_key")?,
        risk: r.get("risk")?,
        approvals_required: r.get("approvals_required")?,
        admin_only: r.get("admin_only")?,
        rule: r.get("rule")?,
        rule_detail: r.get("rule_detail")?,
        flags: r.get("flags")?,
        created_ms: r.get("created_ms")?,
        deadline_ms: r.get("deadline_ms")?,
        state: r.get("state")?,
        decided_by: r.get("decided_by")?,
        decided_who: r.get("decided_who")?,
        decided_reason: r.get("decided_reason")?,
        decided_ms: r.get("decided_ms")?,
        requester_uid: r.get("requester_uid")?,
    })
}

fn append_audit(tx: &Transaction<'_>, list: Events<'_>, head: Head) -> StoreResult<(i64, String)> {
    let (seq, hash): (i64, String) = match head {
        Some(h) => h,
        None => tx
            .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?,
    };
    let links = audit::chain(seq, &hash, &list, |seq, prev, e| {
        audit::sealed_hash(seq, prev, e)
    });
    let mut insert = tx.prepare_cached(
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
    let Some(last) = links.last() else {
        return Ok((seq, hash));
    };
    tx.prepare_cached("UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1")?
        .execute(params![last.seq, last.hash])?;
    Ok((last.seq, last.hash.clone()))
}
