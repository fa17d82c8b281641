//! The PostgreSQL section: where the database is (POSTGRES_*), whether a transaction
//! pooler sits in front of it (POSTGRES_POOLER) and where `migrate` connects instead
//! (MIGRATION_POSTGRES_*), the optional hot standby counts may read from
//! (POSTGRES_READ_*), how big the pools are, how connections negotiate TLS, and how
//! retryable errors are retried (DB_RETRY_*).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::values::{non_empty_path, parse_named, Secret};
use super::{read_section, ConfigError, IngestConfig, Vars};

/// How the PostgreSQL connection negotiates TLS (libpq's sslmode names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PostgresSslMode {
    Disable,
    #[default]
    Prefer,
    /// Encrypted, the server certificate not checked.
    Require,
    /// Encrypted, the server certificate signed by a trusted CA (any host name).
    VerifyCa,
    /// Encrypted, signed by a trusted CA and issued for POSTGRES_HOST.
    VerifyFull,
}

impl PostgresSslMode {
    /// Whether the server certificate is checked against a CA.
    pub fn verifies_certificate(self) -> bool {
        matches!(self, PostgresSslMode::VerifyCa | PostgresSslMode::VerifyFull)
    }
}

impl std::str::FromStr for PostgresSslMode {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.to_ascii_lowercase().as_str() {
            "disable" => Ok(PostgresSslMode::Disable),
            "prefer" => Ok(PostgresSslMode::Prefer),
            "require" => Ok(PostgresSslMode::Require),
            "verify-ca" => Ok(PostgresSslMode::VerifyCa),
            "verify-full" => Ok(PostgresSslMode::VerifyFull),
            _ => Err(format!("expected disable, prefer, require, verify-ca or verify-full, got {raw:?}")),
        }
    }
}

/// What sits between the service and PostgreSQL (POSTGRES_POOLER).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PostgresPooler {
    /// Nothing, or a pooler in session mode: a connection is one server session.
    #[default]
    None,
    /// A pooler in transaction mode (PgBouncer `pool_mode = transaction`): consecutive
    /// transactions of one connection may run on different server sessions, so no
    /// session state (prepared statements, session settings, session locks) may outlive
    /// a transaction.
    Transaction,
}

impl std::str::FromStr for PostgresPooler {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.to_ascii_lowercase().as_str() {
            "" | "none" => Ok(PostgresPooler::None),
            "transaction" => Ok(PostgresPooler::Transaction),
            _ => Err(format!("expected none or transaction, got {raw:?}")),
        }
    }
}

fn postgres_pooler<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PostgresPooler, D::Error> {
    parse_named(deserializer, "POSTGRES_POOLER")
}

fn postgres_sslmode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PostgresSslMode, D::Error> {
    parse_named(deserializer, "POSTGRES_SSLMODE")
}

/// Retries of a retryable database error: DB_RETRY_MAX_ATTEMPTS and DB_RETRY_BASE_DELAY_MS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryConfig {
    /// Attempts, the first included (1 = no retry).
    pub max_attempts: u32,
    /// First backoff delay; doubles per attempt.
    pub base_delay: Duration,
}

impl RetryConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default = "default_db_retry_max_attempts")]
            db_retry_max_attempts: u32,
            #[serde(default = "default_db_retry_base_delay_ms")]
            db_retry_base_delay_ms: u64,
        }
        let raw: Raw = read_section(vars)?;
        if !(1..=20).contains(&raw.db_retry_max_attempts) {
            return Err(ConfigError::variable("DB_RETRY_MAX_ATTEMPTS", "must be between 1 and 20"));
        }
        Ok(Self {
            max_attempts: raw.db_retry_max_attempts,
            base_delay: Duration::from_millis(raw.db_retry_base_delay_ms),
        })
    }
}

