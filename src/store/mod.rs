//! Persistence adapter: implements the app's ports ([`crate::app::ports`])
//! on SQLite.
//!
//! Every SQL statement lives under this module; nothing outside it imports
//! sqlx or rusqlite. Every mutation writes its audit events in the same transaction, and
//! writes are group-committed by one writer thread.

pub mod files;
mod sqlite;

pub use sqlite::check;
pub use sqlite::{SqliteStore, WalTuning};
