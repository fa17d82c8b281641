//! The synthetic history countbench counts over, and the ingestion cost of the rollup
//! trigger measured on the same schema.

use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::{Arguments, DAY};

/// One INSERT ... SELECT per day (so the trigger sees day-sized batches), users and names
/// skewed with powers of random(), times of day uniform.
pub(crate) async fn seed(
    connection: &mut PgConnection,
    arguments: &Arguments,
    now: i64,
) -> anyhow::Result<()> {
    let per_day = arguments.events / arguments.days;
    // Oldest day first and each day in time order, as live traffic arrives: the table's
    // physical order then follows time, as it does in production.
    for day in (0..arguments.days).rev() {
        let day_end = now - day * DAY;
        sqlx::query(
            "INSERT INTO events (event_name, user_id, properties, timestamp)
             SELECT 'event_' || lpad(floor($1 * power(random(), 2))::int::text, 2, '0'),
                    'user_' || floor($2 * power(random(), 3))::int,
                    NULL,
                    to_timestamp($3 - random() * 86400) AS timestamp
               FROM generate_series(1, $4)
              ORDER BY timestamp",
        )
        .bind(arguments.names as f64)
        .bind(arguments.users as f64)
        .bind(day_end as f64)
        .bind(per_day)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// Inserts `total` events in batches of 500 (the service's UNNEST statement) with the
/// rollup trigger on and off, interleaved in `rounds` rounds (the order alternating) so
/// both see the same machine load; returns markdown lines with the throughput ratio over
/// all rounds, each round's ratio and their median (one busy moment on a shared machine
/// moves one round, not the median).
pub(crate) async fn measure_ingestion_cost(
    connection: &mut PgConnection,
    total: i64,
    rounds: i64,
) -> anyhow::Result<String> {
    const BATCH: i64 = 500;
    let rounds = rounds.max(1);
    let per_round = (total / rounds / 2).max(BATCH);
    let mut with_trigger = Duration::ZERO;
    let mut without_trigger = Duration::ZERO;
    let mut round_ratios = Vec::new();
    let now = chrono::Utc::now().timestamp();
    for round in 0..rounds {
        let mut round_with = Duration::ZERO;
        let mut round_without = Duration::ZERO;
        for trigger_on in [round % 2 == 0, round % 2 != 0] {
            let toggle = if trigger_on { "ENABLE" } else { "DISABLE" };
            sqlx::query(&format!("ALTER TABLE events {toggle} TRIGGER events_rollup_after_insert"))
                .execute(&mut *connection)
                .await?;
            let started = Instant::now();
            let mut inserted = 0;
            while inserted < per_round {
                let ids: Vec<uuid::Uuid> = (0..BATCH).map(|_| uuid::Uuid::now_v7()).collect();
                let names: Vec<String> =
                    (0..BATCH).map(|index| format!("event_{:02}", (index * 7 + round) % 20)).collect();
                let users: Vec<String> =
                    (0..BATCH).map(|index| format!("user_{}", (index * 131 + inserted) % 100_000)).collect();
                let properties: Vec<serde_json::Value> =
                    (0..BATCH).map(|index| serde_json::json!({"plan": "pro", "index": index})).collect();
                let timestamps: Vec<chrono::DateTime<chrono::Utc>> = (0..BATCH)
                    .map(|index| {
                        chrono::DateTime::from_timestamp(now - (index * 13) % 7_200, 0).unwrap_or_default()
                    })
                    .collect();
                sqlx::query(
                    "INSERT INTO events (id, event_name, user_id, properties, timestamp)
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[])",
                )
                .bind(&ids)
                .bind(&names)
                .bind(&users)
                .bind(&properties)
                .bind(&timestamps)
                .execute(&mut *connection)
                .await?;
                inserted += BATCH;
            }
            if trigger_on {
                round_with = started.elapsed();
            } else {
                round_without = started.elapsed();
            }
        }
        with_trigger += round_with;
        without_trigger += round_without;
        // Equal events each way, so the throughput ratio is the inverse ratio of times.
        round_ratios.push(round_without.as_secs_f64() / round_with.as_secs_f64().max(1e-9));
    }
    sqlx::query("ALTER TABLE events ENABLE TRIGGER events_rollup_after_insert")
        .execute(&mut *connection)
        .await?;
    // The trigger-off rows are missing from the rollups: remove every measurement row.
    sqlx::query(
        "TRUNCATE events, event_counts_hourly, event_counts_daily, event_totals_hourly, event_count_deltas,
                  user_activity_pending, user_activity_hourly, user_activity_daily, user_ordinals",
    )
    .execute(&mut *connection)
    .await?;
    let events_each_way = (per_round * rounds) as f64;
    let rate_with = events_each_way / with_trigger.as_secs_f64();
    let rate_without = events_each_way / without_trigger.as_secs_f64();
    let listed: Vec<String> = round_ratios.iter().map(|ratio| format!("{ratio:.2}")).collect();
    let mut sorted = round_ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => 1.0,
        length if length % 2 == 1 => sorted[length / 2],
        length => (sorted[length / 2 - 1] + sorted[length / 2]) / 2.0,
    };
    Ok(format!(
        "ingestion, {} events each way in batches of {BATCH}, 1 connection, {rounds} interleaved rounds: without trigger {:.0} events/s, with trigger {:.0} events/s, throughput ratio {:.2} (cost {:.0}%); per round (on first in odd rounds) {}, median {:.2} (cost {:.0}%)\n",
        per_round * rounds,
        rate_without,
        rate_with,
        rate_with / rate_without,
        (1.0 - rate_with / rate_without) * 100.0,
        listed.join(" "),
        median,
        (1.0 - median) * 100.0
    ))
}
