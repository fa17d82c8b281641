//! The suppression list as the use cases see it: which users' later events and identities
//! are not stored (the write paths check it inside their inserting statements), and
//! lifting a suppression (LiftSuppression).

use super::{repository_failure, AnalyticsService, ServiceError};
use crate::models::UserId;
use crate::security::subject::SubjectHash;

/// What IdentifyUser did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Identified {
    /// The identity was created or merged into.
    Stored,
    /// Nothing was stored: the user is suppressed.
    Suppressed,
}

impl AnalyticsService {
    /// The keyed hash the write paths check `user_id` against the suppression list
    /// with; `None` without SUPPRESSION_KEY_FILE (then nothing is checked).
    pub(super) fn suppression_subject(&self, user_id: &UserId) -> Option<SubjectHash> {
        self.subjects.as_ref().map(|subjects| subjects.hash(user_id.as_str()))
    }

    /// Removes `user_id` from the suppression list, so its later events and identities
    /// are stored again; whether it was suppressed. FAILED_PRECONDITION without
    /// SUPPRESSION_KEY_FILE.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn lift_suppression(&self, user_id: &UserId) -> Result<bool, ServiceError> {
        let subject_hash = self.subject_hasher()?.hash(user_id.as_str());
        self.suppressions.lift(&subject_hash).await.map_err(repository_failure)
    }
}
