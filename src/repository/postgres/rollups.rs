//! Count queries answered from the rollups (migrations V11 and V13): `event_counts_daily`
//! and `event_counts_hourly` plus the not yet folded `event_count_deltas` for event counts,
//! the user bitmaps of `user_activity_daily` / `user_activity_hourly` plus the not yet
//! folded `user_activity_pending` users for unique users, each pair read in one snapshot.
//! Whole UTC days come from the day rows, whole hours at the edges from the hour rows, and
//! only the partial hours at the very edges of a range (and grouped ranges in zones whose
//! offsets are not whole hours) read the raw `events` rows.

use chrono::{DateTime, Datelike, Offset, TimeZone, Utc};
use roaring::RoaringBitmap;
use sqlx::Row;

use super::events::event_counts_from_rows;
use super::fold::decode_users;
use super::{Database, RepositoryError};
use crate::models::{EventCount, EventFilter, GroupBy, TimeRange};

pub(super) const HOUR_SECONDS: i64 = 3_600;
pub(super) const DAY_SECONDS: i64 = 86_400;

/// How a range splits between the rollups and the raw events:
/// raw rows `[start, rollup_start)`, hour rows `[rollup_start, day_start)`, day rows
/// `[day_start, day_end)`, hour rows `[day_end, rollup_end)`, raw rows `[rollup_end, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeSplit {
    pub start: i64,
    pub rollup_start: i64,
    pub day_start: i64,
    pub day_end: i64,
    pub rollup_end: i64,
    pub end: i64,
}

impl RangeSplit {
    /// The whole hours inside `range` come from the hour rows, no day rows.
    pub fn hours(range: TimeRange) -> Self {
        let rollup_start = ceil_to(range.start(), HOUR_SECONDS).min(range.end());
        let rollup_end = floor_to(range.end(), HOUR_SECONDS).max(rollup_start);
        Self {
            start: range.start(),
            rollup_start,
            day_start: rollup_end,
            day_end: rollup_end,
            rollup_end,
            end: range.end(),
        }
    }

    /// The whole UTC days inside the whole hours come from the day rows, when
    /// `day_fits(day_start)` holds for every one of them (else none do).
    pub fn with_whole_days(self, day_fits: impl Fn(i64) -> bool) -> Self {
        let day_start = ceil_to(self.rollup_start, DAY_SECONDS);
        let day_end = floor_to(self.rollup_end, DAY_SECONDS);
        if day_start >= day_end || !(day_start..day_end).step_by(DAY_SECONDS as usize).all(day_fits) {
            return self;
        }
        Self { day_start, day_end, ..self }
    }

    /// Everything from the raw events (zones whose offsets are not whole hours).
    pub fn raw_only(range: TimeRange) -> Self {
        let end = range.end();
        Self { start: range.start(), rollup_start: end, day_start: end, day_end: end, rollup_end: end, end }
    }

    fn instants(&self) -> [DateTime<Utc>; 6] {
        [self.start, self.rollup_start, self.day_start, self.day_end, self.rollup_end, self.end].map(time)
    }
}

pub(super) fn floor_to(seconds: i64, unit: i64) -> i64 {
    seconds.div_euclid(unit) * unit
}

fn ceil_to(seconds: i64, unit: i64) -> i64 {
    -floor_to(-seconds, unit)
}

fn time(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

/// True when every UTC hour in `range` lies inside one local hour of `zone` (the zone's
/// offset is a whole number of hours throughout), so local buckets are sums of UTC hours.
pub fn hourly_rollup_fits(zone: chrono_tz::Tz, range: TimeRange) -> bool {
    let whole_hours = |seconds: i64| {
        zone.offset_from_utc_datetime(&time(seconds).naive_utc()).fix().local_minus_utc() % 3_600 == 0
    };
    // Offsets change only at transitions; sampling every hour finds any non-whole offset
    // that lasts an hour or more (none of the IANA zones has a shorter one).
    let mut instant = range.start();
    while instant < range.end() {
        if !whole_hours(instant) {
            return false;
        }
        instant += HOUR_SECONDS;
    }
    whole_hours(range.end() - 1)
}

/// Which part of a [`RangeSplit`] a count query reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountPart {
    /// The folded day and hour rows of `[rollup_start, rollup_end)`: what the cache keeps.
    Folded,
    /// What is always read fresh: the deltas not folded yet over `[rollup_start,
    /// rollup_end)` and the raw events of the partial hours at both edges.
    Fresh,
    /// Both.
    Whole,
}

