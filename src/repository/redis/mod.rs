//! Redis: an optional cache for count answers and the event budgets shared by all
//! replicas. Redis is never required for correctness; every failure degrades to "no
//! cache" or to the local rate limiter, with a warning.

mod breaker;
mod budget;
mod budget_batch;
mod cache;

pub(crate) use breaker::RedisBreaker;
pub(crate) use budget::{Grant, SharedBudgets, Spend};
pub use cache::CountCache;

use crate::config::{read_ca_bundle, RedisConfig};

/// A client for the configured Redis (host, port, database, ACL user and password, TLS);
/// it connects lazily. Under REDIS_TLS the server certificate is checked against
/// REDIS_TLS_CA_FILE (or the system roots) and must be issued for REDIS_HOST.
fn client(config: &RedisConfig) -> Result<::redis::Client, ::redis::RedisError> {
    let mut settings = ::redis::RedisConnectionInfo::default().set_db(config.db);
    if let Some(username) = &config.username {
        settings = settings.set_username(username);
    }
    if !config.password.is_empty() {
        settings = settings.set_password(config.password.expose());
    }
    let host = config.host.clone();
    let port = config.port;
    if !config.tls {
        let address = ::redis::ConnectionAddr::Tcp(host, port);
        let info = ::redis::IntoConnectionInfo::into_connection_info(address)?.set_redis_settings(settings);
        return ::redis::Client::open(info);
    }
    let address = ::redis::ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None };
    let info = ::redis::IntoConnectionInfo::into_connection_info(address)?.set_redis_settings(settings);
    let root_cert = match &config.tls_ca_file {
        Some(path) => Some(read_ca_bundle("REDIS_TLS_CA_FILE", path).map_err(|error| {
            ::redis::RedisError::from((
                ::redis::ErrorKind::InvalidClientConfig,
                "unusable CA bundle",
                error.to_string(),
            ))
        })?),
        None => None,
    };
    ::redis::Client::build_with_tls(info, ::redis::TlsCertificates { client_tls: None, root_cert })
}
