//! The fold: what the `events` insert trigger appends moved into the count rollups.
//! Pending users per UTC hour go into the per-hour and per-day bitmaps of active users
//! (stored as `models::user_bitmap` encodes them); event-count deltas go into
//! `event_counts_hourly`, `event_counts_daily` and `event_totals_hourly`. Deltas of
//! deleted events are negative (the delete trigger of V6); a count row they bring to zero
//! is deleted, and every fold into an hour bumps its total's `version` (the cache stamp).
//!
//! A pair or delta is always either pending or folded, never both and never neither: one
//! transaction deletes what it folds, assigns user ordinals and rewrites the rollups.
//! Folds are serialised across replicas by an advisory lock; a replica that finds it taken
//! skips its turn. Keeping these upserts off the insert path is what keeps concurrent
//! inserts from queueing on the same rollup rows.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use roaring::RoaringBitmap;
use sqlx::{Postgres, QueryBuilder};

use super::{hour_spans, Database, RepositoryError};
use crate::models::user_bitmap::{decode_users, encode_users};
use crate::models::utc::{floor_to, time, DAY_SECONDS, HOUR_SECONDS};

/// Advisory lock held by a fold, and by retention, which deletes rollup rows: the two
/// never interleave.
pub(crate) const ROLLUP_FOLD_LOCK_KEY: i64 = 4_104_202_613;

/// Event-count deltas folded per transaction (each is one (hour, name) of one statement).
pub(crate) const FOLD_BATCH_DELTAS: i64 = 100_000;

/// Pending user rows folded per transaction. Each is one hour of one inserting statement
/// with that statement's distinct users of the hour (a few hundred at most in steady
/// state); a backfill of existing events writes one per hour with every user of the hour,
/// so a batch stays small enough to hold in memory even then.
pub(crate) const FOLD_BATCH_USER_ROWS: i64 = 100;

/// Users above which an hour keeps no live spans (8 bytes each, rewritten by every fold
/// into the hour): about 200 KB a fold. Its partial parts are then read raw, as before V8.
pub const LIVE_SPANS_MAX_USERS: usize = 25_000;

/// A pending row as the fold takes it: hour start, user ids, and (since V8) each user's
/// first and last second into the hour.
type PendingUsers = (DateTime<Utc>, Vec<String>, Option<Vec<i16>>, Option<Vec<i16>>);

/// Per hour (start in Unix seconds) of the folded rows, each user's seconds among them by
/// ordinal (see [`live_span_additions`]).
type LiveSpanAdditions = BTreeMap<i64, Option<hour_spans::SpanAdditions>>;

/// What one fold did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldOutcome {
    /// Pending user rows folded.
    pub folded_user_rows: usize,
    /// (hour, user) pairs those rows held, folded into the bitmaps.
    pub folded_pairs: usize,
    /// Event-count deltas folded into the count rollups.
    pub folded_deltas: usize,
    /// Another replica held the fold lock; nothing was done.
    pub lock_busy: bool,
}

