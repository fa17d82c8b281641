//! Count queries answered from the rollups: `event_counts_daily` and `event_counts_hourly`
//! plus the not yet folded `event_count_deltas` for event counts, the user bitmaps of
//! `user_activity_daily` / `user_activity_hourly` plus the not yet folded
//! `user_activity_pending` users for unique users, each pair read in one snapshot. What a
//! query reads is a plan the service built ([`EventCountPlan`], [`RangeSplit`]); this
//! module turns plans into SQL and runs them.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use roaring::{MultiOps, RoaringBitmap};
use sqlx::{Postgres, QueryBuilder, Row};

use super::edge_hours::{EdgeHourMemory, HourStamp, HourSummary, MAX_SUMMARY_EVENTS};
use super::events::event_counts_from_rows;
use super::folded_bitmaps::{BitmapTable, FoldedBitmapMemory, RowIdentity, ROW_KEY_SQL};
use super::hour_spans;
use super::replica::CountSource;
use super::user_ordinals::UserOrdinals;
use super::RepositoryError;
use crate::metrics;
use crate::models::user_bitmap::decode_users;
use crate::models::utc::{floor_to, time, DAY_SECONDS, HOUR_SECONDS};
use crate::models::{EventCount, EventCountPlan, EventFilter, GroupBy, PartialHour, RangeSplit, RollupStamp};

type Sql<'a> = QueryBuilder<'a, Postgres>;

/// The start and end arrays of a set of segments, as a query unnests them.
type Bounds = (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>);

/// A row of the unique-user statement: its kind ([`FOLDED_DAY_BITMAP`],
/// [`FOLDED_HOUR_BITMAP`], [`EDGE_BITMAP`], [`UNFOLDED_USERS`], [`ERASURE_GENERATION`],
/// [`EDGE_SUMMARY`], [`EDGE_RAW`], [`EDGE_BITMAP_MINUS_OUTSIDE`] or [`EDGE_SPANS`]), a bitmap or stored spans (a folded
/// bitmap only when asked for) and a folded bitmap's version (or the erasure generation,
/// or a partial hour's index), or, in one row, the users not folded yet: their
/// ordinals when the statement probes for them (`NULL` for a user that has none; no array
/// when the ordinals are looked up after the statement) and their ids. One row of arrays,
/// not a row per user: a dashboard's count has thousands of them, and decoding the rows
/// was most of the replica's work per call.
///
/// A folded bitmap's row also carries its bucket start (Unix seconds) and its `xmin`, and
/// its bytes only when this replica does not remember it ([`FoldedBitmapMemory`]).
type UserCountRow = (
    i32,
    Option<Vec<u8>>,
    Option<i64>,
    Option<Vec<Option<i32>>>,
    Option<Vec<String>>,
    Option<i64>,
    Option<i64>,
);

/// The ordinals of ids this replica does not remember, and the erasure generation, for
/// the ids of a unique-user count (see [`UserOrdinals`]). A row with a `NULL` id carries
/// the generation.
const USER_ORDINALS_AND_GENERATION: &str = "
    SELECT user_id::text, ordinal::bigint FROM user_ordinals WHERE user_id = ANY($1::text[])
    UNION ALL SELECT NULL, generation FROM erasure_generation";

/// Kinds of [`UserCountRow`]: a bitmap of a whole day (stamped and cached), the
/// bitmap of a partial edge hour read whole (always fresh), the users not folded yet, the
/// erasure generation (part of the stamp), a partial hour whose kept summary holds (its
/// users come from its [`HourSummary`]), a partial hour whose users were read raw.
const FOLDED_DAY_BITMAP: i32 = 0;
const EDGE_BITMAP: i32 = 1;
const UNFOLDED_USERS: i32 = 2;
const ERASURE_GENERATION: i32 = 3;
const EDGE_SUMMARY: i32 = 4;
const EDGE_RAW: i32 = 5;
/// The bitmap of a settled partial edge hour with the ordinals of its users seen only
/// outside the range (see [`reads_hour_minus_outside`]).
const EDGE_BITMAP_MINUS_OUTSIDE: i32 = 6;
/// The stored spans of a partial edge hour ([`hour_spans`]) that the statement found
/// current, with the hour's index.
const EDGE_SPANS: i32 = 7;
/// A folded bitmap of a whole hour (kind [`FOLDED_DAY_BITMAP`] is a whole day's).
const FOLDED_HOUR_BITMAP: i32 = 8;
/// A partial edge hour answered by its live spans (V8) and its pending rows' seconds, with
/// the hour's index; the spans are `NULL` when nothing of the hour is folded yet.
const EDGE_LIVE_SPANS: i32 = 9;

/// Whether a partial edge hour not read whole nor from a summary is read as its hour
/// bitmap minus the users seen only in its part outside the range, rather than as the raw
/// users of its part inside: when the part outside is the shorter one. Both read the raw
/// events of their side; what differs is how many ids are turned into ordinals (about
/// 3 µs of PostgreSQL each, thousands per edge hour at 10M events), and only the users
/// seen only outside need one. Used only for a settled hour (no pending users), whose
/// bitmap holds every user of the hour.
fn reads_hour_minus_outside(part: &PartialHour) -> bool {
    let outside: i64 = part.outside().iter().map(|(from, to)| to - from).sum();
    outside < part.end - part.start
}

/// One folded hour as an [`HourSummary`] reads it, in one snapshot: a row of kind 0 with
/// (version, events, erasure generation, settled), then, only if the hour is settled (no
/// deltas or pending users) and holds at most $2 events, a row of kind 1 per user
/// (ordinal, first second, last second into the hour) and one of kind 2 per event name
/// and second (second, events, name). An ordinal is `NULL` only for a user not folded
/// yet, which a settled hour cannot have.
///
/// Each of the hour's users is one index probe of `user_ordinals`, so a build costs what
/// the hour holds. PostgreSQL's own choice, a hash join, reads every ordinal ever given:
/// at 10M events, an hour of about 4,000 users took 20-28 ms that way against 25-34 ms
/// probing with 100,000 ordinals, but 141-143 ms against 25-31 ms with 1,000,000.
const HOUR_SUMMARY: &str = "
    WITH state AS MATERIALIZED (
        SELECT totals.version, totals.event_count,
               (SELECT generation FROM erasure_generation) AS generation,
               NOT EXISTS (SELECT 1 FROM event_count_deltas WHERE bucket_start = $1)
                 AND NOT EXISTS (SELECT 1 FROM user_activity_pending WHERE hour_start = $1) AS settled
          FROM event_totals_hourly totals WHERE totals.bucket_start = $1
    ), wanted AS MATERIALIZED (
        SELECT settled AND event_count <= $2 AS wanted FROM state
    )
    SELECT 0 AS kind, version AS a, event_count AS b, generation AS c, settled, NULL::text AS name FROM state
    UNION ALL
    SELECT 1, (SELECT ordinal FROM user_ordinals ordinals WHERE ordinals.user_id = hour_users.user_id)::bigint,
           hour_users.first, hour_users.last, NULL, NULL
      FROM (SELECT user_id,
                   floor(extract(epoch FROM min(timestamp) - $1))::bigint AS first,
                   floor(extract(epoch FROM max(timestamp) - $1))::bigint AS last
              FROM events
             WHERE timestamp >= $1 AND timestamp < $1 + interval '1 hour'
               AND user_id IS NOT NULL AND user_id <> ''
               AND (SELECT wanted FROM wanted)
             GROUP BY user_id) hour_users
    UNION ALL
    SELECT 2, NULL, floor(extract(epoch FROM timestamp - $1))::bigint, count(*), NULL, event_name::text
      FROM events
     WHERE timestamp >= $1 AND timestamp < $1 + interval '1 hour' AND (SELECT wanted FROM wanted)
     GROUP BY event_name, 3";

