//! `loadgen`: the ingestion benchmark (README "Benchmarks"). It creates a throwaway
//! database, migrates it with the server binary's `migrate`, measures the raw insert
//! limit of that schema with two writers (UNNEST and COPY), starts the server binary as
//! a child process against it, measures the transport limit (grpc.health.v1 Check, a
//! no-op on the same server and client), then unary TrackEvent at fixed offered rates and
//! at saturation, and TrackEvents batches of 100 and 1,000 at saturation, and prints one
//! markdown table. Every loop is bounded in count and time; traffic goes to 127.0.0.1 only.
//!
//! ```sh
//! cargo build --release --bins && target/release/loadgen
//! ```

mod loops;
mod raw;
mod report;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use anyhow::{bail, Context as _};
use clap::Parser;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use uuid::Uuid;

use crate::loops::{closed_loop, open_loop};
use crate::raw::{raw_limit, truncate, RawMethod};
use crate::report::{commit_stats, print_table, service_row, Row};
use crate::workload::synthetic;

#[derive(Parser, Debug)]
#[command(about = "Ingestion benchmark against a throwaway database (127.0.0.1 only)")]
pub(crate) struct Args {
    /// Seconds each measured phase runs.
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Offered rates of the fixed-rate unary phases, events per second.
    #[arg(long, value_delimiter = ',', default_value = "5000,10000,20000")]
    pub(crate) rates: Vec<u64>,
    /// Calls in flight in the saturation phases of unary TrackEvent and the no-op.
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// Calls in flight in the TrackEvents saturation phases.
    #[arg(long, default_value_t = 4)]
    pub(crate) batch_concurrency: usize,
    /// HTTP/2 connections the client spreads its calls over.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// Writers of the raw insert limit.
    #[arg(long, default_value_t = 2)]
    pub(crate) raw_writers: usize,
    /// Rows per statement of the raw insert limit.
    #[arg(long, default_value_t = 1000)]
    pub(crate) raw_batch: usize,
    /// The server binary (default: analytics-service next to this one).
    #[arg(long)]
    pub(crate) server: Option<PathBuf>,
    /// Extra server environment, KEY=VALUE (repeatable), e.g. INGEST_LINGER_MS=0.
    #[arg(long = "server-env")]
    pub(crate) server_env: Vec<String>,
    /// Disable the rollup trigger on `events` (the "before rollups" side of the
    /// ingestion-cost comparison); the count rollups are then not maintained.
    #[arg(long)]
    pub(crate) without_rollups: bool,
    /// Phases to run: raw, noop, rate, unary, batch (all by default).
    #[arg(long, value_delimiter = ',', default_value = "raw,noop,rate,unary,batch")]
    pub(crate) phases: Vec<String>,
    #[arg(long, env = "TEST_POSTGRES_HOST", default_value = "127.0.0.1")]
    pub(crate) postgres_host: String,
    #[arg(long, env = "TEST_POSTGRES_PORT", default_value_t = 5432)]
    pub(crate) postgres_port: u16,
    #[arg(long, env = "TEST_POSTGRES_USER", default_value = "postgres")]
    pub(crate) postgres_user: String,
    #[arg(long, env = "TEST_POSTGRES_PASSWORD", default_value = "")]
    pub(crate) postgres_password: String,
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
        bail!(
            "{} not found: build the server first (`cargo build --release --bins` at the workspace root)",
            server_binary.display()
        );
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

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
