//! Erasure of one user (DeleteUser): the `erasure_requests` record and its lease, the
//! bounded batches that delete the user's events and idempotency keys, and the final
//! transaction that removes the user from every derived structure. Also the suppression
//! row a request with `suppress` records with it.
//!
//! Every step is one transaction and can be repeated, so a crash between two steps loses
//! nothing: whichever replica holds the lease next resumes where the rows say.
//! - A batch deletes up to N of the user's events (the V6 delete trigger appends their
//!   negative count deltas), records their UTC hours in `erasure_hours`, bumps the
//!   erasure generation (so no cached count from before is used again) and adds to the
//!   request's counters.
//! - The final transaction takes the fold's lock (no fold runs meanwhile), deletes the
//!   events left and removes the id from the pending user rows in one statement (one
//!   snapshot: a pending row it sees belongs to an event it sees), clears the user's
//!   ordinal from the hourly and daily bitmaps of the recorded hours (and deletes those
//!   hours' stored spans), deletes its ordinal, identity and remaining keys, bumps the
//!   generation and marks the request completed, dropping the user id from it.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::fold::ROLLUP_FOLD_LOCK_KEY;
use super::{Database, RepositoryError};
use crate::models::user_bitmap::{decode_users, encode_users};
use crate::models::utc::{floor_to, time, DAY_SECONDS};
use crate::security::subject::SubjectHash;

/// How long a replica holds a request it works on without renewing the lease.
pub(crate) const ERASURE_LEASE_SECONDS: i64 = 10;

/// One erasure request as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErasureRequest {
    pub id: Uuid,
    pub subject_hash: SubjectHash,
    /// In clear only while running.
    pub user_id: Option<String>,
    pub suppress: bool,
    pub state: String,
    pub events_deleted: i64,
    pub insert_ids_deleted: i64,
    pub identity_deleted: bool,
    pub requested_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl<'r> sqlx::FromRow<'r, PgRow> for ErasureRequest {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            subject_hash: subject_hash(row.try_get("subject_hash")?)?,
            user_id: row.try_get("user_id")?,
            suppress: row.try_get("suppress")?,
            state: row.try_get("state")?,
            events_deleted: row.try_get("events_deleted")?,
            insert_ids_deleted: row.try_get("insert_ids_deleted")?,
            identity_deleted: row.try_get("identity_deleted")?,
            requested_at: row.try_get("requested_at")?,
            completed_at: row.try_get("completed_at")?,
        })
    }
}

/// A stored keyed hash (32 bytes) as a [`SubjectHash`].
fn subject_hash(bytes: Vec<u8>) -> Result<SubjectHash, sqlx::Error> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|bytes: Vec<u8>| {
        sqlx::Error::Decode(format!("subject_hash of {} bytes", bytes.len()).into())
    })?;
    Ok(SubjectHash(bytes))
}

impl ErasureRequest {
    pub fn is_completed(&self) -> bool {
        self.state == "completed"
    }
}

const REQUEST_COLUMNS: &str =
    "id, subject_hash, user_id, suppress, state, events_deleted, insert_ids_deleted, \
     identity_deleted, requested_at, completed_at";

/// What one batch deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErasureBatch {
    pub events: u64,
    pub insert_ids: u64,
}

/// The erasure statements.
#[derive(Clone, Debug)]
pub struct ErasureRepository {
    database: Database,
}

