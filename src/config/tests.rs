//! Unit tests of the configuration: defaults, typed values, and errors that name the
//! offending variable.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
}

#[test]
fn defaults_are_the_documented_ones() {
    let config = Config::from_vars(vars(&[])).unwrap();
    assert_eq!(config.server.grpc_address.port(), 50051);
    assert_eq!(config.server.admin_address.port(), 9090);
    assert_eq!(config.postgres.max_connections, 25);
    assert_eq!(config.postgres.read_pool_connections(), 22);
    let redis = config.redis.as_ref().expect("redis on by default");
    assert_eq!(redis.cache_ttl, Some(Duration::from_secs(300)));
    assert_eq!(redis.username, None);
    assert_eq!(config.rate_limit.events_per_user_per_minute, 1000);
    assert_eq!(config.rate_limit.lease_tokens(), 15, "1000 / 64");
    assert_eq!(config.events.max_age, chrono::Duration::days(30));
    assert_eq!(config.events.retention, None);
    assert_eq!(config.ingest.linger, Duration::from_millis(2));
    assert_eq!(config.grpc.max_connection_age, Some(Duration::from_secs(300)));
    assert_eq!(config.telemetry.log_format, LogFormat::Json);
    assert!(config.telemetry.otlp.is_none());
}

#[test]
fn rate_limit_leases_follow_the_budget_unless_set() {
    let lease_tokens =
        |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs)).unwrap().rate_limit.lease_tokens();
    assert_eq!(
        lease_tokens(&[("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE", "60")]),
        1,
        "small budgets: no leases"
    );
    assert_eq!(lease_tokens(&[("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE", "640")]), 10);
    assert_eq!(lease_tokens(&[("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE", "1000000")]), 16, "at most 16");
    assert_eq!(
        lease_tokens(&[
            ("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE", "1000000"),
            ("RATE_LIMIT_LEASE_TOKENS", "1")
        ]),
        1,
        "set: exact"
    );
}

#[test]
fn zero_means_off_for_optional_durations() {
    let config = Config::from_vars(vars(&[
        ("REDIS_CACHE_TTL", "0"),
        ("GRPC_MAX_CONNECTION_AGE_SECONDS", "0"),
        ("EVENT_RETENTION_DAYS", "0"),
    ]))
    .unwrap();
    assert_eq!(config.redis.unwrap().cache_ttl, None);
    assert_eq!(config.grpc.max_connection_age, None);
    assert_eq!(config.events.retention, None);
}

#[test]
fn a_bad_number_names_the_variable() {
    let error = Config::from_vars(vars(&[("POSTGRES_PORT", "abc")])).unwrap_err();
    assert!(error.to_string().contains("POSTGRES_PORT"), "{error}");
}

#[test]
fn a_bad_enum_names_the_variable() {
    let error = Config::from_vars(vars(&[("LOG_FORMAT", "xml")])).unwrap_err();
    assert!(error.to_string().contains("LOG_FORMAT"), "{error}");
}

#[test]
fn range_checks_name_the_variable() {
    let cases = [
        ("POSTGRES_MAX_CONNECTIONS", "0"),
        ("OTEL_TRACES_SAMPLER_RATIO", "1.5"),
        ("REDIS_DB", "99"),
        ("EVENT_MAX_AGE_DAYS", "0"),
        ("DB_RETRY_MAX_ATTEMPTS", "0"),
        ("INGEST_BATCH_SIZE", "0"),
        ("INGEST_LINGER_MS", "1000"),
        ("INGEST_QUEUE_CAPACITY", "0"),
        ("INGEST_WRITERS", "26"),
        ("IDEMPOTENCY_WINDOW_DAYS", "0"),
        ("GRPC_HANDSHAKE_TIMEOUT_SECONDS", "0"),
        ("GRPC_HANDSHAKE_TIMEOUT_SECONDS", "61"),
        ("GRPC_MAX_PENDING_TLS_HANDSHAKES", "0"),
        ("GRPC_KEEPALIVE_INTERVAL_SECONDS", "0"),
        ("GRPC_KEEPALIVE_TIMEOUT_SECONDS", "0"),
        ("RATE_LIMIT_EXPECTED_REPLICAS", "0"),
        ("RATE_LIMIT_LEASE_TOKENS", "0"),
        ("RATE_LIMIT_LEASE_TOKENS", "1001"),
        ("TLS_ALLOWED_CALLERS_COVER_REFLECTION", "maybe"),
        ("REQUEST_TIMEOUT_SECONDS", "601"),
    ];
    for (variable, value) in cases {
        let error = Config::from_vars(vars(&[(variable, value)])).unwrap_err();
        assert!(error.to_string().contains(variable), "{variable}: {error}");
    }
}

