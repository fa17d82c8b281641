//! GetEventCount and GetUserCount: answers from the rollups, and the cache that keeps
//! them never stale. `plan` decides what each answer reads (`time` finds the bucket
//! boundaries of the caller's zone); `routing` picks the server a call reads (the read
//! replica when it proves it holds every acknowledged write, else the primary); the
//! repository runs the plans.
//!
//! An answer splits into a folded part (the rollups of its whole UTC hours) and a fresh
//! part (what the fold has not moved into those rollups yet, and the raw events of the
//! partial hours at its edges, the open hour among them). The folded part is cached in
//! Redis for REDIS_CACHE_TTL together with a stamp of the rows it was read from
//! ([`RollupStamp`]), keyed by its whole hours, so a dashboard whose end time slides
//! reuses it for up to an hour. Every call reads the current stamp and the fresh part in
//! one snapshot, and uses the cached part only when the stamps are equal: a late event is
//! in the fresh part until the fold moves it into the rollups, and that fold changes the
//! stamp, so every answer includes it.
//!
//! A range that ended more than EVENT_MAX_AGE_DAYS plus [`COMMIT_MARGIN`] ago is closed
//! for good: TrackEvent rejects timestamps older than EVENT_MAX_AGE_DAYS (the late-event
//! window), and an event accepted at the window's edge commits within the margin (a call
//! ends within REQUEST_TIMEOUT_SECONDS and its commit within the commit bound), so such an
//! answer is immutable and cached whole, without a stamp, for [`IMMUTABLE_CACHE_TTL`].
//! Ranges a retention drop may still shorten are not treated as closed.
//!
//! Erasure (DeleteUser) changes the past: every erasure batch bumps the erasure
//! generation, which every stamp includes and every immutable answer is cached with, so
//! no answer cached before an erasure is used after it. The immutable path reads the
//! generation alongside its Redis lookup.

pub mod plan;
mod routing;
mod time;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};

use super::{repository_failure, AnalyticsService, ServiceError};
use crate::metrics;
use crate::models::user_bitmap::{decode_users, encode_users};
use crate::models::{EventCount, EventCountPlan, EventFilter, RangeSplit, RollupStamp, TimeRange};
use crate::repository::postgres::rollups::RollupRepository;
use plan::{merge_event_counts, sort_event_counts, user_count_split};

/// Margin kept before the retention cut-off: partitions are whole months, so data up
/// to a month newer than `now - EVENT_RETENTION_DAYS` may be dropped next.
const RETENTION_MARGIN: chrono::Duration = chrono::Duration::days(32);

/// How long after the late-event window a range stays open: longer than any event
/// accepted inside the window can take to commit (the call's REQUEST_TIMEOUT_SECONDS and
/// the commit's own bound, plus clock skew between replicas), so no write can land in a
/// range after it was judged closed.
pub(crate) const COMMIT_MARGIN: chrono::Duration = chrono::Duration::hours(1);

