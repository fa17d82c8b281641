//! `loadgen`: the ingestion benchmark (README "Benchmarks: ingestion"). It creates a
//! throwaway database, migrates it with the server binary's `migrate`, measures the raw
//! insert limit of that schema (UNNEST and COPY) and the durable floor of one event (a
//! single-row INSERT commit), starts the server binary as a child process with production
//! defaults (Redis on, default rate limits, its own Redis key prefix) and the bare tonic
//! no-op server as another, then measures: the no-op on both (saturation, and 64 in flight
//! on one connection), unary TrackEvent with 1 and 64 (one connection) in flight, at fixed
//! offered rates, at 10,000/s with at most 128 outstanding and at saturation, TrackEvents
//! batches of 100 and 1,000, and the unary and batch phases again with Redis off. Every
//! phase reports the server's CPU per event and peak RSS. It prints the result table and
//! the targets with pass/fail. Every loop is bounded in count and time; traffic goes to
//! 127.0.0.1 only; the database and the run's Redis keys are deleted afterwards.
//!
//! ```sh
//! cargo build --release --bins && target/release/loadgen
//! ```

mod phases;
mod probe;
mod raw;
mod report;
mod summary;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use analytics_bench::server::{
    connect, delete_redis_keys, load_average, sibling, spawn_bare, Backends, ServerProcess, ServiceLauncher,
};
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use anyhow::{bail, Context as _};
use clap::Parser;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use uuid::Uuid;

use crate::phases::{noop, Service};
use crate::raw::{insert_floor, raw_limit, truncate, RawMethod};
use crate::report::{print_table, Row};
use crate::summary::print_summary;
use crate::workload::{rate_limit_headroom, set_users};

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
    /// Distinct user ids the synthetic events go round-robin over; enough that the
    /// default per-user rate limit refuses none.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) users: u64,
    /// Calls in flight on one connection in the conn64 phase (bare no-op and TrackEvent).
    #[arg(long, default_value_t = 64)]
    pub(crate) one_connection_in_flight: usize,
    /// Offered rate of the capped phase, events per second.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) capped_rate: u64,
    /// Most calls outstanding in the capped phase.
    #[arg(long, default_value_t = 128)]
    pub(crate) capped_in_flight: usize,
    /// The server binary (default: analytics-service next to this one).
    #[arg(long)]
    pub(crate) server: Option<PathBuf>,
    /// The bare tonic no-op server (default: bare-noop-server next to this one).
    #[arg(long)]
    pub(crate) bare_server: Option<PathBuf>,
    /// Extra server environment, KEY=VALUE (repeatable), e.g. INGEST_LINGER_MS=0.
    #[arg(long = "server-env")]
    pub(crate) server_env: Vec<String>,
    /// Disable the rollup trigger on `events` (the "before rollups" side of the
    /// ingestion-cost comparison); the count rollups are then not maintained.
    #[arg(long)]
    pub(crate) without_rollups: bool,
    /// Phases to run (all by default): raw, noop (service and bare no-op), conn64, one
    /// (INSERT floor and one TrackEvent in flight), rate, capped, unary, batch, redis-off
    /// (unary and batch again with the service's Redis off).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "raw,noop,conn64,one,rate,capped,unary,batch,redis-off"
    )]
    pub(crate) phases: Vec<String>,
    #[command(flatten)]
    pub(crate) backends: Backends,
}

