//! The hot standby counts may read from (POSTGRES_READ_HOST), and the check that makes
//! reading it give an answer the primary could have given.
//!
//! An acknowledged write's commit record was flushed on the primary before the answer
//! (every `synchronous_commit` level but `off` waits for the local flush). So when a
//! count call starts, the primary's WAL write position ([`WalPosition::read`]) is at or
//! past the commit record of every write acknowledged before the call. On the standby,
//! a transaction is visible to snapshots taken after its commit record was replayed.
//! [`ReadReplica::session_at`] therefore checks `pg_last_wal_replay_lsn() >= position`
//! in one statement, and the count's statements run after it, on the same connection (so
//! the same server, whatever balances connections behind the host name) in autocommit:
//! each takes its snapshot after the check answered, and sees every commit up to the
//! position. The check cannot ride in the count statement itself: a statement's
//! snapshot is taken before its functions run, so a replay position read there may be
//! newer than what the snapshot holds.
//!
//! A standby that fails (no connection, an error, no answer within [`CHECK_TIMEOUT`])
//! is skipped for [`COOL_DOWN`], then one call probes it again, so calls do not each pay
//! a timeout while it is down.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::Postgres;
use tokio::sync::{Mutex, MutexGuard};
use tracing::Instrument;

use super::{connect_options, query_span, Database, RepositoryError, RetryPolicy, Session};
use crate::config::{PostgresConfig, ReadReplicaConfig};
use crate::metrics;

/// Longest a call waits for a standby connection and its replay check; past it the
/// count reads the primary.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a standby that failed is skipped before one call tries it again.
pub const COOL_DOWN: Duration = Duration::from_secs(5);

/// A position in the primary's WAL (`pg_lsn` in its text form) at or past the commit
/// record of every write acknowledged before it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalPosition(String);

impl WalPosition {
    /// Reads the position on the primary: the WAL write position, at or past every
    /// flushed commit. Under `synchronous_commit = off` a commit is acknowledged before
    /// its record is written, so the insert position is taken instead (later still).
    /// Not retried: a failure sends the call to the primary, which retries its own
    /// statements.
    pub async fn read(primary: &Database) -> Result<Self, RepositoryError> {
        const OPERATION: &str = "read_replica_primary_position";
        let started = std::time::Instant::now();
        let position = async {
            let mut session = primary.session().await?;
            let position: String = sqlx::query_scalar(
                "SELECT (CASE WHEN current_setting('synchronous_commit') = 'off' \
                 THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_lsn() END)::text",
            )
            .fetch_one(&mut *session)
            .await?;
            session.finish().await?;
            Ok::<_, sqlx::Error>(Self(position))
        }
        .instrument(query_span(OPERATION))
        .await
        .map_err(RepositoryError::from);
        metrics::record_db_call(
            OPERATION,
            started.elapsed(),
            position.as_ref().err().map(RepositoryError::kind),
        );
        position
    }
}

/// Why a call does not read the standby.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaRefusal {
    /// The standby has not replayed up to the position yet.
    #[error("read replica has not replayed the primary's position yet")]
    Lagging,
    /// The standby failed recently; it is skipped until the cool-down ends.
    #[error("read replica failed recently, skipped during the cool-down")]
    CoolingDown,
    /// The server is not in recovery (promoted, or not a standby): nothing proves its
    /// data follows the primary.
    #[error("read replica is not a standby in recovery")]
    NotStandby,
    /// No connection, an error, or no answer within [`CHECK_TIMEOUT`].
    #[error("read replica unavailable: {0}")]
    Unavailable(#[source] RepositoryError),
}

/// The standby's pool and its breaker. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReadReplica {
    database: Database,
    breaker: Arc<ReplicaBreaker>,
    max_connections: u32,
}

impl ReadReplica {
    /// The standby's pool, not connected yet: the primary's database, user, password and
    /// TLS settings at POSTGRES_READ_HOST:POSTGRES_READ_PORT. Statements on it are not
    /// retried: a failure sends the call to the primary.
    pub fn connect_lazy(config: &PostgresConfig, replica: &ReadReplicaConfig) -> Self {
        let options = connect_options(config)
            .host(&replica.host)
            .port(replica.port)
            .options(super::READ_SESSION_SETTINGS);
        let pool = PgPoolOptions::new()
            .max_connections(replica.max_connections)
            .min_connections(0)
            .acquire_timeout(CHECK_TIMEOUT)
            .idle_timeout(Some(Duration::from_secs(300)))
            // The replay check that starts every use is the liveness test; a connection
            // that fails it is closed.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        let retry = RetryPolicy { max_attempts: 1, base_delay: Duration::ZERO };
        Self {
            database: Database { pool, retry, pooled_begin: None },
            breaker: Arc::new(ReplicaBreaker::new(COOL_DOWN)),
            max_connections: replica.max_connections,
        }
    }

