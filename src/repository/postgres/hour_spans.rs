//! The stored spans of closed hours (`user_activity_hour_spans`, migration V7): each
//! identified user's first and last second in a settled UTC hour, written in the
//! background by the span builder and read by unique-user counts for their partial edge
//! hours. Without them, a count whose range starts or ends inside an hour reads that
//! part's raw events and looks up each of its users' ordinals: at 10M events, thousands
//! of rows per edge hour, most of a cold GetUserCount's time. With them it reads one row
//! per edge hour.
//!
//! Never stale: a row is stamped with the hour's `event_totals_hourly` row (version,
//! event count) read in the builder's snapshot of a settled hour, and a count uses it only
//! when its own snapshot shows the same stamp and the hour still settled (no event-count
//! deltas or pending users of it): an insert or a delete in the hour appends both in its
//! own transaction, until a fold moves them and bumps the version. Unlike the replica's
//! in-memory summaries ([`super::edge_hours`]) the stamp leaves out the erasure
//! generation, so an erasure does not outdate every hour: an erased user's hours all
//! lose events (their versions change), ordinals are never given twice, and the erasure's
//! final transaction deletes the spans of the hours it recorded.
//!
//! Bounded work: the fold task runs a builder pass ([`build_hour_spans`]), one
//! transaction holding an advisory lock (one replica builds at a time; each statement
//! still reads its own snapshot) that spans the newest hours first and stops after
//! [`BUILD_PASS_BUDGET`]. Hours with more than [`MAX_SUMMARY_EVENTS`] events are never
//! spanned (read raw, as before).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use roaring::RoaringBitmap;

use super::edge_hours::MAX_SUMMARY_EVENTS;
use super::{Database, RepositoryError};
use crate::models::utc::time;
use crate::models::PartialHour;

/// An hour is spanned once it ended this long ago: the open hour and the minutes after
/// it take live traffic, and every fold into a spanned hour outdates its row.
pub(crate) const SPANS_AFTER_SECONDS: i64 = 600;

/// Work one builder pass may do before it yields: building one hour reads it whole (about
/// 20-50 ms of PostgreSQL at 4,600 events an hour), and a pass after a deployment finds
/// every hour of the retention to build.
pub(crate) const BUILD_PASS_BUDGET: Duration = Duration::from_millis(250);

/// Hours one pass looks at, at most.
const BUILD_PASS_HOURS: i64 = 256;

/// Advisory lock of a builder pass ("spans" in ASCII): replicas do not build the same
/// hours side by side; one that finds it taken skips its pass.
pub const SPAN_BUILDER_LOCK_KEY: i64 = 0x0073_7061_6e73;

/// Bytes a user takes in a row: ordinal (4), first second (2), last second (2).
const SPAN_BYTES: usize = 8;

/// Closed hours whose spans are missing or outdated, newest first: $1 the latest hour
/// start to consider, $2 the most events an hour may hold, $3 how many.
const HOURS_TO_SPAN: &str = "
    SELECT totals.bucket_start
      FROM event_totals_hourly totals
      LEFT JOIN user_activity_hour_spans spans ON spans.hour_start = totals.bucket_start
     WHERE totals.bucket_start <= $1 AND totals.event_count <= $2
       AND (spans.hour_start IS NULL OR spans.version <> totals.version
            OR spans.event_count <> totals.event_count)
     ORDER BY totals.bucket_start DESC
     LIMIT $3";

/// Writes the spans of the hour starting at $1, read in the statement's one snapshot, if
/// the hour is settled and holds at most $2 events; writes nothing otherwise. Each user
/// is one index probe of `user_ordinals` (see `HOUR_SUMMARY` in rollups.rs for why not a
/// join); a settled hour's users all have an ordinal, and the row is not written should
/// one not.
const SPAN_HOUR: &str = "
    WITH state AS MATERIALIZED (
        SELECT version, event_count FROM event_totals_hourly
         WHERE bucket_start = $1 AND event_count <= $2
           AND NOT EXISTS (SELECT 1 FROM event_count_deltas WHERE bucket_start = $1)
           AND NOT EXISTS (SELECT 1 FROM user_activity_pending WHERE hour_start = $1)
    ), spans AS MATERIALIZED (
        SELECT (SELECT ordinal FROM user_ordinals ordinals WHERE ordinals.user_id = hour_users.user_id) AS ordinal,
               hour_users.first, hour_users.last
          FROM (SELECT user_id,
                       floor(extract(epoch FROM min(timestamp) - $1))::int2 AS first,
                       floor(extract(epoch FROM max(timestamp) - $1))::int2 AS last
                  FROM events
                 WHERE timestamp >= $1 AND timestamp < $1 + interval '1 hour'
                   AND user_id IS NOT NULL AND user_id <> ''
                   AND EXISTS (SELECT 1 FROM state)
                 GROUP BY user_id) hour_users
    )
    INSERT INTO user_activity_hour_spans AS stored (hour_start, version, event_count, spans)
    SELECT $1, state.version, state.event_count,
           coalesce((SELECT string_agg(int4send(ordinal) || int2send(first) || int2send(last), ''::bytea ORDER BY ordinal)
                       FROM spans), ''::bytea)
      FROM state
     WHERE NOT EXISTS (SELECT 1 FROM spans WHERE ordinal IS NULL)
    ON CONFLICT (hour_start) DO UPDATE
       SET version = EXCLUDED.version, event_count = EXCLUDED.event_count, spans = EXCLUDED.spans";

