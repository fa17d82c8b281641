//! Cache-aside for count queries: answers over closed ranges come from Redis (proved by
//! changing the rows underneath); within the late-event window the whole hours of an
//! answer are cached with a stamp and a late event is in the next answer; the partial
//! hours at the edges are always fresh; and a missing Redis never breaks a query.

use std::time::Duration;

use analytics_service::pb;
use redis::AsyncCommands;
use sqlx::Connection;

use crate::helpers::{
    metric_value, monday_two_weeks_ago, redis_host, redis_port, spawn_app_with, RedisMode, TestApp,
    TestOptions,
};

const HOUR: i64 = 3_600;

async fn view_count(app: &TestApp, start: i64, end: i64) -> i64 {
    app.counts("view", start, end, "hour", "").await.iter().map(|(_, _, count)| count).sum()
}

/// Adds a row behind the service's back, so only a fresh query can see it.
async fn insert_directly(app: &TestApp, user_id: &str, timestamp: i64) {
    sqlx::query("INSERT INTO events (event_name, user_id, timestamp) VALUES ('view', $1, to_timestamp($2))")
        .bind(user_id)
        .bind(timestamp as f64)
        .execute(&app.pool)
        .await
        .unwrap();
}

fn cache_series(metrics: &str, query: &str, result: &str) -> f64 {
    metric_value(metrics, &format!("analytics_cache_requests_total{{query=\"{query}\",result=\"{result}\"}}"))
}

#[tokio::test]
async fn a_closed_range_is_cached_with_a_long_expiry() {
    // A 7-day late-event window: two weeks ago is closed, no event can land there.
    let options =
        TestOptions { env: vec![("EVENT_MAX_AGE_DAYS".into(), "7".into())], ..TestOptions::default() };
    let app = spawn_app_with(options).await;
    let base = monday_two_weeks_ago();
    insert_directly(&app, "alice", base + 10).await;

    assert_eq!(view_count(&app, base, base + HOUR).await, 1);
    assert_eq!(app.unique_users(base, base + HOUR).await, 1);
    // A write the API can no longer make, only to prove the next answers come from Redis.
    insert_directly(&app, "bob", base + 20).await;

    assert_eq!(
        view_count(&app, base, base + HOUR).await,
        1,
        "the identical closed query is answered from the cache"
    );
    assert_eq!(
        app.unique_users(base, base + HOUR).await,
        1,
        "the identical closed query is answered from the cache"
    );
    assert_eq!(view_count(&app, base, base + HOUR + 1).await, 2, "a different range is computed fresh");
    assert_eq!(app.unique_users(base, base + HOUR + 1).await, 2, "a different range is computed fresh");

    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(cache_series(&metrics, "event_count", "hit"), 1.0, "{metrics}");
    assert_eq!(cache_series(&metrics, "event_count", "miss"), 2.0);
    assert_eq!(cache_series(&metrics, "user_count", "hit"), 1.0);
    assert_eq!(cache_series(&metrics, "user_count", "miss"), 2.0);

    // The entries live under this test's prefix and expire after IMMUTABLE_CACHE_TTL.
    let client = redis::Client::open(format!("redis://{}:{}/", redis_host(), redis_port())).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = connection.keys(format!("{}:cache:*", app.redis_prefix)).await.unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for key in &keys {
        let ttl: i64 = connection.ttl(key).await.unwrap();
        let longest = 7 * 86_400; // IMMUTABLE_CACHE_TTL
        assert!(ttl > 300 && ttl <= longest, "{key} expires within {longest} s, ttl {ttl}");
    }
    let _: () = connection.del(keys).await.unwrap();
}

/// An event accepted at the edge of the late-event window whose commit is held up (here by
/// a table lock) is in every answer asked after it committed, even an answer first
/// computed while it was still in flight: its range is not yet closed for the cache.
#[tokio::test]
async fn an_edge_event_committing_late_is_never_missing_from_a_cached_answer() {
    let day = 86_400;
    let options = TestOptions {
        env: vec![("EVENT_MAX_AGE_DAYS".into(), "1".into()), ("REQUEST_TIMEOUT_SECONDS".into(), "30".into())],
        ..TestOptions::default()
    };
    let app = spawn_app_with(options).await;
    let edge = crate::helpers::now() - day + 3;
    let (start, end) = (edge - 2 * HOUR, edge + 1);

    let mut locker = sqlx::PgConnection::connect_with(
        &analytics_service::repository::postgres::connect_options(&app.config),
    )
    .await
    .unwrap();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE MODE").execute(&mut *lock).await.unwrap();
    let client = app.client.clone();
    let in_flight = tokio::spawn(async move {
        let mut client = client;
        client
            .track_event(pb::TrackEventRequest {
                timestamp: edge,
                ..crate::helpers::track_request("view", "edgar")
            })
            .await
    });
    // Until the window has moved past the whole range, then ask while the commit waits.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(crate::helpers::now() - day > end, "the range lies before the late-event window");
    assert_eq!(view_count(&app, start, end).await, 0, "not committed yet");
    assert_eq!(app.unique_users(start, end).await, 0, "not committed yet");
    lock.rollback().await.unwrap();
    in_flight.await.unwrap().expect("the edge event is accepted");

    assert_eq!(view_count(&app, start, end).await, 1, "the committed edge event is counted");
    assert_eq!(app.unique_users(start, end).await, 1, "the committed edge event is counted");
}