/// A row of [`HOUR_SUMMARY`]: kind, then (version, events, erasure generation, settled),
/// (ordinal, first second, last second) or (second, events, name).
type HourSummaryRow = (i32, Option<i64>, Option<i64>, Option<i64>, Option<bool>, Option<String>);

/// In a count statement, whether a kept summary of a partial hour still holds: the hour's
/// total row is the one it was read from, nothing of the hour is pending, and no erasure
/// committed since.
fn push_summary_holds<'a>(sql: &mut Sql<'a>, hour_start: DateTime<Utc>, stamp: HourStamp) {
    sql.push("(EXISTS (SELECT 1 FROM event_totals_hourly WHERE bucket_start = ").push_bind(hour_start);
    sql.push(" AND version = ").push_bind(stamp.version);
    sql.push(" AND event_count = ").push_bind(stamp.events);
    sql.push(") AND NOT EXISTS (SELECT 1 FROM event_count_deltas WHERE bucket_start = ")
        .push_bind(hour_start);
    sql.push(") AND NOT EXISTS (SELECT 1 FROM user_activity_pending WHERE hour_start = ")
        .push_bind(hour_start);
    sql.push(") AND (SELECT generation FROM erasure_generation) = ").push_bind(stamp.erasures);
    sql.push(")");
}

/// In a unique-user statement, whether the stored spans of the hour starting at
/// `hour_start` are current: stamped with the hour's row of `event_totals_hourly` as it
/// is now, and nothing of the hour pending (see [`hour_spans`]).
fn push_spans_current<'a>(sql: &mut Sql<'a>, hour_start: DateTime<Utc>) {
    sql.push("(EXISTS (SELECT 1 FROM user_activity_hour_spans spans JOIN event_totals_hourly totals ON totals.bucket_start = spans.hour_start AND totals.version = spans.version AND totals.event_count = spans.event_count WHERE spans.hour_start = ");
    sql.push_bind(hour_start);
    sql.push(") AND NOT EXISTS (SELECT 1 FROM event_count_deltas WHERE bucket_start = ")
        .push_bind(hour_start);
    sql.push(") AND NOT EXISTS (SELECT 1 FROM user_activity_pending WHERE hour_start = ")
        .push_bind(hour_start);
    sql.push("))");
}

/// Whether the live spans of the hour starting at `hour_start` (migration V8) answer for
/// its users in the statement's snapshot: its live row is stamped with the version of its
/// bitmap row, or it has neither (nothing of it folded yet), and every pending row of it
/// carries seconds, and no deletion of its events waits to be folded (a fold of one drops
/// the live row).
fn push_live_spans_current<'a>(sql: &mut Sql<'a>, hour_start: DateTime<Utc>) {
    sql.push("(SELECT CASE WHEN bitmap.version IS NULL THEN live.hour_start IS NULL ELSE live.bitmap_version IS NOT DISTINCT FROM bitmap.version END FROM (SELECT 1) one LEFT JOIN user_activity_hourly bitmap ON bitmap.bucket_start = ");
    sql.push_bind(hour_start);
    sql.push(" LEFT JOIN user_activity_live_spans live ON live.hour_start = ").push_bind(hour_start);
    sql.push(") AND NOT EXISTS (SELECT 1 FROM user_activity_pending WHERE hour_start = ")
        .push_bind(hour_start);
    sql.push(
        " AND first_seconds IS NULL) AND NOT EXISTS (SELECT 1 FROM event_count_deltas WHERE bucket_start = ",
    )
    .push_bind(hour_start);
    sql.push(" AND event_count < 0)");
}

/// Up to this many raw segments are read by one branch each, with their bounds in the
/// statement; more (a zone offset by 30 or 45 minutes cuts an hour at every bucket
/// boundary) by one join with the unnested bounds. That join lets PostgreSQL prune no
/// partition while planning, so it plans an index scan on each of them: on a 1M-event
/// countbench database with 7 monthly partitions, a cache hit's statement planned in
/// 1.2-1.4 ms with the open hour as its own branch against 1.9-2.2 ms joined.
const MAX_PRUNED_RAW_SEGMENTS: usize = 4;

/// Which part of an [`EventCountPlan`] a count query reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CountPart {
    /// The folded day and hour rows of the whole hours: what the cache keeps.
    Folded,
    /// What is always read fresh: the deltas not folded yet over the whole hours and the
    /// raw events of the partial hours.
    Fresh,
    /// Both.
    Whole,
}

/// The values an event count query binds, computed once per call.
struct CountBinds<'a> {
    days: Bounds,
    hours: Bounds,
    /// The folded segments and the edge hours: where the deltas are read.
    deltas: Bounds,
    edge_hours: Bounds,
    /// The raw segments inside the range, then those outside it, with the sign their
    /// events count with (1 inside, -1 outside), but for those in `summarised`.
    raw: Bounds,
    raw_signs: Vec<i32>,
    /// Whether each raw segment lies in one bucket (a partial edge hour that does, or
    /// any segment when ungrouped), so its events may all carry the segment start's label.
    raw_labelled: Vec<bool>,
    /// Raw segments in edge hours this replica keeps a summary of: their counts come from
    /// the summary when the statement finds it holding, else from the raw rows.
    summarised: Vec<SummarisedPart>,
    /// Edge hours whose raw segments a summary could have answered, had one been kept.
    unsummarised_hours: Vec<i64>,
    /// The whole hours the stamp covers.
    rollup_start: DateTime<Utc>,
    rollup_end: DateTime<Utc>,
    event_name: Option<&'a str>,
    group_by: Option<GroupBy>,
    zone: &'static str,
}

/// A raw segment of an edge hour with a kept summary, and the summary's counts for it.
struct SummarisedPart {
    hour_start: i64,
    stamp: HourStamp,
    low: DateTime<Utc>,
    high: DateTime<Utc>,
    /// 1 inside the range, -1 outside (already applied to `counts`).
    sign: i32,
    names: Vec<String>,
    counts: Vec<i64>,
}

impl<'a> CountBinds<'a> {
    /// The binds of `plan`; with `edge_hours`, the raw segments of edge hours that have a
    /// kept summary are read from it (see [`SummarisedPart`]).
    fn new(filter: &'a EventFilter, plan: &EventCountPlan, edge_hours: Option<&EdgeHourMemory>) -> Self {
        let event_name = filter.event_name.as_ref().map(|name| name.as_str());
        let (mut raw, mut raw_signs, mut raw_labelled) = ((Vec::new(), Vec::new()), Vec::new(), Vec::new());
        let (mut summarised, mut unsummarised_hours) = (Vec::new(), Vec::new());
        let segments = plan.raw.intervals().map(|segment| (segment, 1));
        for ((start, end), sign) in segments.chain(plan.raw_outside.intervals().map(|segment| (segment, -1)))
        {
            let hour_start = floor_to(start, HOUR_SECONDS);
            let labelled = end <= hour_start + HOUR_SECONDS && plan.labelled_edge_hours.contains(&hour_start);
            let memory = edge_hours.filter(|_| labelled);
            if let Some(summary) = memory.and_then(|memory| memory.get(hour_start)) {
                let (names, counts) = (summary.events_within(&PartialHour { start, end }, event_name))
                    .into_iter()
                    .map(|(name, count)| (name, count * i64::from(sign)))
                    .unzip();
                summarised.push(SummarisedPart {
                    hour_start,
                    stamp: summary.stamp,
                    low: time(start),
                    high: time(end),
                    sign,
                    names,
                    counts,
                });
                continue;
            }
            if memory.is_some() {
                unsummarised_hours.push(hour_start);
            }
            raw.0.push(time(start));
            raw.1.push(time(end));
            raw_signs.push(sign);
            raw_labelled.push(labelled || filter.group_by.is_none());
        }
        Self {
            days: plan.days.bounds(),
            hours: plan.hours.bounds(),
            deltas: plan.delta_segments().bounds(),
            edge_hours: plan.edge_hours.bounds(),
            raw,
            raw_signs,
            raw_labelled,
            summarised,
            unsummarised_hours,
            rollup_start: time(plan.split.rollup_start),
            rollup_end: time(plan.split.rollup_end),
            event_name,
            group_by: filter.group_by,
            zone: filter.time_zone.name(),
        }
    }
}

