//! Cache-aside storage for count answers, namespaced by REDIS_KEY_PREFIX.
//!
//! The connection is made lazily, so the service starts while Redis is down. After a
//! failure Redis is skipped for a short cool-down ([`RedisBreaker`]): callers do not
//! each pay a timeout, and the log gets one warning per outage instead of one per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::AsyncCommands;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use super::breaker::RedisBreaker;
use super::connection::{LazyConnection, RedisConnection};
use crate::config::RedisConfig;
use crate::metrics;

/// A handle to the cache; cheap to clone. Disabled when REDIS_HOST is empty or the
/// TTL is 0, in which case every lookup is a miss and nothing is written.
#[derive(Clone)]
pub struct CountCache {
    inner: Option<Arc<CacheInner>>,
}

struct CacheInner {
    connection: LazyConnection,
    key_prefix: String,
    ttl: Duration,
    breaker: RedisBreaker,
}

impl CountCache {
    /// Off when Redis is not configured or REDIS_CACHE_TTL is 0.
    pub(crate) fn from_config(config: Option<&RedisConfig>) -> Result<Self, ::redis::RedisError> {
        let Some((config, ttl)) = config.and_then(|config| Some((config, config.cache_ttl?))) else {
            return Ok(Self::disabled());
        };
        Ok(Self {
            inner: Some(Arc::new(CacheInner {
                connection: LazyConnection::new(config)?,
                key_prefix: config.key_prefix.clone(),
                ttl,
                breaker: RedisBreaker::default(),
            })),
        })
    }

    pub fn disabled() -> Self {
        Self { inner: None }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Looks up `key`; any failure is a miss.
    pub(crate) async fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let inner = self.inner.as_ref()?;
        let full_key = inner.full_key(key);
        let started = Instant::now();
        let result: Result<Option<Vec<u8>>, CacheFailure> = async {
            let mut connection = inner.connection().await?;
            Ok(connection.get(&full_key).await?)
        }
        .instrument(redis_span("get"))
        .await;
        let bytes = inner.observe("get", started, result)??;
        match serde_json::from_slice(&bytes) {
            Ok(value) => Some(value),
            Err(error) => {
                tracing::warn!(key = %full_key, error = %error, "cached value does not decode, ignoring it");
                None
            }
        }
    }

    /// Stores `value` under `key` with the given TTL (capped at REDIS_CACHE_TTL when
    /// `ttl` is `None`); failures are logged and ignored.
    pub(crate) async fn set<T: Serialize>(&self, key: &str, value: &T, ttl: Option<Duration>) {
        let Some(inner) = self.inner.as_ref() else { return };
        let Ok(bytes) = serde_json::to_vec(value) else { return };
        let full_key = inner.full_key(key);
        let seconds = ttl.unwrap_or(inner.ttl).as_secs().max(1);
        let started = Instant::now();
        let result: Result<(), CacheFailure> = async {
            let mut connection = inner.connection().await?;
            Ok(connection.set_ex(&full_key, bytes, seconds).await?)
        }
        .instrument(redis_span("set"))
        .await;
        inner.observe("set", started, result);
    }
}

fn redis_span(operation: &'static str) -> tracing::Span {
    tracing::info_span!(
        "redis.command",
        otel.name = operation,
        otel.kind = "client",
        db.system = "redis",
        db.operation = operation
    )
}

/// Why a cache call did not reach Redis or failed there.
enum CacheFailure {
    /// Skipped: Redis failed moments ago.
    CoolingDown,
    Redis(::redis::RedisError),
}

impl From<::redis::RedisError> for CacheFailure {
    fn from(error: ::redis::RedisError) -> Self {
        CacheFailure::Redis(error)
    }
}

impl CacheInner {
    fn full_key(&self, key: &str) -> String {
        format!("{}:cache:{key}", self.key_prefix)
    }

    async fn connection(&self) -> Result<RedisConnection, CacheFailure> {
        if self.breaker.is_cooling_down() {
            return Err(CacheFailure::CoolingDown);
        }
        Ok(self.connection.get().await?)
    }

    /// Records latency and errors; on failure starts the cool-down and warns once per
    /// outage. Returns the value on success.
    fn observe<T>(
        &self,
        operation: &'static str,
        started: Instant,
        result: Result<T, CacheFailure>,
    ) -> Option<T> {
        match result {
            Ok(value) => {
                metrics::record_redis_call(operation, started.elapsed(), false);
                if self.breaker.record_success() {
                    tracing::info!("redis is reachable again, cache back on");
                }
                Some(value)
            }
            Err(CacheFailure::CoolingDown) => None,
            Err(CacheFailure::Redis(error)) => {
                metrics::record_redis_call(operation, started.elapsed(), true);
                if self.breaker.record_failure() {
                    tracing::warn!(operation, error = %error, "redis call failed, serving from postgresql without cache");
                }
                None
            }
        }
    }
}
