//! Input rules. Raw values from the wire become domain types here or are rejected with a
//! [`ValidationError`] that names the field. Limits are the named constants below.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use crate::models::{EventName, GroupBy, InsertId, Properties, PropertyValue, TimeRange, UserId};
use crate::security::pii::{is_reserved, CIPHERTEXT_PREFIX};

/// Longest event name, user id and property key, in bytes (the VARCHAR(255) columns).
pub const MAX_NAME_BYTES: usize = 255;
/// Most property keys on one event or identity.
pub const MAX_PROPERTY_KEYS: usize = 256;
/// Largest serialised properties object, in bytes (larger is refused as too large).
pub(crate) const MAX_PROPERTIES_BYTES: usize = 32 * 1024;
/// How far in the future an event timestamp may lie (clock skew allowance).
pub(crate) const MAX_FUTURE_SKEW: Duration = Duration::hours(1);
/// Most buckets one GetEventCount answer may span.
pub(crate) const MAX_BUCKETS: i64 = 10_000;
/// Most events in one TrackEvents call.
pub(crate) const MAX_BATCH_EVENTS: usize = 1_000;
/// Largest encoded TrackEvents request, in bytes (1 MiB).
pub(crate) const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// A rejected input: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

/// Checks a required name-like string: non-empty, at most 255 bytes, no control characters.
fn check_name(field: &str, raw: &str) -> Result<(), ValidationError> {
    if raw.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if raw.len() > MAX_NAME_BYTES {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_NAME_BYTES} bytes, got {}", raw.len()),
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(ValidationError::new(field, "must not contain control characters"));
    }
    Ok(())
}

impl EventName {
    pub(crate) fn parse(raw: String) -> Result<Self, ValidationError> {
        check_name("event_name", &raw)?;
        Ok(Self(raw))
    }
}

impl UserId {
    /// A required user id (IdentifyUser).
    pub fn parse(raw: String) -> Result<Self, ValidationError> {
        check_name("user_id", &raw)?;
        Ok(Self(raw))
    }

    /// An optional user id (TrackEvent): empty means anonymous.
    pub(crate) fn parse_optional(raw: String) -> Result<Option<Self>, ValidationError> {
        if raw.is_empty() {
            return Ok(None);
        }
        Self::parse(raw).map(Some)
    }
}

impl InsertId {
    /// An optional idempotency key: empty means none.
    pub(crate) fn parse_optional(raw: String) -> Result<Option<Self>, ValidationError> {
        if raw.is_empty() {
            return Ok(None);
        }
        check_name("insert_id", &raw)?;
        Ok(Some(Self(raw)))
    }
}

/// Checks the size of a TrackEvents call before its events are parsed one by one.
pub(crate) fn check_batch(event_count: usize, encoded_bytes: usize) -> Result<(), ValidationError> {
    if event_count == 0 {
        return Err(ValidationError::new("events", "must not be empty"));
    }
    if event_count > MAX_BATCH_EVENTS {
        return Err(ValidationError::new(
            "events",
            format!("must hold at most {MAX_BATCH_EVENTS} events, got {event_count}"),
        ));
    }
    if encoded_bytes > MAX_BATCH_BYTES {
        return Err(ValidationError::new(
            "events",
            format!("request is {encoded_bytes} bytes, at most {MAX_BATCH_BYTES}"),
        ));
    }
    Ok(())
}

impl Properties {
    /// Builds properties from (key, value) pairs, where a value of `None` means the
    /// sender set no variant of the oneof.
    pub(crate) fn parse<I>(raw: I) -> Result<Self, ValidationError>
    where
        I: IntoIterator<Item = (String, Option<PropertyValue>)>,
    {
        let mut properties = BTreeMap::new();
        for (key, value) in raw {
            if properties.len() == MAX_PROPERTY_KEYS {
                return Err(ValidationError::new(
                    "properties",
                    format!("must have at most {MAX_PROPERTY_KEYS} keys"),
                ));
            }
            // The field name is only built for an error (most keys are valid).
            let field = || format!("properties[{key:?}]");
            if key.is_empty() || key.len() > MAX_NAME_BYTES {
                return Err(ValidationError::new(
                    field(),
                    format!("key must be 1 to {MAX_NAME_BYTES} bytes, got {}", key.len()),
                ));
            }
            if key.chars().any(char::is_control) {
                return Err(ValidationError::new(field(), "key must not contain control characters"));
            }
            let value = match value {
                None => return Err(ValidationError::new(field(), "value must be set")),
                Some(PropertyValue::String(text)) if text.contains('\0') => {
                    return Err(ValidationError::new(field(), "string value must not contain NUL"))
                }
                // Stored values with this prefix read as ciphertext: a client must not be
                // able to pass clear text off as encrypted (or break the reads of a row).
                Some(PropertyValue::String(text)) if is_reserved(&text) => {
                    return Err(ValidationError::new(
                        field(),
                        format!("string value must not start with the reserved prefix {CIPHERTEXT_PREFIX}"),
                    ))
                }
                Some(PropertyValue::Number(number)) if !number.is_finite() => {
                    return Err(ValidationError::new(field(), "number value must be finite"))
                }
                Some(valid) => valid,
            };
            properties.insert(key, value);
        }
        let properties = Properties::from_values(properties);
        let size = serialized_len(properties.json());
        if size > MAX_PROPERTIES_BYTES {
            return Err(ValidationError::new(
                "properties",
                format!("payload exceeds maximum size: {size} bytes, at most {MAX_PROPERTIES_BYTES}"),
            ));
        }
        Ok(properties)
    }
}

