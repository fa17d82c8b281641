//! The Redis section (REDIS_*): the topology (one server, a Sentinel-managed master or a
//! Cluster) and where it is, how to authenticate and encrypt, the key namespace, timeouts
//! and the count cache's lifetime. In standalone mode an empty REDIS_HOST turns Redis off
//! (no section).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::{non_empty_path, Secret};
use super::{read_section, ConfigError, Vars};

/// How to reach Redis and what to keep there.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// REDIS_MODE and the addresses it uses.
    pub topology: RedisTopology,
    /// REDIS_USERNAME: Redis ACL user (Redis 6+); `None` = the `default` user.
    pub username: Option<String>,
    pub password: Secret,
    /// REDIS_TLS: connect over TLS (`rediss`) to every node (and to the sentinels), each
    /// certificate checked against `tls_ca_file` or the system roots and the node's name
    /// (REDIS_HOST, a REDIS_NODES entry, or the address a sentinel or the cluster gives).
    pub tls: bool,
    /// REDIS_TLS_CA_FILE: PEM bundle of the CAs trusted for Redis' certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// REDIS_DB, 0 to 15 (only 0 in cluster mode).
    pub db: i64,
    /// REDIS_CACHE_TTL (seconds): lifetime of cached count answers; `None` = no caching.
    pub cache_ttl: Option<Duration>,
    /// REDIS_KEY_PREFIX: namespace of every key this service writes.
    pub key_prefix: String,
    /// REDIS_TIMEOUT_MS: connect and response timeout of Redis calls.
    pub timeout: Duration,
}

/// How Redis is deployed (REDIS_MODE), with the addresses of that mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTopology {
    /// `standalone`: one server at REDIS_HOST:REDIS_PORT.
    Standalone { host: String, port: u16 },
    /// `sentinel`: the master named REDIS_SENTINEL_MASTER, asked of the sentinels at
    /// REDIS_NODES, and asked again after a failover.
    Sentinel { sentinels: Vec<NodeAddress>, master_name: String },
    /// `cluster`: a Redis Cluster discovered from the seed nodes at REDIS_NODES.
    Cluster { seed_nodes: Vec<NodeAddress> },
}

/// One `host:port` of REDIS_NODES.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddress {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for RedisTopology {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |nodes: &[NodeAddress]| {
            nodes.iter().map(|node| format!("{}:{}", node.host, node.port)).collect::<Vec<_>>().join(",")
        };
        match self {
            Self::Standalone { host, port } => write!(formatter, "standalone {host}:{port}"),
            Self::Sentinel { sentinels, master_name } => {
                write!(formatter, "sentinel master {master_name} via {}", list(sentinels))
            }
            Self::Cluster { seed_nodes } => write!(formatter, "cluster via {}", list(seed_nodes)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Standalone,
    Sentinel,
    Cluster,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    redis_mode: String,
    #[serde(default)]
    redis_nodes: String,
    #[serde(default)]
    redis_sentinel_master: String,
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
    /// Reads REDIS_*; `None` when REDIS_MODE is standalone and REDIS_HOST is empty. The
    /// values are checked either way.
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
        let mode = match raw.redis_mode.trim() {
            "" | "standalone" => Mode::Standalone,
            "sentinel" => Mode::Sentinel,
            "cluster" => Mode::Cluster,
            _ => return fail("REDIS_MODE", "must be standalone, sentinel or cluster"),
        };
        let nodes = parse_nodes(&raw.redis_nodes)?;
        let master_name = raw.redis_sentinel_master.trim().to_string();
        if mode != Mode::Sentinel && !master_name.is_empty() {
            return fail("REDIS_SENTINEL_MASTER", "is used only with REDIS_MODE=sentinel");
        }
        let topology = match mode {
            Mode::Standalone => {
                if !nodes.is_empty() {
                    return fail("REDIS_NODES", "is used only with REDIS_MODE=cluster or sentinel");
                }
                if raw.redis_host.trim().is_empty() {
                    return Ok(None);
                }
                RedisTopology::Standalone { host: raw.redis_host, port: raw.redis_port }
            }
            Mode::Sentinel => {
                if nodes.is_empty() {
                    return fail(
                        "REDIS_NODES",
                        "must list the sentinels (host:port,...) with REDIS_MODE=sentinel",
                    );
                }
                if master_name.is_empty() || master_name.contains(char::is_whitespace) {
                    return fail(
                        "REDIS_SENTINEL_MASTER",
                        "must name the master (no white space) with REDIS_MODE=sentinel",
                    );
                }
                RedisTopology::Sentinel { sentinels: nodes, master_name }
            }
            Mode::Cluster => {
                if nodes.is_empty() {
                    return fail(
                        "REDIS_NODES",
                        "must list seed nodes (host:port,...) with REDIS_MODE=cluster",
                    );
                }
                if raw.redis_db != 0 {
                    return fail(
                        "REDIS_DB",
                        "must be 0 with REDIS_MODE=cluster (a cluster has one database)",
                    );
                }
                RedisTopology::Cluster { seed_nodes: nodes }
            }
        };
        Ok(Some(Self {
            topology,
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

/// REDIS_NODES: `host:port` entries separated by commas (`[v6]:port` for IPv6).
fn parse_nodes(list: &str) -> Result<Vec<NodeAddress>, ConfigError> {
    let invalid = |entry: &str| {
        ConfigError::variable("REDIS_NODES", format!("{entry:?} is not host:port (comma-separated list)"))
    };
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (host, port) = entry.rsplit_once(':').ok_or_else(|| invalid(entry))?;
            let host = host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host);
            let port: u16 = port.parse().map_err(|_| invalid(entry))?;
            if host.is_empty() || host.contains(char::is_whitespace) || port == 0 {
                return Err(invalid(entry));
            }
            Ok(NodeAddress { host: host.to_string(), port })
        })
        .collect()
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
