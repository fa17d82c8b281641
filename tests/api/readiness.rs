//! Readiness and the shared PostgreSQL: a PostgreSQL outage (a proxy the test cuts)
//! under both READINESS_REQUIRES_DATABASE settings, and a schema that is behind, which
//! makes a replica not ready under either.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::helpers::{
    channel, create_database, metric_value, postgres_host, postgres_port, spawn_app_with, start_server,
    test_config, track_request, wait_until, TestApp, TestOptions,
};
use crate::proxy::TcpProxy;
use analytics_service::pb;
use analytics_service::repository::postgres::{connect_options, schema};

/// A migrated server whose PostgreSQL connections go through a proxy the test can cut.
async fn app_behind_proxy(readiness_requires_database: Option<&str>) -> (TcpProxy, TestApp) {
    let database = create_database().await;
    let target: SocketAddr = format!("{}:{}", postgres_host(), postgres_port()).parse().unwrap();
    let proxy = TcpProxy::start(target).await;
    let redis_prefix = format!("test:{}", uuid::Uuid::now_v7().simple());
    let mut env = vec![
        ("POSTGRES_PORT".to_string(), proxy.address.port().to_string()),
        ("POSTGRES_ACQUIRE_TIMEOUT_MS".to_string(), "300".to_string()),
    ];
    if let Some(setting) = readiness_requires_database {
        env.push(("READINESS_REQUIRES_DATABASE".to_string(), setting.to_string()));
    }
    let config = test_config(&database, &redis_prefix, &TestOptions { env, ..TestOptions::default() });
    schema::migrate(&connect_options(&config)).await.unwrap();
    let app = start_server(config, database, redis_prefix).await;
    app.wait_for_readyz(200).await;
    (proxy, app)
}

/// The HealthCheck RPC's answer: "SERVING" or "NOT_SERVING".
async fn health_check(app: &TestApp) -> String {
    app.client.clone().health_check(pb::HealthCheckRequest {}).await.unwrap().into_inner().status
}

async fn standard_health(app: &TestApp) -> ServingStatus {
    HealthClient::new(channel(app.grpc_address).await)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Waits until the readiness probe has seen PostgreSQL `up` (analytics_database_up).
async fn wait_for_database_up(app: &TestApp, up: bool) {
    let expected = if up { 1.0 } else { 0.0 };
    let seen = wait_until(Duration::from_secs(10), Duration::from_millis(50), async || {
        metric_value(&app.admin_get("/metrics").await.1, "analytics_database_up") == expected
    })
    .await;
    assert!(seen, "analytics_database_up never became {expected}");
}

#[tokio::test]
async fn by_default_a_postgresql_outage_keeps_the_replica_ready_and_calls_unavailable() {
    let (proxy, app) = app_behind_proxy(None).await;

    proxy.cut();
    wait_for_database_up(&app, false).await;
    let (status, body) = app.admin_get("/readyz").await;
    assert_eq!(status, 200, "the replica stays in the Service: {body}");
    assert!(body.contains("postgresql unreachable"), "/readyz says why it is degraded: {body}");
    assert_eq!(standard_health(&app).await, ServingStatus::Serving);
    assert_eq!(health_check(&app).await, "NOT_SERVING", "HealthCheck reports the outage");
    assert_eq!(metric_value(&app.admin_get("/metrics").await.1, "analytics_ready"), 1.0);
    let refused = app.client.clone().track_event(track_request("view", "alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(refused.message(), "database unavailable");

    proxy.restore();
    wait_for_database_up(&app, true).await;
    let serving = wait_until(Duration::from_secs(5), Duration::from_millis(20), async || {
        health_check(&app).await == "SERVING"
    })
    .await;
    assert!(serving, "HealthCheck follows the probe back to SERVING");
    app.client.clone().track_event(track_request("view", "alice")).await.expect("recovers without a restart");
    assert_eq!(app.event_rows().await, 1, "nothing refused during the outage was stored");
}

#[tokio::test]
async fn when_readiness_requires_the_database_an_outage_makes_the_replica_not_ready() {
    let (proxy, app) = app_behind_proxy(Some("true")).await;

    proxy.cut();
    app.wait_for_readyz(503).await;
    let (_, body) = app.admin_get("/readyz").await;
    assert!(body.contains("postgresql unreachable"), "{body}");
    assert_eq!(standard_health(&app).await, ServingStatus::NotServing);
    assert_eq!(health_check(&app).await, "NOT_SERVING");
    assert_eq!(app.admin_get("/livez").await.0, 200, "an outage never restarts the pod");
    let refused = app.client.clone().track_event(track_request("view", "alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    proxy.restore();
    app.wait_for_readyz(200).await;
    assert_eq!(standard_health(&app).await, ServingStatus::Serving);
}

#[tokio::test]
async fn a_schema_behind_is_not_ready_under_either_setting() {
    for setting in ["false", "true"] {
        let app = spawn_app_with(TestOptions {
            migrate: false,
            env: vec![("READINESS_REQUIRES_DATABASE".into(), setting.into())],
            ..TestOptions::default()
        })
        .await;
        let (status, body) = app.admin_get("/readyz").await;
        assert_eq!(status, 503, "READINESS_REQUIRES_DATABASE={setting}: {body}");
        assert!(body.contains("migrate"), "READINESS_REQUIRES_DATABASE={setting}: {body}");
        assert_eq!(standard_health(&app).await, ServingStatus::NotServing);
    }
}
