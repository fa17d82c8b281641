//! Cache-aside for count queries: hits come from Redis (proved by changing the rows
//! underneath), and a missing Redis never breaks a query.

use analytics_service::pb;
use redis::AsyncCommands;

use crate::helpers::{
    metric_value, monday_two_weeks_ago, redis_host, redis_port, spawn_app_with, RedisMode, TestApp,
    TestOptions,
};

const HOUR: i64 = 3_600;

async fn view_count(app: &TestApp, start: i64, end: i64) -> i64 {
    app.client
        .clone()
        .get_event_count(pb::GetEventCountRequest {
            event_name: "view".into(),
            start_time: start,
            end_time: end,
            group_by: "hour".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .counts
        .iter()
        .map(|count| count.count)
        .sum()
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

#[tokio::test]
async fn a_repeated_count_query_is_served_from_redis() {
    let app = spawn_app_with(TestOptions::default()).await;
    let base = monday_two_weeks_ago();
    app.track("view", "alice", base + 10).await;

    assert_eq!(view_count(&app, base, base + HOUR).await, 1);
    assert_eq!(app.unique_users(base, base + HOUR).await, 1);
    insert_directly(&app, "bob", base + 20).await;

    assert_eq!(
        view_count(&app, base, base + HOUR).await,
        1,
        "the identical query is answered from the cache"
    );
    assert_eq!(
        app.unique_users(base, base + HOUR).await,
        1,
        "the identical query is answered from the cache"
    );
    assert_eq!(view_count(&app, base, base + HOUR + 1).await, 2, "a different range is computed fresh");
    assert_eq!(app.unique_users(base, base + HOUR + 1).await, 2, "a different range is computed fresh");

    let (_, metrics) = app.admin_get("/metrics").await;
    let series = |query: &str, result: &str| {
        metric_value(
            &metrics,
            &format!("analytics_cache_requests_total{{query=\"{query}\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(series("event_count", "hit"), 1.0, "{metrics}");
    assert_eq!(series("event_count", "miss"), 2.0);
    assert_eq!(series("user_count", "hit"), 1.0);
    assert_eq!(series("user_count", "miss"), 2.0);

    // The entries live under this test's prefix, with the configured TTL.
    let client = redis::Client::open(format!("redis://{}:{}/", redis_host(), redis_port())).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = connection.keys(format!("{}:cache:*", app.redis_prefix)).await.unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    let ttl: i64 = connection.ttl(&keys[0]).await.unwrap();
    assert!((1..=300).contains(&ttl), "ttl {ttl}");
    let _: () = connection.del(keys).await.unwrap();
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
