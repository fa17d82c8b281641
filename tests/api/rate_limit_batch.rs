//! Rate limiting with batched round trips: a TrackEvents call asks Redis once per budget
//! key and gets the first events that fit, all keys of a call and concurrent calls share
//! pipelined round trips, and replicas sharing Redis still grant one budget per user.

use std::time::Instant;

use analytics_service::pb;
use futures::future::join_all;
use tonic::Code;

use crate::helpers::{
    metric_value, redis_host, redis_port, spawn_app_with, start_server, track_request, TestApp, TestOptions,
};

const ROUND_TRIPS: &str = "analytics_rate_limit_redis_roundtrips_total";

fn options(budget: u32) -> TestOptions {
    TestOptions {
        env: vec![
            ("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE".into(), budget.to_string()),
            ("REDIS_PORT".into(), redis_port().to_string()),
        ],
        ..TestOptions::default()
    }
}

/// The budget plus what GCRA refilled since `started` (one token per 60 / budget s).
fn allowed_within(budget: u32, started: Instant) -> u32 {
    budget + (started.elapsed().as_secs_f64() * f64::from(budget) / 60.0).floor() as u32
}

fn accepted(result: &pb::TrackEventResult) -> bool {
    result.status == pb::TrackEventStatus::Accepted as i32
}

async fn round_trips(app: &TestApp) -> f64 {
    metric_value(&app.admin_get("/metrics").await.1, ROUND_TRIPS)
}

/// One TrackEvent; true when accepted, false when refused for the budget (with
/// `retry-after`).
pub(crate) async fn track_one(app: &TestApp, user: &str) -> bool {
    match app.client.clone().track_event(track_request("limited", user)).await {
        Ok(_) => true,
        Err(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.metadata().get("retry-after").is_some(), "{status:?}");
            false
        }
    }
}

/// One TrackEvents call of `count` events of `user`; how many were accepted.
async fn track_many(app: &TestApp, user: &str, count: usize) -> u32 {
    let results = app.track_batch((0..count).map(|_| track_request("limited", user)).collect()).await;
    for result in results.iter().filter(|result| !accepted(result)) {
        assert_eq!(result.code, Code::ResourceExhausted as i32, "{result:?}");
    }
    results.iter().filter(|result| accepted(result)).count() as u32
}

#[tokio::test]
async fn replicas_under_concurrent_unary_and_batch_calls_grant_one_budget_per_user() {
    // 60 a minute: one token refills per second, little against the test's duration.
    const BUDGET: u32 = 60;
    let first = spawn_app_with(options(BUDGET)).await;
    let second =
        start_server(first.config.clone(), first.database_name.clone(), first.redis_prefix.clone()).await;

    let started = Instant::now();
    let unary =
        join_all((0..128).map(|call| track_one(if call % 2 == 0 { &first } else { &second }, "hot-user")));
    let batches =
        join_all((0..8).map(|call| track_many(if call % 2 == 0 { &first } else { &second }, "hot-user", 25)));
    let (unary, batches) = tokio::join!(unary, batches);
    let allowed = allowed_within(BUDGET, started);
    let total = unary.iter().filter(|ok| **ok).count() as u32 + batches.iter().sum::<u32>();

    // 328 events asked for: every token of the shared budget is granted, none twice.
    assert!(total >= BUDGET && total <= allowed, "accepted {total}, allowed {BUDGET}..={allowed}");
    assert_eq!(first.event_rows().await, i64::from(total));
}

#[tokio::test]
async fn a_batch_gets_the_first_events_of_a_user_with_few_tokens_left_and_all_of_the_others() {
    // 6 a minute: a token refills every 10 s, longer than the test takes.
    const BUDGET: u32 = 6;
    let app = spawn_app_with(options(BUDGET)).await;
    for _ in 0..(BUDGET - 2) {
        assert!(track_one(&app, "thrifty").await, "within the budget");
    }

    let users = ["alice", "thrifty", "bob", "thrifty", "alice", "thrifty", "thrifty", "bob", "thrifty"];
    let results = app.track_batch(users.iter().map(|user| track_request("mixed", user)).collect()).await;

    let thrifty: Vec<bool> = users
        .iter()
        .zip(&results)
        .filter(|(user, _)| **user == "thrifty")
        .map(|(_, result)| accepted(result))
        .collect();
    assert_eq!(thrifty, [true, true, false, false, false], "the first 2 of its events, in call order");
    for (user, result) in users.iter().zip(&results) {
        if *user == "thrifty" {
            if !accepted(result) {
                assert_eq!(result.code, Code::ResourceExhausted as i32, "{result:?}");
                assert_eq!(result.error, "rate limit exceeded", "{result:?}");
            }
        } else {
            assert!(accepted(result), "{user}: {result:?}");
        }
    }
}

#[tokio::test]
async fn a_batch_of_a_thousand_events_of_ten_users_costs_one_round_trip() {
    let app = spawn_app_with(options(100_000)).await;
    // The first check also loads the script into Redis when it is not there yet.
    assert!(track_one(&app, "warm-up").await);
    let before = round_trips(&app).await;

    let events = (0..1000).map(|index| track_request("bulk", &format!("user-{}", index % 10))).collect();
    let results = app.track_batch(events).await;
    assert!(results.iter().all(accepted), "all within the budget");

    // One pipeline for the 10 keys; 3 should a parallel test have flushed Redis' scripts
    // meanwhile (the pipeline, the script load, the retried calls).
    let used = round_trips(&app).await - before;
    assert!(used == 1.0 || used == 3.0, "{used} round trips, not one call per event");
}

#[tokio::test]
async fn a_pipeline_reloads_the_script_when_redis_has_lost_it() {
    let app = spawn_app_with(options(100_000)).await;
    assert!(track_one(&app, "warm-up").await);
    let client = redis::Client::open(format!("redis://{}:{}/", redis_host(), redis_port())).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    // Parallel tests may load the script again between the flush and the call (then the
    // call needs no reload): retry until one call saw the flush.
    let mut reloaded = false;
    for _ in 0..5 {
        let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut connection).await.unwrap();
        let before = round_trips(&app).await;
        let events = (0..30).map(|index| track_request("reload", &format!("user-{}", index % 3))).collect();
        let results = app.track_batch(events).await;
        assert!(results.iter().all(accepted), "{results:?}");
        let used = round_trips(&app).await - before;
        assert!(used == 1.0 || used == 3.0, "{used} round trips");
        if used == 3.0 {
            // The pipeline, the script load, the retried calls.
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the script was never missing");
    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(metric_value(&metrics, "analytics_rate_limit_fallbacks_total"), 0.0, "{metrics}");
}

#[tokio::test]
async fn concurrent_unary_calls_share_round_trips() {
    let app = spawn_app_with(options(100_000)).await;
    assert!(track_one(&app, "warm-up").await);
    let before = round_trips(&app).await;

    const CALLS: usize = 256;
    let accepted =
        join_all((0..CALLS).map(|call| track_one(&app, if call % 2 == 0 { "even" } else { "odd" }))).await;
    assert!(accepted.iter().all(|ok| *ok));

    let used = round_trips(&app).await - before;
    eprintln!("{CALLS} concurrent calls took {used} round trips");
    // Calls that arrive while a pipeline is out share the next one (3 round trips seen here).
    assert!(used >= 1.0 && used <= (CALLS / 4) as f64, "{used} round trips for {CALLS} calls");
}
