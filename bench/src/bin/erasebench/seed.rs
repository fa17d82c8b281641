//! The history erasebench erases: the heavy user's events spread over the last N days,
//! interleaved in time with the events of many other users (one INSERT ... SELECT per
//! day, in time order, as live traffic lays rows out), folded into the rollups as a
//! running service would have done; and the raw-SQL side of the checks afterwards.

use std::time::Instant;

use analytics_service::config::Config;
use analytics_service::repository::postgres::{fold, Database};
use sqlx::PgConnection;

use crate::Arguments;

const DAY: i64 = 86_400;

/// Distinct event names of the seeded and the live events.
pub(crate) const EVENT_NAMES: i64 = 10;

/// Seeds `arguments.events` events of `heavy_user` and `arguments.background_events` of
/// `arguments.background_users` other users over the `arguments.days` days before `now`
/// (Unix seconds), then folds the rollups and runs VACUUM ANALYZE; returns the seconds
/// seeding and folding took.
pub(crate) async fn seed(
    connection: &mut PgConnection,
    config: &Config,
    arguments: &Arguments,
    heavy_user: &str,
    now: i64,
) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    sqlx::query("SELECT analytics_ensure_event_partitions(to_timestamp($1), to_timestamp($2))")
        .bind((now - (arguments.days + 1) * DAY) as f64)
        .bind((now + DAY) as f64)
        .execute(&mut *connection)
        .await?;
    let days = arguments.days.max(1);
    // Oldest day first; the newest day also takes the remainders.
    for day in (0..days).rev() {
        let share = |total: i64| total / days + if day == 0 { total % days } else { 0 };
        let (heavy, background) = (share(arguments.events), share(arguments.background_events));
        sqlx::query(
            "INSERT INTO events (event_name, user_id, properties, timestamp)
             SELECT 'event_' || lpad((g % $1)::text, 2, '0'),
                    CASE WHEN g <= $2 THEN $3 ELSE 'user_' || floor($4 * random())::int END,
                    jsonb_build_object('page', '/page/' || (g % 100), 'load_ms', g % 997),
                    to_timestamp($5 - random() * 86400) AS timestamp
               FROM generate_series(1, $2 + $6) AS g
              ORDER BY timestamp",
        )
        .bind(EVENT_NAMES)
        .bind(heavy)
        .bind(heavy_user)
        .bind(arguments.background_users as f64)
        .bind((now - day * DAY) as f64)
        .bind(background)
        .execute(&mut *connection)
        .await?;
    }
    let seeding = started.elapsed().as_secs_f64();
    let started = Instant::now();
    // What the trigger appended is pending until folded; a running service would have
    // folded it long before an erasure request comes.
    fold::fold_all_pending(&Database::connect_lazy(config)).await?;
    sqlx::query("VACUUM ANALYZE").execute(&mut *connection).await?;
    Ok((seeding, started.elapsed().as_secs_f64()))
}

/// Rows of `user_id` in `events`.
pub(crate) async fn rows_of(connection: &mut PgConnection, user_id: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(connection)
        .await?)
}

/// (event name, events) in [start, end) (Unix seconds) straight from `events`, by name.
pub(crate) async fn raw_counts(
    connection: &mut PgConnection,
    start: i64,
    end: i64,
) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT event_name, count(*) FROM events
          WHERE timestamp >= to_timestamp($1) AND timestamp < to_timestamp($2)
          GROUP BY event_name ORDER BY event_name",
    )
    .bind(start as f64)
    .bind(end as f64)
    .fetch_all(connection)
    .await?)
}
