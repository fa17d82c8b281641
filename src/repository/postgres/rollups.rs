//! Count queries answered from the rollups (migration V4): `event_counts_daily`
//! and `event_counts_hourly` plus the not yet folded `event_count_deltas` for event counts,
//! the user bitmaps of `user_activity_daily` / `user_activity_hourly` plus the not yet
//! folded `user_activity_pending` users for unique users, each pair read in one snapshot.
//! Whole UTC days come from the day rows, other whole hours from the hour rows, and only
//! the partial hours at the edges of a range and of its buckets (zones offset by 30 or 45
//! minutes) read the raw `events` rows; [`EventCountPlan`] says which, bucket by bucket.

use chrono::{DateTime, Offset, TimeZone, Utc};
use roaring::RoaringBitmap;
use sqlx::Row;

use super::events::event_counts_from_rows;
use super::fold::decode_users;
use super::{Database, RepositoryError};
use crate::models::{EventCount, EventFilter, GroupBy, TimeRange};

pub(super) const HOUR_SECONDS: i64 = 3_600;
pub(super) const DAY_SECONDS: i64 = 86_400;
const WEEK_SECONDS: i64 = 7 * DAY_SECONDS;

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

/// The offset of `zone` from UTC at `seconds`, in seconds.
fn utc_offset(zone: chrono_tz::Tz, seconds: i64) -> i64 {
    i64::from(zone.offset_from_utc_datetime(&time(seconds).naive_utc()).fix().local_minus_utc())
}

/// The first instant after `instant` at which the bucket of `group_by` in `zone` may
/// change: the next local hour, midnight or Monday midnight, and for hours also the next
/// change of the zone's offset (a 30-minute DST shift moves the hour label). An extra
/// boundary only splits a segment of the plan; a missed one would let a rollup row
/// straddle two buckets, so boundaries err on the side of too many.
fn next_bucket_boundary(group_by: GroupBy, zone: chrono_tz::Tz, instant: i64) -> i64 {
    let local = instant + utc_offset(zone, instant);
    let (target_local, stop_at_offset_change) = match group_by {
        GroupBy::Hour => (floor_to(local, HOUR_SECONDS) + HOUR_SECONDS, true),
        GroupBy::Day => (floor_to(local, DAY_SECONDS) + DAY_SECONDS, false),
        GroupBy::Week => {
            // 1970-01-05 was a Monday: local weeks start 4 days after a multiple of 7 days.
            let monday = floor_to(local - 4 * DAY_SECONDS, WEEK_SECONDS) + 4 * DAY_SECONDS;
            (monday + WEEK_SECONDS, false)
        }
    };
    first_instant_reaching(zone, instant, target_local, stop_at_offset_change)
}

/// The first instant after `from` whose local time in `zone` (seconds since the local
/// epoch) is at least `target_local`, which lies after `from`'s local time; or, with
/// `stop_at_offset_change`, the first change of the zone's offset if that comes earlier.
/// A handful of offset lookups per call; a transition in between is found by bisection.
fn first_instant_reaching(
    zone: chrono_tz::Tz,
    from: i64,
    target_local: i64,
    stop_at_offset_change: bool,
) -> i64 {
    let mut instant = from;
    loop {
        let offset = utc_offset(zone, instant);
        if instant > from && instant + offset >= target_local {
            return instant;
        }
        // Reached at `candidate` if the offset stays as it is until then.
        let candidate = target_local - offset;
        let change = if utc_offset(zone, candidate - 1) != offset {
            first_offset_change(zone, instant, candidate - 1, offset)
        } else if utc_offset(zone, candidate) != offset {
            candidate
        } else {
            return candidate;
        };
        if stop_at_offset_change {
            return change;
        }
        instant = change;
    }
}

/// The first instant in `(low, high]` whose offset differs from `offset`, the offset at
/// `low`; the offset at `high` differs.
fn first_offset_change(zone: chrono_tz::Tz, mut low: i64, mut high: i64, offset: i64) -> i64 {
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if utc_offset(zone, middle) == offset {
            low = middle;
        } else {
            high = middle;
        }
    }
    high
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

