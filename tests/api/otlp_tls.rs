//! Trace export to an OTLP collector over TLS, and the rule that tracing never stops the
//! service: spans reach an in-process `https://` collector with the configured headers;
//! a collector that is down or presents an untrusted certificate is counted
//! (`analytics_trace_export_failures_total`) while every call is still served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use analytics_service::telemetry::{self, TelemetryGuard};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::transport::{Identity, ServerTlsConfig};

use crate::certs::{CertDir, TestCa};
use crate::helpers::{
    closed_port, metric_value, spawn_app_with, test_config, track_request, wait_until, CapturedLogs, TestApp,
    TestOptions,
};

/// An OTLP/gRPC trace receiver keeping the span names and the headers of each export.
#[derive(Clone, Default)]
struct RecordingCollector {
    span_names: Arc<Mutex<Vec<String>>>,
    headers: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

#[tonic::async_trait]
impl TraceService for RecordingCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or_default().to_string()))
            .collect();
        self.headers.lock().unwrap().push(headers);
        let mut names = self.span_names.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                names.extend(scope.spans.into_iter().map(|span| span.name));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Starts a collector serving TLS with a certificate of `ca` for 127.0.0.1; its port.
async fn start_tls_collector(ca: &TestCa, collector: RecordingCollector) -> u16 {
    let server = ca.server("collector");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(server.certificate_pem, server.key_pem));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    port
}

/// Installs telemetry (logs captured) for `env`, then starts a server with it.
async fn traced_app(env: Vec<(String, String)>) -> (TestApp, TelemetryGuard, CapturedLogs) {
    let options = TestOptions { env, ..TestOptions::default() };
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let guard =
        telemetry::init_with_writer(&test_config("unused", "unused", &options).telemetry, move || {
            writer.clone()
        })
        .expect("telemetry never fails start-up because of the trace exporter");
    (spawn_app_with(options).await, guard, logs)
}

fn export_failures(metrics: &str, stage: &str) -> f64 {
    metric_value(metrics, &format!("analytics_trace_export_failures_total{{stage=\"{stage}\"}}"))
}

/// Flushes until at least one export failure is counted; the metrics text then.
async fn wait_for_export_failure(app: &TestApp, guard: &TelemetryGuard) -> String {
    let mut metrics = String::new();
    let counted = wait_until(Duration::from_secs(20), Duration::from_millis(100), async || {
        guard.flush();
        metrics = app.admin_get("/metrics").await.1;
        export_failures(&metrics, "export") >= 1.0
    })
    .await;
    assert!(counted, "no export failure counted: {metrics}");
    metrics
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_an_https_collector_with_the_configured_headers() {
    let ca = TestCa::new("collector ca");
    let files = CertDir::new();
    let ca_file = files.write("collector-ca.crt", &ca.pem()).display().to_string();
    let collector = RecordingCollector::default();
    let port = start_tls_collector(&ca, collector.clone()).await;
    let endpoint = format!("https://127.0.0.1:{port}");
    let (app, guard, _logs) = traced_app(env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_file),
        ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20t0ken,x-scope-orgid=tenant-1"),
    ]))
    .await;

    app.client.clone().track_event(track_request("view", "alice")).await.unwrap();
    let received = wait_until(Duration::from_secs(10), Duration::from_millis(100), async || {
        guard.flush();
        collector
            .span_names
            .lock()
            .unwrap()
            .iter()
            .any(|name| name == "analytics.v1.AnalyticsService/TrackEvent")
    })
    .await;
    assert!(received, "spans over https: {:?}", collector.span_names.lock().unwrap());
    let headers = collector.headers.lock().unwrap()[0].clone();
    assert_eq!(headers.get("authorization").map(String::as_str), Some("Bearer t0ken"), "{headers:?}");
    assert_eq!(headers.get("x-scope-orgid").map(String::as_str), Some("tenant-1"), "{headers:?}");
    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(export_failures(&metrics, "export"), 0.0, "{metrics}");
    assert_eq!(export_failures(&metrics, "setup"), 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_is_down_is_counted_and_the_service_serves() {
    let endpoint = format!("https://127.0.0.1:{}", closed_port());
    let (app, guard, logs) = traced_app(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)])).await;

    for user in ["alice", "bob"] {
        app.client.clone().track_event(track_request("view", user)).await.expect("calls are served");
    }
    wait_for_export_failure(&app, &guard).await;
    assert_eq!(app.event_rows().await, 2);
    assert_eq!(app.admin_get("/readyz").await.0, 200);
    app.client.clone().track_event(track_request("view", "carol")).await.expect("still served");
    assert!(logs.text().contains("trace export failed"), "the failure is logged: {}", logs.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_collector_certificate_is_counted_and_the_service_serves() {
    let collector_ca = TestCa::new("collector ca");
    let other_ca = TestCa::new("some other ca");
    let files = CertDir::new();
    let wrong_ca_file = files.write("other-ca.crt", &other_ca.pem()).display().to_string();
    let collector = RecordingCollector::default();
    let port = start_tls_collector(&collector_ca, collector.clone()).await;
    let endpoint = format!("https://127.0.0.1:{port}");
    let (app, guard, _logs) = traced_app(env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", &wrong_ca_file),
    ]))
    .await;

    app.client.clone().track_event(track_request("view", "alice")).await.expect("calls are served");
    wait_for_export_failure(&app, &guard).await;
    assert!(collector.span_names.lock().unwrap().is_empty(), "nothing reached the untrusted collector");
    app.client.clone().track_event(track_request("view", "bob")).await.expect("still served");
    assert_eq!(app.event_rows().await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exporter_that_cannot_be_built_is_counted_and_the_service_serves() {
    let (app, _guard, logs) = traced_app(env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:4317"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.crt"),
    ]))
    .await;
    app.client.clone().track_event(track_request("view", "alice")).await.expect("calls are served");
    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(export_failures(&metrics, "setup"), 1.0, "{metrics}");
    let text = logs.text();
    assert!(
        text.contains("trace export off") && text.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"),
        "the log names the variable: {text}"
    );
}
