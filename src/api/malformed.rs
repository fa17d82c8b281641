//! Malformed requests are the caller's fault, and answered as such (applied by the gRPC
//! middleware, [`crate::api::middleware`], before metrics and logs record the code the
//! caller gets):
//! - a `content-type` other than `application/grpc` (optionally `+proto`, `+json` or with
//!   parameters) gets HTTP 415 Unsupported Media Type, as the gRPC over HTTP/2 spec
//!   prescribes, with `grpc-status` INVALID_ARGUMENT for gRPC-aware callers;
//! - a request body that does not decode (invalid UTF-8 in a string field, a wrong wire
//!   type, a truncated message or frame, no message at all) gets INVALID_ARGUMENT instead
//!   of the INTERNAL that tonic and tonic-prost answer, keeping the decoder's message,
//!   which names the field. These failures happen before a handler runs, so they are
//!   recognised by the messages tonic 0.14 and prost 0.14 give them
//!   ([`DECODE_FAILURE_MESSAGES`]); tests/api/malformed.rs pins each one.

use http::header::CONTENT_TYPE;
use http::StatusCode;
use tonic::{Code, Status};

/// Beginnings of the INTERNAL messages tonic (framing) and prost (message decoding) give
/// a request body that does not decode.
const DECODE_FAILURE_MESSAGES: &[&str] = &[
    // prost::DecodeError: invalid UTF-8, wrong wire type, truncated or invalid varint, ...
    "failed to decode Protobuf message",
    // tonic: the body ended inside a gRPC frame.
    "Unexpected EOF decoding stream",
    // tonic: a unary call whose body holds no message.
    "Missing request message",
    // tonic: a frame whose compression flag is neither 0 nor 1, or 1 without grpc-encoding.
    "protocol error: received message with",
];

/// Whether a request's `content-type` names gRPC.
pub(crate) fn is_grpc_content_type(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let media_type = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    media_type == "application/grpc" || media_type.starts_with("application/grpc+")
}

/// Whether an INTERNAL status is in fact a request body that failed to decode.
pub(crate) fn is_decode_failure(status: &Status) -> bool {
    status.code() == Code::Internal
        && DECODE_FAILURE_MESSAGES.iter().any(|prefix| status.message().starts_with(prefix))
}

/// The answer to a request whose content-type is not gRPC.
pub(crate) fn unsupported_media_type<B: Default>() -> http::Response<B> {
    let mut response = Status::invalid_argument("content-type must be application/grpc").into_http();
    *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response.headers_mut().remove(CONTENT_TYPE);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: Option<&str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = content_type {
            headers.insert(CONTENT_TYPE, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn only_grpc_content_types_are_accepted() {
        for accepted in ["application/grpc", "application/grpc+proto", "Application/GRPC; charset=utf-8"] {
            assert!(is_grpc_content_type(&headers(Some(accepted))), "{accepted}");
        }
        for refused in [None, Some("application/json"), Some("text/plain"), Some("application/grpc-web")] {
            assert!(!is_grpc_content_type(&headers(refused)), "{refused:?}");
        }
    }

    #[test]
    fn only_decode_failures_become_invalid_argument() {
        assert!(is_decode_failure(&Status::internal(
            "failed to decode Protobuf message: TrackEventRequest.event_name: invalid string value: data is not UTF-8 encoded"
        )));
        assert!(is_decode_failure(&Status::internal("Unexpected EOF decoding stream.")));
        assert!(!is_decode_failure(&Status::internal("internal error")));
        assert!(!is_decode_failure(&Status::unavailable("failed to decode Protobuf message")));
    }
}
