//! Observability as operators see it: exact metric values, promtool's lint, a real
//! Prometheus scraping the admin port, OTLP traces joined to the caller's trace, log lines
//! carrying the trace id, readiness flips, and self-tracking.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use analytics_service::pb;
use analytics_service::telemetry;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::metadata::MetadataValue;
use tonic::Code;

use crate::helpers::{
    closed_port, create_database, http_get, metric_value, postgres_host, postgres_port, spawn_app_with,
    start_server, string_value, test_config, CapturedLogs, TestOptions,
};
use crate::proxy::TcpProxy;
use analytics_service::repository::postgres::{connect_options, schema};

fn track(name: &str, user: &str) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: name.into(),
        user_id: user.into(),
        properties: HashMap::new(),
        timestamp: 0,
        insert_id: String::new(),
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
}

#[tokio::test]
async fn metrics_count_every_method_and_code_exactly() {
    let app = spawn_app_with(TestOptions {
        env: env(&[("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE", "2")]),
        ..TestOptions::default()
    })
    .await;
    let mut client = app.client.clone();
    client.track_event(track("view", "alice")).await.unwrap();
    client.track_event(track("view", "alice")).await.unwrap();
    let limited = client.track_event(track("view", "alice")).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    let retry_after: u64 = limited.metadata().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "retry-after {retry_after}");
    let invalid = client.track_event(track("", "bob")).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    client.get_user_count(pb::GetUserCountRequest { start_time: 0, end_time: 0 }).await.unwrap();
    // An unknown method must not create a series of its own.
    let mut raw = tonic::client::Grpc::new(crate::helpers::channel(app.grpc_address).await);
    raw.ready().await.unwrap();
    let unknown = raw
        .unary::<pb::HealthCheckRequest, pb::HealthCheckResponse, _>(
            tonic::Request::new(pb::HealthCheckRequest {}),
            http::uri::PathAndQuery::from_static("/analytics.v1.AnalyticsService/NoSuchMethod"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented);

    let (status, metrics) = app.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let labels = |method: &str| {
        format!("grpc_service=\"analytics.v1.AnalyticsService\",grpc_method=\"{method}\",grpc_type=\"unary\"")
    };
    let handled = |method: &str, code: &str| {
        metric_value(
            &metrics,
            &format!("grpc_server_handled_total{{{},grpc_code=\"{code}\"}}", labels(method)),
        )
    };
    assert_eq!(
        metric_value(&metrics, &format!("grpc_server_started_total{{{}}}", labels("TrackEvent"))),
        4.0
    );
    assert_eq!(handled("TrackEvent", "OK"), 2.0, "{metrics}");
    assert_eq!(handled("TrackEvent", "ResourceExhausted"), 1.0);
    assert_eq!(handled("TrackEvent", "InvalidArgument"), 1.0);
    assert_eq!(handled("GetUserCount", "OK"), 1.0);
    assert_eq!(
        metric_value(&metrics, &format!("grpc_server_handling_seconds_count{{{}}}", labels("TrackEvent"))),
        4.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "grpc_server_handled_total{grpc_service=\"unknown\",grpc_method=\"unknown\",grpc_type=\"unknown\",grpc_code=\"Unimplemented\"}"
        ),
        1.0
    );
    assert!(!metrics.contains("NoSuchMethod"), "unknown methods never become label values");
    assert_eq!(metric_value(&metrics, "analytics_events_ingested_total"), 2.0);
    assert_eq!(metric_value(&metrics, "analytics_events_rejected_total{reason=\"rate_limited\"}"), 1.0);
    assert_eq!(metric_value(&metrics, "analytics_events_rejected_total{reason=\"invalid_argument\"}"), 1.0);
    assert_eq!(metric_value(&metrics, "analytics_rate_limited_total"), 1.0);
    assert_eq!(metric_value(&metrics, "analytics_ready"), 1.0);
    assert_eq!(metric_value(&metrics, "analytics_database_up"), 1.0);
    assert!(metrics.contains("analytics_build_info{version=\"0.1.0\""), "{metrics}");
    assert!(
        metrics.contains("grpc_server_handling_seconds_bucket{"),
        "latency is a histogram, not a summary"
    );

    // promtool's linter: no problems reported.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/install-tools.sh installs Debian's prometheus)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), metrics.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && report.trim().is_empty(), "promtool check metrics: {report}");
}

