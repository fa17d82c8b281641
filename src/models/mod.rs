//! Domain types shared by every layer. Request values are already valid: they are built
//! only by `service::validation`, so code below the API never re-checks. Count plans
//! (`count_plan`) are built by `service::counts::plan` and run by the repository; the
//! stored form of user sets (`user_bitmap`) and the UTC units of the rollups (`utc`) are
//! shared by both.

pub(crate) mod audit;
pub mod count_plan;
mod event;
mod export;
pub(crate) mod rpc;
mod user;
pub mod user_bitmap;
pub mod utc;

pub(crate) use audit::{AuditRecord, AUDIT_OUTCOME_OK};
pub use count_plan::{EventCountPlan, PartialHour, RangeSplit, RollupStamp, Segments};
pub use event::{
    Caller, EventCount, EventFilter, EventName, GroupBy, InsertId, NewEvent, TimeRange, TrackEvent,
};
pub use export::{ExportItem, ExportedEvent, ExportedIdentity};
pub use user::{IdentifyUser, UserId};

use std::collections::BTreeMap;

/// One property value, as the wire allows: text, a finite number or a boolean.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum PropertyValue {
    String(String),
    Number(f64),
    Bool(bool),
}

/// Validated event or user properties, held as the JSON object the `properties` JSONB
/// columns store. Validation builds it once (measuring its size on the way) and the
/// repositories write it as is; keys are sorted, so serialisation is stable.
#[derive(Clone, Debug, PartialEq)]
pub struct Properties(serde_json::Value);

impl Default for Properties {
    fn default() -> Self {
        Self(serde_json::Value::Object(serde_json::Map::new()))
    }
}

impl Properties {
    /// The JSON object of validated values (only `service::validation` has them).
    pub(crate) fn from_values(values: BTreeMap<String, PropertyValue>) -> Self {
        let object = values
            .into_iter()
            .map(|(key, value)| {
                let json = match value {
                    PropertyValue::String(text) => serde_json::Value::String(text),
                    // Validation guarantees finiteness, so from_f64 never yields None.
                    PropertyValue::Number(number) => serde_json::Number::from_f64(number)
                        .map_or(serde_json::Value::Null, serde_json::Value::Number),
                    PropertyValue::Bool(flag) => serde_json::Value::Bool(flag),
                };
                (key, json)
            })
            .collect();
        Self(serde_json::Value::Object(object))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.0.as_object().map_or(0, serde_json::Map::len)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &serde_json::Value)> {
        self.0.as_object().into_iter().flatten()
    }

    /// The JSON object stored in the `properties` JSONB columns (before encryption of
    /// sensitive values).
    pub fn json(&self) -> &serde_json::Value {
        &self.0
    }
}
