//! Rate-limit leases: a check that asks Redis takes RATE_LIMIT_LEASE_TOKENS tokens and
//! the replica spends the spare ones on the key's next events without a round trip. The
//! stated bound: in any window a user gets at most the budget plus what refilled plus
//! lease_tokens - 1 per replica (the leases left over from before the window).

use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::helpers::{metric_value, redis_port, spawn_app_with, start_server, TestApp, TestOptions};
use crate::rate_limit_batch::track_one;

const ROUND_TRIPS: &str = "analytics_rate_limit_redis_roundtrips_total";
const LEASED_CHECKS: &str = "analytics_rate_limit_leased_checks_total";

fn options(budget: u32, lease_tokens: Option<u32>) -> TestOptions {
    let mut env = vec![
        ("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE".into(), budget.to_string()),
        ("REDIS_PORT".into(), redis_port().to_string()),
    ];
    if let Some(lease_tokens) = lease_tokens {
        env.push(("RATE_LIMIT_LEASE_TOKENS".into(), lease_tokens.to_string()));
    }
    TestOptions { env, ..TestOptions::default() }
}

/// The process's metrics (every replica of a test shares one registry).
async fn metric(app: &TestApp, series: &str) -> f64 {
    metric_value(&app.admin_get("/metrics").await.1, series)
}

#[tokio::test]
async fn leases_left_over_from_before_a_window_add_at_most_lease_tokens_minus_one_per_replica() {
    // 1,200 a minute: one token per 50 ms. Leases of 50: 49 kept per replica.
    const BUDGET: u32 = 1_200;
    const LEASE_TOKENS: u32 = 50;
    const REPLICAS: u32 = 2;
    let first = spawn_app_with(options(BUDGET, Some(LEASE_TOKENS))).await;
    let second =
        start_server(first.config.clone(), first.database_name.clone(), first.redis_prefix.clone()).await;
    let replicas = [&first, &second];

    // Before the window: one event through each replica leases 49 spare tokens there.
    for replica in replicas {
        assert!(track_one(replica, "hot-user").await);
    }
    // The 100 tokens taken refill (at 20 a second), so the window opens on a full budget
    // while both replicas still hold their leftover leases.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let leased_before = metric(&first, LEASED_CHECKS).await;

    let started = Instant::now();
    let accepted_per_stream = join_all((0..32).map(|stream| async move {
        let replica = replicas[stream % 2];
        let mut accepted = 0u32;
        for _ in 0..60 {
            accepted += u32::from(track_one(replica, "hot-user").await);
        }
        accepted
    }))
    .await;
    let refilled = (started.elapsed().as_secs_f64() * f64::from(BUDGET) / 60.0).ceil() as u32;
    let accepted: u32 = accepted_per_stream.iter().sum();

    // 1,920 events asked for in the window.
    let bound = BUDGET + refilled + REPLICAS * (LEASE_TOKENS - 1);
    assert!(accepted <= bound, "accepted {accepted} in the window, bound {bound}");
    assert!(accepted >= BUDGET, "accepted {accepted}: the whole budget is spent");
    assert_eq!(first.event_rows().await, i64::from(accepted + REPLICAS), "every accepted event is stored");
    let leased = metric(&first, LEASED_CHECKS).await - leased_before;
    assert!(
        leased >= f64::from(REPLICAS * (LEASE_TOKENS - 1)),
        "{leased} events answered from leases: the leftover leases were spent in the window"
    );
}

#[tokio::test]
async fn a_user_sending_one_event_at_a_time_asks_redis_once_per_lease() {
    // The default lease at the default budget (1,000 a minute): 15 tokens.
    let app = spawn_app_with(options(1_000, None)).await;
    assert!(track_one(&app, "warm-up").await, "loads the script");
    let round_trips_before = metric(&app, ROUND_TRIPS).await;
    let leased_before = metric(&app, LEASED_CHECKS).await;

    for _ in 0..45 {
        assert!(track_one(&app, "steady-user").await);
    }

    let round_trips = metric(&app, ROUND_TRIPS).await - round_trips_before;
    let leased = metric(&app, LEASED_CHECKS).await - leased_before;
    assert_eq!(leased, 42.0, "14 of every 15 events from the lease");
    // 3 leases; 2 more round trips should a parallel test have flushed Redis' scripts.
    assert!((3.0..=5.0).contains(&round_trips), "{round_trips} round trips for 45 events");
}

#[tokio::test]
async fn one_token_leases_ask_redis_for_every_event() {
    let app = spawn_app_with(options(1_000, Some(1))).await;
    assert!(track_one(&app, "warm-up").await, "loads the script");
    let round_trips_before = metric(&app, ROUND_TRIPS).await;
    for _ in 0..10 {
        assert!(track_one(&app, "exact-user").await);
    }
    let round_trips = metric(&app, ROUND_TRIPS).await - round_trips_before;
    assert!((10.0..=12.0).contains(&round_trips), "{round_trips} round trips for 10 events");
    assert_eq!(metric(&app, LEASED_CHECKS).await, 0.0);
}