/// What one builder pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanPass {
    /// Hours whose spans were written.
    pub built: usize,
    /// Hours looked at but not written: not settled (deltas or pending users), or the
    /// budget ran out before them.
    pub left: usize,
    /// Another replica was building; nothing was done.
    pub lock_busy: bool,
}

/// One builder pass: spans the newest closed hours whose spans are missing or outdated,
/// until [`BUILD_PASS_BUDGET`] is spent. `now` is the wall clock in Unix seconds.
pub async fn build_hour_spans(database: &Database, now: i64) -> Result<SpanPass, RepositoryError> {
    build_hour_spans_within(database, now, BUILD_PASS_BUDGET).await
}

/// [`build_hour_spans`] with a budget of its own.
pub async fn build_hour_spans_within(
    database: &Database,
    now: i64,
    budget: Duration,
) -> Result<SpanPass, RepositoryError> {
    let latest_hour_start = time(now - SPANS_AFTER_SECONDS - crate::models::utc::HOUR_SECONDS);
    database
        .with_retry("build_hour_spans", || async {
            let started = Instant::now();
            let mut transaction = database.begin().await?;
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(SPAN_BUILDER_LOCK_KEY)
                .fetch_one(&mut *transaction)
                .await?;
            if !locked {
                return Ok(SpanPass { lock_busy: true, ..SpanPass::default() });
            }
            // Live spans (V8) are for hours still taking events; these no longer do.
            sqlx::query("DELETE FROM user_activity_live_spans WHERE hour_start <= $1")
                .bind(latest_hour_start)
                .execute(&mut *transaction)
                .await?;
            let hours: Vec<DateTime<Utc>> = sqlx::query_scalar(HOURS_TO_SPAN)
                .bind(latest_hour_start)
                .bind(MAX_SUMMARY_EVENTS)
                .bind(BUILD_PASS_HOURS)
                .fetch_all(&mut *transaction)
                .await?;
            let mut pass = SpanPass::default();
            for hour_start in &hours {
                if started.elapsed() >= budget {
                    break;
                }
                let written = sqlx::query(SPAN_HOUR)
                    .bind(hour_start)
                    .bind(MAX_SUMMARY_EVENTS)
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected();
                pass.built += written as usize;
            }
            transaction.commit().await?;
            pass.left = hours.len() - pass.built;
            Ok(pass)
        })
        .await
}

