//! The agent socket: JSON-RPC 2.0, one JSON object per line (docs/protocol.md).
//!
//! `protocol` is pure (types, codes, the decision view), `handler` maps one
//! line to one response without touching a socket, `server` owns the Unix
//! listener, and `client` is what the CLI uses.

pub mod answers;
pub mod client;
pub mod handler;
pub mod protocol;
pub mod server;
