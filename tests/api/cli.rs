//! The binary's verbs, run as a user would: `migrate [--check]`, `healthcheck`,
//! `serve` with SIGTERM, and start-up errors that name the variable.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::{binary_command, closed_port, create_database, drop_database, spawn_app, BINARY};

fn command(database: &str) -> Command {
    binary_command(database)
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_check_reports_behind_then_current() {
    let database = create_database().await;
    let check = command(&database).args(["migrate", "--check"]).output().unwrap();
    assert_eq!(check.status.code(), Some(3), "behind: {}", String::from_utf8_lossy(&check.stdout));

    let migrate = command(&database).arg("migrate").output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));

    let check = command(&database).args(["migrate", "--check", "--wait-seconds", "5"]).output().unwrap();
    assert_eq!(check.status.code(), Some(0));
    drop_database(&database).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_exits_zero_only_for_a_serving_server() {
    let app = spawn_app().await;
    let serving =
        Command::new(BINARY).args(["healthcheck", "--addr", &app.grpc_address.to_string()]).output().unwrap();
    assert!(serving.status.success(), "{}", String::from_utf8_lossy(&serving.stderr));
    assert_eq!(String::from_utf8_lossy(&serving.stdout).trim(), "SERVING");

    let nobody = Command::new(BINARY)
        .args(["healthcheck", "--addr", &format!("127.0.0.1:{}", closed_port()), "--timeout-seconds", "2"])
        .output()
        .unwrap();
    assert_eq!(nobody.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_variable_is_named_at_start_up() {
    let output = command("postgres").env("POSTGRES_PORT", "not-a-port").arg("serve").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("POSTGRES_PORT"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_zero() {
    let database = create_database().await;
    assert!(command(&database).arg("migrate").output().unwrap().status.success());
    let grpc_port = closed_port();
    let mut server = command(&database)
        .env("SERVICE_BIND_ADDRESS", "127.0.0.1")
        .env("SERVICE_PORT", grpc_port.to_string())
        .env("PROMETHEUS_PORT", "0")
        .env("REDIS_HOST", "")
        .arg("serve")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let address = format!("127.0.0.1:{grpc_port}");
    let mut serving = false;
    for _ in 0..100 {
        let status = Command::new(BINARY).args(["healthcheck", "--addr", &address]).output().unwrap().status;
        if status.success() {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "the server came up");

    let killed = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let mut exit = None;
    for _ in 0..200 {
        if let Some(status) = server.try_wait().unwrap() {
            exit = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exit = exit.unwrap_or_else(|| {
        server.kill().ok();
        panic!("the server did not exit after SIGTERM");
    });
    assert_eq!(exit.code(), Some(0));
    drop_database(&database).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_and_its_check_run_with_an_https_collector_that_is_down() {
    let database = create_database().await;
    let endpoint = format!("https://127.0.0.1:{}", closed_port());
    let migrate =
        command(&database).env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint).arg("migrate").output().unwrap();
    assert!(
        migrate.status.success(),
        "migrate: {}{}",
        String::from_utf8_lossy(&migrate.stdout),
        String::from_utf8_lossy(&migrate.stderr)
    );
    let check = command(&database)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t0ken")
        .args(["migrate", "--check"])
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "the init container's check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // An exporter that cannot be built (a broken header list) is logged, never fatal.
    let broken = command(&database)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign")
        .args(["migrate", "--check"])
        .output()
        .unwrap();
    assert_eq!(broken.status.code(), Some(0), "{}", String::from_utf8_lossy(&broken.stderr));
    let log = String::from_utf8_lossy(&broken.stdout);
    assert!(log.contains("trace export off") && log.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{log}");
    drop_database(&database).await;
}
