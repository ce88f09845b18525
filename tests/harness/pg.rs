//! A schema of its own in the test PostgreSQL database
//! (`KEYTURN_TEST_PG`, default `postgres://postgres@127.0.0.1:5432/test`),
//! dropped when the value is dropped. Under `CI=true` an unreachable
//! database fails the test; otherwise [`Schema::new`] says why and returns
//! `None`, and the test returns.

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use std::str::FromStr;

pub struct Schema {
    name: String,
    base: String,
}

fn base_url() -> String {
    std::env::var("KEYTURN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

impl Schema {
    pub async fn new() -> Option<Schema> {
        let base = base_url();
        let opts = PgConnectOptions::from_str(&base).expect("KEYTURN_TEST_PG parses");
        let mut c = match opts.connect().await {
            Ok(c) => c,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("PostgreSQL at {base} is needed under CI=true: {e}")
            }
            Err(e) => {
                eprintln!("skipped: PostgreSQL at {base} is not reachable: {e}");
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

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store URL: the test database with this schema as search path.
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-c%20search_path%3D{}", self.base, self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let base = self.base.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let opts = PgConnectOptions::from_str(&base).expect("url");
                if let Ok(mut c) = opts.connect().await {
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
