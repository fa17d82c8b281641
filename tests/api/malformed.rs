//! Malformed requests are client errors: hand-made bytes through a raw HTTP/2 client
//! (the h2 crate, so the framing and headers are ours, not tonic's). A body that does
//! not decode gets INVALID_ARGUMENT, a content-type other than gRPC gets HTTP 415, they
//! are counted under those codes (so the error-ratio alert never sees them), and nothing
//! is stored. Arbitrary bytes through the server get OK or INVALID_ARGUMENT (OUT_OF_RANGE
//! for a frame declaring more than GRPC_MAX_MESSAGE_BYTES), never a server error (a
//! proptest over the real server; PROPTEST_CASES cases).

use std::net::SocketAddr;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use prost::Message as _;
use tonic::Code;

use crate::helpers::{metric_value, spawn_app, spawn_app_with, TestOptions};

pub const TRACK_EVENT: &str = "/analytics.v1.AnalyticsService/TrackEvent";
const TRACK_EVENTS: &str = "/analytics.v1.AnalyticsService/TrackEvents";
const IDENTIFY_USER: &str = "/analytics.v1.AnalyticsService/IdentifyUser";

/// What the server answered: the HTTP status, the grpc-status (headers or trailers) and
/// the grpc-message.
#[derive(Debug)]
pub struct RawAnswer {
    pub http_status: http::StatusCode,
    pub code: Option<Code>,
    pub message: String,
}

/// One HTTP/2 connection to the server, sending requests exactly as given.
#[derive(Clone)]
pub struct RawClient {
    address: SocketAddr,
    sender: h2::client::SendRequest<Bytes>,
}

impl RawClient {
    pub async fn connect(address: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            connection.await.ok();
        });
        Self { address, sender }
    }

    pub async fn call(&self, path: &str, content_type: Option<&str>, body: Vec<u8>) -> RawAnswer {
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.address))
            .header("te", "trailers");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let mut sender = self.sender.clone().ready().await.unwrap();
        let (response, mut stream) = sender.send_request(request.body(()).unwrap(), false).unwrap();
        stream.send_data(Bytes::from(body), true).unwrap();
        let response = response.await.unwrap();
        let http_status = response.status();
        let mut headers = response.headers().clone();
        if !headers.contains_key("grpc-status") {
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                body.flow_control().release_capacity(chunk.len()).unwrap();
            }
            if let Some(trailers) = body.trailers().await.unwrap() {
                headers = trailers;
            }
        }
        let status = tonic::Status::from_header_map(&headers);
        RawAnswer {
            http_status,
            code: status
                .as_ref()
                .map(tonic::Status::code)
                .or(headers.contains_key("grpc-status").then_some(Code::Ok)),
            message: status.map(|status| status.message().to_string()).unwrap_or_default(),
        }
    }
}

/// A gRPC length-prefixed frame (uncompressed) around `message`.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