    /// A standby connection whose snapshots hold every commit up to `position`, for the
    /// statements of one call; a refusal otherwise. Connections that fail the check are
    /// closed and the next one tried (a standby restart leaves every pooled connection
    /// broken), all within [`CHECK_TIMEOUT`].
    pub async fn session_at(&self, position: &WalPosition) -> Result<CountSource, ReplicaRefusal> {
        if !self.breaker.try_pass() {
            return Err(ReplicaRefusal::CoolingDown);
        }
        let deadline = tokio::time::Instant::now() + CHECK_TIMEOUT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let checked = tokio::time::timeout_at(deadline, self.check(position)).await;
            let refusal = match checked {
                Ok(Ok(connection)) => {
                    self.record_answer();
                    let session = ReplicaSession {
                        connection: Arc::new(Mutex::new(connection)),
                        database: self.database.clone(),
                    };
                    return Ok(CountSource::Replica(session));
                }
                Ok(Err(CheckFailure::Refused(ReplicaRefusal::NotStandby))) => {
                    if self.breaker.record_failure() {
                        tracing::warn!("read replica is not a standby in recovery, counts read the primary");
                    }
                    return Err(ReplicaRefusal::NotStandby);
                }
                Ok(Err(CheckFailure::Refused(refusal))) => {
                    self.record_answer();
                    return Err(refusal);
                }
                Ok(Err(CheckFailure::Broken(error))) => error,
                Err(_elapsed) => RepositoryError::TimedOut(CHECK_TIMEOUT),
            };
            let out_of_time = tokio::time::Instant::now() >= deadline;
            if out_of_time || attempts > self.max_connections || !refusal.is_retryable() {
                if self.breaker.record_failure() {
                    tracing::warn!(error = %refusal, "read replica unavailable, counts read the primary");
                }
                return Err(ReplicaRefusal::Unavailable(refusal));
            }
        }
    }

    /// One connection and its replay check.
    async fn check(&self, position: &WalPosition) -> Result<PoolConnection<Postgres>, CheckFailure> {
        let mut connection = self
            .database
            .pool
            .acquire()
            .await
            .map_err(|error| CheckFailure::Broken(RepositoryError::from(error)))?;
        let checked: Result<(bool, bool), sqlx::Error> = sqlx::query_as(
            "SELECT pg_is_in_recovery(), coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)",
        )
        .bind(&position.0)
        .fetch_one(&mut *connection)
        .await;
        match checked {
            Ok((true, true)) => Ok(connection),
            Ok((true, false)) => Err(CheckFailure::Refused(ReplicaRefusal::Lagging)),
            Ok((false, _)) => Err(CheckFailure::Refused(ReplicaRefusal::NotStandby)),
            Err(error) => {
                connection.close_on_drop();
                Err(CheckFailure::Broken(error.into()))
            }
        }
    }

    /// The standby answered its check: ends an outage, if one was under way.
    fn record_answer(&self) {
        if self.breaker.record_success() {
            tracing::info!("read replica answers again");
        }
    }

    /// Records that a call's statements failed on the standby (after its check passed):
    /// the standby is skipped for the cool-down.
    pub fn record_failure(&self, error: &dyn std::fmt::Display) {
        if self.breaker.record_failure() {
            tracing::warn!(error = %error, "read replica failed, counts read the primary");
        }
    }

    /// Closes the standby's connections.
    pub async fn close(&self) {
        self.database.close().await;
    }
}

/// How one replay check ended.
enum CheckFailure {
    /// The standby answered: it cannot serve this call.
    Refused(ReplicaRefusal),
    /// No connection, or the connection failed.
    Broken(RepositoryError),
}

/// Where the statements of one count call run.
#[derive(Clone, Debug)]
pub enum CountSource {
    /// The primary's read pool.
    Primary(Database),
    /// One standby connection, checked to be at or past the primary's position when the
    /// call started.
    Replica(ReplicaSession),
}

impl From<Database> for CountSource {
    fn from(database: Database) -> Self {
        CountSource::Primary(database)
    }
}

impl CountSource {
    /// Whether the statements run on the standby.
    pub fn is_replica(&self) -> bool {
        matches!(self, CountSource::Replica(_))
    }

    /// The database whose retry policy the source's statements run under
    /// ([`Database::with_retry`]): the primary's, or the standby's (which has none: its
    /// failures send the call to the primary).
    pub(crate) fn retry_policy(&self) -> &Database {
        match self {
            CountSource::Primary(database) => database,
            CountSource::Replica(session) => &session.database,
        }
    }

