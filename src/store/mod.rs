//! Persistence adapter: implements the app's ports ([`crate::app::ports`])
//! on SQLite and on PostgreSQL, and picks the backend for a config ([`open`]).
//!
//! Every SQL statement lives under this module; nothing outside it imports
//! sqlx or rusqlite. Every mutation writes its audit events in the same
//! transaction, and writes are group-committed by one writer thread.

mod anomaly;
mod digests;
mod error;
mod escalations;
pub mod files;
pub mod postgres;
mod sqlite;
mod timed;

pub use postgres::{redact_url, PgOptions, PgStore};
pub use sqlite::check;
pub use sqlite::{Options, SqliteStore, WalTuning};

use crate::app::ports::{Store, StoreError, StoreResult};
use crate::config::{Config, STORE_SCHEMES};
use std::sync::Arc;

/// Opens the store `config.store.url` names, by its scheme: `sqlite:` opens
/// a [`SqliteStore`] with the config's synchronous, batch and card-channel
/// settings; `postgres:` / `postgresql:` a [`PgStore`] with the batch and
/// card-channel settings; anything else is refused naming the supported
/// schemes.
pub async fn open(config: &Config) -> StoreResult<Arc<dyn Store>> {
    let url = &config.store.url;
    match url.split_once(':').map(|(scheme, _)| scheme) {
        Some("sqlite") => {
            let options = Options {
                synchronous: config.store.sqlite_synchronous.clone(),
                max_batch: config.store.max_batch,
                wal: WalTuning::default(),
                cards: card_channel(config),
            };
            Ok(Arc::new(SqliteStore::open_with(url, &options).await?))
        }
        Some("postgres" | "postgresql") => {
            let options = PgOptions {
                max_batch: config.store.max_batch,
                cards: card_channel(config),
                recheck: config.store.recheck.0,
            };
            Ok(Arc::new(PgStore::open(url, &options).await?))
        }
        _ => Err(StoreError::Unsupported(format!(
            "`{}`: {STORE_SCHEMES}",
            redact_url(url)
        ))),
    }
}

/// The channel whose card rows the store keeps: the approvals channel, when
/// the Discord bot runs (the same condition `serve` starts it on).
pub fn card_channel(config: &Config) -> Option<u64> {
    config
        .discord_enabled()
        .then_some(config.discord.approvals_channel_id)
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn refused(url: &str) -> String {
        let mut c = Config::default();
        c.store.url = url.into();
        match open(&c).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{url} opened"),
        }
    }

    #[tokio::test]
    async fn the_scheme_picks_the_backend() {
        // Nothing listens on port 1: a PostgreSQL URL is tried, not refused,
        // and the error names the URL without its password.
        for url in [
            "postgres://k:hunter2@127.0.0.1:1/keyturn",
            "postgresql://k:hunter2@127.0.0.1:1/keyturn",
        ] {
            let e = refused(url).await;
            assert!(e.contains("cannot connect to PostgreSQL at"), "{e}");
            assert!(
                e.contains("k:***@127.0.0.1:1") && !e.contains("hunter2"),
                "{e}"
            );
        }
        let other = refused("mysql://db/keyturn").await;
        assert!(other.contains("sqlite://"), "{other}");
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.store.url = format!("sqlite://{}", dir.path().join("k.db").display());
        open(&c).await.unwrap().close().await;
    }
}
