//! `loadgen`: the ingestion benchmark (README "Benchmarks"). It creates a throwaway
//! database, measures the raw insert limit of that schema with two writers (UNNEST and
//! COPY), starts the release server binary as a child process against it, measures the
//! transport limit (grpc.health.v1 Check, a no-op on the same server and client), then
//! unary TrackEvent at fixed offered rates and at saturation, and TrackEvents batches of
//! 100 and 1,000 at saturation, and prints one markdown table. Every loop is bounded in
//! count and time; traffic goes to 127.0.0.1 only.
//!
//! ```sh
//! cargo build --release --bins && target/release/loadgen
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use anyhow::{bail, Context as _};
use chrono::Utc;
use clap::Parser;
use hdrhistogram::Histogram;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "Ingestion benchmark against a throwaway database (127.0.0.1 only)")]
struct Args {
    /// Seconds each measured phase runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Offered rates of the fixed-rate unary phases, events per second.
    #[arg(long, value_delimiter = ',', default_value = "5000,10000,20000")]
    rates: Vec<u64>,
    /// Calls in flight in the saturation phases of unary TrackEvent and the no-op.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Calls in flight in the TrackEvents saturation phases.
    #[arg(long, default_value_t = 4)]
    batch_concurrency: usize,
    /// HTTP/2 connections the client spreads its calls over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Writers of the raw insert limit.
    #[arg(long, default_value_t = 2)]
    raw_writers: usize,
    /// Rows per statement of the raw insert limit.
    #[arg(long, default_value_t = 1000)]
    raw_batch: usize,
    /// The server binary (default: analytics-service next to this one).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Extra server environment, KEY=VALUE (repeatable), e.g. INGEST_LINGER_MS=0.
    #[arg(long = "server-env")]
    server_env: Vec<String>,
    /// Disable the rollup trigger on `events` (the "before rollups" side of the issue-4
    /// ingestion-cost comparison); the count rollups are then not maintained.
    #[arg(long)]
    without_rollups: bool,
    /// Phases to run: raw, noop, rate, unary, batch (all by default).
    #[arg(long, value_delimiter = ',', default_value = "raw,noop,rate,unary,batch")]
    phases: Vec<String>,
    #[arg(long, env = "TEST_POSTGRES_HOST", default_value = "127.0.0.1")]
    postgres_host: String,
    #[arg(long, env = "TEST_POSTGRES_PORT", default_value_t = 5432)]
    postgres_port: u16,
    #[arg(long, env = "TEST_POSTGRES_USER", default_value = "postgres")]
    postgres_user: String,
    #[arg(long, env = "TEST_POSTGRES_PASSWORD", default_value = "")]
    postgres_password: String,
}

/// One row of the result table.
struct Row {
    name: String,
    offered: String,
    achieved: f64,
    unit: &'static str,
    latency: Option<Histogram<u64>>,
    errors: u64,
    note: String,
}

const EVENT_NAMES: &[&str] = &[
    "page_view",
    "click",
    "signup",
    "purchase",
    "search",
    "scroll",
    "share",
    "logout",
    "login",
    "add_to_cart",
];

/// The synthetic event number `n`: the same shape for the raw and the service phases.
fn synthetic(n: u64) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: EVENT_NAMES[(n % EVENT_NAMES.len() as u64) as usize].to_string(),
        user_id: format!("user-{}", n % 10_000),
        properties: HashMap::from([
            ("page".to_string(), string_value(&format!("/page/{}", n % 100))),
            ("load_ms".to_string(), number_value((n % 997) as f64)),
            ("logged_in".to_string(), bool_value(n % 2 == 0)),
        ]),
        timestamp: 0,
        insert_id: String::new(),
    }
}

fn synthetic_json(n: u64) -> serde_json::Value {
    serde_json::json!({"page": format!("/page/{}", n % 100), "load_ms": (n % 997) as f64, "logged_in": n % 2 == 0})
}

