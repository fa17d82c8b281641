//! TrackEvent stores exactly one row with what was sent.

use std::collections::HashMap;

use analytics_service::pb;
use sqlx::Row;
use uuid::Uuid;

use crate::helpers::{bool_value, now, number_value, spawn_app, string_value};

#[tokio::test]
async fn track_event_stores_the_event_and_returns_a_v7_id() {
    let app = spawn_app().await;
    let timestamp = now() - 3_600;
    let properties = HashMap::from([
        ("page".to_string(), string_value("/dashboard")),
        ("load_ms".to_string(), number_value(12.5)),
        ("logged_in".to_string(), bool_value(true)),
    ]);
    let response = app
        .client
        .clone()
        .track_event(pb::TrackEventRequest {
            event_name: "page_view".into(),
            user_id: "user123".into(),
            properties,
            timestamp,
            insert_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    assert!(response.success);
    let event_id = Uuid::parse_str(&response.event_id).expect("event_id is a UUID");
    assert_eq!(event_id.get_version_num(), 7, "time-ordered UUIDv7");

    let row = sqlx::query(
        "SELECT event_name, user_id, properties, floor(EXTRACT(EPOCH FROM timestamp))::bigint AS ts FROM events WHERE id = $1",
    )
    .bind(event_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<String, _>("event_name"), "page_view");
    assert_eq!(row.get::<Option<String>, _>("user_id").as_deref(), Some("user123"));
    assert_eq!(row.get::<i64, _>("ts"), timestamp);
    assert_eq!(
        row.get::<serde_json::Value, _>("properties"),
        serde_json::json!({"page": "/dashboard", "load_ms": 12.5, "logged_in": true})
    );
    assert_eq!(app.event_rows().await, 1);
}

#[tokio::test]
async fn anonymous_event_has_no_user_and_absent_timestamp_means_now() {
    let app = spawn_app().await;
    let before = now();
    let response = app.track("landing_view", "", 0).await;
    let after = now();

    let row = sqlx::query(
        "SELECT user_id, floor(EXTRACT(EPOCH FROM timestamp))::bigint AS ts FROM events WHERE id = $1",
    )
    .bind(Uuid::parse_str(&response.event_id).unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<Option<String>, _>("user_id"), None);
    let stored = row.get::<i64, _>("ts");
    assert!((before..=after).contains(&stored), "{before} <= {stored} <= {after}");
}

#[tokio::test]
async fn hostile_strings_are_stored_verbatim() {
    let app = spawn_app().await;
    let hostile = "'; DROP TABLE events; --";
    let response = app
        .client
        .clone()
        .track_event(pb::TrackEventRequest {
            event_name: hostile.into(),
            user_id: "robert'); DROP TABLE user_identities;--".into(),
            properties: HashMap::from([(hostile.to_string(), string_value("\" OR 1=1 --"))]),
            timestamp: 0,
            insert_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let row = sqlx::query("SELECT event_name, user_id, properties FROM events WHERE id = $1")
        .bind(Uuid::parse_str(&response.event_id).unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("event_name"), hostile);
    assert_eq!(row.get::<serde_json::Value, _>("properties")[hostile], "\" OR 1=1 --");
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename IN ('events', 'user_identities')")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(tables, 2);
}

#[tokio::test]
async fn concurrent_calls_store_one_row_each() {
    let app = spawn_app().await;
    let calls = (0..50).map(|index| {
        let mut client = app.client.clone();
        async move {
            client
                .track_event(pb::TrackEventRequest {
                    event_name: "click".into(),
                    user_id: format!("user-{index}"),
                    properties: HashMap::new(),
                    timestamp: 0,
                    insert_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .event_id
        }
    });
    let ids: Vec<String> = futures::future::join_all(calls).await;
    assert_eq!(app.event_rows().await, 50);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE id::text = ANY($1)")
        .bind(&ids)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 50, "every acknowledged id is in the table");
}
