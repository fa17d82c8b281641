//! The raw insert limit: the same synthetic events written straight into the migrated
//! schema with UNNEST, COPY and the service's own statement, without the server; and the
//! durable floor of one event, a single-row INSERT commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics_service::pb;
use chrono::Utc;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use uuid::Uuid;

use crate::report::Row;
use crate::workload::{synthetic, synthetic_json};
use crate::Args;
use analytics_bench::loops::new_histogram;

#[derive(Clone, Copy)]
pub(crate) enum RawMethod {
    Unnest,
    /// The statement the service runs for events without an insert_id.
    UnnestOnConflict,
    Copy,
}

pub(crate) async fn truncate(options: &PgConnectOptions) -> anyhow::Result<()> {
    let mut connection = options.connect().await?;
    sqlx::query(
        "TRUNCATE events, event_insert_ids, event_counts_hourly, event_counts_daily, event_totals_hourly,
                  event_count_deltas, user_activity_pending, user_activity_hourly, user_activity_daily,
                  user_ordinals",
    )
    .execute(&mut connection)
    .await?;
    sqlx::query("CHECKPOINT").execute(&mut connection).await.ok();
    connection.close().await.ok();
    Ok(())
}

/// Rows/s of `raw_writers` connections inserting `raw_batch`-row statements of the same
/// synthetic events straight into the same schema, for the phase duration.
pub(crate) async fn raw_limit(
    args: &Args,
    options: &PgConnectOptions,
    method: RawMethod,
) -> anyhow::Result<Row> {
    let duration = Duration::from_secs(args.seconds);
    let deadline = Instant::now() + duration;
    let batch = args.raw_batch as u64;
    let sequence = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.raw_writers {
        let options = options.clone();
        let sequence = sequence.clone();
        tasks.push(tokio::spawn(async move {
            let mut connection = options.connect().await?;
            let mut histogram = new_histogram();
            let mut rows = 0u64;
            while Instant::now() < deadline {
                let first = sequence.fetch_add(batch, Ordering::Relaxed);
                let started = Instant::now();
                match method {
                    RawMethod::Unnest => insert_unnest(&mut connection, first, batch, "").await?,
                    RawMethod::UnnestOnConflict => {
                        insert_unnest(&mut connection, first, batch, " ON CONFLICT DO NOTHING").await?
                    }
                    RawMethod::Copy => insert_copy(&mut connection, first, batch).await?,
                }
                histogram.saturating_record(started.elapsed().as_micros() as u64);
                rows += batch;
            }
            connection.close().await.ok();
            anyhow::Ok((rows, histogram, 0u64))
        }));
    }
    let mut histogram = new_histogram();
    let mut rows = 0;
    for task in tasks {
        let (task_rows, task_histogram, _) = task.await??;
        rows += task_rows;
        histogram.add(&task_histogram).ok();
    }
    let key = match method {
        RawMethod::Unnest => "raw-unnest",
        RawMethod::Copy => "raw-copy",
        RawMethod::UnnestOnConflict => "raw-on-conflict",
    };
    let name = match method {
        RawMethod::Unnest => "limit: raw INSERT ... UNNEST",
        RawMethod::UnnestOnConflict => {
            "raw INSERT ... UNNEST ON CONFLICT DO NOTHING (the service's statement)"
        }
        RawMethod::Copy => "limit: raw COPY",
    };
    Ok(Row {
        key,
        name: name.into(),
        offered: format!("{} writers x {} rows", args.raw_writers, args.raw_batch),
        achieved: rows as f64 / duration.as_secs_f64(),
        unit: "rows/s",
        latency: Some(histogram),
        errors: 0,
        note: "latency per statement".into(),
        usage: None,
    })
}

async fn insert_unnest(
    connection: &mut PgConnection,
    first: u64,
    count: u64,
    suffix: &str,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let numbers: Vec<u64> = (first..first + count).collect();
    let events: Vec<pb::TrackEventRequest> = numbers.iter().map(|&n| synthetic(n)).collect();
    let ids: Vec<Uuid> = numbers.iter().map(|_| Uuid::now_v7()).collect();
    let names: Vec<&str> = events.iter().map(|event| event.event_name.as_str()).collect();
    let users: Vec<&str> = events.iter().map(|event| event.user_id.as_str()).collect();
    let properties: Vec<serde_json::Value> = numbers.iter().map(|&n| synthetic_json(n)).collect();
    let timestamps = vec![now; numbers.len()];
    let statement = format!(
        "INSERT INTO events (id, event_name, user_id, properties, timestamp)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[]){suffix}"
    );
    sqlx::query(&statement)
        .bind(&ids)
        .bind(&names)
        .bind(&users)
        .bind(&properties)
        .bind(&timestamps)
        .execute(connection)
        .await?;
    Ok(())
}

async fn insert_copy(connection: &mut PgConnection, first: u64, count: u64) -> anyhow::Result<()> {
    let now = Utc::now().to_rfc3339();
    let mut data = String::with_capacity(count as usize * 160);
    for n in first..first + count {
        let event = synthetic(n);
        let json = synthetic_json(n).to_string().replace('"', "\"\"");
        data.push_str(&format!(
            "{},{},{},\"{}\",{}\n",
            Uuid::now_v7(),
            event.event_name,
            event.user_id,
            json,
            now
        ));
    }
    let mut copy = connection
        .copy_in_raw("COPY events (id, event_name, user_id, properties, timestamp) FROM STDIN (FORMAT csv)")
        .await?;
    copy.send(data.as_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

/// The durable floor of one event: one connection inserting one row per statement into a
/// scratch table shaped like `events` (no partitions, triggers or secondary indexes),
/// autocommit, sequentially for the phase duration. Its p50 is one commit's round trip.
pub(crate) async fn insert_floor(args: &Args, options: &PgConnectOptions) -> anyhow::Result<Row> {
    let duration = Duration::from_secs(args.seconds);
    let mut connection = options.connect().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS loadgen_insert_floor (
             id uuid PRIMARY KEY, event_name text NOT NULL, user_id text,
             properties jsonb NOT NULL, timestamp timestamptz NOT NULL)",
    )
    .execute(&mut connection)
    .await?;
    let mut histogram = new_histogram();
    let deadline = Instant::now() + duration;
    let mut n = 0u64;
    while Instant::now() < deadline {
        let event = synthetic(n);
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO loadgen_insert_floor (id, event_name, user_id, properties, timestamp)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(&event.event_name)
        .bind(&event.user_id)
        .bind(synthetic_json(n))
        .bind(Utc::now())
        .execute(&mut connection)
        .await?;
        histogram.saturating_record(started.elapsed().as_micros() as u64);
        n += 1;
    }
    sqlx::query("DROP TABLE loadgen_insert_floor").execute(&mut connection).await.ok();
    connection.close().await.ok();
    Ok(Row {
        key: "floor",
        name: "floor: single-row INSERT commit (one connection, autocommit)".into(),
        offered: "1 in flight".into(),
        achieved: n as f64 / duration.as_secs_f64(),
        unit: "rows/s",
        latency: Some(histogram),
        errors: 0,
        note: "scratch table, no triggers".into(),
        usage: None,
    })
}
