//! `migrate`: the schema of migrations/, applied once even when run concurrently, and a
//! no-op when the database is ahead of the binary.

use analytics_service::repository::postgres::schema::{self, SchemaStatus};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::helpers::{create_database, drop_database, test_config, TestOptions};
use analytics_service::repository::postgres::connect_options;

#[tokio::test]
async fn concurrent_migrations_apply_once_and_create_the_schema() {
    let database = create_database().await;
    let config = test_config(&database, "unused", &TestOptions::default());
    let options = connect_options(&config);
    let pool = PgPoolOptions::new().max_connections(2).connect_with(options.clone()).await.unwrap();
    let latest = *schema::expected_versions().last().unwrap();
    assert_eq!(
        schema::status(&pool.clone().into()).await.unwrap(),
        SchemaStatus::Behind { applied: None, expected: latest }
    );

    let runs = (0..4).map(|_| schema::migrate(&options));
    for result in futures::future::join_all(runs).await {
        result.expect("every concurrent run succeeds");
    }
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM refinery_schema_history").fetch_one(&pool).await.unwrap();
    assert_eq!(history, schema::expected_versions().len() as i64);
    assert_eq!(
        schema::status(&pool.clone().into()).await.unwrap(),
        SchemaStatus::Current { version: latest }
    );

    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename IN ('events', 'user_identities', 'event_insert_ids') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for expected in [
        "idx_events_event_name_timestamp",
        "idx_events_properties",
        "idx_events_timestamp",
        "idx_events_user_id",
        "idx_user_identities_properties",
        "event_insert_ids_pkey",
        "idx_event_insert_ids_created_at",
    ] {
        assert!(indexes.iter().any(|index| index == expected), "{expected} in {indexes:?}");
    }
    pool.close().await;
    drop_database(&database).await;
}

#[tokio::test]
async fn migrate_succeeds_without_changes_when_the_database_is_ahead_of_the_binary() {
    // A rollback (or a GitOps tool re-running an older release's Job) runs an older binary's
    // `migrate` against a schema that already has newer migrations: nothing is left to
    // apply, and the run must not fail the rollback.
    let (database, options, pool) = migrated_database().await;
    let latest = *schema::expected_versions().last().unwrap();
    let newer = latest + 1000;
    sqlx::query(
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES ($1, 'from_a_newer_release', '2026-01-01T00:00:00Z', '0')",
    )
    .bind(newer)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        schema::status(&pool.clone().into()).await.unwrap(),
        SchemaStatus::Ahead { applied: newer, expected: latest }
    );

    let report =
        schema::migrate(&options).await.expect("an older binary's migrate succeeds on a newer schema");
    assert!(report.applied.is_empty(), "{:?}", report.applied);
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM refinery_schema_history").fetch_one(&pool).await.unwrap();
    assert_eq!(history, schema::expected_versions().len() as i64 + 1);
    pool.close().await;
    drop_database(&database).await;
}

#[tokio::test]
async fn a_database_built_by_other_migrations_is_reported_and_refused() {
    // A database migrated by another sequence (a development database from before the
    // migrations were squashed, or another product's) holds versions this binary knows
    // under other names: it is not usable, and `migrate` refuses it instead of applying
    // this binary's migrations on top or calling it "ahead".
    let (database, options, pool) = migrated_database().await;
    let latest = *schema::expected_versions().last().unwrap();
    sqlx::query("UPDATE refinery_schema_history SET name = 'built_elsewhere' WHERE version = 1")
        .execute(&pool)
        .await
        .unwrap();
    let status = schema::status(&pool.clone().into()).await.unwrap();
    assert_eq!(
        status,
        SchemaStatus::Diverged {
            version: 1,
            applied_name: "built_elsewhere".to_string(),
            expected_name: "create_events_table".to_string(),
        }
    );
    assert!(!status.is_usable());
    let refused = schema::migrate(&options).await.expect_err("migrate refuses a diverged database");
    assert!(refused.to_string().contains("built by other migrations"), "{refused}");

    // With newer versions on top it is still diverged, never "ahead".
    sqlx::query(
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES ($1, 'newer', '2026-01-01T00:00:00Z', '0')",
    )
    .bind(latest + 1000)
    .execute(&pool)
    .await
    .unwrap();
    assert!(matches!(
        schema::status(&pool.clone().into()).await.unwrap(),
        SchemaStatus::Diverged { version: 1, .. }
    ));
    assert!(schema::migrate(&options).await.is_err());
    pool.close().await;
    drop_database(&database).await;
}

/// A fresh database migrated by this binary, its connect options and a one-connection pool.
async fn migrated_database() -> (String, PgConnectOptions, PgPool) {
    let database = create_database().await;
    let config = test_config(&database, "unused", &TestOptions::default());
    let options = connect_options(&config);
    let pool = PgPoolOptions::new().max_connections(1).connect_with(options.clone()).await.unwrap();
    schema::migrate(&options).await.expect("migrations apply");
    (database, options, pool)
}
