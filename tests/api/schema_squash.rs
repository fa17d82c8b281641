//! The squashed migrations (migrations/V1..V4) build exactly the schema that the
//! migrations they replace built (tests/fixtures/migrations-before-squash/): both sets
//! are applied to fresh databases and their catalogs compared object by object.

use std::collections::BTreeMap;
use std::path::Path;

use analytics_service::repository::postgres::{connect_options, schema};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection;

use crate::helpers::{create_database, drop_database, test_config, TestOptions};

/// Where the migrations replaced by the squash are kept, for this test only.
const MIGRATIONS_BEFORE_SQUASH: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/migrations-before-squash");

/// refinery's bookkeeping table: it records different versions by design.
const HISTORY_TABLE: &str = "refinery_schema_history";

/// Names the squash changed on purpose, (before, after). The partitioned `events` was
/// created while the unpartitioned table it replaced still held `events_pkey`, so its
/// primary key got the next free name; built directly, it gets the plain one. No code
/// names it.
const RENAMED_BY_THE_SQUASH: &[(&str, &str)] = &[("events_pkey1", "events_pkey")];

/// One catalog query per kind of object. Each row is (key, definition): the key names the
/// object, the definition is everything about it that a migration decides.
/// Column order is not compared: `event_insert_ids` lists its key columns first now, and
/// every query names its columns.
const CATALOG_QUERIES: &[(&str, &str)] = &[
    (
        "relation",
        "SELECT c.relname::text,
                concat_ws(' | ', 'kind ' || c.relkind::text, 'persistence ' || c.relpersistence::text,
                          'owner ' || pg_get_userbyid(c.relowner),
                          'partitioned by ' || pg_get_partkeydef(c.oid),
                          'partition ' || pg_get_expr(c.relpartbound, c.oid),
                          'options ' || c.reloptions::text, 'acl ' || c.relacl::text,
                          'row security ' || c.relrowsecurity::text,
                          'comment ' || obj_description(c.oid, 'pg_class'))
           FROM pg_class c
          WHERE c.relnamespace = 'public'::regnamespace AND c.relname NOT LIKE $1",
    ),
    (
        "column",
        "SELECT c.relname || '.' || a.attname,
                concat_ws(' | ', format_type(a.atttypid, a.atttypmod),
                          CASE WHEN a.attnotnull THEN 'NOT NULL' ELSE 'NULL' END,
                          'default ' || pg_get_expr(d.adbin, d.adrelid),
                          'identity ' || nullif(a.attidentity, '')::text,
                          'generated ' || nullif(a.attgenerated, '')::text,
                          'storage ' || a.attstorage::text, 'compression ' || nullif(a.attcompression, '')::text,
                          'collation ' || co.collname, 'comment ' || col_description(c.oid, a.attnum))
           FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           LEFT JOIN pg_collation co ON co.oid = a.attcollation
          WHERE c.relnamespace = 'public'::regnamespace AND c.relname NOT LIKE $1
            AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND a.attnum > 0 AND NOT a.attisdropped",
    ),
    (
        "index",
        "SELECT indexname::text, tablename || ': ' || indexdef
           FROM pg_indexes
          WHERE schemaname = 'public' AND tablename NOT LIKE $1",
    ),
    (
        "inherits",
        "SELECT child.relname::text, parent.relname || ' #' || i.inhseqno
           FROM pg_inherits i
           JOIN pg_class child ON child.oid = i.inhrelid
           JOIN pg_class parent ON parent.oid = i.inhparent
          WHERE child.relnamespace = 'public'::regnamespace AND child.relname NOT LIKE $1",
    ),
    (
        "constraint",
        "SELECT c.relname || '.' || con.conname,
                concat_ws(' | ', 'type ' || con.contype::text, pg_get_constraintdef(con.oid),
                          'deferrable ' || con.condeferrable::text, 'deferred ' || con.condeferred::text,
                          'validated ' || con.convalidated::text, 'local ' || con.conislocal::text,
                          'inherited ' || con.coninhcount::text)
           FROM pg_constraint con
           JOIN pg_class c ON c.oid = con.conrelid
          WHERE con.connamespace = 'public'::regnamespace AND c.relname NOT LIKE $1",
    ),
    (
        "function",
        "SELECT p.oid::regprocedure::text,
                concat_ws(' | ', pg_get_functiondef(p.oid), 'acl ' || p.proacl::text,
                          'comment ' || obj_description(p.oid, 'pg_proc'))
           FROM pg_proc p
          WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p') AND p.proname NOT LIKE $1",
    ),
    (
        "trigger",
        "SELECT c.relname || '.' || t.tgname, pg_get_triggerdef(t.oid) || ' | ' || t.tgenabled::text
           FROM pg_trigger t
           JOIN pg_class c ON c.oid = t.tgrelid
          WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal AND c.relname NOT LIKE $1",
    ),
    (
        "sequence",
        "SELECT sequencename::text,
                concat_ws(' | ', data_type, 'start ' || start_value, 'min ' || min_value,
                          'max ' || max_value, 'increment ' || increment_by, 'cycle ' || cycle,
                          'cache ' || cache_size, 'owner ' || sequenceowner)
           FROM pg_sequences
          WHERE schemaname = 'public' AND sequencename NOT LIKE $1",
    ),
    (
        "sequence owner",
        "SELECT s.relname::text, t.relname || '.' || a.attname || ' ' || d.deptype::text
           FROM pg_depend d
           JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
           JOIN pg_class t ON t.oid = d.refobjid
           JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
          WHERE s.relnamespace = 'public'::regnamespace AND s.relname NOT LIKE $1",
    ),
    (
        "type",
        "SELECT t.typname::text,
                concat_ws(' | ', 'kind ' || t.typtype::text, 'base ' || format_type(t.typbasetype, t.typtypmod),
                          'not null ' || t.typnotnull::text, 'default ' || t.typdefault)
           FROM pg_type t
          WHERE t.typnamespace = 'public'::regnamespace AND t.typname NOT LIKE $1
            AND t.typtype IN ('b', 'd', 'e', 'r', 'm') AND t.typcategory <> 'A'",
    ),
    (
        "enum label",
        "SELECT t.typname || '.' || e.enumlabel, e.enumsortorder::text
           FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
          WHERE t.typnamespace = 'public'::regnamespace AND t.typname NOT LIKE $1",
    ),
    ("extension", "SELECT extname::text, extversion FROM pg_extension WHERE extname NOT LIKE $1"),
    (
        "rule",
        "SELECT tablename || '.' || rulename, definition
           FROM pg_rules WHERE schemaname = 'public' AND tablename NOT LIKE $1",
    ),
    (
        "policy",
        "SELECT tablename || '.' || policyname,
                concat_ws(' | ', permissive, roles::text, cmd, qual, with_check)
           FROM pg_policies WHERE schemaname = 'public' AND tablename NOT LIKE $1",
    ),
    (
        "statistics",
        "SELECT stxname::text, pg_get_statisticsobjdef(oid)
           FROM pg_statistic_ext WHERE stxnamespace = 'public'::regnamespace AND stxname NOT LIKE $1",
    ),
];

