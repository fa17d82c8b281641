//! PII encryption at rest: sensitive property values never reach PostgreSQL in clear
//! text (checked in the raw columns and in a real `pg_dump`), the service's own reads
//! decrypt them, and after a key rotation old and new rows decrypt and `reencrypt`
//! moves every value to the new key.

use std::collections::HashMap;
use std::process::Command;

use analytics_service::config::Config;
use analytics_service::models::UserId;
use analytics_service::pb;
use analytics_service::repository::postgres::Database;
use analytics_service::repository::redis::CountCache;
use analytics_service::security::pii::PiiCipher;
use analytics_service::service::rate_limit::RateLimiter;
use analytics_service::service::{AnalyticsService, IngestQueue};
use base64::Engine as _;
use uuid::Uuid;

use crate::certs::CertDir;
use crate::helpers::{
    number_value, postgres_host, postgres_port, postgres_user, spawn_app_with, start_server, string_value,
    TestApp, TestOptions,
};

const BINARY: &str = env!("CARGO_BIN_EXE_analytics-service");

/// A `KEY_ID:BASE64_32_BYTE_KEY` line with a fresh random key.
fn key_line(key_id: &str) -> String {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(Uuid::new_v4().as_bytes());
    key.extend_from_slice(Uuid::new_v4().as_bytes());
    format!("{key_id}:{}", base64::engine::general_purpose::STANDARD.encode(key))
}

/// The service as the server builds it, for its own (decrypting) read path.
fn service(config: &Config) -> AnalyticsService {
    let pii = PiiCipher::new(config.pii.fields.clone(), config.pii.keys().unwrap().expect("keys configured"));
    AnalyticsService::new(
        Database::connect_lazy(&config.postgres),
        IngestQueue::closed(),
        CountCache::disabled(),
        RateLimiter::per_minute(0),
        pii,
        &config.events,
    )
}

async fn identify(app: &TestApp, user_id: &str, email: &str, phone: &str) {
    app.client
        .clone()
        .identify_user(pb::IdentifyUserRequest {
            user_id: user_id.into(),
            properties: HashMap::from([
                ("email".to_string(), string_value(email)),
                ("phone".to_string(), string_value(phone)),
                ("name".to_string(), string_value(&format!("Name of {user_id}"))),
                ("plan".to_string(), string_value("pro")),
            ]),
        })
        .await
        .unwrap();
}

