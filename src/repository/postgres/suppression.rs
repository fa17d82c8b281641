//! The `suppressed_users` table outside ingestion: lifting a suppression. A user is named
//! only by its keyed hash ([`SubjectHash`]). Ingestion reads the table inside its
//! inserting statements (`events`, `users`); DeleteUser adds rows in its own transaction.

use super::{Database, RepositoryError};
use crate::security::subject::SubjectHash;

#[derive(Clone, Debug)]
pub(crate) struct SuppressionRepository {
    database: Database,
}

impl SuppressionRepository {
    pub(crate) fn new(database: Database) -> Self {
        Self { database }
    }

    /// Removes the user from the suppression list; whether it was on it. Retried on
    /// transient failures: a retry after a lost answer may find the row already removed
    /// by the first attempt and answer false, and either way the user is not suppressed
    /// afterwards.
    pub(crate) async fn lift(&self, subject_hash: &SubjectHash) -> Result<bool, RepositoryError> {
        self.database
            .with_retry("lift_suppression", || async {
                let mut session = self.database.session().await?;
                let deleted = sqlx::query("DELETE FROM suppressed_users WHERE subject_hash = $1")
                    .bind(subject_hash.as_bytes())
                    .execute(&mut *session)
                    .await?;
                session.finish().await?;
                Ok(deleted.rows_affected() > 0)
            })
            .await
    }
}