/// Rows of `table` (`bucket_start`, `event_name`, `event_count`) whose `bucket_start` lies
/// in one of the segments bound as `$starts`, `$ends`: one index range scan per segment.
fn segment_rows_sql(table: &str, starts: u8, ends: u8, name_filtered: bool) -> String {
    let name = if name_filtered { " AND rollup.event_name = $7" } else { "" };
    format!(
        "SELECT rollup.bucket_start AS slice_start, rollup.event_name, rollup.event_count
           FROM unnest(${starts}::timestamptz[], ${ends}::timestamptz[]) AS segment(low, high)
           JOIN {table} rollup ON rollup.bucket_start >= segment.low AND rollup.bucket_start < segment.high{name}"
    )
}

/// A version of the rollup part of a range: (rows, sum) over the rows that a change to
/// the part must touch. Equal stamps mean an unchanged part (see migration V4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RollupStamp {
    pub rows: i64,
    pub sum: i64,
}

/// Sorted, disjoint UTC intervals `[start, end)` in Unix seconds; touching ones merge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    starts: Vec<i64>,
    ends: Vec<i64>,
}

impl Segments {
    fn push(&mut self, start: i64, end: i64) {
        if start >= end {
            return;
        }
        match self.ends.last_mut() {
            Some(last_end) if *last_end == start => *last_end = end,
            _ => {
                self.starts.push(start);
                self.ends.push(end);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The intervals as `(start, end)` pairs.
    pub fn intervals(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.starts.iter().copied().zip(self.ends.iter().copied())
    }

    fn bounds(&self) -> (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) {
        (
            self.starts.iter().map(|start| time(*start)).collect(),
            self.ends.iter().map(|end| time(*end)).collect(),
        )
    }
}

/// How one GetEventCount is read. The range is cut at every bucket boundary of the
/// caller's zone, walking bucket by bucket (the work grows with the buckets, never with
/// the hours of the range). Inside each piece the whole UTC days come from the day rows,
/// the other whole UTC hours from the hour rows (plus their deltas not folded yet), and
/// the rest from the raw events: the partial hours at the range's edges and at bucket
/// boundaries that are not whole UTC hours (zones offset by 30 or 45 minutes). Every row
/// read then lies inside one bucket, so SQL labels it by its own start. Touching pieces of
/// one source merge, so UTC days and weeks read one run of day rows.
#[derive(Clone, Debug)]
pub struct EventCountPlan {
    /// The whole UTC hours of the range: the cached folded part is keyed by them, and
    /// its stamp covers them.
    pub split: RangeSplit,
    pub days: Segments,
    pub hours: Segments,
    /// The day and hour segments together: where the deltas not folded yet are read.
    pub folded: Segments,
    pub raw: Segments,
}

impl EventCountPlan {
    pub fn of(filter: &EventFilter) -> Self {
        Self::within(filter, Some((filter.range.start(), filter.range.end())))
    }

    /// The plan for `filter` when every event lies in `extent` (`[first, last)` in Unix
    /// seconds, `None` when there is none): only the whole UTC hours around the extent
    /// are walked, so a range far wider than the data costs what the data's buckets cost.
    /// The split (the cache key and the stamp's hours) stays that of the whole range.
    pub fn within(filter: &EventFilter, extent: Option<(i64, i64)>) -> Self {
        let mut plan = Self {
            split: RangeSplit::hours(filter.range),
            days: Segments::default(),
            hours: Segments::default(),
            folded: Segments::default(),
            raw: Segments::default(),
        };
        let Some((first, last)) = extent else {
            return plan;
        };
        let start = filter.range.start().max(floor_to(first, HOUR_SECONDS));
        let end = filter.range.end().min(ceil_to(last, HOUR_SECONDS));
        let Some(group_by) = filter.group_by else {
            plan.add_piece(start, end);
            return plan;
        };
        let mut piece_start = start;
        while piece_start < end {
            let piece_end = next_bucket_boundary(group_by, filter.time_zone, piece_start).min(end);
            plan.add_piece(piece_start, piece_end);
            piece_start = piece_end;
        }
        plan
    }

    /// Adds `[start, end)`, which lies inside one bucket.
    fn add_piece(&mut self, start: i64, end: i64) {
        let hours_start = ceil_to(start, HOUR_SECONDS);
        let hours_end = floor_to(end, HOUR_SECONDS);
        if hours_start >= hours_end {
            self.raw.push(start, end);
            return;
        }
        self.raw.push(start, hours_start);
        let days_start = ceil_to(hours_start, DAY_SECONDS);
        let days_end = floor_to(hours_end, DAY_SECONDS);
        if days_start < days_end {
            self.hours.push(hours_start, days_start);
            self.days.push(days_start, days_end);
            self.hours.push(days_end, hours_end);
        } else {
            self.hours.push(hours_start, hours_end);
        }
        self.folded.push(hours_start, hours_end);
        self.raw.push(hours_end, end);
    }

    /// Whether any whole hour comes from the rollups.
    pub fn has_rollup_part(&self) -> bool {
        !self.folded.is_empty()
    }

    /// Index range scans the plan costs: one per segment of each source (the deltas
    /// read over the folded segments).
    pub fn segment_count(&self) -> usize {
        self.days.len() + self.hours.len() + self.folded.len() + self.raw.len()
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

/// The bucket start (Unix seconds) of the instant `column` in zone `$8`. Hours are cut at
/// the local hour so a repeated local hour (DST end) stays two buckets; days and weeks use
/// PostgreSQL's zone-aware `date_trunc` (weeks start on Monday), so a day starts at local
/// midnight whatever the zone's offset.
fn bucket_sql(group_by: GroupBy, column: &str) -> String {
    match group_by {
        GroupBy::Hour => format!(
            "EXTRACT(EPOCH FROM {column} - (({column} AT TIME ZONE $8) - date_trunc('hour', {column} AT TIME ZONE $8)))::bigint"
        ),
        GroupBy::Day => format!("EXTRACT(EPOCH FROM date_trunc('day', {column}, $8))::bigint"),
        GroupBy::Week => format!("EXTRACT(EPOCH FROM date_trunc('week', {column}, $8))::bigint"),
    }
}

/// `(event_name, bucket, count)` of `part` of the plan (bucket 0 when ungrouped). Every
/// row read lies inside one bucket (see [`EventCountPlan`]), so it is labelled by its own
/// start; raw events are counted per label right away.
fn event_counts_sql(filter: &EventFilter, part: CountPart) -> String {
    let name_filtered = filter.event_name.is_some();
    let (rollup_bucket, raw_bucket) = match filter.group_by {
        Some(group_by) => {
            (bucket_sql(group_by, "slices.slice_start"), bucket_sql(group_by, "event.timestamp"))
        }
        None => ("0::bigint".to_string(), "0::bigint".to_string()),
    };
    let mut rollup_slices = Vec::new();
    if part != CountPart::Fresh {
        rollup_slices.push(segment_rows_sql("event_counts_daily", 1, 2, name_filtered));
        rollup_slices.push(segment_rows_sql("event_counts_hourly", 3, 4, name_filtered));
    }
    if part != CountPart::Folded {
        rollup_slices.push(segment_rows_sql("event_count_deltas", 9, 10, name_filtered));
    }
    let mut arms = vec![format!(
        "SELECT slices.event_name, {rollup_bucket} AS bucket, slices.event_count
           FROM ({}) slices",
        rollup_slices.join("\n UNION ALL\n ")
    )];
    if part != CountPart::Folded {
        let name = if name_filtered { " AND event.event_name = $7" } else { "" };
        arms.push(format!(
            "SELECT event.event_name, {raw_bucket} AS bucket, count(*) AS event_count
               FROM unnest($5::timestamptz[], $6::timestamptz[]) AS segment(low, high)
               JOIN events event ON event.timestamp >= segment.low AND event.timestamp < segment.high{name}
              GROUP BY 1, 2"
        ));
    }
    format!(
        "SELECT counted.event_name::text AS event_name, counted.bucket, sum(counted.event_count)::bigint AS count
           FROM ({}) counted
          GROUP BY 1, 2",
        arms.join("\n UNION ALL\n ")
    )
}

/// Binds the plan: day ($1, $2), hour ($3, $4) and raw ($5, $6) segments as start and
/// end arrays, the name ($7, NULL when unfiltered), the zone ($8), the folded segments
/// ($9, $10) and the whole hours the stamp covers ($11, $12).
fn bind_event_counts<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    filter: &'q EventFilter,
    plan: &'q EventCountPlan,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for segments in [&plan.days, &plan.hours, &plan.raw] {
        let (starts, ends) = segments.bounds();
        query = query.bind(starts).bind(ends);
    }
    query = query.bind(filter.event_name.as_ref().map(|name| name.as_str())).bind(filter.time_zone.name());
    let (starts, ends) = plan.folded.bounds();
    query.bind(starts).bind(ends).bind(time(plan.split.rollup_start)).bind(time(plan.split.rollup_end))
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
        let plan = self.event_count_plan(filter).await?;
        let sql = event_counts_sql(filter, CountPart::Whole);
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

    /// The plan for `filter`, walked only over the hours that hold events: the first and
    /// last event timestamps come from one index probe per partition. An event committed
    /// after this read is concurrent with the call; later calls plan around it.
    pub async fn event_count_plan(&self, filter: &EventFilter) -> Result<EventCountPlan, RepositoryError> {
        let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = self
            .database
            .with_retry("event_extent", || async {
                Ok(sqlx::query_as("SELECT min(timestamp), max(timestamp) FROM events")
                    .fetch_one(self.database.pool())
                    .await?)
            })
            .await?;
        let extent = first.zip(last).map(|(first, last)| (first.timestamp(), last.timestamp() + 1));
        Ok(EventCountPlan::within(filter, extent))
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
                event_counts_sql(filter, part)
            )
        };
        let mut sql = format!(
            "SELECT 0 AS part, NULL::text AS event_name, count(*)::bigint AS bucket,
                    coalesce(sum(event_count), 0)::bigint AS count
               FROM event_totals_hourly WHERE bucket_start >= $11 AND bucket_start < $12
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
    use chrono::{Datelike, Timelike};

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

    fn filter(start: i64, end: i64, group_by: Option<GroupBy>, zone: chrono_tz::Tz) -> EventFilter {
        EventFilter { event_name: None, range: range(start, end), group_by, time_zone: zone }
    }

    /// The bucket label the SQL gives an instant (see `bucket_sql`), computed with chrono:
    /// the local hour's start, or the local date of the day or of the week's Monday.
    fn label(group_by: GroupBy, zone: chrono_tz::Tz, seconds: i64) -> i64 {
        let local = zone.from_utc_datetime(&time(seconds).naive_utc());
        let date = local.date_naive();
        match group_by {
            GroupBy::Hour => seconds - i64::from(local.minute()) * 60 - i64::from(local.second()),
            GroupBy::Day => i64::from(date.num_days_from_ce()),
            GroupBy::Week => {
                i64::from(date.num_days_from_ce()) - i64::from(date.weekday().num_days_from_monday())
            }
        }
    }

    const ZONES: [chrono_tz::Tz; 8] = [
        chrono_tz::UTC,
        chrono_tz::Europe::Berlin,
        chrono_tz::America::New_York,
        chrono_tz::Asia::Kolkata,
        chrono_tz::Asia::Kathmandu,
        chrono_tz::Australia::Lord_Howe,
        chrono_tz::Pacific::Chatham,
        chrono_tz::America::St_Johns,
    ];

    #[test]
    fn bucket_boundaries_are_where_the_label_changes() {
        // Two years with every DST transition of these zones, stepped by 15 minutes: the
        // label is constant between two boundaries and changes at each one.
        let from = 1_767_225_600; // 2026-01-01
        for zone in ZONES {
            for group_by in [GroupBy::Hour, GroupBy::Day, GroupBy::Week] {
                let mut boundary = from;
                while boundary < from + 2 * 365 * DAY_SECONDS {
                    let next = next_bucket_boundary(group_by, zone, boundary);
                    assert!(next > boundary);
                    let inside = label(group_by, zone, boundary);
                    let mut instant = boundary;
                    while instant < next {
                        assert_eq!(
                            label(group_by, zone, instant),
                            inside,
                            "{zone} {group_by:?} at {instant}"
                        );
                        instant += 900;
                    }
                    assert_eq!(
                        label(group_by, zone, next - 1),
                        inside,
                        "{zone} {group_by:?} at {}",
                        next - 1
                    );
                    if group_by != GroupBy::Hour {
                        assert_ne!(label(group_by, zone, next), inside, "{zone} {group_by:?} at {next}");
                    }
                    boundary = next;
                }
            }
        }
    }

    #[test]
    fn lord_howe_days_start_at_local_midnight() {
        // 2026-10-04 09:56:19 UTC; Lord Howe moves from +10:30 to +11 at 02:00 that day, so
        // the local day began at 2026-10-03 13:30 UTC and ends at 2026-10-04 13:00 UTC.
        let midnight = 1_791_034_200;
        assert_eq!(
            next_bucket_boundary(GroupBy::Day, chrono_tz::Australia::Lord_Howe, midnight),
            midnight + DAY_SECONDS - 1_800
        );
        let plan = EventCountPlan::of(&filter(
            1_791_107_779,
            1_791_107_779 + 3 * DAY_SECONDS,
            Some(GroupBy::Day),
            chrono_tz::Australia::Lord_Howe,
        ));
        // 13:00 UTC is a whole hour: the boundaries after the shift need no raw rows.
        assert_eq!(
            plan.raw.intervals().collect::<Vec<_>>(),
            vec![(1_791_107_779, 1_791_108_000), (1_791_363_600, 1_791_366_979)]
        );
        assert_eq!(plan.days.len(), 0);
    }

    /// Checks that the plan's sources cover `range` exactly, without overlap, that the
    /// folded segments are the day and hour segments, and that rollup segments are whole
    /// UTC days or hours.
    fn assert_covers(plan: &EventCountPlan, range: TimeRange) {
        let mut pieces: Vec<(i64, i64)> =
            plan.days.intervals().chain(plan.hours.intervals()).chain(plan.raw.intervals()).collect();
        pieces.sort_unstable();
        let mut covered = range.start();
        for (start, end) in pieces {
            assert_eq!(start, covered, "gap or overlap at {start}");
            covered = end;
        }
        assert_eq!(covered, range.end());
        assert!(plan.days.intervals().all(|(start, end)| start % DAY_SECONDS == 0 && end % DAY_SECONDS == 0));
        assert!(plan
            .hours
            .intervals()
            .all(|(start, end)| start % HOUR_SECONDS == 0 && end % HOUR_SECONDS == 0));
        let mut folded: Segments = Segments::default();
        let mut rollup: Vec<(i64, i64)> = plan.days.intervals().chain(plan.hours.intervals()).collect();
        rollup.sort_unstable();
        rollup.into_iter().for_each(|(start, end)| folded.push(start, end));
        assert_eq!(folded, plan.folded);
    }

    #[test]
    fn a_plan_at_the_bucket_cap_grows_with_the_buckets_not_the_hours() {
        // 10,000 buckets of each grouping, ending 2026-12-01 at a minute past a half hour.
        let end = 1_796_083_200 + 1_860;
        for zone in ZONES {
            for group_by in [GroupBy::Hour, GroupBy::Day, GroupBy::Week] {
                let start = end - (crate::service::validation::MAX_BUCKETS - 1) * group_by.seconds();
                let span = range(start, end);
                assert!(group_by.bucket_count(span) <= crate::service::validation::MAX_BUCKETS);
                let plan = EventCountPlan::of(&filter(start, end, Some(group_by), zone));
                assert_covers(&plan, span);
                // Each bucket adds at most one run of days, raw rows and folded rows, and
                // two of hours (around its days, split by raw rows where a boundary is not
                // a whole UTC hour).
                let buckets = group_by.bucket_count(span) as usize;
                for segments in [&plan.days, &plan.raw, &plan.folded] {
                    assert!(
                        segments.len() <= buckets + 2,
                        "{zone} {group_by:?}: {} segments",
                        segments.len()
                    );
                }
                assert!(
                    plan.hours.len() <= 2 * buckets + 2,
                    "{zone} {group_by:?}: {} hours",
                    plan.hours.len()
                );
                if zone == chrono_tz::UTC {
                    // UTC buckets are whole hours and days: one run each, raw only at the edges.
                    assert!(
                        plan.days.len() <= 1 && plan.hours.len() <= 2 && plan.raw.len() <= 2,
                        "{group_by:?}: {plan:?}"
                    );
                }
            }
        }
        // Events only in the last 90 days of 190 years of Berlin weeks: the walk covers
        // their 14 weeks, not the 10,000 of the range; no events, no segments at all.
        let weeks = filter(end - 9_999 * WEEK_SECONDS, end, Some(GroupBy::Week), chrono_tz::Europe::Berlin);
        let recent = EventCountPlan::within(&weeks, Some((end - 90 * DAY_SECONDS, end)));
        assert!(recent.segment_count() <= 4 * 15, "{recent:?}");
        assert_eq!(recent.split, EventCountPlan::of(&weeks).split, "the cache key covers the whole range");
        assert_eq!(EventCountPlan::within(&weeks, None).segment_count(), 0);
        // Ungrouped over 190 years: one run of days, whole hours and raw only at the edges.
        let later = end + 3 * HOUR_SECONDS;
        let plan =
            EventCountPlan::of(&filter(later - 190 * 365 * DAY_SECONDS - 7, later, None, chrono_tz::UTC));
        assert_eq!((plan.days.len(), plan.hours.len(), plan.raw.len()), (1, 2, 2));
    }

    #[test]
    fn berlin_weeks_read_day_rows_inside_and_hour_rows_around_local_midnight() {
        // Monday 2026-01-05 00:00 CET is Sunday 23:00 UTC; two whole weeks.
        let monday = 1_767_567_600;
        let span = range(monday, monday + 2 * WEEK_SECONDS);
        let plan = EventCountPlan::of(&filter(
            span.start(),
            span.end(),
            Some(GroupBy::Week),
            chrono_tz::Europe::Berlin,
        ));
        assert_covers(&plan, span);
        assert!(plan.raw.is_empty());
        let day = monday + HOUR_SECONDS;
        assert_eq!(
            plan.days.intervals().collect::<Vec<_>>(),
            vec![(day, day + 6 * DAY_SECONDS), (day + WEEK_SECONDS, day + WEEK_SECONDS + 6 * DAY_SECONDS)]
        );
        // Kolkata (+5:30) days: boundaries at 18:30 UTC, one raw hour around each.
        let plan = EventCountPlan::of(&filter(
            span.start(),
            span.end(),
            Some(GroupBy::Day),
            chrono_tz::Asia::Kolkata,
        ));
        assert_covers(&plan, span);
        assert_eq!(plan.raw.len(), 14);
        assert!(plan
            .raw
            .intervals()
            .skip(1)
            .all(|(start, end)| end - start == HOUR_SECONDS && start % HOUR_SECONDS == 0));
    }
}
