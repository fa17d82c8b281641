//! `countbench`: the issue-4 benchmark. Seeds a throwaway database with synthetic events
//! (skewed users and names over N days), measures the ingestion cost of the rollup
//! trigger, then p50/p95/p99 of GetEventCount and GetUserCount through the real gRPC
//! server against the raw-SQL baseline, checks every answer against raw SQL, and prints
//! markdown tables. Traffic goes to 127.0.0.1 only and is bounded by `--samples`.
//!
//! `cargo run --release --bin countbench -- --events 10000000`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use analytics_service::config::Config;
use analytics_service::models::{EventFilter, GroupBy, TimeRange};
use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use analytics_service::repository::postgres::{
    connect_options, fold, partitions, schema, Database, EventRepository,
};
use analytics_service::startup::Application;
use anyhow::Context as _;
use clap::Parser;
use sqlx::{Connection, PgConnection};
use tonic::transport::Channel;

const DAY: i64 = 86_400;

#[derive(Parser, Debug)]
#[command(about = "Benchmark of rollup-backed counts against raw SQL")]
struct Arguments {
    /// Synthetic events to seed.
    #[arg(long, default_value_t = 10_000_000)]
    events: i64,
    /// Distinct users (skewed: a few users send most events).
    #[arg(long, default_value_t = 100_000)]
    users: i64,
    /// Days of history, ending now.
    #[arg(long, default_value_t = 90)]
    days: i64,
    /// Distinct event names (skewed).
    #[arg(long, default_value_t = 20)]
    names: i64,
    /// Timed calls per query shape through the service.
    #[arg(long, default_value_t = 40)]
    samples: usize,
    /// Timed raw-SQL calls per query shape (the slow baseline).
    #[arg(long, default_value_t = 5)]
    baseline_samples: usize,
    /// Events inserted with and without the trigger to measure its ingestion cost.
    #[arg(long, default_value_t = 200_000)]
    ingest_events: i64,
    #[arg(long, default_value = "127.0.0.1")]
    postgres_host: String,
    #[arg(long, default_value_t = 5432)]
    postgres_port: u16,
    #[arg(long, default_value = "postgres")]
    postgres_user: String,
    #[arg(long, default_value = "127.0.0.1")]
    redis_host: String,
    /// Keep the database afterwards (it is dropped by default).
    #[arg(long)]
    keep_database: bool,
    /// Reuse a database kept by an earlier `--keep-database` run: migrate it, skip the
    /// ingestion measurement and the seeding; "now" is its newest event.
    #[arg(long)]
    reuse_database: Option<String>,
}

#[derive(Clone, Debug)]
enum Shape {
    Events { group_by: &'static str, days: i64, with_name: bool },
    Users { days: i64 },
}

impl Shape {
    fn days(&self) -> i64 {
        match self {
            Shape::Events { days, .. } | Shape::Users { days } => *days,
        }
    }

