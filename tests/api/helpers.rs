//! `spawn_app()` and friends: each test gets a fresh database, its own Redis prefix and
//! a server on free ports. The database is dropped when the [`TestApp`] is dropped.
//!
//! PostgreSQL and Redis addresses default to the local services and can be moved with
//! TEST_POSTGRES_HOST / TEST_POSTGRES_PORT / TEST_POSTGRES_USER / TEST_REDIS_HOST / TEST_REDIS_PORT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use analytics_service::config::Config;
use analytics_service::pb::analytics_admin_service_client::AnalyticsAdminServiceClient;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use analytics_service::pb::{self, PropertyValue};
use analytics_service::repository::postgres::{connect_options, hour_spans, schema, Database};
use analytics_service::startup::Application;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use uuid::Uuid;

pub fn postgres_host() -> String {
    std::env::var("TEST_POSTGRES_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}
pub fn postgres_port() -> u16 {
    std::env::var("TEST_POSTGRES_PORT").ok().and_then(|port| port.parse().ok()).unwrap_or(5432)
}
pub fn postgres_user() -> String {
    std::env::var("TEST_POSTGRES_USER").unwrap_or_else(|_| "postgres".into())
}
pub fn redis_host() -> String {
    std::env::var("TEST_REDIS_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}
pub fn redis_port() -> u16 {
    std::env::var("TEST_REDIS_PORT").ok().and_then(|port| port.parse().ok()).unwrap_or(6379)
}

/// What a test wants of its environment.
#[derive(Clone, Debug)]
pub struct TestOptions {
    /// Apply migrations before the server starts.
    pub migrate: bool,
    pub redis: RedisMode,
    /// Point the pool at a port where nothing listens.
    pub database_unreachable: bool,
    /// Extra or overriding environment variables.
    pub env: Vec<(String, String)>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self { migrate: true, redis: RedisMode::Real, database_unreachable: false, env: Vec::new() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisMode {
    Real,
    /// REDIS_HOST set, but to a port where nothing listens.
    ClosedPort,
    /// REDIS_HOST empty: the cache is off.
    Disabled,
}

pub struct TestApp {
    pub grpc_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub client: AnalyticsServiceClient<Channel>,
    /// A pool on the test's own database, for asserting rows.
    pub pool: PgPool,
    pub database_name: String,
    pub redis_prefix: String,
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A port on which nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn admin_options() -> PgConnectOptions {
    PgConnectOptions::new()
        .host(&postgres_host())
        .port(postgres_port())
        .username(&postgres_user())
        .database("postgres")
        .disable_statement_logging()
}

/// Creates an empty database with a unique name.
pub async fn create_database() -> String {
    let name = format!("analytics_test_{}", Uuid::now_v7().simple());
    let mut connection = admin_options().connect().await.expect("connect to postgres as admin");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut connection).await.unwrap();
    connection.close().await.ok();
    name
}

/// Drops a database made by [`create_database`], closing any connection still open.
pub async fn drop_database(name: &str) {
    let mut connection = admin_options().connect().await.expect("connect to postgres as admin");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut connection)
        .await
        .unwrap();
    connection.close().await.ok();
}

/// The configuration a test server runs with.
pub fn test_config(database_name: &str, redis_prefix: &str, options: &TestOptions) -> Config {
    let postgres_port = if options.database_unreachable { closed_port() } else { postgres_port() };
    let (redis_host, redis_port) = match options.redis {
        RedisMode::Real => (redis_host(), redis_port()),
        RedisMode::ClosedPort => ("127.0.0.1".to_string(), closed_port()),
        RedisMode::Disabled => (String::new(), 6379),
    };
    let mut env: HashMap<String, String> = [
        ("SERVICE_PORT", "0".to_string()),
        ("PROMETHEUS_PORT", "0".to_string()),
        ("SERVICE_BIND_ADDRESS", "127.0.0.1".to_string()),
        ("POSTGRES_HOST", postgres_host()),
        ("POSTGRES_PORT", postgres_port.to_string()),
        ("POSTGRES_USER", postgres_user()),
        ("POSTGRES_PASSWORD", String::new()),
        ("POSTGRES_DB", database_name.to_string()),
        ("POSTGRES_SSLMODE", "disable".to_string()),
        ("POSTGRES_MAX_CONNECTIONS", "5".to_string()),
        ("POSTGRES_ACQUIRE_TIMEOUT_MS", "1000".to_string()),
        ("REDIS_HOST", redis_host),
        ("REDIS_PORT", redis_port.to_string()),
        ("REDIS_KEY_PREFIX", redis_prefix.to_string()),
        ("DB_RETRY_BASE_DELAY_MS", "5".to_string()),
        ("HEALTH_POLL_INTERVAL_MS", "100".to_string()),
        ("SHUTDOWN_DRAIN_SECONDS", "10".to_string()),
        // Lifecycle events would add rows to every test's counts; observability tests turn it on.
        ("SELF_TRACKING", "false".to_string()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value))
    .collect();
    env.extend(options.env.iter().cloned());
    Config::from_vars(env).expect("test configuration is valid")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestOptions::default()).await
}

pub async fn spawn_app_with(options: TestOptions) -> TestApp {
    let database_name = create_database().await;
    let redis_prefix = format!("test:{}", Uuid::now_v7().simple());
    let config = test_config(&database_name, &redis_prefix, &options);
    if options.migrate {
        let mut migrate_config = config.clone();
        migrate_config.postgres.port = postgres_port();
        schema::migrate(&connect_options(&migrate_config)).await.expect("migrations apply");
    }
    start_server(config, database_name, redis_prefix).await
}

/// Starts a server for an existing database (e.g. a second replica).
pub async fn start_server(config: Config, database_name: String, redis_prefix: String) -> TestApp {
    let application = Application::build(config.clone()).await.expect("application builds");
    let grpc_address = application.grpc_address();
    let admin_address = application.admin_address();
    let (shutdown, shutdown_receiver) = oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until_stopped(async move {
        shutdown_receiver.await.ok();
    }));
    // Under mTLS a plaintext client cannot connect; TLS tests build their own clients.
    let client = if config.tls.files.is_some() {
        AnalyticsServiceClient::new(
            Channel::from_shared(format!("http://{grpc_address}")).unwrap().connect_lazy(),
        )
    } else {
        AnalyticsServiceClient::new(channel(grpc_address).await)
    };
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect_with(admin_options().database(&database_name))
        .await
        .expect("test pool connects");
    TestApp {
        grpc_address,
        admin_address,
        client,
        pool,
        database_name,
        redis_prefix,
        config,
        shutdown: Some(shutdown),
        server: Some(server),
    }
}

/// Environment of a server with the administrative RPCs open (plaintext with
/// ADMIN_RPCS_ENABLED=true) and a fresh SUPPRESSION_KEY_FILE; the key file's path is
/// returned too, so a second replica can share the key.
pub fn admin_env() -> (Vec<(String, String)>, std::path::PathBuf) {
    use base64::Engine as _;
    let path = std::env::temp_dir().join(format!("suppression-key-{}", Uuid::now_v7().simple()));
    let key: [u8; 32] = rand::random();
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode(key)).expect("key file writes");
    let env = vec![
        ("ADMIN_RPCS_ENABLED".to_string(), "true".to_string()),
        ("SUPPRESSION_KEY_FILE".to_string(), path.display().to_string()),
    ];
    (env, path)
}

/// A TrackEvent request for "now", without properties or insert_id.
pub fn track_request(name: &str, user_id: &str) -> pb::TrackEventRequest {
    keyed_track_request(name, user_id, "")
}

/// A TrackEvent request for "now" carrying `insert_id` ("" for none), without properties.
pub fn keyed_track_request(name: &str, user_id: &str, insert_id: &str) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: name.into(),
        user_id: user_id.into(),
        properties: HashMap::new(),
        timestamp: 0,
        insert_id: insert_id.into(),
    }
}

