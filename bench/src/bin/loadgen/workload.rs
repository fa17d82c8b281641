//! The synthetic events every phase sends or inserts: event number `n` always has the
//! same name, user and properties, for the raw and the service phases alike.

use std::collections::HashMap;

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

/// The synthetic event number `n`: the same shape for the raw and the service phases.
pub(crate) fn synthetic(n: u64) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: EVENT_NAMES[(n % EVENT_NAMES.len() as u64) as usize].to_string(),
        user_id: format!("user-{}", n % 10_000),
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
