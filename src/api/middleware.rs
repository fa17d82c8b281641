//! gRPC server middleware (a tower layer around every service on the port):
//! - one server span per RPC with the standard `rpc.*` attributes, joined to the caller's
//!   trace through W3C `traceparent`, and a `trace_id` field every log line inherits;
//! - go-grpc-prometheus metrics with bounded labels: every call is counted once as
//!   handled, with the code its client received (a call cut short by its deadline or
//!   cancelled by the client included);
//! - who is calling: the caller's identity ([`CallerIdentity`], the client certificate
//!   parsed once per call) goes into the request extensions for authorization and spans;
//! - the call's deadline: the client's `grpc-timeout` (less a small margin, so the answer
//!   reaches the client before it gives up) or REQUEST_TIMEOUT_SECONDS, whichever is
//!   sooner. Handlers find it as a [`RequestDeadline`] extension; a call still running
//!   then is answered DEADLINE_EXCEEDED;
//! - malformed requests answered as the caller's fault ([`crate::api::malformed`]): a
//!   non-gRPC content-type gets 415, a body that does not decode INVALID_ARGUMENT;
//! - panic recovery: a panicking handler becomes INTERNAL, its message goes to the log,
//!   the server keeps serving.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use opentelemetry::trace::{TraceContextExt, TraceId};
use tokio::time::Instant;
use tonic::{Code, Status};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::api::malformed::{is_decode_failure, is_grpc_content_type, unsupported_media_type};
use crate::metrics::GrpcSeries;
use crate::models::rpc::Rpc;
use crate::security::caller::CallerIdentity;
use crate::telemetry::{traceparent_trace_id, HeaderExtractor};

/// The labels of a call whose path is not in the catalogue, so arbitrary paths never
/// create new metric series.
const UNKNOWN: (&str, &str, &str) = ("unknown", "unknown", "unknown");

/// (grpc_service, grpc_method, grpc_type) of a request path.
fn classify(path: &str) -> (&'static str, &'static str, &'static str) {
    Rpc::from_path(path).map_or(UNKNOWN, |rpc| (rpc.service(), rpc.method(), rpc.kind()))
}

/// The metric series of a request path: one per RPC of the catalogue, one for the rest.
fn series_of(path: &str) -> &'static GrpcSeries {
    static SERIES: OnceLock<Vec<GrpcSeries>> = OnceLock::new();
    let series = SERIES.get_or_init(|| {
        Rpc::ALL
            .iter()
            .map(|rpc| GrpcSeries::new(rpc.service(), rpc.method(), rpc.kind()))
            .chain(std::iter::once(GrpcSeries::new(UNKNOWN.0, UNKNOWN.1, UNKNOWN.2)))
            .collect()
    });
    let index = Rpc::from_path(path)
        .and_then(|rpc| Rpc::ALL.iter().position(|known| *known == rpc))
        .unwrap_or(Rpc::ALL.len());
    &series[index]
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

/// How much sooner than the client's `grpc-timeout` the server answers
/// DEADLINE_EXCEEDED (at most a tenth of the timeout), so the answer is on its way
/// before the client gives up: the client's clock started before the request arrived.
const CLIENT_DEADLINE_MARGIN: Duration = Duration::from_millis(20);
/// A call the client cancels this close to (or after) the end of its `grpc-timeout`
/// was given up by the client's own deadline timer, and counts as DEADLINE_EXCEEDED.
const CLIENT_DEADLINE_ALLOWANCE: Duration = Duration::from_millis(100);

/// When the server stops working on a call and answers DEADLINE_EXCEEDED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RequestDeadline(pub Instant);

impl RequestDeadline {
    /// The deadline of `request`, or `fallback` from now when the middleware set none
    /// (a handler called directly).
    pub(crate) fn of<T>(request: &tonic::Request<T>, fallback: Duration) -> Instant {
        request
            .extensions()
            .get::<RequestDeadline>()
            .map_or_else(|| Instant::now() + fallback, |deadline| deadline.0)
    }
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3_600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// When a call must end, seen from the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CallDeadline {
    /// When the server answers DEADLINE_EXCEEDED: the sooner of the client's
    /// `grpc-timeout` (less the margin) and `request_timeout`.
    answer_by: Instant,
    /// From when a cancellation by the client counts as its deadline passing.
    client_gives_up: Instant,
}

