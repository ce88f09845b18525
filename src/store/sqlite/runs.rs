//! The process registry on this backend (see [`crate::app::ports::Runs`]).

use super::SqliteStore;
use crate::app::ports::Runs;

#[async_trait::async_trait]
impl Runs for SqliteStore {}