/// The slices of `part` of a [`RangeSplit`] (bound as $1..$6), as `(slice_start,
/// event_name, event_count)`; with `name_filtered`, only the name bound as $7. With
/// `raw_by_hour`, raw rows are cut to their UTC hour (so they join the bucket map).
fn slices_sql(part: CountPart, name_filtered: bool, raw_by_hour: bool) -> String {
    let name = if name_filtered { " AND event_name = $7" } else { "" };
    // Cut to the hour, raw rows are counted per (hour, name) right away: a hash
    // aggregate over a few thousand narrow rows instead of a sort of them.
    let (raw_slice, raw_count, raw_group) = if raw_by_hour {
        ("date_bin('1 hour', timestamp, TIMESTAMPTZ '1970-01-01 00:00:00+00')", "count(*)", " GROUP BY 1, 2")
    } else {
        ("timestamp", "1", "")
    };
    let folded = format!(
        "SELECT bucket_start AS slice_start, event_name, event_count
           FROM event_counts_daily
          WHERE bucket_start >= $3 AND bucket_start < $4{name}
         UNION ALL
         SELECT bucket_start, event_name, event_count
           FROM event_counts_hourly
          WHERE bucket_start >= $2 AND bucket_start < $3{name}
         UNION ALL
         SELECT bucket_start, event_name, event_count
           FROM event_counts_hourly
          WHERE bucket_start >= $4 AND bucket_start < $5{name}"
    );
    let fresh = format!(
        "SELECT bucket_start AS slice_start, event_name, event_count
           FROM event_count_deltas
          WHERE bucket_start >= $2 AND bucket_start < $5{name}
         UNION ALL
         SELECT {raw_slice}, event_name, {raw_count}
           FROM events
          WHERE timestamp >= $1 AND timestamp < $2{name}{raw_group}
         UNION ALL
         SELECT {raw_slice}, event_name, {raw_count}
           FROM events
          WHERE timestamp >= $5 AND timestamp < $6{name}{raw_group}"
    );
    match part {
        CountPart::Folded => folded,
        CountPart::Fresh => fresh,
        CountPart::Whole => format!("{folded}\n UNION ALL\n {fresh}"),
    }
}

/// A version of the rollup part of a range: (rows, sum) over the rows that a change to
/// the part must touch. Equal stamps mean an unchanged part (see V13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RollupStamp {
    pub rows: i64,
    pub sum: i64,
}

/// How one GetEventCount is read: the split of its range and, when grouped, the map from
/// every UTC hour touching the range to its bucket in the caller's zone.
#[derive(Clone, Debug)]
pub struct EventCountPlan {
    pub split: RangeSplit,
    bucket_map: Option<(Vec<DateTime<Utc>>, Vec<i64>)>,
}

impl EventCountPlan {
    pub fn of(filter: &EventFilter) -> Self {
        let range = filter.range;
        let rollup_fits = filter.group_by.is_none() || hourly_rollup_fits(filter.time_zone, range);
        // Grouped: a UTC day comes from its day row only when all its hours fall in one
        // bucket (UTC days and weeks); ungrouped, every whole day does.
        let bucket_map = match filter.group_by {
            Some(group_by) if rollup_fits => Some(hour_bucket_map(group_by, filter.time_zone, range)),
            _ => None,
        };
        let split = match (&bucket_map, rollup_fits) {
            (_, false) => RangeSplit::raw_only(range),
            (None, true) => RangeSplit::hours(range).with_whole_days(|_| true),
            (Some((hours, buckets)), true) => {
                let first_hour = hours.first().map_or(0, DateTime::timestamp);
                RangeSplit::hours(range).with_whole_days(|day_start| {
                    let first = ((day_start - first_hour) / HOUR_SECONDS) as usize;
                    buckets
                        .get(first..first + 24)
                        .is_some_and(|day| day.iter().all(|bucket| *bucket == day[0]))
                })
            }
        };
        Self { split, bucket_map }
    }

    /// Whether any whole hour comes from the rollups.
    pub fn has_rollup_part(&self) -> bool {
        self.split.rollup_start < self.split.rollup_end
    }
}