impl ErasureRepository {
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    /// Records a request to erase `user_id` (and, with `suppress`, its suppression) in
    /// one transaction, or returns the request already running for the same user (then
    /// `suppress` still records the suppression and marks the request).
    pub async fn record(
        &self,
        subject: &SubjectHash,
        user_id: &str,
        suppress: bool,
    ) -> Result<ErasureRequest, RepositoryError> {
        self.database
            .with_retry("record_erasure", || async {
                let mut transaction = self.database.begin().await?;
                if suppress {
                    sqlx::query(
                        "INSERT INTO suppressed_users (subject_hash) VALUES ($1) ON CONFLICT (subject_hash) DO NOTHING",
                    )
                    .bind(subject.as_bytes())
                    .execute(&mut *transaction)
                    .await?;
                }
                let inserted: Option<ErasureRequest> = sqlx::query_as(&format!(
                    "INSERT INTO erasure_requests (id, subject_hash, user_id, suppress, state)
                     VALUES ($1, $2, $3, $4, 'running')
                     ON CONFLICT (subject_hash) WHERE state = 'running' DO NOTHING
                     RETURNING {REQUEST_COLUMNS}"
                ))
                .bind(Uuid::now_v7())
                .bind(subject.as_bytes())
                .bind(user_id)
                .bind(suppress)
                .fetch_optional(&mut *transaction)
                .await?;
                let request = match inserted {
                    Some(request) => request,
                    None => {
                        // Marked suppress by this request too; the recorded xid moves to
                        // this transaction so the final pass waits for snapshots older
                        // than this suppression.
                        sqlx::query_as(&format!(
                            "UPDATE erasure_requests
                                SET suppress = suppress OR $2,
                                    recorded_xid = CASE WHEN $2 THEN pg_current_xact_id() ELSE recorded_xid END
                              WHERE subject_hash = $1 AND state = 'running'
                          RETURNING {REQUEST_COLUMNS}"
                        ))
                        .bind(subject.as_bytes())
                        .bind(suppress)
                        .fetch_one(&mut *transaction)
                        .await?
                    }
                };
                transaction.commit().await?;
                Ok(request)
            })
            .await
    }

    /// The request `id`, `None` when there is none.
    pub async fn get(&self, id: Uuid) -> Result<Option<ErasureRequest>, RepositoryError> {
        self.database
            .with_retry("get_erasure", || async {
                let mut session = self.database.session().await?;
                let value =
                    sqlx::query_as(&format!("SELECT {REQUEST_COLUMNS} FROM erasure_requests WHERE id = $1"))
                        .bind(id)
                        .fetch_optional(&mut *session)
                        .await?;
                session.finish().await?;
                Ok(value)
            })
            .await
    }

    /// Takes the lease of a running request nobody holds (the oldest first), or renews
    /// the lease of `id` when given; `None` when there is nothing to work on.
    pub async fn lease(&self, id: Option<Uuid>) -> Result<Option<ErasureRequest>, RepositoryError> {
        self.database
            .with_retry("lease_erasure", || async {
                let mut session = self.database.session().await?;
                let value = sqlx::query_as(&format!(
                    "UPDATE erasure_requests SET leased_until = now() + make_interval(secs => $2), updated_at = now()
                      WHERE id = (
                          SELECT id FROM erasure_requests
                           WHERE state = 'running'
                             AND ($1::uuid IS NULL AND (leased_until IS NULL OR leased_until < now()) OR id = $1)
                           ORDER BY requested_at
                           LIMIT 1
                           FOR UPDATE SKIP LOCKED)
                  RETURNING {REQUEST_COLUMNS}"
                ))
                .bind(id)
                .bind(ERASURE_LEASE_SECONDS as f64)
                .fetch_optional(&mut *session).await?;
                session.finish().await?;
                Ok(value)
            })
            .await
    }

    /// Gives the lease of `id` back (a replica stopping), so another takes it at once.
    pub async fn release(&self, id: Uuid) -> Result<(), RepositoryError> {
        self.database
            .with_retry("release_erasure", || async {
                let mut session = self.database.session().await?;
                sqlx::query(
                    "UPDATE erasure_requests SET leased_until = NULL WHERE id = $1 AND state = 'running'",
                )
                .bind(id)
                .execute(&mut *session)
                .await?;
                session.finish().await?;
                Ok(())
            })
            .await
    }

