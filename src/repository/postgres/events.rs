//! The `events` table and its idempotency keys (`event_insert_ids`): inserting tracked
//! events in one multi-row statement, deduplicating by insert_id, leaving out the events
//! of suppressed users (read from `suppressed_users` inside that statement), expiring old
//! keys; and the rows of a count query read as [`EventCount`]s.
//!
//! Suppression is exact at the inserting statement's snapshot: an event is left out when
//! its user's suppression committed before the statement began. A statement that began
//! earlier may still store the user's events after the suppression commits; DeleteUser
//! closes that window by waiting for older snapshots to end before its last erasure pass.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use std::time::{Duration, Instant};

use sqlx::{PgConnection, Row};
use tracing::Instrument as _;
use uuid::Uuid;

use super::pii::open_properties;
use super::{discard, query_span, Database, RepositoryError, WriteError};
use crate::metrics;
use crate::models::{EventCount, NewEvent};
use crate::security::pii::PiiCipher;
use crate::security::subject::SubjectHash;

/// Multi-row insert through UNNEST: one statement and one round trip for any batch size.
/// `ON CONFLICT DO NOTHING` makes a retry after an ambiguous commit (connection lost
/// after COMMIT was sent) harmless: the event ids are ours and already stored.
const INSERT_EVENTS: &str = "
    INSERT INTO events (id, event_name, user_id, properties, timestamp)
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[])
    ON CONFLICT DO NOTHING";

/// [`INSERT_EVENTS`] for a batch in which some events carry the keyed hash of their user
/// ($6, NULL for the others): the suppression list is read for those hashes in one index
/// scan (one probe per distinct hash), and the events of suppressed users are not stored.
/// Answers one row per event of a suppressed user: (id, true) when it is not stored, or
/// (id, false) when an earlier attempt of this very statement already stored it (a retry
/// after an ambiguous commit whose user was suppressed in between: the event is ours).
const INSERT_EVENTS_CHECKING_SUPPRESSION: &str = "
    WITH input AS (
        SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[], $6::bytea[])
            AS input(id, event_name, user_id, properties, timestamp, subject_hash)
    ), suppressed_hashes AS MATERIALIZED (
        SELECT subject_hash FROM suppressed_users WHERE subject_hash = ANY($6::bytea[])
    ), suppressed AS (
        SELECT id, timestamp FROM input WHERE subject_hash IN (SELECT subject_hash FROM suppressed_hashes)
    ), stored AS (
        INSERT INTO events (id, event_name, user_id, properties, timestamp)
        SELECT id, event_name, user_id, properties, timestamp FROM input
        WHERE id NOT IN (SELECT id FROM suppressed)
        ON CONFLICT DO NOTHING
    )
    SELECT id, NOT EXISTS (
        SELECT 1 FROM events WHERE events.id = suppressed.id AND events.timestamp = suppressed.timestamp
    ) FROM suppressed";

/// The same insert for a batch in which some events carry an insert_id, as one atomic
/// statement. A key is (sender scope $8, user id or '', insert_id): two senders, or two
/// users, never share one. The statement claims each key (a new key, or one older than
/// the window $7 days), then stores the events without a key plus those whose key it
/// claimed. Keys that were not claimed (seen within the window, possibly committed by
/// another replica a moment ago: ON CONFLICT waits for it) are the ones whose event id
/// is missing from the answer. The batch must hold each key at most once (ON CONFLICT
/// DO UPDATE cannot touch one row twice in a statement).
const INSERT_EVENTS_WITH_KEYS: &str = "
    WITH input AS (
        SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[], $6::text[], $8::text[])
            AS input(id, event_name, user_id, properties, timestamp, insert_id, key_scope)
    ), claimed AS (
        INSERT INTO event_insert_ids (scope, user_id, insert_id, event_id)
        SELECT key_scope, coalesce(user_id, ''), insert_id, id FROM input WHERE insert_id IS NOT NULL
        ORDER BY 1, 2, 3
        ON CONFLICT (scope, user_id, insert_id) DO UPDATE SET event_id = EXCLUDED.event_id, created_at = now()
            WHERE event_insert_ids.created_at < now() - make_interval(days => $7)
        RETURNING event_id
    ), stored AS (
        INSERT INTO events (id, event_name, user_id, properties, timestamp)
        SELECT id, event_name, user_id, properties, timestamp FROM input
        WHERE insert_id IS NULL OR id IN (SELECT event_id FROM claimed)
        ON CONFLICT DO NOTHING
    )
    SELECT event_id FROM claimed";