/// `{column} >= start AND {column} < end`.
fn push_within(sql: &mut Sql<'_>, column: &str, start: DateTime<Utc>, end: DateTime<Utc>) {
    sql.push(format_args!("{column} >= ")).push_bind(start);
    sql.push(format_args!(" AND {column} < ")).push_bind(end);
}

/// ` FROM unnest(starts, ends) AS segment(low, high)`: one row per segment.
fn push_segments<'a>(sql: &mut Sql<'a>, (starts, ends): &'a Bounds) {
    sql.push(" FROM unnest(").push_bind(starts).push("::timestamptz[], ");
    sql.push_bind(ends).push("::timestamptz[]) AS segment(low, high)");
}

/// Rows of `table` (`slice_start`, `event_name`, `event_count`) whose `bucket_start` lies
/// in one of `segments`: one index range scan per segment.
fn push_segment_rows<'a>(sql: &mut Sql<'a>, table: &str, segments: &'a Bounds, event_name: Option<&'a str>) {
    sql.push("SELECT rollup.bucket_start AS slice_start, rollup.event_name, rollup.event_count");
    push_segments(sql, segments);
    sql.push(format_args!(
        " JOIN {table} rollup ON rollup.bucket_start >= segment.low AND rollup.bucket_start < segment.high"
    ));
    if let Some(name) = event_name {
        sql.push(" AND rollup.event_name = ").push_bind(name);
    }
}

/// The bucket start (Unix seconds) of the instant `column` in `zone`, 0 when ungrouped.
/// Hours are cut at the local hour so a repeated local hour (DST end) stays two buckets;
/// days and weeks use PostgreSQL's zone-aware `date_trunc` (weeks start on Monday), so a
/// day starts at local midnight whatever the zone's offset.
fn push_bucket<'a>(sql: &mut Sql<'a>, group_by: Option<GroupBy>, column: &str, zone: &'a str) {
    match group_by {
        None => sql.push("0::bigint"),
        Some(GroupBy::Hour) => sql
            .push(format_args!("EXTRACT(EPOCH FROM {column} - (({column} AT TIME ZONE "))
            .push_bind(zone)
            .push(format_args!(") - date_trunc('hour', {column} AT TIME ZONE "))
            .push_bind(zone)
            .push(")))::bigint"),
        Some(group_by @ (GroupBy::Day | GroupBy::Week)) => sql
            .push(format_args!("EXTRACT(EPOCH FROM date_trunc('{}', {column}, ", group_by.as_str()))
            .push_bind(zone)
            .push("))::bigint"),
    };
}

/// `(event_name, bucket, count)` of `part` of the plan (bucket 0 when ungrouped), counts
/// that add up to zero left out. Every row read lies inside one bucket (see
/// [`EventCountPlan`]), so it is labelled by its own start; the raw events of a segment
/// known to lie in one bucket are counted per name under the segment's start, other raw
/// events each under its own time; those outside the range (of the edge hours read
/// whole) count negatively.
/// Summarised parts read whether their summary holds from the `summaries` CTE that
/// [`push_stamped_parts`] writes, the only caller whose binds have them.
fn push_event_counts<'a>(sql: &mut Sql<'a>, binds: &'a CountBinds<'a>, part: CountPart) {
    if part == CountPart::Folded && binds.group_by == Some(GroupBy::Hour) && binds.days.0.is_empty() {
        push_folded_hour_counts(sql, binds);
        return;
    }
    sql.push("SELECT counted.event_name::text AS event_name, counted.bucket,");
    sql.push(" sum(counted.event_count)::bigint AS count FROM (SELECT slices.event_name, ");
    push_bucket(sql, binds.group_by, "slices.slice_start", binds.zone);
    sql.push(" AS bucket, slices.event_count FROM (");
    let mut sources = Vec::new();
    if part != CountPart::Fresh {
        sources.push(("event_counts_daily", &binds.days));
        sources.push(("event_counts_hourly", &binds.hours));
    }
    if part != CountPart::Folded {
        sources.push(("event_counts_hourly", &binds.edge_hours));
        sources.push(("event_count_deltas", &binds.deltas));
    }
    // A source without segments is left out, and so is the raw branch without segments:
    // PostgreSQL would still plan them (the raw branch's join with `events` plans every
    // partition, about a millisecond per call).
    sources.retain(|(_, segments)| !segments.0.is_empty());
    let mut branches = 0;
    let mut next_branch = |sql: &mut Sql<'a>| {
        if branches > 0 {
            sql.push(" UNION ALL ");
        }
        branches += 1;
    };
    for (table, segments) in sources {
        next_branch(sql);
        push_segment_rows(sql, table, segments, binds.event_name);
    }
    // The raw events of a segment that lies in one bucket (an edge hour's part) are
    // counted per name and labelled by the segment's start, so the bucket's label is
    // computed per name, not per event (`date_trunc` with a zone parses the zone each
    // time: 9% of PostgreSQL's time in a profile of the dashboard mix).
    if part != CountPart::Folded && binds.raw.0.len() <= MAX_PRUNED_RAW_SEGMENTS {
        // A few segments (the range's edges): each its own branch, its bounds compared
        // with `timestamp` directly, so PostgreSQL plans only the partition it lies in.
        let segments = binds.raw.0.iter().zip(&binds.raw.1).zip(&binds.raw_signs).zip(&binds.raw_labelled);
        for (((&low, &high), &sign), &labelled) in segments {
            next_branch(sql);
            push_raw_rows(sql, low, high, sign, labelled, binds.event_name);
            if labelled {
                sql.push(" GROUP BY event.event_name");
            }
        }
    } else if part != CountPart::Folded {
        next_branch(sql);
        // Segments that touch merge, so one may span buckets: each event is labelled by
        // its own time.
        sql.push(
            "SELECT event.timestamp AS slice_start, event.event_name, segment.sign::bigint AS event_count",
        );
        sql.push(" FROM unnest(").push_bind(&binds.raw.0).push("::timestamptz[], ").push_bind(&binds.raw.1);
        sql.push("::timestamptz[], ")
            .push_bind(&binds.raw_signs)
            .push("::integer[]) AS segment(low, high, sign)");
        sql.push(" JOIN events event ON event.timestamp >= segment.low AND event.timestamp < segment.high");
        if let Some(name) = binds.event_name {
            sql.push(" AND event.event_name = ").push_bind(name);
        }
    }
    if part != CountPart::Folded {
        // Each summarised part: its raw rows unless its summary holds, and the summary's
        // counts if it does.
        for (index, part) in binds.summarised.iter().enumerate() {
            next_branch(sql);
            push_raw_rows(sql, part.low, part.high, part.sign, true, binds.event_name);
            sql.push(format_args!(
                " AND NOT (SELECT holds_{index} FROM summaries) GROUP BY event.event_name"
            ));
            next_branch(sql);
            sql.push("SELECT ")
                .push_bind(part.low)
                .push("::timestamptz AS slice_start, counts.event_name, counts.event_count");
            sql.push(" FROM unnest(").push_bind(&part.names).push("::text[], ").push_bind(&part.counts);
            sql.push(format_args!(
                "::bigint[]) AS counts(event_name, event_count) WHERE (SELECT holds_{index} FROM summaries)"
            ));
        }
    }
    if branches == 0 {
        sql.push("SELECT NULL::timestamptz AS slice_start, NULL::text AS event_name, 0::bigint AS event_count WHERE false");
    }
    sql.push(") slices");
    sql.push(") counted GROUP BY 1, 2 HAVING sum(counted.event_count) <> 0");
}