/// What a cached GetEventCount reads in one snapshot (see
/// [`RollupRepository::event_counts_parts`]).
#[derive(Clone, Debug, Default)]
pub struct EventCountParts {
    /// The folded part's counts, when asked for.
    pub folded: Option<Vec<EventCount>>,
    /// `(rows, events)` of `event_totals_hourly` over the folded part's hours.
    pub stamp: RollupStamp,
    /// The fresh part's counts.
    pub fresh: Vec<EventCount>,
}

/// Adds `more` into `counts`; the result is ordered by bucket, then name.
pub fn merge_event_counts(counts: Vec<EventCount>, more: Vec<EventCount>) -> Vec<EventCount> {
    let mut merged: std::collections::BTreeMap<(i64, String), i64> = std::collections::BTreeMap::new();
    for count in counts.into_iter().chain(more) {
        *merged.entry((count.bucket_start, count.event_name)).or_default() += count.count;
    }
    merged
        .into_iter()
        .map(|((bucket_start, event_name), count)| EventCount { event_name, bucket_start, count })
        .collect()
}

/// For every UTC hour touching `range`, the start (Unix seconds) of its bucket in `zone`.
/// Only valid when [`hourly_rollup_fits`]: each UTC hour then lies in one local bucket.
/// A local day (week) starts at the first UTC hour whose local date (Monday) is that day's.
pub fn hour_bucket_map(
    group_by: GroupBy,
    zone: chrono_tz::Tz,
    range: TimeRange,
) -> (Vec<DateTime<Utc>>, Vec<i64>) {
    let bucket_key = |hour: i64| -> i64 {
        let local_date = zone.from_utc_datetime(&time(hour).naive_utc()).date_naive();
        match group_by {
            GroupBy::Hour => hour,
            GroupBy::Day => i64::from(local_date.num_days_from_ce()),
            GroupBy::Week => {
                i64::from(local_date.num_days_from_ce())
                    - i64::from(local_date.weekday().num_days_from_monday())
            }
        }
    };
    let first_hour = floor_to(range.start(), HOUR_SECONDS);
    let mut hours = Vec::new();
    let mut buckets = Vec::new();
    let mut current: Option<(i64, i64)> = None;
    let mut hour = first_hour;
    while hour < range.end() {
        let key = bucket_key(hour);
        let bucket_start = match current {
            Some((current_key, current_start)) if current_key == key => current_start,
            Some(_) => hour,
            None => {
                // The first bucket may start before the range: walk back to its first hour.
                let mut start = hour;
                while bucket_key(start - HOUR_SECONDS) == key {
                    start -= HOUR_SECONDS;
                }
                start
            }
        };
        current = Some((key, bucket_start));
        hours.push(time(hour));
        buckets.push(bucket_start);
        hour += HOUR_SECONDS;
    }
    (hours, buckets)
}

/// The bucket start (Unix seconds) of `slice_start` in zone `$8`. Hours are cut at the
/// local hour so a repeated local hour (DST end) stays two buckets; days and weeks use
/// PostgreSQL's zone-aware `date_trunc` (weeks start on Monday).
fn bucket_sql(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Hour => {
            "EXTRACT(EPOCH FROM slice_start - ((slice_start AT TIME ZONE $8) - date_trunc('hour', slice_start AT TIME ZONE $8)))::bigint"
        }
        GroupBy::Day => "EXTRACT(EPOCH FROM date_trunc('day', slice_start, $8))::bigint",
        GroupBy::Week => "EXTRACT(EPOCH FROM date_trunc('week', slice_start, $8))::bigint",
    }
}

fn event_counts_sql(filter: &EventFilter, plan: &EventCountPlan, part: CountPart) -> String {
    let slices = |raw_by_hour| slices_sql(part, filter.event_name.is_some(), raw_by_hour);
    match (filter.group_by, &plan.bucket_map) {
        (Some(_), Some(_)) => format!(
            "SELECT slices.event_name, map.bucket, sum(slices.event_count)::bigint AS count
               FROM ({}) slices
               JOIN unnest($8::timestamptz[], $9::int8[]) AS map(hour_start, bucket)
                 ON map.hour_start = slices.slice_start
              GROUP BY 1, 2",
            slices(true)
        ),
        (Some(group_by), None) => format!(
            "SELECT event_name, {} AS bucket, sum(event_count)::bigint AS count
               FROM ({}) slices
              GROUP BY 1, 2",
            bucket_sql(group_by),
            slices(false)
        ),
        (None, _) => format!(
            "SELECT event_name, sum(event_count)::bigint AS count
               FROM ({}) slices
              GROUP BY 1",
            slices(false)
        ),
    }
}

