//! Domain types shared by every layer. Values of these types are already valid:
//! they are built only by `service::validation`, so code below the API never re-checks.

mod event;
mod user;

pub use event::{EventCount, EventFilter, EventName, GroupBy, InsertId, NewEvent, TimeRange, TrackEvent};
pub use user::{IdentifyUser, UserId};

use std::collections::BTreeMap;

/// One property value, as the wire allows: text, a finite number or a boolean.
#[derive(Clone, Debug, PartialEq)]
pub enum PropertyValue {
    String(String),
    Number(f64),
    Bool(bool),
}

/// Validated event or user properties (key order is stable so serialisation is too).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties(pub(crate) BTreeMap<String, PropertyValue>);

impl Properties {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &PropertyValue)> {
        self.0.iter()
    }

    /// The JSON object stored in the `properties` JSONB columns.
    pub fn to_json(&self) -> serde_json::Value {
        let object = self
            .0
            .iter()
            .map(|(key, value)| {
                let json = match value {
                    PropertyValue::String(text) => serde_json::Value::String(text.clone()),
                    // Validation guarantees finiteness, so from_f64 never yields None.
                    PropertyValue::Number(number) => serde_json::Number::from_f64(*number)
                        .map_or(serde_json::Value::Null, serde_json::Value::Number),
                    PropertyValue::Bool(flag) => serde_json::Value::Bool(*flag),
                };
                (key.clone(), json)
            })
            .collect();
        serde_json::Value::Object(object)
    }
}
