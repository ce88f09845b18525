//! The PostgreSQL writer: one tokio task that group-commits.
//!
//! It takes every write waiting (up to `max_batch`), runs them in one
//! transaction, commits once, and answers each only after the commit. If a
//! write fails, the batch runs again with each write inside its own
//! SAVEPOINT (a write that fails rolls back to it and fails only its own
//! caller); the first run goes without, since a savepoint costs a round
//! trip per write and writes almost never fail. If the commit itself fails, each write runs
//! again alone, as the SQLite writer does. A write is a [`Job`]: one typed
//! async function of [`super::write`] with the caller's arguments.
//!
//! Rows that nothing reads back within the batch (audit entries, requests
//! without an idempotency key) are kept and sent together, in one
//! statement with the chain head's update and the notes
//! ([`super::deferred`]): a batch of policy-decided calls is BEGIN, the
//! head's lock, that statement and COMMIT, however many calls it holds.
//!
//! Several processes may write one database: every transaction first locks
//! the audit chain's head row (`SELECT … FOR UPDATE`), so their appends
//! form one unbroken chain, and since every writer takes that lock before
//! any other, writers of different processes never deadlock on each other.

use super::deferred::{self, AuditRow, Deferred};
use super::notify::{self, Note};
use crate::app::ports::{StoreError, StoreResult};
use crate::domain::audit::{self, AuditEvent, SealedEvent};
use crate::domain::request::ApprovalRequest;
use crate::store::error::sqlx as db;
use futures::future::BoxFuture;
use sqlx::{Executor, PgConnection, PgPool, Postgres};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Write connections per store: the writer uses one at a time (a second
/// lets a batch begin while the last one's connection is being checked).
pub(super) const WRITE_CONNECTIONS: u32 = 2;
/// Writes waiting for the writer; beyond this, callers wait (backpressure).
const WRITE_QUEUE: usize = 8192;
/// Batches smaller than this wait a moment for more when callers have been
/// writing concurrently (the group-commit delay of the SQLite writer). A
/// tokio timer cannot wait less than a millisecond, so the writer yields to
/// the runtime a few times instead: the callers already running get to queue.
const LINGER_BELOW: usize = 8;
const LINGER_YIELDS: usize = 4;

pub(super) enum Msg {
    Job(Box<dyn Job>),
    /// Refuse new writes, commit everything already queued, then stop.
    Stop,
}

/// The running writer, as the store holds it.
pub(super) struct Started {
    pub jobs: mpsc::Sender<Msg>,
    /// Fires once the last queued write has been answered.
    pub done: oneshot::Receiver<()>,
}

/// Writes per transaction at most, whatever `store.max_batch` says: each
/// runs in a savepoint (a subtransaction), and PostgreSQL keeps at most 64
/// of a transaction's subtransaction ids in shared memory; past that,
/// every other session's snapshot must look them up on disk while the
/// transaction runs.
pub const MAX_SAVEPOINTS: usize = 64;

/// Starts the writer task on `pool` (already migrated).
pub(super) fn start(pool: PgPool, origin: Arc<str>, max_batch: usize) -> Started {
    let (jobs, rx) = mpsc::channel(WRITE_QUEUE);
    let (done_tx, done) = oneshot::channel();
    let max_batch = max_batch.clamp(1, MAX_SAVEPOINTS);
    tokio::spawn(async move {
        run(&pool, rx, max_batch, &origin).await;
        pool.close().await;
        let _ = done_tx.send(());
    });
    Started { jobs, done }
}

fn take(msg: Msg, rx: &mut mpsc::Receiver<Msg>, jobs: &mut Vec<Box<dyn Job>>) {
    match msg {
        Msg::Job(job) => jobs.push(job),
        Msg::Stop => rx.close(),
    }
}

fn drain(rx: &mut mpsc::Receiver<Msg>, jobs: &mut Vec<Box<dyn Job>>, max_batch: usize) {
    while jobs.len() < max_batch {
        match rx.try_recv() {
            Ok(msg) => take(msg, rx, jobs),
            Err(_) => break,
        }
    }
}

async fn run(pool: &PgPool, mut rx: mpsc::Receiver<Msg>, max_batch: usize, origin: &Arc<str>) {
    let mut jobs: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    let mut mean_batch = 1.0;
    while let Some(first) = rx.recv().await {
        take(first, &mut rx, &mut jobs);
        drain(&mut rx, &mut jobs, max_batch);
        if mean_batch >= 2.0 && jobs.len() < LINGER_BELOW && !rx.is_closed() {
            for _ in 0..LINGER_YIELDS {
                tokio::task::yield_now().await;
            }
            drain(&mut rx, &mut jobs, max_batch);
        }
        mean_batch = 0.9 * mean_batch + 0.1 * jobs.len() as f64;
        if !jobs.is_empty() {
            write_batch(pool, &mut jobs, origin).await;
        }
    }
}

async fn write_batch(pool: &PgPool, jobs: &mut Vec<Box<dyn Job>>, origin: &Arc<str>) {
    let started = std::time::Instant::now();
    match run_batch(pool, jobs, origin).await {
        Ok(outcomes) => {
            let micros = started.elapsed().as_micros() as u64;
            crate::app::metrics::global()
                .commit_latency
                .observe_micros(micros);
            tracing::trace!(batch = jobs.len(), micros, "committed");
            for (job, outcome) in jobs.drain(..).zip(outcomes) {
                if let Err(e) = &outcome {
                    tracing::debug!(error = %e, "store write refused");
                }
                job.answer(outcome);
            }
        }
        // Nothing ran (no connection): every write fails the same way,
        // without waiting for a connection once per write.
        Err(Failed::Begin(e)) => {
            tracing::error!(error = %e, batch = jobs.len(), "store writes failed");
            for job in jobs.drain(..) {
                job.answer(Err(same(&e)));
            }
        }
        Err(Failed::Batch(e)) if jobs.len() == 1 => {
            tracing::error!(error = %e, "store write failed");
            if let Some(job) = jobs.pop() {
                job.answer(Err(e));
            }
        }
        Err(Failed::Batch(e)) => {
            tracing::warn!(error = %e, batch = jobs.len(), "batch failed; retrying writes one by one");
            for mut job in jobs.drain(..) {
                let outcome = match run_batch(pool, std::slice::from_mut(&mut job), origin).await {
                    Ok(mut o) => o.pop().unwrap_or(Ok(())),
                    Err(Failed::Begin(e) | Failed::Batch(e)) => Err(e),
                };
                if let Err(e) = &outcome {
                    tracing::error!(error = %e, "store write failed");
                }
                job.answer(outcome);
            }
        }
    }
}

/// The same failure again, for each write of a batch that could not start.
fn same(e: &StoreError) -> StoreError {
    let text = e.to_string();
    match e {
        StoreError::Unavailable(_) => StoreError::unavailable(text),
        StoreError::Conflict { retry, .. } => StoreError::Conflict {
            what: text,
            retry: *retry,
        },
        StoreError::ReadOnly(_) => StoreError::ReadOnly(text),
        StoreError::Closed => StoreError::Closed,
        _ => StoreError::Failed(text),
    }
}

enum Failed {
    /// The transaction could not begin: nothing ran.
    Begin(StoreError),
    /// The batch as a whole failed (a savepoint, the head or the commit).
    Batch(StoreError),
}

/// Runs `jobs` in one transaction and commits it: per job, its own outcome
/// (a job that failed was rolled back to its savepoint).
///
/// Boxed, so the future is checked `Send` for the lifetimes it is called
/// with (sqlx's executor bounds are higher-ranked otherwise).
fn run_batch<'a>(
    pool: &'a PgPool,
    jobs: &'a mut [Box<dyn Job>],
    origin: &'a Arc<str>,
) -> BoxFuture<'a, Result<Vec<StoreResult<()>>, Failed>> {
    Box::pin(run_batch_inner(pool, jobs, origin))
}