async fn track_with_email(app: &TestApp, user_id: &str, email: &str) -> Uuid {
    let response = app
        .client
        .clone()
        .track_event(pb::TrackEventRequest {
            event_name: "signup".into(),
            user_id: user_id.into(),
            properties: HashMap::from([
                ("email".to_string(), string_value(email)),
                ("ip_address".to_string(), string_value("203.0.113.7")),
                ("seats".to_string(), number_value(3.0)),
            ]),
            timestamp: 0,
            insert_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    Uuid::parse_str(&response.event_id).unwrap()
}

async fn raw_user_properties(app: &TestApp, user_id: &str) -> serde_json::Value {
    sqlx::query_scalar("SELECT properties FROM user_identities WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn raw_event_properties(app: &TestApp, event_id: Uuid) -> serde_json::Value {
    sqlx::query_scalar("SELECT properties FROM events WHERE id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn key_id_of(value: &serde_json::Value) -> &str {
    value.as_str().unwrap().strip_prefix("enc:v1:").expect("an encrypted value").split(':').next().unwrap()
}

fn pg_dump(database: &str) -> String {
    let output = Command::new("pg_dump")
        .args(["-h", &postgres_host(), "-p", &postgres_port().to_string(), "-U", &postgres_user(), database])
        .output()
        .expect("pg_dump is installed (Debian's postgresql-client)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn user(id: &str) -> UserId {
    UserId::parse(id.to_string()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sensitive_values_are_encrypted_at_rest_and_survive_a_key_rotation() {
    let keys = CertDir::new();
    let keys_file = keys.write("pii.keys", &format!("{}\n", key_line("k1")));
    let env = vec![("PII_KEYS_FILE".to_string(), keys_file.display().to_string())];
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;

    identify(&app, "ada", "ada@example.com", "+44 20 7946 0001").await;
    let first_event = track_with_email(&app, "ada", "ada@example.com").await;

    // The raw columns hold ciphertext under k1; other keys stay readable.
    let stored_user = raw_user_properties(&app, "ada").await;
    for field in ["email", "phone", "name"] {
        assert_eq!(key_id_of(&stored_user[field]), "k1", "{stored_user}");
    }
    assert_eq!(stored_user["plan"], "pro");
    let stored_event = raw_event_properties(&app, first_event).await;
    assert_eq!(key_id_of(&stored_event["email"]), "k1");
    assert_eq!(key_id_of(&stored_event["ip_address"]), "k1");
    assert_eq!(stored_event["seats"], 3.0);
    let raw_text = format!("{stored_user}{stored_event}");
    assert!(
        !raw_text.contains("ada@example.com")
            && !raw_text.contains("7946")
            && !raw_text.contains("203.0.113.7")
    );

    // The service's own reads decrypt.
    let first_service = service(&app.config);
    let read_user = first_service.user_properties(&user("ada")).await.unwrap().unwrap();
    assert_eq!(read_user["email"], "ada@example.com");
    assert_eq!(read_user["phone"], "+44 20 7946 0001");
    assert_eq!(read_user["name"], "Name of ada");
    let read_event = first_service.event_properties(first_event).await.unwrap().unwrap();
    assert_eq!(read_event["email"], "ada@example.com");
    assert_eq!(read_event["seats"], 3.0);

    // IdentifyUser merges properties: a later call keeps earlier encrypted values.
    app.client
        .clone()
        .identify_user(pb::IdentifyUserRequest {
            user_id: "ada".into(),
            properties: HashMap::from([("plan".to_string(), string_value("team"))]),
        })
        .await
        .unwrap();
    let merged = first_service.user_properties(&user("ada")).await.unwrap().unwrap();
    assert_eq!((merged["email"].as_str(), merged["plan"].as_str()), (Some("ada@example.com"), Some("team")));

    // Rotation: k2 first (new writes), k1 kept (old rows). A replica with the new file.
    keys.write(
        "pii.keys",
        &format!("{}\n{}\n", key_line("k2"), std::fs::read_to_string(&keys_file).unwrap().trim()),
    );
    let rotated_config = app.config.clone();
    let rotated =
        start_server(rotated_config.clone(), app.database_name.clone(), app.redis_prefix.clone()).await;
    identify(&rotated, "grace", "grace@example.com", "+1 555 0100").await;
    let second_event = track_with_email(&rotated, "grace", "grace@example.com").await;
    assert_eq!(key_id_of(&raw_user_properties(&app, "grace").await["email"]), "k2");
    assert_eq!(key_id_of(&raw_user_properties(&app, "ada").await["email"]), "k1");

    let rotated_service = service(&rotated_config);
    for (user_id, email) in [("ada", "ada@example.com"), ("grace", "grace@example.com")] {
        let read = rotated_service.user_properties(&user(user_id)).await.unwrap().unwrap();
        assert_eq!(read["email"], email, "old and new rows decrypt");
    }
    assert_eq!(
        rotated_service.event_properties(first_event).await.unwrap().unwrap()["email"],
        "ada@example.com"
    );
    assert_eq!(
        rotated_service.event_properties(second_event).await.unwrap().unwrap()["email"],
        "grace@example.com"
    );

    // `reencrypt` rewrites every old value under k2.
    let reencrypt = reencrypt_command(&app, &keys_file, "email,phone,name,ip_address");
    let printed = String::from_utf8_lossy(&reencrypt.stdout);
    assert!(reencrypt.status.success(), "{printed}{}", String::from_utf8_lossy(&reencrypt.stderr));
    assert!(printed.contains("events 1 rewritten, 0 failed"), "{printed}");
    assert!(printed.contains("user_identities 1 rewritten, 0 failed"), "{printed}");
    let still_old: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM events WHERE properties::text LIKE '%enc:v1:k1:%')
              + (SELECT count(*) FROM user_identities WHERE properties::text LIKE '%enc:v1:k1:%')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(still_old, 0, "nothing is left under k1");

    // k1 can now be dropped: everything reads with k2 alone.
    keys.write(
        "pii.keys",
        &format!("{}\n", std::fs::read_to_string(&keys_file).unwrap().lines().next().unwrap()),
    );
    let k2_only = service(&rotated_config);
    assert_eq!(k2_only.user_properties(&user("ada")).await.unwrap().unwrap()["phone"], "+44 20 7946 0001");
    assert_eq!(k2_only.event_properties(first_event).await.unwrap().unwrap()["ip_address"], "203.0.113.7");

    // A real dump of the database holds no sensitive value in clear text.
    let dump = pg_dump(&app.database_name);
    assert!(dump.contains("enc:v1:k2:"), "the dump has the encrypted values");
    for secret in
        ["ada@example.com", "grace@example.com", "7946 0001", "555 0100", "203.0.113.7", "Name of ada"]
    {
        assert!(!dump.contains(secret), "{secret} is in the dump in clear text");
    }
    assert!(dump.contains("\"plan\": \"team\""), "non-sensitive values stay readable");
}

/// Runs the `reencrypt` verb against the test's database with `keys_file` and `pii_fields`.
fn reencrypt_command(app: &TestApp, keys_file: &std::path::Path, pii_fields: &str) -> std::process::Output {
    Command::new(BINARY)
        .arg("reencrypt")
        .env("POSTGRES_HOST", postgres_host())
        .env("POSTGRES_PORT", postgres_port().to_string())
        .env("POSTGRES_USER", postgres_user())
        .env("POSTGRES_PASSWORD", "")
        .env("POSTGRES_DB", &app.database_name)
        .env("POSTGRES_SSLMODE", "disable")
        .env("PII_KEYS_FILE", keys_file)
        .env("PII_FIELDS", pii_fields)
        .env("LOG_FORMAT", "text")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn clear_text_cannot_pass_for_ciphertext_and_field_names_are_normalised() {
    let keys = CertDir::new();
    let keys_file = keys.write("pii.keys", &format!("{}\n", key_line("k1")));
    let env = vec![
        ("PII_KEYS_FILE".to_string(), keys_file.display().to_string()),
        ("PII_FIELDS".to_string(), "email".to_string()),
    ];
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;

    // The reserved prefix is refused in any property, PII or not, naming the property.
    for (key, value) in [
        ("email", "enc:v1:k1:carol@example.org"),
        ("email", "enc:v1:carol@example.org"),
        ("plan", "enc:v1:k1:carol@example.org"),
    ] {
        let properties = HashMap::from([(key.to_string(), string_value(value))]);
        let status = app
            .client
            .clone()
            .identify_user(pb::IdentifyUserRequest {
                user_id: "carol".into(),
                properties: properties.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{key}={value}: {status:?}");
        assert!(status.message().contains(&format!("properties[\"{key}\"]")), "{status:?}");
        let status = app
            .client
            .clone()
            .track_event(pb::TrackEventRequest {
                event_name: "signup".into(),
                user_id: "carol".into(),
                properties,
                timestamp: 0,
                insert_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{key}={value}: {status:?}");
    }
    assert_eq!(app.event_rows().await, 0);

    // PII_FIELDS=email covers `Email`, `email ` and `EMAIL`.
    app.client
        .clone()
        .identify_user(pb::IdentifyUserRequest {
            user_id: "dora".into(),
            properties: HashMap::from([
                ("Email".to_string(), string_value("dora@example.org")),
                ("email ".to_string(), string_value("dora.work@example.org")),
                ("EMAIL".to_string(), string_value("dora.home@example.org")),
                ("plan".to_string(), string_value("pro")),
            ]),
        })
        .await
        .unwrap();
    let event_id = app
        .client
        .clone()
        .track_event(pb::TrackEventRequest {
            event_name: "signup".into(),
            user_id: "dora".into(),
            properties: HashMap::from([(" eMail".to_string(), string_value("dora.event@example.org"))]),
            timestamp: 0,
            insert_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .event_id;
    let stored_user = raw_user_properties(&app, "dora").await;
    for key in ["Email", "email ", "EMAIL"] {
        assert_eq!(key_id_of(&stored_user[key]), "k1", "{key}: {stored_user}");
    }
    assert_eq!(stored_user["plan"], "pro");
    let stored_event = raw_event_properties(&app, Uuid::parse_str(&event_id).unwrap()).await;
    assert_eq!(key_id_of(&stored_event[" eMail"]), "k1", "{stored_event}");
    let read = service(&app.config).user_properties(&user("dora")).await.unwrap().unwrap();
    assert_eq!(read["EMAIL"], "dora.home@example.org");

    // A row written before the prefix was refused holds clear text behind the prefix: it
    // reads back as it was sent, and `reencrypt` encrypts it instead of failing on it.
    sqlx::query("INSERT INTO user_identities (user_id, properties) VALUES ('carol', $1)")
        .bind(serde_json::json!({"email": "enc:v1:k1:carol@example.org", "plan": "free"}))
        .execute(&app.pool)
        .await
        .unwrap();
    let legacy = service(&app.config).user_properties(&user("carol")).await.unwrap().unwrap();
    assert_eq!(legacy["email"], "enc:v1:k1:carol@example.org");
    let reencrypt = reencrypt_command(&app, &keys_file, "email");
    let printed = String::from_utf8_lossy(&reencrypt.stdout);
    assert!(reencrypt.status.success(), "{printed}{}", String::from_utf8_lossy(&reencrypt.stderr));
    assert!(printed.contains("user_identities 1 rewritten, 0 failed"), "{printed}");
    assert_eq!(key_id_of(&raw_user_properties(&app, "carol").await["email"]), "k1");
    let again = reencrypt_command(&app, &keys_file, "email");
    assert!(String::from_utf8_lossy(&again.stdout).contains("user_identities 0 rewritten, 0 failed"));
    let read = service(&app.config).user_properties(&user("carol")).await.unwrap().unwrap();
    assert_eq!(read["email"], "enc:v1:k1:carol@example.org");

    let dump = pg_dump(&app.database_name);
    for secret in ["carol@example.org", "dora@example.org", "dora.work@", "dora.home@", "dora.event@"] {
        assert!(!dump.contains(secret), "{secret} is in the dump in clear text");
    }
}

#[tokio::test]
async fn without_keys_values_are_stored_as_sent() {
    let app = spawn_app_with(TestOptions::default()).await;
    identify(&app, "plain", "plain@example.com", "+1 555 0199").await;
    assert_eq!(raw_user_properties(&app, "plain").await["email"], "plain@example.com");
}
