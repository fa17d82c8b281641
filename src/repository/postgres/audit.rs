//! The `admin_audit` table: one row per administrative call (AnalyticsAdminService),
//! written when the call ends. A row holds when (`at`), which RPC (`rpc`, the proto
//! method name), who called (`caller`: the verified certificate identity under mTLS,
//! the peer address in plaintext), which user the call named (`subject_hash`: the keyed
//! hash of the user id under SUPPRESSION_KEY_FILE's key, NULL when the call named no
//! user or no key is configured; never the user id itself), the erasure request it
//! created or read (`request_id`), how it ended (`outcome`: `ok` or the gRPC code name)
//! and counts of what it did (`details`, a JSON object without values or user ids).

use super::{Database, RepositoryError};
use crate::models::AuditRecord;

const INSERT_AUDIT_RECORD: &str = "
    INSERT INTO admin_audit (rpc, caller, subject_hash, request_id, outcome, details)
    VALUES ($1, $2, $3, $4, $5, $6)";

/// Writes audit records.
#[derive(Clone, Debug)]
pub(crate) struct AuditRepository {
    database: Database,
}

impl AuditRepository {
    pub(crate) fn new(database: Database) -> Self {
        Self { database }
    }

    /// Stores `record` (retried like every read-pool call: the insert has no unique key, so
    /// a retry after a lost answer may store the record twice, never zero times).
    pub(crate) async fn insert(&self, record: &AuditRecord<'_>) -> Result<(), RepositoryError> {
        let subject_hash = record.subject.as_ref().map(|subject| subject.as_bytes().to_vec());
        self.database
            .with_retry("insert_admin_audit", || async {
                let mut session = self.database.session().await?;
                sqlx::query(INSERT_AUDIT_RECORD)
                    .bind(record.rpc.method())
                    .bind(record.caller)
                    .bind(subject_hash.as_deref())
                    .bind(record.request_id)
                    .bind(record.outcome)
                    .bind(&record.details)
                    .execute(&mut *session)
                    .await?;
                session.finish().await?;
                Ok(())
            })
            .await
    }
}
