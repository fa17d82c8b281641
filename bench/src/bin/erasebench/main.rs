//! `erasebench`: the erasure benchmark (README "Benchmarks: erasure"). It creates a
//! throwaway database, migrates it with the server binary's `migrate`, seeds one heavy
//! user's events (1,000,000 by default) over the last 30 days among other users' events,
//! starts the server binary with production defaults (Redis on, default limits) plus the
//! admin RPCs, and offers unary TrackEvent calls of other users at a fixed rate with a cap
//! on calls outstanding: for a window before DeleteUser of the heavy user, during the
//! erasure (until GetUserDeletion answers COMPLETED) and for a window after. It prints
//! ingestion throughput and latency per window, the erasure's duration and rate, the
//! sessions PostgreSQL showed active by wait event, and two checks: none of the user's
//! rows is left, and GetEventCount over the whole history equals raw SQL. Traffic goes to
//! 127.0.0.1 only; the database, the run's Redis keys and its key file are deleted
//! afterwards.
//!
//! ```sh
//! cargo build --release -p analytics-bench --bins && cargo build --release --bin analytics-service
//! target/release/erasebench --events 1000000
//! ```

mod seed;
mod timeline;

use std::collections::HashMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use analytics_bench::loops::paced_loop;
use analytics_bench::server::{connect, delete_redis_keys, load_average, sibling, Backends, ServiceLauncher};
use analytics_service::config::Config;
use analytics_service::pb;
use analytics_service::pb::analytics_admin_service_client::AnalyticsAdminServiceClient;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use anyhow::{bail, Context as _};
use base64::Engine as _;
use clap::Parser;
use sqlx::{ConnectOptions, Connection};
use tokio::time::Instant;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::seed::{raw_counts, rows_of, seed, EVENT_NAMES};
use crate::timeline::{Timeline, Window, WINDOWS};

#[derive(Parser, Debug)]
#[command(
    about = "Erasure benchmark: ingestion latency while DeleteUser erases a heavy user (127.0.0.1 only)"
)]
pub(crate) struct Arguments {
    /// Events of the user the run erases.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) events: i64,
    /// Events of other users seeded around them.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) background_events: i64,
    /// Distinct other users of the seeded events.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) background_users: i64,
    /// Days of history, ending now.
    #[arg(long, default_value_t = 30)]
    pub(crate) days: i64,
    /// Offered unary TrackEvent calls per second (other users), in every window.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) rate: u64,
    /// Most TrackEvent calls outstanding.
    #[arg(long, default_value_t = 64)]
    pub(crate) in_flight: usize,
    /// HTTP/2 connections the load spreads its calls over.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// Seconds of load before DeleteUser.
    #[arg(long, default_value_t = 10)]
    pub(crate) before_seconds: u64,
    /// Seconds of load after the erasure completed.
    #[arg(long, default_value_t = 10)]
    pub(crate) after_seconds: u64,
    /// The longest the run waits for the erasure to complete.
    #[arg(long, default_value_t = 1_800)]
    pub(crate) erasure_timeout_seconds: u64,
    /// DeleteUser with suppress (the final pass then also waits for older snapshots).
    #[arg(long)]
    pub(crate) suppress: bool,
    /// The server binary (default: analytics-service next to this one).
    #[arg(long)]
    pub(crate) server: Option<PathBuf>,
    /// Extra server environment, KEY=VALUE (repeatable).
    #[arg(long = "server-env")]
    pub(crate) server_env: Vec<String>,
    #[command(flatten)]
    pub(crate) backends: Backends,
}

/// The user the run erases.
const HEAVY_USER: &str = "erasebench-heavy-user";

/// Distinct user ids of the live load (none of them the heavy user); enough that the
/// default per-user rate limit refuses none at the default rate.
const LOAD_USERS: u64 = 100_000;

