//! PostgreSQL access: the connection pool, error classification and the retry policy
//! every repository call goes through. Tables live in `events`, `users` and `schema`;
//! `pii` re-encrypts stored sensitive values after a key rotation.

pub mod events;
pub mod fold;
pub mod partitions;
pub mod pii;
pub mod rollups;
pub mod schema;
pub mod users;

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::ConnectOptions;
use tracing::Instrument;

use crate::config::{Config, PostgresSslMode};
use crate::metrics;

pub use events::{EventRepository, InsertOutcome};
pub use users::UserRepository;

/// A database failure, classified by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// Connection lost or refused, pool exhausted, serialization conflict: worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database answers but cannot serve us: schema not migrated, wrong database,
    /// credentials refused. Retrying the same call does not help.
    #[error("database not ready: {0}")]
    NotReady(#[source] sqlx::Error),
    /// Anything else: a bug or a constraint we did not expect.
    #[error("database query failed: {0}")]
    Query(#[source] sqlx::Error),
}

impl RepositoryError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, RepositoryError::Unavailable(_))
    }

    /// Short label for metrics (`analytics_db_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            RepositoryError::Unavailable(_) => "unavailable",
            RepositoryError::NotReady(_) => "not_ready",
            RepositoryError::Query(_) => "query",
        }
    }
}

impl From<sqlx::Error> for RepositoryError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => RepositoryError::Unavailable(error),
            sqlx::Error::Database(database_error) => {
                let code = database_error.code().unwrap_or_default();
                match code.as_ref() {
                    // serialization_failure, deadlock_detected, too_many_connections,
                    // admin/crash shutdown, cannot_connect_now, connection exceptions (08xxx).
                    "40001" | "40P01" | "53300" | "57P01" | "57P02" | "57P03" => {
                        RepositoryError::Unavailable(error)
                    }
                    code if code.starts_with("08") => RepositoryError::Unavailable(error),
                    // undefined_table, undefined_column, invalid_schema_name,
                    // invalid_catalog_name (no such database), invalid_password.
                    "42P01" | "42703" | "3F000" | "3D000" | "28P01" | "28000" => {
                        RepositoryError::NotReady(error)
                    }
                    _ => RepositoryError::Query(error),
                }
            }
            _ => RepositoryError::Query(error),
        }
    }
}

/// How often and how patiently retryable failures are retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Total attempts, the first included (the design's 5).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles for each further one.
    pub base_delay: Duration,
}

/// The pool plus the retry policy: what every PostgreSQL repository holds.
#[derive(Clone, Debug)]
pub struct Database {
    pool: PgPool,
    retry: RetryPolicy,
}

impl Database {
    /// Creates the pool without connecting, so the service starts (not ready) while
    /// PostgreSQL is down and connects as soon as it is back.
    pub fn connect_lazy(config: &Config) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(config.postgres_max_connections)
            .min_connections(0)
            .acquire_timeout(config.postgres_acquire_timeout())
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_lazy_with(connect_options(config));
        let retry = RetryPolicy {
            max_attempts: config.db_retry_max_attempts,
            base_delay: config.db_retry_base_delay(),
        };
        Self { pool, retry }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One round trip, no retry: the liveness of the database as seen from here.
    pub async fn ping(&self) -> Result<(), RepositoryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Runs `operation`, retrying retryable failures with exponential backoff, and
    /// records its latency and errors under `operation_name`.
    pub async fn with_retry<T, F, Fut>(
        &self,
        operation_name: &'static str,
        operation: F,
    ) -> Result<T, RepositoryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RepositoryError>>,
    {
        let started = Instant::now();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.base_delay)
            .with_max_delay(self.retry.base_delay.saturating_mul(64))
            .with_factor(2.0)
            .with_max_times(self.retry.max_attempts.saturating_sub(1) as usize);
        let result = operation
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(RepositoryError::is_retryable)
            .notify(|error, delay| {
                tracing::warn!(
                    operation = operation_name,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %error,
                    "database call failed, retrying"
                );
            })
            .instrument(tracing::info_span!(
                "db.query",
                otel.name = operation_name,
                otel.kind = "client",
                db.system = "postgresql",
                db.operation = operation_name,
            ))
            .await;
        metrics::record_db_call(
            operation_name,
            started.elapsed(),
            result.as_ref().err().map(RepositoryError::kind),
        );
        result
    }

    /// Closes every connection; calls after this fail as unavailable.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Connection options from the configuration (shared by the pool and `migrate`),
/// TLS included: POSTGRES_SSLMODE and POSTGRES_SSL_ROOT_CERT.
pub fn connect_options(config: &Config) -> PgConnectOptions {
    let ssl_mode = match config.postgres_sslmode {
        PostgresSslMode::Disable => PgSslMode::Disable,
        PostgresSslMode::Prefer => PgSslMode::Prefer,
        PostgresSslMode::Require => PgSslMode::Require,
        PostgresSslMode::VerifyCa => PgSslMode::VerifyCa,
        PostgresSslMode::VerifyFull => PgSslMode::VerifyFull,
    };
    let mut options = PgConnectOptions::new()
        .host(&config.postgres_host)
        .port(config.postgres_port)
        .database(&config.postgres_db)
        .username(&config.postgres_user)
        .password(config.postgres_password.expose())
        .ssl_mode(ssl_mode)
        .application_name(&config.service_name)
        .disable_statement_logging();
    // Without a root certificate sqlx trusts the system roots.
    if let Some(root_cert) = config.postgres_ssl_root_cert() {
        options = options.ssl_root_cert(root_cert);
    }
    options
}