/// Folds up to `delta_limit` event-count deltas into the count rollups and up to
/// `user_row_limit` pending user rows into the hourly and daily bitmaps, in one transaction.
pub async fn fold_pending(
    database: &Database,
    delta_limit: i64,
    user_row_limit: i64,
) -> Result<FoldOutcome, RepositoryError> {
    database
        .with_retry("fold_rollups", || async {
            let mut transaction = database.begin().await?;
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(ROLLUP_FOLD_LOCK_KEY)
                .fetch_one(&mut *transaction)
                .await?;
            if !locked {
                return Ok(FoldOutcome { lock_busy: true, ..FoldOutcome::default() });
            }
            let (folded_deltas, emptied_hours): (i64, Option<Vec<DateTime<Utc>>>) =
                sqlx::query_as(FOLD_EVENT_COUNT_DELTAS)
                    .bind(delta_limit)
                    .fetch_one(&mut *transaction)
                    .await?;
            if let Some(hours) = emptied_hours {
                sqlx::query(DROP_EMPTIED_COUNTS).bind(&hours).execute(&mut *transaction).await?;
                // Deleted events leave their users in the bitmaps (taking them out is the
                // erasure's work) and in the live spans: a part of the hour might have
                // lost a user's only events, so its live spans are no longer kept.
                sqlx::query("DELETE FROM user_activity_live_spans WHERE hour_start = ANY($1)")
                    .bind(&hours)
                    .execute(&mut *transaction)
                    .await?;
            }
            let folded_deltas = folded_deltas as usize;
            let user_rows: Vec<PendingUsers> = sqlx::query_as(
                "DELETE FROM user_activity_pending
                  WHERE ctid = ANY(ARRAY(SELECT ctid FROM user_activity_pending LIMIT $1))
              RETURNING hour_start, user_ids, first_seconds, last_seconds",
            )
            .bind(user_row_limit)
            .fetch_all(&mut *transaction)
            .await?;
            if user_rows.is_empty() {
                transaction.commit().await?;
                return Ok(FoldOutcome { folded_deltas, ..FoldOutcome::default() });
            }
            let pairs: Vec<(DateTime<Utc>, &str)> = user_rows
                .iter()
                .flat_map(|(hour_start, user_ids, _, _)| {
                    user_ids.iter().map(|user_id| (*hour_start, user_id.as_str()))
                })
                .collect();

            let mut user_ids: Vec<&str> = pairs.iter().map(|(_, user_id)| *user_id).collect();
            user_ids.sort_unstable();
            user_ids.dedup();
            sqlx::query(
                "INSERT INTO user_ordinals (user_id)
                 SELECT user_id FROM unnest($1::text[]) AS fresh(user_id)
                 ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(&user_ids)
            .execute(&mut *transaction)
            .await?;
            let ordinals: HashMap<String, i32> =
                sqlx::query_as("SELECT user_id, ordinal FROM user_ordinals WHERE user_id = ANY($1)")
                    .bind(&user_ids)
                    .fetch_all(&mut *transaction)
                    .await?
                    .into_iter()
                    .collect();

            let mut hours: BTreeMap<i64, RoaringBitmap> = BTreeMap::new();
            let mut days: BTreeMap<i64, RoaringBitmap> = BTreeMap::new();
            for (hour_start, user_id) in &pairs {
                let ordinal =
                    *ordinals.get(*user_id).ok_or_else(|| RepositoryError::Query(sqlx::Error::RowNotFound))?
                        as u32;
                let hour = floor_to(hour_start.timestamp(), HOUR_SECONDS);
                hours.entry(hour).or_default().insert(ordinal);
                days.entry(floor_to(hour, DAY_SECONDS)).or_default().insert(ordinal);
            }
            let live_spans = live_span_additions(&user_rows, &ordinals)?;
            let hour_versions = merge_bitmaps(&mut transaction, "user_activity_hourly", hours).await?;
            merge_bitmaps(&mut transaction, "user_activity_daily", days).await?;
            merge_live_spans(&mut transaction, live_spans, &hour_versions).await?;
            transaction.commit().await?;
            Ok(FoldOutcome {
                folded_user_rows: user_rows.len(),
                folded_pairs: pairs.len(),
                folded_deltas,
                lock_busy: false,
            })
        })
        .await
}

/// Moves up to $1 event-count deltas into the hourly, daily and total rollups; returns
/// how many it moved. Keys are sorted before upserting, as everywhere.
const FOLD_EVENT_COUNT_DELTAS: &str = "
    WITH moved AS (
        DELETE FROM event_count_deltas
         WHERE ctid = ANY(ARRAY(SELECT ctid FROM event_count_deltas LIMIT $1))
     RETURNING bucket_start, event_name, event_count
    ), hourly AS (
        SELECT bucket_start, event_name, sum(event_count)::bigint AS event_count
          FROM moved GROUP BY 1, 2
    ), hours AS (
        INSERT INTO event_counts_hourly AS rollup (bucket_start, event_name, event_count)
        SELECT bucket_start, event_name, event_count FROM hourly ORDER BY 1, 2
        ON CONFLICT (bucket_start, event_name)
        DO UPDATE SET event_count = rollup.event_count + EXCLUDED.event_count
    ), days AS (
        INSERT INTO event_counts_daily AS rollup (bucket_start, event_name, event_count)
        SELECT date_trunc('day', bucket_start, 'UTC'), event_name, sum(event_count)
          FROM hourly GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (bucket_start, event_name)
        DO UPDATE SET event_count = rollup.event_count + EXCLUDED.event_count
    ), totals AS (
        INSERT INTO event_totals_hourly AS totals (bucket_start, event_count)
        SELECT bucket_start, sum(event_count) FROM hourly GROUP BY 1 ORDER BY 1
        ON CONFLICT (bucket_start)
        DO UPDATE SET event_count = totals.event_count + EXCLUDED.event_count, version = totals.version + 1
    )
    SELECT count(*), array_agg(DISTINCT bucket_start) FILTER (WHERE event_count < 0) FROM moved";

/// Deletes the hourly and daily count rows that deltas of deleted events brought to zero,
/// in the hours $1 (and their UTC days): a bucket without events has no row.
const DROP_EMPTIED_COUNTS: &str = "
    WITH hours AS (
        DELETE FROM event_counts_hourly WHERE bucket_start = ANY($1) AND event_count = 0
    )
    DELETE FROM event_counts_daily
     WHERE bucket_start = ANY(ARRAY(SELECT DISTINCT date_trunc('day', hour, 'UTC') FROM unnest($1::timestamptz[]) AS hour))
       AND event_count = 0";

/// A bitmap row's `version` before and after a fold (`None` before: the fold created it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VersionChange {
    before: Option<i64>,
    after: i64,
}