/// The raw events in `[low, high)` (of `event_name` only, when given) as slices of
/// `sign` events: `labelled`, counted under `low` (to be grouped by name; the segment
/// lies in one bucket); else one slice per event at its own time.
fn push_raw_rows<'a>(
    sql: &mut Sql<'a>,
    low: DateTime<Utc>,
    high: DateTime<Utc>,
    sign: i32,
    labelled: bool,
    event_name: Option<&'a str>,
) {
    if labelled {
        sql.push("SELECT ").push_bind(low);
        sql.push(format_args!("::timestamptz AS slice_start, event.event_name, {sign}::bigint * count(*)"));
    } else {
        sql.push(format_args!("SELECT event.timestamp AS slice_start, event.event_name, {sign}::bigint"));
    }
    sql.push(" AS event_count FROM events event WHERE ");
    push_within(sql, "event.timestamp", low, high);
    if let Some(name) = event_name {
        sql.push(" AND event.event_name = ").push_bind(name);
    }
}

/// The folded part of an hour-grouped count: its hour rows as they are, each labelled by
/// its own start, with neither the zone's label expression nor an aggregation. Each row
/// lies inside one bucket (see [`EventCountPlan`]), and an hour bucket is labelled by
/// `t` minus the time past the local hour at `t`, which is under an hour; constant over
/// a whole UTC hour `[h, h + 1 h)`, that label can only be `h` itself. So no two rows
/// share a (bucket, name), and each row is already its bucket's count. About 4 ms less
/// of PostgreSQL for the 3,360 rows of 7 days of 20 names than grouping them.
fn push_folded_hour_counts<'a>(sql: &mut Sql<'a>, binds: &'a CountBinds<'a>) {
    if binds.hours.0.is_empty() {
        sql.push("SELECT NULL::text AS event_name, 0::bigint AS bucket, 0::bigint AS count WHERE false");
        return;
    }
    sql.push("SELECT rollup.event_name::text AS event_name, EXTRACT(EPOCH FROM rollup.bucket_start)::bigint");
    sql.push(" AS bucket, rollup.event_count AS count");
    push_segments(sql, &binds.hours);
    sql.push(" JOIN event_counts_hourly rollup ON rollup.bucket_start >= segment.low");
    sql.push(" AND rollup.bucket_start < segment.high");
    if let Some(name) = binds.event_name {
        sql.push(" AND rollup.event_name = ").push_bind(name);
    }
    sql.push(" WHERE rollup.event_count <> 0");
}

/// The stamp of the plan's whole hours as part 0, then `parts` of the plan numbered as
/// given, as rows of (`part`, `event_name`, `bucket`, `count`); the stamp's row carries
/// (rows, sum of versions) of `event_totals_hourly` in `bucket` and `count`; part -1
/// carries the erasure generation in `count`; a row of part -2 names in `bucket` a
/// summarised part whose summary no longer holds (read raw).
fn push_stamped_parts<'a>(sql: &mut Sql<'a>, binds: &'a CountBinds<'a>, parts: &[(i32, CountPart)]) {
    // Whether each summarised part's summary holds, probed once: the rows below read it
    // three times (a 1M-event countbench hit planned in 1.5-1.7 ms this way against
    // 1.8-2.9 ms with the probes written out each time).
    for (index, part) in binds.summarised.iter().enumerate() {
        sql.push(if index == 0 { "WITH summaries AS MATERIALIZED (SELECT " } else { ", " });
        push_summary_holds(sql, time(part.hour_start), part.stamp);
        sql.push(format_args!(" AS holds_{index}"));
    }
    if !binds.summarised.is_empty() {
        sql.push(") ");
    }
    sql.push("SELECT 0 AS part, NULL::text AS event_name, count(*)::bigint AS bucket,");
    sql.push(" coalesce(sum(version), 0)::bigint AS count FROM event_totals_hourly WHERE ");
    push_within(sql, "bucket_start", binds.rollup_start, binds.rollup_end);
    sql.push(" UNION ALL SELECT -1, NULL::text, 0::bigint, generation FROM erasure_generation");
    for index in 0..binds.summarised.len() {
        sql.push(format_args!(
            " UNION ALL SELECT -2, NULL::text, {index}::bigint, 0::bigint WHERE NOT (SELECT holds_{index} FROM summaries)"
        ));
    }
    let bucket = if binds.group_by.is_some() { "counts.bucket" } else { "0::bigint" };
    for (number, part) in parts {
        sql.push(format_args!(
            " UNION ALL SELECT {number} AS part, counts.event_name::text AS event_name, {bucket} AS bucket, counts.count FROM ("
        ));
        push_event_counts(sql, binds, *part);
        sql.push(") counts");
    }
}

/// What a cached GetEventCount reads in one snapshot (see
/// [`RollupRepository::event_counts_parts`]).
#[derive(Clone, Debug, Default)]
pub struct EventCountParts {
    /// The folded part's counts, when asked for.
    pub folded: Option<Vec<EventCount>>,
    /// `(rows, sum of versions)` of `event_totals_hourly` over the folded part's hours,
    /// and the erasure generation.
    pub stamp: RollupStamp,
    /// The fresh part's counts.
    pub fresh: Vec<EventCount>,
}

/// What a unique-user count reads in one snapshot (see [`RollupRepository::user_count_parts`]).
#[derive(Clone, Debug, Default)]
pub struct UserCountParts {
    /// The union of the folded bitmaps, when asked for.
    pub folded: Option<RoaringBitmap>,
    /// (rows, sum of versions) of those bitmaps, and the erasure generation.
    pub stamp: RollupStamp,
    /// The users of the partial edge hours read whole: their hour bitmaps.
    pub edge_users: RoaringBitmap,
    /// Ordinals of users in the pending pairs and the raw edges, each once.
    pub unfolded_ordinals: Vec<u32>,
    /// Users in the pending pairs and the raw edges that have no ordinal yet.
    pub never_folded: u64,
    /// How many of the folded bitmaps came from this replica's memory rather than from
    /// PostgreSQL (see [`FoldedBitmapMemory`]).
    pub remembered_bitmaps: usize,
}

impl UserCountParts {
    /// The exact count, given the union of the folded bitmaps (read now or cached with an
    /// equal stamp).
    pub fn count(&self, folded: &RoaringBitmap) -> i64 {
        // The unfolded users are distinct ids, so their ordinals are distinct:
        // the ones outside the bitmaps add one each, without copying the folded bitmap.
        let added = self
            .unfolded_ordinals
            .iter()
            .filter(|ordinal| !folded.contains(**ordinal) && !self.edge_users.contains(**ordinal))
            .count();
        (folded.union_len(&self.edge_users) + added as u64 + self.never_folded) as i64
    }
}

