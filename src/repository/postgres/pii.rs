//! Sensitive property values in PostgreSQL: decrypting what the repositories read and
//! `reencrypt`, which rewrites, in batches, every row holding a sensitive value in clear
//! text or under a key other than the current one.

use serde_json::Value;
use sqlx::Postgres;
use uuid::Uuid;

use super::{Database, RepositoryError};
use crate::security::pii::{normalize_field_name, PiiCipher, CIPHERTEXT_PREFIX};

/// Rows read per `reencrypt` batch.
pub(crate) const REENCRYPT_BATCH_ROWS: i64 = 500;

/// Decrypts a stored properties object; a value that does not decrypt (unknown key,
/// tampered) is [`RepositoryError::Corrupt`], logged by the caller and never shown.
pub(super) fn open_properties(pii: &PiiCipher, mut properties: Value) -> Result<Value, RepositoryError> {
    pii.open(&mut properties).map_err(RepositoryError::corrupt)?;
    Ok(properties)
}

/// What `reencrypt` did to one table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReencryptReport {
    /// Rows read that carry an encrypted value or a sensitive key.
    pub rows_examined: u64,
    /// Rows rewritten under the current key.
    pub rows_rewritten: u64,
    /// Rows left alone because a value did not decrypt (unknown key or tampered).
    pub rows_failed: u64,
}

/// One table `reencrypt` walks: its candidate query and its conditional update, and
/// the operation names their database calls are recorded under.
struct ReencryptTable {
    /// Candidates: rows with a key containing a normalised sensitive name (a superset of
    /// the keys [`PiiCipher`] matches; it decides) or a value with the ciphertext prefix.
    /// Keyset pagination
    /// on the primary key (`$1`), so each row is visited once even if it cannot be
    /// rewritten.
    candidates: &'static str,
    /// The update only applies when the row did not change since it was read (a
    /// concurrent IdentifyUser wins; the next run picks the row up again).
    update: &'static str,
    select_operation: &'static str,
    update_operation: &'static str,
}

const EVENTS: ReencryptTable = ReencryptTable {
    candidates: "
    SELECT id, properties FROM events
    WHERE id > $1 AND properties IS NOT NULL
      AND (properties::text LIKE '%' || $3 || '%'
           OR EXISTS (SELECT 1 FROM jsonb_object_keys(properties) AS key, unnest($2::text[]) AS field
                      WHERE strpos(lower(key), field) > 0))
    ORDER BY id LIMIT $4",
    update: "UPDATE events SET properties = $2 WHERE id = $1 AND properties = $3",
    select_operation: "reencrypt_select_events",
    update_operation: "reencrypt_update_event",
};

const USER_IDENTITIES: ReencryptTable = ReencryptTable {
    candidates: "
    SELECT user_id, properties FROM user_identities
    WHERE user_id > $1 AND properties IS NOT NULL
      AND (properties::text LIKE '%' || $3 || '%'
           OR EXISTS (SELECT 1 FROM jsonb_object_keys(properties) AS key, unnest($2::text[]) AS field
                      WHERE strpos(lower(key), field) > 0))
    ORDER BY user_id LIMIT $4",
    update: "UPDATE user_identities SET properties = $2 WHERE user_id = $1 AND properties = $3",
    select_operation: "reencrypt_select_users",
    update_operation: "reencrypt_update_user",
};

/// Rewrites sensitive values of `events` and `user_identities` under the current key.
pub async fn reencrypt_all(
    database: &Database,
    pii: &PiiCipher,
    fields: &[String],
) -> Result<(ReencryptReport, ReencryptReport), RepositoryError> {
    let fields: Vec<String> = fields.iter().map(|field| normalize_field_name(field)).collect();
    let events = reencrypt_table::<Uuid>(database, pii, &fields, &EVENTS).await?;
    let users = reencrypt_table::<String>(database, pii, &fields, &USER_IDENTITIES).await?;
    Ok((events, users))
}

/// Walks `table` in primary-key order, `REENCRYPT_BATCH_ROWS` candidates at a time,
/// starting after the smallest key `K::default()` (the nil UUID, the empty text), and
/// rewrites each candidate that needs it.
async fn reencrypt_table<K>(
    database: &Database,
    pii: &PiiCipher,
    fields: &[String],
    table: &ReencryptTable,
) -> Result<ReencryptReport, RepositoryError>
where
    K: Clone + Default + Send + Sync + Unpin + sqlx::Type<Postgres> + for<'a> sqlx::Encode<'a, Postgres>,
    K: for<'r> sqlx::Decode<'r, Postgres>,
{
    let mut report = ReencryptReport::default();
    let mut after = K::default();
    loop {
        let rows: Vec<(K, Value)> = database
            .with_retry(table.select_operation, || async {
                let mut session = database.session().await?;
                let value = sqlx::query_as(table.candidates)
                    .bind(&after)
                    .bind(fields)
                    .bind(CIPHERTEXT_PREFIX)
                    .bind(REENCRYPT_BATCH_ROWS)
                    .fetch_all(&mut *session)
                    .await?;
                session.finish().await?;
                Ok(value)
            })
            .await?;
        let Some((last_key, _)) = rows.last() else { return Ok(report) };
        after = last_key.clone();
        for (key, stored) in rows {
            report.rows_examined += 1;
            let Some(rewritten) = reseal(pii, &stored, &mut report) else { continue };
            database
                .with_retry(table.update_operation, || async {
                    let mut session = database.session().await?;
                    sqlx::query(table.update)
                        .bind(&key)
                        .bind(&rewritten)
                        .bind(&stored)
                        .execute(&mut *session)
                        .await?;
                    session.finish().await?;
                    Ok(())
                })
                .await?;
            report.rows_rewritten += 1;
        }
    }
}

/// The row's properties under the current key, or `None` when nothing is to be done
/// or a value does not decrypt (counted and logged, never the value).
fn reseal(pii: &PiiCipher, stored: &Value, report: &mut ReencryptReport) -> Option<Value> {
    if !pii.needs_reencryption(stored) {
        return None;
    }
    let mut rewritten = stored.clone();
    match pii.reseal(&mut rewritten) {
        Ok(()) => Some(rewritten),
        Err(error) => {
            report.rows_failed += 1;
            tracing::warn!(error = %error, "stored value does not decrypt, row left as is");
            None
        }
    }
}
