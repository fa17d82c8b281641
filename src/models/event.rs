//! Events: what TrackEvent stores and what the count queries return.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Properties, UserId};
use crate::security::subject::SubjectHash;

/// A valid event name: 1-255 bytes, no control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventName(pub(crate) String);

impl EventName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client-chosen idempotency key: 1-255 bytes, no control characters. Two events
/// with the same key within the idempotency window are stored once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InsertId(pub(crate) String);

impl InsertId {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// A TrackEvent request after parsing; the timestamp is checked against the clock
/// by the service, which knows the accepted age window.
#[derive(Clone, Debug)]
pub struct TrackEvent {
    pub name: EventName,
    /// `None` for anonymous events.
    pub user_id: Option<UserId>,
    pub properties: Properties,
    /// Unix seconds as sent; `None` when absent or 0 (meaning "now").
    pub unix_seconds: Option<i64>,
    /// `None` when the client sent no idempotency key.
    pub insert_id: Option<InsertId>,
}

/// An event ready to be written: identity and time are fixed.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub id: Uuid,
    pub name: EventName,
    pub user_id: Option<UserId>,
    pub properties: Properties,
    pub timestamp: DateTime<Utc>,
    pub insert_id: Option<InsertId>,
    /// Whose insert_id it is (see [`Caller::key_scope`]): a key is unique per scope and
    /// user, never across senders.
    pub key_scope: String,
    /// The keyed hash of `user_id` when the service checks the suppression list
    /// (SUPPRESSION_KEY_FILE set and the event has a user); `None` otherwise. Computed
    /// once, when the event is built, so a retried or split commit never hashes again.
    pub subject_hash: Option<SubjectHash>,
}

/// Who sent a call, as the api layer established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The verified mTLS identity, or the peer IP without mTLS: the budget of anonymous
    /// events, and the caller in logs and audit records.
    pub name: String,
    /// The namespace of the caller's idempotency keys: its verified mTLS identity, or ""
    /// (one scope shared by every caller) without mTLS, where peer IPs change with pods.
    pub key_scope: String,
}

/// A half-open time range [start, end) in Unix seconds, with end > start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimeRange {
    pub(crate) start: i64,
    pub(crate) end: i64,
}

impl TimeRange {
    pub fn start(&self) -> i64 {
        self.start
    }

    pub fn end(&self) -> i64 {
        self.end
    }
}

/// Bucket width of a grouped count. Buckets are UTC; weeks start on Monday (ISO 8601).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupBy {
    Hour,
    Day,
    Week,
}

impl GroupBy {
    /// The field name PostgreSQL's `date_trunc` takes.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            GroupBy::Hour => "hour",
            GroupBy::Day => "day",
            GroupBy::Week => "week",
        }
    }

    pub(crate) fn seconds(&self) -> i64 {
        match self {
            GroupBy::Hour => 3_600,
            GroupBy::Day => 86_400,
            GroupBy::Week => 7 * 86_400,
        }
    }

    /// Start of the bucket containing `unix_seconds` (weeks align to Monday 00:00 UTC;
    /// 1970-01-01 was a Thursday, so Monday-aligned weeks are offset by 3 days).
    pub(crate) fn bucket_start(&self, unix_seconds: i64) -> i64 {
        let offset = match self {
            GroupBy::Week => 3 * 86_400,
            GroupBy::Hour | GroupBy::Day => 0,
        };
        (unix_seconds + offset).div_euclid(self.seconds()) * self.seconds() - offset
    }

    /// How many buckets a range touches.
    pub(crate) fn bucket_count(&self, range: TimeRange) -> i64 {
        let first = self.bucket_start(range.start);
        let last = self.bucket_start(range.end - 1);
        (last - first) / self.seconds() + 1
    }
}

/// What GetEventCount asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFilter {
    /// `None` counts every event name.
    pub event_name: Option<EventName>,
    pub range: TimeRange,
    /// `None` returns one row per event name for the whole range.
    pub group_by: Option<GroupBy>,
    /// The calendar day and week buckets follow (IANA name; UTC by default).
    pub time_zone: chrono_tz::Tz,
}

/// One row of a GetEventCount answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventCount {
    pub event_name: String,
    /// Bucket start in Unix seconds (the range start when ungrouped).
    pub bucket_start: i64,
    pub count: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn week_buckets_start_on_monday() {
        // 2024-01-03 (Wednesday) 12:00 UTC falls in the week of Monday 2024-01-01.
        let wednesday = 1_704_283_200;
        assert_eq!(GroupBy::Week.bucket_start(wednesday), 1_704_067_200);
        assert_eq!(GroupBy::Week.bucket_start(1_704_067_200), 1_704_067_200);
        assert_eq!(GroupBy::Week.bucket_start(1_704_067_199), 1_704_067_200 - 7 * 86_400);
    }

    #[test]
    fn bucket_count_covers_partial_buckets() {
        let range = TimeRange { start: 1_800, end: 3 * 3_600 + 1 };
        assert_eq!(GroupBy::Hour.bucket_count(range), 4);
        let exact = TimeRange { start: 0, end: 86_400 };
        assert_eq!(GroupBy::Hour.bucket_count(exact), 24);
        assert_eq!(GroupBy::Day.bucket_count(exact), 1);
    }
}