fn string_value(text: &str) -> pb::PropertyValue {
    pb::PropertyValue { value: Some(pb::property_value::Value::StringValue(text.to_string())) }
}
fn number_value(number: f64) -> pb::PropertyValue {
    pb::PropertyValue { value: Some(pb::property_value::Value::NumberValue(number)) }
}
fn bool_value(flag: bool) -> pb::PropertyValue {
    pb::PropertyValue { value: Some(pb::property_value::Value::BoolValue(flag)) }
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 us to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let phases: Vec<&str> = args.phases.iter().map(String::as_str).collect();
    let server_binary = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("analytics-service"),
    };
    if !server_binary.exists() {
        bail!("{} not found: run `cargo build --release --bins` first", server_binary.display());
    }
    let database = format!("analytics_bench_{}", Uuid::now_v7().simple());
    let admin = PgConnectOptions::new()
        .host(&args.postgres_host)
        .port(args.postgres_port)
        .username(&args.postgres_user)
        .password(&args.postgres_password)
        .database("postgres")
        .disable_statement_logging();
    let mut admin_connection = admin.connect().await.context("connecting to postgres")?;
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&mut admin_connection).await?;
    eprintln!("database {database}");

    let load_before = load_average();
    let outcome = run(&args, &phases, &server_binary, &database, &admin).await;
    let load_after = load_average();

    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&mut admin_connection)
        .await
        .ok();
    let (rows, peak_rss_kib) = outcome?;
    print_table(&args, &rows, peak_rss_kib);
    println!("load average before: {load_before}; after: {load_after} (other processes share the 2 cores)");
    Ok(())
}