#[tokio::test]
async fn malformed_bodies_are_invalid_argument_and_other_content_types_get_415() {
    let app = spawn_app().await;
    let client = RawClient::connect(app.grpc_address).await;

    let valid = analytics_service::pb::TrackEventRequest {
        event_name: "raw_ok".into(),
        user_id: "raw-user".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let answer = client.call(TRACK_EVENT, Some("application/grpc"), frame(&valid)).await;
    assert_eq!((answer.http_status, answer.code), (http::StatusCode::OK, Some(Code::Ok)), "{answer:?}");

    let mut truncated_frame = frame(&valid);
    truncated_frame.truncate(truncated_frame.len() - 3);
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        // field 1 (event_name), length 3, bytes "a" 0xc3 0x28: not UTF-8
        ("invalid utf-8", TRACK_EVENT, frame(&[0x0a, 0x03, b'a', 0xc3, 0x28]), "UTF-8"),
        ("invalid utf-8 in a user id", IDENTIFY_USER, frame(&[0x0a, 0x02, 0xff, 0xfe]), "UTF-8"),
        // field 1 (a string) sent as a varint
        ("wrong wire type", TRACK_EVENT, frame(&[0x08, 0x01]), "wire type"),
        // field 1 says 5 bytes, 1 follows
        ("truncated message", TRACK_EVENT, frame(&[0x0a, 0x05, b'a']), "failed to decode"),
        ("truncated frame", TRACK_EVENT, truncated_frame, "EOF"),
        ("no message", TRACK_EVENT, Vec::new(), "Missing request message"),
        ("bad compression flag", TRACK_EVENTS, vec![7, 0, 0, 0, 0], "compression flag"),
    ];
    for (case, path, body, reason) in cases {
        let answer = client.call(path, Some("application/grpc"), body).await;
        assert_eq!(answer.code, Some(Code::InvalidArgument), "{case}: {answer:?}");
        assert!(
            answer.message.contains("malformed request") && answer.message.contains(reason),
            "{case}: {answer:?}"
        );
    }

    for content_type in [Some("application/json"), Some("text/plain"), None] {
        let answer = client.call(TRACK_EVENT, content_type, b"{\"event_name\":\"x\"}".to_vec()).await;
        assert_eq!(
            answer.http_status,
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}: {answer:?}"
        );
        assert_eq!(answer.code, Some(Code::InvalidArgument), "{content_type:?}: {answer:?}");
    }
    let answer = client.call(TRACK_EVENT, Some("application/grpc+proto"), frame(&valid)).await;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");

    assert_eq!(app.event_rows().await, 2, "only the two valid calls stored");
    let (_, metrics) = app.admin_get("/metrics").await;
    let handled = |code: &str| {
        metric_value(
            &metrics,
            &format!(
                "grpc_server_handled_total{{grpc_service=\"analytics.v1.AnalyticsService\",grpc_method=\"TrackEvent\",grpc_type=\"unary\",grpc_code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(handled("InvalidArgument"), 8.0, "{metrics}");
    assert!(!metrics.contains("grpc_code=\"Internal\""), "{metrics}");
}

/// Arbitrary bytes, and valid messages with flipped bytes, sent as gRPC frames.
fn fuzzed_body() -> impl Strategy<Value = Vec<u8>> {
    let valid = analytics_service::pb::TrackEventRequest {
        event_name: "fuzz".into(),
        user_id: "fuzz-user".into(),
        properties: [(
            "email".to_string(),
            analytics_service::pb::PropertyValue {
                value: Some(analytics_service::pb::property_value::Value::StringValue("a@b".into())),
            },
        )]
        .into(),
        timestamp: 0,
        insert_id: "k".into(),
    }
    .encode_to_vec();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|bytes| frame(&bytes)),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6).prop_map(move |flips| {
            let mut bytes = valid.clone();
            for (index, value) in flips {
                let position = index.index(bytes.len());
                bytes[position] ^= value;
            }
            frame(&bytes)
        }),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzed_bytes_through_the_server_get_client_codes_only() {
    let env = vec![("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE".to_string(), "0".to_string())];
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    let client = RawClient::connect(app.grpc_address).await;
    let runtime = tokio::runtime::Handle::current();
    let mut runner =
        TestRunner::new(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() });
    let paths = [TRACK_EVENT, TRACK_EVENTS, IDENTIFY_USER];
    runner
        .run(&(fuzzed_body(), 0..paths.len()), |(body, path)| {
            let answer = tokio::task::block_in_place(|| {
                runtime.block_on(client.call(paths[path], Some("application/grpc"), body.clone()))
            });
            // OUT_OF_RANGE: a frame declaring more than GRPC_MAX_MESSAGE_BYTES (tonic's code
            // for it, refused before reading the body; a client code too).
            if !matches!(answer.code, Some(Code::Ok | Code::InvalidArgument | Code::OutOfRange)) {
                return Err(TestCaseError::fail(format!("{} {body:?}: {answer:?}", paths[path])));
            }
            Ok(())
        })
        .unwrap();
    let (_, metrics) = app.admin_get("/metrics").await;
    for server_code in ["Internal", "Unknown", "Unavailable"] {
        assert!(!metrics.contains(&format!("grpc_code=\"{server_code}\"")), "{metrics}");
    }
}
