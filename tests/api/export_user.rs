//! ExportUser (access requests): the identity then every event of one user, in time
//! order and decrypted, nothing of anyone else; streamed with bounded memory (a paused
//! client holds PostgreSQL back, a client that leaves frees the connection); every call
//! audited under the user's keyed hash only; and under mTLS only the callers of the
//! RPC's own allow-list entry get in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use analytics_service::pb;
use analytics_service::pb::analytics_admin_service_client::AnalyticsAdminServiceClient;
use analytics_service::pb::export_user_response::Item;
use analytics_service::security::subject::SubjectHasher;
use analytics_service::telemetry;
use base64::Engine as _;
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use uuid::Uuid;

use crate::certs::{CertDir, Leaf, TestCa};
use crate::helpers::{
    admin_env, bool_value, now, number_value, spawn_app_with, string_value, test_config, wait_until,
    CapturedLogs, TestApp, TestOptions,
};

const DAY: i64 = 86_400;

/// An admin-enabled server (plaintext, fresh suppression key) with `extra` variables;
/// the suppression key's path is returned too.
async fn spawn_admin_app(extra: &[(&str, &str)]) -> (TestApp, std::path::PathBuf) {
    let (mut env, key_file) = admin_env();
    env.extend(extra.iter().map(|(name, value)| (name.to_string(), value.to_string())));
    (spawn_app_with(TestOptions { env, ..TestOptions::default() }).await, key_file)
}

/// Every message of an export of `user_id`, or the status the call or stream ended with.
async fn export(app: &TestApp, user_id: &str) -> Result<Vec<Item>, tonic::Status> {
    export_over(app.admin_client(), user_id).await
}

async fn export_over(
    mut client: AnalyticsAdminServiceClient<Channel>,
    user_id: &str,
) -> Result<Vec<Item>, tonic::Status> {
    let mut stream =
        client.export_user(pb::ExportUserRequest { user_id: user_id.into() }).await?.into_inner();
    let mut items = Vec::new();
    while let Some(message) = stream.next().await {
        items.push(message?.item.expect("every message carries an item"));
    }
    Ok(items)
}

fn events_of(items: &[Item]) -> Vec<&pb::ExportedEvent> {
    items
        .iter()
        .map(|item| match item {
            Item::Event(event) => event,
            Item::Identity(_) => panic!("the identity comes first, once: {items:?}"),
        })
        .collect()
}

fn subject_hash(key_file: &std::path::Path, user_id: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(key_file).unwrap();
    SubjectHasher::parse(&text, "SUPPRESSION_KEY_FILE").unwrap().hash(user_id).as_bytes().to_vec()
}