fn call_deadline(headers: &http::HeaderMap, started: Instant, request_timeout: Duration) -> CallDeadline {
    let client_timeout =
        headers.get("grpc-timeout").and_then(|value| value.to_str().ok()).and_then(parse_grpc_timeout);
    match client_timeout {
        Some(timeout) => {
            let margin = CLIENT_DEADLINE_MARGIN.min(timeout / 10);
            CallDeadline {
                answer_by: started + (timeout - margin).min(request_timeout),
                client_gives_up: started
                    + timeout.saturating_sub(CLIENT_DEADLINE_ALLOWANCE).min(request_timeout),
            }
        }
        None => {
            CallDeadline { answer_by: started + request_timeout, client_gives_up: started + request_timeout }
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct GrpcObservabilityLayer {
    request_timeout: Duration,
}

impl GrpcObservabilityLayer {
    /// `request_timeout` is REQUEST_TIMEOUT_SECONDS, the longest any call may take.
    pub fn new(request_timeout: Duration) -> Self {
        Self { request_timeout }
    }
}

impl<S> Layer<S> for GrpcObservabilityLayer {
    type Service = GrpcObservability<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcObservability { inner, request_timeout: self.request_timeout }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcObservability<S> {
    inner: S,
    request_timeout: Duration,
}

/// Counts and logs a call as handled exactly once: with the code its answer carries, or,
/// when the call is dropped unanswered (the client cancelled, or tonic's own
/// `grpc-timeout` timer won the race), as DEADLINE_EXCEEDED when the client's deadline
/// had (about) passed and CANCELLED before.
struct Handled {
    series: &'static GrpcSeries,
    started: Instant,
    deadline: CallDeadline,
    recorded: bool,
}

impl Handled {
    fn record(&mut self, code: Code) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        self.series.record_handled(code as usize, code_name(code), elapsed);
        let current = tracing::Span::current();
        current.record("rpc.grpc.status_code", code as i32);
        let elapsed_ms = elapsed.as_millis() as u64;
        if is_server_error(code) {
            current.record("otel.status_code", "ERROR");
        }
        if code == Code::Ok {
            tracing::debug!(grpc_code = code_name(code), elapsed_ms, "rpc finished");
        } else if is_client_error(code) {
            tracing::info!(grpc_code = code_name(code), elapsed_ms, "rpc refused");
        } else {
            tracing::warn!(grpc_code = code_name(code), elapsed_ms, "rpc failed");
        }
    }
}

impl Drop for Handled {
    fn drop(&mut self) {
        let code = if Instant::now() >= self.deadline.client_gives_up {
            Code::DeadlineExceeded
        } else {
            Code::Cancelled
        };
        self.record(code);
    }
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

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let series = series_of(request.uri().path());
        let (service, method, _) = classify(request.uri().path());
        let started = Instant::now();
        let deadline = call_deadline(request.headers(), started, self.request_timeout);
        request.extensions_mut().insert(RequestDeadline(deadline.answer_by));
        let span = server_span(service, method, request.headers());
        let caller = CallerIdentity::from_connection(request.extensions());
        span.record("caller", caller.name());
        request.extensions_mut().insert(caller);
        let grpc_content_type = is_grpc_content_type(request.headers());
        let handled = async move {
            series.record_started();
            let mut handled = Handled { series, started, deadline, recorded: false };
            if !grpc_content_type {
                handled.record(Code::InvalidArgument);
                return Ok(unsupported_media_type());
            }
            let call = AssertUnwindSafe(inner.call(request)).catch_unwind();
            let response = match tokio::time::timeout_at(deadline.answer_by, call).await {
                Ok(Ok(Ok(response))) => match Status::from_header_map(response.headers()) {
                    // A body that does not decode is answered before any message, as a
                    // trailers-only response: the status is in the headers.
                    Some(status) if is_decode_failure(&status) => {
                        Status::invalid_argument(format!("malformed request: {}", status.message()))
                            .into_http()
                    }
                    _ => response,
                },
                Ok(Ok(Err(error))) => {
                    tracing::warn!("rpc failed in the transport");
                    handled.record(Code::Unknown);
                    return Err(error);
                }
                Ok(Err(panic)) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|text| text.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".to_string());
                    tracing::error!(panic = %message, "handler panicked");
                    Status::internal("internal error").into_http()
                }
                Err(_) => Status::deadline_exceeded("deadline exceeded").into_http(),
            };
            // Unary errors travel as trailers-only responses, so the code is in the
            // headers; without a grpc-status header the call succeeded.
            let code = Status::from_header_map(response.headers()).map_or(Code::Ok, |status| status.code());
            handled.record(code);
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

/// Codes that refuse what the caller sent; logged at info (the caller's business).
fn is_client_error(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated
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
    if span.is_disabled() {
        // Neither logged nor exported (LOG_LEVEL above info): no trace to join or name.
        return span;
    }
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
    fn grpc_timeout_values_parse_as_the_spec_says() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7_200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for invalid in ["", "S", "5", "5s", "123456789S", "-5S", "5 S"] {
            assert_eq!(parse_grpc_timeout(invalid), None, "{invalid:?}");
        }
    }

    #[test]
    fn the_deadline_is_the_sooner_of_the_client_timeout_and_the_request_timeout() {
        let started = Instant::now();
        let seconds = Duration::from_secs;
        let mut headers = http::HeaderMap::new();
        let server_only = call_deadline(&headers, started, seconds(10));
        assert_eq!(server_only.answer_by, started + seconds(10));
        assert_eq!(server_only.client_gives_up, started + seconds(10));
        headers.insert("grpc-timeout", http::HeaderValue::from_static("2S"));
        let client = call_deadline(&headers, started, seconds(10));
        assert_eq!(client.answer_by, started + seconds(2) - CLIENT_DEADLINE_MARGIN);
        assert_eq!(client.client_gives_up, started + seconds(2) - CLIENT_DEADLINE_ALLOWANCE);
        assert_eq!(call_deadline(&headers, started, seconds(1)).answer_by, started + seconds(1));
        headers.insert("grpc-timeout", http::HeaderValue::from_static("50m"));
        let short = call_deadline(&headers, started, seconds(10));
        assert_eq!(short.answer_by, started + Duration::from_millis(45), "the margin is at most a tenth");
        assert_eq!(short.client_gives_up, started);
    }

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
