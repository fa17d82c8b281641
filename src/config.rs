//! Configuration: every setting is an environment variable (the design's names), read
//! once with envy into [`Config`] and checked once at start-up. Errors name the variable.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::security::authorization::CallerPolicy;
use crate::security::pii::PiiKeys;
use crate::security::tls::TlsFiles;

/// A value that never prints (passwords). `Debug` and logs show `***`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is handed to a driver.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    #[default]
    Json,
    /// Human-readable lines (development).
    Text,
}

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

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.to_ascii_lowercase().as_str() {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            _ => Err(format!("expected json or text, got {raw:?}")),
        }
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

/// Parses an enum-like variable, naming it in the error (envy's own messages for
/// enums do not).
fn parse_named<'de, D, T>(deserializer: D, variable: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let raw = String::deserialize(deserializer)?;
    raw.trim().parse().map_err(|reason| D::Error::custom(format!("{variable}: {reason}")))
}

fn log_format<'de, D: Deserializer<'de>>(deserializer: D) -> Result<LogFormat, D::Error> {
    parse_named(deserializer, "LOG_FORMAT")
}

fn postgres_sslmode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PostgresSslMode, D::Error> {
    parse_named(deserializer, "POSTGRES_SSLMODE")
}

/// All settings of the service. Each field is the lower-case form of its variable.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    // ---- service ----
    /// SERVICE_PORT: gRPC port (AnalyticsService, health, reflection). 0 = any free port.
    #[serde(default = "defaults::service_port")]
    pub service_port: u16,
    /// SERVICE_BIND_ADDRESS: address both listeners bind to.
    #[serde(default = "defaults::bind_address")]
    pub service_bind_address: IpAddr,
    /// SERVICE_NAME: name in logs, traces and metrics.
    #[serde(default = "defaults::service_name")]
    pub service_name: String,
    /// LOG_LEVEL: a tracing filter, e.g. `info` or `info,analytics_service=debug`.
    #[serde(default = "defaults::log_level")]
    pub log_level: String,
    /// LOG_FORMAT: `json` (default) or `text`.
    #[serde(default, deserialize_with = "log_format")]
    pub log_format: LogFormat,

    // ---- PostgreSQL ----
    #[serde(default = "defaults::postgres_host")]
    pub postgres_host: String,
    #[serde(default = "defaults::postgres_port")]
    pub postgres_port: u16,
    #[serde(default = "defaults::postgres_db")]
    pub postgres_db: String,
    #[serde(default = "defaults::postgres_user")]
    pub postgres_user: String,
    #[serde(default = "defaults::postgres_password")]
    pub postgres_password: Secret,
    /// POSTGRES_MAX_CONNECTIONS: size of the connection pool.
    #[serde(default = "defaults::postgres_max_connections")]
    pub postgres_max_connections: u32,
    /// POSTGRES_SSLMODE: `disable`, `prefer` (default), `require`, `verify-ca` or
    /// `verify-full` (libpq's meanings).
    #[serde(default, deserialize_with = "postgres_sslmode")]
    pub postgres_sslmode: PostgresSslMode,
    /// POSTGRES_SSL_ROOT_CERT: PEM bundle of the CAs trusted for the server certificate
    /// under `verify-ca`/`verify-full` (a mounted Secret). Empty = the system roots.
    #[serde(default)]
    pub postgres_ssl_root_cert: String,
    /// POSTGRES_ACQUIRE_TIMEOUT_MS: longest wait for a pooled connection, in milliseconds.
    #[serde(default = "defaults::postgres_acquire_timeout_ms")]
    pub postgres_acquire_timeout_ms: u64,

    // ---- Redis ----
    /// REDIS_HOST: empty disables Redis (cache off, local rate limiter).
    #[serde(default = "defaults::redis_host")]
    pub redis_host: String,
    #[serde(default = "defaults::redis_port")]
    pub redis_port: u16,
    /// REDIS_USERNAME: Redis ACL user (Redis 6+). Empty = the `default` user.
    #[serde(default)]
    pub redis_username: String,
    #[serde(default)]
    pub redis_password: Secret,
    /// REDIS_TLS: connect to Redis over TLS (`rediss`), the server certificate checked
    /// against REDIS_TLS_CA_FILE or the system roots and the name REDIS_HOST.
    #[serde(default)]
    pub redis_tls: bool,
    /// REDIS_TLS_CA_FILE: PEM bundle of the CAs trusted for Redis' certificate (a
    /// mounted Secret). Empty = the system roots.
    #[serde(default)]
    pub redis_tls_ca_file: String,
    #[serde(default)]
    pub redis_db: i64,
    /// REDIS_CACHE_TTL: lifetime of cached count answers, in seconds. 0 = no caching.
    #[serde(default = "defaults::redis_cache_ttl")]
    pub redis_cache_ttl: u64,
    /// REDIS_KEY_PREFIX: namespace of every key this service writes.
    #[serde(default = "defaults::redis_key_prefix")]
    pub redis_key_prefix: String,
    /// REDIS_TIMEOUT_MS: connect and response timeout of Redis calls, in milliseconds.
    #[serde(default = "defaults::redis_timeout_ms")]
    pub redis_timeout_ms: u64,

    // ---- rate limiting ----
    /// RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE: token bucket size per user. 0 = unlimited.
    #[serde(default = "defaults::rate_limit_per_minute")]
    pub rate_limit_events_per_user_per_minute: u32,
    /// RATE_LIMIT_EXPECTED_REPLICAS: replicas sharing the Redis budgets. While Redis is
    /// unreachable each replica limits alone with budget / this (at least 1 event), so
    /// together they stay near the shared budget instead of multiplying it.
    #[serde(default = "defaults::rate_limit_expected_replicas")]
    pub rate_limit_expected_replicas: u32,

    // ---- observability ----
    /// PROMETHEUS_PORT: plain HTTP admin port (/metrics, /livez, /readyz). 0 = any free port.
    #[serde(default = "defaults::prometheus_port")]
    pub prometheus_port: u16,
    /// OTEL_EXPORTER_OTLP_ENDPOINT: OTLP/gRPC collector, `http://` or `https://`;
    /// empty = trace export off.
    #[serde(default)]
    pub otel_exporter_otlp_endpoint: String,
    /// OTEL_EXPORTER_OTLP_CERTIFICATE: PEM bundle of the CAs trusted for an `https://`
    /// collector, in addition to the system roots. Empty = system roots only.
    #[serde(default)]
    pub otel_exporter_otlp_certificate: String,
    /// OTEL_EXPORTER_OTLP_HEADERS: `key=value,key2=value2` sent with every export
    /// (e.g. an auth token); values may be percent-encoded. Never logged.
    #[serde(default)]
    pub otel_exporter_otlp_headers: Secret,
    /// OTEL_TRACES_SAMPLER_RATIO: share of root traces sampled, 0.0 to 1.0 (parent-based).
    #[serde(default = "defaults::sampler_ratio")]
    pub otel_traces_sampler_ratio: f64,

    // ---- behaviour ----
    /// EVENT_MAX_AGE_DAYS: oldest accepted event timestamp, in days before now.
    #[serde(default = "defaults::event_max_age_days")]
    pub event_max_age_days: u32,
    /// EVENT_RETENTION_DAYS: events older than this many days are deleted by dropping
    /// whole monthly partitions (and their rollup rows). 0 = keep forever; otherwise at
    /// least EVENT_MAX_AGE_DAYS, so accepted events always have a partition.
    #[serde(default)]
    pub event_retention_days: u32,
    /// SELF_TRACKING: record the service's own lifecycle events (started, stopping,
    /// migration applied) as events, so they show up in its own counts.
    #[serde(default = "defaults::enabled")]
    pub self_tracking: bool,
    /// MIGRATE_ON_START: apply migrations when `serve` starts (development only).
    #[serde(default)]
    pub migrate_on_start: bool,
    /// DB_RETRY_MAX_ATTEMPTS: attempts for a retryable database error (1 = no retry).
    #[serde(default = "defaults::db_retry_max_attempts")]
    pub db_retry_max_attempts: u32,
    /// DB_RETRY_BASE_DELAY_MS: first backoff delay in milliseconds; doubles per attempt.
    #[serde(default = "defaults::db_retry_base_delay_ms")]
    pub db_retry_base_delay_ms: u64,
    /// SHUTDOWN_DRAIN_SECONDS: after SIGTERM, longest wait for in-flight calls.
    #[serde(default = "defaults::shutdown_drain_seconds")]
    pub shutdown_drain_seconds: u64,
    /// GRPC_MAX_CONNECTION_AGE_SECONDS: connections are closed gracefully after this age,
    /// so clients re-resolve DNS and spread over new pods. 0 = never.
    #[serde(default = "defaults::grpc_max_connection_age_seconds")]
    pub grpc_max_connection_age_seconds: u64,
    /// REQUEST_TIMEOUT_SECONDS: longest time a call may take on the server.
    #[serde(default = "defaults::request_timeout_seconds")]
    pub request_timeout_seconds: u64,
    /// GRPC_MAX_MESSAGE_BYTES: largest decoded request message.
    #[serde(default = "defaults::grpc_max_message_bytes")]
    pub grpc_max_message_bytes: usize,
    /// HEALTH_POLL_INTERVAL_MS: how often readiness re-checks PostgreSQL and the schema.
    #[serde(default = "defaults::health_poll_interval_ms")]
    pub health_poll_interval_ms: u64,
    /// READINESS_REQUIRES_DATABASE: a PostgreSQL outage makes the replica not ready.
    /// Off by default: PostgreSQL is shared by every replica, so an outage would take
    /// all of them out of the Service at once; they stay ready and answer UNAVAILABLE.
    /// Either way a replica is ready only once it has seen a usable schema.
    #[serde(default)]
    pub readiness_requires_database: bool,

    // ---- security (issue 5) ----
    /// GRPC_MAX_CONCURRENT_STREAMS: most concurrent calls on one HTTP/2 connection.
    #[serde(default = "defaults::grpc_max_concurrent_streams")]
    pub grpc_max_concurrent_streams: u32,
    /// GRPC_MAX_HEADER_LIST_BYTES: largest request header list (metadata), in bytes.
    #[serde(default = "defaults::grpc_max_header_list_bytes")]
    pub grpc_max_header_list_bytes: u32,
    /// GRPC_HANDSHAKE_TIMEOUT_SECONDS: a new connection must finish its TLS handshake (under
    /// mTLS) and then send the HTTP/2 preface within this many seconds each, or is closed.
    #[serde(default = "defaults::grpc_handshake_timeout_seconds")]
    pub grpc_handshake_timeout_seconds: u64,
    /// GRPC_MAX_PENDING_TLS_HANDSHAKES: most connections in their TLS handshake at once;
    /// more are closed on accept.
    #[serde(default = "defaults::grpc_max_pending_tls_handshakes")]
    pub grpc_max_pending_tls_handshakes: usize,
    /// GRPC_KEEPALIVE_INTERVAL_SECONDS: a connection that sent nothing for this many seconds
    /// gets an HTTP/2 PING.
    #[serde(default = "defaults::grpc_keepalive_interval_seconds")]
    pub grpc_keepalive_interval_seconds: u64,
    /// GRPC_KEEPALIVE_TIMEOUT_SECONDS: a PING not acknowledged within this many seconds
    /// closes the connection (dead peers, half-open connections).
    #[serde(default = "defaults::grpc_keepalive_timeout_seconds")]
    pub grpc_keepalive_timeout_seconds: u64,
    /// TLS_CERT_FILE: PEM server certificate chain; with TLS_KEY_FILE and
    /// TLS_CLIENT_CA_FILE turns on mTLS on the gRPC port. Empty = plaintext.
    #[serde(default)]
    pub tls_cert_file: String,
    /// TLS_KEY_FILE: PEM private key of TLS_CERT_FILE.
    #[serde(default)]
    pub tls_key_file: String,
    /// TLS_CLIENT_CA_FILE: PEM bundle of the CAs whose client certificates are accepted.
    #[serde(default)]
    pub tls_client_ca_file: String,
    /// TLS_RELOAD_INTERVAL_SECONDS: how often the TLS files are checked for a rotation, in seconds.
    #[serde(default = "defaults::tls_reload_interval_seconds")]
    pub tls_reload_interval_seconds: u64,
    /// TLS_ALLOWED_CALLERS: comma list of caller identities (SPIFFE URI or DNS SAN)
    /// allowed on every RPC. Empty = any verified caller.
    #[serde(default)]
    pub tls_allowed_callers: String,
    /// TLS_ALLOWED_CALLERS_PER_RPC: `Rpc=id1|id2;Rpc2=id3`, narrowing single RPCs.
    #[serde(default)]
    pub tls_allowed_callers_per_rpc: String,
    /// TLS_ALLOWED_CALLERS_COVER_REFLECTION: server reflection answers only callers on
    /// TLS_ALLOWED_CALLERS (true) or every verified caller (false). grpc.health stays open
    /// to every verified caller either way, for probes.
    #[serde(default = "defaults::enabled")]
    pub tls_allowed_callers_cover_reflection: bool,
    /// PII_FIELDS: comma list of property keys whose values are encrypted at rest.
    #[serde(default = "defaults::pii_fields")]
    pub pii_fields: String,
    /// PII_KEYS_FILE: file of `KEY_ID:BASE64_32_BYTE_KEY` lines, the first encrypting new
    /// writes (a mounted Secret). Empty = PII encryption off.
    #[serde(default)]
    pub pii_keys_file: String,

    // ---- ingestion (group commit) ----
    /// INGEST_BATCH_SIZE: most events per group commit (one multi-row insert). A
    /// TrackEvents call is never split, so a commit may hold one larger call.
    #[serde(default = "defaults::ingest_batch_size")]
    pub ingest_batch_size: usize,
    /// INGEST_LINGER_MS: how long a group commit waits for more events once its first
    /// arrived, in milliseconds. 0 = commit what is queued at once.
    #[serde(default = "defaults::ingest_linger_ms")]
    pub ingest_linger_ms: u64,
    /// INGEST_QUEUE_CAPACITY: most events waiting for or inside a group commit; calls
    /// beyond it fail fast with RESOURCE_EXHAUSTED.
    #[serde(default = "defaults::ingest_queue_capacity")]
    pub ingest_queue_capacity: usize,
    /// INGEST_WRITERS: group commits in flight at once (each holds one pooled connection).
    #[serde(default = "defaults::ingest_writers")]
    pub ingest_writers: usize,
    /// INGEST_COMMIT_TIMEOUT_MS: longest a group-commit statement may run, in
    /// milliseconds; PostgreSQL cancels it after this (statement_timeout of the ingest
    /// connections), and a commit with no answer shortly after marks PostgreSQL
    /// unreachable.
    #[serde(default = "defaults::ingest_commit_timeout_ms")]
    pub ingest_commit_timeout_ms: u64,
    /// IDEMPOTENCY_WINDOW_DAYS: how long an insert_id is remembered, in days.
    #[serde(default = "defaults::idempotency_window_days")]
    pub idempotency_window_days: u32,
}

