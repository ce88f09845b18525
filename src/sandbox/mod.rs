//! Running approved calls: the bubblewrap (and `host`) executor, the child
//! that sets limits before it execs, and the credential broker. An adapter:
//! it implements [`crate::app::ports::Executor`] and
//! [`crate::app::ports::Credentials`], and names no other adapter.

pub mod child;
pub mod credentials;
pub mod executor;
