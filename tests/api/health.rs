//! Standard health (grpc.health.v1), our HealthCheck RPC, reflection, readiness
//! while the schema is behind.

use analytics_service::pb;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::helpers::{channel, spawn_app, spawn_app_with, TestApp, TestOptions};
use analytics_service::repository::postgres::{connect_options, schema};

async fn standard_status(app: &TestApp, service: &str) -> Result<ServingStatus, tonic::Status> {
    HealthClient::new(channel(app.grpc_address).await)
        .check(HealthCheckRequest { service: service.into() })
        .await
        .map(|response| response.into_inner().status())
}

#[tokio::test]
async fn health_answers_serving_for_the_server_and_the_service() {
    let app = spawn_app().await;
    assert_eq!(standard_status(&app, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(standard_status(&app, "analytics.v1.AnalyticsService").await.unwrap(), ServingStatus::Serving);
    assert_eq!(standard_status(&app, "no.such.Service").await.unwrap_err().code(), Code::NotFound);
    let custom = app.client.clone().health_check(pb::HealthCheckRequest {}).await.unwrap().into_inner();
    assert_eq!(custom.status, "SERVING");
    assert_eq!(app.admin_get("/readyz").await, (200, "ready\n".to_string()));
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_services() {
    let app = spawn_app().await;
    let expected = ["analytics.v1.AnalyticsService", "grpc.health.v1.Health"];

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel(app.grpc_address).await)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    for name in expected {
        assert!(names.iter().any(|listed| listed == name), "v1 lists {name}: {names:?}");
    }

    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest as AlphaReflectionRequest;
    let request = AlphaReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut responses = AlphaClient::new(channel(app.grpc_address).await)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(AlphaResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    for name in expected {
        assert!(names.iter().any(|listed| listed == name), "v1alpha lists {name}: {names:?}");
    }

    // The descriptor of our service can be fetched by symbol (what `grpcurl describe` does).
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("analytics.v1.AnalyticsService".into())),
    };
    let mut responses = ServerReflectionClient::new(channel(app.grpc_address).await)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(matches!(response.message_response, Some(MessageResponse::FileDescriptorResponse(_))));
}

#[tokio::test]
async fn serve_stays_up_not_ready_until_the_schema_is_migrated() {
    let app = spawn_app_with(TestOptions { migrate: false, ..TestOptions::default() }).await;
    assert_eq!(standard_status(&app, "").await.unwrap(), ServingStatus::NotServing);
    let (status, body) = app.admin_get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("migrate"), "{body}");
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'events'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(tables, 0, "serve never changes the schema by itself");

    schema::migrate(&connect_options(&app.config)).await.unwrap();
    app.wait_for_readyz(200).await;
    assert_eq!(standard_status(&app, "analytics.v1.AnalyticsService").await.unwrap(), ServingStatus::Serving);
}

#[tokio::test]
async fn migrate_on_start_applies_the_schema() {
    let app = spawn_app_with(TestOptions {
        migrate: false,
        env: vec![("MIGRATE_ON_START".into(), "true".into())],
        ..TestOptions::default()
    })
    .await;
    app.wait_for_readyz(200).await;
    app.track("view", "u", 0).await;
    assert_eq!(app.event_rows().await, 1);
}
