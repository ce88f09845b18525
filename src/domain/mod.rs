//! The pure core: request lifecycle, policy, rate limits, audit chain and pairing.
//!
//! Nothing here reads a clock, draws a random number or does I/O: time, ids and
//! codes are parameters. Nothing here may import tokio, sqlx or serenity.

pub mod anomaly;
pub mod audit;
pub mod canonical;
pub mod credentials;
pub mod decision;
pub mod digest;
pub mod edit;
pub mod escalation;
pub mod flags;
pub mod pairing;
pub mod policy;
pub mod ratelimit;
pub mod redact;
pub mod request;
pub mod risk;
pub mod run;
pub mod secret_rules;
pub mod stats;
pub mod timed;
pub mod token;
pub mod trifecta;

pub use request::RequestId;
pub use risk::Risk;