/// Binds the split's instants ($1..$6), the name ($7, NULL when unfiltered), then the
/// bucket map ($8, $9) or the zone ($8) when grouped.
fn bind_event_counts<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    filter: &'q EventFilter,
    plan: &'q EventCountPlan,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for instant in plan.split.instants() {
        query = query.bind(instant);
    }
    query = query.bind(filter.event_name.as_ref().map(|name| name.as_str()));
    if let Some((hours, buckets)) = &plan.bucket_map {
        query = query.bind(hours).bind(buckets);
    } else if filter.group_by.is_some() {
        query = query.bind(filter.time_zone.name());
    }
    query
}

/// Reads counts and unique users from the rollups.
#[derive(Clone, Debug)]
pub struct RollupRepository {
    database: Database,
}

impl RollupRepository {
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    /// Counts per event name (per bucket of the filter's zone when grouped), ordered by
    /// bucket then name: the same answer as grouping the raw events.
    pub async fn event_counts(&self, filter: &EventFilter) -> Result<Vec<EventCount>, RepositoryError> {
        let plan = EventCountPlan::of(filter);
        let sql = event_counts_sql(filter, &plan, CountPart::Whole);
        self.database
            .with_retry("count_events_rollup", || async {
                let rows = bind_event_counts(sqlx::query(&sql), filter, &plan)
                    .fetch_all(self.database.pool())
                    .await?;
                let mut counts =
                    event_counts_from_rows(&rows, filter.group_by.is_some(), filter.range.start())?;
                // Ordered here, not in SQL: PostgreSQL then groups by hashing, and the order
                // is the same bytewise one `merge_event_counts` gives, whatever the collation.
                counts.sort_unstable_by(|a, b| {
                    (a.bucket_start, &a.event_name).cmp(&(b.bucket_start, &b.event_name))
                });
                Ok(counts)
            })
            .await
    }

    /// Reads, in one statement (so one snapshot), the stamp of the folded part of the plan
    /// (and, with `with_folded`, its counts) and the fresh part's counts.
    pub async fn event_counts_parts(
        &self,
        filter: &EventFilter,
        plan: &EventCountPlan,
        with_folded: bool,
    ) -> Result<EventCountParts, RepositoryError> {
        let grouped = filter.group_by.is_some();
        let bucket = if grouped { "counts.bucket" } else { "0::bigint" };
        let part = |number: u8, part: CountPart| {
            format!(
                "SELECT {number} AS part, counts.event_name::text AS event_name, {bucket} AS bucket, counts.count
                   FROM ({}) counts",
                event_counts_sql(filter, plan, part)
            )
        };
        let mut sql = format!(
            "SELECT 0 AS part, NULL::text AS event_name, count(*)::bigint AS bucket,
                    coalesce(sum(event_count), 0)::bigint AS count
               FROM event_totals_hourly WHERE bucket_start >= $2 AND bucket_start < $5
             UNION ALL {}",
            part(2, CountPart::Fresh)
        );
        if with_folded {
            sql.push_str(&format!(" UNION ALL {}", part(1, CountPart::Folded)));
        }
        let range_start = filter.range.start();
        self.database
            .with_retry("count_events_rollup", || async {
                let rows: Vec<(i32, Option<String>, i64, i64)> =
                    bind_event_counts(sqlx::query(&sql), filter, plan)
                        .fetch_all(self.database.pool())
                        .await?
                        .iter()
                        .map(|row| {
                            Ok((
                                row.try_get("part")?,
                                row.try_get("event_name")?,
                                row.try_get("bucket")?,
                                row.try_get("count")?,
                            ))
                        })
                        .collect::<Result<_, sqlx::Error>>()?;
                let mut parts =
                    EventCountParts { folded: with_folded.then(Vec::new), ..EventCountParts::default() };
                for (part, event_name, bucket, count) in rows {
                    let count = || EventCount {
                        event_name: event_name.clone().unwrap_or_default(),
                        bucket_start: if grouped { bucket } else { range_start },
                        count,
                    };
                    match part {
                        0 => parts.stamp = RollupStamp { rows: bucket, sum: count().count },
                        1 => parts.folded.iter_mut().for_each(|folded| folded.push(count())),
                        _ => parts.fresh.push(count()),
                    }
                }
                Ok(parts)
            })
            .await
    }