    /// Deletes up to `limit` events and up to `limit` idempotency keys of the request's
    /// user, in one transaction.
    pub async fn erase_batch(
        &self,
        request: &ErasureRequest,
        limit: i64,
    ) -> Result<ErasureBatch, RepositoryError> {
        let Some(user_id) = request.user_id.as_deref() else {
            return Ok(ErasureBatch::default());
        };
        self.database
            .with_retry("erase_batch", || async {
                let mut transaction = self.database.begin().await?;
                let events: i64 = sqlx::query_scalar(ERASE_EVENTS)
                    .bind(user_id)
                    .bind(limit)
                    .bind(request.id)
                    .fetch_one(&mut *transaction)
                    .await?;
                let insert_ids: i64 = sqlx::query_scalar(ERASE_INSERT_IDS)
                    .bind(user_id)
                    .bind(limit)
                    .fetch_one(&mut *transaction)
                    .await?;
                if events > 0 || insert_ids > 0 {
                    sqlx::query(
                        "UPDATE erasure_requests
                            SET events_deleted = events_deleted + $2, insert_ids_deleted = insert_ids_deleted + $3,
                                updated_at = now()
                          WHERE id = $1",
                    )
                    .bind(request.id)
                    .bind(events)
                    .bind(insert_ids)
                    .execute(&mut *transaction)
                    .await?;
                }
                if events > 0 {
                    bump_generation(&mut transaction).await?;
                }
                transaction.commit().await?;
                Ok(ErasureBatch { events: events as u64, insert_ids: insert_ids as u64 })
            })
            .await
    }

