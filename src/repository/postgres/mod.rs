//! PostgreSQL access: the connection pool, error classification and the retry policy
//! every repository call goes through. Tables live in `events`, `users`, `suppression`,
//! `erasure`, `partitions`, `audit` and `schema`; `export` reads everything stored about
//! one user; `rollups` runs the count plans the service builds, on the primary or on a
//! standby (`replica`) checked to have replayed what the primary had committed; `fold`
//! moves the insert trigger's output into the rollups; `pii` re-encrypts stored sensitive
//! values after a key rotation.
//!
//! Behind a transaction pooler (POSTGRES_POOLER=transaction) every statement runs inside
//! an explicit transaction ([`Session`]): sqlx sends a statement's Parse and its Bind in
//! two protocol round trips, and only an open transaction keeps the pooler from handing
//! the second one to another server session.

pub(crate) mod audit;
pub mod edge_hours;
pub mod erasure;
pub(crate) mod events;
pub(crate) mod export;
pub mod fold;
pub mod folded_bitmaps;
pub mod hour_spans;
pub mod partitions;
pub mod pii;
pub mod replica;
pub mod rollups;
pub mod schema;
pub(crate) mod suppression;
pub(crate) mod user_ordinals;
pub(crate) mod users;

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgSslMode};
use sqlx::ConnectOptions;
use sqlx::{Postgres, TransactionManager};
use tracing::Instrument;

use crate::config::{PostgresConfig, PostgresPooler, PostgresSslMode};
use crate::metrics;

pub(crate) use audit::AuditRepository;
pub use events::{EventRepository, InsertOutcome};
pub(crate) use export::{ExportReader, ExportRepository};
pub(crate) use suppression::SuppressionRepository;
pub(crate) use users::{UpsertOutcome, UserRepository};

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
    /// The database answered, but a stored value does not decode (a user bitmap that is
    /// not one, a sensitive value that does not decrypt). Retrying does not help.
    #[error("stored data does not decode: {0}")]
    Corrupt(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No answer within the time allowed (a stuck or blackholed connection): worth
    /// retrying on another connection.
    #[error("database did not answer within {} ms", .0.as_millis())]
    TimedOut(Duration),
}