/// Checks `condition` every `poll` until it holds, `timeout / poll` times at the most (so
/// for at least `timeout`, the checks not counted); whether it held. The caller asserts.
/// Polls the boolean query `sql` every `poll` until it answers true, for at most `timeout`.
pub async fn wait_for_sql(pool: &PgPool, sql: &str, timeout: Duration, poll: Duration) -> bool {
    wait_until(timeout, poll, async || sqlx::query_scalar::<_, bool>(sql).fetch_one(pool).await.unwrap())
        .await
}

pub async fn wait_until(timeout: Duration, poll: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let attempts = timeout.as_millis().div_ceil(poll.as_millis().max(1));
    for _ in 0..attempts {
        if condition().await {
            return true;
        }
        tokio::time::sleep(poll).await;
    }
    false
}

pub async fn channel(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}")).unwrap().connect().await.expect("grpc connects")
}

impl TestApp {
    /// Waits until the fold task has moved every delta and (hour, user) pair into the
    /// rollups.
    pub async fn wait_for_the_fold(&self) {
        let all_folded = wait_for_sql(
            &self.pool,
            "SELECT NOT EXISTS (SELECT 1 FROM event_count_deltas) AND NOT EXISTS (SELECT 1 FROM user_activity_pending)",
            Duration::from_secs(10),
            Duration::from_millis(50),
        )
        .await;
        assert!(all_folded, "the fold task empties event_count_deltas and user_activity_pending");
    }

