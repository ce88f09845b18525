//! The usage report (`stats.report`, `/stats`, `keyturn stats`): reads a
//! bounded window of requests from the store and hands them to the pure
//! computation in [`crate::domain::stats`].

use super::*;
use crate::domain::stats::{self, StatsReport, MAX_ROWS, MAX_WINDOW_SECS};

impl Gateway {
    /// The usage report over the requests created in the last
    /// `window_secs` seconds (1 to [`MAX_WINDOW_SECS`]). Reads at most
    /// [`MAX_ROWS`] requests, the newest; a busier window is reported
    /// with `truncated: true`.
    pub async fn stats_report(&self, window_secs: u64) -> Result<StatsReport, AppError> {
        if window_secs == 0 || window_secs > MAX_WINDOW_SECS {
            return Err(bad(format!(
                "the window must be between 1 second and {} days",
                MAX_WINDOW_SECS / 86_400
            )));
        }
        let until_ms = now_ms();
        // Bounded above, so the product cannot overflow an i64.
        let since_ms = until_ms - (window_secs as i64) * 1000;
        let limit = MAX_ROWS as u32 + 1;
        let mut rows = self.store.requests_since(since_ms, limit).await?;
        let truncated = rows.len() > MAX_ROWS;
        rows.truncate(MAX_ROWS);
        if truncated {
            tracing::warn!(
                rows = MAX_ROWS,
                window_secs,
                "usage report cut to the newest requests"
            );
        }
        Ok(stats::compute(&rows, since_ms, until_ms, truncated))
    }
}