/// A hot standby of the primary that counts may read from (POSTGRES_READ_*). It is
/// reached with the primary's database, user, password and TLS settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadReplicaConfig {
    /// POSTGRES_READ_HOST.
    pub host: String,
    /// POSTGRES_READ_PORT, POSTGRES_PORT when empty.
    pub port: u16,
    /// POSTGRES_READ_MAX_CONNECTIONS: size of the replica's own pool.
    pub max_connections: u32,
}

/// Connection and pool settings of PostgreSQL.
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    pub host: String,
    pub port: u16,
    /// POSTGRES_POOLER: a transaction pooler in front of `host:port`, or none.
    pub pooler: PostgresPooler,
    /// MIGRATION_POSTGRES_HOST: where `migrate` connects instead of `host` (PostgreSQL
    /// itself when `host` is a transaction pooler); `None` = `host`.
    pub migration_host: Option<String>,
    /// MIGRATION_POSTGRES_PORT: the port `migrate` connects to; `None` = `port`.
    pub migration_port: Option<u16>,
    pub database: String,
    pub user: String,
    pub password: Secret,
    /// POSTGRES_SSLMODE: libpq's meanings, `prefer` by default.
    pub ssl_mode: PostgresSslMode,
    /// POSTGRES_SSL_ROOT_CERT: PEM bundle of the CAs trusted for the server certificate
    /// under `verify-ca`/`verify-full`; `None` = the system roots.
    pub ssl_root_cert: Option<PathBuf>,
    /// SERVICE_NAME, shown as the connections' application_name.
    pub application_name: String,
    /// POSTGRES_MAX_CONNECTIONS: all connections of this replica, both pools together.
    pub max_connections: u32,
    /// POSTGRES_ACQUIRE_TIMEOUT_MS: longest wait for a pooled connection.
    pub acquire_timeout: Duration,
    pub retry: RetryConfig,
    /// Connections of the group-commit writers' own pool (carved out of
    /// `max_connections`): one per INGEST_WRITERS plus one for insert_id lookups.
    pub ingest_pool_connections: u32,
    /// INGEST_COMMIT_TIMEOUT_MS, the statement_timeout of the writers' connections.
    pub ingest_statement_timeout: Duration,
    /// The hot standby for counts; `None` when POSTGRES_READ_HOST is empty (every count
    /// reads the primary).
    pub read_replica: Option<ReadReplicaConfig>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default = "default_host")]
    postgres_host: String,
    #[serde(default = "default_port")]
    postgres_port: u16,
    #[serde(default, deserialize_with = "postgres_pooler")]
    postgres_pooler: PostgresPooler,
    #[serde(default)]
    migration_postgres_host: String,
    #[serde(default)]
    migration_postgres_port: String,
    #[serde(default = "default_db")]
    postgres_db: String,
    #[serde(default = "default_user")]
    postgres_user: String,
    #[serde(default = "default_password")]
    postgres_password: Secret,
    #[serde(default = "default_max_connections")]
    postgres_max_connections: u32,
    #[serde(default, deserialize_with = "postgres_sslmode")]
    postgres_sslmode: PostgresSslMode,
    #[serde(default)]
    postgres_ssl_root_cert: String,
    #[serde(default = "default_acquire_timeout_ms")]
    postgres_acquire_timeout_ms: u64,
    #[serde(default = "super::server::default_service_name")]
    service_name: String,
    #[serde(default)]
    postgres_read_host: String,
    #[serde(default)]
    postgres_read_port: String,
    #[serde(default = "default_read_max_connections")]
    postgres_read_max_connections: u32,
}