/// ORs `additions` (bucket start in Unix seconds -> users) into `table`'s bitmaps,
/// bumping `version` of every row that changes; returns each bucket's versions.
async fn merge_bitmaps(
    transaction: &mut sqlx::Transaction<'_, Postgres>,
    table: &'static str,
    additions: BTreeMap<i64, RoaringBitmap>,
) -> Result<HashMap<i64, VersionChange>, RepositoryError> {
    let starts: Vec<DateTime<Utc>> = additions.keys().copied().map(time).collect();
    let mut select = QueryBuilder::<Postgres>::new("SELECT bucket_start, users, version FROM ");
    select.push(table).push(" WHERE bucket_start = ANY(").push_bind(&starts).push(") FOR UPDATE");
    let existing: HashMap<i64, (RoaringBitmap, i64)> = select
        .build_query_as::<(DateTime<Utc>, Vec<u8>, i64)>()
        .fetch_all(&mut **transaction)
        .await?
        .into_iter()
        .map(|(start, bytes, version)| {
            Ok((start.timestamp(), (decode_users(&bytes).map_err(RepositoryError::corrupt)?, version)))
        })
        .collect::<Result<_, RepositoryError>>()?;
    let mut versions = HashMap::new();
    let mut changed_starts = Vec::new();
    let mut changed_users = Vec::new();
    for ((seconds, added), start) in additions.into_iter().zip(starts) {
        let merged = match existing.get(&seconds) {
            Some((current, version)) if added.is_subset(current) => {
                versions.insert(seconds, VersionChange { before: Some(*version), after: *version });
                continue;
            }
            Some((current, _)) => current | added,
            None => added,
        };
        changed_starts.push(start);
        changed_users.push(encode_users(&merged));
    }
    if changed_starts.is_empty() {
        return Ok(versions);
    }
    let mut upsert = QueryBuilder::<Postgres>::new("INSERT INTO ");
    upsert.push(table).push(" AS bitmap (bucket_start, users)");
    upsert.push(" SELECT * FROM unnest(").push_bind(&changed_starts).push("::timestamptz[], ");
    upsert.push_bind(&changed_users).push("::bytea[])");
    upsert.push(
        " ON CONFLICT (bucket_start) DO UPDATE SET users = EXCLUDED.users, version = bitmap.version + 1
          RETURNING bucket_start, version",
    );
    let written: Vec<(DateTime<Utc>, i64)> = upsert.build_query_as().fetch_all(&mut **transaction).await?;
    for (start, after) in written {
        let seconds = start.timestamp();
        versions.insert(
            seconds,
            VersionChange { before: existing.get(&seconds).map(|(_, version)| *version), after },
        );
    }
    Ok(versions)
}

/// Per hour of the folded rows, each user's (ordinal, first second, last second) among
/// them, ordered by ordinal; `None` for an hour with a row that carries no seconds (written
/// before migration V8).
fn live_span_additions(
    user_rows: &[PendingUsers],
    ordinals: &HashMap<String, i32>,
) -> Result<LiveSpanAdditions, RepositoryError> {
    let mut additions = LiveSpanAdditions::new();
    for (hour_start, user_ids, first_seconds, last_seconds) in user_rows {
        let hour = additions
            .entry(floor_to(hour_start.timestamp(), HOUR_SECONDS))
            .or_insert_with(|| Some(BTreeMap::new()));
        let (Some(spans), Some(firsts), Some(lasts)) = (hour.as_mut(), first_seconds, last_seconds) else {
            *hour = None;
            continue;
        };
        if firsts.len() != user_ids.len() || lasts.len() != user_ids.len() {
            *hour = None;
            continue;
        }
        for ((user_id, first), last) in user_ids.iter().zip(firsts).zip(lasts) {
            let ordinal =
                *ordinals.get(user_id).ok_or(RepositoryError::Query(sqlx::Error::RowNotFound))? as u32;
            spans
                .entry(ordinal)
                .and_modify(|(known_first, known_last)| {
                    *known_first = (*known_first).min(*first);
                    *known_last = (*known_last).max(*last);
                })
                .or_insert((*first, *last));
        }
    }
    Ok(additions)
}

