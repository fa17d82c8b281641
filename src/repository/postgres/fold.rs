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

use super::{Database, RepositoryError};
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
            }
            let folded_deltas = folded_deltas as usize;
            let user_rows: Vec<(DateTime<Utc>, Vec<String>)> = sqlx::query_as(
                "DELETE FROM user_activity_pending
                  WHERE ctid = ANY(ARRAY(SELECT ctid FROM user_activity_pending LIMIT $1))
              RETURNING hour_start, user_ids",
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
                .flat_map(|(hour_start, user_ids)| {
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
            merge_bitmaps(&mut transaction, "user_activity_hourly", hours).await?;
            merge_bitmaps(&mut transaction, "user_activity_daily", days).await?;
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

/// ORs `additions` (bucket start in Unix seconds -> users) into `table`'s bitmaps,
/// bumping `version` of every row that changes.
async fn merge_bitmaps(
    transaction: &mut sqlx::Transaction<'_, Postgres>,
    table: &'static str,
    additions: BTreeMap<i64, RoaringBitmap>,
) -> Result<(), RepositoryError> {
    let starts: Vec<DateTime<Utc>> = additions.keys().copied().map(time).collect();
    let mut select = QueryBuilder::<Postgres>::new("SELECT bucket_start, users FROM ");
    select.push(table).push(" WHERE bucket_start = ANY(").push_bind(&starts).push(") FOR UPDATE");
    let existing: HashMap<i64, RoaringBitmap> = select
        .build_query_as::<(DateTime<Utc>, Vec<u8>)>()
        .fetch_all(&mut **transaction)
        .await?
        .into_iter()
        .map(|(start, bytes)| {
            Ok((start.timestamp(), decode_users(&bytes).map_err(RepositoryError::corrupt)?))
        })
        .collect::<Result<_, RepositoryError>>()?;
    let mut changed_starts = Vec::new();
    let mut changed_users = Vec::new();
    for ((seconds, added), start) in additions.into_iter().zip(starts) {
        let merged = match existing.get(&seconds) {
            Some(current) if added.is_subset(current) => continue,
            Some(current) => current | added,
            None => added,
        };
        changed_starts.push(start);
        changed_users.push(encode_users(&merged));
    }
    if changed_starts.is_empty() {
        return Ok(());
    }
    let mut upsert = QueryBuilder::<Postgres>::new("INSERT INTO ");
    upsert.push(table).push(" AS bitmap (bucket_start, users)");
    upsert.push(" SELECT * FROM unnest(").push_bind(&changed_starts).push("::timestamptz[], ");
    upsert.push_bind(&changed_users).push("::bytea[])");
    upsert.push(
        " ON CONFLICT (bucket_start) DO UPDATE SET users = EXCLUDED.users, version = bitmap.version + 1",
    );
    upsert.build().execute(&mut **transaction).await?;
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