/// [`INSERT_EVENTS_WITH_KEYS`] checking the suppression list like
/// [`INSERT_EVENTS_CHECKING_SUPPRESSION`] ($9: the keyed hashes, NULL for anonymous
/// events): an event of a suppressed user is neither stored nor claims its key. Answers
/// (event_id, false) per claimed key, and per event of a suppressed user (id, true) when it
/// is not stored, or (id, false) when an earlier attempt of this statement stored it.
const INSERT_EVENTS_WITH_KEYS_CHECKING_SUPPRESSION: &str = "
    WITH input AS (
        SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[], $6::text[], $8::text[], $9::bytea[])
            AS input(id, event_name, user_id, properties, timestamp, insert_id, key_scope, subject_hash)
    ), suppressed_hashes AS MATERIALIZED (
        SELECT subject_hash FROM suppressed_users WHERE subject_hash = ANY($9::bytea[])
    ), suppressed AS (
        SELECT id, timestamp FROM input WHERE subject_hash IN (SELECT subject_hash FROM suppressed_hashes)
    ), admitted AS (
        SELECT * FROM input WHERE id NOT IN (SELECT id FROM suppressed)
    ), claimed AS (
        INSERT INTO event_insert_ids (scope, user_id, insert_id, event_id)
        SELECT key_scope, coalesce(user_id, ''), insert_id, id FROM admitted WHERE insert_id IS NOT NULL
        ORDER BY 1, 2, 3
        ON CONFLICT (scope, user_id, insert_id) DO UPDATE SET event_id = EXCLUDED.event_id, created_at = now()
            WHERE event_insert_ids.created_at < now() - make_interval(days => $7)
        RETURNING event_id
    ), stored AS (
        INSERT INTO events (id, event_name, user_id, properties, timestamp)
        SELECT id, event_name, user_id, properties, timestamp FROM admitted
        WHERE insert_id IS NULL OR id IN (SELECT event_id FROM claimed)
        ON CONFLICT DO NOTHING
    )
    SELECT event_id, false FROM claimed
    UNION ALL
    SELECT id, NOT EXISTS (
        SELECT 1 FROM events WHERE events.id = suppressed.id AND events.timestamp = suppressed.timestamp
    ) FROM suppressed";

/// The events that keys seen within the window point at (read after the insert
/// committed, so a key claimed concurrently by another replica is visible).
const SELECT_KEYED_EVENTS: &str = "
    SELECT keys.scope, keys.user_id, keys.insert_id, keys.event_id
    FROM event_insert_ids AS keys
    JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS wanted(scope, user_id, insert_id)
        USING (scope, user_id, insert_id)";

/// Deletes at most $2 keys older than the window ($1 days) per statement, so expiry
/// never holds long locks.
const EXPIRE_INSERT_IDS: &str = "
    DELETE FROM event_insert_ids WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM event_insert_ids
        WHERE created_at < now() - make_interval(days => $1)
        LIMIT $2))";

/// An idempotency key as stored: an insert_id is unique per sender scope and user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct IdempotencyKey<'a> {
    scope: &'a str,
    /// "" for anonymous events.
    user_id: &'a str,
    insert_id: &'a str,
}

impl<'a> IdempotencyKey<'a> {
    fn of(event: &'a NewEvent) -> Option<Self> {
        let insert_id = event.insert_id.as_ref()?;
        Some(Self {
            scope: &event.key_scope,
            user_id: event.user_id.as_ref().map_or("", |user| user.as_str()),
            insert_id: insert_id.as_str(),
        })
    }
}