/// Every object of the `public` schema (refinery's history table aside), keyed by
/// "kind name", with its definition.
async fn schema_snapshot(connection: &mut PgConnection) -> BTreeMap<String, String> {
    let excluded = format!("{HISTORY_TABLE}%");
    let mut snapshot = BTreeMap::new();
    for (kind, query) in CATALOG_QUERIES {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(query)
            .bind(&excluded)
            .fetch_all(&mut *connection)
            .await
            .unwrap_or_else(|error| panic!("catalog query for {kind}: {error}"));
        for (name, definition) in rows {
            let previous = snapshot.insert(format!("{kind} {name}"), definition.unwrap_or_default());
            assert!(previous.is_none(), "{kind} {name} listed twice");
        }
    }
    snapshot
}

/// `snapshot` with every name of `renames` replaced, in keys and definitions.
fn renamed(snapshot: &BTreeMap<String, String>, renames: &[(&str, &str)]) -> BTreeMap<String, String> {
    let rename = |text: &str| {
        renames.iter().fold(text.to_owned(), |text, (before, after)| text.replace(before, after))
    };
    snapshot.iter().map(|(key, definition)| (rename(key), rename(definition))).collect()
}

/// Every way two snapshots differ, one line each; empty when they are equal.
fn differences(left: &BTreeMap<String, String>, right: &BTreeMap<String, String>) -> Vec<String> {
    let mut lines = Vec::new();
    for (key, left_definition) in left {
        match right.get(key) {
            None => lines.push(format!("only before the squash: {key}: {left_definition}")),
            Some(right_definition) if right_definition != left_definition => lines
                .push(format!("{key} differs:\n  before: {left_definition}\n  after:  {right_definition}")),
            Some(_) => {}
        }
    }
    for (key, right_definition) in right {
        if !left.contains_key(key) {
            lines.push(format!("only after the squash: {key}: {right_definition}"));
        }
    }
    lines
}

