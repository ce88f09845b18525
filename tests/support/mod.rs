//! Shared test support. Each test binary uses only part of it.
#![allow(dead_code)]

pub mod fake_discord;
pub mod keyturn;
pub mod server;