/// What became of one event of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored now under its own id.
    Inserted,
    /// Its insert_id was already stored within the window, for this event id.
    Duplicate { original: Uuid },
    /// Not stored: its user is on the suppression list (and its insert_id not claimed).
    Suppressed,
}

#[derive(Clone, Debug)]
pub struct EventRepository {
    database: Database,
    pii: PiiCipher,
}

impl EventRepository {
    pub fn new(database: Database) -> Self {
        Self { database, pii: PiiCipher::disabled() }
    }

    /// Encrypts sensitive property values on write and decrypts them on read.
    pub(crate) fn with_pii(self, pii: PiiCipher) -> Self {
        Self { pii, ..self }
    }

    /// The stored properties of one event, decrypted; `None` when there is no such event.
    pub(crate) async fn properties(
        &self,
        event_id: Uuid,
    ) -> Result<Option<serde_json::Value>, RepositoryError> {
        let stored: Option<Option<serde_json::Value>> = self
            .database
            .with_retry("select_event_properties", || async {
                let mut session = self.database.session().await?;
                let value = sqlx::query_scalar("SELECT properties FROM events WHERE id = $1")
                    .bind(event_id)
                    .fetch_optional(&mut *session)
                    .await?;
                session.finish().await?;
                Ok(value)
            })
            .await?;
        stored.map(|properties| open_properties(&self.pii, properties.unwrap_or_default())).transpose()
    }

    /// One attempt to store events in one statement (and so one transaction): all or
    /// none commit. Events whose insert_id was stored within `window_days` are not
    /// stored again; a key repeated inside `events` is stored once, for its first event,
    /// and the later ones answer as its duplicates. Events carrying a subject hash whose
    /// user is suppressed are not stored (the statement reads the suppression list); a
    /// batch without subject hashes runs the plain statements. Returns one outcome per event, in
    /// order. Not retried here: the error says whether anything may be stored (see
    /// [`WriteError`]); repeating the attempt is safe (the event ids are ours, and a key
    /// this statement claimed answers as ours). `answer_timeout` bounds the wait for
    /// PostgreSQL's answer.
    pub(crate) async fn insert_batch(
        &self,
        events: &[&NewEvent],
        window_days: i32,
        answer_timeout: Duration,
    ) -> Result<Vec<InsertOutcome>, WriteError> {
        let started = Instant::now();
        let result = async {
            let mut session = self.database.session_for_write().await?;
            let written = tokio::time::timeout(answer_timeout, async {
                let outcomes = self.insert_on(&mut session, events, window_days).await?;
                // Behind a pooler the statements above ran in a transaction: its commit
                // may land even when its answer does not come back.
                session.finish().await.map_err(|error| WriteError::OutcomeUnknown(error.into()))?;
                Ok(outcomes)
            })
            .await;
            match written {
                Ok(result) => result,
                Err(_) => {
                    discard(session);
                    Err(WriteError::OutcomeUnknown(RepositoryError::TimedOut(answer_timeout)))
                }
            }
        }
        .instrument(query_span("insert_events"))
        .await;
        metrics::record_db_call(
            "insert_events",
            started.elapsed(),
            result.as_ref().err().map(|error| error.error().kind()),
        );
        result
    }

