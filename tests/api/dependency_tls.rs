//! TLS to the dependencies, against servers each test starts itself with certificates it
//! makes: a private PostgreSQL (initdb, `ssl=on`) checked under `verify-full` and
//! `verify-ca`, by `serve` and by `migrate`; a Redis with a TLS port and an ACL user that
//! serves the count cache and the shared rate limiter.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use analytics_service::config::Config;
use analytics_service::repository::postgres::connect_options;
use analytics_service::telemetry;
use sqlx::{ConnectOptions, Connection};
use tonic::Code;

use crate::certs::{CertDir, Leaf, TestCa};
use crate::helpers::{
    as_postgres_user, closed_port, http_get, metric_value, monday_two_weeks_ago, spawn_app_with,
    stop_private_postgres, test_config, track_request, wait_until, CapturedLogs, InProcessServer, RedisMode,
    TestOptions,
};

const BINARY: &str = env!("CARGO_BIN_EXE_analytics-service");

/// A private PostgreSQL with TLS on, listening on 127.0.0.1 at a free port. It runs as
/// the `postgres` OS user (the tests run as root); stopped and deleted when dropped.
struct TlsPostgres {
    directory: PathBuf,
    port: u16,
}

impl TlsPostgres {
    fn start(server: &Leaf) -> Self {
        let directory = std::env::temp_dir().join(format!("analytics-pg-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&directory).unwrap();
        // Dropped (stopped, deleted) even if start-up fails half-way.
        let postgres = Self { directory, port: closed_port() };
        let path = |name: &str| postgres.directory.join(name).display().to_string();
        std::fs::write(path("server.crt"), &server.certificate_pem).unwrap();
        std::fs::write(path("server.key"), &server.key_pem).unwrap();
        let mut key_permissions = std::fs::metadata(path("server.key")).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut key_permissions, 0o600);
        std::fs::set_permissions(path("server.key"), key_permissions).unwrap();
        let chown = Command::new("chown").args(["-R", "postgres:postgres", &path("")]).status().unwrap();
        assert!(chown.success(), "chown the postgres directory");

        as_postgres_user(
            "initdb",
            &["-D", &path("data"), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
        );
        let server_options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {socket_dir} -c ssl=on -c ssl_cert_file={cert} \
             -c ssl_key_file={key} -c fsync=off -c max_connections=20",
            port = postgres.port,
            socket_dir = path(""),
            cert = path("server.crt"),
            key = path("server.key"),
        );
        as_postgres_user(
            "pg_ctl",
            &[
                "-D",
                &path("data"),
                "-l",
                &path("postgres.log"),
                "-w",
                "-t",
                "60",
                "-o",
                &server_options,
                "start",
            ],
        );
        postgres
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        stop_private_postgres(&self.directory.join("data").display().to_string());
        std::fs::remove_dir_all(&self.directory).ok();
    }
}

type Running = InProcessServer;

impl InProcessServer {
    async fn readyz(&self) -> (u16, String) {
        http_get(self.admin_address, "/readyz").await
    }

    /// Waits until /readyz answers `status`; its body then.
    async fn wait_for_readyz(&self, status: u16) -> String {
        let mut body = String::new();
        let answered = wait_until(Duration::from_secs(10), Duration::from_millis(50), async || {
            let (code, text) = self.readyz().await;
            body = text;
            code == status
        })
        .await;
        assert!(answered, "/readyz never answered {status} (grpc {}): {body}", self.grpc_address);
        body
    }
}

/// The service's configuration for the private PostgreSQL (database `postgres`, Redis off).
fn postgres_config(postgres: &TlsPostgres, host: &str, sslmode: &str, root_cert: &Path) -> Config {
    let options = TestOptions {
        redis: RedisMode::Disabled,
        env: vec![
            ("POSTGRES_HOST".into(), host.into()),
            ("POSTGRES_PORT".into(), postgres.port.to_string()),
            ("POSTGRES_USER".into(), "postgres".into()),
            ("POSTGRES_SSLMODE".into(), sslmode.into()),
            ("POSTGRES_SSL_ROOT_CERT".into(), root_cert.display().to_string()),
        ],
        ..TestOptions::default()
    };
    test_config("postgres", "unused", &options)
}

/// `analytics-service migrate` against the private PostgreSQL.
fn migrate_verb(postgres: &TlsPostgres, host: &str, root_cert: &Path) -> std::process::Output {
    Command::new(BINARY)
        .env("POSTGRES_HOST", host)
        .env("POSTGRES_PORT", postgres.port.to_string())
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_PASSWORD", "")
        .env("POSTGRES_DB", "postgres")
        .env("POSTGRES_SSLMODE", "verify-full")
        .env("POSTGRES_SSL_ROOT_CERT", root_cert)
        .env("REDIS_HOST", "")
        .env("LOG_FORMAT", "text")
        .arg("migrate")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_verify_full_needs_the_right_ca_and_host_name() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let log_options =
        TestOptions { env: vec![("LOG_FORMAT".into(), "json".into())], ..TestOptions::default() };
    let _telemetry =
        telemetry::init_with_writer(&test_config("unused", "unused", &log_options).telemetry, move || {
            writer.clone()
        })
        .unwrap();
    // The service's panic hook logs into the captured lines; test failures belong on stderr.
    drop(std::panic::take_hook());
    let ca = TestCa::new("postgres ca");
    let other_ca = TestCa::new("some other ca");
    // Issued for the name `localhost` only: 127.0.0.1 is a host name it does not match.
    let postgres = TlsPostgres::start(&ca.server_for(&["localhost"]));
    let files = CertDir::new();
    let right_ca = files.write("postgres-ca.crt", &ca.pem());
    let wrong_ca = files.write("other-ca.crt", &other_ca.pem());

    let migrated = migrate_verb(&postgres, "localhost", &right_ca);
    assert!(
        migrated.status.success(),
        "migrate over verify-full: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    for (host, root_cert) in [("localhost", &wrong_ca), ("127.0.0.1", &right_ca)] {
        let refused = migrate_verb(&postgres, host, root_cert);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success(),
            "migrate must refuse {host} with {}: {stderr}",
            root_cert.display()
        );
        assert!(stderr.contains("certificate"), "migrate says why: {stderr}");
    }

