//! Failure handling: database outage (retries then UNAVAILABLE), opaque internal
//! errors, missing schema, panics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use analytics_service::api::middleware::GrpcObservabilityLayer;
use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use analytics_service::pb::analytics_service_server::{AnalyticsService, AnalyticsServiceServer};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::helpers::{channel, spawn_app, spawn_app_with, TestOptions};

fn event(name: &str) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: name.into(),
        user_id: "u".into(),
        properties: HashMap::new(),
        timestamp: 0,
        insert_id: String::new(),
    }
}

#[tokio::test]
async fn database_down_answers_unavailable_at_once_and_reports_not_serving() {
    let app = spawn_app_with(TestOptions {
        database_unreachable: true,
        env: vec![("POSTGRES_ACQUIRE_TIMEOUT_MS".into(), "200".into())],
        ..TestOptions::default()
    })
    .await;
    let mut client = app.client.clone();

    let status = tokio::time::timeout(Duration::from_secs(20), client.track_event(event("view")))
        .await
        .expect("no hang")
        .expect_err("database is down");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "database unavailable");

    let status = client
        .get_user_count(pb::GetUserCountRequest { start_time: 0, end_time: 10 })
        .await
        .expect_err("database is down");
    assert_eq!(status.code(), Code::Unavailable);

    let health = client.health_check(pb::HealthCheckRequest {}).await.unwrap().into_inner();
    assert_eq!(health.status, "NOT_SERVING");
    let standard = HealthClient::new(channel(app.grpc_address).await)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(standard.status(), ServingStatus::NotServing);
    assert_eq!(app.admin_get("/readyz").await.0, 503);
    assert_eq!(app.admin_get("/livez").await.0, 200, "a database outage must not restart the pod");

    let (_, metrics) = app.admin_get("/metrics").await;
    assert!(metrics.contains("analytics_database_up 0"), "{metrics}");
    // Known to be unreachable: the call was refused without trying a commit.
    assert!(metrics.contains(r#"analytics_events_rejected_total{reason="database"} 1"#), "{metrics}");
    assert!(!metrics.contains(r#"operation="insert_events""#), "no commit was attempted: {metrics}");
}

#[tokio::test]
async fn unexpected_database_errors_are_internal_and_opaque() {
    let app = spawn_app().await;
    // A constraint the service does not know about makes the insert fail as a query error.
    sqlx::query("ALTER TABLE events ADD CONSTRAINT no_views CHECK (event_name <> 'forbidden_view')")
        .execute(&app.pool)
        .await
        .unwrap();
    let status = app.client.clone().track_event(event("forbidden_view")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), "internal error", "no SQL or driver text reaches the caller");
    // The server keeps serving.
    app.client.clone().track_event(event("allowed_view")).await.unwrap();
}

#[tokio::test]
async fn a_missing_table_is_unavailable_not_internal() {
    let app = spawn_app().await;
    sqlx::query("DROP TABLE events").execute(&app.pool).await.unwrap();
    let status = app.client.clone().track_event(event("view")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "database not ready");
}

/// A service whose TrackEvent panics, behind the production middleware.
struct PanickingService;

#[tonic::async_trait]
impl AnalyticsService for PanickingService {
    async fn track_event(
        &self,
        _: Request<pb::TrackEventRequest>,
    ) -> Result<Response<pb::TrackEventResponse>, Status> {
        panic!("boom in a handler");
    }
    async fn track_events(
        &self,
        _: Request<pb::TrackEventsRequest>,
    ) -> Result<Response<pb::TrackEventsResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn identify_user(
        &self,
        _: Request<pb::IdentifyUserRequest>,
    ) -> Result<Response<pb::IdentifyUserResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn get_event_count(
        &self,
        _: Request<pb::GetEventCountRequest>,
    ) -> Result<Response<pb::GetEventCountResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn get_user_count(
        &self,
        _: Request<pb::GetUserCountRequest>,
    ) -> Result<Response<pb::GetUserCountResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn health_check(
        &self,
        _: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        Ok(Response::new(pb::HealthCheckResponse { status: "SERVING".into() }))
    }
}

#[tokio::test]
async fn a_panicking_handler_answers_internal_and_the_server_keeps_serving() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(GrpcObservabilityLayer::new(std::time::Duration::from_secs(10)))
            .add_service(AnalyticsServiceServer::new(PanickingService))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = AnalyticsServiceClient::new(channel(address).await);
    for _ in 0..2 {
        let status = client.track_event(event("view")).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
    let health = client.health_check(pb::HealthCheckRequest {}).await.unwrap().into_inner();
    assert_eq!(health.status, "SERVING", "same connection, same server, still serving");
}
