//! For this module's tests: a schema of its own in the test database
//! (`KEYTURN_TEST_PG`, default `postgres://postgres@127.0.0.1:5432/test`),
//! dropped at the end. Under `CI=true` an unreachable database fails the
//! test; otherwise the test says why and passes without running.

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use std::str::FromStr;

pub struct Schema {
    name: String,
    base: PgConnectOptions,
}

fn base_url() -> String {
    std::env::var("KEYTURN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

impl Schema {
    pub async fn new() -> Option<Schema> {
        let url = base_url();
        let base = PgConnectOptions::from_str(&url).expect("KEYTURN_TEST_PG parses");
        let mut c = match PgConnection::connect_with(&base).await {
            Ok(c) => c,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("PostgreSQL at {url} is needed under CI=true: {e}")
            }
            Err(e) => {
                eprintln!("skipped: PostgreSQL at {url} is not reachable: {e}");
                return None;
            }
        };
        let name = format!("kt_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut c)
            .await
            .expect("create the test schema");
        let _ = c.close().await;
        Some(Schema { name, base })
    }

    /// Connect options with this schema as the search path and an
    /// application name unique to it (to find its backends).
    pub fn options(&self) -> PgConnectOptions {
        self.base
            .clone()
            .options([("search_path", self.name.as_str())])
            .application_name(&self.name)
    }

    pub fn application_name(&self) -> &str {
        &self.name
    }

    pub async fn connect(&self) -> PgConnection {
        self.options().connect().await.expect("connect")
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let base = self.base.clone();
        let name = self.name.clone();
        // Dropped from a runtime's thread: do it on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut c) = PgConnection::connect_with(&base).await {
                    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .execute(&mut c)
                        .await;
                    let _ = c.close().await;
                }
            });
        })
        .join();
    }
}
