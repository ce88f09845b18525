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
//! statement, before any other statement of the batch and at its end with
//! the chain head's update and the notes ([`super::deferred`]). A batch
//! whose writes only append (policy-decided calls) begins no transaction
//! at all: that one statement is its own transaction, from the chain head
//! the writer last saw, and writes nothing if the head has moved since
//! (another process appended); the batch then begins a transaction, locks
//! and reads the head, and sends the same rows chained after it. So such a
//! batch is one round trip and one commit's WAL flush, however many calls
//! it holds, and is committed before any of them is answered.
//!
//! Several processes may write one database: every transaction first locks
//! the audit chain's head row (`SELECT … FOR UPDATE`, or the update of the
//! statement that runs alone), so their appends form one unbroken chain,
//! and since every writer takes that lock before any other, writers of
//! different processes never deadlock on each other.

use super::deferred::{self, Deferred, Head};
use super::notify::{self, Note};
use crate::app::ports::{StoreError, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
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
    let mut chain = Chain::default();
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
            write_batch(pool, &mut jobs, origin, &mut chain).await;
        }
    }
}

/// What the writer knows of the audit chain between batches.
#[derive(Default)]
struct Chain {
    /// The head the last batch left (`None` after a failure).
    seen: Option<(i64, String)>,
    /// Batches left before a batch runs alone again: after one found the
    /// head moved (another process writes too), the next few begin a
    /// transaction at once rather than pay for a statement that did nothing.
    cold: u32,
}

/// Batches that begin a transaction at once after one found the head moved.
const COLD_BATCHES: u32 = 8;

impl Chain {
    fn seen(&self) -> Option<(i64, String)> {
        if self.cold > 0 {
            None
        } else {
            self.seen.clone()
        }
    }

    fn after(&mut self, left: Left) {
        self.cold = self.cold.saturating_sub(1);
        if left.moved {
            self.cold = COLD_BATCHES;
        }
        self.seen = left.head;
    }
}