async fn run(
    args: &Args,
    phases: &[&str],
    server_binary: &PathBuf,
    database: &str,
    admin: &PgConnectOptions,
) -> anyhow::Result<(Vec<Row>, u64)> {
    let database_options = admin.clone().database(database);
    let server_env = |command: &mut Command| {
        command
            .env("POSTGRES_HOST", &args.postgres_host)
            .env("POSTGRES_PORT", args.postgres_port.to_string())
            .env("POSTGRES_USER", &args.postgres_user)
            .env("POSTGRES_PASSWORD", &args.postgres_password)
            .env("POSTGRES_DB", database)
            .env("POSTGRES_SSLMODE", "disable")
            .env("REDIS_HOST", "")
            .env("LOG_LEVEL", "warn")
            .env("LOG_FORMAT", "text")
            .stdin(Stdio::null());
    };
    let mut migrate = Command::new(server_binary);
    server_env(&mut migrate);
    let status = migrate.arg("migrate").stdout(Stdio::null()).status()?;
    if !status.success() {
        bail!("migrate failed: {status}");
    }
    if args.without_rollups {
        let mut connection = database_options.connect().await?;
        sqlx::query("ALTER TABLE events DISABLE TRIGGER events_rollup_after_insert")
            .execute(&mut connection)
            .await?;
        connection.close().await.ok();
    }

    let mut rows = Vec::new();
    if phases.contains(&"raw") {
        for method in [RawMethod::Unnest, RawMethod::Copy, RawMethod::UnnestOnConflict] {
            truncate(&database_options).await?;
            rows.push(raw_limit(args, &database_options, method).await?);
        }
        truncate(&database_options).await?;
    }

    let grpc_port = free_port()?;
    let admin_port = free_port()?;
    let mut serve = Command::new(server_binary);
    server_env(&mut serve);
    serve
        .env("SERVICE_BIND_ADDRESS", "127.0.0.1")
        .env("SERVICE_PORT", grpc_port.to_string())
        .env("PROMETHEUS_PORT", admin_port.to_string())
        .stdout(Stdio::null());
    for pair in &args.server_env {
        let (key, value) = pair.split_once('=').context("--server-env wants KEY=VALUE")?;
        serve.env(key, value);
    }
    let mut server = ServerProcess(serve.arg("serve").spawn()?);
    let address: SocketAddr = format!("127.0.0.1:{grpc_port}").parse()?;
    let admin_address: SocketAddr = format!("127.0.0.1:{admin_port}").parse()?;
    let channels = connect(address, args.connections).await?;

    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn(sample_rss(server.0.id(), peak_rss.clone(), sampling.clone()));
    let duration = Duration::from_secs(args.seconds);

    if phases.contains(&"noop") {
        let health: Vec<_> = channels.iter().cloned().map(HealthClient::new).collect();
        let (count, latency, errors) = closed_loop(args.concurrency, duration, move |worker, _| {
            let mut client = health[worker % health.len()].clone();
            async move {
                client.check(HealthCheckRequest { service: String::new() }).await.map(|_| 1).map_err(|_| ())
            }
        })
        .await;
        rows.push(Row {
            name: "transport limit: no-op RPC (grpc.health.v1 Check)".into(),
            offered: format!("saturation, {} in flight", args.concurrency),
            achieved: count as f64 / duration.as_secs_f64(),
            unit: "calls/s",
            latency: Some(latency),
            errors,
            note: String::new(),
        });
    }

    let clients: Vec<_> = channels.iter().cloned().map(AnalyticsServiceClient::new).collect();
    let sequence = Arc::new(AtomicU64::new(0));
    if phases.contains(&"rate") {
        for &rate in &args.rates {
            let before = commit_stats(admin_address).await;
            let clients = clients.clone();
            let sequence = sequence.clone();
            let (count, latency, errors) = open_loop(rate, duration, move |worker| {
                let mut client = clients[worker % clients.len()].clone();
                let n = sequence.fetch_add(1, Ordering::Relaxed);
                async move { client.track_event(synthetic(n)).await.map(|_| 1).map_err(|_| ()) }
            })
            .await;
            let after = commit_stats(admin_address).await;
            rows.push(service_row(
                "service: unary TrackEvent",
                format!("{rate}/s"),
                count,
                duration,
                latency,
                errors,
                before,
                after,
            ));
        }
    }
    if phases.contains(&"unary") {
        let before = commit_stats(admin_address).await;
        let clients = clients.clone();
        let sequence = sequence.clone();
        let (count, latency, errors) = closed_loop(args.concurrency, duration, move |worker, _| {
            let mut client = clients[worker % clients.len()].clone();
            let n = sequence.fetch_add(1, Ordering::Relaxed);
            async move { client.track_event(synthetic(n)).await.map(|_| 1).map_err(|_| ()) }
        })
        .await;
        let after = commit_stats(admin_address).await;
        rows.push(service_row(
            "service: unary TrackEvent",
            format!("saturation, {} in flight", args.concurrency),
            count,
            duration,
            latency,
            errors,
            before,
            after,
        ));
    }
    if phases.contains(&"batch") {
        for size in [100_u64, 1_000] {
            let before = commit_stats(admin_address).await;
            let clients = clients.clone();
            let sequence = sequence.clone();
            let (count, latency, errors) = closed_loop(args.batch_concurrency, duration, move |worker, _| {
                let mut client = clients[worker % clients.len()].clone();
                let first = sequence.fetch_add(size, Ordering::Relaxed);
                let events = (first..first + size).map(synthetic).collect();
                async move {
                    let response =
                        client.track_events(pb::TrackEventsRequest { events }).await.map_err(|_| ())?;
                    let accepted = response
                        .into_inner()
                        .results
                        .iter()
                        .filter(|result| result.status == pb::TrackEventStatus::Accepted as i32)
                        .count();
                    if accepted as u64 == size {
                        Ok(size)
                    } else {
                        Err(())
                    }
                }
            })
            .await;
            let after = commit_stats(admin_address).await;
            rows.push(service_row(
                format!("service: TrackEvents x{size}"),
                format!("saturation, {} in flight", args.batch_concurrency),
                count,
                duration,
                latency,
                errors,
                before,
                after,
            ));
        }
    }

    sampling.store(false, Ordering::Relaxed);
    sampler.await.ok();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut database_options.connect().await?)
        .await?;
    eprintln!("rows stored by the service: {stored}");
    server.terminate();
    Ok((rows, peak_rss.load(Ordering::Relaxed)))
}

/// The server child; terminated with SIGTERM (then killed) when dropped.
struct ServerProcess(Child);

