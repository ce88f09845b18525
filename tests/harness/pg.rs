//! A PostgreSQL schema of its own for one test: [`Schema::new`] creates
//! `kt_<random>` on the test server (`postgres://postgres@127.0.0.1:5432/test`,
//! or `KEYTURN_TEST_PG` when set), [`Schema::url`] is a store URL whose
//! `search_path` is that schema, and dropping the [`Schema`] drops it with
//! everything in it. Runs never collide, and nothing is left behind.
//!
//! When PostgreSQL cannot be reached, [`Schema::new`] prints why and
//! returns `None` (the test returns early), except under `CI=true`, where
//! it panics: CI must run the PostgreSQL tests.
//!
//! ```ignore
//! let Some(schema) = harness::pg::Schema::new().await else { return };
//! let store = PgStore::open(&schema.url(), &PgOptions::default()).await.unwrap();
//! schema.exec("UPDATE grants SET effect = 'x'"); // raw SQL in the schema
//! ```

use sqlx::{ConnectOptions, Connection, Executor, PgConnection};
use std::str::FromStr;
use std::time::Duration;

/// The test server's URL.
pub fn server_url() -> String {
    std::env::var("KEYTURN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema dropped (CASCADE) when this is dropped.
pub struct Schema {
    name: String,
}

impl Schema {
    /// A fresh, empty schema, or `None` (printed) when PostgreSQL is not
    /// reachable and `CI` is not `true`.
    pub async fn new() -> Option<Schema> {
        let name = format!("kt_{}", uuid::Uuid::new_v4().simple());
        match connect(&server_url()).await {
            Ok(mut c) => {
                c.execute(format!("CREATE SCHEMA \"{name}\"").as_str())
                    .await
                    .expect("create the test schema");
                let _ = c.close().await;
                Some(Schema { name })
            }
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("PostgreSQL is required under CI=true: {e}")
            }
            Err(e) => {
                eprintln!(
                    "skipped: PostgreSQL is not reachable at {}: {e}",
                    server_url()
                );
                None
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store URL: the test server with `search_path` set to this schema.
    pub fn url(&self) -> String {
        let base = server_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-c%20search_path%3D{}", self.name)
    }

    /// [`Schema::url`] with an `application_name`, so a test can find (and
    /// terminate) that store's sessions.
    pub fn url_named(&self, application_name: &str) -> String {
        format!("{}&application_name={application_name}", self.url())
    }

    /// Runs `sql` (one or more statements) in this schema, blocking: for
    /// the raw SQL a test runs under the store.
    pub fn exec(&self, sql: &str) {
        let (url, sql) = (self.url(), sql.to_string());
        blocking(async move {
            let mut c = connect(&url).await.expect("connect to the test schema");
            c.execute(sql.as_str()).await.expect("raw SQL");
            let _ = c.close().await;
        });
    }

    /// Terminates every session of `application_name` (as a database
    /// restart or a network cut would); returns how many were ended.
    pub fn terminate(&self, application_name: &str) -> i64 {
        let (url, app) = (server_url(), application_name.to_string());
        blocking(async move {
            let mut c = connect(&url).await.expect("connect to PostgreSQL");
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
            )
            .bind(app)
            .fetch_one(&mut c)
            .await
            .expect("terminate sessions");
            let _ = c.close().await;
            n
        })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (url, name) = (server_url(), self.name.clone());
        blocking(async move {
            match connect(&url).await {
                Ok(mut c) => {
                    // A session of a failed test may still hold a lock
                    // here: give up after a while rather than hang.
                    let _ = c.execute("SET lock_timeout = '10s'").await;
                    let drop = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                    if let Err(e) = c.execute(drop.as_str()).await {
                        eprintln!("could not drop the test schema {name}: {e}");
                    }
                    let _ = c.close().await;
                }
                Err(e) => eprintln!("could not drop the test schema {name}: {e}"),
            }
        });
    }
}

async fn connect(url: &str) -> Result<PgConnection, String> {
    let opts = sqlx::postgres::PgConnectOptions::from_str(url).map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), opts.connect()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// Runs `f` to its end on a thread of its own (with its own runtime), so
/// it may be called from sync code, async code and `Drop` alike.
fn blocking<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f)
    })
    .join()
    .expect("the blocking thread")
}
