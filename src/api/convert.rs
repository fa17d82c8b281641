//! Protobuf messages to domain types (parse, don't validate) and back.

use crate::models::{
    EventCount, EventFilter, EventName, GroupBy, IdentifyUser, InsertId, Properties, PropertyValue,
    TimeRange, TrackEvent, UserId,
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
}