async fn run_batch_inner(
    pool: &PgPool,
    jobs: &mut [Box<dyn Job>],
    origin: &Arc<str>,
) -> Result<Vec<StoreResult<()>>, Failed> {
    if jobs.len() > 1 {
        // First without savepoints: a savepoint is a round trip per write,
        // and writes almost never fail. If one does, the batch rolls back
        // and runs again below, each write in its savepoint.
        if let Some(done) = run_plain(pool, jobs, origin).await? {
            return Ok(done);
        }
    }
    let mut tx = Tx::begin(pool, origin.clone())
        .await
        .map_err(Failed::Begin)?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    if let [job] = jobs {
        // Alone: the transaction is the job's savepoint; its rows go with
        // the head's update (a failure there is the batch's, and so its).
        if let Err(e) = job.run(&mut tx).await {
            drop(tx);
            return Ok(vec![Err(e)]);
        }
        outcomes.push(Ok(()));
    } else {
        for (i, job) in jobs.iter_mut().enumerate() {
            let mark = if i == 0 {
                "SAVEPOINT job"
            } else {
                "RELEASE SAVEPOINT job; SAVEPOINT job"
            };
            tx.conn()
                .await
                .map_err(Failed::Batch)?
                .execute(mark)
                .await
                .map_err(|e| Failed::Batch(db(e)))?;
            let before = tx.mark();
            // The job's rows are sent inside its savepoint, so a row that
            // fails fails its own write only.
            let outcome = match job.run(&mut tx).await {
                Ok(()) => tx.flush().await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => outcomes.push(Ok(())),
                Err(e) => {
                    tx.reset(before);
                    tx.conn()
                        .await
                        .map_err(Failed::Batch)?
                        .execute("ROLLBACK TO SAVEPOINT job")
                        .await
                        .map_err(|e| Failed::Batch(db(e)))?;
                    outcomes.push(Err(e));
                }
            }
        }
    }
    tx.finish().await.map_err(Failed::Batch)?;
    tx.commit().await.map_err(Failed::Batch)?;
    Ok(outcomes)
}