mod defaults {
    use std::net::{IpAddr, Ipv4Addr};

    use super::Secret;

    pub(super) fn service_port() -> u16 {
        50051
    }
    pub(super) fn bind_address() -> IpAddr {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
    pub(super) fn service_name() -> String {
        "analytics-service".into()
    }
    pub(super) fn log_level() -> String {
        "info".into()
    }
    pub(super) fn postgres_host() -> String {
        "localhost".into()
    }
    pub(super) fn postgres_port() -> u16 {
        5432
    }
    pub(super) fn postgres_db() -> String {
        "analytics".into()
    }
    pub(super) fn postgres_user() -> String {
        "analytics".into()
    }
    pub(super) fn postgres_password() -> Secret {
        Secret::new("secret")
    }
    pub(super) fn postgres_max_connections() -> u32 {
        25
    }
    pub(super) fn postgres_acquire_timeout_ms() -> u64 {
        1_000
    }
    pub(super) fn redis_host() -> String {
        "localhost".into()
    }
    pub(super) fn redis_port() -> u16 {
        6379
    }
    pub(super) fn redis_cache_ttl() -> u64 {
        300
    }
    pub(super) fn redis_key_prefix() -> String {
        "analytics".into()
    }
    pub(super) fn redis_timeout_ms() -> u64 {
        250
    }
    pub(super) fn rate_limit_per_minute() -> u32 {
        1_000
    }
    pub(super) fn rate_limit_expected_replicas() -> u32 {
        1
    }
    pub(super) fn prometheus_port() -> u16 {
        9090
    }
    pub(super) fn sampler_ratio() -> f64 {
        1.0
    }
    pub(super) fn enabled() -> bool {
        true
    }
    pub(super) fn event_max_age_days() -> u32 {
        30
    }
    pub(super) fn db_retry_max_attempts() -> u32 {
        5
    }
    pub(super) fn db_retry_base_delay_ms() -> u64 {
        50
    }
    pub(super) fn shutdown_drain_seconds() -> u64 {
        15
    }
    pub(super) fn grpc_max_connection_age_seconds() -> u64 {
        300
    }
    pub(super) fn request_timeout_seconds() -> u64 {
        10
    }
    pub(super) fn grpc_max_message_bytes() -> usize {
        4 * 1024 * 1024
    }
    pub(super) fn health_poll_interval_ms() -> u64 {
        2_000
    }
    pub(super) fn grpc_max_concurrent_streams() -> u32 {
        200
    }
    pub(super) fn grpc_max_header_list_bytes() -> u32 {
        16 * 1024
    }
    pub(super) fn grpc_handshake_timeout_seconds() -> u64 {
        5
    }
    pub(super) fn grpc_max_pending_tls_handshakes() -> usize {
        256
    }
    pub(super) fn grpc_keepalive_interval_seconds() -> u64 {
        60
    }
    pub(super) fn grpc_keepalive_timeout_seconds() -> u64 {
        20
    }
    pub(super) fn tls_reload_interval_seconds() -> u64 {
        10
    }
    pub(super) fn pii_fields() -> String {
        "email,phone,name,ip_address".into()
    }
    pub(super) fn ingest_batch_size() -> usize {
        500
    }
    pub(super) fn ingest_linger_ms() -> u64 {
        2
    }
    pub(super) fn ingest_queue_capacity() -> usize {
        10_000
    }
    pub(super) fn ingest_commit_timeout_ms() -> u64 {
        1_000
    }
    pub(super) fn ingest_writers() -> usize {
        2
    }
    pub(super) fn idempotency_window_days() -> u32 {
        7
    }
}

/// A start-up configuration error; its message names the offending variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

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
        let config: Config =
            envy::from_iter(variables).map_err(|error| ConfigError(name_variables(&error)))?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field and range checks that types alone do not express.
    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |variable: &str, reason: &str| Err(ConfigError(format!("{variable}: {reason}")));
        if self.service_name.trim().is_empty() {
            return fail("SERVICE_NAME", "must not be empty");
        }
        if self.postgres_host.trim().is_empty() {
            return fail("POSTGRES_HOST", "must not be empty");
        }
        if self.postgres_max_connections == 0 {
            return fail("POSTGRES_MAX_CONNECTIONS", "must be at least 1");
        }
        if self.postgres_acquire_timeout_ms == 0 {
            return fail("POSTGRES_ACQUIRE_TIMEOUT_MS", "must be at least 1");
        }
        if !self.postgres_ssl_root_cert.trim().is_empty() && !self.postgres_sslmode.verifies_certificate() {
            return fail(
                "POSTGRES_SSL_ROOT_CERT",
                "is used only with POSTGRES_SSLMODE verify-ca or verify-full",
            );
        }
        if !self.redis_tls_ca_file.trim().is_empty() && !self.redis_tls {
            return fail("REDIS_TLS_CA_FILE", "is used only with REDIS_TLS=true");
        }
        if self.redis_username.contains(char::is_whitespace) {
            return fail("REDIS_USERNAME", "must contain no white space");
        }
        if !(0..=15).contains(&self.redis_db) {
            return fail("REDIS_DB", "must be between 0 and 15");
        }
        if self.redis_key_prefix.is_empty() || self.redis_key_prefix.contains(char::is_whitespace) {
            return fail("REDIS_KEY_PREFIX", "must be non-empty and contain no white space");
        }
        if !(0.0..=1.0).contains(&self.otel_traces_sampler_ratio) {
            return fail("OTEL_TRACES_SAMPLER_RATIO", "must be between 0.0 and 1.0");
        }
        if self.event_max_age_days == 0 {
            return fail("EVENT_MAX_AGE_DAYS", "must be at least 1");
        }
        if self.event_retention_days != 0 && self.event_retention_days < self.event_max_age_days {
            return fail("EVENT_RETENTION_DAYS", "must be 0 (keep forever) or at least EVENT_MAX_AGE_DAYS");
        }
        if !(1..=20).contains(&self.db_retry_max_attempts) {
            return fail("DB_RETRY_MAX_ATTEMPTS", "must be between 1 and 20");
        }
        // A write can still commit up to a request timeout plus a commit timeout after its
        // timestamp was checked; the count cache's immutability margin (one hour) must
        // cover that.
        if !(1..=600).contains(&self.request_timeout_seconds) {
            return fail("REQUEST_TIMEOUT_SECONDS", "must be between 1 and 600");
        }
        if self.grpc_max_message_bytes < 1024 {
            return fail("GRPC_MAX_MESSAGE_BYTES", "must be at least 1024");
        }
        if self.health_poll_interval_ms == 0 {
            return fail("HEALTH_POLL_INTERVAL_MS", "must be at least 1");
        }
        if !(1..=10_000).contains(&self.grpc_max_concurrent_streams) {
            return fail("GRPC_MAX_CONCURRENT_STREAMS", "must be between 1 and 10000");
        }
        if !(1024..=1024 * 1024).contains(&self.grpc_max_header_list_bytes) {
            return fail("GRPC_MAX_HEADER_LIST_BYTES", "must be between 1024 and 1048576");
        }
        if !(1..=60).contains(&self.grpc_handshake_timeout_seconds) {
            return fail("GRPC_HANDSHAKE_TIMEOUT_SECONDS", "must be between 1 and 60");
        }
        if !(1..=100_000).contains(&self.grpc_max_pending_tls_handshakes) {
            return fail("GRPC_MAX_PENDING_TLS_HANDSHAKES", "must be between 1 and 100000");
        }
        if !(1..=7_200).contains(&self.grpc_keepalive_interval_seconds) {
            return fail("GRPC_KEEPALIVE_INTERVAL_SECONDS", "must be between 1 and 7200");
        }
        if !(1..=600).contains(&self.grpc_keepalive_timeout_seconds) {
            return fail("GRPC_KEEPALIVE_TIMEOUT_SECONDS", "must be between 1 and 600");
        }
        if !(1..=1_000).contains(&self.rate_limit_expected_replicas) {
            return fail("RATE_LIMIT_EXPECTED_REPLICAS", "must be between 1 and 1000");
        }
        let tls_files_set = [&self.tls_cert_file, &self.tls_key_file, &self.tls_client_ca_file]
            .iter()
            .filter(|path| !path.trim().is_empty())
            .count();
        if tls_files_set != 0 && tls_files_set != 3 {
            return fail(
                "TLS_CERT_FILE/TLS_KEY_FILE/TLS_CLIENT_CA_FILE",
                "set all three for mTLS, or none for plaintext",
            );
        }
        if !(1..=3_600).contains(&self.tls_reload_interval_seconds) {
            return fail("TLS_RELOAD_INTERVAL_SECONDS", "must be between 1 and 3600");
        }
        let policy = self.caller_policy()?;
        if !policy.is_open() && self.tls_files().is_none() {
            return fail("TLS_ALLOWED_CALLERS", "caller allow-lists need mTLS (TLS_CERT_FILE and friends)");
        }
        if !(1..=10_000).contains(&self.ingest_batch_size) {
            return fail("INGEST_BATCH_SIZE", "must be between 1 and 10000");
        }
        if self.ingest_linger_ms > 100 {
            return fail("INGEST_LINGER_MS", "must be at most 100");
        }
        if !(1..=1_000_000).contains(&self.ingest_queue_capacity) {
            return fail("INGEST_QUEUE_CAPACITY", "must be between 1 and 1000000");
        }
        if self.ingest_writers == 0 || self.ingest_writers + 2 > self.postgres_max_connections as usize {
            return fail(
                "INGEST_WRITERS",
                "must be between 1 and POSTGRES_MAX_CONNECTIONS - 2 (the writers' pool holds INGEST_WRITERS + 1 of the connections, at least one serves reads)",
            );
        }
        if !(50..=60_000).contains(&self.ingest_commit_timeout_ms) {
            return fail("INGEST_COMMIT_TIMEOUT_MS", "must be between 50 and 60000");
        }
        if !(1..=365).contains(&self.idempotency_window_days) {
            return fail("IDEMPOTENCY_WINDOW_DAYS", "must be between 1 and 365");
        }
        Ok(())
    }

    pub fn grpc_address(&self) -> SocketAddr {
        SocketAddr::new(self.service_bind_address, self.service_port)
    }

    pub fn admin_address(&self) -> SocketAddr {
        SocketAddr::new(self.service_bind_address, self.prometheus_port)
    }

    pub fn redis_enabled(&self) -> bool {
        !self.redis_host.trim().is_empty()
    }

    pub fn otlp_endpoint(&self) -> Option<&str> {
        let endpoint = self.otel_exporter_otlp_endpoint.trim();
        (!endpoint.is_empty()).then_some(endpoint)
    }

    /// POSTGRES_SSL_ROOT_CERT, when set.
    pub fn postgres_ssl_root_cert(&self) -> Option<PathBuf> {
        non_empty_path(&self.postgres_ssl_root_cert)
    }

    /// REDIS_TLS_CA_FILE, when set.
    pub fn redis_tls_ca_file(&self) -> Option<PathBuf> {
        non_empty_path(&self.redis_tls_ca_file)
    }

    /// OTEL_EXPORTER_OTLP_CERTIFICATE, when set.
    pub fn otlp_certificate(&self) -> Option<PathBuf> {
        non_empty_path(&self.otel_exporter_otlp_certificate)
    }

    /// OTEL_EXPORTER_OTLP_HEADERS as (name, value) pairs, names lower-cased and values
    /// percent-decoded. The error names the variable, never a value.
    pub fn otlp_headers(&self) -> Result<Vec<(String, String)>, ConfigError> {
        parse_otlp_headers(self.otel_exporter_otlp_headers.expose())
    }

    /// Reads every CA bundle the database and cache connections need, so a missing or
    /// empty mounted Secret fails start-up with the variable's name (not a connection
    /// error later). Reads files, so it is called at start-up, not in `validate`.
    pub fn check_ca_files(&self) -> Result<(), ConfigError> {
        if let Some(path) = self.postgres_ssl_root_cert() {
            read_ca_bundle("POSTGRES_SSL_ROOT_CERT", &path)?;
        }
        if let Some(path) = self.redis_tls_ca_file() {
            read_ca_bundle("REDIS_TLS_CA_FILE", &path)?;
        }
        Ok(())
    }

    pub fn cache_ttl(&self) -> Duration {
        Duration::from_secs(self.redis_cache_ttl)
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    pub fn postgres_acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.postgres_acquire_timeout_ms)
    }

    pub fn db_retry_base_delay(&self) -> Duration {
        Duration::from_millis(self.db_retry_base_delay_ms)
    }

    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_secs(self.shutdown_drain_seconds)
    }

    pub fn max_connection_age(&self) -> Option<Duration> {
        (self.grpc_max_connection_age_seconds > 0)
            .then(|| Duration::from_secs(self.grpc_max_connection_age_seconds))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds)
    }

    pub fn grpc_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.grpc_handshake_timeout_seconds)
    }

    pub fn grpc_keepalive_interval(&self) -> Duration {
        Duration::from_secs(self.grpc_keepalive_interval_seconds)
    }

    pub fn grpc_keepalive_timeout(&self) -> Duration {
        Duration::from_secs(self.grpc_keepalive_timeout_seconds)
    }

    pub fn health_poll_interval(&self) -> Duration {
        Duration::from_millis(self.health_poll_interval_ms)
    }

    /// The mTLS files, when all three are set.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        let path = |raw: &String| PathBuf::from(raw.trim());
        (!self.tls_cert_file.trim().is_empty()).then(|| TlsFiles {
            certificate_chain: path(&self.tls_cert_file),
            private_key: path(&self.tls_key_file),
            client_ca: path(&self.tls_client_ca_file),
        })
    }

    pub fn tls_reload_interval(&self) -> Duration {
        Duration::from_secs(self.tls_reload_interval_seconds)
    }

    /// TLS_ALLOWED_CALLERS and TLS_ALLOWED_CALLERS_PER_RPC, parsed.
    pub fn caller_policy(&self) -> Result<CallerPolicy, ConfigError> {
        CallerPolicy::parse(&self.tls_allowed_callers, &self.tls_allowed_callers_per_rpc).map_err(ConfigError)
    }

    /// PII_FIELDS as a list.
    pub fn pii_fields(&self) -> Vec<String> {
        self.pii_fields
            .split(',')
            .map(str::trim)
            .filter(|field| !field.is_empty())
            .map(String::from)
            .collect()
    }

    /// The PII keys from PII_KEYS_FILE; `None` when it is not set
    /// (encryption off). Reads the file, so it is called at start-up, not in `validate`.
    pub fn pii_keys(&self) -> Result<Option<PiiKeys>, ConfigError> {
        let path = self.pii_keys_file.trim();
        if path.is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError(format!("PII_KEYS_FILE: cannot read {path}: {error}")))?;
        PiiKeys::parse(&text, "PII_KEYS_FILE").map(Some).map_err(ConfigError)
    }

    pub fn event_max_age(&self) -> chrono::Duration {
        chrono::Duration::days(i64::from(self.event_max_age_days))
    }

    /// `None` keeps events forever.
    pub fn event_retention(&self) -> Option<chrono::Duration> {
        (self.event_retention_days > 0).then(|| chrono::Duration::days(i64::from(self.event_retention_days)))
    }

    pub fn ingest_linger(&self) -> Duration {
        Duration::from_millis(self.ingest_linger_ms)
    }

    pub fn ingest_commit_timeout(&self) -> Duration {
        Duration::from_millis(self.ingest_commit_timeout_ms)
    }

    /// Connections of the group-commit writers' own pool (carved out of
    /// POSTGRES_MAX_CONNECTIONS): one per writer plus one for insert_id lookups.
    pub fn ingest_pool_connections(&self) -> u32 {
        u32::try_from(self.ingest_writers + 1).unwrap_or(u32::MAX)
    }
}

