//! The audit trail of administrative calls: [`AnalyticsService::audit`] records how one
//! call ended, both as a row of `admin_audit` (see
//! [`crate::repository::postgres::audit`] for what a row holds) and as a JSON line on
//! the `audit` tracing target. Neither ever holds a user id: the user is named by its
//! keyed hash (hex in the log). A record that cannot be stored is logged as an error
//! (the log line stays) and never changes the call's answer.

use super::AnalyticsService;
use crate::models::AuditRecord;

impl AnalyticsService {
    /// Records how one administrative call ended (see the module documentation).
    pub(crate) async fn audit(&self, record: AuditRecord<'_>) {
        let rpc = record.rpc.method();
        let subject_hash = record.subject.map(|subject| subject.to_hex());
        let request_id = record.request_id.map(|id| id.to_string());
        tracing::info!(
            target: "audit",
            action = rpc,
            caller = record.caller,
            subject_hash = subject_hash.as_deref(),
            request_id = request_id.as_deref(),
            outcome = record.outcome,
            details = %record.details,
            "administrative call"
        );
        if let Err(error) = self.audit.insert(&record).await {
            tracing::error!(
                rpc,
                outcome = record.outcome,
                subject_hash = subject_hash.as_deref(),
                error = %error,
                "audit record not stored"
            );
        }
    }
}
