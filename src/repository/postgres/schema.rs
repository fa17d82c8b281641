//! Schema migrations: the SQL files in migrations/ (embedded at build time), applied by
//! refinery over a sqlx connection and serialised across pods with an advisory lock.
//! Also answers "is the schema current?" for readiness and `migrate --check`.

use std::collections::{BTreeMap, BTreeSet};

use refinery::{AsyncMigrate, Migration};
use refinery_core::traits::r#async::{AsyncQuery, AsyncTransaction};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};

use super::{Database, RepositoryError};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory lock key taken by `migrate` ("analytic" in ASCII), so concurrent runs queue.
pub(crate) const MIGRATION_LOCK_KEY: i64 = 0x616e_616c_7974_6963;
/// refinery's bookkeeping table.
const HISTORY_TABLE: &str = "refinery_schema_history";

/// Where the database schema stands relative to the migrations this binary carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchemaStatus {
    /// Every migration this binary knows is applied.
    Current { version: i32 },
    /// Some are missing: `migrate` must run.
    Behind { applied: Option<i32>, expected: i32 },
    /// The database is newer than this binary (a rollback or a rollout in progress);
    /// migrations are expand-then-contract, so serving stays safe.
    Ahead { applied: i32, expected: i32 },
    /// A version this binary knows was applied under another name: the database was
    /// built by a different migration sequence, and `migrate` refuses it. Recreate it.
    Diverged { version: i32, applied_name: String, expected_name: String },
}

impl SchemaStatus {
    pub fn is_usable(&self) -> bool {
        matches!(self, SchemaStatus::Current { .. } | SchemaStatus::Ahead { .. })
    }
}

/// What one `migrate` run did.
#[derive(Clone, Debug)]
pub struct MigrationReport {
    pub applied: Vec<String>,
}

/// (version, name) of every migration embedded in this binary, ascending, read once: the
/// readiness probe compares them with the database on every interval.
fn embedded_migrations() -> &'static [(i32, String)] {
    static MIGRATIONS: std::sync::OnceLock<Vec<(i32, String)>> = std::sync::OnceLock::new();
    MIGRATIONS.get_or_init(|| {
        let mut migrations: Vec<(i32, String)> = embedded::migrations::runner()
            .get_migrations()
            .iter()
            .map(|migration| (migration.version(), migration.name().to_string()))
            .collect();
        migrations.sort_unstable();
        migrations
    })
}

/// Versions embedded in this binary, ascending.
pub fn expected_versions() -> Vec<i32> {
    embedded_migrations().iter().map(|(version, _)| *version).collect()
}

/// Applies every pending migration, holding the advisory lock for the whole run.
pub async fn migrate(options: &PgConnectOptions) -> Result<MigrationReport, MigrationError> {
    migrate_up_to(options, None).await
}

/// Applies the pending migrations up to `target` (all of them when `None`), holding the
/// advisory lock for the whole run. A target lets tests build the schema of an older
/// version with the same runner.
pub async fn migrate_up_to(
    options: &PgConnectOptions,
    target: Option<i32>,
) -> Result<MigrationReport, MigrationError> {
    let mut connection = PgConnection::connect_with(options).await.map_err(RepositoryError::from)?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut connection)
        .await
        .map_err(RepositoryError::from)?;
    let result = run_unless_ahead(&mut connection, target).await;
    // Closing the session would release the lock too; unlocking keeps it explicit.
    let unlock =
        sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK_KEY).execute(&mut connection).await;
    let report = result?;
    unlock.map_err(RepositoryError::from)?;
    connection.close().await.ok();
    Ok(report)
}

/// Runs refinery, unless the database is ahead of this binary: every migration it carries
/// is applied and newer ones are too (a rollback, or a GitOps tool re-running an older
/// release's Job). Then there is nothing to apply, and refinery would refuse the newer
/// migrations it does not know; migrations are expand-then-contract, so this binary can
/// serve the newer schema.
async fn run_unless_ahead(
    connection: &mut PgConnection,
    target: Option<i32>,
) -> Result<MigrationReport, MigrationError> {
    let history = applied_history(&mut *connection).await.map_err(RepositoryError::from)?;
    if let Some(diverged) = diverged(&history) {
        return Err(MigrationError::Diverged(diverged));
    }
    let applied: BTreeSet<i32> = history.keys().copied().collect();
    let expected = expected_versions();
    let expected_latest = expected.last().copied().unwrap_or(0);
    let every_known_applied = expected.iter().all(|version| applied.contains(version));
    if let Some(&applied_latest) = applied.last() {
        if every_known_applied && applied_latest > expected_latest {
            tracing::info!(
                applied = applied_latest,
                expected = expected_latest,
                "database schema is ahead of this binary, nothing to migrate"
            );
            return Ok(MigrationReport { applied: Vec::new() });
        }
    }
    let report = embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_target(target.map_or(refinery::Target::Latest, refinery::Target::Version))
        .run_async(&mut RefineryConnection(connection))
        .await
        .map_err(|error| MigrationError::Refinery(Box::new(error)))?;
    Ok(MigrationReport { applied: report.applied_migrations().iter().map(ToString::to_string).collect() })
}

