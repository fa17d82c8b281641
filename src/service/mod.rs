//! Business rules of analytics-service: what TrackEvent, IdentifyUser and the count
//! queries mean, independent of gRPC. Inputs arrive as validated domain types (see
//! `validation`); storage goes through `repository`.

pub(crate) mod audit;
pub mod counts;
pub(crate) mod erasure;
pub(crate) mod export;
pub(crate) mod fold_task;
pub mod ingest;
pub(crate) mod partition_maintenance;
pub mod rate_limit;
pub mod readiness;
mod suppression;
pub mod validation;

use std::sync::Arc;

use chrono::Utc;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::EventsConfig;
use crate::metrics;
use crate::models::{Caller, IdentifyUser, NewEvent, TrackEvent, UserId};
use crate::repository::postgres::edge_hours::EdgeHourMemory;
use crate::repository::postgres::folded_bitmaps::FoldedBitmapMemory;
use crate::repository::postgres::replica::ReadReplica;
use crate::repository::postgres::user_ordinals::UserOrdinals;
use crate::repository::postgres::{
    AuditRepository, Database, EventRepository, ExportRepository, RepositoryError, SuppressionRepository,
    UpsertOutcome, UserRepository, WriteError,
};
use crate::repository::redis::CountCache;
use crate::security::pii::PiiCipher;
use crate::security::subject::SubjectHasher;
pub use ingest::IngestQueue;
pub(crate) use ingest::{EventResult, Stored};
use rate_limit::RateLimiter;
pub(crate) use suppression::Identified;
pub(crate) use validation::ValidationError;