    /// Exact distinct non-empty user ids with an event in the range.
    pub async fn unique_users(&self, range: TimeRange) -> Result<i64, RepositoryError> {
        let parts = self.user_count_parts(user_count_split(range), true).await?;
        Ok(parts.count(parts.folded.as_ref().unwrap_or(&RoaringBitmap::new())))
    }

    /// Reads, in one snapshot, the stamp of the folded bitmaps of the whole UTC days and
    /// hours of `split` (and, `with_bitmaps`, their union), the ordinals of the users not
    /// folded yet: the pending pairs of those hours and the raw events of the partial
    /// hours at the edges.
    pub async fn user_count_parts(
        &self,
        split: RangeSplit,
        with_bitmaps: bool,
    ) -> Result<UserCountParts, RepositoryError> {
        let [start, rollup_start, day_start, day_end, rollup_end, end] = split.instants();
        let users_column = if with_bitmaps { "users" } else { "NULL::bytea" };
        let bitmaps_sql = format!(
            "SELECT {users_column} AS users, version FROM user_activity_daily
              WHERE bucket_start >= $2 AND bucket_start < $3
             UNION ALL
             SELECT {users_column}, version FROM user_activity_hourly
              WHERE bucket_start >= $1 AND bucket_start < $2
             UNION ALL
             SELECT {users_column}, version FROM user_activity_hourly
              WHERE bucket_start >= $3 AND bucket_start < $4"
        );
        self.database
            .with_retry("count_unique_users_rollup", || async {
                let mut transaction = self.database.pool().begin().await?;
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *transaction)
                    .await?;
                let bitmaps: Vec<(Option<Vec<u8>>, i64)> = sqlx::query_as(&bitmaps_sql)
                    .bind(rollup_start)
                    .bind(day_start)
                    .bind(day_end)
                    .bind(rollup_end)
                    .fetch_all(&mut *transaction)
                    .await?;
                // An id without an ordinal has never been folded, so it is in no bitmap.
                let unfolded: Vec<Option<i32>> = sqlx::query_scalar(
                    "SELECT ordinals.ordinal FROM (
                        SELECT unnest(user_ids) AS user_id FROM user_activity_pending
                         WHERE hour_start >= $2 AND hour_start < $3
                        UNION
                        SELECT user_id FROM events
                         WHERE timestamp >= $1 AND timestamp < $2 AND user_id IS NOT NULL AND user_id <> ''
                        UNION
                        SELECT user_id FROM events
                         WHERE timestamp >= $3 AND timestamp < $4 AND user_id IS NOT NULL AND user_id <> ''
                     ) unfolded
                     LEFT JOIN user_ordinals ordinals ON ordinals.user_id = unfolded.user_id",
                )
                .bind(start)
                .bind(rollup_start)
                .bind(rollup_end)
                .bind(end)
                .fetch_all(&mut *transaction)
                .await?;
                transaction.commit().await?;
                let stamp = RollupStamp {
                    rows: bitmaps.len() as i64,
                    sum: bitmaps.iter().map(|(_, version)| version).sum(),
                };
                let folded = if with_bitmaps {
                    let mut users = RoaringBitmap::new();
                    for bytes in bitmaps.iter().filter_map(|(users, _)| users.as_ref()) {
                        users |= decode_users(bytes)?;
                    }
                    Some(users)
                } else {
                    None
                };
                let never_folded = unfolded.iter().filter(|ordinal| ordinal.is_none()).count() as u64;
                let unfolded_ordinals =
                    unfolded.into_iter().flatten().map(|ordinal| ordinal as u32).collect();
                Ok(UserCountParts { folded, stamp, unfolded_ordinals, never_folded })
            })
            .await
    }
}

