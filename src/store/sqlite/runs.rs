//! The process registry in SQLite (migration 0010, see
//! [`crate::app::ports::Runs`]): the typed writes, run by the writer like
//! those of [`super::write`] (each appends its audit entry in the batch's
//! transaction and marks the request's card due, if it has one), and the
//! reads. The row type and its columns are shared with the PostgreSQL store.

use super::writer::Tx;
use super::SqliteStore;
use crate::app::ports::{Change, RunRecord, RunRefused, Runs, StoreError, StoreResult};
use crate::domain::audit::{AuditEvent, SealedEvent};
use crate::domain::request::RequestId;
use crate::domain::run::{Profile, RunState};
use crate::store::error::sqlx as db;
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use std::sync::Arc;

/// The columns of a `runs` row, in [`RunRow`]'s order.
pub(in crate::store) const RUN_COLUMNS: &str =
    "id, request_id, agent, tool, argv, profile, pid, host, server_pid, approved_by, \
     started_ms, deadline_ms, state, ended_ms, exit_code, signal, stdout_sha256, \
     stderr_sha256, kill_requested_by";

/// The `runs` query of [`Runs::runs`]: newest first, only running ones
/// with `running_only`; `$1` is the limit.
pub(in crate::store) fn runs_sql(running_only: bool) -> String {
    let only = if running_only {
        " WHERE state = 'running'"
    } else {
        ""
    };
    format!("SELECT {RUN_COLUMNS} FROM runs{only} ORDER BY started_ms DESC, id DESC LIMIT $1")
}

/// A `runs` row as both backends store it (integers as 64-bit, argv as JSON).
#[derive(sqlx::FromRow)]
pub(in crate::store) struct RunRow {
    id: String,
    request_id: String,
    agent: String,
    tool: String,
    argv: String,
    profile: String,
    pid: Option<i64>,
    host: String,
    server_pid: i64,
    approved_by: String,
    started_ms: i64,
    deadline_ms: i64,
    state: String,
    ended_ms: Option<i64>,
    exit_code: Option<i64>,
    signal: Option<i64>,
    stdout_sha256: Option<String>,
    stderr_sha256: Option<String>,
    kill_requested_by: Option<String>,
}

impl RunRow {
    /// The record, or [`StoreError::Corrupt`] naming the column that does
    /// not parse (never a default in its place).
    pub(in crate::store) fn into_run(self) -> StoreResult<RunRecord> {
        let bad = |what: &str| StoreError::Corrupt(format!("run {}: bad {what}", self.id));
        let small = |v: Option<i64>, what: &str| {
            v.map(|v| i32::try_from(v).map_err(|_| bad(what)))
                .transpose()
        };
        Ok(RunRecord {
            request_id: self.request_id.parse().map_err(|_| bad("request_id"))?,
            agent: self.agent.clone(),
            tool: self.tool.clone(),
            argv: serde_json::from_str(&self.argv).map_err(|_| bad("argv"))?,
            profile: parse_profile(&self.profile).ok_or_else(|| bad("profile"))?,
            pid: self.pid,
            host: self.host.clone(),
            server_pid: self.server_pid,
            approved_by: self.approved_by.clone(),
            started_ms: self.started_ms,
            deadline_ms: self.deadline_ms,
            state: RunState::parse(&self.state).ok_or_else(|| bad("state"))?,
            ended_ms: self.ended_ms,
            exit_code: small(self.exit_code, "exit_code")?,
            signal: small(self.signal, "signal")?,
            stdout_sha256: self.stdout_sha256.clone(),
            stderr_sha256: self.stderr_sha256.clone(),
            kill_requested_by: self.kill_requested_by.clone(),
            id: self.id,
        })
    }
}

/// A stored profile: exactly one of [`Profile::as_str`]'s words.
fn parse_profile(text: &str) -> Option<Profile> {
    [Profile::Bwrap, Profile::Host]
        .into_iter()
        .find(|p| p.as_str() == text)
}