/// Lifetime of an immutable answer in Redis: every key the service writes expires, so
/// distinct old ranges cannot grow Redis without bound. Shorter than [`RETENTION_MARGIN`],
/// so an entry expires before retention can drop the rows it counted.
pub(crate) const IMMUTABLE_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// Whether an answer may be cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CachePolicy {
    /// Every bucket is closed: cache whole for [`IMMUTABLE_CACHE_TTL`].
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
    let closed_before = (now - event_max_age - COMMIT_MARGIN).timestamp();
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

    /// Event counts per name (per bucket of the caller's time zone when grouped), read
    /// through `rollups` (see `routing`).
    async fn event_counts_from(
        &self,
        rollups: &RollupRepository,
        filter: EventFilter,
    ) -> Result<Vec<EventCount>, ServiceError> {
        if !self.cache.is_enabled() {
            return uncached_event_counts(rollups, &filter).await;
        }
        if self.cache_policy(filter.range) == CachePolicy::Immutable {
            let key =
                event_count_cache_key("event_count:v3", filter.range.start(), filter.range.end(), &filter);
            let (generation, cached) = tokio::join!(
                rollups.erasure_generation(),
                self.cache.get::<ErasureStamped<Vec<EventCount>>>(&key)
            );
            let generation = generation.map_err(repository_failure)?;
            if let Some(cached) = cached.filter(|cached| cached.erasures == generation) {
                metrics::record_cache_lookup("event_count", true);
                return Ok(cached.value);
            }
            metrics::record_cache_lookup("event_count", false);
            let counts = uncached_event_counts(rollups, &filter).await?;
            let entry = ErasureStamped { erasures: generation, value: counts };
            self.cache.set(&key, &entry, Some(IMMUTABLE_CACHE_TTL)).await;
            return Ok(entry.value);
        }
        // The folded part (whole hours) is cached with its stamp and reused while the
        // stamp is unchanged; deltas not folded yet and the edges are always read fresh,
        // in the same snapshot as the stamp. The key depends on the range only, so the
        // cache lookup runs alongside the extent read the plan needs.
        let split = RangeSplit::hours(filter.range);
        let key = event_count_cache_key("event_count:v5", split.rollup_start, split.rollup_end, &filter);
        let (plan, cached) = if split.has_rollup_part() {
            tokio::join!(event_count_plan(rollups, &filter), self.cache.get::<StampedEventCounts>(&key))
        } else {
            (event_count_plan(rollups, &filter).await, None)
        };
        let plan = plan?;
        debug_assert_eq!(plan.split, split);
        if !plan.has_rollup_part() {
            metrics::record_cache_fresh("event_count");
            return rollups.event_counts(&filter, &plan).await.map_err(repository_failure);
        }
        let mut parts =
            rollups.event_counts_parts(&filter, &plan, cached.is_none()).await.map_err(repository_failure)?;
        let folded = match cached {
            Some(cached) if cached.stamp == parts.stamp => cached.counts(),
            Some(_) => {
                parts = rollups.event_counts_parts(&filter, &plan, true).await.map_err(repository_failure)?;
                None
            }
            None => None,
        };
        if folded.is_none() && parts.folded.is_none() {
            // A cached entry whose rows do not decode: read the folded part now.
            parts = rollups.event_counts_parts(&filter, &plan, true).await.map_err(repository_failure)?;
        }
        metrics::record_cache_lookup("event_count", folded.is_some());
        let mut folded = match folded {
            Some(counts) => counts,
            None => {
                // Cached in answer order, so a hit's merge finds them sorted.
                let mut counts = parts.folded.take().unwrap_or_default();
                sort_event_counts(&mut counts);
                self.cache.set(&key, &StampedEventCounts::new(parts.stamp, &counts), None).await;
                counts
            }
        };
        if filter.group_by.is_none() {
            // Ungrouped rows carry the range start, which slides within the cached hours.
            folded.iter_mut().for_each(|count| count.bucket_start = filter.range.start());
        }
        Ok(merge_event_counts(folded, parts.fresh))
    }

    /// Exact distinct identified users with events in the range, read through `rollups`
    /// (see `routing`).
    async fn unique_users_from(
        &self,
        rollups: &RollupRepository,
        range: TimeRange,
    ) -> Result<i64, ServiceError> {
        let split = user_count_split(range);
        if !self.cache.is_enabled() {
            return rollups.unique_users(split).await.map_err(repository_failure);
        }
        if self.cache_policy(range) == CachePolicy::Immutable {
            let key = format!("user_count:v4:{}:{}", range.start(), range.end());
            let (generation, cached) =
                tokio::join!(rollups.erasure_generation(), self.cache.get::<ErasureStamped<i64>>(&key));
            let generation = generation.map_err(repository_failure)?;
            if let Some(cached) = cached.filter(|cached| cached.erasures == generation) {
                metrics::record_cache_lookup("user_count", true);
                return Ok(cached.value);
            }
            metrics::record_cache_lookup("user_count", false);
            let count = rollups.unique_users(split).await.map_err(repository_failure)?;
            let entry = ErasureStamped { erasures: generation, value: count };
            self.cache.set(&key, &entry, Some(IMMUTABLE_CACHE_TTL)).await;
            return Ok(count);
        }
        if !split.has_rollup_part() {
            metrics::record_cache_fresh("user_count");
            return rollups.unique_users(split).await.map_err(repository_failure);
        }
        // The union of the folded bitmaps is cached with their stamp; the users not folded
        // yet are read fresh, in the same snapshot as the stamp they are checked against.
        let key = format!("user_count:v5:{}:{}", split.rollup_start, split.rollup_end);
        let cached = self.cache.get::<StampedUsers>(&key).await;
        if let Some(cached) = cached {
            let parts = rollups.user_count_parts(split, false).await.map_err(repository_failure)?;
            if parts.stamp == cached.stamp {
                if let Some(folded) = cached.users() {
                    metrics::record_cache_lookup("user_count", true);
                    return Ok(parts.count(&folded));
                }
            }
        }
        metrics::record_cache_lookup("user_count", false);
        let parts = rollups.user_count_parts(split, true).await.map_err(repository_failure)?;
        let folded = parts.folded.clone().unwrap_or_default();
        self.cache.set(&key, &StampedUsers::new(parts.stamp, &folded), None).await;
        Ok(parts.count(&folded))
    }
}

