//! Every validation rule through the wire: INVALID_ARGUMENT naming the field, and
//! nothing stored.

use std::collections::HashMap;

use analytics_service::pb;
use tonic::Code;

use crate::helpers::{now, number_value, spawn_app, string_value};

fn request(
    name: &str,
    user: &str,
    properties: HashMap<String, pb::PropertyValue>,
    timestamp: i64,
) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: name.into(),
        user_id: user.into(),
        properties,
        timestamp,
        insert_id: String::new(),
    }
}

#[tokio::test]
async fn invalid_events_are_rejected_with_the_field_and_store_nothing() {
    let app = spawn_app().await;
    let one = |key: &str, value: pb::PropertyValue| HashMap::from([(key.to_string(), value)]);
    // {"k":"<text>"} has 8 bytes of framing; 32 KiB + 1 in total.
    let oversized = "x".repeat(32 * 1024 - 8 + 1);
    let too_many_keys: HashMap<_, _> =
        (0..257).map(|index| (format!("k{index}"), number_value(1.0))).collect();
    let cases: Vec<(&str, pb::TrackEventRequest, &str)> = vec![
        ("empty name", request("", "u", HashMap::new(), 0), "event_name"),
        ("long name", request(&"n".repeat(256), "u", HashMap::new(), 0), "event_name"),
        ("control in name", request("a\u{1b}b", "u", HashMap::new(), 0), "event_name"),
        ("long user", request("e", &"u".repeat(256), HashMap::new(), 0), "user_id"),
        ("control in user", request("e", "u\n", HashMap::new(), 0), "user_id"),
        ("too many keys", request("e", "u", too_many_keys, 0), "properties"),
        ("empty key", request("e", "u", one("", string_value("v")), 0), "properties[\"\"]"),
        ("long key", request("e", "u", one(&"k".repeat(256), string_value("v")), 0), "properties["),
        ("nul in value", request("e", "u", one("page", string_value("a\u{0}b")), 0), "properties[\"page\"]"),
        ("nan", request("e", "u", one("n", number_value(f64::NAN)), 0), "properties[\"n\"]"),
        ("infinity", request("e", "u", one("n", number_value(f64::NEG_INFINITY)), 0), "properties[\"n\"]"),
        (
            "unset value",
            request("e", "u", one("v", pb::PropertyValue { value: None }), 0),
            "properties[\"v\"]",
        ),
        ("32 KiB + 1", request("e", "u", one("k", string_value(&oversized)), 0), "properties"),
        ("future timestamp", request("e", "u", HashMap::new(), now() + 2 * 3_600), "timestamp"),
        ("too old", request("e", "u", HashMap::new(), now() - 31 * 86_400), "timestamp"),
    ];
    for (name, request, field) in cases {
        let status = app.client.clone().track_event(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().starts_with(field), "{name}: message {:?} names {field}", status.message());
    }
    assert_eq!(app.event_rows().await, 0, "invalid input stores nothing");

    // The limits themselves are accepted.
    let at_limit = "x".repeat(32 * 1024 - 8);
    app.client.clone().track_event(request("e", "u", one("k", string_value(&at_limit)), 0)).await.unwrap();
    app.client
        .clone()
        .track_event(request(&"n".repeat(255), &"u".repeat(255), HashMap::new(), 0))
        .await
        .unwrap();
    assert_eq!(app.event_rows().await, 2);
}

#[tokio::test]
async fn invalid_identities_are_rejected_and_store_nothing() {
    let app = spawn_app().await;
    let cases = [
        (
            "empty user",
            pb::IdentifyUserRequest { user_id: String::new(), properties: HashMap::new() },
            "user_id",
        ),
        (
            "nul in value",
            pb::IdentifyUserRequest {
                user_id: "u".into(),
                properties: HashMap::from([("email".into(), string_value("\u{0}"))]),
            },
            "properties[\"email\"]",
        ),
    ];
    for (name, request, field) in cases {
        let status = app.client.clone().identify_user(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}");
        assert!(status.message().starts_with(field), "{name}: {}", status.message());
    }
    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_identities").fetch_one(&app.pool).await.unwrap();
    assert_eq!(users, 0);
}

#[tokio::test]
async fn invalid_utf8_on_the_wire_is_rejected_by_decoding() {
    // Protobuf strings must be UTF-8; prost refuses the message before our code runs.
    let app = spawn_app().await;
    let mut raw = Vec::new();
    // field 1 (event_name), wire type 2, length 2, bytes 0xff 0xfe
    raw.extend_from_slice(&[0x0a, 0x02, 0xff, 0xfe]);
    let mut grpc = tonic::client::Grpc::new(crate::helpers::channel(app.grpc_address).await);
    grpc.ready().await.unwrap();
    let codec = RawCodec;
    let path = http::uri::PathAndQuery::from_static("/analytics.v1.AnalyticsService/TrackEvent");
    let status = grpc
        .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(raw), path, codec)
        .await
        .expect_err("invalid UTF-8 is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(app.event_rows().await, 0);
}

/// Sends and receives raw protobuf bytes.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buffer: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Self::Error> {
        bytes::BufMut::put_slice(buffer, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buffer: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let bytes = bytes::Buf::copy_to_bytes(buffer, bytes::Buf::remaining(buffer));
        Ok(Some(bytes.to_vec()))
    }
}
