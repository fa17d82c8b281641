//! The process and gRPC sections: listeners, lifecycle (readiness polling, drain,
//! self-tracking, migrate on start) and the gRPC connection limits (GRPC_*,
//! REQUEST_TIMEOUT_SECONDS).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::values::check_range;
use super::{read_section, ConfigError, Vars};

/// Listeners and lifecycle of the process.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// SERVICE_BIND_ADDRESS and SERVICE_PORT (0 = any free port): the gRPC listener.
    pub grpc_address: SocketAddr,
    /// SERVICE_BIND_ADDRESS and PROMETHEUS_PORT: the admin HTTP listener (/metrics,
    /// /livez, /readyz).
    pub admin_address: SocketAddr,
    /// SHUTDOWN_DRAIN_SECONDS: after SIGTERM, longest wait for in-flight calls.
    pub shutdown_drain: Duration,
    /// HEALTH_POLL_INTERVAL_MS: how often readiness re-checks PostgreSQL and the schema.
    pub health_poll_interval: Duration,
    /// READINESS_REQUIRES_DATABASE: a PostgreSQL outage makes the replica not ready.
    /// Off by default: PostgreSQL is shared by every replica, so an outage would take
    /// all of them out of the Service at once; they stay ready and answer UNAVAILABLE.
    pub readiness_requires_database: bool,
    /// SELF_TRACKING: record the service's own lifecycle events as events.
    pub self_tracking: bool,
    /// MIGRATE_ON_START: apply migrations when `serve` starts (development only).
    pub migrate_on_start: bool,
}

#[derive(Deserialize)]
struct RawServer {
    #[serde(default = "default_service_port")]
    service_port: u16,
    #[serde(default = "default_bind_address")]
    service_bind_address: IpAddr,
    #[serde(default = "default_prometheus_port")]
    prometheus_port: u16,
    #[serde(default = "default_shutdown_drain_seconds")]
    shutdown_drain_seconds: u64,
    #[serde(default = "default_health_poll_interval_ms")]
    health_poll_interval_ms: u64,
    #[serde(default)]
    readiness_requires_database: bool,
    #[serde(default = "super::default_enabled")]
    self_tracking: bool,
    #[serde(default)]
    migrate_on_start: bool,
}

impl ServerConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: RawServer = read_section(vars)?;
        if raw.health_poll_interval_ms == 0 {
            return Err(ConfigError::variable("HEALTH_POLL_INTERVAL_MS", "must be at least 1"));
        }
        Ok(Self {
            grpc_address: SocketAddr::new(raw.service_bind_address, raw.service_port),
            admin_address: SocketAddr::new(raw.service_bind_address, raw.prometheus_port),
            shutdown_drain: Duration::from_secs(raw.shutdown_drain_seconds),
            health_poll_interval: Duration::from_millis(raw.health_poll_interval_ms),
            readiness_requires_database: raw.readiness_requires_database,
            self_tracking: raw.self_tracking,
            migrate_on_start: raw.migrate_on_start,
        })
    }
}

/// Limits of the gRPC server and its connections.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    /// REQUEST_TIMEOUT_SECONDS: longest time a call may take on the server.
    pub request_timeout: Duration,
    /// GRPC_MAX_MESSAGE_BYTES: largest decoded request message.
    pub max_message_bytes: usize,
    /// GRPC_MAX_CONCURRENT_STREAMS: most concurrent calls on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// GRPC_MAX_HEADER_LIST_BYTES: largest request header list (metadata).
    pub max_header_list_bytes: u32,
    /// GRPC_MAX_CONNECTION_AGE_SECONDS: connections are closed gracefully after this
    /// age, so clients re-resolve DNS and spread over new pods; `None` = never.
    pub max_connection_age: Option<Duration>,
    /// GRPC_HANDSHAKE_TIMEOUT_SECONDS: a new connection must finish its TLS handshake
    /// (under mTLS) and then send the HTTP/2 preface within this time each.
    pub handshake_timeout: Duration,
    /// GRPC_MAX_PENDING_TLS_HANDSHAKES: most connections in their TLS handshake at once.
    pub max_pending_tls_handshakes: usize,
    /// GRPC_KEEPALIVE_INTERVAL_SECONDS: an idle connection gets an HTTP/2 PING after this.
    pub keepalive_interval: Duration,
    /// GRPC_KEEPALIVE_TIMEOUT_SECONDS: a PING not acknowledged within this closes the
    /// connection.
    pub keepalive_timeout: Duration,
}