/// A run's argv as its `argv` column holds it (a JSON array of strings).
pub(in crate::store) fn argv_json(run: &RunRecord) -> StoreResult<String> {
    serde_json::to_string(&run.argv)
        .map_err(|e| StoreError::Failed(format!("run {}: cannot store its argv: {e}", run.id)))
}

/// Registers `run`, unless its request already has one (then nothing is
/// written). Returns the answer and whether the request's card was marked due.
fn started(
    tx: &mut Tx<'_>,
    run: &RunRecord,
    argv: &str,
    audit: &SealedEvent,
) -> StoreResult<(Result<(), RunRefused>, bool)> {
    // One writer: the holder seen here is the one the insert would hit.
    let request_id = run.request_id.to_string();
    let holder: Option<String> = tx
        .prepare_cached("SELECT id FROM runs WHERE request_id = ?1")?
        .query_row(params![request_id], |r| r.get(0))
        .optional()?;
    if let Some(run_id) = holder {
        return Ok((Err(RunRefused::AlreadyRun { request_id, run_id }), false));
    }
    tx.prepare_cached(&format!(
        "INSERT INTO runs ({RUN_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
    ))?
    .execute(params![
        run.id,
        request_id,
        run.agent,
        run.tool,
        argv,
        run.profile.as_str(),
        run.pid,
        run.host,
        run.server_pid,
        run.approved_by,
        run.started_ms,
        run.deadline_ms,
        run.state.as_str(),
        run.ended_ms,
        run.exit_code,
        run.signal,
        run.stdout_sha256,
        run.stderr_sha256,
        run.kill_requested_by,
    ])?;
    tx.audit(std::slice::from_ref(audit))?;
    let bumped = bump_card(tx, &request_id)?;
    Ok((Ok(()), bumped))
}

/// Records how `run` ended. Returns whether the request's card was marked due.
fn ended(tx: &mut Tx<'_>, run: &RunRecord, audit: &SealedEvent) -> StoreResult<bool> {
    let request_id: Option<String> = tx
        .prepare_cached(
            "UPDATE runs SET state = ?1, ended_ms = ?2, exit_code = ?3, signal = ?4, \
             stdout_sha256 = ?5, stderr_sha256 = ?6, pid = COALESCE(?7, pid) \
             WHERE id = ?8 RETURNING request_id",
        )?
        .query_row(
            params![
                run.state.as_str(),
                run.ended_ms,
                run.exit_code,
                run.signal,
                run.stdout_sha256,
                run.stderr_sha256,
                run.pid,
                run.id,
            ],
            |r| r.get(0),
        )
        .optional()?;
    let Some(request_id) = request_id else {
        return Err(not_registered(&run.id));
    };
    tx.audit(std::slice::from_ref(audit))?;
    bump_card(tx, &request_id)
}

/// Records the pid, and marks the card due so it shows it: `true` if the
/// request has a card.
fn set_pid(tx: &mut Tx<'_>, id: &str, pid: i64) -> StoreResult<bool> {
    let request_id: Option<String> = tx
        .prepare_cached("UPDATE runs SET pid = ?1 WHERE id = ?2 RETURNING request_id")?
        .query_row(params![pid, id], |r| r.get(0))
        .optional()?;
    let Some(request_id) = request_id else {
        return Err(not_registered(id));
    };
    bump_card(tx, &request_id)
}

/// Marks a kill of a running run as asked for. Returns whether it was
/// running (nothing is written otherwise) and whether the card was marked due.
fn kill(tx: &mut Tx<'_>, id: &str, by: &str, audit: &SealedEvent) -> StoreResult<(bool, bool)> {
    let request_id: Option<String> = tx
        .prepare_cached(
            "UPDATE runs SET kill_requested_by = ?1 WHERE id = ?2 AND state = 'running' \
             RETURNING request_id",
        )?
        .query_row(params![by, id], |r| r.get(0))
        .optional()?;
    let Some(request_id) = request_id else {
        return Ok((false, false));
    };
    tx.audit(std::slice::from_ref(audit))?;
    Ok((true, bump_card(tx, &request_id)?))
}