/// Runs count plans against the rollups.
#[derive(Clone, Debug)]
pub struct RollupRepository {
    /// Where the statements run: the primary, or a standby checked for this call (every
    /// statement takes its connection from here, never from a pool directly).
    database: CountSource,
    /// This replica's remembered user ordinals; without them a unique-user count probes
    /// `user_ordinals` for every user not folded yet.
    ordinals: Option<UserOrdinals>,
    /// This replica's summaries of folded hours; without them a count reads the part of a
    /// partial edge hour it cannot read whole from the raw events.
    edge_hours: Option<EdgeHourMemory>,
    /// This replica's decoded folded user bitmaps; without them a unique-user count not
    /// cached reads every folded bitmap of its range.
    folded_bitmaps: Option<FoldedBitmapMemory>,
}

impl RollupRepository {
    pub fn new(source: impl Into<CountSource>) -> Self {
        Self { database: source.into(), ordinals: None, edge_hours: None, folded_bitmaps: None }
    }

    /// Unique-user counts look up the ordinals of users not folded yet in `ordinals`
    /// first, and read only the others from PostgreSQL.
    pub fn with_user_ordinals(mut self, ordinals: UserOrdinals) -> Self {
        self.ordinals = Some(ordinals);
        self
    }

    /// Counts take a partial edge hour's part from `memory` when it holds a summary of
    /// the hour that the count's snapshot shows unchanged, and have one built for an hour
    /// they keep reading raw (see [`EdgeHourMemory`]). Event counts use it on the cached
    /// path ([`Self::event_counts_parts`]), where dashboards repeat their edge hours.
    pub fn with_edge_hours(mut self, memory: EdgeHourMemory) -> Self {
        self.edge_hours = Some(memory);
        self
    }

    /// Unique-user counts that read the folded bitmaps take the ones `memory` holds as
    /// they are in the count's snapshot from there, and remember the others (see
    /// [`FoldedBitmapMemory`]).
    pub fn with_folded_bitmaps(mut self, memory: FoldedBitmapMemory) -> Self {
        self.folded_bitmaps = Some(memory);
        self
    }

    /// `[first, last)` of the stored events: the first event's second and the second after
    /// the last one's, `None` when there is no event. One index probe per partition.
    pub async fn event_extent(&self) -> Result<Option<(i64, i64)>, RepositoryError> {
        let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = self
            .database
            .retry_policy()
            .with_retry("event_extent", || async {
                let mut connection = self.database.connection().await?;
                let value = sqlx::query_as("SELECT min(timestamp), max(timestamp) FROM events")
                    .fetch_one(&mut *connection)
                    .await?;
                connection.finish().await?;
                Ok(value)
            })
            .await?;
        Ok(first.zip(last).map(|(first, last)| (first.timestamp(), last.timestamp() + 1)))
    }

