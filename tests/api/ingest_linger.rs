//! When a group commit waits for company: a lone call is committed at once, and
//! concurrent calls still share commits (INGEST_LINGER_MS bounds the wait only while
//! other commits are in flight).

use std::time::{Duration, Instant};

use crate::helpers::{metric_value, spawn_app_with, TestApp, TestOptions};

/// The longest linger the configuration allows, so a call that waited for it stands out.
const LINGER_MS: u64 = 100;

async fn app_with_long_linger() -> TestApp {
    spawn_app_with(TestOptions {
        env: vec![("INGEST_LINGER_MS".into(), LINGER_MS.to_string())],
        ..TestOptions::default()
    })
    .await
}

#[tokio::test]
async fn a_lone_call_is_committed_without_waiting_for_the_linger() {
    let app = app_with_long_linger().await;
    // The first call also opens the connections; only the later ones are timed.
    app.track_keyed("warm-up", "user-0", "").await;
    let mut fastest = Duration::MAX;
    for index in 0..5 {
        let started = Instant::now();
        app.track_keyed("click", &format!("user-{index}"), "").await;
        fastest = fastest.min(started.elapsed());
    }
    let linger = Duration::from_millis(LINGER_MS);
    assert!(
        fastest < linger / 2,
        "a lone call waited for the linger: fastest of 5 took {fastest:?}, linger {linger:?}"
    );
    assert_eq!(app.event_rows().await, 6);
}

#[tokio::test]
async fn concurrent_calls_share_commits_without_waiting_for_the_linger() {
    let app = app_with_long_linger().await;
    app.track_keyed("warm-up", "user-0", "").await;
    const CALLS: usize = 64;
    let calls = (0..CALLS).map(|index| {
        let app = &app;
        async move { app.track_keyed("click", &format!("user-{index}"), "").await }
    });
    futures::future::join_all(calls).await;
    assert_eq!(app.event_rows().await, CALLS as i64 + 1);

    let (_, metrics) = app.admin_get("/metrics").await;
    let commits = metric_value(&metrics, "analytics_ingest_batch_size_count");
    let events = metric_value(&metrics, "analytics_ingest_batch_size_sum");
    assert_eq!(events, CALLS as f64 + 1.0, "{metrics}");
    assert!(events / commits > 1.0, "concurrent calls shared commits: {events} events in {commits} commits");
}
