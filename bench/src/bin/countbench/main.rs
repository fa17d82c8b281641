//! `countbench`: the counts benchmark. Seeds a throwaway database with synthetic events
//! (skewed users and names over N days), measures the ingestion cost of the rollup
//! trigger, then p50/p95/p99 of GetEventCount and GetUserCount through the real gRPC
//! server against the raw-SQL baseline, checks every answer against raw SQL, and prints
//! markdown tables. Traffic goes to 127.0.0.1 only and is bounded by `--samples`.
//!
//! `cargo run --release -p analytics-bench --bin countbench -- --events 10000000`

mod dashboard;
mod queries;
mod seed;

use std::collections::HashMap;
use std::time::Instant;

use analytics_service::config::Config;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use analytics_service::repository::postgres::{
    connect_options, fold, hour_spans, partitions, schema, Database,
};
use analytics_service::startup::Application;
use anyhow::Context as _;
use clap::Parser;
use sqlx::{Connection, PgConnection};
use tonic::transport::Channel;

use crate::dashboard::dashboard_mix;
use crate::queries::{millis, raw_answer, service_answer, shapes, Timings};
use crate::seed::{measure_ingestion_cost, seed};

pub(crate) const DAY: i64 = 86_400;

#[derive(Parser, Debug)]
#[command(about = "Benchmark of rollup-backed counts against raw SQL")]
pub(crate) struct Arguments {
    /// Synthetic events to seed.
    #[arg(long, default_value_t = 10_000_000)]
    pub(crate) events: i64,
    /// Distinct users (skewed: a few users send most events).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) users: i64,
    /// Days of history, ending now.
    #[arg(long, default_value_t = 90)]
    pub(crate) days: i64,
    /// Distinct event names (skewed).
    #[arg(long, default_value_t = 20)]
    pub(crate) names: i64,
    /// Timed calls per query shape through the service.
    #[arg(long, default_value_t = 40)]
    pub(crate) samples: usize,
    /// Timed raw-SQL calls per query shape (the slow baseline).
    #[arg(long, default_value_t = 5)]
    pub(crate) baseline_samples: usize,
    /// Events inserted with and without the trigger to measure its ingestion cost.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) ingest_events: i64,
    /// Interleaved rounds (trigger on and off, the order alternating) of that measurement.
    #[arg(long, default_value_t = 4)]
    pub(crate) ingest_rounds: i64,
    /// Measure the trigger's ingestion cost only, then stop (no seeding, no queries).
    #[arg(long)]
    pub(crate) ingest_only: bool,
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) postgres_host: String,
    #[arg(long, default_value_t = 5432)]
    pub(crate) postgres_port: u16,
    #[arg(long, default_value = "postgres")]
    pub(crate) postgres_user: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) redis_host: String,
    /// Keep the database afterwards (it is dropped by default).
    #[arg(long)]
    pub(crate) keep_database: bool,
    /// Reuse a database kept by an earlier `--keep-database` run: migrate it, skip the
    /// ingestion measurement and the seeding; "now" is its newest event.
    #[arg(long)]
    pub(crate) reuse_database: Option<String>,
    /// Also print each shape's cold calls in the order they ran, in ms (the first call of
    /// a shape finds the least in the server's memories).
    #[arg(long)]
    pub(crate) print_samples: bool,
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
        let ingestion =
            measure_ingestion_cost(&mut connection, arguments.ingest_events, arguments.ingest_rounds).await?;
        println!("{ingestion}");
        if arguments.ingest_only {
            return Ok(());
        }
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
    // The closed hours' user spans, which the service's fold task writes in the background
    // (an hour ten minutes after it ends): written before timing, as for the fold.
    let spanning_started = Instant::now();
    let spanned = hour_spans::build_all_hour_spans(&database, chrono::Utc::now().timestamp()).await?;
    println!(
        "wrote the user spans of {spanned} closed hours in {:.1} s\n",
        spanning_started.elapsed().as_secs_f64()
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
    let raw = database.pool();

    println!("| query | raw SQL p50 / p95 / p99 ms | service cold p50 / p95 / p99 ms | service warm p50 / p95 / p99 ms | p95 speed-up (raw / cold) | answers equal to raw SQL |");
    println!("|---|---|---|---|---|---|");
    let end = now.timestamp() - 600;
    let mut cold_calls = Vec::new();
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
            let answer = raw_answer(raw, &shape, *start, *finish).await?;
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
                    raw_answer(raw, &shape, *start, *finish).await?
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
        if arguments.print_samples {
            let calls: Vec<String> = cold.iter().map(|took| millis(*took)).collect();
            cold_calls.push(format!("{}: {}", shape.label(), calls.join(" ")));
        }
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

    if !cold_calls.is_empty() {
        println!("\ncold calls in order, ms:");
        cold_calls.iter().for_each(|line| println!("- {line}"));
    }
    println!();
    dashboard_mix(&client, raw, &database, arguments, end, admin_address).await?;
    stop.send(()).ok();
    server.await??;
    Ok(())
}
