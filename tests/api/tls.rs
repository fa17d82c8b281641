//! mTLS on the gRPC port: client certificates are required and checked, certificate
//! files are reloaded without a restart, caller allow-lists, the audit record, and the
//! `healthcheck` verb and grpcurl against the TLS port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use analytics_service::telemetry;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

use crate::certs::{CertDir, Leaf, TestCa};
use crate::helpers::{
    metric_value, spawn_app_with, string_value, test_config, CapturedLogs, TestApp, TestOptions,
};

const BINARY: &str = env!("CARGO_BIN_EXE_analytics-service");
const GATEWAY: &str = "spiffe://analytics.test/ns/prod/sa/graphql-gateway";
const WEB: &str = "spiffe://analytics.test/ns/prod/sa/web";
const INTRUDER: &str = "spiffe://analytics.test/ns/prod/sa/intruder";

/// One server CA, one client CA, the server files written, the server running.
struct TlsSetup {
    server_ca: TestCa,
    client_ca: TestCa,
    dir: CertDir,
    app: TestApp,
}

async fn spawn_tls_app(extra_env: &[(&str, &str)]) -> TlsSetup {
    let server_ca = TestCa::new("server ca");
    let client_ca = TestCa::new("client ca");
    let dir = CertDir::new();
    dir.write_server(&server_ca.server("server one"), &client_ca.pem());
    let mut env = dir.server_env();
    env.extend(extra_env.iter().map(|(key, value)| (key.to_string(), value.to_string())));
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    TlsSetup { server_ca, client_ca, dir, app }
}

/// Connects over TLS trusting `server_ca_pem`, presenting `client` when given.
async fn tls_channel(
    address: SocketAddr,
    server_ca_pem: &str,
    client: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(server_ca_pem)).domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.certificate_pem, &client.key_pem));
    }
    Channel::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)?
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A HealthCheck RPC over a fresh TLS connection: Ok, or the error as text.
async fn health_over_tls(
    address: SocketAddr,
    server_ca_pem: &str,
    client: Option<&Leaf>,
) -> Result<(), String> {
    let channel = tls_channel(address, server_ca_pem, client).await.map_err(|error| format!("{error:?}"))?;
    AnalyticsServiceClient::new(channel)
        .health_check(pb::HealthCheckRequest {})
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

fn event(user: &str) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: "tls_click".into(),
        user_id: user.into(),
        properties: HashMap::new(),
        timestamp: 0,
        insert_id: String::new(),
    }
}

#[tokio::test]
async fn only_clients_with_a_valid_certificate_from_the_client_ca_get_in() {
    let setup = spawn_tls_app(&[]).await;
    let address = setup.app.grpc_address;
    let server_ca = setup.server_ca.pem();

    let valid = setup.client_ca.client(WEB, "web.analytics.test");
    health_over_tls(address, &server_ca, Some(&valid)).await.expect("a valid client certificate works");
    let channel = tls_channel(address, &server_ca, Some(&valid)).await.unwrap();
    let stored =
        AnalyticsServiceClient::new(channel).track_event(event("tls-user")).await.unwrap().into_inner();
    assert!(stored.success);
    assert_eq!(setup.app.event_rows().await, 1);

    let refused_before = refused_handshakes(&setup.app).await;
    assert!(health_over_tls(address, &server_ca, None).await.is_err(), "no client certificate");
    let other_ca = TestCa::new("another ca");
    let foreign = other_ca.client(WEB, "web.analytics.test");
    assert!(health_over_tls(address, &server_ca, Some(&foreign)).await.is_err(), "certificate of another CA");
    let expired = setup.client_ca.expired_client(WEB);
    assert!(health_over_tls(address, &server_ca, Some(&expired)).await.is_err(), "expired certificate");
    // The three refusals happened in the server's TLS handshake, not later.
    assert_eq!(refused_handshakes(&setup.app).await - refused_before, 3.0);
    assert!(
        health_over_tls(address, &other_ca.pem(), Some(&valid)).await.is_err(),
        "the client does not trust a server certificate from another CA"
    );

    let plaintext = Channel::from_shared(format!("http://{address}")).unwrap().connect_lazy();
    let status =
        AnalyticsServiceClient::new(plaintext).health_check(pb::HealthCheckRequest {}).await.unwrap_err();
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown), "plaintext is refused: {status:?}");
    assert_eq!(setup.app.event_rows().await, 1, "nothing refused was stored");
}

async fn refused_handshakes(app: &TestApp) -> f64 {
    let (_, metrics) = app.admin_get("/metrics").await;
    metric_value(&metrics, "analytics_tls_handshakes_total{result=\"refused\"}")
}