/// Applies the SQL files of `directory` (named like refinery's `V<n>__<name>.sql`) in
/// version order, each in its own transaction, as refinery does.
async fn apply_migration_files(pool: &PgPool, directory: &Path) {
    let mut files: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "sql"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let version = name
                .strip_prefix('V')
                .and_then(|rest| rest.split_once("__"))
                .and_then(|(version, _)| version.parse().ok())
                .unwrap_or_else(|| panic!("{name} is not named V<n>__<name>.sql"));
            (version, path)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no migrations in {}", directory.display());
    let mut connection = pool.acquire().await.unwrap();
    for (_, path) in files {
        let sql = std::fs::read_to_string(&path).unwrap();
        let mut transaction = connection.begin().await.unwrap();
        sqlx::raw_sql(&sql)
            .execute(&mut *transaction)
            .await
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        transaction.commit().await.unwrap();
    }
}

/// A fresh database and a pool on it.
async fn fresh_database() -> (String, PgPool) {
    let name = create_database().await;
    let config = test_config(&name, "unused", &TestOptions::default());
    let pool = PgPoolOptions::new().max_connections(1).connect_with(connect_options(&config)).await.unwrap();
    (name, pool)
}

/// The migrations that replaced the pre-squash ones. Later migrations change the schema
/// on purpose and are not part of the comparison.
const SQUASHED_UP_TO: i32 = 4;

/// The squashed migrations, applied by the runner `analytics-service migrate` uses.
async fn migrated_database() -> (String, PgPool) {
    let (name, pool) = fresh_database().await;
    let config = test_config(&name, "unused", &TestOptions::default());
    schema::migrate_up_to(&connect_options(&config), Some(SQUASHED_UP_TO)).await.expect("migrations apply");
    let applied: Vec<i32> =
        sqlx::query_scalar(&format!("SELECT version FROM {HISTORY_TABLE} ORDER BY version"))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(applied, (1..=SQUASHED_UP_TO).collect::<Vec<_>>(), "only the squashed migrations apply");
    (name, pool)
}