#[tokio::test]
async fn a_late_event_into_a_cached_hour_is_in_the_next_answer() {
    let app = spawn_app_with(TestOptions::default()).await;
    // Two days ago: an hour that has ended but is still inside the 30-day late-event window.
    // The range holds that whole hour (the cached folded part) and partial hours at the
    // edges (always read fresh).
    let hour = (crate::helpers::now() - 2 * 86_400).div_euclid(HOUR) * HOUR;
    let (start, end) = (hour - 1_800, hour + HOUR + 600);
    app.track("view", "alice", hour + 10).await;
    app.track("view", "carol", hour + HOUR + 100).await;
    app.wait_for_the_fold().await;
    assert_eq!(view_count(&app, start, end).await, 2, "computed, then cached");
    assert_eq!(view_count(&app, start, end).await, 2, "from the cache");
    assert_eq!(view_count(&app, start + 10, end + 10).await, 2, "a sliding range reuses the same whole hour");
    assert_eq!(app.unique_users(start, end).await, 2);

    // A change the rollups never make (it skips the stamp), only to prove the answer comes
    // from Redis; undone at once.
    let tamper = |delta: i64| {
        sqlx::query("UPDATE event_counts_hourly SET event_count = event_count + $1 WHERE bucket_start = to_timestamp($2)")
            .bind(delta)
            .bind(hour as f64)
            .execute(&app.pool)
    };
    tamper(100).await.unwrap();
    assert_eq!(view_count(&app, start, end).await, 2, "answered from the cache");
    tamper(-100).await.unwrap();

    // The late event, into the cached hour: in the fresh part until folded, then in the
    // rollups with a new stamp. Either way the very next answer has it.
    app.track("view", "bob", hour + 20).await;
    assert_eq!(view_count(&app, start, end).await, 3, "never stale");
    assert_eq!(app.unique_users(start, end).await, 3, "never stale");
    app.wait_for_the_fold().await;
    assert_eq!(view_count(&app, start, end).await, 3, "never stale, after the fold");
    app.track("view", "dave", hour + HOUR + 200).await; // into the fresh edge
    assert_eq!(view_count(&app, start, end).await, 4, "edges are read fresh");
    assert_eq!(app.unique_users(start, end).await, 4, "edges are read fresh");

    // One miss to fill the cache, one when the fold of bob's event changed the stamp.
    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(cache_series(&metrics, "event_count", "miss"), 2.0, "{metrics}");
    assert_eq!(cache_series(&metrics, "event_count", "hit"), 5.0, "{metrics}");
    assert_eq!(cache_series(&metrics, "event_count", "fresh"), 0.0, "{metrics}");

    // Users: once everything is folded the union is cached and reused while no fold
    // touches those hours.
    app.wait_for_the_fold().await;
    assert_eq!(app.unique_users(start, end).await, 4);
    let (_, before) = app.admin_get("/metrics").await;
    assert_eq!(app.unique_users(start, end).await, 4);
    let (_, after) = app.admin_get("/metrics").await;
    assert_eq!(
        cache_series(&after, "user_count", "hit") - cache_series(&before, "user_count", "hit"),
        1.0,
        "{after}"
    );

    // Entries over hours inside the late-event window expire after REDIS_CACHE_TTL.
    let client = redis::Client::open(format!("redis://{}:{}/", redis_host(), redis_port())).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = connection.keys(format!("{}:cache:*", app.redis_prefix)).await.unwrap();
    assert_eq!(keys.len(), 2, "one event-count and one user-count entry: {keys:?}");
    for key in &keys {
        let ttl: i64 = connection.ttl(key).await.unwrap();
        assert!((1..=300).contains(&ttl), "{key} expires within REDIS_CACHE_TTL, ttl {ttl}");
    }
}

