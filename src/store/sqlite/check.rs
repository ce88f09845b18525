//! Integrity checks of a SQLite database file: the bounded `quick_check`
//! `serve` runs before it says ready, and the full `integrity_check` of
//! `keyturn db check`. Each also reads every pending request's row, as
//! listing and expiring them does, so a damaged page under them is found
//! here rather than by a request that never times out. Read-only: it never
//! creates, migrates or writes the database.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection, Row};
use std::str::FromStr;
use std::time::Duration;

/// Which check, and how long it may take.
#[derive(Debug, Clone, Copy)]
pub enum Depth {
    /// `PRAGMA quick_check`: every page and row, without index contents.
    Quick,
    /// `PRAGMA integrity_check`: also every index against its table.
    Full,
}

/// Problems reported at most, so a badly damaged file does not print
/// thousands of lines.
pub const MAX_PROBLEMS: u32 = 20;

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// SQLite's own findings and failed reads; empty when the file is sound.
    pub problems: Vec<String>,
    /// Pending requests read in full (when the table exists and could be read).
    pub pending: Option<u64>,
    /// The check did not finish within its time limit (nothing was found
    /// wrong in what it read).
    pub timed_out: bool,
    /// The database could not be reached, so nothing was checked (a server
    /// that is down is not a damaged database).
    pub unreachable: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the database at `url`. `limit` bounds the whole check; past it
/// the report says `timed_out` (a very large database at start).
pub async fn check(url: &str, depth: Depth, limit: Duration) -> Report {
    match tokio::time::timeout(limit, run(url, depth)).await {
        Ok(r) => r,
        Err(_) => Report {
            timed_out: true,
            ..Report::default()
        },
    }
}

async fn run(url: &str, depth: Depth) -> Report {
    let mut report = Report::default();
    let opts = match SqliteConnectOptions::from_str(url) {
        Ok(o) => o
            .create_if_missing(false)
            .read_only(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5)),
        Err(e) => {
            report.problems.push(format!("bad store url: {e}"));
            return report;
        }
    };
    let mut conn = match opts.connect().await {
        Ok(c) => c,
        Err(e) => {
            report
                .problems
                .push(format!("cannot open the database: {e}"));
            return report;
        }
    };
    let pragma = match depth {
        Depth::Quick => "quick_check",
        Depth::Full => "integrity_check",
    };
    match sqlx::query(&format!("PRAGMA {pragma}({MAX_PROBLEMS})"))
        .fetch_all(&mut conn)
        .await
    {
        Ok(rows) => {
            for r in rows {
                let line: String = r.try_get(0).unwrap_or_default();
                if line != "ok" {
                    report.problems.push(line);
                }
            }
        }
        Err(e) => report.problems.push(format!("{pragma} failed: {e}")),
    }
    let has_requests = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'requests'",
    )
    .fetch_one(&mut conn)
    .await;
    match has_requests {
        Ok(0) => {}
        Ok(_) => {
            // Every column of every pending row, through the index the
            // scheduler uses and through the table itself.
            match sqlx::query("SELECT * FROM requests WHERE state = 'pending' ORDER BY deadline_ms")
                .fetch_all(&mut conn)
                .await
            {
                Ok(rows) => report.pending = Some(rows.len() as u64),
                Err(e) => report
                    .problems
                    .push(format!("cannot read the pending requests: {e}")),
            }
        }
        Err(e) => report.problems.push(format!("cannot read the schema: {e}")),
    }
    let _ = conn.close().await;
    report
}
