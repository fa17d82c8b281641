//! Hostile input in every string field of IdentifyUser (TrackEvent's are covered in
//! track_event.rs): SQL fragments, quotes and odd Unicode are stored verbatim through
//! bound parameters; NUL, over-long keys and invalid UTF-8 are refused before storage.

use std::collections::HashMap;

use analytics_service::pb;
use sqlx::Row;
use tonic::Code;

use crate::helpers::{spawn_app, string_value};
use crate::validation::RawCodec;

const HOSTILE: &[&str] = &[
    "'; DROP TABLE events; --",
    "robert'); DROP TABLE user_identities;--",
    "\" OR 1=1 --",
    "' OR ''='",
    "$1; SELECT pg_sleep(10)",
    "\\x00\\'",
    "ünïcødé ✓ 🦀 \u{202e}",
    "%s%n{}[]`",
];

#[tokio::test]
async fn hostile_user_ids_keys_and_values_are_stored_verbatim() {
    let app = spawn_app().await;
    for (index, hostile) in HOSTILE.iter().enumerate() {
        let user_id = format!("{hostile}#{index}");
        app.client
            .clone()
            .identify_user(pb::IdentifyUserRequest {
                user_id: user_id.clone(),
                properties: HashMap::from([(hostile.to_string(), string_value(hostile))]),
            })
            .await
            .unwrap_or_else(|status| panic!("{hostile:?}: {status:?}"));
        let row = sqlx::query("SELECT user_id, properties FROM user_identities WHERE user_id = $1")
            .bind(&user_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(row.get::<String, _>("user_id"), user_id);
        assert_eq!(row.get::<serde_json::Value, _>("properties")[*hostile], *hostile);
    }
    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_identities").fetch_one(&app.pool).await.unwrap();
    assert_eq!(users, HOSTILE.len() as i64);
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename IN ('events', 'user_identities')")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(tables, 2, "no statement was executed from the input");
}

#[tokio::test]
async fn nul_over_long_keys_and_invalid_utf8_are_refused_and_store_nothing() {
    let app = spawn_app().await;
    let refused = [
        ("nul in the user id", "ada\0".to_string(), "plan".to_string(), "pro"),
        ("nul in a value", "ada".to_string(), "plan".to_string(), "p\0ro"),
        ("over-long user id", "u".repeat(256), "plan".to_string(), "pro"),
        ("over-long key", "ada".to_string(), "k".repeat(300), "pro"),
    ];
    for (case, user_id, key, value) in refused {
        let status = app
            .client
            .clone()
            .identify_user(pb::IdentifyUserRequest {
                user_id,
                properties: HashMap::from([(key, string_value(value))]),
            })
            .await
            .expect_err(case);
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    }

    // Invalid UTF-8 in the user id (field 1) at the byte level: prost refuses it.
    let mut grpc = tonic::client::Grpc::new(crate::helpers::channel(app.grpc_address).await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/analytics.v1.AnalyticsService/IdentifyUser");
    let raw = vec![0x0a, 0x03, b'a', 0xc3, 0x28];
    let status =
        grpc.unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(raw), path, RawCodec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_identities").fetch_one(&app.pool).await.unwrap();
    assert_eq!(users, 0);
}