    /// Waits (polling every `poll`, at most `limit`) until no other session of this
    /// database holds a snapshot taken before the request's recording transaction
    /// committed; whether that was reached. A write whose statement snapshot predates the
    /// suppression may store the user's events (its check did not see the row); once no
    /// such snapshot is left, every such write has committed or failed, and the final pass
    /// sees and deletes what it stored.
    pub async fn wait_for_older_snapshots(
        &self,
        request: &ErasureRequest,
        poll: std::time::Duration,
        limit: std::time::Duration,
    ) -> Result<bool, RepositoryError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let older: i64 = self
                .database
                .with_retry("erasure_snapshot_barrier", || async {
                    let mut session = self.database.session().await?;
                    let value =
                        sqlx::query_scalar(OLDER_SNAPSHOTS).bind(request.id).fetch_one(&mut *session).await?;
                    session.finish().await?;
                    Ok(value)
                })
                .await?;
            if older == 0 {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// The final transaction (see the module documentation); returns the completed
    /// request. Repeating it after it committed changes nothing.
    pub async fn complete(&self, id: Uuid) -> Result<ErasureRequest, RepositoryError> {
        self.database
            .with_retry("complete_erasure", || async {
                let mut transaction = self.database.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(ROLLUP_FOLD_LOCK_KEY)
                    .execute(&mut *transaction)
                    .await?;
                let request: ErasureRequest = sqlx::query_as(&format!(
                    "SELECT {REQUEST_COLUMNS} FROM erasure_requests WHERE id = $1 FOR UPDATE"
                ))
                .bind(id)
                .fetch_one(&mut *transaction)
                .await?;
                let Some(user_id) = request.user_id.clone() else {
                    transaction.commit().await?;
                    return Ok(request);
                };
                let events: i64 = sqlx::query_scalar(ERASE_REMAINING_EVENTS_AND_PENDING)
                    .bind(&user_id)
                    .bind(id)
                    .fetch_one(&mut *transaction)
                    .await?;
                let mut insert_ids = 0;
                loop {
                    let deleted: i64 = sqlx::query_scalar(ERASE_INSERT_IDS)
                        .bind(&user_id)
                        .bind(100_000_i64)
                        .fetch_one(&mut *transaction)
                        .await?;
                    insert_ids += deleted;
                    if deleted < 100_000 {
                        break;
                    }
                }
                let ordinal: Option<i32> =
                    sqlx::query_scalar("DELETE FROM user_ordinals WHERE user_id = $1 RETURNING ordinal")
                        .bind(&user_id)
                        .fetch_optional(&mut *transaction)
                        .await?;
                if let Some(ordinal) = ordinal {
                    let hours: Vec<DateTime<Utc>> =
                        sqlx::query_scalar("SELECT hour_start FROM erasure_hours WHERE request_id = $1")
                            .bind(id)
                            .fetch_all(&mut *transaction)
                            .await?;
                    let days: BTreeSet<i64> =
                        hours.iter().map(|hour| floor_to(hour.timestamp(), DAY_SECONDS)).collect();
                    let days: Vec<DateTime<Utc>> = days.into_iter().map(time).collect();
                    clear_ordinal(&mut transaction, "user_activity_hourly", &hours, ordinal as u32).await?;
                    clear_ordinal(&mut transaction, "user_activity_daily", &days, ordinal as u32).await?;
                    // The stored and live spans of those hours name the ordinal too; the
                    // builder writes the stored ones again without it (a live row, stamped
                    // with a bitmap version the clearing just bumped, is outdated anyway).
                    sqlx::query(
                        "WITH stored AS (DELETE FROM user_activity_hour_spans WHERE hour_start = ANY($1))
                         DELETE FROM user_activity_live_spans WHERE hour_start = ANY($1)",
                    )
                    .bind(&hours)
                    .execute(&mut *transaction)
                    .await?;
                }
                let identity_deleted = sqlx::query("DELETE FROM user_identities WHERE user_id = $1")
                    .bind(&user_id)
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected()
                    > 0;
                bump_generation(&mut transaction).await?;
                sqlx::query("DELETE FROM erasure_hours WHERE request_id = $1")
                    .bind(id)
                    .execute(&mut *transaction)
                    .await?;
                let completed: ErasureRequest = sqlx::query_as(&format!(
                    "UPDATE erasure_requests
                        SET state = 'completed', user_id = NULL, completed_at = now(), updated_at = now(),
                            leased_until = NULL,
                            events_deleted = events_deleted + $2,
                            insert_ids_deleted = insert_ids_deleted + $3,
                            identity_deleted = identity_deleted OR $4
                      WHERE id = $1
                  RETURNING {REQUEST_COLUMNS}"
                ))
                .bind(id)
                .bind(events)
                .bind(insert_ids)
                .bind(identity_deleted)
                .fetch_one(&mut *transaction)
                .await?;
                transaction.commit().await?;
                Ok(completed)
            })
            .await
    }
}

/// Deletes up to $2 events of user $1 (rows another transaction holds are left to the
/// next batch), records their UTC hours under request $3; returns how many it deleted.
const ERASE_EVENTS: &str = "
    WITH doomed AS (
        SELECT id, timestamp FROM events WHERE user_id = $1 LIMIT $2 FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM events USING doomed
         WHERE events.id = doomed.id AND events.timestamp = doomed.timestamp
     RETURNING events.timestamp
    ), hours AS (
        INSERT INTO erasure_hours (request_id, hour_start)
        SELECT DISTINCT $3::uuid, date_bin('1 hour', timestamp, TIMESTAMPTZ '2000-01-01 00:00:00+00') FROM gone
        ON CONFLICT DO NOTHING
    )
    SELECT count(*) FROM gone";

/// Deletes the events of user $1 left (in the final transaction, so few), records their
/// hours under request $2, and removes the id from the pending user rows, in one
/// statement: one snapshot, so a pending row it changes belongs to an event it deletes
/// or one an earlier batch deleted. Returns how many events it deleted.
const ERASE_REMAINING_EVENTS_AND_PENDING: &str = "
    WITH gone AS (
        DELETE FROM events WHERE user_id = $1 RETURNING timestamp
    ), hours AS (
        INSERT INTO erasure_hours (request_id, hour_start)
        SELECT DISTINCT $2::uuid, date_bin('1 hour', timestamp, TIMESTAMPTZ '2000-01-01 00:00:00+00') FROM gone
        ON CONFLICT DO NOTHING
    ), pending AS (
        UPDATE user_activity_pending SET user_ids = array_remove(user_ids, $1::text)
         WHERE user_ids @> ARRAY[$1::text]
    )
    SELECT count(*) FROM gone";

/// Deletes up to $2 idempotency keys of user $1 across every sender scope; returns how
/// many. The keys are (scope, user_id, insert_id): the scopes are enumerated with one
/// index probe each (a loose index scan), then each scope's keys of the user are a
/// primary-key range.
const ERASE_INSERT_IDS: &str = "
    WITH RECURSIVE scopes AS (
        (SELECT scope FROM event_insert_ids ORDER BY scope LIMIT 1)
        UNION ALL
        SELECT (SELECT keys.scope FROM event_insert_ids keys WHERE keys.scope > scopes.scope ORDER BY keys.scope LIMIT 1)
          FROM scopes WHERE scopes.scope IS NOT NULL
    ), gone AS (
        DELETE FROM event_insert_ids WHERE ctid = ANY(ARRAY(
            SELECT keys.ctid FROM scopes
              JOIN event_insert_ids keys ON keys.scope = scopes.scope AND keys.user_id = $1
             LIMIT $2))
     RETURNING 1
    )
    SELECT count(*) FROM gone";

/// Sessions of this database, other than this one, whose snapshot is older than the
/// transaction that recorded request $1 (xmin at or before its xid). Such a snapshot was
/// taken before the recording committed, or while something older still ran.
const OLDER_SNAPSHOTS: &str = "
    SELECT count(*) FROM pg_stat_activity activity, erasure_requests request
     WHERE request.id = $1
       AND activity.datname = current_database()
       AND activity.pid <> pg_backend_pid()
       AND activity.backend_type = 'client backend'
       AND activity.backend_xmin IS NOT NULL
       AND age(activity.backend_xmin) >= age((request.recorded_xid::text::numeric % 4294967296)::text::xid)";

async fn bump_generation(transaction: &mut sqlx::Transaction<'_, Postgres>) -> Result<(), RepositoryError> {
    sqlx::query("UPDATE erasure_generation SET generation = generation + 1")
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

/// Removes `ordinal` from `table`'s bitmaps at `starts`, bumping the version of every row
/// that changes (the user-count cache's stamp).
async fn clear_ordinal(
    transaction: &mut sqlx::Transaction<'_, Postgres>,
    table: &'static str,
    starts: &[DateTime<Utc>],
    ordinal: u32,
) -> Result<(), RepositoryError> {
    if starts.is_empty() {
        return Ok(());
    }
    let connection: &mut PgConnection = &mut *transaction;
    let mut select = QueryBuilder::<Postgres>::new("SELECT bucket_start, users FROM ");
    select.push(table).push(" WHERE bucket_start = ANY(").push_bind(starts).push(") FOR UPDATE");
    let rows: Vec<(DateTime<Utc>, Vec<u8>)> = select.build_query_as().fetch_all(&mut *connection).await?;
    let mut changed_starts = Vec::new();
    let mut changed_users = Vec::new();
    for (start, bytes) in rows {
        let mut users = decode_users(&bytes).map_err(RepositoryError::corrupt)?;
        if users.remove(ordinal) {
            changed_starts.push(start);
            changed_users.push(encode_users(&users));
        }
    }
    if changed_starts.is_empty() {
        return Ok(());
    }
    let mut update = QueryBuilder::<Postgres>::new("UPDATE ");
    update
        .push(table)
        .push(" AS bitmap SET users = changed.users, version = bitmap.version + 1 FROM unnest(");
    update.push_bind(&changed_starts).push("::timestamptz[], ").push_bind(&changed_users);
    update
        .push("::bytea[]) AS changed(bucket_start, users) WHERE bitmap.bucket_start = changed.bucket_start");
    update.build().execute(&mut *connection).await?;
    Ok(())
}