/// Bytes of `value` as compact JSON text (as stored), counted without building the text.
fn serialized_len(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value).map_or(usize::MAX, |()| counter.0)
}

/// Resolves an event timestamp: `None` is now; otherwise it must lie within
/// [now - max_age, now + MAX_FUTURE_SKEW].
pub(crate) fn event_timestamp(
    unix_seconds: Option<i64>,
    now: DateTime<Utc>,
    max_age: Duration,
) -> Result<DateTime<Utc>, ValidationError> {
    let Some(seconds) = unix_seconds else {
        return Ok(now);
    };
    check_unix_seconds("timestamp", seconds)?;
    let timestamp = DateTime::from_timestamp(seconds, 0)
        .ok_or_else(|| ValidationError::new("timestamp", "is out of range"))?;
    if timestamp > now + MAX_FUTURE_SKEW {
        return Err(ValidationError::new(
            "timestamp",
            format!("must be at most {} seconds in the future", MAX_FUTURE_SKEW.num_seconds()),
        ));
    }
    if timestamp < now - max_age {
        return Err(ValidationError::new(
            "timestamp",
            format!("must be at most {} days in the past", max_age.num_days()),
        ));
    }
    Ok(timestamp)
}

/// Earliest instant a time field may name: 0001-01-01T00:00:00Z. PostgreSQL's
/// `timestamptz` reaches back to 4713 BC and chrono further, but bucket arithmetic
/// (a week's Monday, a zone's local midnight) must stay representable in both.
pub const MIN_UNIX_SECONDS: i64 = -62_135_596_800;
/// Latest instant a time field may name: 9999-12-31T23:59:59Z (see [`MIN_UNIX_SECONDS`]).
pub const MAX_UNIX_SECONDS: i64 = 253_402_300_799;

/// Rejects an instant outside [`MIN_UNIX_SECONDS`, `MAX_UNIX_SECONDS`].
fn check_unix_seconds(field: &str, seconds: i64) -> Result<(), ValidationError> {
    if !(MIN_UNIX_SECONDS..=MAX_UNIX_SECONDS).contains(&seconds) {
        return Err(ValidationError::new(
            field,
            format!(
                "is out of range: Unix seconds from {MIN_UNIX_SECONDS} (year 1) to {MAX_UNIX_SECONDS} (year 9999), got {seconds}"
            ),
        ));
    }
    Ok(())
}

impl TimeRange {
    /// A query range [start, end). `end` of 0 means now: the next whole second after
    /// `now`, so every event stored up to `now` (timestamps carry microseconds) is inside,
    /// and a count asked after an acknowledged write includes it.
    pub fn parse(start: i64, end: i64, now: DateTime<Utc>) -> Result<Self, ValidationError> {
        check_unix_seconds("start_time", start)?;
        let end = if end == 0 { now.timestamp() + 1 } else { end };
        check_unix_seconds("end_time", end)?;
        if end <= start {
            return Err(ValidationError::new("end_time", "must be after start_time"));
        }
        Ok(Self { start, end })
    }
}

impl GroupBy {
    /// `""` means ungrouped; otherwise `hour`, `day` or `week`.
    pub fn parse(raw: &str) -> Result<Option<Self>, ValidationError> {
        match raw {
            "" => Ok(None),
            "hour" => Ok(Some(GroupBy::Hour)),
            "day" => Ok(Some(GroupBy::Day)),
            "week" => Ok(Some(GroupBy::Week)),
            other => Err(ValidationError::new(
                "group_by",
                format!("must be one of \"hour\", \"day\", \"week\" or empty, got {other:?}"),
            )),
        }
    }

    /// Rejects ranges that would answer with more than [`MAX_BUCKETS`] buckets.
    pub(crate) fn check_bucket_count(&self, range: TimeRange) -> Result<(), ValidationError> {
        let buckets = self.bucket_count(range);
        if buckets > MAX_BUCKETS {
            return Err(ValidationError::new(
                "group_by",
                format!("the range spans {buckets} {} buckets, at most {MAX_BUCKETS}", self.as_str()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