/// Kubernetes mounts a Secret as `name -> ..data/name`, `..data -> ..<timestamp>/`, and
/// rotates it by swapping the `..data` symlink atomically.
fn write_secret_version(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let version_dir = dir.join(version);
    std::fs::create_dir_all(&version_dir).unwrap();
    for (name, contents) in files {
        std::fs::write(version_dir.join(name), contents).unwrap();
    }
    let staging = dir.join("..data_tmp");
    std::fs::remove_file(&staging).ok();
    std::os::unix::fs::symlink(version, &staging).unwrap();
    std::fs::rename(&staging, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[tokio::test]
async fn rotated_files_are_served_to_new_connections_while_old_ones_keep_working() {
    let first_server_ca = TestCa::new("server ca 1");
    let first_client_ca = TestCa::new("client ca 1");
    let dir = CertDir::new();
    let first_server = first_server_ca.server("server one");
    write_secret_version(
        &dir.path,
        "..2026_11_27_first",
        &[
            ("tls.crt", &first_server.certificate_pem),
            ("tls.key", &first_server.key_pem),
            ("ca.crt", &first_client_ca.pem()),
        ],
    );
    let app = spawn_app_with(TestOptions { env: dir.server_env(), ..TestOptions::default() }).await;
    let address = app.grpc_address;
    let first_client = first_client_ca.client(WEB, "web.analytics.test");

    let established = tls_channel(address, &first_server_ca.pem(), Some(&first_client)).await.unwrap();
    let mut established_client = AnalyticsServiceClient::new(established);
    established_client.track_event(event("before-rotation")).await.unwrap();

    // cert-manager renews: new server certificate (from a new CA) and a new client CA.
    let second_server_ca = TestCa::new("server ca 2");
    let second_client_ca = TestCa::new("client ca 2");
    let second_server = second_server_ca.server("server two");
    write_secret_version(
        &dir.path,
        "..2026_11_27_second",
        &[
            ("tls.crt", &second_server.certificate_pem),
            ("tls.key", &second_server.key_pem),
            ("ca.crt", &second_client_ca.pem()),
        ],
    );
    let second_client = second_client_ca.client(WEB, "web.analytics.test");
    let mut rotated = false;
    for _ in 0..100 {
        if health_over_tls(address, &second_server_ca.pem(), Some(&second_client)).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "new connections see the new certificate and CA without a restart");
    assert!(
        health_over_tls(address, &first_server_ca.pem(), Some(&first_client)).await.is_err(),
        "new connections no longer get the old certificate"
    );
    assert!(
        health_over_tls(address, &second_server_ca.pem(), Some(&first_client)).await.is_err(),
        "client certificates of the old CA are refused on new connections"
    );

    // The connection made before the rotation trusts only the first server CA: it can
    // only still work because it kept its TLS session.
    for user in ["after-rotation-1", "after-rotation-2"] {
        established_client.track_event(event(user)).await.expect("the established connection keeps working");
    }
    assert_eq!(app.event_rows().await, 3);
}

#[tokio::test]
async fn invalid_files_at_rotation_keep_the_current_certificates() {
    let setup = spawn_tls_app(&[]).await;
    let client = setup.client_ca.client(WEB, "web.analytics.test");
    setup.dir.write("tls.crt", "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    for _ in 0..50 {
        let (_, metrics) = setup.app.admin_get("/metrics").await;
        if metric_value(&metrics, "analytics_tls_reloads_total{result=\"invalid\"}") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = setup.app.admin_get("/metrics").await;
    assert!(metric_value(&metrics, "analytics_tls_reloads_total{result=\"invalid\"}") >= 1.0, "{metrics}");
    health_over_tls(setup.app.grpc_address, &setup.server_ca.pem(), Some(&client))
        .await
        .expect("the previous certificates keep serving");
}

#[tokio::test]
async fn callers_not_on_the_allow_list_get_permission_denied() {
    let setup = spawn_tls_app(&[
        ("TLS_ALLOWED_CALLERS", &format!("{GATEWAY},{WEB},reporting.analytics.test")),
        ("TLS_ALLOWED_CALLERS_PER_RPC", &format!("GetEventCount={GATEWAY};GetUserCount={GATEWAY}")),
    ])
    .await;
    let address = setup.app.grpc_address;
    let server_ca = setup.server_ca.pem();
    let connect = |leaf: Leaf| {
        let server_ca = server_ca.clone();
        async move { AnalyticsServiceClient::new(tls_channel(address, &server_ca, Some(&leaf)).await.unwrap()) }
    };
    let mut gateway = connect(setup.client_ca.client(GATEWAY, "gateway.analytics.test")).await;
    let mut web = connect(setup.client_ca.client(WEB, "web.analytics.test")).await;
    let mut intruder = connect(setup.client_ca.client(INTRUDER, "intruder.analytics.test")).await;
    // Without a SPIFFE id the DNS SAN is the identity.
    let mut reporting = connect(setup.client_ca.dns_only_client("reporting.analytics.test")).await;

    let counts = pb::GetEventCountRequest {
        event_name: String::new(),
        start_time: 0,
        end_time: 0,
        group_by: String::new(),
        time_zone: String::new(),
    };
    let denied = web.get_event_count(counts.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(denied.message(), "caller not allowed");
    let denied =
        web.get_user_count(pb::GetUserCountRequest { start_time: 0, end_time: 0 }).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    web.track_event(event("web-user")).await.expect("web may track events");
    web.identify_user(pb::IdentifyUserRequest { user_id: "web-user".into(), properties: HashMap::new() })
        .await
        .expect("web may identify users");
    reporting.track_event(event("reporting-user")).await.expect("a DNS SAN identity on the list");

    gateway.get_event_count(counts.clone()).await.expect("the gateway may read counts");
    gateway.get_user_count(pb::GetUserCountRequest { start_time: 0, end_time: 0 }).await.unwrap();

    let denied = intruder.track_event(event("intruder-user")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "not on the global list");
    assert_eq!(setup.app.event_rows().await, 2, "the refused event was not stored");

    let (_, metrics) = setup.app.admin_get("/metrics").await;
    assert_eq!(metric_value(&metrics, "analytics_permission_denied_total{method=\"GetEventCount\"}"), 1.0);
    assert_eq!(metric_value(&metrics, "analytics_permission_denied_total{method=\"TrackEvent\"}"), 1.0);
}

/// The services listed by server reflection v1 over `channel`, or the refusal.
async fn reflection_list(channel: Channel) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    match responses.message().await?.and_then(|response| response.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|service| service.name).collect())
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// Whether grpc.health.v1 answers SERVING over `channel`.
async fn standard_health_serving(channel: Channel) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let response =
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    response.into_inner().status == ServingStatus::Serving as i32
}

#[tokio::test]
async fn reflection_follows_the_allow_list_unless_opened_and_health_answers_every_verified_caller() {
    for (cover_reflection, intruder_may_reflect) in [(None, false), (Some("false"), true)] {
        let mut env = vec![("TLS_ALLOWED_CALLERS", GATEWAY)];
        if let Some(value) = cover_reflection {
            env.push(("TLS_ALLOWED_CALLERS_COVER_REFLECTION", value));
        }
        let setup = spawn_tls_app(&env).await;
        let address = setup.app.grpc_address;
        let server_ca = setup.server_ca.pem();
        let gateway = setup.client_ca.client(GATEWAY, "gateway.analytics.test");
        let intruder = setup.client_ca.client(INTRUDER, "intruder.analytics.test");

        let listed =
            reflection_list(tls_channel(address, &server_ca, Some(&gateway)).await.unwrap()).await.unwrap();
        assert!(listed.iter().any(|name| name == "analytics.v1.AnalyticsService"), "{listed:?}");
        let intruder_listed =
            reflection_list(tls_channel(address, &server_ca, Some(&intruder)).await.unwrap()).await;
        if intruder_may_reflect {
            assert!(intruder_listed.is_ok(), "{cover_reflection:?}: {intruder_listed:?}");
        } else {
            let status = intruder_listed.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            let (_, metrics) = setup.app.admin_get("/metrics").await;
            assert_eq!(
                metric_value(&metrics, "analytics_permission_denied_total{method=\"ServerReflectionInfo\"}"),
                1.0
            );
        }
        // Probes and `healthcheck` work with any certificate the client CA signed.
        assert!(
            standard_health_serving(tls_channel(address, &server_ca, Some(&intruder)).await.unwrap()).await
        );
        let denied =
            AnalyticsServiceClient::new(tls_channel(address, &server_ca, Some(&intruder)).await.unwrap())
                .track_event(event("intruder-user"))
                .await
                .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
    }
}

#[tokio::test]
async fn two_callers_sending_the_same_insert_id_for_the_same_user_both_get_stored() {
    let setup = spawn_tls_app(&[]).await;
    let address = setup.app.grpc_address;
    let server_ca = setup.server_ca.pem();
    let connect = |leaf: Leaf| {
        let server_ca = server_ca.clone();
        async move { AnalyticsServiceClient::new(tls_channel(address, &server_ca, Some(&leaf)).await.unwrap()) }
    };
    let mut web = connect(setup.client_ca.client(WEB, "web.analytics.test")).await;
    let mut gateway = connect(setup.client_ca.client(GATEWAY, "gateway.analytics.test")).await;
    let keyed = || pb::TrackEventRequest { insert_id: "order-42".into(), ..event("alice") };

    let from_web = web.track_event(keyed()).await.unwrap().into_inner().event_id;
    let from_gateway = gateway.track_event(keyed()).await.unwrap().into_inner().event_id;
    assert_ne!(from_web, from_gateway, "one caller's key never suppresses another caller's event");
    let retried = web.track_event(keyed()).await.unwrap().into_inner().event_id;
    assert_eq!(retried, from_web, "a caller's own retry is still deduplicated");
    assert_eq!(setup.app.event_rows().await, 2);
    let scopes: Vec<String> = sqlx::query_scalar("SELECT scope FROM event_insert_ids ORDER BY scope")
        .fetch_all(&setup.app.pool)
        .await
        .unwrap();
    assert_eq!(
        scopes,
        vec![GATEWAY.to_string(), WEB.to_string()],
        "keys are scoped by the verified identity"
    );
}

#[tokio::test]
async fn identify_user_writes_an_audit_record_with_the_caller_identity_and_no_values() {
    let options = TestOptions {
        env: vec![("LOG_FORMAT".into(), "json".into()), ("LOG_LEVEL".into(), "info".into())],
        ..TestOptions::default()
    };
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let _telemetry =
        telemetry::init_with_writer(&test_config("unused", "unused", &options).telemetry, move || {
            writer.clone()
        })
        .unwrap();
    let setup = spawn_tls_app(&[("LOG_FORMAT", "json")]).await;
    let client = setup.client_ca.client(WEB, "web.analytics.test");
    let channel = tls_channel(setup.app.grpc_address, &setup.server_ca.pem(), Some(&client)).await.unwrap();
    AnalyticsServiceClient::new(channel)
        .identify_user(pb::IdentifyUserRequest {
            user_id: "audited-user".into(),
            properties: HashMap::from([
                ("email".to_string(), string_value("audited@example.com")),
                ("plan".to_string(), string_value("secret-plan-value")),
            ]),
        })
        .await
        .unwrap();

    let output = logs.text();
    let audit = logs.json_lines().into_iter().find(|line| line["target"] == "audit").expect("an audit line");
    // The JSON format flattens the event's fields into the line.
    let fields = &audit;
    assert_eq!(fields["user_id"], "audited-user", "{audit}");
    assert_eq!(fields["caller"], WEB, "{audit}");
    assert_eq!(fields["outcome"], "ok", "{audit}");
    assert_eq!(fields["action"], "identify_user", "{audit}");
    assert!(fields["timestamp"].as_str().is_some_and(|time| time.starts_with("20")), "{audit}");
    assert_eq!(output.matches("\"timestamp\"").count(), output.lines().count(), "one timestamp key per line");
    assert!(
        !output.contains("audited@example.com") && !output.contains("secret-plan-value"),
        "values never logged"
    );
    let span_callers: Vec<&str> =
        audit["spans"].as_array().unwrap().iter().filter_map(|span| span["caller"].as_str()).collect();
    assert!(span_callers.contains(&WEB), "the server span carries the caller: {audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_healthcheck_verb_and_grpcurl_work_with_client_certificates() {
    let setup = spawn_tls_app(&[]).await;
    let ca_path = setup.dir.write("server-ca.crt", &setup.server_ca.pem());
    let (cert_path, key_path) =
        setup.dir.write_client("client", &setup.client_ca.client(WEB, "web.analytics.test"));
    let address = format!("localhost:{}", setup.app.grpc_address.port());
    let path = |path: &Path| path.display().to_string();

    let healthy = Command::new(BINARY)
        .args(["healthcheck", "--addr", &address, "--tls-ca-file", &path(&ca_path)])
        .args(["--tls-cert-file", &path(&cert_path), "--tls-key-file", &path(&key_path)])
        .output()
        .unwrap();
    assert!(healthy.status.success(), "{}", String::from_utf8_lossy(&healthy.stderr));
    assert_eq!(String::from_utf8_lossy(&healthy.stdout).trim(), "SERVING");
    let without_certificate = Command::new(BINARY)
        .args(["healthcheck", "--addr", &address, "--tls-ca-file", &path(&ca_path), "--timeout-seconds", "3"])
        .output()
        .unwrap();
    assert!(!without_certificate.status.success(), "mTLS needs the client certificate");

    // scripts/install-tools.sh puts grpcurl in .tools/bin; otherwise it must be on PATH.
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/grpcurl");
    let grpcurl = if installed.exists() { installed } else { "grpcurl".into() };
    let listed = Command::new(&grpcurl)
        .args(["-cacert", &path(&ca_path), "-cert", &path(&cert_path), "-key", &path(&key_path)])
        .args([&address, "list"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("analytics.v1.AnalyticsService"));
    let refused =
        Command::new(&grpcurl).args(["-cacert", &path(&ca_path), &address, "list"]).output().unwrap();
    assert!(!refused.status.success(), "grpcurl without a client certificate is refused");
}