    /// The connection for the next statement: one from the primary's pool, or the
    /// call's checked standby connection.
    pub(crate) async fn connection(&self) -> Result<CountConnection<'_>, sqlx::Error> {
        Ok(match self {
            CountSource::Primary(database) => CountConnection::Pooled(database.session().await?),
            CountSource::Replica(session) => CountConnection::Checked(session.connection.lock().await),
        })
    }
}

/// The checked standby connection of one call, shared by its statements (one at a time).
#[derive(Clone, Debug)]
pub struct ReplicaSession {
    connection: Arc<Mutex<PoolConnection<Postgres>>>,
    database: Database,
}

/// A connection one count statement runs on: a session of the primary's read pool (a
/// transaction of its own behind a transaction pooler), or the checked standby one.
pub(crate) enum CountConnection<'a> {
    Pooled(Session),
    Checked(MutexGuard<'a, PoolConnection<Postgres>>),
}

impl CountConnection<'_> {
    /// Ends the statement's unit of work (commits a pooled session's transaction).
    pub(crate) async fn finish(&mut self) -> Result<(), sqlx::Error> {
        match self {
            CountConnection::Pooled(session) => session.finish().await,
            CountConnection::Checked(_) => Ok(()),
        }
    }

    /// Plans the statements to come once per connection (see
    /// [`Session::prefer_generic_plans`]); on the standby connection, which a call's
    /// statements share outside any transaction, they are planned per call as before.
    pub(crate) async fn prefer_generic_plans(&mut self) -> Result<(), sqlx::Error> {
        match self {
            CountConnection::Pooled(session) => session.prefer_generic_plans().await,
            CountConnection::Checked(_) => Ok(()),
        }
    }
}

impl Deref for CountConnection<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            CountConnection::Pooled(session) => session,
            CountConnection::Checked(connection) => connection,
        }
    }
}

impl DerefMut for CountConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            CountConnection::Pooled(session) => session,
            CountConnection::Checked(connection) => connection,
        }
    }
}

/// Skips a failed standby for a cool-down; when it ends, one caller probes (the others
/// keep skipping until the probe's outcome is known). Lock-free.
#[derive(Debug)]
struct ReplicaBreaker {
    cool_down: Duration,
    /// Creation time, the origin of `skip_until_millis`.
    epoch: Instant,
    /// 0 while closed; else the end of the cool-down (or of the probe's turn).
    skip_until_millis: AtomicU64,
    /// Whether an outage is under way (the last outcome was a failure).
    down: AtomicBool,
}

impl ReplicaBreaker {
    fn new(cool_down: Duration) -> Self {
        Self {
            cool_down,
            epoch: Instant::now(),
            skip_until_millis: AtomicU64::new(0),
            down: AtomicBool::new(false),
        }
    }

    /// Whether this call may use the standby: always while closed; after a cool-down,
    /// only the one call that claims the probe.
    fn try_pass(&self) -> bool {
        let until = self.skip_until_millis.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now_millis();
        if now < until {
            return false;
        }
        let probe_turn_ends = now + self.cool_down.as_millis() as u64;
        self.skip_until_millis
            .compare_exchange(until, probe_turn_ends, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// The standby answered. True when this ends an outage.
    fn record_success(&self) -> bool {
        self.skip_until_millis.store(0, Ordering::Relaxed);
        self.down.swap(false, Ordering::Relaxed)
    }

    /// The standby failed: skip it for the cool-down. True when this starts an outage.
    fn record_failure(&self) -> bool {
        let until = self.now_millis() + self.cool_down.as_millis() as u64;
        self.skip_until_millis.store(until.max(1), Ordering::Relaxed);
        !self.down.swap(true, Ordering::Relaxed)
    }

    fn now_millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_skips_the_standby_until_one_probe_after_the_cool_down() {
        let breaker = ReplicaBreaker::new(Duration::from_millis(30));
        assert!(breaker.try_pass() && breaker.try_pass(), "closed: every call passes");
        assert!(breaker.record_failure(), "the first failure starts an outage");
        assert!(!breaker.record_failure(), "later failures of the same outage stay quiet");
        assert!(!breaker.try_pass(), "skipped during the cool-down");
        std::thread::sleep(Duration::from_millis(50));
        assert!(breaker.try_pass(), "one call probes after the cool-down");
        assert!(!breaker.try_pass(), "the others keep skipping while it probes");
        assert!(breaker.record_success(), "the probe's success ends the outage");
        assert!(breaker.try_pass() && breaker.try_pass());
    }

    #[test]
    fn a_failed_probe_starts_another_cool_down() {
        let breaker = ReplicaBreaker::new(Duration::from_millis(30));
        breaker.record_failure();
        std::thread::sleep(Duration::from_millis(50));
        assert!(breaker.try_pass());
        breaker.record_failure();
        assert!(!breaker.try_pass(), "skipped again");
    }
}