async fn write_batch(
    pool: &PgPool,
    jobs: &mut Vec<Box<dyn Job>>,
    origin: &Arc<str>,
    chain: &mut Chain,
) {
    let started = std::time::Instant::now();
    match run_batch(pool, jobs, origin, chain.seen()).await {
        Ok((outcomes, left)) => {
            chain.after(left);
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
            chain.after(Left::default());
            tracing::error!(error = %e, batch = jobs.len(), "store writes failed");
            for job in jobs.drain(..) {
                job.answer(Err(same(&e)));
            }
        }
        Err(Failed::Batch(e)) if jobs.len() == 1 => {
            chain.after(Left::default());
            tracing::error!(error = %e, "store write failed");
            if let Some(job) = jobs.pop() {
                job.answer(Err(e));
            }
        }
        Err(Failed::Batch(e)) => {
            chain.after(Left::default());
            tracing::warn!(error = %e, batch = jobs.len(), "batch failed; retrying writes one by one");
            for mut job in jobs.drain(..) {
                let outcome =
                    match run_batch(pool, std::slice::from_mut(&mut job), origin, None).await {
                        Ok((mut o, _)) => o.pop().unwrap_or(Ok(())),
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

/// Per job, its own outcome, and what the batch left of the chain.
type Ran = (Vec<StoreResult<()>>, Left);

/// What a batch left of the audit chain.
#[derive(Default)]
struct Left {
    /// The head after it, if known.
    head: Option<(i64, String)>,
    /// Its statement alone found the head moved (another process wrote).
    moved: bool,
}

/// Runs `jobs` in one transaction and commits it: per job, its own outcome
/// (a job that failed was rolled back to its savepoint). `seen` is the
/// chain head the writer last saw (see [`Tx::end`]).
///
/// Boxed, so the future is checked `Send` for the lifetimes it is called
/// with (sqlx's executor bounds are higher-ranked otherwise).
fn run_batch<'a>(
    pool: &'a PgPool,
    jobs: &'a mut [Box<dyn Job>],
    origin: &'a Arc<str>,
    seen: Option<(i64, String)>,
) -> BoxFuture<'a, Result<Ran, Failed>> {
    Box::pin(run_batch_inner(pool, jobs, origin, seen))
}

async fn run_batch_inner(
    pool: &PgPool,
    jobs: &mut [Box<dyn Job>],
    origin: &Arc<str>,
    seen: Option<(i64, String)>,
) -> Result<Ran, Failed> {
    if let [job] = jobs {
        // Alone: the transaction is the job's savepoint.
        let mut tx = Tx::new(pool, origin.clone(), seen);
        if let Err(e) = job.run(&mut tx).await {
            return Ok((vec![Err(e)], Left::default()));
        }
        return Ok(match tx.end(true).await? {
            Ok(left) => (vec![Ok(())], left),
            Err(e) => (vec![Err(e)], Left::default()),
        });
    }
    // First without savepoints: a savepoint is a round trip per write,
    // and writes almost never fail. If one does, the batch rolls back
    // and runs again below, each write in its savepoint.
    if let Some(done) = run_plain(pool, jobs, origin, seen).await? {
        return Ok(done);
    }
    let mut tx = Tx::new(pool, origin.clone(), None);
    tx.begin().await.map_err(Failed::Begin)?;
    let mut outcomes = Vec::with_capacity(jobs.len());
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
    let left = tx.end(false).await?.map_err(Failed::Batch)?;
    Ok((outcomes, left))
}

/// Runs `jobs` in one transaction without savepoints and commits it;
/// `None` (rolled back) if any of them failed.
async fn run_plain(
    pool: &PgPool,
    jobs: &mut [Box<dyn Job>],
    origin: &Arc<str>,
    seen: Option<(i64, String)>,
) -> Result<Option<Ran>, Failed> {
    let mut tx = Tx::new(pool, origin.clone(), seen);
    for job in jobs.iter_mut() {
        if let Err(e) = job.run(&mut tx).await {
            tracing::debug!(error = %e, "a write of the batch failed; the batch runs again with savepoints");
            return Ok(None);
        }
    }
    // The batch's rows go in one statement for all its writes: if it
    // fails, which write's row failed is not known here, so the batch runs
    // again with savepoints.
    match tx.end(true).await? {
        Ok(left) => Ok(Some((jobs.iter().map(|_| Ok(())).collect(), left))),
        Err(e) => {
            tracing::debug!(error = %e, "the batch's rows failed; the batch runs again with savepoints");
            Ok(None)
        }
    }
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

/// A batch's write transaction. It begins (on a pooled connection, the
/// audit chain's head locked and read first) at the first statement a
/// write sends; rows that are only appended wait in [`Deferred`] and go
/// with the next statement. A batch whose writes only appended never
/// begins one: [`Tx::end`] sends its rows in one statement that runs
/// alone, from the head the writer last saw, and only if the head is
/// still that one.
pub(super) struct Tx {
    pool: PgPool,
    sql: Option<sqlx::Transaction<'static, Postgres>>,
    /// The chain's head: once begun, the one locked, moved by the entries
    /// sent; before, the one the writer last saw, if any.
    head: Option<(i64, String)>,
    /// Entries were sent in this transaction: the head is recorded at its end.
    appended: bool,
    origin: Arc<str>,
    /// Payloads for `pg_notify`, sent just before the commit.
    notes: Vec<String>,
    rows: Deferred,
}

/// Where a job started, to undo its effects on the [`Tx`] when it rolls back.
pub(super) struct Mark {
    head: Option<(i64, String)>,
    appended: bool,
    notes: usize,
    rows: deferred::Len,
}

impl Tx {
    /// A batch's transaction, not begun; `seen` is the chain head the
    /// writer last saw.
    fn new(pool: &PgPool, origin: Arc<str>, seen: Option<(i64, String)>) -> Tx {
        Tx {
            pool: pool.clone(),
            sql: None,
            head: seen,
            appended: false,
            origin,
            notes: Vec::new(),
            rows: Deferred::default(),
        }
    }

    /// Begins on a pooled connection and locks the chain head (once).
    /// Pooled connections are not pinged on the way out, so one the
    /// database dropped while it sat idle (a restart) fails here: it is let
    /// go and the next one tried, before any write ran.
    async fn begin(&mut self) -> StoreResult<()> {
        if self.sql.is_some() {
            return Ok(());
        }
        let mut attempt = 0;
        let (sql, head) = loop {
            attempt += 1;
            match Self::lock_head(&self.pool).await {
                Err(e) if e.is_retryable() && attempt <= WRITE_CONNECTIONS => {
                    tracing::debug!(error = %e, "a pooled connection failed; trying another");
                }
                other => break other?,
            }
        };
        self.sql = Some(sql);
        self.head = Some(head);
        self.appended = false;
        Ok(())
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

    /// The transaction's connection, for a write's statements: begun if it
    /// was not, and the rows appended so far sent first, so every
    /// statement sees them.
    pub(super) async fn conn(&mut self) -> StoreResult<&mut PgConnection> {
        self.flush().await?;
        match &mut self.sql {
            Some(sql) => Ok(&mut **sql),
            None => Err(StoreError::Failed(
                "the writer's transaction did not begin".into(),
            )),
        }
    }

    /// Begins if need be and sends the rows appended so far (one
    /// statement, if there are any).
    async fn flush(&mut self) -> StoreResult<()> {
        self.send(Head::Keep, false).await
    }

    /// Begins if need be and sends the rows appended so far, with `record`
    /// and (if `notes`) the notes, in one statement.
    async fn send(&mut self, record: Head<'_>, notes: bool) -> StoreResult<()> {
        self.begin().await?;
        let appends = self.rows.has_audit();
        let (Some(sql), Some(head)) = (&mut self.sql, &self.head) else {
            return Err(StoreError::Failed(
                "the writer's transaction did not begin".into(),
            ));
        };
        let notes: &[String] = if notes { &self.notes } else { &[] };
        let after = deferred::send(sql, &mut self.rows, head, record, notes)
            .await?
            .ok_or_else(|| StoreError::Failed("the chain head was not recorded".into()))?;
        self.head = Some(after);
        self.appended |= appends;
        Ok(())
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
    /// are sent with the batch's other rows, chained then (after the head
    /// locked by then).
    pub(super) async fn audit(&mut self, list: &[SealedEvent]) -> StoreResult<()> {
        self.rows.audit(list);
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
        let record = if self.appended || self.rows.has_audit() {
            Head::Record
        } else {
            Head::Keep
        };
        self.send(record, true).await?;
        self.notes.clear();
        Ok(())
    }

    /// Ends the batch: its rows, head and notes sent and committed. The
    /// answer is the head it left, or `Ok(Err(_))` if the last statement
    /// failed (nothing committed): a batch without savepoints runs again
    /// with them. A batch that never began tries its one statement alone
    /// first, from the head the writer last saw (`optimistic`).
    async fn end(mut self, optimistic: bool) -> Result<StoreResult<Left>, Failed> {
        let mut moved = false;
        if self.sql.is_none() {
            if self.rows.is_empty() && self.notes.is_empty() {
                return Ok(Ok(Left {
                    head: self.head,
                    moved,
                }));
            }
            if let (true, Some(seen)) = (optimistic, self.head.clone()) {
                match self.alone(&seen).await {
                    Ok(Some(head)) => {
                        return Ok(Ok(Left {
                            head: Some(head),
                            moved,
                        }))
                    }
                    Ok(None) => {
                        moved = true;
                        tracing::trace!("the chain head moved; the batch begins a transaction")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "the batch's statement failed; it begins a transaction")
                    }
                }
            }
        }
        self.begin().await.map_err(Failed::Begin)?;
        if let Err(e) = self.finish().await {
            return Ok(Err(e));
        }
        let head = self.head.take();
        match self.sql.take() {
            Some(sql) => sql.commit().await.map_err(|e| Failed::Batch(db(e)))?,
            None => {
                return Err(Failed::Batch(StoreError::Failed(
                    "no transaction to commit".into(),
                )))
            }
        }
        Ok(Ok(Left { head, moved }))
    }

    /// The batch's rows, the head's update (only if the head is still
    /// `seen`, its row locked first) and notes, in one statement that is
    /// its own transaction: `None` if the head had moved (nothing written).
    async fn alone(&mut self, seen: &(i64, String)) -> StoreResult<Option<(i64, String)>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        deferred::send(
            &mut conn,
            &mut self.rows,
            seen,
            Head::RecordIf(seen),
            &self.notes,
        )
        .await
    }
}
