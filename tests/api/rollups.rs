//! Counts from rollups equal brute-force SQL over `events` (random data, ranges, names,
//! groupings and time zones, late events included), DST days in the caller's zone, monthly
//! partitions ahead of time and retention, and the move from the unpartitioned table. The
//! brute-force answers here are shared with `rollups_fold`.

use analytics_service::pb;
use analytics_service::repository::postgres::{
    connect_options, fold, hour_spans, partitions, schema, Database,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{PgPool, Row};
use tonic::Code;

use crate::helpers::{create_database, now, spawn_app, start_server, test_config, TestApp, TestOptions};

pub const HOUR: i64 = 3_600;
pub const DAY: i64 = 86_400;
pub const ZONES: [&str; 9] = [
    "",
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/St_Johns",
];
/// Offsets of 30 and 45 minutes, and Lord Howe's 30-minute DST shift.
const ODD_OFFSET_ZONES: [&str; 5] =
    ["Australia/Lord_Howe", "Asia/Kathmandu", "Pacific/Chatham", "Asia/Kolkata", "America/St_Johns"];
pub const NAMES: [&str; 5] = ["view", "click", "signup", "purchase", "logout"];

pub type Counts = Vec<(String, i64, i64)>;

/// The answer computed from the raw rows alone. Hours are cut at the local hour (minutes
/// and seconds of local time removed), so a repeated local hour stays two buckets.
pub async fn brute_force_counts(
    pool: &PgPool,
    name: &str,
    start: i64,
    end: i64,
    group_by: &str,
    zone: &str,
) -> Counts {
    let zone = if zone.is_empty() { "UTC" } else { zone };
    let bucket = match group_by {
        "hour" => {
            "floor(EXTRACT(EPOCH FROM timestamp))::bigint
                   - extract(minute FROM timestamp AT TIME ZONE $4)::bigint * 60
                   - floor(extract(second FROM timestamp AT TIME ZONE $4))::bigint"
        }
        "day" => "EXTRACT(EPOCH FROM date_trunc('day', timestamp, $4))::bigint",
        "week" => "EXTRACT(EPOCH FROM date_trunc('week', timestamp, $4))::bigint",
        _ => "$1::bigint + 0 * length($4)",
    };
    let sql = format!(
        "SELECT event_name, {bucket} AS bucket, count(*) AS count FROM events
          WHERE timestamp >= to_timestamp($1) AND timestamp < to_timestamp($2)
            AND ($3 = '' OR event_name = $3)
          GROUP BY 1, 2 ORDER BY bucket, event_name"
    );
    sqlx::query(&sql)
        .bind(start)
        .bind(end)
        .bind(name)
        .bind(zone)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get("event_name"), row.get("bucket"), row.get("count")))
        .collect()
}

pub async fn brute_force_unique_users(pool: &PgPool, start: i64, end: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT user_id) FROM events
          WHERE timestamp >= to_timestamp($1) AND timestamp < to_timestamp($2) AND user_id <> ''",
    )
    .bind(start)
    .bind(end)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// One multi-row INSERT (one trigger run) of `count` random events in `[from, to)`;
/// some fall exactly on hour starts to exercise bucket edges.
pub async fn insert_random_events(pool: &PgPool, random: &mut StdRng, count: usize, from: i64, to: i64) {
    let mut events = Vec::new();
    for _ in 0..count {
        let name = NAMES[random.random_range(0..NAMES.len())].to_string();
        let user = random.random_range(0..60);
        let user = if user < 5 { String::new() } else { format!("user-{user}") };
        let mut timestamp = random.random_range(from..to);
        if random.random_bool(0.1) {
            timestamp = timestamp.div_euclid(HOUR) * HOUR;
        }
        events.push((name, user, timestamp as f64 + if random.random_bool(0.2) { 0.25 } else { 0.0 }));
    }
    let rows: Vec<(&str, &str, f64)> =
        events.iter().map(|(name, user, seconds)| (name.as_str(), user.as_str(), *seconds)).collect();
    insert_rows(pool, &rows).await;
}

