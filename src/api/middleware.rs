//! gRPC server middleware (a tower layer around every service on the port):
//! - one server span per RPC with the standard `rpc.*` attributes, joined to the caller's
//!   trace through W3C `traceparent`, and a `trace_id` field every log line inherits;
//! - go-grpc-prometheus metrics with bounded labels;
//! - panic recovery: a panicking handler becomes INTERNAL, its message goes to the log,
//!   the server keeps serving.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::FutureExt;
use opentelemetry::trace::{TraceContextExt, TraceId};
use tonic::{Code, Status};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics;
use crate::security::tls::caller_from_extensions;
use crate::telemetry::{traceparent_trace_id, HeaderExtractor};

/// (grpc_service, grpc_method, grpc_type) of every method served. Anything else is
/// reported as "unknown" so arbitrary paths never create new metric series.
const KNOWN_METHODS: &[(&str, &str, &str)] = &[
    ("analytics.v1.AnalyticsService", "TrackEvent", "unary"),
    ("analytics.v1.AnalyticsService", "TrackEvents", "unary"),
    ("analytics.v1.AnalyticsService", "IdentifyUser", "unary"),
    ("analytics.v1.AnalyticsService", "GetEventCount", "unary"),
    ("analytics.v1.AnalyticsService", "GetUserCount", "unary"),
    ("analytics.v1.AnalyticsService", "HealthCheck", "unary"),
    ("grpc.health.v1.Health", "Check", "unary"),
    ("grpc.health.v1.Health", "Watch", "server_stream"),
    ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo", "bidi_stream"),
    ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", "bidi_stream"),
];
const UNKNOWN: (&str, &str, &str) = ("unknown", "unknown", "unknown");

fn classify(path: &str) -> (&'static str, &'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(service), Some(method)) = (parts.next(), parts.next()) else {
        return UNKNOWN;
    };
    KNOWN_METHODS
        .iter()
        .find(|(known_service, known_method, _)| *known_service == service && *known_method == method)
        .copied()
        .unwrap_or(UNKNOWN)
}

/// The go-grpc-prometheus name of a status code ("OK", "InvalidArgument", ...).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcObservabilityLayer;

impl<S> Layer<S> for GrpcObservabilityLayer {
    type Service = GrpcObservability<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcObservability { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcObservability<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for GrpcObservability<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RequestBody: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = http::Response<ResponseBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (service, method, kind) = classify(request.uri().path());
        let span = server_span(service, method, request.headers());
        span.record("caller", caller_from_extensions(request.extensions()).as_str());
        let handled = async move {
            metrics::record_grpc_started(service, method, kind);
            let started = Instant::now();
            let outcome = AssertUnwindSafe(inner.call(request)).catch_unwind().await;
            let response = match outcome {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => {
                    metrics::record_grpc_handled(
                        service,
                        method,
                        kind,
                        code_name(Code::Unknown),
                        started.elapsed(),
                    );
                    tracing::warn!("rpc failed in the transport");
                    return Err(error);
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|text| text.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".to_string());
                    tracing::error!(panic = %message, "handler panicked");
                    Status::internal("internal error").into_http()
                }
            };
            // Unary errors travel as trailers-only responses, so the code is in the
            // headers; without a grpc-status header the call succeeded.
            let code = Status::from_header_map(response.headers()).map_or(Code::Ok, |status| status.code());
            let elapsed = started.elapsed();
            metrics::record_grpc_handled(service, method, kind, code_name(code), elapsed);
            let current = tracing::Span::current();
            current.record("rpc.grpc.status_code", code as i32);
            if is_server_error(code) {
                current.record("otel.status_code", "ERROR");
                tracing::warn!(
                    grpc_code = code_name(code),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "rpc failed"
                );
            } else {
                tracing::debug!(
                    grpc_code = code_name(code),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "rpc finished"
                );
            }
            Ok(response)
        };
        Box::pin(handled.instrument(span))
    }
}

/// Codes that mean the server, not the caller, failed (the span is marked as an error).
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown | Code::Internal | Code::Unavailable | Code::DataLoss | Code::DeadlineExceeded
    )
}

/// The server span of one RPC. Its parent is the caller's span when `traceparent` is
/// present; `trace_id` is the OpenTelemetry trace id when tracing is on, else the one
/// from `traceparent`, else a fresh random id, so logs always correlate.
fn server_span(service: &'static str, method: &'static str, headers: &http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        caller = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed; then there is nothing to join.
        span.set_parent(parent).ok();
    }
    let otel_trace_id = span.context().span().span_context().trace_id();
    let trace_id = if otel_trace_id != TraceId::INVALID {
        otel_trace_id.to_string()
    } else {
        traceparent_trace_id(headers).unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
    };
    span.record("trace_id", trace_id.as_str());
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_label_set() {
        assert_eq!(
            classify("/analytics.v1.AnalyticsService/TrackEvent"),
            ("analytics.v1.AnalyticsService", "TrackEvent", "unary")
        );
        assert_eq!(classify("/grpc.health.v1.Health/Watch").2, "server_stream");
        assert_eq!(classify("/analytics.v1.AnalyticsService/Nope"), UNKNOWN);
        assert_eq!(classify("/random"), UNKNOWN);
        assert_eq!(classify(""), UNKNOWN);
    }
}