/// Kills the child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_admin_port() {
    let app = spawn_app_with(TestOptions::default()).await;
    app.client.clone().track_event(track("view", "alice")).await.unwrap();

    let directory = std::env::temp_dir().join(format!("prometheus-test-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&directory).unwrap();
    let config = directory.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: analytics-service\n    static_configs:\n      - targets: ['{}']\n",
            app.admin_address
        ),
    )
    .unwrap();
    let web_port = closed_port();
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", directory.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed (Debian's prometheus package, scripts/install-tools.sh)");
    let _prometheus = ChildGuard(prometheus);

    let web: SocketAddr = format!("127.0.0.1:{web_port}").parse().unwrap();
    let query = url_encode(
        "grpc_server_handled_total{job=\"analytics-service\",grpc_method=\"TrackEvent\",grpc_code=\"OK\"}",
    );
    let mut last = String::new();
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if tokio::net::TcpStream::connect(web).await.is_err() {
            continue;
        }
        let (status, body) = http_get(web, &format!("/api/v1/query?query={query}")).await;
        last = body.clone();
        if status != 200 {
            continue;
        }
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        if let Some(sample) = answer["data"]["result"].as_array().and_then(|result| result.first()) {
            assert_eq!(sample["value"][1], "1", "{body}");
            std::fs::remove_dir_all(&directory).ok();
            return;
        }
    }
    panic!("prometheus never returned the request count; last answer: {last}");
}