fn non_empty_path(raw: &str) -> Option<PathBuf> {
    let trimmed = raw.trim();
    (!trimmed.is_empty()).then(|| PathBuf::from(trimmed))
}

/// Reads a PEM CA bundle; it must hold at least one certificate. The error names `variable`.
pub fn read_ca_bundle(variable: &str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|error| ConfigError(format!("{variable}: cannot read {}: {error}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN CERTIFICATE-----") {
        return Err(ConfigError(format!("{variable}: {} holds no PEM certificate", path.display())));
    }
    Ok(bytes)
}

/// Parses the OpenTelemetry `key=value,key2=value2` header list (W3C baggage-like:
/// surrounding white space trimmed, values percent-decoded).
fn parse_otlp_headers(raw: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let fail = |reason: String| ConfigError(format!("OTEL_EXPORTER_OTLP_HEADERS: {reason}"));
    let mut headers = Vec::new();
    for (index, pair) in raw.split(',').enumerate() {
        if pair.trim().is_empty() {
            continue;
        }
        let position = index + 1;
        let (name, value) =
            pair.split_once('=').ok_or_else(|| fail(format!("entry {position} is not key=value")))?;
        let name = name.trim().to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.is_empty() {
            return Err(fail(format!("entry {position} has an invalid header name")));
        }
        let value = percent_decode(value.trim())
            .filter(|value| http::HeaderValue::from_str(value).is_ok())
            .ok_or_else(|| fail(format!("entry {position} ({name}) has an invalid value")))?;
        headers.push((name, value));
    }
    Ok(headers)
}

/// `%XX` escapes to bytes; `None` for a broken escape or non-UTF-8 result.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// envy names the variable for values it parses itself ("... provided by POSTGRES_PORT")
/// and reports a missing field by its serde name; this keeps operators' spelling.
fn name_variables(error: &envy::Error) -> String {
    match error {
        envy::Error::MissingValue(field) => format!("{} is required", field.to_uppercase()),
        envy::Error::Custom(message) => message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
    }

    #[test]
    fn defaults_follow_the_design() {
        let config = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(config.service_port, 50051);
        assert_eq!(config.prometheus_port, 9090);
        assert_eq!(config.postgres_max_connections, 25);
        assert_eq!(config.redis_cache_ttl, 300);
        assert_eq!(config.rate_limit_events_per_user_per_minute, 1000);
        assert_eq!(config.event_max_age_days, 30);
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(config.redis_enabled());
        assert_eq!(config.otlp_endpoint(), None);
    }

    #[test]
    fn a_bad_number_names_the_variable() {
        let error = Config::from_vars(vars(&[("POSTGRES_PORT", "abc")])).unwrap_err();
        assert!(error.to_string().contains("POSTGRES_PORT"), "{error}");
    }

    #[test]
    fn a_bad_enum_names_the_variable() {
        let error = Config::from_vars(vars(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert!(error.to_string().contains("LOG_FORMAT"), "{error}");
    }

    #[test]
    fn range_checks_name_the_variable() {
        let cases = [
            ("POSTGRES_MAX_CONNECTIONS", "0"),
            ("OTEL_TRACES_SAMPLER_RATIO", "1.5"),
            ("REDIS_DB", "99"),
            ("EVENT_MAX_AGE_DAYS", "0"),
            ("DB_RETRY_MAX_ATTEMPTS", "0"),
            ("INGEST_BATCH_SIZE", "0"),
            ("INGEST_LINGER_MS", "1000"),
            ("INGEST_QUEUE_CAPACITY", "0"),
            ("INGEST_WRITERS", "26"),
            ("IDEMPOTENCY_WINDOW_DAYS", "0"),
            ("GRPC_HANDSHAKE_TIMEOUT_SECONDS", "0"),
            ("GRPC_HANDSHAKE_TIMEOUT_SECONDS", "61"),
            ("GRPC_MAX_PENDING_TLS_HANDSHAKES", "0"),
            ("GRPC_KEEPALIVE_INTERVAL_SECONDS", "0"),
            ("GRPC_KEEPALIVE_TIMEOUT_SECONDS", "0"),
            ("RATE_LIMIT_EXPECTED_REPLICAS", "0"),
            ("TLS_ALLOWED_CALLERS_COVER_REFLECTION", "maybe"),
        ];
        for (variable, value) in cases {
            let error = Config::from_vars(vars(&[(variable, value)])).unwrap_err();
            assert!(error.to_string().contains(variable), "{variable}: {error}");
        }
    }

    #[test]
    fn tls_needs_all_three_files() {
        let error = Config::from_vars(vars(&[("TLS_CERT_FILE", "/tls/tls.crt")])).unwrap_err();
        assert!(error.to_string().contains("TLS_KEY_FILE"), "{error}");
        let config = Config::from_vars(vars(&[
            ("TLS_CERT_FILE", "/tls/tls.crt"),
            ("TLS_KEY_FILE", "/tls/tls.key"),
            ("TLS_CLIENT_CA_FILE", "/tls/ca.crt"),
        ]))
        .unwrap();
        assert_eq!(config.tls_files().unwrap().client_ca, PathBuf::from("/tls/ca.crt"));
        assert!(Config::from_vars(vars(&[])).unwrap().tls_files().is_none());
    }

    #[test]
    fn allow_lists_need_mtls_and_a_valid_syntax() {
        let error = Config::from_vars(vars(&[("TLS_ALLOWED_CALLERS", "spiffe://a")])).unwrap_err();
        assert!(error.to_string().contains("TLS_ALLOWED_CALLERS"), "{error}");
        let error = Config::from_vars(vars(&[("TLS_ALLOWED_CALLERS_PER_RPC", "Nope=a")])).unwrap_err();
        assert!(error.to_string().contains("TLS_ALLOWED_CALLERS_PER_RPC"), "{error}");
    }

    #[test]
    fn pii_defaults_and_keys_from_a_file() {
        let config = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(config.pii_fields(), ["email", "phone", "name", "ip_address"]);
        assert!(config.pii_keys().unwrap().is_none());
        let path = std::env::temp_dir().join(format!("pii-keys-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
        let file = path.display().to_string();
        let config = Config::from_vars(vars(&[("PII_KEYS_FILE", file.as_str())])).unwrap();
        assert_eq!(config.pii_keys().unwrap().unwrap().current_key_id(), "k1");
        std::fs::write(&path, "k1:short\n").unwrap();
        let error = config.pii_keys().unwrap_err();
        assert!(
            error.to_string().contains("PII_KEYS_FILE") && !error.to_string().contains("short"),
            "{error}"
        );
        std::fs::remove_file(&path).ok();
        let error = Config::from_vars(vars(&[("PII_KEYS_FILE", "/nonexistent/keys")]))
            .unwrap()
            .pii_keys()
            .unwrap_err();
        assert!(error.to_string().contains("PII_KEYS_FILE"), "{error}");
    }

    #[test]
    fn postgres_verify_modes_and_their_ca_file() {
        for (raw, mode) in
            [("verify-ca", PostgresSslMode::VerifyCa), ("VERIFY-FULL", PostgresSslMode::VerifyFull)]
        {
            let config = Config::from_vars(vars(&[("POSTGRES_SSLMODE", raw)])).unwrap();
            assert_eq!(config.postgres_sslmode, mode);
            assert!(config.postgres_ssl_root_cert().is_none());
        }
        let error = Config::from_vars(vars(&[("POSTGRES_SSL_ROOT_CERT", "/ca/ca.crt")])).unwrap_err();
        assert!(error.to_string().contains("POSTGRES_SSL_ROOT_CERT"), "{error}");
        let config = Config::from_vars(vars(&[
            ("POSTGRES_SSLMODE", "verify-full"),
            ("POSTGRES_SSL_ROOT_CERT", "/nonexistent/ca.crt"),
        ]))
        .unwrap();
        let error = config.check_ca_files().unwrap_err();
        assert!(error.to_string().contains("POSTGRES_SSL_ROOT_CERT"), "{error}");
    }

    #[test]
    fn redis_tls_settings() {
        let config = Config::from_vars(vars(&[])).unwrap();
        assert!(!config.redis_tls);
        assert!(config.redis_username.is_empty());
        let error = Config::from_vars(vars(&[("REDIS_TLS_CA_FILE", "/ca/ca.crt")])).unwrap_err();
        assert!(error.to_string().contains("REDIS_TLS_CA_FILE"), "{error}");
        let error = Config::from_vars(vars(&[("REDIS_TLS", "maybe")])).unwrap_err();
        assert!(error.to_string().contains("REDIS_TLS"), "{error}");
        let path = std::env::temp_dir().join(format!("not-a-ca-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, "garbage").unwrap();
        let file = path.display().to_string();
        let config =
            Config::from_vars(vars(&[("REDIS_TLS", "true"), ("REDIS_TLS_CA_FILE", file.as_str())])).unwrap();
        let error = config.check_ca_files().unwrap_err();
        assert!(error.to_string().contains("REDIS_TLS_CA_FILE"), "{error}");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn otlp_headers_follow_the_spec_format_and_never_print_values() {
        let config = Config::from_vars(vars(&[(
            "OTEL_EXPORTER_OTLP_HEADERS",
            " Authorization=Bearer%20s3cret , x-scope-orgid=tenant-1,",
        )]))
        .unwrap();
        assert_eq!(
            config.otlp_headers().unwrap(),
            [
                ("authorization".to_string(), "Bearer s3cret".to_string()),
                ("x-scope-orgid".to_string(), "tenant-1".to_string())
            ]
        );
        assert!(!format!("{config:?}").contains("s3cret"));
        for broken in ["novalue", "bad name=x", "k=%zz", "k=line%0Abreak"] {
            let config = Config::from_vars(vars(&[("OTEL_EXPORTER_OTLP_HEADERS", broken)])).unwrap();
            let error = config.otlp_headers().unwrap_err().to_string();
            assert!(error.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{broken}: {error}");
            assert!(!error.contains("break") && !error.contains("zz"), "values are not echoed: {error}");
        }
        assert!(Config::from_vars(vars(&[])).unwrap().otlp_headers().unwrap().is_empty());
    }

    #[test]
    fn readiness_does_not_require_the_database_by_default() {
        assert!(!Config::from_vars(vars(&[])).unwrap().readiness_requires_database);
        let config = Config::from_vars(vars(&[("READINESS_REQUIRES_DATABASE", "true")])).unwrap();
        assert!(config.readiness_requires_database);
    }

    #[test]
    fn empty_redis_host_disables_redis() {
        let config = Config::from_vars(vars(&[("REDIS_HOST", "")])).unwrap();
        assert!(!config.redis_enabled());
    }

    #[test]
    fn secrets_never_print() {
        let config =
            Config::from_vars(vars(&[("POSTGRES_PASSWORD", "hunter2"), ("REDIS_PASSWORD", "pw")])).unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"));
        assert!(!printed.contains("\"pw\""));
        assert_eq!(config.postgres_password.expose(), "hunter2");
    }
}