/// Keeps the live spans (migration V8) of the hours a fold ORed users into: an hour's row
/// is merged with `additions` and stamped with the bitmap's version after the fold when it
/// was current (stamped with the version before) or the fold created the bitmap; it is
/// deleted when it was outdated, when the folded rows lack seconds, or when it would hold
/// more than [`LIVE_SPANS_MAX_USERS`] users. Either way no row is left current that misses
/// a folded user.
async fn merge_live_spans(
    transaction: &mut sqlx::Transaction<'_, Postgres>,
    additions: LiveSpanAdditions,
    hour_versions: &HashMap<i64, VersionChange>,
) -> Result<(), RepositoryError> {
    let starts: Vec<DateTime<Utc>> = additions.keys().copied().map(time).collect();
    let existing: HashMap<i64, (i64, Vec<u8>)> = sqlx::query_as::<_, (DateTime<Utc>, i64, Vec<u8>)>(
        "SELECT hour_start, bitmap_version, spans FROM user_activity_live_spans WHERE hour_start = ANY($1) FOR UPDATE",
    )
    .bind(&starts)
    .fetch_all(&mut **transaction)
    .await?
    .into_iter()
    .map(|(start, version, spans)| (start.timestamp(), (version, spans)))
    .collect();
    let (mut written_starts, mut written_versions, mut written_spans) = (Vec::new(), Vec::new(), Vec::new());
    let mut dropped = Vec::new();
    for (hour, added) in additions {
        let Some(versions) = hour_versions.get(&hour) else {
            continue;
        };
        let base = match (versions.before, existing.get(&hour)) {
            (None, None) => Some(Vec::new()),
            (Some(before), Some((stamp, bytes))) if *stamp == before => hour_spans::decode_spans(bytes).ok(),
            _ => None,
        };
        if let (Some(base), Some(added)) = (base, added) {
            let merged = hour_spans::merge_spans(&base, &added);
            if merged.len() <= LIVE_SPANS_MAX_USERS {
                written_starts.push(time(hour));
                written_versions.push(versions.after);
                written_spans.push(hour_spans::encode_spans(&merged));
                continue;
            }
        }
        if existing.contains_key(&hour) {
            dropped.push(time(hour));
        }
    }
    if !dropped.is_empty() {
        sqlx::query("DELETE FROM user_activity_live_spans WHERE hour_start = ANY($1)")
            .bind(&dropped)
            .execute(&mut **transaction)
            .await?;
    }
    if !written_starts.is_empty() {
        sqlx::query(
            "INSERT INTO user_activity_live_spans (hour_start, bitmap_version, spans)
             SELECT * FROM unnest($1::timestamptz[], $2::int8[], $3::bytea[])
             ON CONFLICT (hour_start) DO UPDATE SET bitmap_version = EXCLUDED.bitmap_version, spans = EXCLUDED.spans",
        )
        .bind(&written_starts)
        .bind(&written_versions)
        .bind(&written_spans)
        .execute(&mut **transaction)
        .await?;
    }
    Ok(())
}

/// Folds until nothing is pending (or another replica holds the lock); returns the sums.
pub async fn fold_all_pending(database: &Database) -> Result<FoldOutcome, RepositoryError> {
    let mut total = FoldOutcome::default();
    loop {
        let outcome = fold_pending(database, FOLD_BATCH_DELTAS, FOLD_BATCH_USER_ROWS).await?;
        total.folded_user_rows += outcome.folded_user_rows;
        total.folded_pairs += outcome.folded_pairs;
        total.folded_deltas += outcome.folded_deltas;
        total.lock_busy = outcome.lock_busy;
        let full = outcome.folded_deltas as i64 == FOLD_BATCH_DELTAS
            || outcome.folded_user_rows as i64 == FOLD_BATCH_USER_ROWS;
        if outcome.lock_busy || !full {
            return Ok(total);
        }
    }
}