    async fn insert_on(
        &self,
        connection: &mut PgConnection,
        events: &[&NewEvent],
        window_days: i32,
    ) -> Result<Vec<InsertOutcome>, WriteError> {
        // First event of each key; later events with the same key are its duplicates.
        let mut first_with_key: HashMap<IdempotencyKey<'_>, usize> = HashMap::new();
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        for (index, event) in events.iter().enumerate() {
            if let Some(key) = IdempotencyKey::of(event) {
                match first_with_key.get(&key) {
                    Some(&first) => repeats.push((index, first)),
                    None => {
                        first_with_key.insert(key, index);
                    }
                }
            }
        }
        let repeated: HashSet<usize> = repeats.iter().map(|(index, _)| *index).collect();
        let unique: Vec<&NewEvent> = events
            .iter()
            .enumerate()
            .filter(|(index, _)| !repeated.contains(index))
            .map(|(_, event)| *event)
            .collect();
        let ids: Vec<Uuid> = unique.iter().map(|event| event.id).collect();
        let names: Vec<&str> = unique.iter().map(|event| event.name.as_str()).collect();
        let user_ids: Vec<Option<&str>> =
            unique.iter().map(|event| event.user_id.as_ref().map(|user| user.as_str())).collect();
        // Validation built each object; only those with a value to encrypt are copied.
        let sealed: Vec<Cow<'_, serde_json::Value>> =
            unique.iter().map(|event| self.pii.sealed(event.properties.json())).collect();
        let properties: Vec<&serde_json::Value> = sealed.iter().map(|properties| &**properties).collect();
        let timestamps: Vec<_> = unique.iter().map(|event| event.timestamp).collect();

        // Only events of users named by a subject hash can be suppressed: a batch with
        // none (no SUPPRESSION_KEY_FILE, or only anonymous events) runs the plain statement.
        let subject_hashes: Option<Vec<Option<&[u8]>>> =
            unique.iter().any(|event| event.subject_hash.is_some()).then(|| {
                unique.iter().map(|event| event.subject_hash.as_ref().map(SubjectHash::as_bytes)).collect()
            });

        let mut outcomes = vec![InsertOutcome::Inserted; events.len()];
        if first_with_key.is_empty() {
            let Some(subject_hashes) = subject_hashes else {
                sqlx::query(INSERT_EVENTS)
                    .bind(&ids)
                    .bind(&names)
                    .bind(&user_ids)
                    .bind(&properties)
                    .bind(&timestamps)
                    .execute(&mut *connection)
                    .await
                    .map_err(WriteError::from_statement)?;
                return Ok(outcomes);
            };
            let answered: Vec<(Uuid, bool)> = sqlx::query_as(INSERT_EVENTS_CHECKING_SUPPRESSION)
                .bind(&ids)
                .bind(&names)
                .bind(&user_ids)
                .bind(&properties)
                .bind(&timestamps)
                .bind(&subject_hashes)
                .fetch_all(&mut *connection)
                .await
                .map_err(WriteError::from_statement)?;
            mark_suppressed(&mut outcomes, events, &answered);
            return Ok(outcomes);
        }

        let unique_keys: Vec<Option<&str>> =
            unique.iter().map(|event| event.insert_id.as_ref().map(|insert_id| insert_id.as_str())).collect();
        let key_scopes: Vec<&str> = unique.iter().map(|event| event.key_scope.as_str()).collect();
        // Per event: (id, false) when this statement (or an earlier attempt of it) owns
        // the event, (id, true) when its user is suppressed and it is not stored.
        let answered: Vec<(Uuid, bool)> = match subject_hashes {
            None => sqlx::query_scalar(INSERT_EVENTS_WITH_KEYS)
                .bind(&ids)
                .bind(&names)
                .bind(&user_ids)
                .bind(&properties)
                .bind(&timestamps)
                .bind(&unique_keys)
                .bind(window_days)
                .bind(&key_scopes)
                .fetch_all(&mut *connection)
                .await
                .map_err(WriteError::from_statement)?
                .into_iter()
                .map(|claimed| (claimed, false))
                .collect(),
            Some(subject_hashes) => sqlx::query_as(INSERT_EVENTS_WITH_KEYS_CHECKING_SUPPRESSION)
                .bind(&ids)
                .bind(&names)
                .bind(&user_ids)
                .bind(&properties)
                .bind(&timestamps)
                .bind(&unique_keys)
                .bind(window_days)
                .bind(&key_scopes)
                .bind(&subject_hashes)
                .fetch_all(&mut *connection)
                .await
                .map_err(WriteError::from_statement)?,
        };
        mark_suppressed(&mut outcomes, events, &answered);
        let answered: HashSet<Uuid> = answered.into_iter().map(|(id, _)| id).collect();
        // Keys neither claimed now nor left out with a suppressed event: seen within the window.
        let seen: Vec<&IdempotencyKey<'_>> = first_with_key
            .iter()
            .filter(|(_, index)| !answered.contains(&events[**index].id))
            .map(|(key, _)| key)
            .collect();
        if !seen.is_empty() {
            let scopes: Vec<&str> = seen.iter().map(|key| key.scope).collect();
            let users: Vec<&str> = seen.iter().map(|key| key.user_id).collect();
            let insert_ids: Vec<&str> = seen.iter().map(|key| key.insert_id).collect();
            // The insert has committed (behind a pooler: commits with the session): whatever
            // fails from here leaves its outcome to be found out by repeating the attempt.
            let originals: Vec<(String, String, String, Uuid)> = sqlx::query_as(SELECT_KEYED_EVENTS)
                .bind(&scopes)
                .bind(&users)
                .bind(&insert_ids)
                .fetch_all(&mut *connection)
                .await
                .map_err(|error| WriteError::OutcomeUnknown(error.into()))?;
            if originals.len() < seen.len() {
                // Expiry removed a key between the two statements: repeating the attempt
                // claims the key afresh while the rows already stored answer as ours.
                return Err(WriteError::OutcomeUnknown(RepositoryError::Query(sqlx::Error::RowNotFound)));
            }
            for (scope, user_id, insert_id, original) in &originals {
                let key = IdempotencyKey { scope, user_id, insert_id };
                let Some(&index) = first_with_key.get(&key) else { continue };
                // Our own id means an earlier attempt of this very statement committed
                // (a retry after an ambiguous commit): the event was stored, by us.
                if *original != events[index].id {
                    outcomes[index] = InsertOutcome::Duplicate { original: *original };
                }
            }
        }
        for (index, first) in repeats {
            outcomes[index] = match outcomes[first] {
                InsertOutcome::Inserted => InsertOutcome::Duplicate { original: events[first].id },
                duplicate @ InsertOutcome::Duplicate { .. } => duplicate,
                InsertOutcome::Suppressed => InsertOutcome::Suppressed,
            };
        }
        Ok(outcomes)
    }

