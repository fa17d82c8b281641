//! Monthly partitions of `events` (migration V1): creating them ahead of time and
//! dropping whole old ones for retention, together with their rollup rows.

use chrono::{DateTime, Utc};

use super::{Database, RepositoryError};

/// How far ahead of now partitions exist, in months.
pub const PARTITION_MONTHS_AHEAD: i32 = 3;

/// Creates the missing monthly partitions covering `[from, to]`; returns how many it made.
pub async fn ensure_partitions(
    database: &Database,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<i32, RepositoryError> {
    database
        .with_retry("ensure_event_partitions", || async {
            let created: i32 = sqlx::query_scalar("SELECT analytics_ensure_event_partitions($1, $2)")
                .bind(from)
                .bind(to)
                .fetch_one(database.pool())
                .await?;
            Ok(created)
        })
        .await
}

/// Drops every partition whose month ends at or before `cutoff` and the rollup rows of
/// those months; returns the dropped partition names.
pub(crate) async fn drop_partitions_before(
    database: &Database,
    cutoff: DateTime<Utc>,
) -> Result<Vec<String>, RepositoryError> {
    database
        .with_retry("drop_event_partitions", || async {
            let dropped: Vec<String> =
                sqlx::query_scalar("SELECT analytics_drop_event_partitions_before($1)")
                    .bind(cutoff)
                    .fetch_all(database.pool())
                    .await?;
            Ok(dropped)
        })
        .await
}

/// One maintenance pass: partitions for every accepted timestamp (`now - event_max_age`
/// to [`PARTITION_MONTHS_AHEAD`] months ahead), then retention when `retention` is set.
pub(crate) async fn maintain_partitions(
    database: &Database,
    now: DateTime<Utc>,
    event_max_age: chrono::Duration,
    retention: Option<chrono::Duration>,
) -> Result<(i32, Vec<String>), RepositoryError> {
    let ahead = now.checked_add_months(chrono::Months::new(PARTITION_MONTHS_AHEAD as u32)).unwrap_or(now);
    let created = ensure_partitions(database, now - event_max_age, ahead).await?;
    let dropped = match retention {
        Some(retention) => drop_partitions_before(database, now - retention).await?,
        None => Vec::new(),
    };
    Ok((created, dropped))
}