    /// Keeps the server's span builder from writing any hour's user spans while the
    /// returned connection is open: it holds the builder's advisory lock, as a replica
    /// building would. For tests of what a unique-user count does with an edge hour it
    /// reads raw.
    pub async fn hold_the_span_builder(&self) -> sqlx::PgConnection {
        let mut connection = self.pool.acquire().await.unwrap().detach();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(hour_spans::SPAN_BUILDER_LOCK_KEY)
            .execute(&mut connection)
            .await
            .unwrap();
        connection
    }

    /// Deletes every live spans row (migration V8). The fold starts one only for an hour
    /// with no bitmap yet, so hours folded before this call are read raw (or from kept
    /// summaries) from now on, whatever events they take later.
    pub async fn forget_live_spans(&self) {
        sqlx::query("DELETE FROM user_activity_live_spans").execute(&self.pool).await.unwrap();
    }

    /// Writes the user spans of every closed hour now, as the server's fold task does in
    /// the background; returns how many hours it wrote.
    pub async fn span_closed_hours(&self) -> usize {
        let database = Database::connect_lazy(&self.config);
        let built = hour_spans::build_all_hour_spans(&database, now()).await.unwrap();
        database.close().await;
        built
    }

    pub fn signal_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            shutdown.send(()).ok();
        }
    }

    pub async fn wait_stopped(&mut self) -> anyhow::Result<()> {
        match self.server.take() {
            Some(server) => tokio::time::timeout(Duration::from_secs(30), server)
                .await
                .expect("server stops within 30 s")
                .expect("server task does not panic"),
            None => Ok(()),
        }
    }

    /// A client of the administrative service on this server's gRPC port (plaintext).
    pub fn admin_client(&self) -> AnalyticsAdminServiceClient<Channel> {
        AnalyticsAdminServiceClient::new(
            Channel::from_shared(format!("http://{}", self.grpc_address)).unwrap().connect_lazy(),
        )
    }

    pub async fn track(&self, name: &str, user_id: &str, timestamp: i64) -> pb::TrackEventResponse {
        self.client
            .clone()
            .track_event(pb::TrackEventRequest { timestamp, ..track_request(name, user_id) })
            .await
            .expect("track_event succeeds")
            .into_inner()
    }

    /// TrackEvent for "now" with an idempotency key ("" for none); the call must succeed.
    pub async fn track_keyed(&self, name: &str, user_id: &str, insert_id: &str) -> pb::TrackEventResponse {
        self.client
            .clone()
            .track_event(keyed_track_request(name, user_id, insert_id))
            .await
            .expect("track_event succeeds")
            .into_inner()
    }

    /// TrackEvents with `events`; the call must succeed. One result per event, in order.
    pub async fn track_batch(&self, events: Vec<pb::TrackEventRequest>) -> Vec<pb::TrackEventResult> {
        self.client
            .clone()
            .track_events(pb::TrackEventsRequest { events })
            .await
            .expect("track_events succeeds")
            .into_inner()
            .results
    }

    /// GetEventCount as (event_name, bucket start, count) rows; `zone` "" is UTC.
    pub async fn counts(
        &self,
        name: &str,
        start: i64,
        end: i64,
        group_by: &str,
        zone: &str,
    ) -> Vec<(String, i64, i64)> {
        self.client
            .clone()
            .get_event_count(pb::GetEventCountRequest {
                event_name: name.into(),
                start_time: start,
                end_time: end,
                group_by: group_by.into(),
                time_zone: zone.into(),
            })
            .await
            .unwrap_or_else(|status| panic!("{name} {start} {end} {group_by} {zone}: {status:?}"))
            .into_inner()
            .counts
            .into_iter()
            .map(|count| (count.event_name, count.timestamp, count.count))
            .collect()
    }

    /// GetUserCount over [start, end).
    pub async fn unique_users(&self, start: i64, end: i64) -> i64 {
        self.client
            .clone()
            .get_user_count(pb::GetUserCountRequest { start_time: start, end_time: end })
            .await
            .expect("get_user_count succeeds")
            .into_inner()
            .unique_users
    }

    pub async fn event_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&self.pool).await.unwrap()
    }

    /// GET on the admin port: (status code, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_address, path).await
    }

    /// Waits until /readyz answers `status` (the readiness probe runs every 100 ms here).
    pub async fn wait_for_readyz(&self, status: u16) {
        let answered = wait_until(Duration::from_secs(5), Duration::from_millis(50), async || {
            self.admin_get("/readyz").await.0 == status
        })
        .await;
        assert!(answered, "/readyz never answered {status}");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        let name = self.database_name.clone();
        // Drop cannot await: a short-lived runtime on another thread removes the database.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(mut connection) = admin_options().connect().await {
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut connection)
                        .await
                        .ok();
                }
            });
        })
        .join()
        .ok();
    }
}