/// Runs `jobs` in one transaction without savepoints and commits it;
/// `None` (rolled back) if any of them failed.
async fn run_plain(
    pool: &PgPool,
    jobs: &mut [Box<dyn Job>],
    origin: &Arc<str>,
) -> Result<Option<Vec<StoreResult<()>>>, Failed> {
    let mut tx = Tx::begin(pool, origin.clone())
        .await
        .map_err(Failed::Begin)?;
    for job in jobs.iter_mut() {
        if let Err(e) = job.run(&mut tx).await {
            tracing::debug!(error = %e, "a write of the batch failed; the batch runs again with savepoints");
            return Ok(None);
        }
    }
    // The batch's rows (one statement for all its writes): if one fails,
    // which is not known here, so the batch runs again with savepoints.
    if let Err(e) = tx.finish().await {
        tracing::debug!(error = %e, "the batch's rows failed; the batch runs again with savepoints");
        return Ok(None);
    }
    tx.commit().await.map_err(Failed::Batch)?;
    Ok(Some(jobs.iter().map(|_| Ok(())).collect()))
}

/// A write waiting for the writer: runs inside a batch's transaction (again,
/// alone, if its batch failed), and is answered once that has committed.
pub(super) trait Job: Send {
    /// Runs the write in `tx`, keeping its answer until [`Job::answer`].
    fn run<'a>(&'a mut self, tx: &'a mut Tx) -> BoxFuture<'a, StoreResult<()>>;
    /// Answers the caller: the kept answer if `outcome` (the commit) is `Ok`.
    fn answer(self: Box<Self>, outcome: StoreResult<()>);
}

struct Call<A, F> {
    write: F,
    kept: Option<A>,
    reply: oneshot::Sender<StoreResult<A>>,
}

impl<A, F> Job for Call<A, F>
where
    A: Send,
    F: for<'t> FnMut(&'t mut Tx) -> BoxFuture<'t, StoreResult<A>> + Send,
{
    fn run<'a>(&'a mut self, tx: &'a mut Tx) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            self.kept = None;
            self.kept = Some((self.write)(tx).await?);
            Ok(())
        })
    }

    fn answer(self: Box<Self>, outcome: StoreResult<()>) {
        let Call {
            write, kept, reply, ..
        } = *self;
        drop(write);
        let answer = outcome.and_then(|()| {
            kept.ok_or_else(|| StoreError::Failed("the writer lost an answer".into()))
        });
        let _ = reply.send(answer);
    }
}

/// A job for `write`, and where its answer arrives after the commit.
/// `write` may run more than once (its batch failed): it builds a fresh
/// future from what it captured each time.
pub(super) fn job<A, F>(write: F) -> (Box<dyn Job>, oneshot::Receiver<StoreResult<A>>)
where
    A: Send + 'static,
    F: for<'t> FnMut(&'t mut Tx) -> BoxFuture<'t, StoreResult<A>> + Send + 'static,
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

/// A batch's write transaction: the audit chain's head, locked at its
/// start, then moved by each append; the rows appended and not sent yet
/// ([`Deferred`]); the notes to send at commit.
pub(super) struct Tx {
    sql: sqlx::Transaction<'static, Postgres>,
    head: (i64, String),
    appended: bool,
    origin: Arc<str>,
    /// Payloads for `pg_notify`, sent just before the commit.
    notes: Vec<String>,
    rows: Deferred,
}

