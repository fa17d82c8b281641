//! Protobuf messages to domain types (parse, don't validate) and back.

use crate::models::{
    EventCount, EventFilter, EventName, ExportItem, ExportedEvent, ExportedIdentity, GroupBy, IdentifyUser,
    InsertId, Properties, PropertyValue, TimeRange, TrackEvent, UserId,
};
use crate::pb;
use crate::service::{EventResult, Stored, ValidationError};

fn property_value(value: pb::PropertyValue) -> Option<PropertyValue> {
    value.value.map(|value| match value {
        pb::property_value::Value::StringValue(text) => PropertyValue::String(text),
        pb::property_value::Value::NumberValue(number) => PropertyValue::Number(number),
        pb::property_value::Value::BoolValue(flag) => PropertyValue::Bool(flag),
    })
}

fn properties(
    raw: std::collections::HashMap<String, pb::PropertyValue>,
) -> Result<Properties, ValidationError> {
    Properties::parse(raw.into_iter().map(|(key, value)| (key, property_value(value))))
}

impl TryFrom<pb::TrackEventRequest> for TrackEvent {
    type Error = ValidationError;

    fn try_from(request: pb::TrackEventRequest) -> Result<Self, Self::Error> {
        Ok(TrackEvent {
            name: EventName::parse(request.event_name)?,
            user_id: UserId::parse_optional(request.user_id)?,
            properties: properties(request.properties)?,
            unix_seconds: (request.timestamp != 0).then_some(request.timestamp),
            insert_id: InsertId::parse_optional(request.insert_id)?,
        })
    }
}

impl TryFrom<pb::IdentifyUserRequest> for IdentifyUser {
    type Error = ValidationError;

    fn try_from(request: pb::IdentifyUserRequest) -> Result<Self, Self::Error> {
        Ok(IdentifyUser {
            user_id: UserId::parse(request.user_id)?,
            properties: properties(request.properties)?,
        })
    }
}