    /// Deletes idempotency keys older than the window, `chunk` rows per statement,
    /// until none is left; returns how many were deleted.
    pub(crate) async fn expire_insert_ids(
        &self,
        window_days: i32,
        chunk: i64,
    ) -> Result<u64, RepositoryError> {
        let mut total = 0;
        loop {
            let deleted = self
                .database
                .with_retry("expire_insert_ids", || async {
                    let mut session = self.database.session().await?;
                    let result = sqlx::query(EXPIRE_INSERT_IDS)
                        .bind(window_days)
                        .bind(chunk)
                        .execute(&mut *session)
                        .await?;
                    session.finish().await?;
                    Ok(result.rows_affected())
                })
                .await?;
            total += deleted;
            if deleted < chunk.max(1) as u64 {
                return Ok(total);
            }
        }
    }
}

/// Marks the events a statement answered (id, true) for as suppressed.
fn mark_suppressed(outcomes: &mut [InsertOutcome], events: &[&NewEvent], answered: &[(Uuid, bool)]) {
    let suppressed: HashSet<Uuid> =
        answered.iter().filter(|(_, suppressed)| *suppressed).map(|(id, _)| *id).collect();
    if suppressed.is_empty() {
        return;
    }
    for (outcome, event) in outcomes.iter_mut().zip(events) {
        if suppressed.contains(&event.id) {
            *outcome = InsertOutcome::Suppressed;
        }
    }
}

/// Rows of (`event_name`, `bucket` when grouped, `count`) as [`EventCount`]s; ungrouped
/// rows are reported at the start of the range.
pub(super) fn event_counts_from_rows(
    rows: &[sqlx::postgres::PgRow],
    grouped: bool,
    range_start: i64,
) -> Result<Vec<EventCount>, RepositoryError> {
    rows.iter()
        .map(|row| {
            let bucket_start = if grouped { row.try_get::<i64, _>("bucket")? } else { range_start };
            Ok(EventCount {
                event_name: row.try_get("event_name")?,
                bucket_start,
                count: row.try_get("count")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(RepositoryError::from)
}