/// The plan for `filter`, walked only over the hours that hold events (the first and last
/// event timestamps, one index probe per partition). An event committed after this read is
/// concurrent with the call; later calls plan around it.
async fn event_count_plan(
    rollups: &RollupRepository,
    filter: &EventFilter,
) -> Result<EventCountPlan, ServiceError> {
    let extent = rollups.event_extent().await.map_err(repository_failure)?;
    Ok(EventCountPlan::within(filter, extent))
}

/// Event counts read whole from the rollups and the raw events, without the cache.
async fn uncached_event_counts(
    rollups: &RollupRepository,
    filter: &EventFilter,
) -> Result<Vec<EventCount>, ServiceError> {
    let plan = event_count_plan(rollups, filter).await?;
    rollups.event_counts(filter, &plan).await.map_err(repository_failure)
}

/// An immutable answer as cached: valid while the erasure generation is unchanged.
#[derive(serde::Serialize, serde::Deserialize)]
struct ErasureStamped<T> {
    erasures: i64,
    value: T,
}

/// The cached rollup part of a GetEventCount answer, in a compact form: each name once,
/// and each count as three integers (name index, bucket start, count). A cached answer
/// holds up to a few thousand counts, and a cache hit parses all of them.
#[derive(serde::Serialize, serde::Deserialize)]
struct StampedEventCounts {
    stamp: RollupStamp,
    names: Vec<String>,
    rows: Vec<i64>,
}

impl StampedEventCounts {
    fn new(stamp: RollupStamp, counts: &[EventCount]) -> Self {
        let mut names: Vec<String> = Vec::new();
        let mut rows = Vec::with_capacity(counts.len() * 3);
        for count in counts {
            // Counts come grouped by bucket with the names in the same order, so the name
            // is nearly always among the last few seen; a linear search stays short.
            let index = match names.iter().rposition(|name| *name == count.event_name) {
                Some(index) => index,
                None => {
                    names.push(count.event_name.clone());
                    names.len() - 1
                }
            };
            rows.extend([index as i64, count.bucket_start, count.count]);
        }
        Self { stamp, names, rows }
    }

