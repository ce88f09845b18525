//! A fake Discord for integration tests: the REST API under `/api/v10` and the gateway
//! websocket, both on `127.0.0.1:<free port>`, good enough for an unmodified serenity 0.12.5
//! client pointed at it with `HttpBuilder::proxy(api_base).ratelimiter_disabled(true)`.
//!
//! It keeps the state a test wants to look at (every REST call, the current messages per
//! channel, interaction responses) and enforces the Discord rules a bot most easily breaks
//! (one initial response per interaction within 3 s, message/embed/component/modal limits,
//! `allowed_mentions` on every message). Breaches are answered the way Discord answers them
//! and also recorded in [`FakeDiscord::violations`], which tests assert to be empty.
//!
//! Every gateway dispatch and every REST reply it produces is checked at runtime to
//! deserialize with serenity's own types; a failure is recorded as a `FAKE BUG` violation,
//! because serenity would silently drop the event (`Event::Unknown`) and the test would only
//! see a timeout.
//!
//! This folder is shared verbatim between crates (`mod fake_discord;`): it must not import
//! anything from the crate under test. Dependencies: tokio, axum (feature `ws`), serde, serde_json,
//! serenity (payload self-checks only).
//!
//! Usage (the bot side must use `HttpBuilder::new(DEFAULT_TOKEN).proxy(fake.api_base())
//! .ratelimiter_disabled(true)`; the rate limiter ignores the proxy):
//!
//! ```text
//! let fake = FakeDiscord::start(FakeDiscordConfig::default()).await;
//! /* start the bot against fake.api_base() */
//! fake.wait_ready(Duration::from_secs(5)).await?;
//! let card = fake.wait_for_messages(APPROVALS_CHANNEL_ID, |m| m.first().cloned(), secs(5)).await?;
//! let h = fake.click_button(card.id, "keyturn:v1:approve:…", ALICE).await;
//! let resp = fake.wait_interaction_response(&h, secs(5)).await?;   // the callback body
//! fake.assert_no_violations();
//! ```
//!
//! Predicates passed to the `wait_*` methods run under the fake's lock: they must not call
//! back into the fake.
//!
//! Files by section: `constants`, `config`, `records` (what tests read), `fake` (the
//! handle tests hold), `state` and `inner` (shared state), `gateway` (websocket), `rest`
//! (HTTP routes), `rate_limit`, `failures` (injected errors), `inject` (interactions sent to
//! the bot), `request_body`, `validate`, `payload`, `serenity_check` (self-checks).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, State as AxumState};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

mod config;
mod constants;
mod failures;
mod fake;
mod gateway;
mod inject;
mod inner;
mod payload;
mod rate_limit;
mod records;
mod request_body;
mod rest;
mod serenity_check;
mod state;
mod validate;

pub use self::config::*;
pub use self::constants::*;
use self::failures::*;
pub use self::fake::*;
use self::gateway::*;
use self::payload::*;
pub use self::records::*;
use self::request_body::*;
use self::rest::*;
pub use self::serenity_check::*;
use self::state::*;
pub use self::validate::*;