/// Builder passes until one finds nothing it can build, waiting its turn while another
/// builder holds the lock: what a service that has run a while has done (the benchmark
/// and tests start from there).
pub async fn build_all_hour_spans(database: &Database, now: i64) -> Result<usize, RepositoryError> {
    let mut built = 0;
    loop {
        let pass = build_hour_spans_within(database, now, Duration::from_secs(3600)).await?;
        built += pass.built;
        if pass.lock_busy {
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else if pass.built == 0 {
            return Ok(built);
        }
    }
}

/// One user's span in an hour: ordinal, first and last second into the hour.
pub(crate) type Span = (u32, i16, i16);

/// Users' spans to merge into a row: ordinal -> (first second, last second).
pub(crate) type SpanAdditions = BTreeMap<u32, (i16, i16)>;

fn span_at(bytes: &[u8]) -> Span {
    (
        u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        i16::from_be_bytes([bytes[4], bytes[5]]),
        i16::from_be_bytes([bytes[6], bytes[7]]),
    )
}

/// The spans of a stored or live row, in the row's order (by ordinal).
pub(crate) fn decode_spans(bytes: &[u8]) -> Result<Vec<Span>, std::io::Error> {
    if bytes.len() % SPAN_BYTES != 0 {
        return Err(std::io::Error::other(format!("hour spans of {} bytes", bytes.len())));
    }
    Ok(bytes.chunks_exact(SPAN_BYTES).map(span_at).collect())
}

/// `spans` (ordered by ordinal) as a row stores them.
pub(crate) fn encode_spans(spans: &[Span]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(spans.len() * SPAN_BYTES);
    for (ordinal, first, last) in spans {
        bytes.extend_from_slice(&ordinal.to_be_bytes());
        bytes.extend_from_slice(&first.to_be_bytes());
        bytes.extend_from_slice(&last.to_be_bytes());
    }
    bytes
}

/// `known` (ordered by ordinal) with `added`: a user in both keeps the earlier first and
/// the later last second.
pub(crate) fn merge_spans(known: &[Span], added: &SpanAdditions) -> Vec<Span> {
    let mut merged = Vec::with_capacity(known.len() + added.len());
    let mut added = added.iter().peekable();
    for &(ordinal, first, last) in known {
        while let Some((&new_ordinal, &(new_first, new_last))) = added.next_if(|(new, _)| **new < ordinal) {
            merged.push((new_ordinal, new_first, new_last));
        }
        match added.next_if(|(new, _)| **new == ordinal) {
            Some((_, &(new_first, new_last))) => {
                merged.push((ordinal, first.min(new_first), last.max(new_last)))
            }
            None => merged.push((ordinal, first, last)),
        }
    }
    merged.extend(added.map(|(&ordinal, &(first, last))| (ordinal, first, last)));
    merged
}

/// The users with an event in `part` of its hour, from the hour's stored spans: those whose
/// last second is at or after the part's start when it ends with the hour, else those
/// whose first second is before its end (the part must start or end with its hour).
pub(crate) fn users_within(spans: &[u8], part: &PartialHour) -> Result<RoaringBitmap, std::io::Error> {
    if spans.len() % SPAN_BYTES != 0 {
        return Err(std::io::Error::other(format!("hour spans of {} bytes", spans.len())));
    }
    let (hour_start, hour_end) = part.hour();
    let suffix = part.end == hour_end;
    let (from, to) = (part.start - hour_start, part.end - hour_start);
    let ordinals = spans.chunks_exact(SPAN_BYTES).map(span_at).filter_map(|(ordinal, first, last)| {
        let within = if suffix { i64::from(last) >= from } else { i64::from(first) < to };
        within.then_some(ordinal)
    });
    RoaringBitmap::from_sorted_iter(ordinals)
        .map_err(|_| std::io::Error::other("hour spans not ordered by ordinal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(ordinal: u32, first: i16, last: i16) -> Vec<u8> {
        [ordinal.to_be_bytes().as_slice(), &first.to_be_bytes(), &last.to_be_bytes()].concat()
    }

    #[test]
    fn a_suffix_takes_users_seen_at_or_after_its_start_and_a_prefix_those_seen_before_its_end() {
        let hour = 1_700_000_000 - 1_700_000_000 % 3_600;
        let spans =
            [span(1, 0, 10), span(2, 5, 3_599), span(7, 600, 600), span(70_000, 3_000, 3_100)].concat();
        let suffix = PartialHour { start: hour + 600, end: hour + 3_600 };
        assert_eq!(users_within(&spans, &suffix).unwrap().iter().collect::<Vec<_>>(), [2, 7, 70_000]);
        let prefix = PartialHour { start: hour, end: hour + 600 };
        assert_eq!(users_within(&spans, &prefix).unwrap().iter().collect::<Vec<_>>(), [1, 2]);
        let prefix = PartialHour { start: hour, end: hour + 601 };
        assert_eq!(users_within(&spans, &prefix).unwrap().iter().collect::<Vec<_>>(), [1, 2, 7]);
        assert!(users_within(&[], &prefix).unwrap().is_empty());
    }

    #[test]
    fn merged_spans_keep_each_users_earliest_first_and_latest_last_second_in_ordinal_order() {
        let known = [(2, 100, 200), (5, 0, 0), (9, 50, 60)];
        let added = BTreeMap::from([(1, (7, 8)), (2, (50, 150)), (5, (10, 3_599)), (12, (1, 1))]);
        assert_eq!(
            merge_spans(&known, &added),
            [(1, 7, 8), (2, 50, 200), (5, 0, 3_599), (9, 50, 60), (12, 1, 1)]
        );
        assert_eq!(merge_spans(&[], &added).len(), 4);
        let encoded = encode_spans(&merge_spans(&known, &added));
        assert_eq!(decode_spans(&encoded).unwrap(), merge_spans(&known, &added));
        assert!(decode_spans(&encoded[1..]).is_err());
    }

    #[test]
    fn malformed_spans_are_refused() {
        let hour = 1_700_000_000 - 1_700_000_000 % 3_600;
        let part = PartialHour { start: hour, end: hour + 60 };
        assert!(users_within(&[0; 7], &part).is_err());
        let unordered = [span(9, 0, 1), span(3, 0, 1)].concat();
        assert!(users_within(&unordered, &part).is_err());
    }
}