/// A `KEY_ID:BASE64_32_BYTE_KEY` line of PII_KEYS_FILE.
fn pii_key_line(key_id: &str) -> String {
    let key: [u8; 32] = rand::random();
    format!("{key_id}:{}", base64::engine::general_purpose::STANDARD.encode(key))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_export_is_the_identity_then_every_event_in_time_order_decrypted() {
    let keys = CertDir::new();
    let pii_keys = keys.write("pii.keys", &format!("{}\n", pii_key_line("k1"))).display().to_string();
    let (app, _) = spawn_admin_app(&[
        ("PII_KEYS_FILE", &pii_keys),
        ("PII_FIELDS", "email,phone"),
        ("EVENT_MAX_AGE_DAYS", "100"),
    ])
    .await;

    let identity_properties = HashMap::from([
        ("email".to_string(), string_value("ada@example.com")),
        ("plan".to_string(), string_value("pro")),
        ("seats".to_string(), number_value(12.0)),
    ]);
    let identified_from = now();
    app.client
        .clone()
        .identify_user(pb::IdentifyUserRequest {
            user_id: "ada".into(),
            properties: identity_properties.clone(),
        })
        .await
        .unwrap();
    let identified_until = now();

    // Four calendar months (the partitions reach three months back), sent out of order,
    // two events in the same second (ordered by id then).
    let base = now();
    let mut tracked = Vec::new();
    for (index, age_seconds) in
        [31 * DAY, 85 * DAY, 3600, 58 * DAY, 2 * DAY, 2 * DAY, 0].into_iter().enumerate()
    {
        let properties = HashMap::from([
            ("email".to_string(), string_value(&format!("ada+{index}@example.com"))),
            ("phone".to_string(), number_value(4_420_794_600.0 + index as f64)),
            ("step".to_string(), number_value(index as f64)),
            ("paid".to_string(), bool_value(index % 2 == 0)),
        ]);
        let name = format!("step_{index}");
        let timestamp = base - age_seconds;
        let response = app
            .client
            .clone()
            .track_event(pb::TrackEventRequest {
                event_name: name.clone(),
                user_id: "ada".into(),
                properties: properties.clone(),
                timestamp,
                insert_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        tracked.push(pb::ExportedEvent {
            event_id: response.event_id,
            event_name: name,
            timestamp,
            properties,
        });
    }
    // Someone else's events and an anonymous one, in the same months.
    for age_seconds in [85 * DAY, 2 * DAY, 0] {
        app.track("other", "grace", base - age_seconds).await;
        app.track("anonymous", "", base - age_seconds).await;
    }
    let stored_email: serde_json::Value =
        sqlx::query_scalar("SELECT properties->'email' FROM events WHERE user_id = 'ada' LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(stored_email.as_str().unwrap().starts_with("enc:v1:k1:"), "stored encrypted: {stored_email}");
    let partitions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT tableoid) FROM events WHERE user_id = 'ada'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(partitions >= 3, "the events span {partitions} monthly partitions");

    let items = export(&app, "ada").await.expect("the export succeeds");
    let Some(Item::Identity(identity)) = items.first() else { panic!("the identity comes first: {items:?}") };
    assert_eq!(identity.user_id, "ada");
    assert_eq!(identity.properties, identity_properties, "decrypted, as sent");
    assert!((identified_from..=identified_until).contains(&identity.first_seen), "{identity:?}");
    assert!((identified_from..=identified_until).contains(&identity.last_seen), "{identity:?}");

    tracked.sort_by_key(|event| (event.timestamp, Uuid::parse_str(&event.event_id).unwrap()));
    let exported: Vec<pb::ExportedEvent> = events_of(&items[1..]).into_iter().cloned().collect();
    assert_eq!(exported, tracked, "every event of the user, by (timestamp, id), decrypted");

    let grace = export(&app, "grace").await.unwrap();
    assert_eq!(events_of(&grace).len(), 3, "no identity: events only");
    assert!(events_of(&grace).iter().all(|event| event.event_name == "other"));

    assert!(export(&app, "nobody").await.unwrap().is_empty(), "a user without data: an empty stream");

    for invalid in ["", "bad\u{7}id", &"x".repeat(256)] {
        let status = export(&app, invalid).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{invalid:?}");
        assert!(status.message().starts_with("user_id"), "{status:?}");
    }
}

/// Inserts `count` events of `user_id` straight into `events` (the API is rate
/// limited), one a minute back from now, each with `padding_bytes` of padding; property
/// `n` is 1 for the newest and `count` for the oldest.
async fn insert_events(app: &TestApp, user_id: &str, count: i32, padding_bytes: i32) {
    sqlx::query(
        "INSERT INTO events (id, event_name, user_id, properties, timestamp)
         SELECT gen_random_uuid(), 'bulk_' || (n % 7), $1,
                jsonb_build_object('n', n, 'padding', repeat('x', $3)), now() - make_interval(mins => n)
         FROM generate_series(1, $2) AS n",
    )
    .bind(user_id)
    .bind(count)
    .bind(padding_bytes)
    .execute(&app.pool)
    .await
    .unwrap();
}

/// The service's backends in the test database whose latest statement is the export's
/// event query, with their state and wait event.
async fn export_backends(app: &TestApp) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT state, wait_event FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND query LIKE 'SELECT id, event_name, timestamp, properties FROM events WHERE user_id%'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_events_export_completely_and_in_order() {
    let (app, _) = spawn_admin_app(&[]).await;
    insert_events(&app, "whale", 20_000, 16).await;
    app.track("small", "minnow", 0).await;

    let items = export(&app, "whale").await.expect("the export succeeds");
    let events = events_of(&items);
    assert_eq!(events.len(), 20_000);
    let steps: Vec<f64> = events
        .iter()
        .map(|event| match event.properties["n"].value {
            Some(pb::property_value::Value::NumberValue(n)) => n,
            ref other => panic!("n is a number: {other:?}"),
        })
        .collect();
    let expected: Vec<f64> = (1..=20_000).rev().map(f64::from).collect();
    assert_eq!(steps, expected, "oldest first");
    assert!(events.windows(2).all(|pair| pair[0].timestamp <= pair[1].timestamp));

    // The connection went back to the pool, idle: the next calls are served.
    assert_eq!(events_of(&export(&app, "minnow").await.unwrap()).len(), 1);
    let backends = export_backends(&app).await;
    assert!(backends.iter().all(|(state, _)| state == "idle"), "{backends:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_client_holds_the_query_back_and_a_client_that_leaves_frees_the_connection() {
    let (mut app, _) = spawn_admin_app(&[]).await;
    // About 20 MB of rows: far more than the channel and the socket buffers hold.
    insert_events(&app, "whale", 20_000, 1_000).await;

    let mut stream = app
        .admin_client()
        .export_user(pb::ExportUserRequest { user_id: "whale".into() })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        assert!(matches!(
            stream.next().await,
            Some(Ok(pb::ExportUserResponse { item: Some(Item::Event(_)) }))
        ));
    }
    // The client reads no further: PostgreSQL waits to write the rest (nothing loads
    // the whole result).
    let held_back = wait_until(Duration::from_secs(10), Duration::from_millis(50), async || {
        export_backends(&app).await == [("active".to_string(), Some("ClientWrite".to_string()))]
    })
    .await;
    assert!(held_back, "the query waits for the client: {:?}", export_backends(&app).await);

    drop(stream);
    // The connection is closed, not drained of the remaining rows and returned to the
    // pool: the query never completes (its backend is never seen idle), its backend ends.
    let mut seen_states = Vec::new();
    let released = wait_until(Duration::from_secs(10), Duration::from_millis(10), async || {
        let backends = export_backends(&app).await;
        seen_states.extend(backends.iter().map(|(state, _)| state.clone()));
        backends.is_empty()
    })
    .await;
    assert!(released, "the export's connection is closed: {:?}", export_backends(&app).await);
    assert!(seen_states.iter().all(|state| state == "active"), "never drained: {seen_states:?}");
    let cancelled = wait_until(Duration::from_secs(5), Duration::from_millis(50), async || {
        let outcomes: Vec<String> =
            sqlx::query_scalar("SELECT outcome FROM admin_audit WHERE rpc = 'ExportUser'")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        outcomes == ["CANCELLED"]
    })
    .await;
    assert!(cancelled, "the abandoned export is audited as CANCELLED");

    // The pool serves the next export in full, and the server stops cleanly.
    assert_eq!(events_of(&export(&app, "whale").await.unwrap()).len(), 20_000);
    app.signal_shutdown();
    app.wait_stopped().await.expect("the server stops cleanly");
}

/// One admin_audit row: (rpc, caller, subject_hash, request_id, outcome, details).
type AuditRow = (String, String, Option<Vec<u8>>, Option<Uuid>, String, serde_json::Value);

async fn audit_rows(app: &TestApp) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT rpc, caller, subject_hash, request_id, outcome, details FROM admin_audit ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn audit_rows_as_text(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT admin_audit::text FROM admin_audit").fetch_all(&app.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_are_audited_under_the_keyed_hash_and_never_the_user_id() {
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
    let (app, key_file) = spawn_admin_app(&[]).await;
    let user_id = "audited-user-4711";
    app.client
        .clone()
        .identify_user(pb::IdentifyUserRequest {
            user_id: user_id.into(),
            properties: HashMap::from([("plan".to_string(), string_value("pro"))]),
        })
        .await
        .unwrap();
    app.track("one", user_id, 0).await;
    app.track("two", user_id, 0).await;

    assert_eq!(export(&app, user_id).await.unwrap().len(), 3);
    assert_eq!(export(&app, "").await.unwrap_err().code(), Code::InvalidArgument);

    let rows = audit_rows(&app).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (rpc, caller, subject, request_id, outcome, details) = &rows[0];
    assert_eq!((rpc.as_str(), caller.as_str(), outcome.as_str()), ("ExportUser", "127.0.0.1", "ok"));
    assert_eq!(subject.as_deref(), Some(subject_hash(&key_file, user_id).as_slice()));
    assert_eq!(*request_id, None);
    assert_eq!(*details, serde_json::json!({"events_exported": 2, "identity_exported": true}));
    let (_, _, subject, _, outcome, details) = &rows[1];
    assert_eq!((subject, outcome.as_str()), (&None, "INVALID_ARGUMENT"), "no user named");
    assert_eq!(*details, serde_json::json!({"events_exported": 0, "identity_exported": false}));
    for row in audit_rows_as_text(&app).await {
        assert!(!row.contains(user_id), "no user id in the audit trail: {row}");
    }

    let audit_lines: Vec<serde_json::Value> = logs
        .json_lines()
        .into_iter()
        .filter(|line| line["target"] == "audit" && line["action"] == "ExportUser")
        .collect();
    assert_eq!(audit_lines.len(), 2, "one audit line per call");
    let line = &audit_lines[0];
    let hash_hex: String =
        subject_hash(&key_file, user_id).iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(line["subject_hash"], hash_hex.as_str(), "{line}");
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["caller"], "127.0.0.1", "{line}");
    let spans = line["spans"].as_array().expect("the line carries its spans");
    assert!(
        spans.iter().any(|span| span["rpc.method"] == "ExportUser"),
        "written in the call's span: {line}"
    );
    for line in &audit_lines {
        assert!(!line.to_string().contains(user_id), "no user id in an audit line: {line}");
    }
}

#[tokio::test]
async fn refused_admin_calls_are_audited() {
    // Plaintext without ADMIN_RPCS_ENABLED: every admin call is PERMISSION_DENIED.
    let (mut env, key_file) = admin_env();
    env.retain(|(name, _)| name != "ADMIN_RPCS_ENABLED");
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    let mut admin = app.admin_client();
    let request_id = Uuid::now_v7();
    let codes = [
        admin
            .export_user(pb::ExportUserRequest { user_id: "refused-1".into() })
            .await
            .map(|_| ())
            .unwrap_err(),
        admin
            .delete_user(pb::DeleteUserRequest { user_id: "refused-2".into(), suppress: true })
            .await
            .map(|_| ())
            .unwrap_err(),
        admin
            .lift_suppression(pb::LiftSuppressionRequest { user_id: "refused-3".into() })
            .await
            .map(|_| ())
            .unwrap_err(),
        admin
            .get_user_deletion(pb::GetUserDeletionRequest { request_id: request_id.to_string() })
            .await
            .map(|_| ())
            .unwrap_err(),
    ]
    .map(|status| status.code());
    assert_eq!(codes, [Code::PermissionDenied; 4]);
    let rows = audit_rows(&app).await;
    let expected: Vec<AuditRow> = [
        ("ExportUser", Some(subject_hash(&key_file, "refused-1")), None),
        ("DeleteUser", Some(subject_hash(&key_file, "refused-2")), None),
        ("LiftSuppression", Some(subject_hash(&key_file, "refused-3")), None),
        ("GetUserDeletion", None, Some(request_id)),
    ]
    .into_iter()
    .map(|(rpc, subject, request_id)| {
        let refused = (rpc.to_string(), "127.0.0.1".to_string(), subject, request_id);
        (refused.0, refused.1, refused.2, refused.3, "PERMISSION_DENIED".to_string(), serde_json::json!({}))
    })
    .collect();
    assert_eq!(rows, expected);
    for row in audit_rows_as_text(&app).await {
        assert!(!row.contains("refused-"), "no user id in the audit trail: {row}");
    }

    // Without SUPPRESSION_KEY_FILE the user cannot be named: FAILED_PRECONDITION, no hash.
    let env = vec![("ADMIN_RPCS_ENABLED".to_string(), "true".to_string())];
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    let status = app
        .admin_client()
        .export_user(pb::ExportUserRequest { user_id: "unkeyed".into() })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let rows = audit_rows(&app).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), &rows[0].2, rows[0].4.as_str()),
        ("ExportUser", &None, "FAILED_PRECONDITION")
    );
}

