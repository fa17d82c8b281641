//! Business rules of analytics-service: what TrackEvent, IdentifyUser and the count
//! queries mean, independent of gRPC. Inputs arrive as validated domain types (see
//! `validation`); storage goes through `repository`.

mod counts;
pub mod partition_maintenance;
pub mod rate_limit;
pub mod readiness;
pub mod validation;

use std::sync::Arc;

use chrono::Utc;
use uuid::Uuid;

use crate::metrics;
use crate::models::{IdentifyUser, NewEvent, TrackEvent, UserId};
use crate::repository::postgres::{schema, Database, EventRepository, RepositoryError, UserRepository};
use crate::repository::redis::CountCache;
use crate::security::pii::PiiCipher;
use rate_limit::RateLimiter;
pub use validation::ValidationError;

/// Everything a caller can be told. `api` maps each variant to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    InvalidArgument(#[from] ValidationError),
    #[error("rate limit exceeded, retry after {retry_after_seconds} s")]
    RateLimited { retry_after_seconds: u64 },
    /// The verified caller is not on the allow-list of this RPC.
    #[error("caller not allowed")]
    PermissionDenied,
    /// A dependency is down or not ready; the message is safe to show callers.
    #[error("{0}")]
    Unavailable(&'static str),
    /// A bug or unexpected failure; the details were logged, never shown.
    #[error("internal error")]
    Internal,
}

impl From<RepositoryError> for ServiceError {
    fn from(error: RepositoryError) -> Self {
        match error {
            RepositoryError::Unavailable(_) => ServiceError::Unavailable("database unavailable"),
            RepositoryError::NotReady(_) => {
                tracing::error!(error = %error, "database not ready; run `analytics-service migrate` if the schema is missing");
                ServiceError::Unavailable("database not ready")
            }
            RepositoryError::Query(_) => {
                tracing::error!(error = %error, "database query failed");
                ServiceError::Internal
            }
        }
    }
}

/// Caller name of the service's own lifecycle events.
pub const SELF_CALLER: &str = "self";
/// Lifecycle event names (self-tracking).
pub const EVENT_STARTED: &str = "analytics_service.started";
pub const EVENT_STOPPING: &str = "analytics_service.stopping";
pub const EVENT_MIGRATION_APPLIED: &str = "analytics_service.migration_applied";

/// The answer of the HealthCheck RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServingStatus {
    Serving,
    NotServing,
}

/// The analytics use cases. Cheap to clone: repositories hold pools.
#[derive(Clone)]
pub struct AnalyticsService {
    database: Database,
    events: EventRepository,
    users: UserRepository,
    cache: CountCache,
    rate_limiter: Arc<RateLimiter>,
    event_max_age: chrono::Duration,
    event_retention: Option<chrono::Duration>,
}

impl AnalyticsService {
    pub fn new(
        database: Database,
        cache: CountCache,
        rate_limiter: RateLimiter,
        event_max_age: chrono::Duration,
    ) -> Self {
        Self {
            events: EventRepository::new(database.clone()),
            users: UserRepository::new(database.clone()),
            database,
            cache,
            rate_limiter: Arc::new(rate_limiter),
            event_max_age,
            event_retention: None,
        }
    }

    /// Encrypts the PII_FIELDS values of events and identities on write and decrypts
    /// them on read.
    pub fn with_pii(self, pii: PiiCipher) -> Self {
        Self { events: self.events.with_pii(pii.clone()), users: self.users.with_pii(pii), ..self }
    }

    /// The stored properties of a user, decrypted (the service's own read path).
    #[tracing::instrument(skip_all)]
    pub async fn user_properties(&self, user_id: &UserId) -> Result<Option<serde_json::Value>, ServiceError> {
        Ok(self.users.properties(user_id).await?)
    }

    /// The stored properties of an event, decrypted (the service's own read path).
    #[tracing::instrument(skip_all)]
    pub async fn event_properties(&self, event_id: Uuid) -> Result<Option<serde_json::Value>, ServiceError> {
        Ok(self.events.properties(event_id).await?)
    }

    /// Sets EVENT_RETENTION_DAYS (`None` keeps events forever), which the count cache
    /// needs to know which answers a partition drop may still change.
    pub fn with_event_retention(mut self, event_retention: Option<chrono::Duration>) -> Self {
        self.event_retention = event_retention;
        self
    }

    /// Stores one event; returns its id once it is committed. `caller` identifies who
    /// sent it (budget of anonymous events).
    #[tracing::instrument(skip_all, fields(event_name = %event.name.as_str()))]
    pub async fn track_event(&self, event: TrackEvent, caller: &str) -> Result<Uuid, ServiceError> {
        let timestamp = validation::event_timestamp(event.unix_seconds, Utc::now(), self.event_max_age)
            .inspect_err(|_| metrics::record_event_rejected("invalid_argument"))?;
        let budget = rate_limit::budget_key(event.user_id.as_ref().map(|user| user.as_str()), caller);
        if let Err(wait) = self.rate_limiter.check(&budget).await {
            metrics::record_event_rejected("rate_limited");
            metrics::record_rate_limited();
            return Err(ServiceError::RateLimited {
                retry_after_seconds: rate_limit::retry_after_seconds(wait),
            });
        }
        let new_event = NewEvent {
            id: Uuid::now_v7(),
            name: event.name,
            user_id: event.user_id,
            properties: event.properties,
            timestamp,
        };
        match self.events.insert_many(std::slice::from_ref(&new_event)).await {
            Ok(()) => {
                metrics::record_events_ingested(1);
                Ok(new_event.id)
            }
            Err(error) => {
                metrics::record_event_rejected("database");
                Err(error.into())
            }
        }
    }

    /// Creates or updates a user identity and writes the audit record (never the
    /// property values). The record's time is the log line's own `timestamp`.
    #[tracing::instrument(skip_all, fields(user_id = %identity.user_id.as_str()))]
    pub async fn identify_user(&self, identity: IdentifyUser, caller: &str) -> Result<(), ServiceError> {
        let result = self.users.upsert(&identity).await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        tracing::info!(
            target: "audit",
            action = "identify_user",
            user_id = identity.user_id.as_str(),
            caller,
            property_keys = identity.properties.len(),
            outcome,
            "identify user"
        );
        result.map_err(ServiceError::from)
    }

    /// Forgets idle rate-limit buckets (called periodically to bound memory).
    pub fn forget_idle_rate_limits(&self) {
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
            (Ok(name), Ok(properties)) => TrackEvent { name, user_id: None, properties, unix_seconds: None },
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(error = %error, "invalid lifecycle event");
                return;
            }
        };
        match self.track_event(event, SELF_CALLER).await {
            Ok(event_id) => tracing::info!(event = name, %event_id, "lifecycle event tracked"),
            Err(error) => tracing::warn!(event = name, error = %error, "lifecycle event not tracked"),
        }
    }

    /// SERVING when PostgreSQL answers now and the schema is usable.
    pub async fn health(&self) -> ServingStatus {
        let healthy = self.database.ping().await.is_ok()
            && schema::status(self.database.pool()).await.is_ok_and(|status| status.is_usable());
        if healthy {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    }
}
