//! Driver errors mapped once into the app's [`StoreError`] classes: by
//! SQLite's extended result code for rusqlite and sqlx on SQLite, by
//! SQLSTATE for sqlx on PostgreSQL. Nothing else in the store turns a
//! driver error into a `StoreError`.

use crate::app::ports::StoreError;
use rusqlite::ffi;

/// A SQLite failure by its extended result code (the primary code is its
/// low byte). `text` is the driver's message, kept for the log.
pub(crate) fn sqlite_code(extended: i32, text: String) -> StoreError {
    match extended & 0xff {
        ffi::SQLITE_BUSY
        | ffi::SQLITE_LOCKED
        | ffi::SQLITE_IOERR
        | ffi::SQLITE_CANTOPEN
        | ffi::SQLITE_PROTOCOL
        | ffi::SQLITE_NOMEM
        | ffi::SQLITE_INTERRUPT => StoreError::unavailable(text),
        ffi::SQLITE_READONLY | ffi::SQLITE_PERM => StoreError::ReadOnly(text),
        ffi::SQLITE_FULL => StoreError::ReadOnly(format!("the disk is full: {text}")),
        ffi::SQLITE_CORRUPT | ffi::SQLITE_NOTADB => StoreError::Corrupt(text),
        ffi::SQLITE_CONSTRAINT
            if extended == ffi::SQLITE_CONSTRAINT_UNIQUE
                || extended == ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::Conflict {
                what: text,
                retry: false,
            }
        }
        _ => StoreError::Failed(text),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::SqliteFailure(f, msg) => {
                let text = match msg {
                    Some(m) => format!("{m} ({f})"),
                    None => f.to_string(),
                };
                sqlite_code(f.extended_code, text)
            }
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(e.to_string()),
            other => StoreError::Failed(other.to_string()),
        }
    }
}

/// An sqlx error in its class.
pub(crate) fn sqlx(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(d) => {
            let text = d.to_string();
            // PostgreSQL: the SQLSTATE (five characters, often all digits,
            // so it is told apart by the error's type, not its look).
            if let Some(pg) = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                return sqlstate(pg.code(), text);
            }
            match d.code() {
                // SQLite: the extended result code, in decimal.
                Some(code) => match code.parse::<i32>() {
                    Ok(n) => sqlite_code(n, text),
                    Err(_) => sqlstate(&code, text),
                },
                None => StoreError::Failed(text),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(Box::new(e)),
        sqlx::Error::PoolClosed => StoreError::Closed,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        sqlx::Error::Migrate(m) => StoreError::Migration(m.to_string()),
        other => StoreError::Failed(other.to_string()),
    }
}

/// A PostgreSQL failure by its SQLSTATE.
fn sqlstate(code: &str, text: String) -> StoreError {
    match code {
        // serialization_failure, deadlock_detected
        "40001" | "40P01" => StoreError::Conflict {
            what: text,
            retry: true,
        },
        "23505" => StoreError::Conflict {
            what: text,
            retry: false,
        },
        // read_only_sql_transaction; disk_full, insufficient_resources
        "25006" => StoreError::ReadOnly(text),
        "53100" | "53000" => StoreError::ReadOnly(format!("the disk is full: {text}")),
        "XX001" | "XX002" => StoreError::Corrupt(text),
        // connection exceptions, admin shutdown, crash shutdown, cannot
        // connect now, too many connections, out of memory, lock not
        // available, a statement cancelled (statement_timeout)
        c if c.starts_with("08")
            || matches!(
                c,
                "57P01" | "57P02" | "57P03" | "53300" | "53200" | "55P03" | "57014"
            ) =>
        {
            StoreError::unavailable(text)
        }
        _ => StoreError::Failed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};

    fn table(path: &std::path::Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        c
    }

    #[test]
    fn a_unique_violation_is_a_conflict_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let c = table(&dir.path().join("a.db"));
        c.execute("INSERT INTO t VALUES ('a', '1')", []).unwrap();
        let e: StoreError = c
            .execute("INSERT INTO t VALUES ('a', '2')", [])
            .unwrap_err()
            .into();
        assert!(
            matches!(e, StoreError::Conflict { retry: false, .. }),
            "{e:?}"
        );
        assert!(!e.is_retryable());
        // Another constraint is no conflict: the write itself is wrong.
        let e: StoreError = c
            .execute("INSERT INTO t VALUES ('b', NULL)", [])
            .unwrap_err()
            .into();
        assert!(matches!(e, StoreError::Failed(_)), "{e:?}");
    }

    #[test]
    fn a_read_only_database_is_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        drop(table(&path));
        let c = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let e: StoreError = c
            .execute("INSERT INTO t VALUES ('a', '1')", [])
            .unwrap_err()
            .into();
        assert!(matches!(e, StoreError::ReadOnly(_)), "{e:?}");
        assert!(!e.is_retryable());
    }

    #[test]
    fn a_full_database_is_read_only_and_says_full() {
        let dir = tempfile::tempdir().unwrap();
        let c = table(&dir.path().join("f.db"));
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .unwrap();
        let big = "x".repeat(64 * 1024);
        let e: StoreError = c
            .execute("INSERT INTO t VALUES ('a', ?1)", [&big])
            .unwrap_err()
            .into();
        match &e {
            StoreError::ReadOnly(why) => assert!(why.contains("full"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_busy_database_is_unavailable_and_retryable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let a = table(&path);
        a.execute_batch("BEGIN IMMEDIATE").unwrap();
        let b = Connection::open(&path).unwrap();
        b.busy_timeout(std::time::Duration::ZERO).unwrap();
        let e: StoreError = b
            .execute("INSERT INTO t VALUES ('a', '1')", [])
            .unwrap_err()
            .into();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(e.is_retryable());
    }

    #[test]
    fn not_a_database_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.db");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let c = Connection::open(&path).unwrap();
        let e: StoreError = c
            .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_err()
            .into();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
    }

    #[tokio::test]
    async fn sqlx_errors_map_by_the_same_codes() {
        use sqlx::sqlite::SqliteConnectOptions;
        use sqlx::{ConnectOptions, Connection as _};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(table(&path));
        let mut c = SqliteConnectOptions::new()
            .filename(&path)
            .connect()
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES ('a', '1')")
            .execute(&mut c)
            .await
            .unwrap();
        let e = sqlx(
            sqlx::query("INSERT INTO t VALUES ('a', '1')")
                .execute(&mut c)
                .await
                .unwrap_err(),
        );
        assert!(
            matches!(e, StoreError::Conflict { retry: false, .. }),
            "{e:?}"
        );
        c.close().await.unwrap();
        let mut ro = SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true)
            .connect()
            .await
            .unwrap();
        let e = sqlx(
            sqlx::query("INSERT INTO t VALUES ('b', '1')")
                .execute(&mut ro)
                .await
                .unwrap_err(),
        );
        assert!(matches!(e, StoreError::ReadOnly(_)), "{e:?}");
    }

    #[test]
    fn postgres_states_map_to_their_classes() {
        let c = |s: &str| sqlstate(s, String::new());
        assert!(c("40001").is_retryable());
        assert!(matches!(
            c("23505"),
            StoreError::Conflict { retry: false, .. }
        ));
        assert!(matches!(c("25006"), StoreError::ReadOnly(_)));
        assert!(matches!(c("53100"), StoreError::ReadOnly(_)));
        assert!(c("08006").is_retryable());
        for transient in ["57P01", "57P02", "57P03", "53300", "57014", "40P01"] {
            assert!(c(transient).is_retryable(), "{transient}");
        }
        assert!(matches!(c("42P01"), StoreError::Failed(_)));
    }
}