/// GetEventCount needs the clock (end_time 0 means now), so it is a function.
pub fn event_filter(
    request: pb::GetEventCountRequest,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<EventFilter, ValidationError> {
    let event_name =
        if request.event_name.is_empty() { None } else { Some(EventName::parse(request.event_name)?) };
    Ok(EventFilter {
        event_name,
        range: TimeRange::parse(request.start_time, request.end_time, now)?,
        group_by: GroupBy::parse(&request.group_by)?,
        time_zone: time_zone(&request.time_zone)?,
    })
}

/// An IANA time zone name; empty means UTC.
fn time_zone(name: &str) -> Result<chrono_tz::Tz, ValidationError> {
    if name.is_empty() {
        return Ok(chrono_tz::UTC);
    }
    name.parse::<chrono_tz::Tz>().map_err(|_| {
        ValidationError::new("time_zone", "must be an IANA time zone name such as Europe/Berlin")
    })
}

pub fn user_count_range(
    request: &pb::GetUserCountRequest,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<TimeRange, ValidationError> {
    TimeRange::parse(request.start_time, request.end_time, now)
}

impl From<EventCount> for pb::EventCount {
    fn from(count: EventCount) -> Self {
        pb::EventCount { event_name: count.event_name, timestamp: count.bucket_start, count: count.count }
    }
}

/// One result per event, in request order. A rejected event carries the status its
/// error maps to (the one mapping in `status`), so it reads like a unary failure.
pub(crate) fn track_events_response(results: Vec<EventResult>) -> pb::TrackEventsResponse {
    let results = results
        .into_iter()
        .enumerate()
        .map(|(index, result)| {
            let index = i32::try_from(index).unwrap_or(i32::MAX);
            match result {
                Ok(Stored::Accepted(id)) => pb::TrackEventResult {
                    index,
                    status: pb::TrackEventStatus::Accepted.into(),
                    event_id: id.to_string(),
                    ..Default::default()
                },
                Ok(Stored::Duplicate(id)) => pb::TrackEventResult {
                    index,
                    status: pb::TrackEventStatus::Duplicate.into(),
                    event_id: id.to_string(),
                    ..Default::default()
                },
                Ok(Stored::Suppressed) => pb::TrackEventResult {
                    index,
                    status: pb::TrackEventStatus::Suppressed.into(),
                    ..Default::default()
                },
                Err(error) => {
                    let status = tonic::Status::from(error);
                    pb::TrackEventResult {
                        index,
                        status: pb::TrackEventStatus::Rejected.into(),
                        error: status.message().to_string(),
                        code: status.code().into(),
                        ..Default::default()
                    }
                }
            }
        })
        .collect();
    pb::TrackEventsResponse { results }
}

/// A stored property value on the wire: the inverse of [`property_value`]. Values the
/// API never stores (written by other means) still reach the caller: null as a value
/// with nothing set, arrays and objects as their JSON text.
fn wire_property_value(value: serde_json::Value) -> pb::PropertyValue {
    let value = match value {
        serde_json::Value::String(text) => Some(pb::property_value::Value::StringValue(text)),
        serde_json::Value::Number(number) => {
            Some(pb::property_value::Value::NumberValue(number.as_f64().unwrap_or(f64::NAN)))
        }
        serde_json::Value::Bool(flag) => Some(pb::property_value::Value::BoolValue(flag)),
        serde_json::Value::Null => None,
        other @ (serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {
            Some(pb::property_value::Value::StringValue(other.to_string()))
        }
    };
    pb::PropertyValue { value }
}

/// A stored properties object on the wire (anything but an object has no properties).
fn wire_properties(properties: serde_json::Value) -> std::collections::HashMap<String, pb::PropertyValue> {
    match properties {
        serde_json::Value::Object(object) => {
            object.into_iter().map(|(key, value)| (key, wire_property_value(value))).collect()
        }
        _ => std::collections::HashMap::new(),
    }
}

impl From<ExportedIdentity> for pb::ExportedIdentity {
    fn from(identity: ExportedIdentity) -> Self {
        pb::ExportedIdentity {
            user_id: identity.user_id.as_str().to_string(),
            properties: wire_properties(identity.properties),
            first_seen: identity.first_seen.timestamp(),
            last_seen: identity.last_seen.timestamp(),
        }
    }
}

impl From<ExportedEvent> for pb::ExportedEvent {
    fn from(event: ExportedEvent) -> Self {
        pb::ExportedEvent {
            event_id: event.id.to_string(),
            event_name: event.name,
            timestamp: event.timestamp.timestamp(),
            properties: wire_properties(event.properties),
        }
    }
}

impl From<ExportItem> for pb::ExportUserResponse {
    fn from(item: ExportItem) -> Self {
        let item = match item {
            ExportItem::Identity(identity) => pb::export_user_response::Item::Identity(identity.into()),
            ExportItem::Event(event) => pb::export_user_response::Item::Event(event.into()),
        };
        pb::ExportUserResponse { item: Some(item) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suppressed_event_is_a_success_without_event_id_or_error() {
        let stored = uuid::Uuid::now_v7();
        let response = track_events_response(vec![
            Ok(Stored::Suppressed),
            Ok(Stored::Accepted(stored)),
            Err(crate::service::ServiceError::Overloaded),
        ]);
        let suppressed = &response.results[0];
        assert_eq!(suppressed.status, i32::from(pb::TrackEventStatus::Suppressed));
        assert_eq!((suppressed.index, suppressed.event_id.as_str(), suppressed.error.as_str()), (0, "", ""));
        assert_eq!(suppressed.code, 0, "not an error code");
        assert_eq!(response.results[1].event_id, stored.to_string());
        assert_eq!(response.results[2].status, i32::from(pb::TrackEventStatus::Rejected));
        assert_eq!(Stored::Suppressed.event_id(), None);
    }

    #[test]
    fn exported_properties_are_the_tracked_ones() {
        let tracked = std::collections::HashMap::from([
            (
                "page".to_string(),
                pb::PropertyValue { value: Some(pb::property_value::Value::StringValue("/a".into())) },
            ),
            (
                "load_ms".to_string(),
                pb::PropertyValue { value: Some(pb::property_value::Value::NumberValue(42.5)) },
            ),
            (
                "logged_in".to_string(),
                pb::PropertyValue { value: Some(pb::property_value::Value::BoolValue(true)) },
            ),
        ]);
        let stored = properties(tracked.clone()).unwrap();
        assert_eq!(wire_properties(stored.json().clone()), tracked);
    }

    #[test]
    fn values_the_api_never_stores_still_reach_the_caller() {
        let stored = serde_json::json!({"nothing": null, "list": [1, "a"], "nested": {"b": true}});
        let wire = wire_properties(stored);
        assert_eq!(wire["nothing"], pb::PropertyValue { value: None });
        assert_eq!(wire["list"].value, Some(pb::property_value::Value::StringValue(r#"[1,"a"]"#.into())));
        assert_eq!(
            wire["nested"].value,
            Some(pb::property_value::Value::StringValue(r#"{"b":true}"#.into()))
        );
        assert!(wire_properties(serde_json::json!("not an object")).is_empty());
    }
}
