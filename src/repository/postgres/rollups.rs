//! Count queries answered from the rollup tables that the `events` insert trigger keeps
//! (migration V11): `event_counts_hourly` and `user_activity_monthly`. Only the partial
//! hours at the edges of a range (and grouped ranges in zones whose offsets are not whole
//! hours) read the raw `events` rows.

use chrono::{DateTime, Datelike, NaiveDate, Offset, TimeZone, Utc};

use super::events::event_counts_from_rows;
use super::{Database, RepositoryError};
use crate::models::{EventCount, EventFilter, GroupBy, TimeRange};

const HOUR_SECONDS: i64 = 3_600;
const DAY_SECONDS: i64 = 86_400;

/// How a range splits between the hourly rollup and the raw events: raw rows for
/// `[start, rollup_start)` and `[rollup_end, end)`, whole hours `[rollup_start, rollup_end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HourSplit {
    pub start: i64,
    pub rollup_start: i64,
    pub rollup_end: i64,
    pub end: i64,
}

impl HourSplit {
    /// The whole hours inside `range` come from the rollup.
    pub fn of(range: TimeRange) -> Self {
        let rollup_start = ceil_to(range.start(), HOUR_SECONDS).min(range.end());
        let rollup_end = floor_to(range.end(), HOUR_SECONDS).max(rollup_start);
        Self { start: range.start(), rollup_start, rollup_end, end: range.end() }
    }

    /// Everything from the raw events (zones whose offsets are not whole hours).
    pub fn raw_only(range: TimeRange) -> Self {
        Self { start: range.start(), rollup_start: range.end(), rollup_end: range.end(), end: range.end() }
    }
}