impl RepositoryError {
    /// A stored value that does not decode.
    pub fn corrupt(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        RepositoryError::Corrupt(Box::new(error))
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, RepositoryError::Unavailable(_) | RepositoryError::TimedOut(_))
    }

    /// Short label for metrics (`analytics_db_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            RepositoryError::Unavailable(_) => "unavailable",
            RepositoryError::NotReady(_) => "not_ready",
            RepositoryError::Query(_) => "query",
            RepositoryError::Corrupt(_) => "corrupt",
            RepositoryError::TimedOut(_) => "timeout",
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
                    // query_canceled (statement_timeout), admin/crash shutdown,
                    // cannot_connect_now, connection exceptions (08xxx).
                    "40001" | "40P01" | "53300" | "57014" | "57P01" | "57P02" | "57P03" => {
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

/// Why one attempt of a write failed, and whether anything of it may be stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// Nothing of the write is stored: no connection was had, or PostgreSQL answered
    /// the statement with an error (its transaction rolled back).
    #[error("write not stored: {0}")]
    NotStored(#[source] RepositoryError),
    /// The statement was sent and no answer came back (connection lost, or no answer
    /// within the time allowed): it may have committed.
    #[error("write outcome unknown: {0}")]
    OutcomeUnknown(#[source] RepositoryError),
}

impl WriteError {
    /// Classifies an error raised while a statement was on its way or in flight.
    pub(crate) fn from_statement(error: sqlx::Error) -> Self {
        match error {
            // PostgreSQL answered with an error: the statement's implicit transaction
            // rolled back. Encoding fails before anything is sent.
            sqlx::Error::Database(_) | sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } => {
                WriteError::NotStored(error.into())
            }
            other => WriteError::OutcomeUnknown(other.into()),
        }
    }

    pub(crate) fn error(&self) -> &RepositoryError {
        match self {
            WriteError::NotStored(error) | WriteError::OutcomeUnknown(error) => error,
        }
    }

    pub(crate) fn into_error(self) -> RepositoryError {
        match self {
            WriteError::NotStored(error) | WriteError::OutcomeUnknown(error) => error,
        }
    }
}

/// The client span of one database operation (a child of the caller's span).
pub(crate) fn query_span(operation_name: &'static str) -> tracing::Span {
    tracing::info_span!(
        "db.query",
        otel.name = operation_name,
        otel.kind = "client",
        db.system = "postgresql",
        db.operation = operation_name,
    )
}

/// Drops a session whose statement did not answer in time, without returning its
/// connection to the pool (it may still carry the statement, or sit on a dead socket).
pub(crate) fn discard(mut session: Session) {
    if let Some(connection) = session.connection.take() {
        drop(connection.detach());
    }
}

/// One unit of work's hold on PostgreSQL: a pooled connection, and behind a transaction
/// pooler a transaction on it. Statements run on `&mut *session`; [`Session::finish`]
/// commits that transaction (directly, each statement has already committed on its own).
/// Dropped unfinished, the transaction rolls back.
pub(crate) struct Session {
    /// `None` only after [`discard`].
    connection: Option<PoolConnection<Postgres>>,
    in_transaction: bool,
}

impl Session {
    /// Commits the transaction a pooled session runs in; nothing to do directly.
    pub(crate) async fn finish(&mut self) -> Result<(), sqlx::Error> {
        if self.in_transaction {
            <Postgres as sqlx::Database>::TransactionManager::commit(&mut **self).await?;
            self.in_transaction = false;
        }
        Ok(())
    }
}

/// What [`Session::prefer_generic_plans`] opens its transaction with.
const BEGIN_WITH_GENERIC_PLANS: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

impl Session {
    /// Runs the session's further statements in a transaction that plans each prepared
    /// statement once per connection (a generic plan, reused with any parameters) instead
    /// of for every call: for a statement with many branches whose planning costs more
    /// than its execution. Directly only: behind a transaction pooler the statements are
    /// prepared anew in every transaction, so each is planned once either way.
    pub(crate) async fn prefer_generic_plans(&mut self) -> Result<(), sqlx::Error> {
        if !self.in_transaction {
            <Postgres as sqlx::Database>::TransactionManager::begin(
                &mut **self,
                Some(BEGIN_WITH_GENERIC_PLANS.into()),
            )
            .await?;
            self.in_transaction = true;
        }
        Ok(())
    }

    /// Closes the connection when the session is dropped instead of returning it to the
    /// pool (a query may still be sending rows on it).
    pub(crate) fn close_on_drop(&mut self) {
        if let Some(connection) = self.connection.as_mut() {
            connection.close_on_drop();
        }
    }
}

impl Deref for Session {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.connection.as_ref().expect("session used after discard")
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.connection.as_mut().expect("session used after discard")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.in_transaction {
            if let Some(connection) = self.connection.as_mut() {
                // Queued; sent before the connection serves anyone else.
                <Postgres as sqlx::Database>::TransactionManager::start_rollback(connection);
            }
        }
    }
}

/// How often and how patiently retryable failures are retried.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryPolicy {
    /// Total attempts, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles for each further one.
    pub base_delay: Duration,
}

/// The pool plus the retry policy: what every PostgreSQL repository holds.
#[derive(Clone, Debug)]
pub struct Database {
    pool: PgPool,
    retry: RetryPolicy,
    /// Behind a transaction pooler: how each [`Session`]'s transaction starts (see
    /// [`pooled_begin_statement`]); `None` = direct sessions.
    pooled_begin: Option<String>,
}

/// A database on an existing pool, reached directly (no pooler), whose calls are tried
/// once.
impl From<PgPool> for Database {
    fn from(pool: PgPool) -> Self {
        Self { pool, retry: RetryPolicy { max_attempts: 1, base_delay: Duration::ZERO }, pooled_begin: None }
    }
}