    // The right CA and host name: ready, calls stored, every connection encrypted.
    let app = Running::start(postgres_config(&postgres, "localhost", "verify-full", &right_ca)).await;
    app.wait_for_readyz(200).await;
    app.client.clone().track_event(track_request("view", "alice")).await.expect("stored over verify-full");
    let mut observer = connect_options(&postgres_config(&postgres, "localhost", "verify-full", &right_ca))
        .application_name("observer")
        .connect()
        .await
        .unwrap();
    let (encrypted, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'analytics-service'",
    )
    .fetch_one(&mut observer)
    .await
    .unwrap();
    assert!(encrypted >= 1 && plain == 0, "service connections: {encrypted} encrypted, {plain} plain");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE user_id = 'alice'")
        .fetch_one(&mut observer)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    observer.close().await.ok();
    app.stop().await;

    // verify-ca with the right CA. (sqlx 0.8 checks the host name under verify-ca too,
    // stricter than libpq: its verifier misses rustls' NotValidForNameContext, sqlx#3793.)
    let app = Running::start(postgres_config(&postgres, "localhost", "verify-ca", &right_ca)).await;
    app.wait_for_readyz(200).await;
    app.stop().await;
    let app = Running::start(postgres_config(&postgres, "localhost", "verify-ca", &wrong_ca)).await;
    let body = app.wait_for_readyz(503).await;
    assert!(body.contains("postgresql unreachable"), "verify-ca refuses a wrong CA: {body}");
    app.stop().await;