const DPO: &str = "spiffe://analytics.test/ns/ops/sa/data-protection";
const WEB: &str = "spiffe://analytics.test/ns/prod/sa/web";

/// An admin client over TLS trusting `server_ca`, presenting `client`.
async fn tls_admin_client(
    address: SocketAddr,
    server_ca: &TestCa,
    client: &Leaf,
) -> AnalyticsAdminServiceClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca.pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(&client.certificate_pem, &client.key_pem));
    let channel = Channel::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("mTLS connects");
    AnalyticsAdminServiceClient::new(channel)
}

/// A server under mTLS with ADMIN_RPCS_ENABLED=true (which must not open anything) and
/// `per_rpc` as TLS_ALLOWED_CALLERS_PER_RPC.
async fn spawn_mtls_admin_app(
    server_ca: &TestCa,
    client_ca: &TestCa,
    dir: &CertDir,
    per_rpc: &str,
) -> TestApp {
    dir.write_server(&server_ca.server("server one"), &client_ca.pem());
    let (mut env, _key_file) = admin_env();
    env.extend(dir.server_env());
    env.push(("TLS_ALLOWED_CALLERS_PER_RPC".into(), per_rpc.into()));
    spawn_app_with(TestOptions { env, ..TestOptions::default() }).await
}