/// The statement that opens a transaction behind a transaction pooler. `DEALLOCATE ALL`
/// drops the prepared statements other clients left on the server session the pooler
/// picked: with the statement cache off, sqlx still names each statement it prepares
/// (`sqlx_s_N`, numbered per client connection, never closed), and a name another
/// client left there would collide. A session setting is `SET LOCAL`, so it ends with
/// the transaction instead of staying with a server session others use.
fn pooled_begin_statement(statement_timeout: Option<Duration>) -> String {
    match statement_timeout {
        Some(timeout) => {
            format!("BEGIN; SET LOCAL statement_timeout = {}; DEALLOCATE ALL", timeout.as_millis())
        }
        None => {
            let settings: String = READ_SESSION_SETTINGS
                .iter()
                .map(|(name, value)| format!("SET LOCAL {name} = {value}; "))
                .collect();
            format!("BEGIN; {settings}DEALLOCATE ALL")
        }
    }
}

/// A pooled read connection idle at least this long is pinged before use, and replaced
/// if it fails. One used more recently is trusted: should it have broken since (a
/// restart within the last second), its statement fails and the call's retry takes
/// another connection.
const PING_CONNECTIONS_IDLE_FOR: Duration = Duration::from_secs(1);

/// JIT compilation and parallel workers off for the read pool's sessions. Count
/// statements read a few thousand rows, but their raw-edge branches are estimated at a
/// share of all of `events` (the segment bounds are parameters the planner cannot see).
/// At 10M events that estimate passes `jit_above_cost`, and PostgreSQL then spends
/// seconds compiling functions for a query that runs in a few hundred milliseconds
/// without (EXPLAIN ANALYZE on a countbench database: 2.8-5 s with JIT, 150-300 ms
/// without). It also plans a Gather with two parallel workers, whose start-up cost
/// about 10 ms of a cached event count's 12 ms (auto_explain in the 10M dashboard mix:
/// the workers read 20 rows). Nothing the service reads benefits from either.
pub(crate) const READ_SESSION_SETTINGS: [(&str, &str); 2] =
    [("jit", "off"), ("max_parallel_workers_per_gather", "0")];

