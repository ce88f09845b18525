//! Keyturn: a self-hosted, human-in-the-loop approval gateway for AI agents.
//!
//! Layout: `domain` is the pure core (no I/O, clock or runtime); `app` holds
//! the use-cases and owns the persistence ports (`app::ports`), including
//! the change feed its waiters, deadline scheduler and policy view follow.
//! Adapters call `app` and never each other: `store` (implements the ports
//! on SQLite), `ipc` (agent and admin sockets), `cli`, `discord` (the bot
//! and card outbox, which reach persistence only through `app`),
//! `integrations` and `monitor` (health and metrics over HTTP). Only `store`
//! and the composition root (`serve`, `main`) name `store`;
//! `tests/architecture.rs` holds these rules.

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
pub mod sandbox;
pub mod serve;
pub mod store;