/// Version and name of every migration in refinery's history table (empty before the
/// first migration).
async fn applied_history(connection: &mut PgConnection) -> Result<BTreeMap<i32, String>, sqlx::Error> {
    let history_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(HISTORY_TABLE)
        .fetch_one(&mut *connection)
        .await?;
    if !history_exists {
        return Ok(BTreeMap::new());
    }
    sqlx::query(&format!("SELECT version, name FROM {HISTORY_TABLE}"))
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(|row| Ok((row.try_get::<i32, _>("version")?, row.try_get::<String, _>("name")?)))
        .collect()
}

/// A version this binary knows that the database applied under another name: the
/// database was built by a different migration sequence.
fn diverged(history: &BTreeMap<i32, String>) -> Option<SchemaStatus> {
    embedded_migrations().iter().find_map(|(version, expected_name)| {
        let applied_name = history.get(version)?;
        (applied_name != expected_name).then(|| SchemaStatus::Diverged {
            version: *version,
            applied_name: applied_name.clone(),
            expected_name: expected_name.clone(),
        })
    })
}

/// Compares the applied versions with the embedded ones.
pub async fn status(database: &Database) -> Result<SchemaStatus, RepositoryError> {
    let expected = expected_versions();
    let expected_latest = expected.last().copied().unwrap_or(0);
    let mut session = database.session().await?;
    let history = applied_history(&mut session).await?;
    session.finish().await?;
    if history.is_empty() {
        return Ok(SchemaStatus::Behind { applied: None, expected: expected_latest });
    }
    if let Some(diverged) = diverged(&history) {
        return Ok(diverged);
    }
    let applied: BTreeSet<i32> = history.keys().copied().collect();
    let applied_latest = applied.last().copied();
    if expected.iter().any(|version| !applied.contains(version)) {
        return Ok(SchemaStatus::Behind { applied: applied_latest, expected: expected_latest });
    }
    match applied_latest {
        Some(latest) if latest > expected_latest => {
            Ok(SchemaStatus::Ahead { applied: latest, expected: expected_latest })
        }
        _ => Ok(SchemaStatus::Current { version: expected_latest }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Database(#[from] RepositoryError),
    #[error("migration failed: {0}")]
    Refinery(Box<refinery::Error>),
    #[error("the database was built by other migrations ({0:?}): recreate it, then migrate")]
    Diverged(SchemaStatus),
    #[error("POSTGRES_POOLER=transaction: migrate holds a session-level advisory lock and needs PostgreSQL itself; set MIGRATION_POSTGRES_HOST and/or MIGRATION_POSTGRES_PORT to it")]
    NeedsDirectConnection,
}

/// refinery drives migrations through its own traits; this adapter lets it use the
/// same sqlx connection (and so the same TLS and credentials) as the service.
struct RefineryConnection<'c>(&'c mut PgConnection);

/// What the adapter reports to refinery: a failed statement, or a row of refinery's
/// history table that does not hold what refinery wrote there.
#[derive(Debug, thiserror::Error)]
enum RefineryAdapterError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("migration history row has an unreadable {column}: {reason}")]
    History { column: &'static str, reason: String },
}

impl AsyncTransaction for RefineryConnection<'_> {
    type Error = RefineryAdapterError;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &'a mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let queries: Vec<String> = queries.map(str::to_owned).collect();
        Ok(run_in_transaction(self.0, queries).await?)
    }
}

/// Runs each query (each may hold several statements) in one transaction.
async fn run_in_transaction(
    connection: &mut PgConnection,
    queries: Vec<String>,
) -> Result<usize, sqlx::Error> {
    let mut transaction = connection.begin().await?;
    for query in &queries {
        // A plain &str runs over the simple-query protocol, so a file may hold several statements.
        sqlx::Executor::execute(&mut *transaction, query.as_str()).await?;
    }
    transaction.commit().await?;
    Ok(queries.len())
}

impl AsyncQuery<Vec<Migration>> for RefineryConnection<'_> {
    async fn query<'a>(&'a mut self, query: &'a str) -> Result<Vec<Migration>, Self::Error> {
        let rows = sqlx::query(query).fetch_all(&mut *self.0).await?;
        rows.iter()
            .map(|row| {
                let applied_on: String = row.try_get(2)?;
                let applied_on =
                    time::OffsetDateTime::parse(&applied_on, &time::format_description::well_known::Rfc3339)
                        .map_err(|error| RefineryAdapterError::History {
                            column: "applied_on",
                            reason: error.to_string(),
                        })?;
                let checksum: String = row.try_get(3)?;
                let checksum = checksum.parse::<u64>().map_err(|error| RefineryAdapterError::History {
                    column: "checksum",
                    reason: error.to_string(),
                })?;
                Ok(Migration::applied(row.try_get(0)?, row.try_get(1)?, applied_on, checksum))
            })
            .collect()
    }
}

impl AsyncMigrate for RefineryConnection<'_> {}
