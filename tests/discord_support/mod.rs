//! Support for the Discord end-to-end tests: the fake Discord and a spawner
//! for the real binary with its bot pointed at it. Kept apart from
//! `tests/support` so that other test binaries neither compile the fake nor
//! re-run its self-checks.
#![allow(dead_code)]

pub mod fake_discord;
pub mod keyturn;
