//! Redis: an optional cache for count answers and the event budgets shared by all
//! replicas. Redis is never required for correctness; every failure degrades to "no
//! cache" or to the local rate limiter, with a warning.

mod budget;
mod cache;

pub use budget::{BudgetDecision, SharedBudgets};
pub use cache::CountCache;

use crate::config::Config;

/// A client for the configured Redis (host, port, database, password); it connects lazily.
fn client(config: &Config) -> Result<::redis::Client, ::redis::RedisError> {
    let mut settings = ::redis::RedisConnectionInfo::default().set_db(config.redis_db);
    if !config.redis_password.is_empty() {
        settings = settings.set_password(config.redis_password.expose());
    }
    let address = ::redis::ConnectionAddr::Tcp(config.redis_host.clone(), config.redis_port);
    let info = ::redis::IntoConnectionInfo::into_connection_info(address)?.set_redis_settings(settings);
    ::redis::Client::open(info)
}
