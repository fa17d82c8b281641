//! Graceful shutdown: NOT_SERVING first, in-flight calls complete, then exit.

use std::collections::HashMap;
use std::time::Duration;

use analytics_service::pb;
use sqlx::Connection;

use crate::helpers::{channel, spawn_app, spawn_app_with, TestOptions};
use crate::proxy::TcpProxy;

#[tokio::test]
async fn calls_in_flight_at_shutdown_complete() {
    let mut app = spawn_app().await;

    // Hold a lock so the next insert blocks inside PostgreSQL.
    let mut locker = app.pool.acquire().await.unwrap().detach();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();

    let mut client = app.client.clone();
    let in_flight = tokio::spawn(async move {
        client
            .track_event(pb::TrackEventRequest {
                event_name: "in_flight".into(),
                user_id: "u".into(),
                properties: HashMap::new(),
                timestamp: 0,
                insert_id: String::new(),
            })
            .await
    });
    // Wait until the insert is waiting on the lock.
    for _ in 0..100 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    app.signal_shutdown();
    app.wait_for_readyz(503).await;
    let (_, body) = app.admin_get("/readyz").await;
    assert!(body.contains("shutting down"), "{body}");

    // New connections are refused once the server stopped accepting.
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(app.grpc_address).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the gRPC listener closes on shutdown");
    assert!(!in_flight.is_finished(), "the call is still blocked on the lock");

    lock.rollback().await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight call completes")
        .unwrap()
        .expect("and succeeds")
        .into_inner();
    assert!(response.success);
    app.wait_stopped().await.expect("the server exits cleanly");

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_name = 'in_flight'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn connections_are_recycled_after_the_maximum_age_so_clients_re_resolve() {
    let app = spawn_app_with(TestOptions {
        env: vec![("GRPC_MAX_CONNECTION_AGE_SECONDS".into(), "1".into())],
        ..TestOptions::default()
    })
    .await;
    // Count the client's TCP connections through a proxy in front of the gRPC port.
    let proxy = TcpProxy::start(app.grpc_address).await;
    let mut client = analytics_service::pb::analytics_service_client::AnalyticsServiceClient::new(
        channel(proxy.address).await,
    );
    for _ in 0..30 {
        client.health_check(pb::HealthCheckRequest {}).await.expect("calls keep working across reconnects");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        proxy.accepted() >= 2,
        "the server closed the aged connection and the client opened a new one ({} connections)",
        proxy.accepted()
    );
}