impl Database {
    /// Creates the pool without connecting, so the service starts (not ready) while
    /// PostgreSQL is down and connects as soon as it is back.
    pub fn connect_lazy(config: &impl AsRef<PostgresConfig>) -> Self {
        let config = config.as_ref();
        let pool = PgPoolOptions::new()
            .max_connections(config.read_pool_connections())
            .min_connections(0)
            .acquire_timeout(config.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            // Ping only a connection that sat idle, as one left from before a restart
            // did; one in steady use is not pinged each time it is taken (that ping was a
            // round trip per statement and 6% of a dashboard's CPU in the replica).
            .test_before_acquire(false)
            .before_acquire(|connection, metadata| {
                Box::pin(async move {
                    if metadata.idle_for >= PING_CONNECTIONS_IDLE_FOR {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(match config.pooler {
                PostgresPooler::None => connect_options(config).options(READ_SESSION_SETTINGS),
                // The pooler refuses start-up settings; each transaction sets them locally.
                PostgresPooler::Transaction => connect_options(config),
            });
        let retry =
            RetryPolicy { max_attempts: config.retry.max_attempts, base_delay: config.retry.base_delay };
        let pooled_begin =
            (config.pooler == PostgresPooler::Transaction).then(|| pooled_begin_statement(None));
        Self { pool, retry, pooled_begin }
    }

    /// The group-commit writers' pool: INGEST_WRITERS + 1 connections on which
    /// PostgreSQL cancels any statement after INGEST_COMMIT_TIMEOUT_MS, so a commit
    /// delayed by a lock or a stalled disk can never land later than that. Directly the
    /// timeout is a setting of the connections (a start-up parameter); behind a
    /// transaction pooler, which refuses that parameter and shares server sessions, each
    /// session's transaction sets it locally.
    pub fn connect_lazy_for_ingest(config: &impl AsRef<PostgresConfig>) -> Self {
        let config = config.as_ref();
        let statement_timeout = config.ingest_statement_timeout.as_millis().to_string();
        let options = match config.pooler {
            PostgresPooler::None => {
                connect_options(config).options([("statement_timeout", statement_timeout.as_str())])
            }
            PostgresPooler::Transaction => connect_options(config),
        };
        let pool = PgPoolOptions::new()
            .max_connections(config.ingest_pool_connections)
            .min_connections(0)
            .acquire_timeout(config.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_lazy_with(options);
        let retry =
            RetryPolicy { max_attempts: config.retry.max_attempts, base_delay: config.retry.base_delay };
        let pooled_begin = (config.pooler == PostgresPooler::Transaction)
            .then(|| pooled_begin_statement(Some(config.ingest_statement_timeout)));
        Self { pool, retry, pooled_begin }
    }

    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `operation`, retrying retryable failures with exponential backoff, and
    /// records its latency and errors under `operation_name`.
    pub(crate) async fn with_retry<T, F, Fut>(
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
            .instrument(query_span(operation_name))
            .await;
        metrics::record_db_call(
            operation_name,
            started.elapsed(),
            result.as_ref().err().map(RepositoryError::kind),
        );
        result
    }

    /// A session for one unit of work (see [`Session`]).
    pub(crate) async fn session(&self) -> Result<Session, sqlx::Error> {
        let mut connection = self.pool.acquire().await?;
        let Some(begin) = &self.pooled_begin else {
            return Ok(Session { connection: Some(connection), in_transaction: false });
        };
        <Postgres as sqlx::Database>::TransactionManager::begin(&mut connection, Some(begin.clone().into()))
            .await?;
        Ok(Session { connection: Some(connection), in_transaction: true })
    }

    /// A transaction on a pooled connection, begun the way this database's sessions are.
    pub(crate) async fn begin(&self) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
        match &self.pooled_begin {
            Some(begin) => self.pool.begin_with(begin.clone()).await,
            None => self.pool.begin().await,
        }
    }

    /// A session for one attempt of a write: failing to get one stores nothing.
    pub(crate) async fn session_for_write(&self) -> Result<Session, WriteError> {
        self.session().await.map_err(|error| WriteError::NotStored(error.into()))
    }

    /// Closes every connection; calls after this fail as unavailable.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Connection options from the configuration (shared by the pool and `migrate`),
/// TLS included: POSTGRES_SSLMODE and POSTGRES_SSL_ROOT_CERT.
pub fn connect_options(config: &impl AsRef<PostgresConfig>) -> PgConnectOptions {
    let config = config.as_ref();
    let ssl_mode = match config.ssl_mode {
        PostgresSslMode::Disable => PgSslMode::Disable,
        PostgresSslMode::Prefer => PgSslMode::Prefer,
        PostgresSslMode::Require => PgSslMode::Require,
        PostgresSslMode::VerifyCa => PgSslMode::VerifyCa,
        PostgresSslMode::VerifyFull => PgSslMode::VerifyFull,
    };
    let mut options = PgConnectOptions::new()
        .host(&config.host)
        .port(config.port)
        .database(&config.database)
        .username(&config.user)
        .password(config.password.expose())
        .ssl_mode(ssl_mode)
        .application_name(&config.application_name)
        .disable_statement_logging();
    if config.pooler == PostgresPooler::Transaction {
        // A cached statement is prepared on one server session and used later on
        // whichever session the pooler picks, where it does not exist.
        options = options.statement_cache_capacity(0);
    }
    // Without a root certificate sqlx trusts the system roots.
    if let Some(root_cert) = &config.ssl_root_cert {
        options = options.ssl_root_cert(root_cert);
    }
    options
}

/// Connection options of `migrate`: those of [`connect_options`] at
/// MIGRATION_POSTGRES_HOST / MIGRATION_POSTGRES_PORT when set. Behind a transaction
/// pooler `migrate` needs PostgreSQL itself (its advisory lock lasts the whole session),
/// so without either setting there it is refused.
pub fn migration_connect_options(
    config: &impl AsRef<PostgresConfig>,
) -> Result<PgConnectOptions, schema::MigrationError> {
    let config = config.as_ref();
    if config.pooler == PostgresPooler::Transaction && !config.has_migration_address() {
        return Err(schema::MigrationError::NeedsDirectConnection);
    }
    let mut direct = config.clone();
    direct.pooler = PostgresPooler::None;
    if let Some(host) = &config.migration_host {
        direct.host = host.clone();
    }
    if let Some(port) = config.migration_port {
        direct.port = port;
    }
    Ok(connect_options(&direct))
}
