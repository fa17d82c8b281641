//! Rate limiting shared through Redis: replicas share one budget per user, the answer
//! over the limit carries `retry-after`, and with Redis gone each replica falls back to
//! its own limiter and keeps serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use analytics_service::pb;
use tonic::Code;

use crate::helpers::{
    metric_value, redis_host, redis_port, spawn_app_with, start_server, TestApp, TestOptions,
};
use crate::proxy::TcpProxy;

const BUDGET: u32 = 4;
/// Seconds per refilled token (GCRA spreads the budget over the minute).
const REFILL_SECONDS: f64 = 60.0 / BUDGET as f64;

fn event(user: &str) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event_name: "limited".into(),
        user_id: user.into(),
        properties: HashMap::new(),
        timestamp: 0,
        insert_id: String::new(),
    }
}

fn anonymous_event() -> pb::TrackEventRequest {
    event("")
}

/// Sends `count` events for `user` and returns (accepted, retry-after values of refusals).
async fn send(app: &TestApp, request: impl Fn() -> pb::TrackEventRequest, count: usize) -> (u32, Vec<u64>) {
    let mut accepted = 0;
    let mut retry_after = Vec::new();
    for _ in 0..count {
        match app.client.clone().track_event(request()).await {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let seconds = status.metadata().get("retry-after").expect("retry-after metadata");
                retry_after.push(seconds.to_str().unwrap().parse().unwrap());
            }
        }
    }
    (accepted, retry_after)
}

/// The budget plus what GCRA refilled meanwhile (at most one token per REFILL_SECONDS).
fn allowed_within(started: Instant) -> u32 {
    BUDGET + (started.elapsed().as_secs_f64() / REFILL_SECONDS).floor() as u32
}

fn budget_env(redis_port: u16) -> Vec<(String, String)> {
    vec![
        ("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE".into(), BUDGET.to_string()),
        ("REDIS_PORT".into(), redis_port.to_string()),
    ]
}

async fn redis_keys(prefix: &str) -> Vec<String> {
    let client = redis::Client::open(format!("redis://{}:{}/", redis_host(), redis_port())).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS").arg(format!("{prefix}:ratelimit:*")).query_async(&mut connection).await.unwrap()
}

#[tokio::test]
async fn two_replicas_sharing_redis_allow_one_budget_per_user() {
    let first = spawn_app_with(TestOptions { env: budget_env(redis_port()), ..TestOptions::default() }).await;
    let second =
        start_server(first.config.clone(), first.database_name.clone(), first.redis_prefix.clone()).await;

    let started = Instant::now();
    let mut accepted = 0;
    let mut retry_after = Vec::new();
    for round in 0..(3 * BUDGET) {
        let replica = if round % 2 == 0 { &first } else { &second };
        let (ok, waits) = send(replica, || event("shared-user"), 1).await;
        accepted += ok;
        retry_after.extend(waits);
    }
    // Separate local budgets would have let 2 x BUDGET through.
    assert!(accepted >= BUDGET && accepted <= allowed_within(started), "accepted {accepted}");
    assert!(
        !retry_after.is_empty() && retry_after.iter().all(|seconds| (1..=60).contains(seconds)),
        "{retry_after:?}"
    );
    assert_eq!(first.event_rows().await, i64::from(accepted));

    // Anonymous events spend the caller's budget (here the peer address, 127.0.0.1).
    let started = Instant::now();
    let (anonymous_first, _) = send(&first, anonymous_event, BUDGET as usize).await;
    let (anonymous_second, _) = send(&second, anonymous_event, BUDGET as usize).await;
    let anonymous = anonymous_first + anonymous_second;
    assert!(anonymous >= BUDGET && anonymous <= allowed_within(started), "anonymous {anonymous}");

    let keys = redis_keys(&first.redis_prefix).await;
    assert!(keys.iter().any(|key| key.ends_with(":ratelimit:user:shared-user")), "{keys:?}");
    assert!(keys.iter().any(|key| key.ends_with(":ratelimit:anonymous:127.0.0.1")), "{keys:?}");
}

#[tokio::test]
async fn without_redis_each_replica_limits_locally_and_keeps_serving() {
    let redis_address: SocketAddr = format!("{}:{}", redis_host(), redis_port()).parse().unwrap();
    let proxy = TcpProxy::start(redis_address).await;
    let app =
        spawn_app_with(TestOptions { env: budget_env(proxy.address.port()), ..TestOptions::default() }).await;

    let (accepted, _) = send(&app, || event("before-outage"), 1).await;
    assert_eq!(accepted, 1);
    assert_eq!(redis_keys(&app.redis_prefix).await.len(), 1, "the budget lives in redis");

    proxy.cut();
    let started = Instant::now();
    let (accepted, retry_after) = send(&app, || event("during-outage"), 2 * BUDGET as usize).await;
    assert!(
        accepted >= BUDGET && accepted <= allowed_within(started),
        "the local fallback limits: {accepted}"
    );
    assert!(!retry_after.is_empty());
    let (other_user, _) = send(&app, || event("another-user"), 1).await;
    assert_eq!(other_user, 1, "the service keeps serving other users");
    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(
        metric_value(&metrics, "analytics_rate_limit_fallbacks_total"),
        1.0,
        "one switch, not one per call"
    );
    assert_eq!(redis_keys(&app.redis_prefix).await.len(), 1, "nothing reached redis during the outage");

    proxy.restore();
    let mut back = false;
    for _ in 0..100 {
        send(&app, || event("after-outage"), 1).await;
        if redis_keys(&app.redis_prefix).await.iter().any(|key| key.ends_with(":user:after-outage")) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "budgets move back to redis once it is reachable");
}

#[tokio::test]
async fn during_an_outage_replicas_together_allow_about_one_budget_not_one_each() {
    let redis_address: SocketAddr = format!("{}:{}", redis_host(), redis_port()).parse().unwrap();
    let proxy = TcpProxy::start(redis_address).await;
    let mut env = budget_env(proxy.address.port());
    env.push(("RATE_LIMIT_EXPECTED_REPLICAS".into(), "2".into()));
    let first = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    let second =
        start_server(first.config.clone(), first.database_name.clone(), first.redis_prefix.clone()).await;

    // The user spends the whole shared budget while Redis is up.
    let (spent, _) = send(&first, || event("outage-user"), BUDGET as usize).await;
    assert_eq!(spent, BUDGET);

    proxy.cut();
    let started = Instant::now();
    let mut accepted = 0;
    for round in 0..(4 * BUDGET) {
        let replica = if round % 2 == 0 { &first } else { &second };
        accepted += send(replica, || event("outage-user"), 1).await.0;
    }
    // Each replica's fallback holds BUDGET / 2: together one budget (plus refills), where
    // a full budget per replica would have let 2 x BUDGET through.
    let fallback_refill_seconds = 2.0 * REFILL_SECONDS;
    let refilled = 2 * (started.elapsed().as_secs_f64() / fallback_refill_seconds).floor() as u32;
    assert!(accepted >= BUDGET && accepted <= BUDGET + refilled, "accepted {accepted} during the outage");
    let (other_user, _) = send(&second, || event("another-user"), 1).await;
    assert_eq!(other_user, 1, "other users keep being served");
}