impl PostgresConfig {
    /// Reads POSTGRES_*, DB_RETRY_* and SERVICE_NAME; the writers' pool is sized from
    /// the ingest section, which must leave connections for reads.
    pub(super) fn load(vars: &Vars, ingest: &IngestConfig) -> Result<Self, ConfigError> {
        let raw: Raw = read_section(vars)?;
        let fail = |variable: &str, reason: &str| Err(ConfigError::variable(variable, reason));
        if raw.postgres_host.trim().is_empty() {
            return fail("POSTGRES_HOST", "must not be empty");
        }
        if raw.postgres_max_connections == 0 {
            return fail("POSTGRES_MAX_CONNECTIONS", "must be at least 1");
        }
        if raw.postgres_acquire_timeout_ms == 0 {
            return fail("POSTGRES_ACQUIRE_TIMEOUT_MS", "must be at least 1");
        }
        let ssl_root_cert = non_empty_path(&raw.postgres_ssl_root_cert);
        if ssl_root_cert.is_some() && !raw.postgres_sslmode.verifies_certificate() {
            return fail(
                "POSTGRES_SSL_ROOT_CERT",
                "is used only with POSTGRES_SSLMODE verify-ca or verify-full",
            );
        }
        let migration_port = match raw.migration_postgres_port.trim() {
            "" => None,
            port => match port.parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => return fail("MIGRATION_POSTGRES_PORT", "must be a port number (1-65535) or empty"),
            },
        };
        let retry = RetryConfig::load(vars)?;
        let read_host = raw.postgres_read_host.trim();
        let read_replica = if read_host.is_empty() {
            None
        } else {
            if raw.postgres_read_max_connections == 0 {
                return fail("POSTGRES_READ_MAX_CONNECTIONS", "must be at least 1");
            }
            let read_port = match raw.postgres_read_port.trim() {
                "" => raw.postgres_port,
                port => match port.parse::<u16>() {
                    Ok(port) if port > 0 => port,
                    _ => return fail("POSTGRES_READ_PORT", "must be a port number (1-65535) or empty"),
                },
            };
            Some(ReadReplicaConfig {
                host: read_host.to_string(),
                port: read_port,
                max_connections: raw.postgres_read_max_connections,
            })
        };
        if ingest.writers + 2 > raw.postgres_max_connections as usize {
            return fail(
                "INGEST_WRITERS",
                "must be between 1 and POSTGRES_MAX_CONNECTIONS - 2 (the writers' pool holds INGEST_WRITERS + 1 of the connections, at least one serves reads)",
            );
        }
        Ok(Self {
            host: raw.postgres_host,
            port: raw.postgres_port,
            pooler: raw.postgres_pooler,
            migration_host: Some(raw.migration_postgres_host.trim().to_string())
                .filter(|host| !host.is_empty()),
            migration_port,
            database: raw.postgres_db,
            user: raw.postgres_user,
            password: raw.postgres_password,
            ssl_mode: raw.postgres_sslmode,
            ssl_root_cert,
            application_name: raw.service_name,
            max_connections: raw.postgres_max_connections,
            acquire_timeout: Duration::from_millis(raw.postgres_acquire_timeout_ms),
            retry,
            ingest_pool_connections: u32::try_from(ingest.writers + 1).unwrap_or(u32::MAX),
            ingest_statement_timeout: ingest.commit_timeout,
            read_replica,
        })
    }

    /// Whether `migrate` has an address of its own (MIGRATION_POSTGRES_HOST or _PORT).
    pub fn has_migration_address(&self) -> bool {
        self.migration_host.is_some() || self.migration_port.is_some()
    }

    /// Connections of the pool that serves everything but the group commits.
    pub fn read_pool_connections(&self) -> u32 {
        self.max_connections.saturating_sub(self.ingest_pool_connections).max(1)
    }
}

fn default_host() -> String {
    "localhost".into()
}
fn default_port() -> u16 {
    5432
}
fn default_db() -> String {
    "analytics".into()
}
fn default_user() -> String {
    "analytics".into()
}
fn default_password() -> Secret {
    Secret::new("secret")
}
fn default_max_connections() -> u32 {
    25
}
fn default_read_max_connections() -> u32 {
    10
}
fn default_acquire_timeout_ms() -> u64 {
    1_000
}
fn default_db_retry_max_attempts() -> u32 {
    5
}
fn default_db_retry_base_delay_ms() -> u64 {
    50
}