    /// The counts, `None` when the rows do not decode.
    fn counts(&self) -> Option<Vec<EventCount>> {
        if self.rows.len() % 3 != 0 {
            return None;
        }
        self.rows
            .chunks_exact(3)
            .map(|row| {
                let name = self.names.get(usize::try_from(row[0]).ok()?)?;
                Some(EventCount { event_name: name.clone(), bucket_start: row[1], count: row[2] })
            })
            .collect()
    }
}

/// The cached union of the folded user bitmaps of a range (base64 of the stored form).
#[derive(serde::Serialize, serde::Deserialize)]
struct StampedUsers {
    stamp: RollupStamp,
    users: String,
}

impl StampedUsers {
    fn new(stamp: RollupStamp, users: &roaring::RoaringBitmap) -> Self {
        Self { stamp, users: BASE64.encode(encode_users(users)) }
    }

    fn users(&self) -> Option<roaring::RoaringBitmap> {
        BASE64.decode(&self.users).ok().and_then(|bytes| decode_users(&bytes).ok())
    }
}

/// A key naming every field of the request; the name goes last, length-prefixed, so
/// no two requests share a key whatever characters the name holds.
fn event_count_cache_key(version: &str, start: i64, end: i64, filter: &EventFilter) -> String {
    let group = filter.group_by.map_or("total", |group_by| group_by.as_str());
    let name = filter.event_name.as_ref().map_or("", |name| name.as_str());
    let scope = if filter.event_name.is_some() { "one" } else { "all" };
    format!("{version}:{start}:{end}:{group}:{}:{scope}:{}:{name}", filter.time_zone.name(), name.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_event_counts_survive_their_compact_form() {
        let count = |name: &str, bucket_start, count| EventCount {
            event_name: name.to_string(),
            bucket_start,
            count,
        };
        let counts =
            vec![count("b", 0, 3), count("a", 0, 1), count("b", 3_600, 7), count("a\u{0}:", 3_600, 2)];
        let stamp = RollupStamp { rows: 2, sum: 13, erasures: 1 };
        let stored = serde_json::to_vec(&StampedEventCounts::new(stamp, &counts)).unwrap();
        let cached: StampedEventCounts = serde_json::from_slice(&stored).unwrap();
        assert_eq!(cached.stamp, stamp);
        assert_eq!(cached.counts(), Some(counts));
        let broken = StampedEventCounts { stamp, names: vec!["a".to_string()], rows: vec![1, 0, 5] };
        assert_eq!(broken.counts(), None);
        let short = StampedEventCounts { stamp, names: vec!["a".to_string()], rows: vec![0, 0] };
        assert_eq!(short.counts(), None);
    }

    #[test]
    fn only_ranges_older_than_the_late_event_window_and_the_commit_margin_are_immutable() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let max_age = chrono::Duration::days(30);
        let window_start = (now - max_age).timestamp();
        let closed_before = window_start - COMMIT_MARGIN.num_seconds();
        let closed = TimeRange { start: closed_before - 86_400, end: closed_before };
        let open = TimeRange { start: closed_before - 86_400, end: closed_before + 1 };
        // An event accepted at the window's edge may still be committing.
        let edge = TimeRange { start: window_start - 86_400, end: window_start };
        assert_eq!(cache_policy(closed, now, max_age, None), CachePolicy::Immutable);
        assert_eq!(cache_policy(open, now, max_age, None), CachePolicy::Fresh);
        assert_eq!(cache_policy(edge, now, max_age, None), CachePolicy::Fresh);
        let retention = Some(chrono::Duration::days(60));
        let near_retention =
            TimeRange { start: (now - chrono::Duration::days(40)).timestamp(), end: closed_before };
        assert_eq!(cache_policy(near_retention, now, max_age, retention), CachePolicy::Fresh);
        let retention = Some(chrono::Duration::days(400));
        assert_eq!(cache_policy(near_retention, now, max_age, retention), CachePolicy::Immutable);
        assert!(IMMUTABLE_CACHE_TTL.as_secs() < RETENTION_MARGIN.num_seconds() as u64);
    }
}
