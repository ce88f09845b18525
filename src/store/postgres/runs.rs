//! The process registry in PostgreSQL (migration 0003, see
//! [`crate::app::ports::Runs`]), as the SQLite store keeps it: the typed
//! writes, run by the writer in the batch's transaction with their audit
//! entry, the request's card marked due (and a `CardsDue` note, so the
//! leader's outbox re-renders it), and for a kill a `KillRun` note, so the
//! process running it, whichever it is, hears it. The rows and the reads'
//! SQL are the SQLite store's.

use super::notify::Note;
use super::writer::Tx;
use super::PgStore;
use crate::app::ports::{Change, RunRecord, RunRefused, Runs, StoreError, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::domain::request::RequestId;
use crate::domain::run::RunState;
use crate::store::error::sqlx as db;
use crate::store::sqlite::{argv_json, not_registered, runs_sql, RunRow, RUN_COLUMNS};
use async_trait::async_trait;
use std::sync::Arc;

/// Registers `run`, unless its request already has one (then nothing is
/// written). The insert itself decides (`ON CONFLICT (request_id) DO
/// NOTHING`): of two processes starting one request at once, the second
/// waits for the first's commit and finds its run. Returns the answer and
/// whether the request's card was marked due.
async fn started(
    tx: &mut Tx,
    run: &RunRecord,
    argv: &str,
    audit: &SealedEvent,
) -> StoreResult<(Result<(), RunRefused>, bool)> {
    let request_id = run.request_id.to_string();
    let inserted = sqlx::query(&format!(
        "INSERT INTO runs ({RUN_COLUMNS}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
         ON CONFLICT (request_id) DO NOTHING"
    ))
    .bind(&run.id)
    .bind(&request_id)
    .bind(&run.agent)
    .bind(&run.tool)
    .bind(argv)
    .bind(run.profile.as_str())
    .bind(run.pid)
    .bind(&run.host)
    .bind(run.server_pid)
    .bind(&run.approved_by)
    .bind(run.started_ms)
    .bind(run.deadline_ms)
    .bind(run.state.as_str())
    .bind(run.ended_ms)
    .bind(run.exit_code.map(i64::from))
    .bind(run.signal.map(i64::from))
    .bind(&run.stdout_sha256)
    .bind(&run.stderr_sha256)
    .bind(&run.kill_requested_by)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?
    .rows_affected()
        == 1;
    if !inserted {
        let holder: Option<String> =
            sqlx::query_scalar("SELECT id FROM runs WHERE request_id = $1")
                .bind(&request_id)
                .fetch_optional(tx.conn().await?)
                .await
                .map_err(db)?;
        return match holder {
            Some(run_id) => Ok((Err(RunRefused::AlreadyRun { request_id, run_id }), false)),
            // The holder went away between the two statements: run it again.
            None => Err(StoreError::Conflict {
                what: format!("the run of request {request_id}"),
                retry: true,
            }),
        };
    }
    tx.audit(std::slice::from_ref(audit)).await?;
    let bumped = bump_card(tx, &request_id).await?;
    Ok((Ok(()), bumped))
}

/// Records how `run` ended. Returns whether the request's card was marked due.
async fn ended(tx: &mut Tx, run: &RunRecord, audit: &SealedEvent) -> StoreResult<bool> {
    let request_id: Option<String> = sqlx::query_scalar(
        "UPDATE runs SET state = $1, ended_ms = $2, exit_code = $3, signal = $4, \
         stdout_sha256 = $5, stderr_sha256 = $6, pid = COALESCE($7, pid) \
         WHERE id = $8 RETURNING request_id",
    )
    .bind(run.state.as_str())
    .bind(run.ended_ms)
    .bind(run.exit_code.map(i64::from))
    .bind(run.signal.map(i64::from))
    .bind(&run.stdout_sha256)
    .bind(&run.stderr_sha256)
    .bind(run.pid)
    .bind(&run.id)
    .fetch_optional(tx.conn().await?)
    .await
    .map_err(db)?;
    let Some(request_id) = request_id else {
        return Err(not_registered(&run.id));
    };
    tx.audit(std::slice::from_ref(audit)).await?;
    bump_card(tx, &request_id).await
}

/// Records the pid, and marks the card due so it shows it: `true` if the
/// request has a card.
async fn set_pid(tx: &mut Tx, id: &str, pid: i64) -> StoreResult<bool> {
    let request_id: Option<String> =
        sqlx::query_scalar("UPDATE runs SET pid = $1 WHERE id = $2 RETURNING request_id")
            .bind(pid)
            .bind(id)
            .fetch_optional(tx.conn().await?)
            .await
            .map_err(db)?;
    let Some(request_id) = request_id else {
        return Err(not_registered(id));
    };
    bump_card(tx, &request_id).await
}

/// Marks a kill of a running run as asked for, and notes it for every
/// process. Returns whether it was running (nothing is written otherwise)
/// and whether the card was marked due.
async fn kill(tx: &mut Tx, id: &str, by: &str, audit: &SealedEvent) -> StoreResult<(bool, bool)> {
    let request_id: Option<String> = sqlx::query_scalar(
        "UPDATE runs SET kill_requested_by = $1 WHERE id = $2 AND state = 'running' \
         RETURNING request_id",
    )
    .bind(by)
    .bind(id)
    .fetch_optional(tx.conn().await?)
    .await
    .map_err(db)?;
    let Some(request_id) = request_id else {
        return Ok((false, false));
    };
    tx.audit(std::slice::from_ref(audit)).await?;
    tx.note(Note::KillRun {
        run_id: id.to_string(),
    });
    Ok((true, bump_card(tx, &request_id).await?))
}

/// Marks the request's card due again, if it has one (and notes it for the
/// process whose outbox posts cards): `true` if it had one.
async fn bump_card(tx: &mut Tx, request_id: &str) -> StoreResult<bool> {
    let bumped = sqlx::query(
        "UPDATE discord_cards SET want = want + 1, attempts = 0, next_attempt_ms = 0 \
         WHERE request_id = $1",
    )
    .bind(request_id)
    .execute(tx.conn().await?)
    .await
    .map_err(db)?
    .rows_affected()
        > 0;
    if bumped {
        tx.note(Note::CardsDue);
    }
    Ok(bumped)
}

impl PgStore {
    fn cards_due_if(&self, bumped: bool) {
        if bumped {
            self.publish(Change::CardsDue);
        }
    }

    async fn run_where(&self, column: &str, value: String) -> StoreResult<Option<RunRecord>> {
        sqlx::query_as::<_, RunRow>(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE {column} = $1"
        ))
        .bind(value)
        .fetch_optional(&self.reads)
        .await
        .map_err(db)?
        .map(RunRow::into_run)
        .transpose()
    }
}

