//! Configuration: every setting is an environment variable, read once at start-up into
//! typed sections (one per component) and checked once. Values are typed where read:
//! durations as `Duration` (the variables keep their units), optional settings as
//! `Option`, policies (caller allow-lists, OTLP headers, PII fields) parsed. Errors name
//! the offending variable.
//!
//! Startup holds the whole [`Config`]; every component receives only its own section.

mod events;
mod postgres;
mod redis;
mod server;
mod telemetry;
mod tls;
mod values;

#[cfg(test)]
mod tests;

pub use events::{EventsConfig, IngestConfig, PiiConfig, RateLimitConfig};
pub use postgres::{PostgresConfig, PostgresPooler, PostgresSslMode, ReadReplicaConfig, RetryConfig};
pub use redis::{NodeAddress, RedisConfig, RedisTopology};
pub use server::{GrpcConfig, ServerConfig};
pub use telemetry::{LogFormat, OtlpConfig, OtlpHeaders, TelemetryConfig};
pub use tls::TlsConfig;
pub use values::{read_ca_bundle, Secret};

/// The variables a section reads (all of the process's; each section picks its own).
type Vars = [(String, String)];

/// A start-up configuration error; its message names the offending variable.
#[derive(Clone, Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub(crate) String);

impl ConfigError {
    /// An error about `variable`.
    pub(crate) fn variable(variable: &str, reason: impl std::fmt::Display) -> Self {
        Self(format!("{variable}: {reason}"))
    }
}

/// All settings of the service, by section.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub grpc: GrpcConfig,
    pub tls: TlsConfig,
    pub postgres: PostgresConfig,
    /// `None` when REDIS_HOST is empty (cache off, rate limits per replica).
    pub redis: Option<RedisConfig>,
    pub rate_limit: RateLimitConfig,
    pub pii: PiiConfig,
    pub events: EventsConfig,
    pub ingest: IngestConfig,
    pub telemetry: TelemetryConfig,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the given variables (tests pass their own instead of mutating the process).
    pub fn from_vars<I>(variables: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars: Vec<(String, String)> = variables.into_iter().collect();
        let telemetry = TelemetryConfig::load(&vars)?;
        let server = ServerConfig::load(&vars)?;
        let ingest = IngestConfig::load(&vars)?;
        let postgres = PostgresConfig::load(&vars, &ingest)?;
        let redis = RedisConfig::load(&vars)?;
        let rate_limit = RateLimitConfig::load(&vars)?;
        let events = EventsConfig::load(&vars)?;
        let grpc = GrpcConfig::load(&vars)?;
        let tls = TlsConfig::load(&vars)?;
        let pii = PiiConfig::load(&vars)?;
        Ok(Self { server, grpc, tls, postgres, redis, rate_limit, pii, events, ingest, telemetry })
    }

    /// Reads every CA bundle the database and cache connections need, so a missing or
    /// empty mounted Secret fails start-up with the variable's name (not a connection
    /// error later). Reads files, so it is called at start-up, not while parsing.
    pub fn check_ca_files(&self) -> Result<(), ConfigError> {
        if let Some(path) = &self.postgres.ssl_root_cert {
            read_ca_bundle("POSTGRES_SSL_ROOT_CERT", path)?;
        }
        if let Some(path) = self.redis.as_ref().and_then(|redis| redis.tls_ca_file.as_ref()) {
            read_ca_bundle("REDIS_TLS_CA_FILE", path)?;
        }
        Ok(())
    }
}

/// Lets code that holds the whole configuration (tools, benchmarks) pass it where only
/// the PostgreSQL section is needed.
impl AsRef<PostgresConfig> for Config {
    fn as_ref(&self) -> &PostgresConfig {
        &self.postgres
    }
}

impl AsRef<PostgresConfig> for PostgresConfig {
    fn as_ref(&self) -> &PostgresConfig {
        self
    }
}

/// Deserializes one section's raw variables (full names, lower-cased as envy does),
/// naming the variable in errors.
fn read_section<T: serde::de::DeserializeOwned>(vars: &Vars) -> Result<T, ConfigError> {
    envy::from_iter(vars.iter().cloned()).map_err(|error| ConfigError(name_variables(&error)))
}

/// envy names the variable for values it parses itself ("... provided by POSTGRES_PORT")
/// and reports a missing field by its serde name; this keeps operators' spelling.
fn name_variables(error: &envy::Error) -> String {
    match error {
        envy::Error::MissingValue(field) => format!("{} is required", field.to_uppercase()),
        envy::Error::Custom(message) => message.clone(),
    }
}

/// Default of the on-by-default switches.
fn default_enabled() -> bool {
    true
}
