//! Reading and verifying the audit log.

use super::*;
use crate::domain::audit;

impl Gateway {
    pub async fn audit_tail(&self, n: u32) -> Result<Vec<AuditEntry>, AppError> {
        Ok(self.store.audit_tail(n).await?)
    }

    pub async fn audit_after(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>, AppError> {
        Ok(self.store.audit_after(after, limit).await?)
    }

    /// Walks the whole chain and checks every request row against it, from
    /// one snapshot; `Err` names the first break. `Ok` is the number of
    /// entries verified.
    pub async fn audit_verify(&self) -> Result<Result<u64, audit::Break>, AppError> {
        Ok(self.store.audit_verify().await?.map(|(entries, requests)| {
            tracing::debug!(entries, requests, "audit log verified");
            entries
        }))
    }
}