#[tokio::test]
async fn squashed_migrations_build_the_same_schema_as_the_migrations_they_replace() {
    let (before_name, before_pool) = fresh_database().await;
    apply_migration_files(&before_pool, Path::new(MIGRATIONS_BEFORE_SQUASH)).await;
    let (after_name, after_pool) = migrated_database().await;

    let before = schema_snapshot(&mut before_pool.acquire().await.unwrap()).await;
    for (old_name, _) in RENAMED_BY_THE_SQUASH {
        assert!(
            before.keys().any(|key| key.ends_with(old_name)),
            "{old_name} exists before the squash, else drop it from RENAMED_BY_THE_SQUASH"
        );
    }
    let before = renamed(&before, RENAMED_BY_THE_SQUASH);
    let after = schema_snapshot(&mut after_pool.acquire().await.unwrap()).await;
    for expected in [
        "relation events",
        "relation event_insert_ids",
        "relation user_activity_daily",
        "index idx_events_event_name_timestamp",
        "constraint event_insert_ids.event_insert_ids_pkey",
        "function analytics_drop_event_partitions_before(timestamp with time zone)",
        "trigger events.events_rollup_after_insert",
        "sequence user_ordinals_ordinal_seq",
    ] {
        assert!(after.contains_key(expected), "the snapshot sees {expected}: {:#?}", after.keys());
    }
    assert!(
        after.keys().any(|key| key.starts_with("inherits events_p")),
        "the snapshot sees the monthly partitions"
    );
    let differences = differences(&before, &after);
    assert!(differences.is_empty(), "the schemas differ:\n{}", differences.join("\n"));

    before_pool.close().await;
    after_pool.close().await;
    drop_database(&before_name).await;
    drop_database(&after_name).await;
}

/// The positive control: the comparison above reports a difference of each kind it must
/// catch, so an empty report means equal schemas, not a blind comparison.
#[tokio::test]
async fn the_schema_comparison_reports_every_deliberate_difference() {
    let (name, pool) = migrated_database().await;
    let original = schema_snapshot(&mut pool.acquire().await.unwrap()).await;
    assert!(differences(&original, &schema_snapshot(&mut pool.acquire().await.unwrap()).await).is_empty());

    let changes: &[(&str, &str)] = &[
        ("CREATE INDEX idx_extra ON event_insert_ids (event_id)", "index idx_extra"),
        ("ALTER TABLE user_activity_daily ALTER COLUMN version SET DEFAULT 2", "column user_activity_daily.version"),
        ("ALTER TABLE events ALTER COLUMN user_id SET NOT NULL", "column events.user_id"),
        ("ALTER TABLE event_counts_daily ALTER COLUMN event_count TYPE numeric", "column event_counts_daily.event_count"),
        ("ALTER TABLE user_activity_pending ALTER COLUMN user_ids SET STORAGE EXTENDED", "column user_activity_pending.user_ids"),
        (
            "ALTER TABLE event_totals_hourly ADD CONSTRAINT positive CHECK (event_count > 0)",
            "constraint event_totals_hourly.positive",
        ),
        (
            "CREATE OR REPLACE FUNCTION analytics_forget_rollups_before(boundary timestamptz)
             RETURNS void LANGUAGE sql AS $$ SELECT NULL::void $$",
            "function analytics_forget_rollups_before(timestamp with time zone)",
        ),
        ("ALTER TABLE events DISABLE TRIGGER events_rollup_after_insert", "trigger events.events_rollup_after_insert"),
        ("ALTER SEQUENCE user_ordinals_ordinal_seq INCREMENT BY 2", "sequence user_ordinals_ordinal_seq"),
        ("CREATE TABLE events_p209901 PARTITION OF events FOR VALUES FROM ('2099-01-01') TO ('2099-02-01')", "inherits events_p209901"),
    ];
    for (statement, expected) in changes {
        // Each change is made and undone in a transaction, so it is seen alone.
        let mut transaction = pool.begin().await.unwrap();
        sqlx::raw_sql(statement).execute(&mut *transaction).await.unwrap();
        let changed = schema_snapshot(&mut transaction).await;
        transaction.rollback().await.unwrap();
        let reported = differences(&original, &changed);
        assert!(
            reported.iter().any(|line| line.contains(&format!("{expected}:"))
                || line.contains(&format!("{expected} differs"))),
            "`{statement}` must be reported as {expected}; reported: {reported:#?}"
        );
    }
    assert!(
        differences(&original, &schema_snapshot(&mut pool.acquire().await.unwrap()).await).is_empty(),
        "every change rolled back"
    );

    pool.close().await;
    drop_database(&name).await;
}