/// Marks the request's card due again, if it has one, so it re-renders
/// with the run: `true` if it had one.
fn bump_card(tx: &Tx<'_>, request_id: &str) -> StoreResult<bool> {
    Ok(tx
        .prepare_cached(
            "UPDATE discord_cards SET want = want + 1, attempts = 0, next_attempt_ms = 0 \
             WHERE request_id = ?1",
        )?
        .execute(params![request_id])?
        > 0)
}

/// A write named a run that is not in the registry: a caller's bug.
pub(in crate::store) fn not_registered(id: &str) -> StoreError {
    StoreError::Failed(format!("run {id} is not registered"))
}

impl SqliteStore {
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
impl Runs for SqliteStore {
    async fn run_started(
        &self,
        run: RunRecord,
        audit: AuditEvent,
    ) -> StoreResult<Result<(), RunRefused>> {
        let argv = argv_json(&run)?;
        let audit = audit.seal();
        let run = Arc::new(run);
        let (answer, bumped) = self
            .write(move |tx| started(tx, &run, &argv, &audit))
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
        let audit = audit.seal();
        let bumped = self.write(move |tx| ended(tx, &run, &audit)).await?;
        self.cards_due_if(bumped);
        Ok(())
    }
    async fn run_pid(&self, id: &str, pid: i64) -> StoreResult<()> {
        let id = id.to_string();
        let bumped = self.write(move |tx| set_pid(tx, &id, pid)).await?;
        self.cards_due_if(bumped);
        Ok(())
    }
    async fn request_kill(&self, id: &str, by: String, audit: AuditEvent) -> StoreResult<bool> {
        let audit = audit.seal();
        let run_id = id.to_string();
        let mine = run_id.clone();
        let (killed, bumped) = self.write(move |tx| kill(tx, &mine, &by, &audit)).await?;
        if killed {
            self.publish(Change::KillRun { run_id });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RunRow {
        RunRow {
            id: "r1".into(),
            request_id: "00000000-0000-0000-0000-000000000001".into(),
            agent: "a".into(),
            tool: "t".into(),
            argv: r#"["cat","x"]"#.into(),
            profile: "bwrap".into(),
            pid: None,
            host: "h".into(),
            server_pid: 1,
            approved_by: "policy".into(),
            started_ms: 1,
            deadline_ms: 2,
            state: "running".into(),
            ended_ms: None,
            exit_code: Some(0),
            signal: None,
            stdout_sha256: None,
            stderr_sha256: None,
            kill_requested_by: None,
        }
    }

    #[test]
    fn every_parsed_column_of_a_run_fails_closed() {
        let r = row().into_run().unwrap();
        assert_eq!(
            (r.profile, r.state, r.argv.len()),
            (Profile::Bwrap, RunState::Running, 2)
        );
        type Spoil = fn(&mut RunRow);
        let spoiled: [(&str, Spoil); 7] = [
            ("profile", |r| r.profile = "Bwrap".into()),
            ("profile", |r| r.profile = "none".into()),
            ("state", |r| r.state = "done".into()),
            ("argv", |r| r.argv = "{}".into()),
            ("argv", |r| r.argv = "[1]".into()),
            ("request_id", |r| r.request_id = "x".into()),
            ("exit_code", |r| r.exit_code = Some(i64::MAX)),
        ];
        for (what, spoil) in spoiled {
            let mut r = row();
            spoil(&mut r);
            assert!(
                matches!(r.into_run(), Err(StoreError::Corrupt(_))),
                "a bad {what} must be corrupt"
            );
        }
    }
}
