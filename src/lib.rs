//! Keyturn: a self-hosted, human-in-the-loop approval gateway for AI agents.
//!
//! Layout: `domain` is the pure core; `app` holds the use-cases over the
//! `store` port; `ipc` (agent socket), `cli`, `discord` and `monitor` (health and
//! metrics over HTTP) are adapters that
//! call `app`. Adapters never call each other.

pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod discord;
pub mod domain;
pub mod integrations;
pub mod ipc;
pub mod logging;
pub mod monitor;
pub mod serve;
pub mod store;