fn floor_to(seconds: i64, unit: i64) -> i64 {
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

/// Union of the hourly rollup and the raw edges, as `(slice_start, event_name, event_count)`.
/// `name_parameter` is the placeholder number of the event name, when filtered by name.
/// With `raw_by_hour`, raw rows are cut to their UTC hour (so they join the bucket map).
fn slices_sql(name_parameter: Option<usize>, raw_by_hour: bool) -> String {
    let name = name_parameter.map(|number| format!(" AND event_name = ${number}")).unwrap_or_default();
    let raw_slice = if raw_by_hour {
        "date_bin('1 hour', timestamp, TIMESTAMPTZ '1970-01-01 00:00:00+00')"
    } else {
        "timestamp"
    };
    format!(
        "SELECT bucket_start AS slice_start, event_name, event_count
           FROM event_counts_hourly
          WHERE bucket_start >= $3 AND bucket_start < $4{name}
         UNION ALL
         SELECT {raw_slice}, event_name, 1
           FROM events
          WHERE timestamp >= $1 AND timestamp < $3{name}
         UNION ALL
         SELECT {raw_slice}, event_name, 1
           FROM events
          WHERE timestamp >= $4 AND timestamp < $2{name}"
    )
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

/// The bucket start (Unix seconds) of `slice_start` in zone `$5`. Hours are cut at the
/// local hour so a repeated local hour (DST end) stays two buckets; days and weeks use
/// PostgreSQL's zone-aware `date_trunc` (weeks start on Monday).
fn bucket_sql(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Hour => {
            "EXTRACT(EPOCH FROM slice_start - ((slice_start AT TIME ZONE $5) - date_trunc('hour', slice_start AT TIME ZONE $5)))::bigint"
        }
        GroupBy::Day => "EXTRACT(EPOCH FROM date_trunc('day', slice_start, $5))::bigint",
        GroupBy::Week => "EXTRACT(EPOCH FROM date_trunc('week', slice_start, $5))::bigint",
    }
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
        let range = filter.range;
        let split = if filter.group_by.is_none() || hourly_rollup_fits(filter.time_zone, range) {
            HourSplit::of(range)
        } else {
            HourSplit::raw_only(range)
        };
        let event_name = filter.event_name.as_ref().map(|name| name.as_str());
        // $1..$4 are the split's instants; then either the hour-to-bucket map ($5, $6),
        // the zone ($5) for the raw fallback, or nothing when ungrouped; the name goes last.
        let bucket_map = match filter.group_by {
            Some(group_by) if split != HourSplit::raw_only(range) => {
                Some(hour_bucket_map(group_by, filter.time_zone, range))
            }
            _ => None,
        };
        let zone_name = match (filter.group_by, &bucket_map) {
            (Some(_), None) => Some(filter.time_zone.name()),
            _ => None,
        };
        let name_parameter =
            event_name.map(|_| 5 + usize::from(zone_name.is_some()) + 2 * usize::from(bucket_map.is_some()));
        let sql = match (filter.group_by, &bucket_map) {
            (Some(_), Some(_)) => format!(
                "SELECT slices.event_name, map.bucket, sum(slices.event_count)::bigint AS count
                   FROM ({}) slices
                   JOIN unnest($5::timestamptz[], $6::int8[]) AS map(hour_start, bucket)
                     ON map.hour_start = slices.slice_start
                  GROUP BY 1, 2 ORDER BY bucket, event_name",
                slices_sql(name_parameter, true)
            ),
            (Some(group_by), None) => format!(
                "SELECT event_name, {} AS bucket, sum(event_count)::bigint AS count
                   FROM ({}) slices
                  GROUP BY 1, 2 ORDER BY bucket, event_name",
                bucket_sql(group_by),
                slices_sql(name_parameter, false)
            ),
            (None, _) => format!(
                "SELECT event_name, sum(event_count)::bigint AS count
                   FROM ({}) slices
                  GROUP BY 1 ORDER BY event_name",
                slices_sql(name_parameter, false)
            ),
        };
        self.database
            .with_retry("count_events_rollup", || async {
                let mut query = sqlx::query(&sql)
                    .bind(time(split.start))
                    .bind(time(split.end))
                    .bind(time(split.rollup_start))
                    .bind(time(split.rollup_end));
                if let Some((hours, buckets)) = &bucket_map {
                    query = query.bind(hours).bind(buckets);
                }
                if let Some(zone_name) = zone_name {
                    query = query.bind(zone_name);
                }
                if let Some(event_name) = event_name {
                    query = query.bind(event_name);
                }
                let rows = query.fetch_all(self.database.pool()).await?;
                event_counts_from_rows(&rows, filter.group_by.is_some(), range.start())
            })
            .await
    }

    /// Exact distinct non-empty user ids with an event in the range: the whole UTC hours
    /// from the monthly hour maps, the partial hours at the edges from the raw events;
    /// the union is counted once.
    pub async fn unique_users(&self, range: TimeRange) -> Result<i64, RepositoryError> {
        let plan = UniqueUsersPlan::of(range);
        self.database
            .with_retry("count_unique_users_rollup", || async {
                // The distinct step hashes up to (users x months) ids; PostgreSQL's default
                // work_mem (4 MB) would make it sort on disk instead.
                let mut transaction = self.database.pool().begin().await?;
                sqlx::query(UNIQUE_USERS_WORK_MEM).execute(&mut *transaction).await?;
                let count: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (
                        SELECT activity.user_id
                          FROM user_activity_monthly activity
                          JOIN unnest($1::date[], $2::text[]::bit(744)[]) AS wanted(month, hours)
                            ON activity.month = wanted.month
                         WHERE wanted.hours IS NULL
                            OR activity.active_hours & wanted.hours <> B'0'::bit(744)
                        UNION
                        SELECT user_id FROM events
                         WHERE timestamp >= $3 AND timestamp < $4 AND user_id IS NOT NULL AND user_id <> ''
                        UNION
                        SELECT user_id FROM events
                         WHERE timestamp >= $5 AND timestamp < $6 AND user_id IS NOT NULL AND user_id <> ''
                    ) users",
                )
                .bind(&plan.months)
                .bind(&plan.hour_maps)
                .bind(time(plan.split.start))
                .bind(time(plan.split.rollup_start))
                .bind(time(plan.split.rollup_end))
                .bind(time(plan.split.end))
                .fetch_one(&mut *transaction)
                .await?;
                transaction.commit().await?;
                Ok(count)
            })
            .await
    }
}