/// How a unique-user count splits its range: every whole UTC day from the day bitmaps.
pub fn user_count_split(range: TimeRange) -> RangeSplit {
    RangeSplit::hours(range).with_whole_days(|_| true)
}

/// What a unique-user count reads in one snapshot (see [`RollupRepository::user_count_parts`]).
#[derive(Clone, Debug, Default)]
pub struct UserCountParts {
    /// The union of the folded bitmaps, when asked for.
    pub folded: Option<RoaringBitmap>,
    /// (rows, sum of versions) of those bitmaps.
    pub stamp: RollupStamp,
    /// Ordinals of users in the pending pairs and the raw edges.
    pub unfolded_ordinals: Vec<u32>,
    /// Users in the pending pairs and the raw edges that have no ordinal yet.
    pub never_folded: u64,
}

impl UserCountParts {
    /// The exact count, given the union of the folded bitmaps (read now or cached with an
    /// equal stamp).
    pub fn count(&self, folded: &RoaringBitmap) -> i64 {
        let mut users = folded.clone();
        users.extend(self.unfolded_ordinals.iter().copied());
        (users.len() + self.never_folded) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: i64, end: i64) -> TimeRange {
        TimeRange { start, end }
    }

    #[test]
    fn a_range_splits_into_raw_edges_and_whole_hours() {
        let split = RangeSplit::hours(range(1_800, 3 * HOUR_SECONDS + 60));
        let expected = RangeSplit {
            start: 1_800,
            rollup_start: 3_600,
            day_start: 10_800,
            day_end: 10_800,
            rollup_end: 10_800,
            end: 10_860,
        };
        assert_eq!(split, expected);
        let inside_one_hour = RangeSplit::hours(range(100, 200));
        assert_eq!((inside_one_hour.rollup_start, inside_one_hour.rollup_end), (200, 200));
    }

    #[test]
    fn whole_days_come_from_the_day_rows_when_every_day_fits() {
        // 2024-01-30 22:30 UTC to 2024-02-02 01:15 UTC: Jan 31 and Feb 1 are whole days.
        let span = range(1_706_653_800, 1_706_836_500);
        let split = RangeSplit::hours(span).with_whole_days(|_| true);
        assert_eq!(split.rollup_start, 1_706_655_600);
        assert_eq!((split.day_start, split.day_end), (1_706_659_200, 1_706_832_000));
        assert_eq!(split.rollup_end, 1_706_835_600);
        // One day that does not fit a bucket: hours only.
        let refused = RangeSplit::hours(span).with_whole_days(|day| day != 1_706_745_600);
        assert_eq!(refused, RangeSplit::hours(span));
        // Less than a whole day: hours only.
        let short = range(1_706_653_800, 1_706_653_800 + DAY_SECONDS);
        assert_eq!(RangeSplit::hours(short).with_whole_days(|_| true), RangeSplit::hours(short));
    }

    #[test]
    fn berlin_days_map_to_local_midnights_across_dst() {
        // 2026-03-28 00:00+01:00 .. 2026-03-31 00:00+02:00; March 29 has 23 hours.
        let march_28 = 1_774_652_400;
        let (hours, buckets) = hour_bucket_map(
            GroupBy::Day,
            chrono_tz::Europe::Berlin,
            range(march_28 + 5 * HOUR_SECONDS, march_28 + 3 * DAY_SECONDS - HOUR_SECONDS),
        );
        assert_eq!(hours.len(), 3 * 24 - 1 - 5);
        let mut starts = buckets.clone();
        starts.dedup();
        assert_eq!(starts, vec![march_28, march_28 + DAY_SECONDS, march_28 + 2 * DAY_SECONDS - HOUR_SECONDS]);
        assert_eq!(buckets.iter().filter(|start| **start == march_28 + DAY_SECONDS).count(), 23);
    }

    #[test]
    fn zones_with_half_hour_offsets_do_not_fit_the_hourly_rollup() {
        let week = range(1_704_067_200, 1_704_067_200 + 7 * DAY_SECONDS);
        assert!(hourly_rollup_fits(chrono_tz::Europe::Berlin, week));
        assert!(hourly_rollup_fits(chrono_tz::UTC, week));
        assert!(!hourly_rollup_fits(chrono_tz::Asia::Kolkata, week));
        assert!(!hourly_rollup_fits(chrono_tz::Asia::Kathmandu, week));
    }
}