    fn label(&self) -> String {
        match self {
            Shape::Events { group_by, days, with_name } => {
                let name = if *with_name { ", one name" } else { ", all names" };
                format!("GetEventCount {group_by} over {days} d{name}")
            }
            Shape::Users { days } => format!("GetUserCount exact over {days} d"),
        }
    }
}

fn shapes() -> Vec<Shape> {
    let mut shapes = Vec::new();
    for with_name in [false, true] {
        shapes.push(Shape::Events { group_by: "hour", days: 7, with_name });
        shapes.push(Shape::Events { group_by: "day", days: 90, with_name });
        shapes.push(Shape::Events { group_by: "week", days: 90, with_name });
    }
    for days in [1, 30, 90] {
        shapes.push(Shape::Users { days });
    }
    shapes
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn millis(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1_000.0)
}

struct Timings(Vec<Duration>);

impl Timings {
    fn summary(&self) -> (Duration, Duration, Duration) {
        let mut sorted = self.0.clone();
        sorted.sort();
        (percentile(&sorted, 0.5), percentile(&sorted, 0.95), percentile(&sorted, 0.99))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    let database_name = match &arguments.reuse_database {
        Some(name) => name.clone(),
        None => format!("countbench_{}", uuid::Uuid::now_v7().simple()),
    };
    let config = bench_config(&arguments, &database_name)?;
    let mut admin = PgConnection::connect_with(&connect_options(&config).database("postgres")).await?;
    if arguments.reuse_database.is_none() {
        sqlx::query(&format!("CREATE DATABASE {database_name}")).execute(&mut admin).await?;
    }
    println!("database {database_name}\n");
    let result = run(&arguments, &config).await;
    if !arguments.keep_database && arguments.reuse_database.is_none() {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {database_name} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
    }
    result
}

fn bench_config(arguments: &Arguments, database_name: &str) -> anyhow::Result<Config> {
    let prefix = format!("countbench:{}", uuid::Uuid::now_v7().simple());
    let variables: HashMap<String, String> = [
        ("SERVICE_PORT", "0"),
        ("PROMETHEUS_PORT", "0"),
        ("SERVICE_BIND_ADDRESS", "127.0.0.1"),
        ("POSTGRES_HOST", arguments.postgres_host.as_str()),
        ("POSTGRES_USER", arguments.postgres_user.as_str()),
        ("POSTGRES_PASSWORD", ""),
        ("POSTGRES_DB", database_name),
        ("POSTGRES_SSLMODE", "disable"),
        ("POSTGRES_MAX_CONNECTIONS", "8"),
        ("REDIS_HOST", arguments.redis_host.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("SELF_TRACKING", "false"),
        ("REQUEST_TIMEOUT_SECONDS", "60"),
        ("LOG_LEVEL", "warn"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .chain([("POSTGRES_PORT".to_string(), arguments.postgres_port.to_string())])
    .collect();
    Config::from_vars(variables).context("benchmark configuration")
}

async fn run(arguments: &Arguments, config: &Config) -> anyhow::Result<()> {
    let migrating_started = Instant::now();
    schema::migrate(&connect_options(config)).await?;
    let migrating = migrating_started.elapsed();
    let database = Database::connect_lazy(config);
    let now = match arguments.reuse_database {
        Some(_) => {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT max(timestamp) FROM events")
                .fetch_one(database.pool())
                .await?
                + chrono::Duration::seconds(1)
        }
        None => chrono::Utc::now(),
    };
    partitions::ensure_partitions(
        &database,
        now - chrono::Duration::days(arguments.days + 1),
        now + chrono::Duration::days(62),
    )
    .await?;
    let mut connection = PgConnection::connect_with(&connect_options(config)).await?;

    println!("## countbench {}\n", now.format("%Y-%m-%d %H:%M UTC"));
    println!(
        "events {}, users {}, names {}, days {}; machine: {} cores shared with other builds\n",
        arguments.events,
        arguments.users,
        arguments.names,
        arguments.days,
        std::thread::available_parallelism().map(usize::from).unwrap_or(0)
    );

    if arguments.reuse_database.is_some() {
        let events: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut connection).await?;
        println!("reused {events} events; migrations applied in {:.1} s\n", migrating.as_secs_f64());
    } else {
        let ingestion = measure_ingestion_cost(&mut connection, arguments.ingest_events).await?;
        println!("{ingestion}");
        let seeding_started = Instant::now();
        seed(&mut connection, arguments, now.timestamp()).await?;
        let seeded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut connection).await?;
        println!(
            "seeded {seeded} events (trigger on, one INSERT per day) in {:.0} s\n",
            seeding_started.elapsed().as_secs_f64()
        );
    }
    // What the trigger appended is pending until folded; fold it all before timing, as a
    // running service would have done by then.
    let folding_started = Instant::now();
    let folded = fold::fold_all_pending(&database).await?;
    println!(
        "folded {} event-count deltas and {} (hour, user) pairs into the rollups in {:.1} s\n",
        folded.folded_deltas,
        folded.folded_pairs,
        folding_started.elapsed().as_secs_f64()
    );
    sqlx::query("VACUUM ANALYZE").execute(&mut connection).await?;

    let application = Application::build(config.clone()).await?;
    let address = application.grpc_address();
    let admin_address = application.admin_address();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until_stopped(async move {
        stopped.await.ok();
    }));
    let channel = Channel::from_shared(format!("http://{address}"))?.connect().await?;
    let client = AnalyticsServiceClient::new(channel);
    let raw = EventRepository::new(database.clone());

    println!("| query | raw SQL p50 / p95 / p99 ms | service cold p50 / p95 / p99 ms | service warm p50 / p95 / p99 ms | p95 speed-up (raw / cold) | answers equal to raw SQL |");
    println!("|---|---|---|---|---|---|");
    let end = now.timestamp() - 600;
    for shape in shapes() {
        let requests: Vec<(i64, i64)> = (0..arguments.samples as i64)
            .map(|sample| {
                let days = shape.days();
                // Every sample asks a range whose whole hours differ from the others' (ends
                // 1 h 1 min 40 s apart), so its first call finds nothing cached: cold.
                let sample_end = end - sample * 3_700;
                (sample_end - days * DAY + 3_600, sample_end)
            })
            .collect();
        let mut baseline = Vec::new();
        let mut baseline_answers = Vec::new();
        for (start, finish) in requests.iter().take(arguments.baseline_samples) {
            let started = Instant::now();
            let answer = raw_answer(&raw, &shape, *start, *finish).await?;
            baseline.push(started.elapsed());
            baseline_answers.push(answer);
        }
        let mut cold = Vec::new();
        let mut warm = Vec::new();
        let mut equal = 0;
        for (index, (start, finish)) in requests.iter().enumerate() {
            let started = Instant::now();
            let answer = service_answer(&client, &shape, *start, *finish).await?;
            cold.push(started.elapsed());
            let started = Instant::now();
            service_answer(&client, &shape, *start, *finish).await?;
            warm.push(started.elapsed());
            let expected = match baseline_answers.get(index) {
                Some(expected) => expected.clone(),
                None if index < 2 * arguments.baseline_samples => {
                    raw_answer(&raw, &shape, *start, *finish).await?
                }
                None => continue,
            };
            if answer == expected {
                equal += 1;
            } else {
                eprintln!("mismatch for {} [{start}, {finish})", shape.label());
            }
        }
        let checked = requests.len().min(2 * arguments.baseline_samples);
        let (raw50, raw95, raw99) = Timings(baseline).summary();
        let (cold50, cold95, cold99) = Timings(cold).summary();
        let (warm50, warm95, warm99) = Timings(warm).summary();
        println!(
            "| {} | {} / {} / {} | {} / {} / {} | {} / {} / {} | {:.0}x | {equal}/{checked} |",
            shape.label(),
            millis(raw50),
            millis(raw95),
            millis(raw99),
            millis(cold50),
            millis(cold95),
            millis(cold99),
            millis(warm50),
            millis(warm95),
            millis(warm99),
            raw95.as_secs_f64() / cold95.as_secs_f64().max(1e-9),
        );
    }

    println!();
    dashboard_mix(&client, &raw, &database, arguments, end, admin_address).await?;
    stop.send(()).ok();
    server.await??;
    Ok(())
}

/// An answer in a comparable form: sorted (name, bucket, count) rows, or the user count.
type Answer = Vec<(String, i64, i64)>;

async fn raw_answer(raw: &EventRepository, shape: &Shape, start: i64, end: i64) -> anyhow::Result<Answer> {
    let range = TimeRange::parse(start, end, chrono::Utc::now())?;
    match shape {
        Shape::Events { group_by, with_name, .. } => {
            let filter = EventFilter {
                event_name: with_name
                    .then(|| analytics_service::models::EventName::parse("event_00".into()).unwrap()),
                range,
                group_by: GroupBy::parse(group_by)?,
                time_zone: chrono_tz::UTC,
            };
            Ok(raw
                .count(&filter)
                .await?
                .into_iter()
                .map(|count| (count.event_name, count.bucket_start, count.count))
                .collect())
        }
        Shape::Users { .. } => Ok(vec![(String::new(), 0, raw.unique_users(range).await?)]),
    }
}

async fn service_answer(
    client: &AnalyticsServiceClient<Channel>,
    shape: &Shape,
    start: i64,
    end: i64,
) -> anyhow::Result<Answer> {
    match shape {
        Shape::Events { group_by, with_name, .. } => {
            let response = client
                .clone()
                .get_event_count(pb::GetEventCountRequest {
                    event_name: if *with_name { "event_00".into() } else { String::new() },
                    start_time: start,
                    end_time: end,
                    group_by: (*group_by).into(),
                    time_zone: String::new(),
                })
                .await?;
            Ok(response
                .into_inner()
                .counts
                .into_iter()
                .map(|count| (count.event_name, count.timestamp, count.count))
                .collect())
        }
        Shape::Users { .. } => {
            let response = client
                .clone()
                .get_user_count(pb::GetUserCountRequest { start_time: start, end_time: end })
                .await?;
            Ok(vec![(String::new(), 0, response.into_inner().unique_users)])
        }
    }
}

/// Many clients repeating the same 20 dashboard queries with a sliding end time while
/// events keep arriving: each round first stores 200 events in the last minute (the open
/// edge) and, every fifth round, one late event somewhere in the last 7 days; then every
/// client asks the 20 queries with an end time 10 s later than the round before; then, with
/// nothing in flight, one of the queries (in turn) is asked again and compared with raw
/// SQL. Reports the cache hit rate from the service's own metric and the stale answers.
async fn dashboard_mix(
    client: &AnalyticsServiceClient<Channel>,
    raw: &EventRepository,
    database: &Database,
    arguments: &Arguments,
    end: i64,
    admin_address: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let before = cache_counters(admin_address).await?;
    let all_shapes = shapes();
    let queries: Vec<Shape> = all_shapes.iter().cycle().take(20).cloned().collect();
    let clients = 8;
    let rounds = arguments.samples.max(2);
    let started = Instant::now();
    let mut timings = Vec::new();
    let mut stale = 0;
    let mut checked = 0;
    let mut late_events = 0;
    for round in 0..rounds {
        let finish = end + (round as i64) * 10;
        let late: i64 = if round % 5 == 4 { 1 } else { 0 };
        late_events += late;
        sqlx::query(
            "INSERT INTO events (event_name, user_id, timestamp)
             SELECT 'event_' || lpad((i % 20)::text, 2, '0'), 'user_' || (i * 7919 % 100000),
                    to_timestamp(CASE WHEN i <= $3 THEN $1 - 7 * 86400 * random() ELSE $1 - 60 * random() END)
               FROM generate_series(1, $2) i",
        )
        .bind(finish as f64)
        .bind(200 + late)
        .bind(late)
        .execute(database.pool())
        .await?;
        let mut tasks = Vec::new();
        for client_number in 0..clients {
            let client = client.clone();
            let queries = queries.clone();
            tasks.push(tokio::spawn(async move {
                let mut timings = Vec::new();
                // Clients start at different queries, as dashboards refresh at different moments.
                for index in 0..queries.len() {
                    let shape = &queries[(index + client_number * 3) % queries.len()];
                    let days = shape.days();
                    let call_started = Instant::now();
                    service_answer(&client, shape, finish - days * DAY + 3_600, finish).await?;
                    timings.push(call_started.elapsed());
                }
                anyhow::Ok(timings)
            }));
        }
        for task in tasks {
            timings.extend(task.await??);
        }
        for shape in all_shapes.iter().cycle().skip(round).take(1) {
            let days = shape.days();
            let (start, stop) = (finish - days * DAY + 3_600, finish);
            checked += 1;
            if service_answer(client, shape, start, stop).await?
                != raw_answer(raw, shape, start, stop).await?
            {
                eprintln!("stale answer for {} [{start}, {stop})", shape.label());
                stale += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    let after = cache_counters(admin_address).await?;
    let [hits, misses, fresh] = [0, 1, 2].map(|index| after[index] - before[index]);
    let lookups = hits + misses + fresh;
    let metrics = format!(
        "cache hit {hits:.0}, miss {misses:.0}, fresh {fresh:.0}: hit rate {:.1}%",
        if lookups > 0.0 { hits / lookups * 100.0 } else { 0.0 }
    );
    let (p50, p95, p99) = Timings(timings.clone()).summary();
    println!(
        "dashboard mix: {clients} clients x {rounds} rounds x 20 queries = {} calls in {:.1} s, {} events stored meanwhile ({late_events} of them late, into cached hours); p50 / p95 / p99 {} / {} / {} ms; {metrics}; stale answers {stale}/{checked} checked against raw SQL",
        timings.len(),
        elapsed.as_secs_f64(),
        rounds as i64 * 200 + late_events,
        millis(p50),
        millis(p95),
        millis(p99),
    );
    Ok(())
}

/// Sums of analytics_cache_requests_total by result (hit, miss, fresh), scraped from the
/// service's own /metrics endpoint.
async fn cache_counters(admin_address: std::net::SocketAddr) -> anyhow::Result<[f64; 3]> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin_address).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    let mut counters = [0.0; 3];
    for line in body.lines().filter(|line| line.starts_with("analytics_cache_requests_total{")) {
        let value: f64 = line.rsplit(' ').next().and_then(|value| value.parse().ok()).unwrap_or(0.0);
        for (index, result) in ["hit", "miss", "fresh"].iter().enumerate() {
            if line.contains(&format!("result=\"{result}\"")) {
                counters[index] += value;
            }
        }
    }
    Ok(counters)
}

/// One INSERT ... SELECT per day (so the trigger sees day-sized batches), users and names
/// skewed with powers of random(), times of day uniform.
async fn seed(connection: &mut PgConnection, arguments: &Arguments, now: i64) -> anyhow::Result<()> {
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
/// rollup trigger on and off, interleaved in rounds so both see the same machine load;
/// returns a markdown line with the throughput ratio.
async fn measure_ingestion_cost(connection: &mut PgConnection, total: i64) -> anyhow::Result<String> {
    const BATCH: i64 = 500;
    const ROUNDS: i64 = 4;
    let per_round = total / ROUNDS / 2;
    let mut with_trigger = Duration::ZERO;
    let mut without_trigger = Duration::ZERO;
    let now = chrono::Utc::now().timestamp();
    for round in 0..ROUNDS {
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
                with_trigger += started.elapsed();
            } else {
                without_trigger += started.elapsed();
            }
        }
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
    let events_each_way = (per_round * ROUNDS) as f64;
    let rate_with = events_each_way / with_trigger.as_secs_f64();
    let rate_without = events_each_way / without_trigger.as_secs_f64();
    Ok(format!(
        "ingestion, {} events each way in batches of {BATCH}, 1 connection, interleaved: without trigger {:.0} events/s, with trigger {:.0} events/s, throughput ratio {:.2} (cost {:.0}%)\n",
        per_round * ROUNDS,
        rate_without,
        rate_with,
        rate_with / rate_without,
        (1.0 - rate_with / rate_without) * 100.0
    ))
}