/// Memory for the distinct step of an exact unique-user count, this transaction only.
const UNIQUE_USERS_WORK_MEM: &str = "SET LOCAL work_mem = '64MB'";

/// Bits in a month's hour map: 31 days of 24 hours.
const HOURS_IN_MONTH_MAP: usize = 31 * 24;

/// Which rollup rows an exact unique-user count reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UniqueUsersPlan {
    pub split: HourSplit,
    /// First days of the UTC months the whole hours touch.
    pub months: Vec<NaiveDate>,
    /// Per month, the wanted hours as a 744-character bit string ('1' at bit
    /// `(day - 1) * 24 + hour`); `None` when every hour of the month is wanted (then
    /// every row of the month counts and no bit test is needed).
    pub hour_maps: Vec<Option<String>>,
}

impl UniqueUsersPlan {
    pub fn of(range: TimeRange) -> Self {
        let split = HourSplit::of(range);
        let mut plan = Self { split, ..Self::default() };
        let mut current_map: Vec<u8> = Vec::new();
        let finish = |map: &[u8], month: NaiveDate| -> Option<String> {
            let next_month = month.checked_add_months(chrono::Months::new(1)).unwrap_or(month);
            let hours_in_month = (next_month - month).num_days() as usize * 24;
            let wanted = map.iter().filter(|bit| **bit == b'1').count();
            (wanted < hours_in_month).then(|| String::from_utf8_lossy(map).into_owned())
        };
        let mut hour = split.rollup_start;
        while hour < split.rollup_end {
            let at = time(hour);
            let date = at.date_naive();
            let month = date.with_day(1).unwrap_or(date);
            if plan.months.last() != Some(&month) {
                if let Some(previous) = plan.months.last() {
                    plan.hour_maps.push(finish(&current_map, *previous));
                }
                plan.months.push(month);
                current_map = vec![b'0'; HOURS_IN_MONTH_MAP];
            }
            let bit = (date.day() as usize - 1) * 24 + (hour.rem_euclid(DAY_SECONDS) / HOUR_SECONDS) as usize;
            current_map[bit] = b'1';
            hour += HOUR_SECONDS;
        }
        if let Some(last) = plan.months.last() {
            plan.hour_maps.push(finish(&current_map, *last));
        }
        plan
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
        let split = HourSplit::of(range(1_800, 3 * HOUR_SECONDS + 60));
        assert_eq!(split, HourSplit { start: 1_800, rollup_start: 3_600, rollup_end: 10_800, end: 10_860 });
        let inside_one_hour = HourSplit::of(range(100, 200));
        assert_eq!(inside_one_hour.rollup_start, 200);
        assert_eq!(inside_one_hour.rollup_end, 200);
    }

    #[test]
    fn unique_user_plan_marks_the_whole_hours_of_each_month() {
        // 2024-01-31 22:30 UTC to 2024-02-01 01:15 UTC.
        let start = 1_706_740_200;
        let end = 1_706_750_100;
        let plan = UniqueUsersPlan::of(range(start, end));
        assert_eq!(plan.split.rollup_start, start + 1_800);
        assert_eq!(plan.split.rollup_end, end - 900);
        let date = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap();
        assert_eq!(plan.months, vec![date(2024, 1, 1), date(2024, 2, 1)]);
        let set_bits = |map: &str| map.match_indices('1').map(|(index, _)| index).collect::<Vec<_>>();
        let maps: Vec<&str> = plan.hour_maps.iter().map(|map| map.as_deref().unwrap()).collect();
        assert_eq!(set_bits(maps[0]), vec![30 * 24 + 23]);
        assert_eq!(set_bits(maps[1]), vec![0]);
        assert!(maps.iter().all(|map| map.len() == HOURS_IN_MONTH_MAP));

        // All of February 2024 (29 days): no bit test for that month.
        let february = UniqueUsersPlan::of(range(1_706_745_600, 1_709_251_200));
        assert_eq!(february.months, vec![date(2024, 2, 1)]);
        assert_eq!(february.hour_maps, vec![None]);
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