const PHASES: &[&str] = &["raw", "noop", "conn64", "one", "rate", "capped", "unary", "batch", "redis-off"];

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let phases: Vec<&str> = args.phases.iter().map(String::as_str).collect();
    if let Some(unknown) = phases.iter().find(|phase| !PHASES.contains(phase)) {
        bail!("unknown phase {unknown}; phases: {}", PHASES.join(","));
    }
    let server_binary = sibling(&args.server, "analytics-service")?;
    if !server_binary.exists() {
        bail!(
            "{} not found: build the server first (`cargo build --release --bins` at the workspace root)",
            server_binary.display()
        );
    }
    set_users(args.users);
    match rate_limit_headroom(&args.server_env) {
        Some(headroom) => eprintln!(
            "rate limit: the {} synthetic users can send {headroom:.0} events/s before one is refused",
            args.users
        ),
        None => eprintln!("rate limit: off, or not read from the environment"),
    }
    let run_id = Uuid::now_v7().simple().to_string();
    let redis_prefix = format!("loadgen-{run_id}");
    let backends = &args.backends;
    if backends.redis_on() {
        delete_redis_keys(backends, &redis_prefix).await.with_context(|| {
            format!("Redis at {}:{} (--redis-host '' runs without)", backends.redis_host, backends.redis_port)
        })?;
    }
    let database = format!("analytics_bench_{run_id}");
    let admin = backends.postgres("postgres");
    let mut admin_connection = admin.connect().await.context("connecting to postgres")?;
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&mut admin_connection).await?;
    eprintln!("database {database}; redis key prefix {redis_prefix}");

    let launcher = ServiceLauncher {
        backends,
        server_env: &args.server_env,
        binary: &server_binary,
        database: &database,
        redis_prefix: &redis_prefix,
    };
    let load_before = load_average();
    let outcome = run(&args, &phases, &launcher, &admin).await;
    let load_after = load_average();

    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&mut admin_connection)
        .await
        .ok();
    if backends.redis_on() {
        match delete_redis_keys(backends, &redis_prefix).await {
            Ok(deleted) => eprintln!("deleted {deleted} redis keys under {redis_prefix}"),
            Err(error) => eprintln!("could not delete the redis keys under {redis_prefix}: {error:#}"),
        }
    }
    let rows = outcome?;
    print_table(&args, &rows);
    println!("load average before: {load_before}; after: {load_after} (other processes share the cores)");
    println!();
    print_summary(&args, &rows);
    Ok(())
}

async fn run(
    args: &Args,
    phases: &[&str],
    launcher: &ServiceLauncher<'_>,
    admin: &PgConnectOptions,
) -> anyhow::Result<Vec<Row>> {
    let database_options = admin.clone().database(launcher.database);
    launcher.migrate()?;
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
    let duration = Duration::from_secs(args.seconds);
    let sequence = Arc::new(AtomicU64::new(0));
    let redis_on = args.backends.redis_on();

    let bare = if phases.contains(&"noop") || phases.contains(&"conn64") {
        let bare = spawn_bare(&sibling(&args.bare_server, "bare-noop-server")?)?;
        let channels = connect(&bare, args.connections).await?;
        Some((bare, channels))
    } else {
        None
    };
    let mut server = launcher.serve(redis_on)?;
    let service = service_under_test(args, &server, &sequence, "").await?;
    // The Redis-off server runs beside it from the start, so that the compared phases can
    // alternate between the two (see `alternated_phases`).
    let redis_off = if phases.contains(&"redis-off") && redis_on {
        let server = launcher.serve(false)?;
        let service = service_under_test(args, &server, &sequence, " (Redis off)").await?;
        Some((server, service))
    } else {
        None
    };
    let service_channels = connect(&server, args.connections).await?;

    if let Some((bare, bare_channels)) = &bare {
        if phases.contains(&"noop") {
            let name = "transport: no-op RPC (grpc.health.v1 Check), full service stack";
            rows.push(noop("noop", name, &service_channels, server.pid(), args.concurrency, duration).await);
            let name = "transport: no-op RPC, bare tonic server (no middleware)";
            rows.push(noop("bare", name, bare_channels, bare.pid(), args.concurrency, duration).await);
        }
        if phases.contains(&"conn64") {
            let in_flight = args.one_connection_in_flight;
            let name = "transport: no-op RPC, bare tonic server (no middleware)";
            rows.push(noop("conn64-bare", name, &bare_channels[..1], bare.pid(), in_flight, duration).await);
            rows.push(service.unary_closed("conn64-track", in_flight, 1).await);
        }
    }
    if phases.contains(&"one") {
        rows.push(insert_floor(args, &database_options).await?);
        rows.push(service.unary_closed("one", 1, 1).await);
    }
    if phases.contains(&"rate") {
        for &rate in &args.rates {
            rows.push(service.unary_rate(rate).await);
        }
    }
    if phases.contains(&"capped") {
        rows.push(service.unary_capped(args.capped_rate, args.capped_in_flight).await);
    }
    drop(bare);
    match &redis_off {
        Some((_, off)) => {
            alternated_phases(args, phases, [&service, off], &database_options, &mut rows).await?
        }
        None => {
            for phase in compared_phases(phases) {
                truncate(&database_options).await?;
                rows.push(phase.run(args, &service, false).await);
            }
        }
    }
    report_stored(&database_options).await?;
    server.terminate();
    drop(redis_off);
    Ok(rows)
}