#[test]
fn tls_needs_all_three_files() {
    let error = Config::from_vars(vars(&[("TLS_CERT_FILE", "/tls/tls.crt")])).unwrap_err();
    assert!(error.to_string().contains("TLS_KEY_FILE"), "{error}");
    let config = Config::from_vars(vars(&[
        ("TLS_CERT_FILE", "/tls/tls.crt"),
        ("TLS_KEY_FILE", "/tls/tls.key"),
        ("TLS_CLIENT_CA_FILE", "/tls/ca.crt"),
    ]))
    .unwrap();
    assert_eq!(config.tls.files.unwrap().client_ca, PathBuf::from("/tls/ca.crt"));
    assert!(Config::from_vars(vars(&[])).unwrap().tls.files.is_none());
}

#[test]
fn allow_lists_need_mtls_and_a_valid_syntax() {
    let error = Config::from_vars(vars(&[("TLS_ALLOWED_CALLERS", "spiffe://a")])).unwrap_err();
    assert!(error.to_string().contains("TLS_ALLOWED_CALLERS"), "{error}");
    let error = Config::from_vars(vars(&[("TLS_ALLOWED_CALLERS_PER_RPC", "Nope=a")])).unwrap_err();
    assert!(error.to_string().contains("TLS_ALLOWED_CALLERS_PER_RPC"), "{error}");
}

#[test]
fn allow_lists_are_parsed_at_load() {
    let config = Config::from_vars(vars(&[
        ("TLS_CERT_FILE", "/tls/tls.crt"),
        ("TLS_KEY_FILE", "/tls/tls.key"),
        ("TLS_CLIENT_CA_FILE", "/tls/ca.crt"),
        ("TLS_ALLOWED_CALLERS", "spiffe://a"),
    ]))
    .unwrap();
    assert!(!config.tls.callers.is_open());
    assert!(config.tls.reflection_callers().allows_reflection("spiffe://a"));
    assert!(!config.tls.reflection_callers().allows_reflection("spiffe://b"));
}