/// An OTLP/gRPC trace receiver that keeps every span it is sent.
#[derive(Clone, Default)]
struct SpanCollector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for SpanCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes.iter().find(|attribute| attribute.key == key).and_then(|attribute| {
        match attribute.value.as_ref()?.value.as_ref()? {
            Value::StringValue(text) => Some(text.clone()),
            Value::IntValue(number) => Some(number.to_string()),
            other => Some(format!("{other:?}")),
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_join_the_callers_trace_and_logs_carry_its_id() {
    let collector = SpanCollector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let endpoint = format!("http://{collector_address}");
    let options = TestOptions {
        env: env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("LOG_FORMAT", "json"),
            ("LOG_LEVEL", "info"),
        ]),
        ..TestOptions::default()
    };
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let telemetry_guard =
        telemetry::init_with_writer(&test_config("unused", "unused", &options).telemetry, move || {
            writer.clone()
        })
        .unwrap();
    let app = spawn_app_with(options).await;

    let caller_trace_id = "0af7651916cd43dd8448eb211c80319c";
    let caller_span_id = "b7ad6b7169203331";
    let traceparent = format!("00-{caller_trace_id}-{caller_span_id}-01");
    let mut request = tonic::Request::new(track("traced_view", "alice"));
    request.metadata_mut().insert("traceparent", MetadataValue::try_from(traceparent.as_str()).unwrap());
    app.client.clone().track_event(request).await.unwrap();
    let mut identify = tonic::Request::new(pb::IdentifyUserRequest {
        user_id: "alice".into(),
        properties: HashMap::from([("plan".to_string(), string_value("pro"))]),
    });
    identify.metadata_mut().insert("traceparent", MetadataValue::try_from(traceparent.as_str()).unwrap());
    app.client.clone().identify_user(identify).await.unwrap();

    let mut spans = Vec::new();
    for _ in 0..50 {
        telemetry_guard.flush();
        spans = collector.0.lock().unwrap().clone();
        if spans.iter().any(|span| span.name == "insert_events") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server =
        spans.iter().find(|span| span.name == "analytics.v1.AnalyticsService/TrackEvent").unwrap_or_else(
            || panic!("no server span among {:?}", spans.iter().map(|span| &span.name).collect::<Vec<_>>()),
        );
    assert_eq!(hex(&server.trace_id), caller_trace_id, "the server span joins the caller's trace");
    assert_eq!(hex(&server.parent_span_id), caller_span_id, "its parent is the caller's span");
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attribute(server, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attribute(server, "rpc.service").as_deref(), Some("analytics.v1.AnalyticsService"));
    assert_eq!(attribute(server, "rpc.method").as_deref(), Some("TrackEvent"));
    assert_eq!(attribute(server, "rpc.grpc.status_code").as_deref(), Some("0"));

    let database = spans.iter().find(|span| span.name == "insert_events").expect("a database child span");
    assert_eq!(hex(&database.trace_id), caller_trace_id);
    assert_eq!(database.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(attribute(database, "db.system").as_deref(), Some("postgresql"));

    let audit = logs
        .json_lines()
        .into_iter()
        .find(|line| line["target"] == "audit")
        .expect("the audit line of IdentifyUser");
    let trace_ids: Vec<&str> =
        audit["spans"].as_array().unwrap().iter().filter_map(|span| span["trace_id"].as_str()).collect();
    assert_eq!(trace_ids, vec![caller_trace_id], "log lines inside a request carry its trace id: {audit}");
}

#[tokio::test]
async fn readyz_follows_postgresql_and_livez_stays_up() {
    let database = create_database().await;
    let target: SocketAddr = format!("{}:{}", postgres_host(), postgres_port()).parse().unwrap();
    let proxy = TcpProxy::start(target).await;
    let redis_prefix = format!("test:{}", uuid::Uuid::now_v7().simple());
    let options = TestOptions {
        env: env(&[
            ("POSTGRES_PORT", &proxy.address.port().to_string()),
            ("POSTGRES_ACQUIRE_TIMEOUT_MS", "300"),
            ("READINESS_REQUIRES_DATABASE", "true"),
        ]),
        ..TestOptions::default()
    };
    let config = test_config(&database, &redis_prefix, &options);
    schema::migrate(&connect_options(&config)).await.unwrap();
    let app = start_server(config, database, redis_prefix).await;
    app.wait_for_readyz(200).await;

    proxy.cut();
    app.wait_for_readyz(503).await;
    let (_, body) = app.admin_get("/readyz").await;
    assert!(body.contains("postgresql unreachable"), "{body}");
    assert_eq!(app.admin_get("/livez").await.0, 200);
    let status = app.client.clone().track_event(track("view", "alice")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    proxy.restore();
    app.wait_for_readyz(200).await;
    app.client.clone().track_event(track("view", "alice")).await.expect("recovers without a restart");
}

#[tokio::test]
async fn the_service_tracks_its_own_lifecycle() {
    let mut app =
        spawn_app_with(TestOptions { env: env(&[("SELF_TRACKING", "true")]), ..TestOptions::default() })
            .await;
    let pool = app.pool.clone();
    let count = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM events WHERE event_name = $1 AND user_id IS NULL",
            )
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    for _ in 0..100 {
        if count("analytics_service.started").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count("analytics_service.started").await, 1);

    // It shows up in the service's own counts.
    let totals = app
        .client
        .clone()
        .get_event_count(pb::GetEventCountRequest {
            event_name: "analytics_service.started".into(),
            start_time: crate::helpers::now() - 60,
            end_time: crate::helpers::now() + 60,
            group_by: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .counts;
    assert_eq!(totals.len(), 1);
    assert_eq!(totals[0].count, 1);

    app.signal_shutdown();
    app.wait_stopped().await.unwrap();
    assert_eq!(count("analytics_service.stopping").await, 1, "stopping is committed before the pool closes");
}