    /// Counts per event name (per bucket of the filter's zone when grouped) as `plan`
    /// reads them, ordered by bucket then name: the same answer as grouping the raw events
    /// when `plan` was built for `filter`.
    pub async fn event_counts(
        &self,
        filter: &EventFilter,
        plan: &EventCountPlan,
    ) -> Result<Vec<EventCount>, RepositoryError> {
        let binds = CountBinds::new(filter, plan, None);
        self.database
            .retry_policy()
            .with_retry("count_events_rollup", || async {
                let mut sql = Sql::new("");
                push_event_counts(&mut sql, &binds, CountPart::Whole);
                let mut connection = self.database.connection().await?;
                let rows = sql.build().fetch_all(&mut *connection).await?;
                connection.finish().await?;
                let mut counts =
                    event_counts_from_rows(&rows, filter.group_by.is_some(), filter.range.start())?;
                // Deltas of deleted events not folded yet may cancel a bucket out.
                counts.retain(|count| count.count != 0);
                // Ordered here, not in SQL: PostgreSQL then groups by hashing, and the order
                // is the same bytewise one the service's merge of cached and fresh parts gives,
                // whatever the collation.
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
        let binds = CountBinds::new(filter, plan, self.edge_hours.as_ref());
        let grouped = filter.group_by.is_some();
        let range_start = filter.range.start();
        let parts: &[(i32, CountPart)] = if with_folded {
            &[(2, CountPart::Fresh), (1, CountPart::Folded)]
        } else {
            &[(2, CountPart::Fresh)]
        };
        self.database
            .retry_policy()
            .with_retry("count_events_rollup", || async {
                let mut sql = Sql::new("");
                push_stamped_parts(&mut sql, &binds, parts);
                let mut connection = self.database.connection().await?;
                let rows = sql.build().fetch_all(&mut *connection).await?;
                connection.finish().await?;
                let rows: Vec<(i32, Option<String>, i64, i64)> = rows
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
                let mut raw_hours = binds.unsummarised_hours.clone();
                for (part, event_name, bucket, count) in rows {
                    let count = || EventCount {
                        event_name: event_name.clone().unwrap_or_default(),
                        bucket_start: if grouped { bucket } else { range_start },
                        count,
                    };
                    match part {
                        0 => {
                            parts.stamp.rows = bucket;
                            parts.stamp.sum = count().count;
                        }
                        -1 => parts.stamp.erasures = count().count,
                        -2 => raw_hours
                            .extend(binds.summarised.get(bucket as usize).map(|part| part.hour_start)),
                        1 => parts.folded.iter_mut().for_each(|folded| folded.push(count())),
                        _ => parts.fresh.push(count()),
                    }
                }
                raw_hours.sort_unstable();
                raw_hours.dedup();
                let mut summarised_hours: Vec<i64> =
                    binds.summarised.iter().map(|part| part.hour_start).collect();
                summarised_hours.dedup();
                summarised_hours.retain(|hour_start| !raw_hours.contains(hour_start));
                metrics::record_edge_hours("event_count", summarised_hours.len(), 0, 0, raw_hours.len());
                self.note_raw_edge_hours(raw_hours);
                Ok(parts)
            })
            .await
    }

    /// The erasure generation: what an immutable cached answer is checked against.
    pub async fn erasure_generation(&self) -> Result<i64, RepositoryError> {
        self.database
            .retry_policy()
            .with_retry("erasure_generation", || async {
                let mut connection = self.database.connection().await?;
                let value = sqlx::query_scalar("SELECT generation FROM erasure_generation")
                    .fetch_one(&mut *connection)
                    .await?;
                connection.finish().await?;
                Ok(value)
            })
            .await
    }

    /// Exact distinct non-empty user ids with an event in the range `split` covers.
    pub async fn unique_users(&self, split: RangeSplit) -> Result<i64, RepositoryError> {
        let parts = self.user_count_parts(split, true).await?;
        Ok(parts.count(parts.folded.as_ref().unwrap_or(&RoaringBitmap::new())))
    }

    /// Reads, in one statement (so one snapshot, one round trip), the stamp of the folded
    /// bitmaps of the whole UTC days and hours of `split` (and, `with_bitmaps`, their
    /// union), and the users not folded yet: the ordinals of the pending pairs of those
    /// hours and of the partial hours at the edges. An edge hour with no event in its part
    /// outside the range (an open end hour, nearly always) is read whole from its hour
    /// bitmap and pending pairs; any other from this replica's kept summary of the hour, or
    /// the hour's stored spans ([`hour_spans`]), when the statement finds either current,
    /// else from the raw events (see [`reads_hour_minus_outside`]).
    ///
    /// With remembered ordinals ([`Self::with_user_ordinals`]) the statement returns the
    /// unfolded users' ids; those this replica does not remember are read by a second
    /// statement on the same connection, which also reads the erasure generation. An equal
    /// generation means no erasure committed in between, so no ordinal the first
    /// statement could see was deleted, and an ordinal assigned since belongs to a user in
    /// none of the first statement's bitmaps: the union is the same. Should an erasure
    /// have committed in between, the count is read again with the probes in the one
    /// statement.
    pub async fn user_count_parts(
        &self,
        split: RangeSplit,
        with_bitmaps: bool,
    ) -> Result<UserCountParts, RepositoryError> {
        if let Some(ordinals) = &self.ordinals {
            if let Some(parts) = self.read_user_count_parts(split, with_bitmaps, Some(ordinals)).await? {
                return Ok(parts);
            }
            metrics::record_user_ordinals_reread();
        }
        let parts = self.read_user_count_parts(split, with_bitmaps, None).await?;
        Ok(parts.expect("a count probing its ordinals in its own statement is always consistent"))
    }

    /// One attempt of [`Self::user_count_parts`]: with `ordinals`, `None` when an erasure
    /// committed between its two statements; without, the ordinals are probed in the
    /// statement.
    async fn read_user_count_parts(
        &self,
        split: RangeSplit,
        with_bitmaps: bool,
        ordinals: Option<&UserOrdinals>,
    ) -> Result<Option<UserCountParts>, RepositoryError> {
        let [_, rollup_start, day_start, day_end, rollup_end, _] = split.instants();
        let bitmap_sources = [
            (BitmapTable::Daily, day_start, day_end),
            (BitmapTable::Hourly, rollup_start, day_start),
            (BitmapTable::Hourly, day_end, rollup_end),
        ];
        // The folded bitmaps of the range this replica remembers, and their keys as the
        // statement compares them, per source.
        let mut remembered = HashMap::new();
        let mut remembered_keys: [Vec<String>; 3] = Default::default();
        if let (true, Some(memory)) = (with_bitmaps, &self.folded_bitmaps) {
            for (index, (table, from, to)) in bitmap_sources.into_iter().enumerate() {
                let step = match table {
                    BitmapTable::Daily => DAY_SECONDS,
                    BitmapTable::Hourly => HOUR_SECONDS,
                };
                for bucket in (from.timestamp()..to.timestamp()).step_by(step as usize) {
                    if let Some(bitmap) = memory.get(table, bucket) {
                        remembered_keys[index].push(bitmap.identity.key(bucket));
                        remembered.insert((table, bucket), bitmap);
                    }
                }
            }
        }
        let partial_hours: Vec<PartialHour> = split.partial_hours().collect();
        // The kept summaries of the partial hours that one can answer.
        let summaries: Vec<Option<Arc<HourSummary>>> = partial_hours
            .iter()
            .map(|part| {
                let memory = self.edge_hours.as_ref().filter(|_| HourSummary::answers_users(part))?;
                memory.get(part.hour().0)
            })
            .collect();
        let minus_outside: Vec<bool> = partial_hours.iter().map(reads_hour_minus_outside).collect();
        self.database
            .retry_policy()
            .with_retry("count_unique_users_rollup", || async {
                // Whether each partial hour is read whole: no event in its part outside the
                // range, checked in the statement's own snapshot (one index probe each); if
                // not, whether its kept summary still holds (a few index probes).
                let mut sql = Sql::new("");
                for (index, part) in partial_hours.iter().enumerate() {
                    sql.push(if index == 0 { "WITH edges AS MATERIALIZED (SELECT true" } else { ", true" });
                    for (from, to) in part.outside().into_iter().filter(|(from, to)| from < to) {
                        sql.push(" AND NOT EXISTS (SELECT 1 FROM events WHERE ");
                        push_within(&mut sql, "timestamp", time(from), time(to));
                        sql.push(")");
                    }
                    sql.push(format_args!(" AS whole_{index}, "));
                    match &summaries[index] {
                        Some(summary) => push_summary_holds(&mut sql, time(part.hour().0), summary.stamp),
                        None => {
                            sql.push("false");
                        }
                    }
                    sql.push(format_args!(" AS summary_{index}, "));
                    if HourSummary::answers_users(part) {
                        push_spans_current(&mut sql, time(part.hour().0));
                    } else {
                        sql.push("false");
                    }
                    sql.push(format_args!(" AS spans_{index}, "));
                    if HourSummary::answers_users(part) {
                        push_live_spans_current(&mut sql, time(part.hour().0));
                    } else {
                        sql.push("false");
                    }
                    sql.push(format_args!(" AS live_{index}, "));
                    if minus_outside[index] {
                        sql.push("NOT EXISTS (SELECT 1 FROM user_activity_pending WHERE hour_start = ");
                        sql.push_bind(time(part.hour().0)).push(")");
                    } else {
                        sql.push("false");
                    }
                    sql.push(format_args!(" AS settled_{index}"));
                }
                if !partial_hours.is_empty() {
                    sql.push(") ");
                }
                for (index, (table, from, to)) in bitmap_sources.into_iter().enumerate() {
                    let kind = match table {
                        BitmapTable::Daily => FOLDED_DAY_BITMAP,
                        BitmapTable::Hourly => FOLDED_HOUR_BITMAP,
                    };
                    sql.push(format_args!("SELECT {kind} AS kind, "));
                    if with_bitmaps {
                        // The bytes only of the rows this replica does not remember as
                        // they are in this snapshot (see [`FoldedBitmapMemory`]).
                        sql.push(format_args!("CASE WHEN {ROW_KEY_SQL} = ANY("));
                        sql.push_bind(&remembered_keys[index]).push(") THEN NULL ELSE users END");
                        sql.push(", version, NULL::integer[], NULL::text[], extract(epoch FROM bucket_start)::bigint, xmin::text::bigint");
                    } else {
                        // The stamp only (a cache hit's statement).
                        sql.push("NULL::bytea, version, NULL::integer[], NULL::text[], NULL::bigint, NULL::bigint");
                    }
                    sql.push(format_args!(" FROM {} WHERE ", table.name()));
                    push_within(&mut sql, "bucket_start", from, to);
                    sql.push(" UNION ALL ");
                }
                for (index, part) in partial_hours.iter().enumerate() {
                    sql.push(format_args!(
                        "SELECT {EDGE_BITMAP}, users, NULL::bigint, NULL::integer[], NULL::text[], NULL::bigint, NULL::bigint FROM user_activity_hourly WHERE bucket_start = "
                    ));
                    sql.push_bind(time(part.hour().0));
                    sql.push(format_args!(" AND (SELECT whole_{index} FROM edges) UNION ALL "));
                    sql.push(format_args!(
                        "SELECT {EDGE_SUMMARY}, NULL::bytea, {index}::bigint, NULL::integer[], NULL::text[], NULL::bigint, NULL::bigint WHERE (SELECT summary_{index} AND NOT whole_{index} FROM edges) UNION ALL "
                    ));
                    sql.push(format_args!(
                        "SELECT {EDGE_SPANS}, spans, {index}::bigint, NULL::integer[], NULL::text[], NULL::bigint, NULL::bigint FROM user_activity_hour_spans WHERE hour_start = "
                    ));
                    sql.push_bind(time(part.hour().0));
                    sql.push(format_args!(
                        " AND (SELECT spans_{index} AND NOT whole_{index} AND NOT summary_{index} FROM edges) UNION ALL "
                    ));
                    sql.push(format_args!(
                        "SELECT {EDGE_LIVE_SPANS}, (SELECT spans FROM user_activity_live_spans WHERE hour_start = "
                    ));
                    sql.push_bind(time(part.hour().0));
                    sql.push(format_args!(
                        "), {index}::bigint, NULL::integer[], NULL::text[], NULL::bigint, NULL::bigint WHERE (SELECT live_{index} AND NOT (whole_{index} OR summary_{index} OR spans_{index}) FROM edges) UNION ALL "
                    ));
                    sql.push(format_args!(
                        "SELECT {EDGE_RAW}, NULL::bytea, {index}::bigint, NULL::integer[], NULL::text[], NULL::bigint, NULL::bigint WHERE (SELECT NOT (whole_{index} OR summary_{index} OR spans_{index} OR live_{index}) FROM edges) UNION ALL "
                    ));
                    if minus_outside[index] {
                        // The users seen only outside, each probed (an id without an ordinal
                        // is in no bitmap, so there is nothing to take away for it).
                        sql.push(format_args!(
                            "SELECT {EDGE_BITMAP_MINUS_OUTSIDE}, users, {index}::bigint, (SELECT array_agg((SELECT ordinal FROM user_ordinals ordinals WHERE ordinals.user_id = only_outside.user_id)) FROM (SELECT user_id FROM events WHERE "
                        ));
                        for (number, (from, to)) in part.outside().into_iter().filter(|(from, to)| from < to).enumerate() {
                            sql.push(if number == 0 { "(" } else { " OR (" });
                            push_within(&mut sql, "timestamp", time(from), time(to));
                            sql.push(")");
                        }
                        sql.push(" AND user_id IS NOT NULL AND user_id <> '' EXCEPT SELECT user_id FROM events WHERE ");
                        push_within(&mut sql, "timestamp", time(part.start), time(part.end));
                        sql.push(") only_outside), NULL::text[], NULL::bigint, NULL::bigint FROM user_activity_hourly WHERE bucket_start = ");
                        sql.push_bind(time(part.hour().0));
                        sql.push(format_args!(
                            " AND (SELECT settled_{index} AND NOT (whole_{index} OR summary_{index} OR spans_{index} OR live_{index}) FROM edges) UNION ALL "
                        ));
                    }
                }
                // Without remembered ordinals, one index probe per distinct id not folded yet
                // (never a pass over every ordinal); an id without an ordinal has never been
                // folded, so it is in no bitmap.
                let ordinals_column = if ordinals.is_some() {
                    "NULL::integer[]"
                } else {
                    "array_agg((SELECT ordinal FROM user_ordinals ordinals WHERE ordinals.user_id = unfolded.user_id))"
                };
                sql.push(format_args!(
                    "SELECT {UNFOLDED_USERS}, NULL::bytea, NULL::bigint, {ordinals_column}, array_agg(unfolded.user_id::text), NULL::bigint, NULL::bigint"
                ));
                sql.push(" FROM (SELECT DISTINCT user_id FROM (SELECT unnest(user_ids) AS user_id FROM user_activity_pending WHERE ");
                push_within(&mut sql, "hour_start", rollup_start, rollup_end);
                for (index, part) in partial_hours.iter().enumerate() {
                    sql.push(" UNION ALL SELECT unnest(user_ids) FROM user_activity_pending WHERE hour_start = ");
                    sql.push_bind(time(part.hour().0));
                    sql.push(format_args!(" AND (SELECT whole_{index} FROM edges)"));
                    if HourSummary::answers_users(part) {
                        // The pending users of a part its live spans answer: those whose
                        // seconds in their row fall in the part (as in `users_within`).
                        let (hour_start, hour_end) = part.hour();
                        sql.push(" UNION ALL SELECT pending.user_id FROM user_activity_pending rows, unnest(rows.user_ids, rows.first_seconds, rows.last_seconds) AS pending(user_id, first_second, last_second) WHERE rows.hour_start = ");
                        sql.push_bind(time(hour_start));
                        if part.end == hour_end {
                            sql.push(" AND pending.last_second >= ").push_bind((part.start - hour_start) as i32);
                        } else {
                            sql.push(" AND pending.first_second < ").push_bind((part.end - hour_start) as i32);
                        }
                        sql.push(format_args!(
                            " AND (SELECT live_{index} AND NOT (whole_{index} OR summary_{index} OR spans_{index}) FROM edges)"
                        ));
                    }
                    sql.push(" UNION ALL SELECT user_id FROM events WHERE ");
                    push_within(&mut sql, "timestamp", time(part.start), time(part.end));
                    sql.push(format_args!(
                        " AND user_id IS NOT NULL AND user_id <> '' AND NOT (SELECT whole_{index} OR summary_{index} OR spans_{index} OR live_{index} OR settled_{index} FROM edges)"
                    ));
                }
                sql.push(") ids) unfolded");
                // The erasure generation, part of the stamp.
                sql.push(format_args!(
                    " UNION ALL SELECT {ERASURE_GENERATION}, NULL::bytea, generation, NULL::integer[], NULL::text[], NULL::bigint, NULL::bigint FROM erasure_generation"
                ));
                let mut connection = self.database.connection().await?;
                // A cache hit's statement (the stamp and the fresh parts, no bitmaps) is what
                // a dashboard repeats: planned once per connection and statement text, not
                // per call. With all its branches it planned in 2-4 ms a call and executed in
                // about 1 (statement log of the 10M dashboard mix); a generic plan binds in
                // 0.4-0.6 ms. Building one costs more than one custom plan, so a count that
                // reads the bitmaps (a new range, mostly asked once) is planned per call.
                if !with_bitmaps {
                    connection.prefer_generic_plans().await?;
                }
                let rows: Vec<UserCountRow> = sql.build_query_as().fetch_all(&mut *connection).await?;
                let mut stamp = RollupStamp::default();
                let mut bitmaps: Vec<Arc<RoaringBitmap>> = Vec::new();
                let mut remembered_bitmaps = 0;
                let mut edge_users = RoaringBitmap::new();
                let mut never_folded = 0;
                let mut unfolded_ordinals = Vec::new();
                let mut unfolded_ids = Vec::new();
                let mut raw_hours = Vec::new();
                let mut summarised_hours = 0;
                let mut spanned_hours = 0;
                let mut live_hours = 0;
                for (kind, users, version, probed, user_ids, bucket, row_xmin) in rows {
                    match kind {
                        ERASURE_GENERATION => stamp.erasures = version.unwrap_or_default(),
                        FOLDED_DAY_BITMAP | FOLDED_HOUR_BITMAP => {
                            stamp.rows += 1;
                            stamp.sum += version.unwrap_or_default();
                            if with_bitmaps {
                                let table = if kind == FOLDED_DAY_BITMAP { BitmapTable::Daily } else { BitmapTable::Hourly };
                                let bucket = bucket.unwrap_or_default();
                                let identity =
                                    RowIdentity { xmin: row_xmin.unwrap_or_default(), version: version.unwrap_or_default() };
                                match users {
                                    Some(bytes) => {
                                        let decoded = Arc::new(decode_users(&bytes).map_err(RepositoryError::corrupt)?);
                                        if let Some(memory) = &self.folded_bitmaps {
                                            memory.remember(table, bucket, identity, decoded.clone(), bytes.len());
                                        }
                                        bitmaps.push(decoded);
                                    }
                                    // Remembered as it is in this snapshot: the statement
                                    // matched the identity sent for this bucket.
                                    None => match remembered.get(&(table, bucket)) {
                                        Some(bitmap) if bitmap.identity == identity => {
                                            remembered_bitmaps += 1;
                                            bitmaps.push(bitmap.users.clone());
                                        }
                                        _ => {
                                            return Err(RepositoryError::corrupt(std::io::Error::other(format!(
                                                "{} row {bucket} came without its bitmap and is not remembered",
                                                table.name()
                                            ))))
                                        }
                                    },
                                }
                            }
                        }
                        EDGE_BITMAP => {
                            edge_users |= decode_users(&users.unwrap_or_default()).map_err(RepositoryError::corrupt)?;
                        }
                        EDGE_BITMAP_MINUS_OUTSIDE => {
                            let mut users = decode_users(&users.unwrap_or_default()).map_err(RepositoryError::corrupt)?;
                            for ordinal in probed.unwrap_or_default().into_iter().flatten() {
                                users.remove(ordinal as u32);
                            }
                            edge_users |= users;
                        }
                        // A live row's pending users came with the unfolded ones.
                        EDGE_SPANS | EDGE_LIVE_SPANS => {
                            let part = &partial_hours[version.unwrap_or_default() as usize];
                            let spans = users.unwrap_or_default();
                            edge_users |= hour_spans::users_within(&spans, part).map_err(RepositoryError::corrupt)?;
                            match kind {
                                EDGE_SPANS => spanned_hours += 1,
                                _ => live_hours += 1,
                            }
                        }
                        EDGE_SUMMARY | EDGE_RAW => {
                            let index = version.unwrap_or_default() as usize;
                            match (&summaries[index], kind) {
                                (Some(summary), EDGE_SUMMARY) => {
                                    edge_users |= summary.users_within(&partial_hours[index]);
                                    summarised_hours += 1;
                                }
                                _ => raw_hours.push(partial_hours[index]),
                            }
                        }
                        // UNFOLDED_USERS (`NULL` arrays when there are none).
                        _ => {
                            let probed = probed.unwrap_or_default();
                            for (index, user_id) in user_ids.unwrap_or_default().into_iter().enumerate() {
                                match (probed.get(index).copied().flatten(), ordinals.is_some()) {
                                    (Some(ordinal), _) => {
                                        unfolded_ordinals.push(ordinal as u32);
                                        unfolded_ids.push((user_id, ordinal as u32));
                                    }
                                    (None, false) => never_folded += 1,
                                    (None, true) => unfolded_ids.push((user_id, u32::MAX)),
                                }
                            }
                        }
                    }
                }
                match ordinals {
                    // The statement probed: remember what it read.
                    None => {
                        if let Some(remembered) = &self.ordinals {
                            for (user_id, ordinal) in unfolded_ids {
                                remembered.remember(user_id, ordinal, stamp.erasures);
                            }
                        }
                    }
                    Some(remembered) => {
                        let mut unknown = Vec::new();
                        for (user_id, _) in unfolded_ids {
                            match remembered.get(&user_id, stamp.erasures) {
                                Some(ordinal) => unfolded_ordinals.push(ordinal),
                                None => unknown.push(user_id),
                            }
                        }
                        metrics::record_user_ordinals_lookups(unfolded_ordinals.len(), unknown.len());
                        if !unknown.is_empty() {
                            let found: Vec<(Option<String>, i64)> = sqlx::query_as(USER_ORDINALS_AND_GENERATION)
                                .bind(&unknown)
                                .fetch_all(&mut *connection)
                                .await?;
                            let generation = found.iter().find(|(user_id, _)| user_id.is_none()).map(|row| row.1);
                            let Some(generation) = generation else {
                                return Err(RepositoryError::corrupt(std::io::Error::other("erasure_generation has no row")));
                            };
                            let mut with_ordinal = 0;
                            for (user_id, ordinal) in found {
                                if let Some(user_id) = user_id {
                                    with_ordinal += 1;
                                    unfolded_ordinals.push(ordinal as u32);
                                    remembered.remember(user_id, ordinal as u32, generation);
                                }
                            }
                            if generation != stamp.erasures {
                                connection.finish().await?;
                                return Ok(None);
                            }
                            never_folded += (unknown.len() - with_ordinal) as u64;
                        }
                    }
                }
                connection.finish().await?;
                metrics::record_edge_hours("user_count", summarised_hours, spanned_hours, live_hours, raw_hours.len());
                self.note_raw_edge_hours(raw_hours.iter().filter(|part| HourSummary::answers_users(part)).map(|part| part.hour().0));
                let folded = if with_bitmaps {
                    metrics::record_folded_bitmaps(remembered_bitmaps, bitmaps.len() - remembered_bitmaps);
                    Some(bitmaps.iter().map(|bitmap| bitmap.as_ref()).union())
                } else {
                    None
                };
                Ok(Some(UserCountParts {
                    folded,
                    stamp,
                    edge_users,
                    unfolded_ordinals,
                    never_folded,
                    remembered_bitmaps,
                }))
            })
            .await
    }

    /// Notes the partial edge hours a count read raw although a summary could have
    /// answered, and builds in the background the summary of each one read raw often
    /// enough (see [`EdgeHourMemory`]).
    fn note_raw_edge_hours(&self, hour_starts: impl IntoIterator<Item = i64>) {
        let Some(memory) = &self.edge_hours else {
            return;
        };
        let now = chrono::Utc::now().timestamp();
        for hour_start in hour_starts {
            if !memory.note_raw_read(hour_start, now) {
                continue;
            }
            let Some(queued) = memory.queue_build() else {
                metrics::record_edge_hour_summary_dropped();
                continue;
            };
            // On the database this call reads (the primary, or the standby's pool): any
            // consistent snapshot will do, as each use checks the summary's stamp.
            let (database, memory) = (self.database.retry_policy().clone(), memory.clone());
            tokio::spawn(async move {
                let _turn = queued.turn().await;
                match read_hour_summary(&database, hour_start).await {
                    Ok(Some(summary)) => {
                        memory.keep(hour_start, summary);
                        metrics::record_edge_hour_summary_built();
                    }
                    Ok(None) => {}
                    Err(error) => tracing::debug!(%error, hour_start, "summarising an edge hour failed"),
                }
            });
        }
    }
}

/// The summary of the hour starting at `hour_start` ([`HourSummary`]), read in one
/// snapshot; `None` when the hour has no events, is not settled (deltas or users not
/// folded yet) or holds more than [`MAX_SUMMARY_EVENTS`] events.
pub(crate) async fn read_hour_summary(
    database: &super::Database,
    hour_start: i64,
) -> Result<Option<HourSummary>, RepositoryError> {
    let source = CountSource::Primary(database.clone());
    let mut connection = source.connection().await?;
    let rows: Vec<HourSummaryRow> = sqlx::query_as(HOUR_SUMMARY)
        .bind(time(hour_start))
        .bind(MAX_SUMMARY_EVENTS)
        .fetch_all(&mut *connection)
        .await?;
    connection.finish().await?;
    let mut stamp = None;
    let mut users = Vec::new();
    let mut events = Vec::new();
    for (kind, first, second, third, settled, name) in rows {
        match (kind, first, second, third) {
            (0, Some(version), Some(events), Some(erasures)) => {
                if settled != Some(true) || events > MAX_SUMMARY_EVENTS {
                    return Ok(None);
                }
                stamp = Some(HourStamp { version, events, erasures });
            }
            (1, Some(ordinal), Some(first_second), Some(last_second)) => {
                users.push((ordinal as u32, first_second as u16, last_second as u16));
            }
            (2, None, Some(second), Some(count)) => {
                events.push((name.unwrap_or_default(), second as u16, count))
            }
            // A user without an ordinal (not settled after all), or a malformed row.
            _ => return Ok(None),
        }
    }
    Ok(stamp.map(|stamp| HourSummary::new(stamp, users, events)))
}
