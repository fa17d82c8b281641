//! IdentifyUser: merge semantics, first_seen stability, audit record.

use std::collections::HashMap;
use std::time::Duration;

use analytics_service::pb;
use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::helpers::{number_value, spawn_app, string_value, CapturedLogs, TestApp};

async fn identify(app: &TestApp, user_id: &str, properties: HashMap<String, pb::PropertyValue>) {
    let response = app
        .client
        .clone()
        .identify_user(pb::IdentifyUserRequest { user_id: user_id.into(), properties })
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
}

async fn identity(
    app: &TestApp,
    user_id: &str,
) -> (serde_json::Value, DateTime<Utc>, DateTime<Utc>, DateTime<Utc>) {
    let row = sqlx::query(
        "SELECT properties, first_seen, last_seen, updated_at FROM user_identities WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    (row.get("properties"), row.get("first_seen"), row.get("last_seen"), row.get("updated_at"))
}

#[tokio::test]
async fn identify_merges_properties_and_keeps_first_seen() {
    let app = spawn_app().await;
    identify(
        &app,
        "user-1",
        HashMap::from([("plan".into(), string_value("free")), ("seats".into(), number_value(1.0))]),
    )
    .await;
    let (properties, first_seen, last_seen, updated_at) = identity(&app, "user-1").await;
    assert_eq!(properties, serde_json::json!({"plan": "free", "seats": 1.0}));

    tokio::time::sleep(Duration::from_millis(20)).await;
    identify(&app, "user-1", HashMap::from([("plan".into(), string_value("pro"))])).await;
    let (merged, first_seen_after, last_seen_after, updated_at_after) = identity(&app, "user-1").await;

    assert_eq!(merged, serde_json::json!({"plan": "pro", "seats": 1.0}), "new keys overwrite, others stay");
    assert_eq!(first_seen_after, first_seen, "first_seen never changes");
    assert!(last_seen_after > last_seen, "last_seen moves forward");
    assert!(updated_at_after > updated_at, "updated_at moves forward");

    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_identities").fetch_one(&app.pool).await.unwrap();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn identify_with_no_properties_still_records_the_user() {
    let app = spawn_app().await;
    identify(&app, "user-2", HashMap::new()).await;
    let (properties, ..) = identity(&app, "user-2").await;
    assert_eq!(properties, serde_json::json!({}));
}

#[tokio::test]
async fn identify_writes_an_audit_record_without_property_values() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_global_default(subscriber);

    let app = spawn_app().await;
    identify(&app, "audited-user", HashMap::from([("email".into(), string_value("secret@example.com"))]))
        .await;

    let output = logs.text();
    let audit = logs
        .json_lines()
        .into_iter()
        .find(|line| line["target"] == "audit")
        .expect("an audit record is logged");
    assert_eq!(audit["user_id"], "audited-user");
    assert_eq!(audit["outcome"], "ok");
    assert_eq!(audit["caller"], "127.0.0.1", "{audit}");
    assert!(audit["timestamp"].as_str().is_some());
    assert!(!output.contains("secret@example.com"), "property values never reach the log");
}