#[async_trait]
impl Runs for PgStore {
    async fn run_started(
        &self,
        run: RunRecord,
        audit: AuditEvent,
    ) -> StoreResult<Result<(), RunRefused>> {
        let argv: Arc<str> = argv_json(&run)?.into();
        let audit = Arc::new(audit.seal());
        let run = Arc::new(run);
        let (answer, bumped) = self
            .write(move |tx| {
                let (run, argv, audit) = (run.clone(), argv.clone(), audit.clone());
                Box::pin(async move { started(tx, &run, &argv, &audit).await })
            })
            .await?;
        self.cards_due_if(bumped);
        Ok(answer)
    }
    async fn run_ended(&self, run: RunRecord, audit: AuditEvent) -> StoreResult<()> {
        if run.state == RunState::Running {
            return Err(StoreError::Failed(format!(
                "run {}: an ended run cannot be `running`",
                run.id
            )));
        }
        let audit = Arc::new(audit.seal());
        let run = Arc::new(run);
        let bumped = self
            .write(move |tx| {
                let (run, audit) = (run.clone(), audit.clone());
                Box::pin(async move { ended(tx, &run, &audit).await })
            })
            .await?;
        self.cards_due_if(bumped);
        Ok(())
    }
    async fn run_pid(&self, id: &str, pid: i64) -> StoreResult<()> {
        let id: Arc<str> = id.into();
        let bumped = self
            .write(move |tx| {
                let id = id.clone();
                Box::pin(async move { set_pid(tx, &id, pid).await })
            })
            .await?;
        self.cards_due_if(bumped);
        Ok(())
    }
    async fn request_kill(&self, id: &str, by: String, audit: AuditEvent) -> StoreResult<bool> {
        let audit = Arc::new(audit.seal());
        let run_id: Arc<str> = id.into();
        let by: Arc<str> = by.into();
        let mine = run_id.clone();
        let (killed, bumped) = self
            .write(move |tx| {
                let (id, by, audit) = (mine.clone(), by.clone(), audit.clone());
                Box::pin(async move { kill(tx, &id, &by, &audit).await })
            })
            .await?;
        if killed {
            self.publish(Change::KillRun {
                run_id: run_id.to_string(),
            });
        }
        self.cards_due_if(bumped);
        Ok(killed)
    }
    async fn run(&self, id: &str) -> StoreResult<Option<RunRecord>> {
        self.run_where("id", id.to_string()).await
    }
    async fn run_of_request(&self, request_id: RequestId) -> StoreResult<Option<RunRecord>> {
        self.run_where("request_id", request_id.to_string()).await
    }
    async fn runs(&self, running_only: bool, limit: u32) -> StoreResult<Vec<RunRecord>> {
        sqlx::query_as::<_, RunRow>(&runs_sql(running_only))
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(db)?
            .into_iter()
            .map(RunRow::into_run)
            .collect()
    }
}
