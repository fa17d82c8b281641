//! The Redis section (REDIS_*): where Redis is, how to authenticate and encrypt, the
//! key namespace, timeouts and the count cache's lifetime. An empty REDIS_HOST turns
//! Redis off (no section).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::{non_empty_path, Secret};
use super::{read_section, ConfigError, Vars};

/// How to reach Redis and what to keep there.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub host: String,
    pub port: u16,
    /// REDIS_USERNAME: Redis ACL user (Redis 6+); `None` = the `default` user.
    pub username: Option<String>,
    pub password: Secret,
    /// REDIS_TLS: connect over TLS (`rediss`), the certificate checked against
    /// `tls_ca_file` or the system roots and the name REDIS_HOST.
    pub tls: bool,
    /// REDIS_TLS_CA_FILE: PEM bundle of the CAs trusted for Redis' certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// REDIS_DB, 0 to 15.
    pub db: i64,
    /// REDIS_CACHE_TTL (seconds): lifetime of cached count answers; `None` = no caching.
    pub cache_ttl: Option<Duration>,
    /// REDIS_KEY_PREFIX: namespace of every key this service writes.
    pub key_prefix: String,
    /// REDIS_TIMEOUT_MS: connect and response timeout of Redis calls.
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default = "default_host")]
    redis_host: String,
    #[serde(default = "default_port")]
    redis_port: u16,
    #[serde(default)]
    redis_username: String,
    #[serde(default)]
    redis_password: Secret,
    #[serde(default)]
    redis_tls: bool,
    #[serde(default)]
    redis_tls_ca_file: String,
    #[serde(default)]
    redis_db: i64,
    #[serde(default = "default_cache_ttl")]
    redis_cache_ttl: u64,
    #[serde(default = "default_key_prefix")]
    redis_key_prefix: String,
    #[serde(default = "default_timeout_ms")]
    redis_timeout_ms: u64,
}

impl RedisConfig {
    /// Reads REDIS_*; `None` when REDIS_HOST is empty. The values are checked either way.
    pub(super) fn load(vars: &Vars) -> Result<Option<Self>, ConfigError> {
        let raw: Raw = read_section(vars)?;
        let fail = |variable: &str, reason: &str| Err(ConfigError::variable(variable, reason));
        let tls_ca_file = non_empty_path(&raw.redis_tls_ca_file);
        if tls_ca_file.is_some() && !raw.redis_tls {
            return fail("REDIS_TLS_CA_FILE", "is used only with REDIS_TLS=true");
        }
        if raw.redis_username.contains(char::is_whitespace) {
            return fail("REDIS_USERNAME", "must contain no white space");
        }
        if !(0..=15).contains(&raw.redis_db) {
            return fail("REDIS_DB", "must be between 0 and 15");
        }
        if raw.redis_key_prefix.is_empty() || raw.redis_key_prefix.contains(char::is_whitespace) {
            return fail("REDIS_KEY_PREFIX", "must be non-empty and contain no white space");
        }
        if raw.redis_host.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            host: raw.redis_host,
            port: raw.redis_port,
            username: (!raw.redis_username.is_empty()).then_some(raw.redis_username),
            password: raw.redis_password,
            tls: raw.redis_tls,
            tls_ca_file,
            db: raw.redis_db,
            cache_ttl: (raw.redis_cache_ttl > 0).then(|| Duration::from_secs(raw.redis_cache_ttl)),
            key_prefix: raw.redis_key_prefix,
            timeout: Duration::from_millis(raw.redis_timeout_ms),
        }))
    }
}

fn default_host() -> String {
    "localhost".into()
}
fn default_port() -> u16 {
    6379
}
fn default_cache_ttl() -> u64 {
    300
}
fn default_key_prefix() -> String {
    "analytics".into()
}
fn default_timeout_ms() -> u64 {
    250
}