async fn counts_stay_correct_without_a_cache(redis: RedisMode) {
    let app = spawn_app_with(TestOptions { redis, ..TestOptions::default() }).await;
    let base = monday_two_weeks_ago();
    app.track("view", "alice", base + 10).await;
    assert_eq!(view_count(&app, base, base + HOUR).await, 1);
    assert_eq!(app.unique_users(base, base + HOUR).await, 1);
    insert_directly(&app, "bob", base + 20).await;
    assert_eq!(view_count(&app, base, base + HOUR).await, 2, "no cache: always fresh");
    assert_eq!(app.unique_users(base, base + HOUR).await, 2, "no cache: always fresh");
    let (status, _) = app.admin_get("/readyz").await;
    assert_eq!(status, 200, "redis is not needed to be ready");
}

#[tokio::test]
async fn redis_on_a_closed_port_degrades_to_postgresql() {
    counts_stay_correct_without_a_cache(RedisMode::ClosedPort).await;
}

#[tokio::test]
async fn without_redis_configured_the_cache_is_off() {
    counts_stay_correct_without_a_cache(RedisMode::Disabled).await;
}

/// Adds `(name, user, seconds)` rows in one statement, behind the service's back.
async fn insert_rows(app: &TestApp, rows: &[(&str, &str, f64)]) {
    crate::rollups::insert_rows(&app.pool, rows).await;
}

/// The partial hours at a range's edges may be read whole (the hour's rollups and deltas
/// minus the raw events after or before the range; for users the hour's bitmap and
/// pending users when nothing lies outside the range): every answer, cached or not,
/// pending or folded, equals raw SQL around the end hour. Covered: an event exactly at
/// the range's end, a user and a name whose only event in the end hour lies after the
/// end, an event dated in the future inside the current hour, late events into both edge
/// hours, and zones offset by 30 and 45 minutes.
#[tokio::test]
async fn edge_hours_read_whole_equal_raw_sql_around_the_range_end() {
    use crate::rollups::{brute_force_counts, brute_force_unique_users};
    let app = spawn_app_with(TestOptions::default()).await;
    // An hour two days ago: inside the late-event window, so answers use the stamped cache.
    let hour = (crate::helpers::now() - 2 * 86_400).div_euclid(HOUR) * HOUR;
    let end = hour + 1_800;
    let start = hour - 3 * HOUR + 1_200;
    insert_rows(
        &app,
        &[
            ("view", "erin", (start - 300) as f64),
            ("view", "erin", (start + 60) as f64),
            ("click", "frank", (hour - 2 * HOUR) as f64),
            ("view", "alice", (hour + 10) as f64),
            ("click", "alice", end as f64 - 0.75),
            ("view", "bob", (hour + 600) as f64),
            // Exactly at the end: outside [start, end).
            ("view", "carol", end as f64),
            // Dave's only event and the only signup of the hour, after the end.
            ("signup", "dave", (end + 900) as f64),
        ],
    )
    .await;
    // The current hour, as a dashboard asking up to now sees it: one event dated 10
    // minutes in the future (its own user), which may fall into the next hour.
    let now = crate::helpers::now();
    app.track("view", "alice", now - 5).await;
    app.track("view", "future-gus", now + 600).await;

    let zones = ["", "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham"];
    let check = async |stage: &str| {
        let ranges = [
            (start, end),
            (start, end + 1),
            (hour + 5, end),
            (start, end + 900),
            (start, end + 901),
            (start - HOUR, hour + HOUR),
            (hour + 5, hour + HOUR - 5),
            (now - 2 * HOUR - 1_000, now + 1),
            (now - 1_000, now + 1),
        ];
        for (range_start, range_end) in ranges {
            for zone in zones {
                for group_by in ["", "hour", "day"] {
                    for name in ["", "view", "signup"] {
                        // Twice: computed (or from the cache), then from the cache.
                        for _ in 0..2 {
                            let answer = app.counts(name, range_start, range_end, group_by, zone).await;
                            let expected =
                                brute_force_counts(&app.pool, name, range_start, range_end, group_by, zone)
                                    .await;
                            assert_eq!(
                                answer, expected,
                                "{stage}: {name:?} [{range_start}, {range_end}) by {group_by:?} in {zone:?}"
                            );
                        }
                    }
                }
            }
            for _ in 0..2 {
                assert_eq!(
                    app.unique_users(range_start, range_end).await,
                    brute_force_unique_users(&app.pool, range_start, range_end).await,
                    "{stage}: users in [{range_start}, {range_end})"
                );
            }
        }
    };
    check("pending").await;
    app.wait_for_the_fold().await;
    check("folded").await;
    // Late events into both edge hours, inside and outside the ranges, one of a new user.
    insert_rows(
        &app,
        &[
            ("view", "hana", (start - 100) as f64),
            ("signup", "ivan", (hour + 100) as f64),
            ("signup", "bob", (end + 100) as f64),
            ("view", "dave", end as f64 - 1.0),
        ],
    )
    .await;
    check("late events pending").await;
    app.wait_for_the_fold().await;
    check("late events folded").await;
}