/// A phase compared with Redis on and off.
#[derive(Clone, Copy)]
enum ComparedPhase {
    /// Unary TrackEvent at saturation.
    Unary,
    /// TrackEvents batches of this many events at saturation.
    Batch(u64),
}

impl ComparedPhase {
    /// One run of the phase against `service`, from whatever the tables hold.
    async fn run(self, args: &Args, service: &Service, redis_off: bool) -> Row {
        let key = match (self, redis_off) {
            (Self::Unary, false) => "unary",
            (Self::Unary, true) => "unary-redis-off",
            (Self::Batch(100), false) => "x100",
            (Self::Batch(100), true) => "x100-redis-off",
            (Self::Batch(_), false) => "x1000",
            (Self::Batch(_), true) => "x1000-redis-off",
        };
        match self {
            Self::Unary => service.unary_closed(key, args.concurrency, args.connections).await,
            Self::Batch(size) => service.batch(key, size, args.batch_concurrency).await,
        }
    }
}

/// The compared phases `phases` asks for: unary saturation, TrackEvents x100 and x1000.
fn compared_phases(phases: &[&str]) -> Vec<ComparedPhase> {
    let mut compared = Vec::new();
    if phases.contains(&"unary") {
        compared.push(ComparedPhase::Unary);
    }
    if phases.contains(&"batch") {
        compared.extend([ComparedPhase::Batch(100), ComparedPhase::Batch(1_000)]);
    }
    compared
}

/// Each compared phase four times, from empty tables each time, alternating the servers
/// Redis on, off, off, on; each server's row is the mean of its two runs. Measured one
/// after the other, the server measured first was slower by up to 20% whichever it was
/// (README, "Rate-limit leases"), so a ratio of on to off needs both orders.
async fn alternated_phases(
    args: &Args,
    phases: &[&str],
    [on, off]: [&Service; 2],
    database: &PgConnectOptions,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    for phase in compared_phases(phases) {
        let mut runs = Vec::with_capacity(4);
        for (service, redis_off) in [(on, false), (off, true), (off, true), (on, false)] {
            truncate(database).await?;
            runs.push(phase.run(args, service, redis_off).await);
        }
        let [on_first, off_first, off_second, on_second]: [Row; 4] =
            runs.try_into().unwrap_or_else(|_| unreachable!("four runs"));
        rows.push(on_first.mean_with(on_second));
        rows.push(off_first.mean_with(off_second));
    }
    Ok(())
}

async fn service_under_test(
    args: &Args,
    server: &ServerProcess,
    sequence: &Arc<AtomicU64>,
    label: &'static str,
) -> anyhow::Result<Service> {
    let channels = connect(server, args.connections).await?;
    Ok(Service {
        clients: channels.into_iter().map(AnalyticsServiceClient::new).collect(),
        admin: server.admin.context("the service has a metrics address")?,
        pid: server.pid(),
        sequence: sequence.clone(),
        duration: Duration::from_secs(args.seconds),
        label,
    })
}

async fn report_stored(database: &PgConnectOptions) -> anyhow::Result<()> {
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut database.connect().await?).await?;
    eprintln!("rows in events after the last Redis-on phase: {stored}");
    Ok(())
}