impl ServerProcess {
    fn terminate(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().ok();
        for _ in 0..300 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

async fn connect(address: SocketAddr, connections: usize) -> anyhow::Result<Vec<Channel>> {
    for _ in 0..200 {
        let Ok(channel) = Channel::from_shared(format!("http://{address}"))?.connect().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let health = AnalyticsServiceClient::new(channel).health_check(pb::HealthCheckRequest {}).await;
        if health.is_ok_and(|health| health.into_inner().status == "SERVING") {
            let mut channels = Vec::new();
            for _ in 0..connections.max(1) {
                channels.push(Channel::from_shared(format!("http://{address}"))?.connect().await?);
            }
            return Ok(channels);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the server did not become SERVING")
}

async fn sample_rss(pid: u32, peak: Arc<AtomicU64>, running: Arc<AtomicBool>) {
    let path = format!("/proc/{pid}/status");
    while running.load(Ordering::Relaxed) {
        if let Ok(status) = tokio::fs::read_to_string(&path).await {
            for line in status.lines() {
                let value = line
                    .strip_prefix("VmHWM:")
                    .or_else(|| line.strip_prefix("VmRSS:"))
                    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
                if let Some(kib) = value {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `workers` tasks call back to back for `duration`. Each call returns the events it
/// stored. Returns (events, latency histogram in us, failed calls).
async fn closed_loop<F, Fut>(workers: usize, duration: Duration, call: F) -> (u64, Histogram<u64>, u64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, ()>> + Send,
{
    let call = Arc::new(call);
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut histogram = new_histogram();
                let (mut events, mut errors) = (0u64, 0u64);
                let mut iteration = 0u64;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    match call(worker, iteration).await {
                        Ok(stored) => {
                            events += stored;
                            histogram.saturating_record(started.elapsed().as_micros() as u64);
                        }
                        Err(()) => errors += 1,
                    }
                    iteration += 1;
                }
                (events, histogram, errors)
            })
        })
        .collect();
    merge(tasks).await
}

/// Offers `rate` calls per second for `duration`, each scheduled at a fixed instant;
/// latency counts from the scheduled instant (no coordinated omission). Calls that a
/// worker could not start within one second of schedule are not sent and counted as
/// errors (the offered rate was not sustained).
async fn open_loop<F, Fut>(rate: u64, duration: Duration, call: F) -> (u64, Histogram<u64>, u64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, ()>> + Send,
{
    const WORKERS: u64 = 512;
    let call = Arc::new(call);
    let total = rate * duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let tasks: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut histogram = new_histogram();
                let (mut events, mut errors) = (0u64, 0u64);
                let mut index = worker;
                while index < total {
                    let scheduled = start + interval.mul_f64(index as f64);
                    tokio::time::sleep_until(scheduled).await;
                    if scheduled.elapsed() > Duration::from_secs(1) {
                        errors += 1;
                    } else {
                        match call(worker as usize).await {
                            Ok(stored) => {
                                events += stored;
                                histogram.saturating_record(scheduled.elapsed().as_micros() as u64);
                            }
                            Err(()) => errors += 1,
                        }
                    }
                    index += WORKERS;
                }
                (events, histogram, errors)
            })
        })
        .collect();
    merge(tasks).await
}

async fn merge(
    tasks: Vec<tokio::task::JoinHandle<(u64, Histogram<u64>, u64)>>,
) -> (u64, Histogram<u64>, u64) {
    let mut histogram = new_histogram();
    let (mut events, mut errors) = (0, 0);
    for task in tasks {
        if let Ok((task_events, task_histogram, task_errors)) = task.await {
            events += task_events;
            errors += task_errors;
            histogram.add(&task_histogram).ok();
        }
    }
    (events, histogram, errors)
}

#[derive(Clone, Copy)]
enum RawMethod {
    Unnest,
    /// The statement the service runs for events without an insert_id.
    UnnestOnConflict,
    Copy,
}

async fn truncate(options: &PgConnectOptions) -> anyhow::Result<()> {
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
async fn raw_limit(args: &Args, options: &PgConnectOptions, method: RawMethod) -> anyhow::Result<Row> {
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
    let name = match method {
        RawMethod::Unnest => "limit: raw INSERT ... UNNEST",
        RawMethod::UnnestOnConflict => {
            "raw INSERT ... UNNEST ON CONFLICT DO NOTHING (the service's statement)"
        }
        RawMethod::Copy => "limit: raw COPY",
    };
    Ok(Row {
        name: name.into(),
        offered: format!("{} writers x {} rows", args.raw_writers, args.raw_batch),
        achieved: rows as f64 / duration.as_secs_f64(),
        unit: "rows/s",
        latency: Some(histogram),
        errors: 0,
        note: "latency per statement".into(),
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

/// (events, commits, commit seconds, TrackEvent(s) calls, their handling seconds) so
/// far, from the server's /metrics.
type CommitStats = (f64, f64, f64, f64, f64);

async fn commit_stats(admin: SocketAddr) -> CommitStats {
    let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else { return Default::default() };
    if stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.is_err() {
        return Default::default();
    }
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok();
    let value = |series: &str| {
        body.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let handling = |suffix: &str| {
        ["TrackEvent", "TrackEvents"]
            .iter()
            .map(|method| {
                value(&format!(
                    "grpc_server_handling_seconds{suffix}{{grpc_service=\"analytics.v1.AnalyticsService\",grpc_method=\"{method}\",grpc_type=\"unary\"}} "
                ))
            })
            .sum::<f64>()
    };
    (
        value("analytics_ingest_batch_size_sum "),
        value("analytics_ingest_batch_size_count "),
        value("analytics_ingest_commit_seconds_sum "),
        handling("_count"),
        handling("_sum"),
    )
}

/// The row of a service phase: events/s over `duration`, the group-commit note from the
/// server's stats before and after.
#[allow(clippy::too_many_arguments)]
fn service_row(
    name: impl Into<String>,
    offered: String,
    count: u64,
    duration: Duration,
    latency: Histogram<u64>,
    errors: u64,
    before: CommitStats,
    after: CommitStats,
) -> Row {
    Row {
        name: name.into(),
        offered,
        achieved: count as f64 / duration.as_secs_f64(),
        unit: "events/s",
        latency: Some(latency),
        errors,
        note: mean_batch(before, after),
    }
}

fn mean_batch(before: CommitStats, after: CommitStats) -> String {
    let commits = after.1 - before.1;
    if commits <= 0.0 {
        return String::new();
    }
    let calls = after.3 - before.3;
    let server_mean = if calls > 0.0 { 1000.0 * (after.4 - before.4) / calls } else { 0.0 };
    format!(
        "{:.0} events/commit, {:.1} ms/commit, server-side mean {server_mean:.1} ms/call",
        (after.0 - before.0) / commits,
        1000.0 * (after.2 - before.2) / commits
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn millis(histogram: &Histogram<u64>, quantile: f64) -> String {
    if histogram.is_empty() {
        return "-".into();
    }
    format!("{:.2}", histogram.value_at_quantile(quantile) as f64 / 1000.0)
}

fn print_table(args: &Args, rows: &[Row], peak_rss_kib: u64) {
    println!(
        "| phase | offered | achieved | p50 ms | p95 ms | p99 ms | max ms | errors | note |\n|---|---|---|---|---|---|---|---|---|"
    );
    for row in rows {
        let (p50, p95, p99, max) = match &row.latency {
            Some(histogram) => (
                millis(histogram, 0.50),
                millis(histogram, 0.95),
                millis(histogram, 0.99),
                if histogram.is_empty() {
                    "-".into()
                } else {
                    format!("{:.2}", histogram.max() as f64 / 1000.0)
                },
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {:.0} {} | {p50} | {p95} | {p99} | {max} | {} | {} |",
            row.name, row.offered, row.achieved, row.unit, row.errors, row.note
        );
    }
    let find = |prefix: &str, offered_prefix: &str| {
        rows.iter()
            .filter(|row| row.name.starts_with(prefix) && row.offered.starts_with(offered_prefix))
            .map(|row| row.achieved)
            .fold(None, |best: Option<f64>, value| Some(best.map_or(value, |best| best.max(value))))
    };
    let raw = find("limit: raw", "");
    let transport = find("transport limit", "");
    let unary = find("service: unary", "saturation");
    let batch = find("service: TrackEvents x1000", "");
    println!();
    println!("| ratio | value |\n|---|---|");
    if let (Some(unary), Some(transport)) = (unary, transport) {
        println!("| service unary (saturation) / transport limit | {:.0}% |", 100.0 * unary / transport);
    }
    if let (Some(batch), Some(raw)) = (batch, raw) {
        println!(
            "| service TrackEvents x1000 / raw insert limit (best of UNNEST, COPY) | {:.0}% |",
            100.0 * batch / raw
        );
    }
    println!("| server peak RSS (VmHWM) | {:.1} MiB |", peak_rss_kib as f64 / 1024.0);
    println!();
    println!(
        "{} s per phase; {} connections; server env: {}",
        args.seconds,
        args.connections,
        if args.server_env.is_empty() { "defaults".to_string() } else { args.server_env.join(" ") }
    );
}
