//! Shared test support.
pub mod fake_discord;
pub mod keyturn;