/// Where a job started, to undo its effects on the [`Tx`] when it rolls back.
pub(super) struct Mark {
    head: (i64, String),
    appended: bool,
    notes: usize,
    rows: deferred::Len,
}

impl Tx {
    /// Begins on a pooled connection and locks the chain head. Pooled
    /// connections are not pinged on the way out, so one the database
    /// dropped while it sat idle (a restart) fails here: it is let go and
    /// the next one tried, before any write ran.
    async fn begin(pool: &PgPool, origin: Arc<str>) -> StoreResult<Tx> {
        let mut attempt = 0;
        let (sql, head) = loop {
            attempt += 1;
            match Self::lock_head(pool).await {
                Err(e) if e.is_retryable() && attempt <= WRITE_CONNECTIONS => {
                    tracing::debug!(error = %e, "a pooled connection failed; trying another");
                }
                other => break other?,
            }
        };
        Ok(Tx {
            sql,
            head,
            appended: false,
            origin,
            notes: Vec::new(),
            rows: Deferred::default(),
        })
    }

    async fn lock_head(
        pool: &PgPool,
    ) -> StoreResult<(sqlx::Transaction<'static, Postgres>, (i64, String))> {
        let mut sql = pool.begin().await.map_err(db)?;
        let head = sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *sql)
            .await
            .map_err(db)?;
        Ok((sql, head))
    }

    /// The transaction's connection, for a write's statements: the rows
    /// appended so far are sent first, so every statement sees them.
    pub(super) async fn conn(&mut self) -> StoreResult<&mut PgConnection> {
        self.flush().await?;
        Ok(&mut *self.sql)
    }

    /// Sends the rows appended so far (one statement, if there are any).
    async fn flush(&mut self) -> StoreResult<()> {
        deferred::send(&mut self.sql, &mut self.rows, None, &[]).await
    }

    fn mark(&self) -> Mark {
        Mark {
            head: self.head.clone(),
            appended: self.appended,
            notes: self.notes.len(),
            rows: self.rows.len(),
        }
    }

    fn reset(&mut self, m: Mark) {
        self.head = m.head;
        self.appended = m.appended;
        self.notes.truncate(m.notes);
        self.rows.truncate(m.rows);
    }

    /// Queues a note for the other processes, sent in this transaction.
    pub(super) fn note(&mut self, note: Note) {
        self.notes.push(notify::payload(&self.origin, note));
    }

    /// Stores a new request that has no idempotency key (nothing can
    /// conflict with it but its id), with the batch's other rows.
    pub(super) fn insert_request(&mut self, r: &ApprovalRequest, caps: i64) {
        self.rows.request(r, caps);
    }

    /// Appends sealed events to the audit chain, in this transaction: they
    /// are chained here and sent with the batch's other rows.
    pub(super) async fn audit(&mut self, list: &[SealedEvent]) -> StoreResult<()> {
        if list.is_empty() {
            return Ok(());
        }
        let (seq, hash) = &self.head;
        let links = audit::chain(*seq, hash, list, |seq, prev, e| {
            audit::sealed_hash(seq, prev, e)
        });
        if let Some(l) = links.last() {
            self.head = (l.seq, l.hash.clone());
            self.appended = true;
        }
        self.rows
            .audit(links.into_iter().zip(list).map(|(l, e)| AuditRow {
                seq: l.seq,
                at_ms: e.at_ms,
                kind: e.kind.clone(),
                actor: e.actor.clone(),
                request_id: e.request_id.clone(),
                detail: e.detail.clone(),
                prev_hash: l.prev_hash,
                hash: l.hash,
            }));
        Ok(())
    }

    /// Appends events made in the writer (sealed here).
    pub(super) async fn audit_events(&mut self, list: &[AuditEvent]) -> StoreResult<()> {
        let sealed: Vec<SealedEvent> = list.iter().map(AuditEvent::seal).collect();
        self.audit(&sealed).await
    }

    /// Sends the rows not sent yet, records the new chain head and sends
    /// the notes, in one statement: all that is left before the commit.
    async fn finish(&mut self) -> StoreResult<()> {
        let head = self.appended.then_some(&self.head);
        deferred::send(&mut self.sql, &mut self.rows, head, &self.notes).await?;
        self.appended = false;
        self.notes.clear();
        Ok(())
    }

    async fn commit(self) -> StoreResult<()> {
        self.sql.commit().await.map_err(db)
    }
}
