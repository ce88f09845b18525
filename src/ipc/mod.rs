//! The agent socket: JSON-RPC 2.0, one JSON object per line (docs/protocol.md).
//!
//! `protocol` is pure (types, codes, the methods with their typed params,
//! the decision view, and the client envelope shared by the async client
//! and the blocking gate), `answers` is how a client reads results (pure),
//! `handler` maps one line to one response without touching a socket,
//! `server` owns the Unix listener, `tcp` the optional TCP listener (bearer
//! tokens, TLS), `tcp_endpoint` how clients reach it (URL, token, CA), and
//! `client` is what the CLI uses.

pub mod answers;
pub mod client;
pub mod handler;
pub mod protocol;
pub mod server;
pub mod tcp;
pub mod tcp_endpoint;
