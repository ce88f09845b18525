//! Audit retention: prunes entries older than `audit.retention_days` once at
//! start and then every hour, each prune leaving a checkpoint entry so the
//! remaining chain still verifies. Does nothing when retention is 0 (keep).

use super::Gateway;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the log is pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Runs until `stop` is cancelled.
pub async fn run(gw: Arc<Gateway>, stop: CancellationToken) {
    let days = gw.config().audit.retention_days;
    if days == 0 {
        return;
    }
    loop {
        if let Err(e) = gw.prune_audit(days).await {
            // Keeping entries longer is the safe failure; try again next round.
            tracing::error!(error = %e, "audit retention prune failed");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}