#[derive(Deserialize)]
struct RawGrpc {
    #[serde(default = "default_request_timeout_seconds")]
    request_timeout_seconds: u64,
    #[serde(default = "default_grpc_max_message_bytes")]
    grpc_max_message_bytes: usize,
    #[serde(default = "default_grpc_max_concurrent_streams")]
    grpc_max_concurrent_streams: u32,
    #[serde(default = "default_grpc_max_header_list_bytes")]
    grpc_max_header_list_bytes: u32,
    #[serde(default = "default_grpc_max_connection_age_seconds")]
    grpc_max_connection_age_seconds: u64,
    #[serde(default = "default_grpc_handshake_timeout_seconds")]
    grpc_handshake_timeout_seconds: u64,
    #[serde(default = "default_grpc_max_pending_tls_handshakes")]
    grpc_max_pending_tls_handshakes: usize,
    #[serde(default = "default_grpc_keepalive_interval_seconds")]
    grpc_keepalive_interval_seconds: u64,
    #[serde(default = "default_grpc_keepalive_timeout_seconds")]
    grpc_keepalive_timeout_seconds: u64,
}

impl GrpcConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: RawGrpc = read_section(vars)?;
        // A write can still commit up to a request timeout plus a commit timeout after its
        // timestamp was checked; the count cache's immutability margin (one hour) must
        // cover that.
        check_range("REQUEST_TIMEOUT_SECONDS", raw.request_timeout_seconds, 1, 600)?;
        if raw.grpc_max_message_bytes < 1024 {
            return Err(ConfigError::variable("GRPC_MAX_MESSAGE_BYTES", "must be at least 1024"));
        }
        check_range("GRPC_MAX_CONCURRENT_STREAMS", raw.grpc_max_concurrent_streams, 1, 10_000)?;
        check_range("GRPC_MAX_HEADER_LIST_BYTES", raw.grpc_max_header_list_bytes, 1024, 1024 * 1024)?;
        check_range("GRPC_HANDSHAKE_TIMEOUT_SECONDS", raw.grpc_handshake_timeout_seconds, 1, 60)?;
        check_range("GRPC_MAX_PENDING_TLS_HANDSHAKES", raw.grpc_max_pending_tls_handshakes, 1, 100_000)?;
        check_range("GRPC_KEEPALIVE_INTERVAL_SECONDS", raw.grpc_keepalive_interval_seconds, 1, 7_200)?;
        check_range("GRPC_KEEPALIVE_TIMEOUT_SECONDS", raw.grpc_keepalive_timeout_seconds, 1, 600)?;
        Ok(Self {
            request_timeout: Duration::from_secs(raw.request_timeout_seconds),
            max_message_bytes: raw.grpc_max_message_bytes,
            max_concurrent_streams: raw.grpc_max_concurrent_streams,
            max_header_list_bytes: raw.grpc_max_header_list_bytes,
            max_connection_age: (raw.grpc_max_connection_age_seconds > 0)
                .then(|| Duration::from_secs(raw.grpc_max_connection_age_seconds)),
            handshake_timeout: Duration::from_secs(raw.grpc_handshake_timeout_seconds),
            max_pending_tls_handshakes: raw.grpc_max_pending_tls_handshakes,
            keepalive_interval: Duration::from_secs(raw.grpc_keepalive_interval_seconds),
            keepalive_timeout: Duration::from_secs(raw.grpc_keepalive_timeout_seconds),
        })
    }
}

pub(super) fn default_service_name() -> String {
    "analytics-service".into()
}
fn default_service_port() -> u16 {
    50051
}
fn default_bind_address() -> IpAddr {
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}
fn default_prometheus_port() -> u16 {
    9090
}
fn default_shutdown_drain_seconds() -> u64 {
    15
}
fn default_health_poll_interval_ms() -> u64 {
    2_000
}
fn default_request_timeout_seconds() -> u64 {
    10
}
fn default_grpc_max_message_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_grpc_max_concurrent_streams() -> u32 {
    200
}
fn default_grpc_max_header_list_bytes() -> u32 {
    16 * 1024
}
fn default_grpc_max_connection_age_seconds() -> u64 {
    300
}
fn default_grpc_handshake_timeout_seconds() -> u64 {
    5
}
fn default_grpc_max_pending_tls_handshakes() -> usize {
    256
}
fn default_grpc_keepalive_interval_seconds() -> u64 {
    60
}
fn default_grpc_keepalive_timeout_seconds() -> u64 {
    20
}