/// How often the run asks GetUserDeletion, and samples pg_stat_activity.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    let server_binary = sibling(&arguments.server, "analytics-service")?;
    if !server_binary.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release --bin analytics-service`)",
            server_binary.display()
        );
    }
    let backends = &arguments.backends;
    let run_id = Uuid::now_v7().simple().to_string();
    let redis_prefix = format!("erasebench-{run_id}");
    if backends.redis_on() {
        delete_redis_keys(backends, &redis_prefix).await.with_context(|| {
            format!("Redis at {}:{} (--redis-host '' runs without)", backends.redis_host, backends.redis_port)
        })?;
    }
    let key_file = std::env::temp_dir().join(format!("erasebench-{run_id}.key"));
    write_suppression_key(&key_file)?;
    let database = format!("analytics_erasebench_{run_id}");
    let mut admin = backends.postgres("postgres").connect().await.context("connecting to postgres")?;
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&mut admin).await?;
    eprintln!("database {database}; redis key prefix {redis_prefix}");

    let mut server_env =
        vec!["ADMIN_RPCS_ENABLED=true".to_string(), format!("SUPPRESSION_KEY_FILE={}", key_file.display())];
    server_env.extend(arguments.server_env.iter().cloned());
    let launcher = ServiceLauncher {
        backends,
        server_env: &server_env,
        binary: &server_binary,
        database: &database,
        redis_prefix: &redis_prefix,
    };
    let load_before = load_average();
    let outcome = run(&arguments, &launcher).await;
    let load_after = load_average();

    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&mut admin).await.ok();
    if backends.redis_on() {
        if let Err(error) = delete_redis_keys(backends, &redis_prefix).await {
            eprintln!("could not delete the redis keys under {redis_prefix}: {error:#}");
        }
    }
    std::fs::remove_file(&key_file).ok();
    let report = outcome?;
    print_report(&arguments, &report, &load_before, &load_after);
    if report.rows_left != 0 || !report.counts_equal {
        bail!("a check failed (see the table)");
    }
    Ok(())
}

/// SUPPRESSION_KEY_FILE of the run: the base64 of 32 bytes of /dev/urandom.
fn write_suppression_key(path: &std::path::Path) -> anyhow::Result<()> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    std::fs::write(path, base64::engine::general_purpose::STANDARD.encode(key))?;
    Ok(())
}

/// What a run measured.
struct Report {
    seeded_heavy: i64,
    seeded_total: i64,
    seeding_seconds: f64,
    folding_seconds: f64,
    windows: Vec<(f64, Window)>,
    erasure_seconds: f64,
    deletion: pb::UserDeletion,
    rows_left: i64,
    counted_events: i64,
    counted_names: usize,
    counts_equal: bool,
}

async fn run(arguments: &Arguments, launcher: &ServiceLauncher<'_>) -> anyhow::Result<Report> {
    launcher.migrate()?;
    let options = arguments.backends.postgres(launcher.database);
    let mut connection = options.connect().await?;
    let now = chrono::Utc::now().timestamp();
    eprintln!(
        "seeding {} events of {HEAVY_USER} and {} of {} other users over {} days",
        arguments.events, arguments.background_events, arguments.background_users, arguments.days
    );
    let (seeding_seconds, folding_seconds) =
        seed(&mut connection, &fold_config(arguments, launcher.database)?, arguments, HEAVY_USER, now)
            .await?;
    let seeded_heavy = rows_of(&mut connection, HEAVY_USER).await?;
    let seeded_total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut connection).await?;
    eprintln!("seeded {seeded_total} events in {seeding_seconds:.0} s, folded in {folding_seconds:.0} s");

    let server = launcher.serve(arguments.backends.redis_on())?;
    let channels = connect(&server, arguments.connections).await?;
    let clients: Vec<_> = channels.iter().cloned().map(AnalyticsServiceClient::new).collect();
    let admin_client = AnalyticsAdminServiceClient::new(channels[0].clone());
    let history_start = now - (arguments.days + 1) * 86_400;
    // A dashboard's count over the whole history, cached before the erasure.
    event_counts(&clients[0], history_start, now + 1).await?;

    let (timeline, erasure_seconds, deletion) =
        measure(arguments, launcher.database, clients.clone(), admin_client).await?;
    let windows = timeline.finish();

    let rows_left = rows_of(&mut connection, HEAVY_USER).await?;
    let end = chrono::Utc::now().timestamp() + 1;
    let mut service = event_counts(&clients[0], history_start, end).await?;
    service.sort();
    let raw = raw_counts(&mut connection, history_start, end).await?;
    connection.close().await.ok();
    drop(server);
    Ok(Report {
        seeded_heavy,
        seeded_total,
        seeding_seconds,
        folding_seconds,
        windows,
        erasure_seconds,
        deletion,
        rows_left,
        counted_events: raw.iter().map(|(_, count)| count).sum(),
        counted_names: raw.len(),
        counts_equal: service == raw,
    })
}

/// The configuration the library's fold runs with before the server starts.
fn fold_config(arguments: &Arguments, database: &str) -> anyhow::Result<Config> {
    let backends = &arguments.backends;
    let variables = [
        ("POSTGRES_HOST", backends.postgres_host.clone()),
        ("POSTGRES_PORT", backends.postgres_port.to_string()),
        ("POSTGRES_USER", backends.postgres_user.clone()),
        ("POSTGRES_PASSWORD", backends.postgres_password.clone()),
        ("POSTGRES_DB", database.to_string()),
        ("POSTGRES_SSLMODE", "disable".to_string()),
        ("REDIS_HOST", String::new()),
    ];
    Config::from_vars(variables.into_iter().map(|(key, value)| (key.to_string(), value)))
        .context("fold configuration")
}

/// (event name, count) of GetEventCount over [start, end), one count per name.
async fn event_counts(
    client: &AnalyticsServiceClient<Channel>,
    start: i64,
    end: i64,
) -> anyhow::Result<Vec<(String, i64)>> {
    let request = pb::GetEventCountRequest { start_time: start, end_time: end, ..Default::default() };
    let response = client.clone().get_event_count(request).await.context("GetEventCount")?;
    Ok(response.into_inner().counts.into_iter().map(|count| (count.event_name, count.count)).collect())
}

/// Runs the load through the three windows, DeleteUser at the end of the first; returns
/// the timeline, the erasure's seconds (DeleteUser sent until GetUserDeletion answered
/// COMPLETED) and the completed request.
async fn measure(
    arguments: &Arguments,
    database: &str,
    clients: Vec<AnalyticsServiceClient<Channel>>,
    mut admin: AnalyticsAdminServiceClient<Channel>,
) -> anyhow::Result<(Timeline, f64, pb::UserDeletion)> {
    let load_started = Instant::now() + Duration::from_millis(50);
    let timeline = Timeline::new(load_started);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (timeline, stop) = (timeline.clone(), stop.clone());
        let hard_stop = load_started
            + Duration::from_secs(
                arguments.before_seconds + arguments.erasure_timeout_seconds + arguments.after_seconds + 60,
            );
        let more = move |_: u64| !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop;
        let call = move |index: u64| track(clients[index as usize % clients.len()].clone(), index);
        paced_loop(
            arguments.rate,
            arguments.in_flight,
            load_started,
            more,
            call,
            move |scheduled, outcome| timeline.record(scheduled, outcome),
        )
    });
    let sampler = tokio::spawn(sample_sessions(
        arguments.backends.postgres(database),
        database.to_string(),
        timeline.clone(),
        stop.clone(),
    ));

    tokio::time::sleep_until(load_started + Duration::from_secs(arguments.before_seconds)).await;
    let erasure_started = Instant::now();
    timeline.erasure_started(erasure_started);
    eprintln!("DeleteUser {HEAVY_USER}");
    let mut request = tonic::Request::new(pb::DeleteUserRequest {
        user_id: HEAVY_USER.into(),
        suppress: arguments.suppress,
    });
    request.set_timeout(Duration::from_secs(1));
    let mut deletion = admin
        .delete_user(request)
        .await
        .context("DeleteUser")?
        .into_inner()
        .deletion
        .context("no deletion")?;
    let deadline = erasure_started + Duration::from_secs(arguments.erasure_timeout_seconds);
    let mut reported = erasure_started;
    while deletion.state != pb::UserDeletionState::Completed as i32 {
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!("the erasure did not complete in {} s", arguments.erasure_timeout_seconds);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
        let request = pb::GetUserDeletionRequest { request_id: deletion.request_id.clone() };
        deletion = admin
            .get_user_deletion(request)
            .await
            .context("GetUserDeletion")?
            .into_inner()
            .deletion
            .context("no deletion")?;
        if reported.elapsed() >= Duration::from_secs(5) {
            reported = Instant::now();
            eprintln!("erasure: {} events deleted", deletion.events_deleted);
        }
    }
    let erasure_completed = Instant::now();
    timeline.erasure_completed(erasure_completed);
    eprintln!("erasure completed: {} events deleted", deletion.events_deleted);
    tokio::time::sleep(Duration::from_secs(arguments.after_seconds)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.context("the load loop")?;
    timeline.load_ended(Instant::now());
    sampler.await.context("the session sampler")??;
    Ok((timeline, (erasure_completed - erasure_started).as_secs_f64(), deletion))
}

/// One unary TrackEvent of a load user (never the heavy user).
async fn track(mut client: AnalyticsServiceClient<Channel>, index: u64) -> Result<u64, ()> {
    let request = pb::TrackEventRequest {
        event_name: format!("event_{:02}", index % EVENT_NAMES as u64),
        user_id: format!("load-user-{}", index % LOAD_USERS),
        properties: HashMap::from([(
            "page".to_string(),
            pb::PropertyValue {
                value: Some(pb::property_value::Value::StringValue(format!("/page/{}", index % 100))),
            },
        )]),
        timestamp: 0,
        insert_id: String::new(),
    };
    client.track_event(request).await.map(|_| 1).map_err(|_| ())
}

/// Until `stop`, every [`POLL_INTERVAL`] counts the sessions of `database` PostgreSQL shows
/// active, by wait event, into the timeline's window of the moment.
async fn sample_sessions(
    options: sqlx::postgres::PgConnectOptions,
    database: String,
    timeline: Timeline,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut connection = options.connect().await?;
    while !stop.load(Ordering::Relaxed) {
        let waits: Vec<(String, i64)> = sqlx::query_as(
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'running'), count(*)
               FROM pg_stat_activity
              WHERE datname = $1 AND state = 'active' AND backend_type = 'client backend'
                AND pid <> pg_backend_pid()
              GROUP BY 1",
        )
        .bind(&database)
        .fetch_all(&mut connection)
        .await?;
        timeline.record_sessions(Instant::now(), waits);
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    connection.close().await.ok();
    Ok(())
}

fn millis(histogram: &hdrhistogram::Histogram<u64>, quantile: f64) -> String {
    if histogram.is_empty() {
        return "-".into();
    }
    format!("{:.2}", histogram.value_at_quantile(quantile) as f64 / 1000.0)
}

fn print_report(arguments: &Arguments, report: &Report, load_before: &str, load_after: &str) {
    let command: Vec<String> = std::env::args().collect();
    println!("## erasebench {}\n", chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"));
    println!("command: `{}`", command.join(" "));
    println!("commit: {}", commit());
    println!(
        "machine: {} cores; load average before {load_before}, after {load_after} (other processes share the cores)",
        std::thread::available_parallelism().map(usize::from).unwrap_or(0)
    );
    println!(
        "seeded {} events of the erased user and {} of others over {} days in {:.0} s (folded and analyzed in {:.0} s); Redis {}; load: unary TrackEvent {}/s offered, at most {} in flight, {} connections\n",
        report.seeded_heavy,
        report.seeded_total - report.seeded_heavy,
        arguments.days,
        report.seeding_seconds,
        report.folding_seconds,
        if arguments.backends.redis_on() { "on" } else { "off" },
        arguments.rate,
        arguments.in_flight,
        arguments.connections,
    );
    println!("| window | seconds | achieved events/s | p50 ms | p95 ms | p99 ms | max ms | errors |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, (seconds, window)) in WINDOWS.iter().zip(&report.windows) {
        let max = if window.latency.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", window.latency.max() as f64 / 1000.0)
        };
        println!(
            "| {name} | {seconds:.1} | {:.0} | {} | {} | {} | {max} | {} |",
            window.events as f64 / seconds.max(1e-9),
            millis(&window.latency, 0.50),
            millis(&window.latency, 0.95),
            millis(&window.latency, 0.99),
            window.errors,
        );
    }
    let deletion = &report.deletion;
    println!();
    println!("| erasure | |\n|---|---|");
    println!("| duration (DeleteUser sent to GetUserDeletion COMPLETED) | {:.1} s |", report.erasure_seconds);
    println!("| events_deleted | {} |", deletion.events_deleted);
    println!(
        "| events erased per second | {:.0} |",
        deletion.events_deleted as f64 / report.erasure_seconds.max(1e-9)
    );
    println!(
        "| insert_ids_deleted, identity_deleted, suppress | {}, {}, {} |",
        deletion.insert_ids_deleted, deletion.identity_deleted, deletion.suppress
    );
    println!(
        "| rows of the erased user left (must be 0) | {} {} |",
        report.rows_left,
        if report.rows_left == 0 { "pass" } else { "**fail**" }
    );
    println!(
        "| GetEventCount over the whole history = raw SQL ({} names, {} events) | {} |",
        report.counted_names,
        report.counted_events,
        if report.counts_equal { "pass" } else { "**fail**" }
    );
    println!();
    println!(
        "active sessions of the bench database, by wait event (mean per sample, every {} ms):\n",
        POLL_INTERVAL.as_millis()
    );
    println!("| window | samples | sessions by wait event |\n|---|---|---|");
    for (name, (_, window)) in WINDOWS.iter().zip(&report.windows) {
        let mut waits: Vec<(&String, &u64)> = window.waits.iter().collect();
        waits.sort_by(|left, right| right.1.cmp(left.1));
        let listed: Vec<String> = waits
            .iter()
            .map(|(wait, count)| format!("{wait} {:.2}", **count as f64 / window.samples.max(1) as f64))
            .collect();
        println!("| {name} | {} | {} |", window.samples, listed.join(", "));
    }
}

/// The checkout's commit, "+ changes" when the work tree differs from it.
fn commit() -> String {
    let git = |arguments: &[&str]| {
        std::process::Command::new("git")
            .args(arguments)
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|text| text.trim().to_string())
            .unwrap_or_default()
    };
    let hash = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!("{hash}{}", if dirty { " + uncommitted changes" } else { "" })
}