#[test]
fn pii_defaults_and_keys_from_a_file() {
    let config = Config::from_vars(vars(&[])).unwrap();
    assert_eq!(config.pii.fields, ["email", "phone", "name", "ip_address"]);
    assert!(config.pii.keys().unwrap().is_none());
    let path = std::env::temp_dir().join(format!("pii-keys-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    let file = path.display().to_string();
    let config = Config::from_vars(vars(&[("PII_KEYS_FILE", file.as_str())])).unwrap();
    assert_eq!(config.pii.keys().unwrap().unwrap().current_key_id(), "k1");
    std::fs::write(&path, "k1:short\n").unwrap();
    let error = config.pii.keys().unwrap_err();
    assert!(error.to_string().contains("PII_KEYS_FILE") && !error.to_string().contains("short"), "{error}");
    std::fs::remove_file(&path).ok();
    let error =
        Config::from_vars(vars(&[("PII_KEYS_FILE", "/nonexistent/keys")])).unwrap().pii.keys().unwrap_err();
    assert!(error.to_string().contains("PII_KEYS_FILE"), "{error}");
}

#[test]
fn postgres_verify_modes_and_their_ca_file() {
    for (raw, mode) in
        [("verify-ca", PostgresSslMode::VerifyCa), ("VERIFY-FULL", PostgresSslMode::VerifyFull)]
    {
        let config = Config::from_vars(vars(&[("POSTGRES_SSLMODE", raw)])).unwrap();
        assert_eq!(config.postgres.ssl_mode, mode);
        assert!(config.postgres.ssl_root_cert.is_none());
    }
    let error = Config::from_vars(vars(&[("POSTGRES_SSL_ROOT_CERT", "/ca/ca.crt")])).unwrap_err();
    assert!(error.to_string().contains("POSTGRES_SSL_ROOT_CERT"), "{error}");
    let config = Config::from_vars(vars(&[
        ("POSTGRES_SSLMODE", "verify-full"),
        ("POSTGRES_SSL_ROOT_CERT", "/nonexistent/ca.crt"),
    ]))
    .unwrap();
    let error = config.check_ca_files().unwrap_err();
    assert!(error.to_string().contains("POSTGRES_SSL_ROOT_CERT"), "{error}");
}

#[test]
fn postgres_pooler_and_the_migration_address() {
    let config = Config::from_vars(vars(&[])).unwrap();
    assert_eq!(config.postgres.pooler, PostgresPooler::None);
    assert!(!config.postgres.has_migration_address());
    let config = Config::from_vars(vars(&[
        ("POSTGRES_POOLER", "Transaction"),
        ("MIGRATION_POSTGRES_HOST", "analytics-rw"),
        ("MIGRATION_POSTGRES_PORT", "5433"),
    ]))
    .unwrap();
    assert_eq!(config.postgres.pooler, PostgresPooler::Transaction);
    assert_eq!(config.postgres.migration_host.as_deref(), Some("analytics-rw"));
    assert_eq!(config.postgres.migration_port, Some(5433));
    let error = Config::from_vars(vars(&[("POSTGRES_POOLER", "session")])).unwrap_err();
    assert!(error.to_string().contains("POSTGRES_POOLER"), "{error}");
    let empty = Config::from_vars(vars(&[("MIGRATION_POSTGRES_HOST", " "), ("MIGRATION_POSTGRES_PORT", "")]))
        .unwrap();
    assert!(!empty.postgres.has_migration_address(), "empty means unset, as in k8s/base/config.env");
    let error = Config::from_vars(vars(&[("MIGRATION_POSTGRES_PORT", "x")])).unwrap_err();
    assert!(error.to_string().contains("MIGRATION_POSTGRES_PORT"), "{error}");
}

#[test]
fn read_replica_is_off_unless_its_host_is_set() {
    assert_eq!(Config::from_vars(vars(&[])).unwrap().postgres.read_replica, None);
    assert_eq!(Config::from_vars(vars(&[("POSTGRES_READ_HOST", " ")])).unwrap().postgres.read_replica, None);
    let config = Config::from_vars(vars(&[
        ("POSTGRES_PORT", "6432"),
        ("POSTGRES_READ_HOST", "standby"),
        ("POSTGRES_READ_PORT", ""),
    ]))
    .unwrap();
    assert_eq!(
        config.postgres.read_replica,
        Some(ReadReplicaConfig { host: "standby".into(), port: 6432, max_connections: 10 })
    );
    let config = Config::from_vars(vars(&[
        ("POSTGRES_READ_HOST", "standby"),
        ("POSTGRES_READ_PORT", "5433"),
        ("POSTGRES_READ_MAX_CONNECTIONS", "4"),
    ]))
    .unwrap();
    assert_eq!(
        config.postgres.read_replica,
        Some(ReadReplicaConfig { host: "standby".into(), port: 5433, max_connections: 4 })
    );
    for (variable, value) in
        [("POSTGRES_READ_MAX_CONNECTIONS", "0"), ("POSTGRES_READ_PORT", "x"), ("POSTGRES_READ_PORT", "0")]
    {
        let error =
            Config::from_vars(vars(&[("POSTGRES_READ_HOST", "standby"), (variable, value)])).unwrap_err();
        assert!(error.to_string().contains(variable), "{error}");
    }
}

#[test]
fn redis_tls_settings() {
    let config = Config::from_vars(vars(&[])).unwrap();
    assert!(!config.redis.as_ref().unwrap().tls);
    let error = Config::from_vars(vars(&[("REDIS_TLS_CA_FILE", "/ca/ca.crt")])).unwrap_err();
    assert!(error.to_string().contains("REDIS_TLS_CA_FILE"), "{error}");
    let error = Config::from_vars(vars(&[("REDIS_TLS", "maybe")])).unwrap_err();
    assert!(error.to_string().contains("REDIS_TLS"), "{error}");
    let path = std::env::temp_dir().join(format!("not-a-ca-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, "garbage").unwrap();
    let file = path.display().to_string();
    let config =
        Config::from_vars(vars(&[("REDIS_TLS", "true"), ("REDIS_TLS_CA_FILE", file.as_str())])).unwrap();
    let error = config.check_ca_files().unwrap_err();
    assert!(error.to_string().contains("REDIS_TLS_CA_FILE"), "{error}");
    std::fs::remove_file(&path).ok();
}

#[test]
fn otlp_headers_follow_the_spec_format_and_never_print_values() {
    let otlp = |headers: &str| {
        Config::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_HEADERS", headers),
        ]))
        .unwrap()
    };
    let config = otlp(" Authorization=Bearer%20s3cret , x-scope-orgid=tenant-1,");
    assert_eq!(
        config.telemetry.otlp.as_ref().unwrap().headers.clone().unwrap().0,
        [
            ("authorization".to_string(), "Bearer s3cret".to_string()),
            ("x-scope-orgid".to_string(), "tenant-1".to_string())
        ]
    );
    assert!(!format!("{config:?}").contains("s3cret"));
    for broken in ["novalue", "bad name=x", "k=%zz", "k=line%0Abreak"] {
        let error = otlp(broken).telemetry.otlp.unwrap().headers.unwrap_err().to_string();
        assert!(error.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{broken}: {error}");
        assert!(!error.contains("break") && !error.contains("zz"), "values are not echoed: {error}");
    }
    assert!(otlp("").telemetry.otlp.unwrap().headers.unwrap().0.is_empty());
}

#[test]
fn readiness_does_not_require_the_database_by_default() {
    assert!(!Config::from_vars(vars(&[])).unwrap().server.readiness_requires_database);
    let config = Config::from_vars(vars(&[("READINESS_REQUIRES_DATABASE", "true")])).unwrap();
    assert!(config.server.readiness_requires_database);
}

#[test]
fn empty_redis_host_disables_redis() {
    let config = Config::from_vars(vars(&[("REDIS_HOST", "")])).unwrap();
    assert!(config.redis.is_none());
}

#[test]
fn secrets_never_print() {
    let config =
        Config::from_vars(vars(&[("POSTGRES_PASSWORD", "hunter2"), ("REDIS_PASSWORD", "pw")])).unwrap();
    let printed = format!("{config:?}");
    assert!(!printed.contains("hunter2"));
    assert!(!printed.contains("\"pw\""));
    assert_eq!(config.postgres.password.expose(), "hunter2");
}

#[test]
fn redis_topologies() {
    let standalone = Config::from_vars(vars(&[("REDIS_HOST", "cache"), ("REDIS_PORT", "6380")])).unwrap();
    assert_eq!(
        standalone.redis.unwrap().topology,
        RedisTopology::Standalone { host: "cache".into(), port: 6380 }
    );
    let sentinel = Config::from_vars(vars(&[
        ("REDIS_MODE", "sentinel"),
        ("REDIS_NODES", "s1:26379, s2:26379,[::1]:26380"),
        ("REDIS_SENTINEL_MASTER", "mymaster"),
    ]))
    .unwrap();
    let node = |host: &str, port| NodeAddress { host: host.into(), port };
    assert_eq!(
        sentinel.redis.unwrap().topology,
        RedisTopology::Sentinel {
            sentinels: vec![node("s1", 26379), node("s2", 26379), node("::1", 26380)],
            master_name: "mymaster".into()
        }
    );
    let cluster =
        Config::from_vars(vars(&[("REDIS_MODE", "cluster"), ("REDIS_NODES", "n1:7000,n2:7001")])).unwrap();
    assert_eq!(
        cluster.redis.unwrap().topology,
        RedisTopology::Cluster { seed_nodes: vec![node("n1", 7000), node("n2", 7001)] }
    );
    // Outside standalone mode REDIS_HOST plays no part: an empty one keeps Redis on.
    let cluster_without_host =
        Config::from_vars(vars(&[("REDIS_MODE", "cluster"), ("REDIS_NODES", "n1:7000"), ("REDIS_HOST", "")]))
            .unwrap();
    assert!(cluster_without_host.redis.is_some());
}

#[test]
fn redis_topology_errors_name_the_variable() {
    let cases: [(&[(&str, &str)], &str); 9] = [
        (&[("REDIS_MODE", "replicated")], "REDIS_MODE"),
        (&[("REDIS_MODE", "cluster")], "REDIS_NODES"),
        (&[("REDIS_MODE", "sentinel"), ("REDIS_SENTINEL_MASTER", "m")], "REDIS_NODES"),
        (&[("REDIS_MODE", "sentinel"), ("REDIS_NODES", "s1:26379")], "REDIS_SENTINEL_MASTER"),
        (&[("REDIS_NODES", "n1:7000")], "REDIS_NODES"),
        (&[("REDIS_SENTINEL_MASTER", "mymaster")], "REDIS_SENTINEL_MASTER"),
        (&[("REDIS_MODE", "cluster"), ("REDIS_NODES", "n1")], "REDIS_NODES"),
        (&[("REDIS_MODE", "cluster"), ("REDIS_NODES", "n1:70000")], "REDIS_NODES"),
        (&[("REDIS_MODE", "cluster"), ("REDIS_NODES", "n1:7000"), ("REDIS_DB", "1")], "REDIS_DB"),
    ];
    for (pairs, variable) in cases {
        let error = Config::from_vars(vars(pairs)).unwrap_err();
        assert!(error.to_string().contains(variable), "{pairs:?}: {error}");
    }
}