/// Everything a caller can be told. `api` maps each variant to one gRPC status.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    InvalidArgument(#[from] ValidationError),
    #[error("rate limit exceeded, retry after {retry_after_seconds} s")]
    RateLimited { retry_after_seconds: u64 },
    /// The verified caller is not on the allow-list of this RPC.
    #[error("caller not allowed")]
    PermissionDenied,
    /// The ingest queue is full: the call was refused at once, nothing was stored.
    #[error("ingest queue full, retry later")]
    Overloaded,
    /// A dependency is down or not ready; nothing of the call was stored. The message is
    /// safe to show callers.
    #[error("{0}")]
    Unavailable(&'static str),
    /// The call's deadline passed. With `outcome_unknown` its events were inside a
    /// commit whose outcome is not known (retry with the same insert_id); without, they
    /// were withdrawn before any was written.
    #[error("deadline exceeded")]
    DeadlineExceeded { outcome_unknown: bool },
    /// The call needs something this replica is not configured with (e.g.
    /// SUPPRESSION_KEY_FILE for the administrative RPCs); the message says what.
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// What the call names does not exist (e.g. an unknown erasure request id).
    #[error("{0}")]
    NotFound(&'static str),
    /// A bug or unexpected failure; the details were logged, never shown.
    #[error("internal error")]
    Internal,
}

/// How a use case answers a failed repository call: logs what the caller is not told
/// (a schema that is not ready, a query no retry fixes) and maps the failure to the
/// caller's answer. Outages are not logged per call: the retry policy and the readiness
/// monitor report them. Deliberately not a `From`, so every `?` that turns a repository
/// failure into an answer names this step.
pub(crate) fn repository_failure(error: RepositoryError) -> ServiceError {
    match error {
        RepositoryError::Unavailable(_) | RepositoryError::TimedOut(_) => {
            ServiceError::Unavailable("database unavailable")
        }
        RepositoryError::NotReady(_) => {
            tracing::error!(error = %error, "database not ready; run `analytics-service migrate` if the schema is missing");
            ServiceError::Unavailable("database not ready")
        }
        RepositoryError::Query(_) => {
            tracing::error!(error = %error, "database query failed");
            ServiceError::Internal
        }
        RepositoryError::Corrupt(_) => {
            tracing::error!(error = %error, "stored data does not decode");
            ServiceError::Internal
        }
    }
}

/// How long recording one of the service's own lifecycle events may take.
const LIFECYCLE_EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Caller name of the service's own lifecycle events.
pub(crate) const SELF_CALLER: &str = "self";
/// Lifecycle event names (self-tracking).
pub(crate) const EVENT_STARTED: &str = "analytics_service.started";
pub(crate) const EVENT_STOPPING: &str = "analytics_service.stopping";
pub const EVENT_MIGRATION_APPLIED: &str = "analytics_service.migration_applied";

/// The analytics use cases. Cheap to clone: repositories hold pools.
#[derive(Clone)]
pub struct AnalyticsService {
    database: Database,
    /// The hot standby counts may read (POSTGRES_READ_HOST); `None` = counts read the
    /// primary.
    read_replica: Option<ReadReplica>,
    events: EventRepository,
    users: UserRepository,
    suppressions: SuppressionRepository,
    /// ExportUser's reads (see [`export`]).
    exports: ExportRepository,
    /// The audit trail of administrative calls (see [`audit`]).
    audit: AuditRepository,
    cache: CountCache,
    /// This replica's memory of the users' bitmap ordinals, shared by the unique-user
    /// counts on the primary and on the read replica (see [`UserOrdinals`]).
    user_ordinals: UserOrdinals,
    /// Summaries of folded hours for the partial hours at the edges of counts, on the
    /// primary and on the read replica (see [`EdgeHourMemory`]).
    edge_hours: EdgeHourMemory,
    /// Decoded folded user bitmaps for unique-user counts not cached, on the primary and
    /// on the read replica (see [`FoldedBitmapMemory`]).
    folded_bitmaps: FoldedBitmapMemory,
    rate_limiter: Arc<RateLimiter>,
    event_max_age: chrono::Duration,
    event_retention: Option<chrono::Duration>,
    ingest: IngestQueue,
    /// The keyed hash of user ids (SUPPRESSION_KEY_FILE); `None` = no suppression
    /// checks (the write paths run their plain statements), and the administrative RPCs
    /// answer FAILED_PRECONDITION.
    subjects: Option<SubjectHasher>,
    /// Wakes this replica's erasure worker when a DeleteUser call records a request.
    erasure_signal: erasure::ErasureSignal,
}

impl AnalyticsService {
    /// The use cases over their dependencies: `database` for reads and identities,
    /// `ingest` the group-commit queue every event write goes through (see
    /// [`ingest::start`]; a read-only user passes [`IngestQueue::closed`]), `pii` the
    /// cipher of PII_FIELDS values, and the accepted event ages and retention (the count
    /// cache needs the latter to know which answers a partition drop may still change).
    pub fn new(
        database: Database,
        ingest: IngestQueue,
        cache: CountCache,
        rate_limiter: RateLimiter,
        pii: PiiCipher,
        events: &EventsConfig,
    ) -> Self {
        Self {
            events: EventRepository::new(database.clone()).with_pii(pii.clone()),
            users: UserRepository::new(database.clone()).with_pii(pii.clone()),
            suppressions: SuppressionRepository::new(database.clone()),
            exports: ExportRepository::new(database.clone()).with_pii(pii),
            audit: AuditRepository::new(database.clone()),
            database,
            read_replica: None,
            cache,
            user_ordinals: UserOrdinals::default(),
            edge_hours: EdgeHourMemory::default(),
            folded_bitmaps: FoldedBitmapMemory::default(),
            rate_limiter: Arc::new(rate_limiter),
            event_max_age: events.max_age,
            event_retention: events.retention,
            ingest,
            subjects: None,
            erasure_signal: erasure::ErasureSignal::default(),
        }
    }

    /// Names users by `subjects` (SUPPRESSION_KEY_FILE): turns on suppression checks and
    /// the administrative RPCs.
    pub fn with_subject_hasher(self, subjects: Option<SubjectHasher>) -> Self {
        Self { subjects, ..self }
    }

    /// Lets count calls read `read_replica` when it proves it holds every write
    /// acknowledged before the call (see `counts::routing`).
    pub fn with_read_replica(self, read_replica: Option<ReadReplica>) -> Self {
        Self { read_replica, ..self }
    }

    /// The keyed hash of user ids, or FAILED_PRECONDITION for the administrative RPCs.
    pub(crate) fn subject_hasher(&self) -> Result<&SubjectHasher, ServiceError> {
        self.subjects.as_ref().ok_or(ServiceError::FailedPrecondition(
            "SUPPRESSION_KEY_FILE is not configured: erasure and access requests need it",
        ))
    }

    /// The stored properties of a user, decrypted (the service's own read path).
    #[tracing::instrument(skip_all)]
    pub async fn user_properties(&self, user_id: &UserId) -> Result<Option<serde_json::Value>, ServiceError> {
        self.users.properties(user_id).await.map_err(repository_failure)
    }

    /// The stored properties of an event, decrypted (the service's own read path).
    #[tracing::instrument(skip_all)]
    pub async fn event_properties(&self, event_id: Uuid) -> Result<Option<serde_json::Value>, ServiceError> {
        self.events.properties(event_id).await.map_err(repository_failure)
    }

    /// Fixes an event's id and time (checked against the accepted age window), and names
    /// its user by the keyed hash the suppression check needs.
    fn new_event(
        &self,
        event: TrackEvent,
        caller: &Caller,
        now: chrono::DateTime<Utc>,
    ) -> Result<NewEvent, ValidationError> {
        let timestamp = validation::event_timestamp(event.unix_seconds, now, self.event_max_age)?;
        let subject_hash = event.user_id.as_ref().and_then(|user_id| self.suppression_subject(user_id));
        Ok(NewEvent {
            id: Uuid::now_v7(),
            name: event.name,
            user_id: event.user_id,
            properties: event.properties,
            timestamp,
            key_scope: if event.insert_id.is_some() { caller.key_scope.clone() } else { String::new() },
            insert_id: event.insert_id,
            subject_hash,
        })
    }

    /// Spends one event of the sender's budget (the user, or `caller` for anonymous
    /// events).
    async fn check_rate_limit(&self, event: &NewEvent, caller: &Caller) -> Result<(), ServiceError> {
        let budget = rate_limit::budget_key(event.user_id.as_ref().map(|user| user.as_str()), &caller.name);
        self.rate_limiter.check(&budget).await.map_err(|wait| {
            metrics::record_event_rejected("rate_limited");
            metrics::record_rate_limited(1);
            ServiceError::RateLimited { retry_after_seconds: rate_limit::retry_after_seconds(wait) }
        })
    }

    /// Spends one token per event of each sender's budget, asking once per budget key
    /// for all of that key's events (one round trip for the whole call). Answers per
    /// event, in order: when a key has only k tokens left, its first k events pass.
    async fn check_rate_limits(&self, events: &[NewEvent], caller: &Caller) -> Vec<Result<(), ServiceError>> {
        let mut key_of_event = Vec::with_capacity(events.len());
        let mut demands: Vec<(String, u32)> = Vec::new();
        let mut key_index = std::collections::HashMap::new();
        for event in events {
            let budget =
                rate_limit::budget_key(event.user_id.as_ref().map(|user| user.as_str()), &caller.name);
            let index = *key_index.entry(budget.clone()).or_insert_with(|| {
                demands.push((budget, 0));
                demands.len() - 1
            });
            demands[index].1 += 1;
            key_of_event.push(index);
        }
        let mut grants = self.rate_limiter.check_each(demands).await;
        let mut refused = 0;
        let verdicts = key_of_event
            .into_iter()
            .map(|index| match grants.get_mut(index) {
                Some(grant) if grant.granted > 0 => {
                    grant.granted -= 1;
                    Ok(())
                }
                Some(grant) => {
                    refused += 1;
                    let retry_after_seconds = rate_limit::retry_after_seconds(grant.wait);
                    Err(ServiceError::RateLimited { retry_after_seconds })
                }
                None => Err(ServiceError::Internal),
            })
            .collect();
        if refused > 0 {
            metrics::record_events_rejected("rate_limited", refused);
            metrics::record_rate_limited(refused);
        }
        verdicts
    }

    /// Stores one event through the group commit; answers once it is committed, with its
    /// id, or with the original id when its insert_id was stored before, or as suppressed
    /// (nothing stored) when its user is on the suppression list. `caller`
    /// identifies who sent it (budget of anonymous events).
    /// `deadline` is when the caller stops waiting (see [`ingest`] for what each answer
    /// then means).
    #[tracing::instrument(skip_all, fields(event_name = %event.name.as_str()))]
    pub(crate) async fn track_event(
        &self,
        event: TrackEvent,
        caller: &Caller,
        deadline: Instant,
    ) -> Result<Stored, ServiceError> {
        let new_event = self
            .new_event(event, caller, Utc::now())
            .inspect_err(|_| metrics::record_event_rejected("invalid_argument"))?;
        self.check_rate_limit(&new_event, caller).await?;
        let mut results = self.ingest.submit(vec![new_event], deadline).await?;
        let result = results.pop().unwrap_or(Err(ServiceError::Internal));
        if let Ok(Stored::Suppressed) = result {
            metrics::record_suppressed("TrackEvent", 1);
        }
        result
    }

    /// Stores the valid events of one TrackEvents call in one group commit and answers
    /// per event, in order: invalid ones are rejected alone. The call itself fails only
    /// when nothing was stored for a reason that is not the events' own: queue full,
    /// shutting down, database unavailable (so a plain retry of the call is right).
    #[tracing::instrument(skip_all, fields(events = events.len()))]
    pub(crate) async fn track_events(
        &self,
        events: Vec<Result<TrackEvent, ValidationError>>,
        caller: &Caller,
        deadline: Instant,
    ) -> Result<Vec<EventResult>, ServiceError> {
        let now = Utc::now();
        let mut results: Vec<Option<EventResult>> = vec![None; events.len()];
        let mut valid = Vec::with_capacity(events.len());
        let mut positions = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            match event.and_then(|event| self.new_event(event, caller, now)) {
                Ok(new_event) => {
                    valid.push(new_event);
                    positions.push(index);
                }
                Err(error) => results[index] = Some(Err(ServiceError::InvalidArgument(error))),
            }
        }
        let invalid = results.len() - valid.len();
        if invalid > 0 {
            metrics::record_events_rejected("invalid_argument", invalid as u64);
        }
        // Each event spends its sender's budget; those over it are rejected alone.
        let verdicts = self.check_rate_limits(&valid, caller).await;
        let mut admitted = Vec::with_capacity(valid.len());
        let mut admitted_positions = Vec::with_capacity(valid.len());
        for ((new_event, position), verdict) in valid.into_iter().zip(positions).zip(verdicts) {
            match verdict {
                Ok(()) => {
                    admitted.push(new_event);
                    admitted_positions.push(position);
                }
                Err(error) => results[position] = Some(Err(error)),
            }
        }
        let (valid, positions) = (admitted, admitted_positions);
        if !valid.is_empty() {
            let stored = self.ingest.submit(valid, deadline).await?;
            if let Some(Err(error @ ServiceError::Unavailable(_))) = stored.first() {
                if stored.iter().all(Result::is_err) {
                    return Err(error.clone());
                }
            }
            let suppressed = stored.iter().filter(|result| matches!(result, Ok(Stored::Suppressed))).count();
            if suppressed > 0 {
                metrics::record_suppressed("TrackEvents", suppressed as u64);
            }
            for (position, result) in positions.into_iter().zip(stored) {
                results[position] = Some(result);
            }
        }
        Ok(results.into_iter().map(|result| result.unwrap_or(Err(ServiceError::Internal))).collect())
    }

    /// Creates or updates a user identity, unless the user is suppressed (then nothing is
    /// stored), and writes the audit record (never the property values). The record's
    /// time is the log line's own `timestamp`.
    #[tracing::instrument(skip_all, fields(user_id = %identity.user_id.as_str()))]
    pub(crate) async fn identify_user(
        &self,
        identity: IdentifyUser,
        caller: &str,
        deadline: Instant,
    ) -> Result<Identified, ServiceError> {
        let subject_hash = self.suppression_subject(&identity.user_id);
        let result = self.users.upsert(&identity, subject_hash.as_ref(), deadline).await;
        let outcome = match result {
            Ok(UpsertOutcome::Stored) => "ok",
            Ok(UpsertOutcome::Suppressed) => "suppressed",
            Err(_) => "failed",
        };
        tracing::info!(
            target: "audit",
            action = "identify_user",
            user_id = identity.user_id.as_str(),
            caller,
            property_keys = identity.properties.len(),
            outcome,
            "identify user"
        );
        match result {
            Ok(UpsertOutcome::Stored) => Ok(Identified::Stored),
            Ok(UpsertOutcome::Suppressed) => {
                metrics::record_suppressed("IdentifyUser", 1);
                Ok(Identified::Suppressed)
            }
            Err(WriteError::NotStored(error)) => Err(repository_failure(error)),
            Err(WriteError::OutcomeUnknown(_)) => {
                Err(ServiceError::DeadlineExceeded { outcome_unknown: true })
            }
        }
    }

    /// Forgets idle rate-limit buckets (called periodically to bound memory).
    pub(crate) fn forget_idle_rate_limits(&self) {
        self.rate_limiter.forget_idle_keys();
    }

    /// Self-tracking: records one of the service's own lifecycle events through the same
    /// ingestion path callers use, so they show up in its own counts. Failures are logged.
    pub async fn track_lifecycle(&self, name: &str, properties: Vec<(&str, String)>) {
        let properties = properties
            .into_iter()
            .map(|(key, value)| (key.to_string(), Some(crate::models::PropertyValue::String(value))));
        let event = match (
            crate::models::EventName::parse(name.to_string()),
            crate::models::Properties::parse(properties),
        ) {
            (Ok(name), Ok(properties)) => {
                TrackEvent { name, user_id: None, properties, unix_seconds: None, insert_id: None }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(error = %error, "invalid lifecycle event");
                return;
            }
        };
        let caller = Caller { name: SELF_CALLER.to_string(), key_scope: SELF_CALLER.to_string() };
        match self.track_event(event, &caller, Instant::now() + LIFECYCLE_EVENT_TIMEOUT).await {
            Ok(stored) => tracing::info!(
                event = name,
                event_id = stored.event_id().map(tracing::field::display),
                "lifecycle event tracked"
            ),
            Err(error) => tracing::warn!(event = name, error = %error, "lifecycle event not tracked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::user_bitmap::decode_users;

    #[test]
    fn stored_data_that_does_not_decode_is_an_internal_error_never_retried() {
        let error = RepositoryError::corrupt(decode_users(b"not a bitmap").unwrap_err());
        assert!(!error.is_retryable());
        assert_eq!(error.kind(), "corrupt");
        assert!(error.to_string().starts_with("stored data does not decode: user bitmap does not decode"));
        assert!(matches!(repository_failure(error), ServiceError::Internal));
    }
}
