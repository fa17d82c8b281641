//! The synthetic events every phase sends or inserts: event number `n` always has the
//! same name, user and properties, for the raw and the service phases alike. Events go
//! round-robin over [`USERS`] user ids, so that the per-user rate limit of production
//! (RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE) never refuses any of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use analytics_service::pb;

const EVENT_NAMES: &[&str] = &[
    "page_view",
    "click",
    "signup",
    "purchase",
    "search",
    "scroll",
    "share",
    "logout",
    "login",
    "add_to_cart",
];

/// Distinct user ids (--users, 100,000 by default). Consecutive events go to different
/// users, so at R events/s each user sends R / users per second: with the default budget
/// of 1,000 per user per minute the service could take 1.6 million events/s before
/// refusing one ([`rate_limit_headroom`]).
static USERS: AtomicU64 = AtomicU64::new(100_000);

/// Sets the number of distinct user ids, once at start-up.
pub(crate) fn set_users(users: u64) {
    USERS.store(users.max(1), Ordering::Relaxed);
}

fn users() -> u64 {
    USERS.load(Ordering::Relaxed)
}

/// Events per second the service can take from the synthetic users before its rate
/// limit refuses one, with the server's environment (loadgen's own plus --server-env);
/// `None` when unlimited or the environment is not a valid configuration.
pub(crate) fn rate_limit_headroom(server_env: &[String]) -> Option<f64> {
    let overrides = server_env
        .iter()
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()));
    let config = analytics_service::config::Config::from_vars(std::env::vars().chain(overrides)).ok()?;
    let per_minute = config.rate_limit.events_per_user_per_minute;
    (per_minute > 0).then(|| f64::from(per_minute) / 60.0 * users() as f64)
}

/// The synthetic event number `n`: the same shape for the raw and the service phases.
pub(crate) fn synthetic(n: u64) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: EVENT_NAMES[(n % EVENT_NAMES.len() as u64) as usize].to_string(),
        user_id: format!("user-{}", n % users()),
        properties: HashMap::from([
            ("page".to_string(), string_value(&format!("/page/{}", n % 100))),
            ("load_ms".to_string(), number_value((n % 997) as f64)),
            ("logged_in".to_string(), bool_value(n % 2 == 0)),
        ]),
        timestamp: 0,
        insert_id: String::new(),
    }
}

pub(crate) fn synthetic_json(n: u64) -> serde_json::Value {
    serde_json::json!({"page": format!("/page/{}", n % 100), "load_ms": (n % 997) as f64, "logged_in": n % 2 == 0})
}

fn string_value(text: &str) -> pb::PropertyValue {
    pb::PropertyValue { value: Some(pb::property_value::Value::StringValue(text.to_string())) }
}
fn number_value(number: f64) -> pb::PropertyValue {
    pb::PropertyValue { value: Some(pb::property_value::Value::NumberValue(number)) }
}
fn bool_value(flag: bool) -> pb::PropertyValue {
    pb::PropertyValue { value: Some(pb::property_value::Value::BoolValue(flag)) }
}