/// A minimal HTTP/1.0 GET, enough for the admin port.
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("admin port connects");
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    (status, body)
}

/// Log output captured from a tracing subscriber (nextest runs each test in its own process,
/// so a test may install the global subscriber).
#[derive(Clone, Default)]
pub struct CapturedLogs(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Every captured line that parses as JSON.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes).lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn string_value(text: &str) -> PropertyValue {
    PropertyValue { value: Some(pb::property_value::Value::StringValue(text.to_string())) }
}

pub fn number_value(number: f64) -> PropertyValue {
    PropertyValue { value: Some(pb::property_value::Value::NumberValue(number)) }
}

pub fn bool_value(flag: bool) -> PropertyValue {
    PropertyValue { value: Some(pb::property_value::Value::BoolValue(flag)) }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Monday 00:00 UTC of the week two weeks before now: a base for bucket tests that stays
/// inside the accepted event age (30 days).
pub fn monday_two_weeks_ago() -> i64 {
    let two_weeks_ago = now() - 14 * 86_400;
    // 1970-01-01 was a Thursday: shift by 3 days to align weeks on Monday.
    (two_weeks_ago + 3 * 86_400).div_euclid(7 * 86_400) * 7 * 86_400 - 3 * 86_400
}

/// The value of one Prometheus sample line, e.g. `name{a="b"}`; 0 when absent.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The service started in-process from a configuration of its own (its own PostgreSQL
/// cluster, say), without the shared-database set-up of [`spawn_app_with`]. Tests add
/// their own methods in their modules.
pub struct InProcessServer {
    pub grpc_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub client: AnalyticsServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcessServer {
    pub async fn start(config: Config) -> Self {
        let application = Application::build(config).await.expect("application builds");
        let grpc_address = application.grpc_address();
        let admin_address = application.admin_address();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(application.run_until_stopped(async move {
            stopped.await.ok();
        }));
        let client = AnalyticsServiceClient::new(channel(grpc_address).await);
        Self { grpc_address, admin_address, client, stop: Some(stop), task }
    }

    /// Stops it as SIGTERM would, waiting up to 30 s for the drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await.ok();
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The service binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_analytics-service");

/// The service binary set up for the test PostgreSQL's `database` (no password, no TLS),
/// text logs, stdin closed; callers add the verb and anything else.
pub fn binary_command(database: &str) -> std::process::Command {
    let mut command = std::process::Command::new(BINARY);
    command
        .env("POSTGRES_HOST", postgres_host())
        .env("POSTGRES_PORT", postgres_port().to_string())
        .env("POSTGRES_USER", postgres_user())
        .env("POSTGRES_PASSWORD", "")
        .env("POSTGRES_DB", database)
        .env("POSTGRES_SSLMODE", "disable")
        .env("LOG_FORMAT", "text")
        .stdin(std::process::Stdio::null());
    command
}

/// Waits up to `timeout` until the gRPC server at `address` answers HealthCheck with
/// SERVING; false when it never did.
pub async fn wait_serving(address: SocketAddr, timeout: Duration) -> bool {
    wait_until(timeout, Duration::from_millis(50), async || {
        let Ok(channel) = Channel::from_shared(format!("http://{address}")).unwrap().connect().await else {
            return false;
        };
        let health = AnalyticsServiceClient::new(channel).health_check(pb::HealthCheckRequest {}).await;
        health.is_ok_and(|health| health.into_inner().status == "SERVING")
    })
    .await
}

/// Where Debian's PostgreSQL 15 programs are (tests that run a private cluster).
pub const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Runs a PostgreSQL program as the `postgres` OS user (the tests run as root, and
/// PostgreSQL refuses root); panics with its output on failure.
pub fn as_postgres_user(program: &str, args: &[&str]) {
    let output = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{POSTGRES_BIN}/{program}")])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runuser runs");
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Stops the private cluster in `data` at once (`pg_ctl -m immediate`), ignoring
/// failures: for `Drop`, where it may already be stopped.
pub fn stop_private_postgres(data: &str) {
    std::process::Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            &format!("{POSTGRES_BIN}/pg_ctl"),
            "-D",
            data,
            "-m",
            "immediate",
            "stop",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok();
}
