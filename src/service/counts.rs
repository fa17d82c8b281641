//! GetEventCount and GetUserCount: answers from the rollups, and the cache policy that
//! keeps them never stale.
//!
//! A bucket is closed once it ends more than EVENT_MAX_AGE_DAYS ago: TrackEvent rejects
//! older timestamps, so no event can land there any more (EVENT_MAX_AGE_DAYS is the
//! late-event window). An answer whose range is closed is immutable and is cached without
//! expiry; any answer touching an open bucket is computed fresh from the rollups and not
//! cached, so a late event is visible on the very next call. Ranges a retention drop may
//! still shorten are treated as open too.

use chrono::{DateTime, Utc};

use super::{AnalyticsService, ServiceError};
use crate::metrics;
use crate::models::{EventCount, EventFilter, TimeRange};
use crate::repository::postgres::rollups::RollupRepository;

/// Margin kept before the retention cut-off: partitions are whole months, so data up
/// to a month newer than `now - EVENT_RETENTION_DAYS` may be dropped next.
const RETENTION_MARGIN: chrono::Duration = chrono::Duration::days(32);

/// Whether an answer may be cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CachePolicy {
    /// Every bucket is closed: cache without expiry.
    Immutable,
    /// Some bucket is open (or may be dropped by retention): compute fresh.
    Fresh,
}

/// The policy for `range` at `now`.
pub(crate) fn cache_policy(
    range: TimeRange,
    now: DateTime<Utc>,
    event_max_age: chrono::Duration,
    event_retention: Option<chrono::Duration>,
) -> CachePolicy {
    let closed_before = (now - event_max_age).timestamp();
    if range.end() > closed_before {
        return CachePolicy::Fresh;
    }
    if let Some(retention) = event_retention {
        let may_be_dropped_before = (now - retention + RETENTION_MARGIN).timestamp();
        if range.start() < may_be_dropped_before {
            return CachePolicy::Fresh;
        }
    }
    CachePolicy::Immutable
}

impl AnalyticsService {
    fn cache_policy(&self, range: TimeRange) -> CachePolicy {
        cache_policy(range, Utc::now(), self.event_max_age, self.event_retention)
    }

    /// Event counts per name (per bucket of the caller's time zone when grouped).
    #[tracing::instrument(skip_all)]
    pub async fn event_counts(&self, filter: EventFilter) -> Result<Vec<EventCount>, ServiceError> {
        if let Some(group_by) = filter.group_by {
            group_by.check_bucket_count(filter.range)?;
        }
        let rollups = RollupRepository::new(self.database.clone());
        if self.cache_policy(filter.range) == CachePolicy::Fresh || !self.cache.is_enabled() {
            if self.cache.is_enabled() {
                metrics::record_cache_fresh("event_count");
            }
            return Ok(rollups.event_counts(&filter).await?);
        }
        let key = event_count_cache_key(&filter);
        if let Some(cached) = self.cache.get::<Vec<EventCount>>(&key).await {
            metrics::record_cache_lookup("event_count", true);
            return Ok(cached);
        }
        metrics::record_cache_lookup("event_count", false);
        let counts = rollups.event_counts(&filter).await?;
        self.cache.set_without_expiry(&key, &counts).await;
        Ok(counts)
    }

    /// Exact distinct identified users with events in the range.
    #[tracing::instrument(skip_all)]
    pub async fn unique_users(&self, range: TimeRange) -> Result<i64, ServiceError> {
        let rollups = RollupRepository::new(self.database.clone());
        if self.cache_policy(range) == CachePolicy::Fresh || !self.cache.is_enabled() {
            if self.cache.is_enabled() {
                metrics::record_cache_fresh("user_count");
            }
            return Ok(rollups.unique_users(range).await?);
        }
        let key = format!("user_count:v2:{}:{}", range.start(), range.end());
        if let Some(cached) = self.cache.get::<i64>(&key).await {
            metrics::record_cache_lookup("user_count", true);
            return Ok(cached);
        }
        metrics::record_cache_lookup("user_count", false);
        let count = rollups.unique_users(range).await?;
        self.cache.set_without_expiry(&key, &count).await;
        Ok(count)
    }
}

/// A key naming every field of the request; the name goes last, length-prefixed, so
/// no two requests share a key whatever characters the name holds.
fn event_count_cache_key(filter: &EventFilter) -> String {
    let group = filter.group_by.map_or("total", |group_by| group_by.as_str());
    let name = filter.event_name.as_ref().map_or("", |name| name.as_str());
    let scope = if filter.event_name.is_some() { "one" } else { "all" };
    format!(
        "event_count:v2:{}:{}:{group}:{}:{scope}:{}:{name}",
        filter.range.start(),
        filter.range.end(),
        filter.time_zone.name(),
        name.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ranges_older_than_the_late_event_window_are_immutable() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let max_age = chrono::Duration::days(30);
        let window_start = (now - max_age).timestamp();
        let closed = TimeRange { start: window_start - 86_400, end: window_start };
        let open = TimeRange { start: window_start - 86_400, end: window_start + 1 };
        assert_eq!(cache_policy(closed, now, max_age, None), CachePolicy::Immutable);
        assert_eq!(cache_policy(open, now, max_age, None), CachePolicy::Fresh);
        let retention = Some(chrono::Duration::days(60));
        let near_retention =
            TimeRange { start: (now - chrono::Duration::days(40)).timestamp(), end: window_start };
        assert_eq!(cache_policy(near_retention, now, max_age, retention), CachePolicy::Fresh);
        let retention = Some(chrono::Duration::days(400));
        assert_eq!(cache_policy(near_retention, now, max_age, retention), CachePolicy::Immutable);
    }
}