#[tokio::test(flavor = "multi_thread")]
async fn under_mtls_only_the_callers_of_the_export_user_entry_may_export() {
    let server_ca = TestCa::new("server ca");
    let client_ca = TestCa::new("client ca");
    let dpo = client_ca.client(DPO, "dpo.analytics.test");
    let web = client_ca.client(WEB, "web.analytics.test");

    let dir = CertDir::new();
    let app =
        spawn_mtls_admin_app(&server_ca, &client_ca, &dir, &format!("ExportUser={DPO};DeleteUser={WEB}"))
            .await;
    let listed = export_over(tls_admin_client(app.grpc_address, &server_ca, &dpo).await, "someone").await;
    assert!(listed.expect("the listed caller may export").is_empty());
    let denied = export_over(tls_admin_client(app.grpc_address, &server_ca, &web).await, "someone").await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied, "listed for another RPC only");
    let callers: Vec<(String, String)> =
        sqlx::query_as("SELECT caller, outcome FROM admin_audit ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        callers,
        [(DPO.to_string(), "ok".to_string()), (WEB.to_string(), "PERMISSION_DENIED".to_string())],
        "audited with the verified identity"
    );

    // No ExportUser entry at all: nobody may export, ADMIN_RPCS_ENABLED notwithstanding.
    let dir = CertDir::new();
    let app = spawn_mtls_admin_app(&server_ca, &client_ca, &dir, &format!("DeleteUser={DPO}")).await;
    let denied = export_over(tls_admin_client(app.grpc_address, &server_ca, &dpo).await, "someone").await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied, "no entry = nobody");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_still_running_after_the_drain_ends_unavailable_and_does_not_hold_up_shutdown() {
    let (mut app, _) = spawn_admin_app(&[("SHUTDOWN_DRAIN_SECONDS", "1")]).await;
    insert_events(&app, "whale", 20_000, 1_000).await;
    let mut stream = app
        .admin_client()
        .export_user(pb::ExportUserRequest { user_id: "whale".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(stream.next().await, Some(Ok(_))));

    // The client pauses; the server is asked to stop.
    let stopping = std::time::Instant::now();
    app.signal_shutdown();
    app.wait_stopped().await.expect("the server stops cleanly");
    assert!(stopping.elapsed() < Duration::from_secs(8), "stopped after {:?}", stopping.elapsed());

    // The client never sees a clean end of a truncated export.
    let mut received = 1;
    let ended = loop {
        match stream.next().await {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("a truncated export ended as if complete after {received} events"),
        }
    };
    assert!(received < 20_000, "{received} events");
    assert_eq!((ended.code(), ended.message()), (Code::Unavailable, "server shutting down"), "{ended:?}");
}
