//! The `user_identities` table: one row per identified user. With a subject hash the
//! upsert reads the suppression list (`suppressed_users`) in the same statement and stores
//! nothing for a suppressed user.

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::pii::open_properties;
use super::{discard, query_span, Database, RepositoryError, WriteError};
use crate::metrics;
use crate::models::{IdentifyUser, UserId};
use crate::security::pii::PiiCipher;
use crate::security::subject::SubjectHash;

/// Properties merge (`||`: new keys overwrite, others stay); `first_seen` is written
/// once; `last_seen` and `updated_at` only move forward.
const UPSERT_USER: &str = "
    INSERT INTO user_identities AS existing (user_id, properties, first_seen, last_seen, updated_at)
    VALUES ($1, $2, now(), now(), now())
    ON CONFLICT (user_id) DO UPDATE SET
        properties = COALESCE(existing.properties, '{}'::jsonb) || EXCLUDED.properties,
        last_seen = GREATEST(existing.last_seen, EXCLUDED.last_seen),
        updated_at = GREATEST(existing.updated_at, EXCLUDED.updated_at)";

/// [`UPSERT_USER`] unless the user's keyed hash ($3) is on the suppression list, decided
/// at the statement's snapshot: no row is inserted or updated then, so the statement
/// affects no row exactly when the user is suppressed.
const UPSERT_USER_UNLESS_SUPPRESSED: &str = "
    INSERT INTO user_identities AS existing (user_id, properties, first_seen, last_seen, updated_at)
    SELECT $1, $2, now(), now(), now()
    WHERE NOT EXISTS (SELECT 1 FROM suppressed_users WHERE subject_hash = $3)
    ON CONFLICT (user_id) DO UPDATE SET
        properties = COALESCE(existing.properties, '{}'::jsonb) || EXCLUDED.properties,
        last_seen = GREATEST(existing.last_seen, EXCLUDED.last_seen),
        updated_at = GREATEST(existing.updated_at, EXCLUDED.updated_at)";

/// What an upsert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpsertOutcome {
    /// The identity was created or merged into.
    Stored,
    /// Nothing was stored: the user is on the suppression list.
    Suppressed,
}

#[derive(Clone, Debug)]
pub(crate) struct UserRepository {
    database: Database,
    pii: PiiCipher,
}

impl UserRepository {
    pub(crate) fn new(database: Database) -> Self {
        Self { database, pii: PiiCipher::disabled() }
    }

    /// Encrypts sensitive property values on write and decrypts them on read.
    pub(crate) fn with_pii(self, pii: PiiCipher) -> Self {
        Self { pii, ..self }
    }

    /// The stored properties of one user, decrypted; `None` when the user is unknown.
    pub(crate) async fn properties(
        &self,
        user_id: &UserId,
    ) -> Result<Option<serde_json::Value>, RepositoryError> {
        let stored: Option<Option<serde_json::Value>> = self
            .database
            .with_retry("select_user_properties", || async {
                let mut session = self.database.session().await?;
                let value = sqlx::query_scalar("SELECT properties FROM user_identities WHERE user_id = $1")
                    .bind(user_id.as_str())
                    .fetch_optional(&mut *session)
                    .await?;
                session.finish().await?;
                Ok(value)
            })
            .await?;
        stored.map(|properties| open_properties(&self.pii, properties.unwrap_or_default())).transpose()
    }

    /// Creates the identity or merges into it; with `subject_hash`, only when that user is
    /// not suppressed. Failures that stored nothing are retried
    /// as DB_RETRY_* says; a failure of unknown outcome (connection lost, or no answer
    /// before `deadline`) is retried until `deadline`, since merging the same properties
    /// again changes nothing. The error says whether anything may be stored.
    ///
    /// A retry answers for the state at its own snapshot: when the user was suppressed
    /// after an attempt of unknown outcome, the retry answers `Suppressed` although that
    /// attempt may have stored the identity; DeleteUser's erasure removes such a row.
    pub(crate) async fn upsert(
        &self,
        identity: &IdentifyUser,
        subject_hash: Option<&SubjectHash>,
        deadline: Instant,
    ) -> Result<UpsertOutcome, WriteError> {
        let properties = self.pii.sealed(identity.properties.json());
        let retry = self.database.retry_policy();
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(retry.base_delay)
            .with_max_delay(retry.base_delay.saturating_mul(64))
            .with_factor(2.0)
            .without_max_times()
            .build();
        let mut attempt = 0u32;
        let mut outcome_unknown = false;
        loop {
            attempt += 1;
            let started = std::time::Instant::now();
            let result = async {
                let mut session = self.database.session_for_write().await?;
                let upsert = async {
                    let done = match subject_hash {
                        None => {
                            sqlx::query(UPSERT_USER)
                                .bind(identity.user_id.as_str())
                                .bind(properties.as_ref())
                                .execute(&mut *session)
                                .await
                        }
                        Some(subject_hash) => {
                            sqlx::query(UPSERT_USER_UNLESS_SUPPRESSED)
                                .bind(identity.user_id.as_str())
                                .bind(properties.as_ref())
                                .bind(subject_hash.as_bytes())
                                .execute(&mut *session)
                                .await
                        }
                    }
                    .map_err(WriteError::from_statement)?;
                    // Behind a pooler the upsert ran in a transaction: its commit may
                    // land even when its answer does not come back.
                    session.finish().await.map_err(|error| WriteError::OutcomeUnknown(error.into()))?;
                    Ok(if done.rows_affected() == 0 {
                        UpsertOutcome::Suppressed
                    } else {
                        UpsertOutcome::Stored
                    })
                };
                match tokio::time::timeout_at(deadline, upsert).await {
                    Ok(result) => result,
                    Err(_) => {
                        discard(session);
                        Err(WriteError::OutcomeUnknown(RepositoryError::TimedOut(started.elapsed())))
                    }
                }
            }
            .instrument(query_span("upsert_user"))
            .await;
            metrics::record_db_call(
                "upsert_user",
                started.elapsed(),
                result.as_ref().err().map(|error| error.error().kind()),
            );
            let error = match result {
                Ok(outcome) => return Ok(outcome),
                Err(WriteError::OutcomeUnknown(error)) => {
                    outcome_unknown = true;
                    error
                }
                Err(WriteError::NotStored(error)) => error,
            };
            let give_up = Instant::now() >= deadline
                || (!outcome_unknown && (!error.is_retryable() || attempt >= retry.max_attempts));
            if give_up {
                return Err(if outcome_unknown {
                    WriteError::OutcomeUnknown(error)
                } else {
                    WriteError::NotStored(error)
                });
            }
            tracing::warn!(attempt, error = %error, outcome_unknown, "identity upsert failed, retrying");
            let pause = delays.next().unwrap_or(retry.base_delay);
            tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
        }
    }
}