    // A wrong CA, then a host name the certificate does not name: refused, not ready,
    // calls UNAVAILABLE, and the log says it is the certificate.
    for (host, root_cert) in [("localhost", &wrong_ca), ("127.0.0.1", &right_ca)] {
        let logged_before = refusals_logged(&logs).len();
        let app = Running::start(postgres_config(&postgres, host, "verify-full", root_cert)).await;
        let body = app.wait_for_readyz(503).await;
        assert!(body.contains("postgresql unreachable"), "{host}: {body}");
        let status = app.client.clone().track_event(track_request("view", "bob")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{host}: {status:?}");
        let refusals = refusals_logged(&logs);
        assert!(refusals.len() > logged_before, "{host}: the refusal is logged");
        let error = refusals.last().unwrap();
        assert!(error.contains("certificate"), "{host}: the log names the certificate problem: {error}");
        app.stop().await;
    }
}

/// The `error` field of every "postgresql unreachable" log line.
fn refusals_logged(logs: &CapturedLogs) -> Vec<String> {
    logs.json_lines()
        .into_iter()
        .filter(|line| {
            line["message"].as_str().is_some_and(|message| message.starts_with("postgresql unreachable"))
        })
        .map(|line| line["error"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A redis-server serving only TLS (certificates of the test) on 127.0.0.1 at a free
/// port, with the `default` user off and an ACL user `analytics`; killed when dropped.
struct TlsRedis {
    directory: CertDir,
    port: u16,
    process: Child,
}

const REDIS_USER: &str = "analytics";
const REDIS_PASSWORD: &str = "acl-s3cret";

impl TlsRedis {
    async fn start(ca: &TestCa) -> Self {
        let directory = CertDir::new();
        let server = ca.server("redis");
        let certificate = directory.write("redis.crt", &server.certificate_pem).display().to_string();
        let key = directory.write("redis.key", &server.key_pem).display().to_string();
        let ca_file = directory.write("ca.crt", &ca.pem()).display().to_string();
        let port = closed_port();
        let password_rule = format!(">{REDIS_PASSWORD}");
        let process = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--tls-cert-file", &certificate, "--tls-key-file", &key, "--tls-ca-cert-file", &ca_file])
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
            .args(["--dir", &directory.path.display().to_string()])
            .args(["--user", "default", "off"])
            .args(["--user", REDIS_USER, "on", &password_rule, "~*", "+@all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let redis = Self { directory, port, process };
        let listening = wait_until(Duration::from_secs(10), Duration::from_millis(50), async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(listening, "redis-server listens on its TLS port");
        redis
    }

    /// The keys under `prefix`, read over TLS as the ACL user.
    async fn keys(&self, ca: &TestCa, prefix: &str) -> Vec<String> {
        let url = format!("rediss://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{}/", self.port);
        let client = redis::Client::build_with_tls(
            url.as_str(),
            redis::TlsCertificates { client_tls: None, root_cert: Some(ca.pem().into_bytes()) },
        )
        .unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut connection).await.unwrap()
    }

    fn env(&self, ca_file: &Path) -> Vec<(String, String)> {
        [
            ("REDIS_HOST", "127.0.0.1".to_string()),
            ("REDIS_PORT", self.port.to_string()),
            ("REDIS_TLS", "true".to_string()),
            ("REDIS_TLS_CA_FILE", ca_file.display().to_string()),
            ("REDIS_USERNAME", REDIS_USER.to_string()),
            ("REDIS_PASSWORD", REDIS_PASSWORD.to_string()),
            // Generous: a TLS handshake on a busy test machine.
            ("REDIS_TIMEOUT_MS", "2000".to_string()),
            ("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE", "2".to_string()),
            ("EVENT_MAX_AGE_DAYS", "7".to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.process.kill().ok();
        self.process.wait().ok();
    }
}

fn cache_series(metrics: &str, result: &str) -> f64 {
    metric_value(
        metrics,
        &format!("analytics_cache_requests_total{{query=\"event_count\",result=\"{result}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_over_tls_with_an_acl_user_serves_the_cache_and_the_rate_limiter() {
    let ca = TestCa::new("redis ca");
    let redis = TlsRedis::start(&ca).await;
    let ca_file = redis.directory.write("client-ca.crt", &ca.pem());
    let app = spawn_app_with(TestOptions { env: redis.env(&ca_file), ..TestOptions::default() }).await;

    app.client.clone().track_event(track_request("view", "alice")).await.unwrap();
    app.client.clone().track_event(track_request("view", "alice")).await.unwrap();
    let limited = app.client.clone().track_event(track_request("view", "alice")).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");

    let base = monday_two_weeks_ago();
    let first = app.counts("view", base, base + 3_600, "hour", "").await;
    let second = app.counts("view", base, base + 3_600, "hour", "").await;
    assert_eq!(first, second);

    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(cache_series(&metrics, "hit"), 1.0, "the second count came from redis: {metrics}");
    assert_eq!(metric_value(&metrics, "analytics_rate_limit_fallbacks_total"), 0.0, "{metrics}");
    let keys = redis.keys(&ca, &app.redis_prefix).await;
    assert!(keys.iter().any(|key| key.contains(":ratelimit:user:alice")), "{keys:?}");
    assert!(keys.len() >= 2, "a budget and a cached count: {keys:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_with_an_untrusted_certificate_degrades_and_the_service_serves() {
    let ca = TestCa::new("redis ca");
    let redis = TlsRedis::start(&ca).await;
    let wrong_ca_file = redis.directory.write("other-ca.crt", &TestCa::new("some other ca").pem());
    let app = spawn_app_with(TestOptions { env: redis.env(&wrong_ca_file), ..TestOptions::default() }).await;

    app.client.clone().track_event(track_request("view", "alice")).await.expect("served without redis");
    app.client.clone().track_event(track_request("view", "alice")).await.expect("served without redis");
    let limited = app.client.clone().track_event(track_request("view", "alice")).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "the local limiter takes over: {limited:?}");
    let base = monday_two_weeks_ago();
    app.counts("view", base, base + 3_600, "hour", "").await;
    app.counts("view", base, base + 3_600, "hour", "").await;

    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(metric_value(&metrics, "analytics_rate_limit_fallbacks_total"), 1.0, "{metrics}");
    assert_eq!(cache_series(&metrics, "hit"), 0.0, "{metrics}");
    assert_eq!(app.admin_get("/readyz").await.0, 200, "redis is never needed to be ready");
    assert!(redis.keys(&ca, &app.redis_prefix).await.is_empty(), "nothing reached the untrusted redis");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_without_the_acl_user_degrades_and_the_service_serves() {
    let ca = TestCa::new("redis ca");
    let redis = TlsRedis::start(&ca).await;
    let ca_file = redis.directory.write("client-ca.crt", &ca.pem());
    // The server's `default` user is off: the password alone authenticates nobody.
    let mut env = redis.env(&ca_file);
    env.retain(|(name, _)| name != "REDIS_USERNAME");
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;

    app.client.clone().track_event(track_request("view", "alice")).await.expect("served without redis");
    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(metric_value(&metrics, "analytics_rate_limit_fallbacks_total"), 1.0, "{metrics}");
    assert!(redis.keys(&ca, &app.redis_prefix).await.is_empty(), "nothing was written without the acl user");
}
