//! Monthly partitions of `events` (migration V1): creating them ahead of time and dropping whole old
//! ones for retention, together with their rollup rows. Both `serve`'s periodic
//! maintenance and `migrate` create partitions through [`ensure_accepted_partitions`],
//! so they agree on how far ahead partitions exist.

use chrono::{DateTime, Utc};

use super::{Database, RepositoryError};

/// How far ahead of now partitions exist, in months.
pub const PARTITION_MONTHS_AHEAD: u32 = 3;

/// The end of the partitioned future: [`PARTITION_MONTHS_AHEAD`] calendar months after
/// `now`.
pub fn partitions_ahead_until(now: DateTime<Utc>) -> DateTime<Utc> {
    now.checked_add_months(chrono::Months::new(PARTITION_MONTHS_AHEAD)).unwrap_or(now)
}

/// Creates the missing partitions for every timestamp an event may be accepted with:
/// from `now - event_max_age` to [`partitions_ahead_until`]; returns how many it made.
pub async fn ensure_accepted_partitions(
    database: &Database,
    now: DateTime<Utc>,
    event_max_age: chrono::Duration,
) -> Result<i32, RepositoryError> {
    ensure_partitions(database, now - event_max_age, partitions_ahead_until(now)).await
}

/// Creates the missing monthly partitions covering `[from, to]`; returns how many it made.
pub async fn ensure_partitions(
    database: &Database,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<i32, RepositoryError> {
    database
        .with_retry("ensure_event_partitions", || async {
            let mut session = database.session().await?;
            let created: i32 = sqlx::query_scalar("SELECT analytics_ensure_event_partitions($1, $2)")
                .bind(from)
                .bind(to)
                .fetch_one(&mut *session)
                .await?;
            session.finish().await?;
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
            let mut session = database.session().await?;
            let dropped: Vec<String> =
                sqlx::query_scalar("SELECT analytics_drop_event_partitions_before($1)")
                    .bind(cutoff)
                    .fetch_all(&mut *session)
                    .await?;
            session.finish().await?;
            Ok(dropped)
        })
        .await
}

/// One maintenance pass: partitions for every accepted timestamp
/// ([`ensure_accepted_partitions`]), then retention when `retention` is set.
pub(crate) async fn maintain_partitions(
    database: &Database,
    now: DateTime<Utc>,
    event_max_age: chrono::Duration,
    retention: Option<chrono::Duration>,
) -> Result<(i32, Vec<String>), RepositoryError> {
    let created = ensure_accepted_partitions(database, now, event_max_age).await?;
    let dropped = match retention {
        Some(retention) => drop_partitions_before(database, now - retention).await?,
        None => Vec::new(),
    };
    Ok((created, dropped))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn partitions_reach_three_calendar_months_ahead() {
        let now = Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap();
        assert_eq!(partitions_ahead_until(now), Utc.with_ymd_and_hms(2027, 2, 28, 12, 0, 0).unwrap());
    }
}
