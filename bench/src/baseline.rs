//! The raw-SQL baselines the service's count answers are timed and checked against: the
//! same questions as GetEventCount and GetUserCount, answered by scanning `events`
//! directly (no rollups, no cache).

use sqlx::{PgPool, Row as _};

/// Bucket start in Unix seconds, truncated in UTC ($3 is `hour`, `day` or `week`;
/// PostgreSQL's weeks start on Monday, as the service's do).
const GROUPED_SELECT: &str = "
    SELECT event_name,
           EXTRACT(EPOCH FROM date_trunc($3, timestamp AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')::bigint AS bucket,
           count(*) AS count
    FROM events
    WHERE timestamp >= $1 AND timestamp < $2";
/// Names in bytewise order (`COLLATE "C"`), the order the service answers in.
const GROUPED_ORDER: &str = " GROUP BY event_name, bucket ORDER BY bucket, event_name COLLATE \"C\"";

const UNIQUE_USERS: &str = "
    SELECT count(DISTINCT user_id)
    FROM events
    WHERE timestamp >= $1 AND timestamp < $2 AND user_id IS NOT NULL AND user_id <> ''";

fn time(seconds: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

/// (event name, bucket start, count) per name and UTC bucket (`group_by`: hour, day or
/// week) over [start, end) in Unix seconds, of one name or all names; ordered by bucket,
/// then name.
pub async fn event_counts(
    pool: &PgPool,
    group_by: &str,
    event_name: Option<&str>,
    start: i64,
    end: i64,
) -> sqlx::Result<Vec<(String, i64, i64)>> {
    // One statement text per shape (not `$4 IS NULL OR ...`), so each gets its own plan.
    let sql = match event_name {
        Some(_) => format!("{GROUPED_SELECT} AND event_name = $4{GROUPED_ORDER}"),
        None => format!("{GROUPED_SELECT}{GROUPED_ORDER}"),
    };
    let mut query = sqlx::query(&sql).bind(time(start)).bind(time(end)).bind(group_by);
    if let Some(name) = event_name {
        query = query.bind(name);
    }
    let rows = query.fetch_all(pool).await?;
    rows.iter()
        .map(|row| Ok((row.try_get("event_name")?, row.try_get("bucket")?, row.try_get("count")?)))
        .collect()
}

/// Distinct non-empty user ids with at least one event in [start, end).
pub async fn unique_users(pool: &PgPool, start: i64, end: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar(UNIQUE_USERS).bind(time(start)).bind(time(end)).fetch_one(pool).await
}