/// Adds `(name, user, seconds)` rows in one statement (one trigger run), behind the
/// service's back.
pub async fn insert_rows(pool: &PgPool, rows: &[(&str, &str, f64)]) {
    let names: Vec<&str> = rows.iter().map(|(name, _, _)| *name).collect();
    let users: Vec<&str> = rows.iter().map(|(_, user, _)| *user).collect();
    let seconds: Vec<f64> = rows.iter().map(|(_, _, seconds)| *seconds).collect();
    sqlx::query(
        "INSERT INTO events (event_name, user_id, timestamp)
         SELECT name, user_id, to_timestamp(seconds)
           FROM unnest($1::text[], $2::text[], $3::float8[]) AS batch(name, user_id, seconds)",
    )
    .bind(&names)
    .bind(&users)
    .bind(&seconds)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn compare_random_queries(app: &TestApp, random: &mut StdRng, from: i64, to: i64, queries: usize) {
    compare_random_queries_in(app, random, from, to, queries, &ZONES, 45 * DAY).await;
}

async fn compare_random_queries_in(
    app: &TestApp,
    random: &mut StdRng,
    from: i64,
    to: i64,
    queries: usize,
    zones: &[&str],
    longest: i64,
) {
    for _ in 0..queries {
        let start = random.random_range(from - DAY..to);
        let end = start + random.random_range(1..longest);
        let name = if random.random_bool(0.5) { "" } else { NAMES[random.random_range(0..NAMES.len())] };
        let group_by = ["", "hour", "day", "week"][random.random_range(0..4)];
        let zone = zones[random.random_range(0..zones.len())];
        let answer = app.counts(name, start, end, group_by, zone).await;
        let expected = brute_force_counts(&app.pool, name, start, end, group_by, zone).await;
        assert_eq!(answer, expected, "name {name:?} [{start}, {end}) group_by {group_by:?} zone {zone:?}");
        let users = app.unique_users(start, end).await;
        assert_eq!(users, brute_force_unique_users(&app.pool, start, end).await, "users in [{start}, {end})");
    }
}

#[tokio::test]
async fn rollup_counts_equal_brute_force_sql_for_random_ranges_names_groupings_and_zones() {
    let app = spawn_app().await;
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut random = StdRng::seed_from_u64(seed);
    let to = now() - HOUR;
    let from = to - 40 * DAY;
    for _ in 0..4 {
        insert_random_events(&app.pool, &mut random, 1_500, from, to).await;
    }
    compare_random_queries(&app, &mut random, from, to, 60).await;

    // Late events into buckets already asked about: the rollups and answers follow.
    for _ in 0..3 {
        insert_random_events(&app.pool, &mut random, 300, from, to).await;
    }
    compare_random_queries(&app, &mut random, from, to, 30).await;

    // Whole-range sums of the rollups and the deltas not folded yet equal the table, read
    // in one snapshot (the fold task runs meanwhile).
    let (events, by_hour, by_day, by_hour_total): (i64, i64, i64, i64) = sqlx::query_as(
        "WITH deltas AS (SELECT coalesce(sum(event_count), 0)::bigint AS n FROM event_count_deltas)
         SELECT (SELECT count(*) FROM events),
                (SELECT coalesce(sum(event_count), 0)::bigint FROM event_counts_hourly) + (SELECT n FROM deltas),
                (SELECT coalesce(sum(event_count), 0)::bigint FROM event_counts_daily) + (SELECT n FROM deltas),
                (SELECT coalesce(sum(event_count), 0)::bigint FROM event_totals_hourly) + (SELECT n FROM deltas)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((by_hour, by_day, by_hour_total), (events, events, events));
}

/// Zones offset by 30 and 45 minutes, around their DST shifts (Lord Howe moves by 30
/// minutes, Chatham by an hour at :45), grouped by hour, day and week: equal to raw SQL.
#[tokio::test]
async fn zones_with_half_and_quarter_hour_offsets_match_raw_sql_across_their_dst_shifts() {
    let app = spawn_app().await;
    let database = Database::connect_lazy(&app.config);
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut random = StdRng::seed_from_u64(seed);
    // 2026-04-05: Lord Howe +11 -> +10:30 and Chatham +13:45 -> +12:45; 2026-09-27: Chatham
    // back to +13:45; 2026-10-04: Lord Howe back to +11.
    let windows = [(1_774_828_800, 1_776_038_400), (1_789_776_000, 1_791_763_200)];
    for (from, to) in windows {
        partitions::ensure_partitions(
            &database,
            chrono::DateTime::from_timestamp(from - 2 * DAY, 0).unwrap(),
            chrono::DateTime::from_timestamp(to + 30 * DAY, 0).unwrap(),
        )
        .await
        .unwrap();
        for _ in 0..2 {
            insert_random_events(&app.pool, &mut random, 1_500, from - DAY, to + 20 * DAY).await;
        }
    }
    for (from, to) in windows {
        compare_random_queries_in(&app, &mut random, from, to, 40, &ODD_OFFSET_ZONES, 20 * DAY).await;
    }
    // The case that labelled the first Lord Howe day 00:30 local instead of midnight.
    let lord_howe =
        app.counts("", 1_791_107_779, 1_791_107_779 + 3 * DAY, "day", "Australia/Lord_Howe").await;
    let expected = brute_force_counts(
        &app.pool,
        "",
        1_791_107_779,
        1_791_107_779 + 3 * DAY,
        "day",
        "Australia/Lord_Howe",
    )
    .await;
    assert_eq!(lord_howe, expected);
    assert_eq!(lord_howe.first().map(|(_, bucket, _)| *bucket), Some(1_791_034_200), "local midnight");
}

/// The largest grouped answers (10,000 buckets of each grouping, up to 190 years of
/// weeks) in several zones are equal to raw SQL, with events near both ends of the
/// range and in between.
#[tokio::test]
async fn counts_at_the_bucket_cap_equal_raw_sql_for_every_grouping_and_zone() {
    let app = spawn_app().await;
    let database = Database::connect_lazy(&app.config);
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut random = StdRng::seed_from_u64(seed);
    let end = now() - 2 * HOUR - 17 * 60;
    // Months far back (the start of a 190-year range, 20 and 1 year ago) and recent days.
    for years_back in [189, 20, 1] {
        let from = end - years_back * 365 * DAY;
        partitions::ensure_partitions(
            &database,
            chrono::DateTime::from_timestamp(from, 0).unwrap(),
            chrono::DateTime::from_timestamp(from + 20 * DAY, 0).unwrap(),
        )
        .await
        .unwrap();
        insert_random_events(&app.pool, &mut random, 300, from, from + 20 * DAY).await;
    }
    insert_random_events(&app.pool, &mut random, 1_500, end - 20 * DAY, end).await;
    for zone in ["", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"] {
        for (group_by, width) in [("hour", HOUR), ("day", DAY), ("week", 7 * DAY)] {
            // 9,999 bucket widths plus a partial first bucket: 10,000 buckets.
            let start = end - 9_999 * width + 1_234;
            for name in ["", "click"] {
                let answer = app.counts(name, start, end, group_by, zone).await;
                let expected = brute_force_counts(&app.pool, name, start, end, group_by, zone).await;
                assert!(!answer.is_empty(), "{group_by} {zone:?}");
                assert_eq!(answer, expected, "[{start}, {end}) by {group_by} in {zone:?}, name {name:?}");
            }
        }
    }
}

/// Inserts one event at the start of every UTC hour in `[from, to)`.
async fn one_event_per_hour(pool: &PgPool, from: i64, to: i64) {
    sqlx::query(
        "INSERT INTO events (event_name, user_id, timestamp)
         SELECT 'tick', 'clock', hour FROM generate_series(to_timestamp($1), to_timestamp($2) - interval '1 second', interval '1 hour') hour",
    )
    .bind(from)
    .bind(to)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn berlin_days_around_dst_transitions_have_23_and_25_hours_of_events() {
    let app = spawn_app().await;
    let database = Database::connect_lazy(&app.config);
    // 2026-03-29: clocks go from 02:00 CET to 03:00 CEST; 2026-10-25: from 03:00 CEST to 02:00 CET.
    let march_28_berlin = 1_774_652_400; // 2026-03-28T00:00+01:00
    let october_24_berlin = 1_792_792_800; // 2026-10-24T00:00+02:00
    partitions::ensure_partitions(
        &database,
        chrono::DateTime::from_timestamp(march_28_berlin, 0).unwrap(),
        chrono::DateTime::from_timestamp(october_24_berlin + 4 * DAY, 0).unwrap(),
    )
    .await
    .unwrap();
    one_event_per_hour(&app.pool, march_28_berlin, march_28_berlin + 3 * DAY).await;
    one_event_per_hour(&app.pool, october_24_berlin, october_24_berlin + 4 * DAY).await;

    let spring =
        app.counts("tick", march_28_berlin, march_28_berlin + 3 * DAY - HOUR, "day", "Europe/Berlin").await;
    assert_eq!(
        spring,
        vec![
            ("tick".into(), march_28_berlin, 24),
            ("tick".into(), march_28_berlin + DAY, 23),
            ("tick".into(), march_28_berlin + 2 * DAY - HOUR, 24),
        ]
    );
    let autumn = app
        .counts("tick", october_24_berlin, october_24_berlin + 3 * DAY + HOUR, "day", "Europe/Berlin")
        .await;
    assert_eq!(
        autumn,
        vec![
            ("tick".into(), october_24_berlin, 24),
            ("tick".into(), october_24_berlin + DAY, 25),
            ("tick".into(), october_24_berlin + 2 * DAY + HOUR, 24),
        ]
    );
    // The repeated local hour 02:00-03:00 on October 25 is two hourly buckets.
    let autumn_hours = app
        .counts("tick", october_24_berlin + DAY, october_24_berlin + 2 * DAY + HOUR, "hour", "Europe/Berlin")
        .await;
    assert_eq!(autumn_hours.len(), 25);
    assert!(autumn_hours.iter().all(|(_, _, count)| *count == 1), "{autumn_hours:?}");
    // In UTC the same events make 24-hour days.
    let utc_days = app
        .counts("tick", october_24_berlin + 2 * HOUR, october_24_berlin + 2 * HOUR + 2 * DAY, "day", "")
        .await;
    assert_eq!(utc_days.iter().map(|(_, _, count)| *count).collect::<Vec<_>>(), vec![24, 24]);

    let status = app
        .client
        .clone()
        .get_event_count(pb::GetEventCountRequest {
            start_time: march_28_berlin,
            end_time: march_28_berlin + DAY,
            group_by: "day".into(),
            time_zone: "Mars/Olympus_Mons".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("time_zone"), "{}", status.message());
}

async fn total_count(app: &TestApp, start: i64, end: i64) -> i64 {
    app.counts("", start, end, "", "").await.iter().map(|(_, _, count)| count).sum()
}

#[tokio::test]
async fn new_months_get_partitions_ahead_and_retention_drops_whole_old_ones() {
    // The schema and rows exist before the server starts; the server then applies
    // EVENT_RETENTION_DAYS=90 in its periodic partition task.
    let database_name = create_database().await;
    let redis_prefix = format!("test:{}", uuid::Uuid::now_v7().simple());
    let options =
        TestOptions { env: vec![("EVENT_RETENTION_DAYS".into(), "90".into())], ..TestOptions::default() };
    let config = test_config(&database_name, &redis_prefix, &options);
    schema::migrate(&connect_options(&config)).await.expect("migrations apply");
    let database = Database::connect_lazy(&config);
    let pool = database.pool().clone();
    let insert = |seconds: i64| {
        sqlx::query(
            "INSERT INTO events (event_name, user_id, timestamp) VALUES ('view', 'alice', to_timestamp($1))",
        )
        .bind(seconds)
        .execute(&pool)
    };
    let current = chrono::Utc::now();

    // Six months ahead has no partition yet: the insert fails; once created ahead it works.
    let far_future = (current + chrono::Duration::days(183)).timestamp();
    assert!(insert(far_future).await.is_err(), "no partition yet");
    partitions::ensure_partitions(&database, current, current + chrono::Duration::days(200)).await.unwrap();
    insert(far_future).await.expect("inserting into a new month works");

    // An old month (older than the retention) and a recent event.
    let old = (current - chrono::Duration::days(200)).timestamp();
    partitions::ensure_partitions(&database, current - chrono::Duration::days(200), current).await.unwrap();
    insert(old).await.unwrap();
    let recent = (current - chrono::Duration::days(2)).timestamp();
    insert(recent).await.unwrap();
    let old_partition =
        format!("events_p{}", chrono::DateTime::from_timestamp(old, 0).unwrap().format("%Y%m"));
    let partition_exists = || async {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
            .bind(&old_partition)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert!(partition_exists().await);
    // The old month's hour is folded and spanned, as a running service would have done.
    fold::fold_all_pending(&database).await.unwrap();
    assert!(hour_spans::build_all_hour_spans(&database, current.timestamp()).await.unwrap() >= 2);
    let old_spans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_activity_hour_spans WHERE hour_start < to_timestamp($1)",
    )
    .bind(old + DAY)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(old_spans, 1, "the old month's hour has its spans");

    let app = start_server(config, database_name, redis_prefix).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while partition_exists().await {
        assert!(std::time::Instant::now() < deadline, "the serve task drops {old_partition}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(total_count(&app, old - DAY, old + DAY).await, 0, "counts reflect the dropped month");
    assert_eq!(app.unique_users(old - DAY, old + DAY).await, 0);
    let old_rollups: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM event_counts_hourly WHERE bucket_start < to_timestamp($1))
              + (SELECT count(*) FROM event_counts_daily WHERE bucket_start < to_timestamp($1))
              + (SELECT count(*) FROM user_activity_hourly WHERE bucket_start < to_timestamp($1))
              + (SELECT count(*) FROM user_activity_daily WHERE bucket_start < to_timestamp($1))
              + (SELECT count(*) FROM user_activity_pending WHERE hour_start < to_timestamp($1))
              + (SELECT count(*) FROM user_activity_hour_spans WHERE hour_start < to_timestamp($1))",
    )
    .bind(old + DAY)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(old_rollups, 0, "the rollup rows of the dropped month go too");
    assert_eq!(total_count(&app, recent - DAY, recent + DAY).await, 1, "recent months stay");
    assert_eq!(total_count(&app, far_future - DAY, far_future + DAY).await, 1, "future months stay");
}
