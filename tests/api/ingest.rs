//! Group commit and the batch RPC: exact row counts under concurrency, per-event
//! results, idempotency by insert_id (sequential, concurrent, across two replicas),
//! poison-row isolation and backpressure with a stalled database.

use std::collections::HashSet;
use std::time::Duration;

use analytics_service::pb;
use analytics_service::pb::TrackEventStatus;
use sqlx::Connection;
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{
    keyed_track_request, metric_value, spawn_app, spawn_app_with, start_server, track_request, wait_until,
    TestOptions,
};

fn status_of(result: &pb::TrackEventResult) -> TrackEventStatus {
    TrackEventStatus::try_from(result.status).expect("a known status")
}

async fn count_ids(pool: &sqlx::PgPool, ids: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE id::text = ANY($1)")
        .bind(ids)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn many_concurrent_unary_calls_share_commits_and_store_exactly_one_row_each() {
    let app = spawn_app_with(TestOptions {
        env: vec![("INGEST_LINGER_MS".into(), "5".into())],
        ..TestOptions::default()
    })
    .await;
    const CALLS: usize = 400;
    let calls = (0..CALLS).map(|index| {
        let app = &app;
        async move { app.track_keyed("click", &format!("user-{index}"), "").await.event_id }
    });
    let ids: Vec<String> = futures::future::join_all(calls).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), CALLS, "every call got its own id");
    assert_eq!(app.event_rows().await, CALLS as i64);
    assert_eq!(count_ids(&app.pool, &ids).await, CALLS as i64, "every acknowledged id is stored");

    let (_, metrics) = app.admin_get("/metrics").await;
    let commits = metric_value(&metrics, "analytics_ingest_batch_size_count");
    let events = metric_value(&metrics, "analytics_ingest_batch_size_sum");
    assert_eq!(events, CALLS as f64, "{metrics}");
    assert!(commits < CALLS as f64, "concurrent calls were coalesced: {commits} commits");
    assert_eq!(metric_value(&metrics, "analytics_events_ingested_total"), CALLS as f64);
    assert_eq!(metric_value(&metrics, "analytics_ingest_queue_capacity"), 10_000.0);
}

#[tokio::test]
async fn a_batch_answers_per_event_and_stores_only_valid_new_events() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let earlier = app.track_keyed("signup", "u0", "key-0").await.event_id;

    let mut too_old = track_request("old", "u4");
    too_old.timestamp = 1;
    let events = vec![
        track_request("view", "u1"),
        track_request("", "u2"),
        keyed_track_request("view", "u3", "key-1"),
        keyed_track_request("view again", "u3", "key-1"),
        keyed_track_request("signup", "u0", "key-0"),
        too_old,
    ];
    let results = client
        .track_events(pb::TrackEventsRequest { events })
        .await
        .expect("a batch with bad events still succeeds as a call")
        .into_inner()
        .results;

    assert_eq!(results.len(), 6);
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result.index, index as i32);
    }
    assert_eq!(status_of(&results[0]), TrackEventStatus::Accepted);
    assert_eq!(status_of(&results[1]), TrackEventStatus::Rejected);
    assert_eq!(results[1].error, "event_name: must not be empty");
    assert_eq!(results[1].code, Code::InvalidArgument as i32);
    assert!(results[1].event_id.is_empty());
    assert_eq!(status_of(&results[2]), TrackEventStatus::Accepted);
    assert_eq!(status_of(&results[3]), TrackEventStatus::Duplicate, "same insert_id inside the batch");
    assert_eq!(results[3].event_id, results[2].event_id);
    assert_eq!(status_of(&results[4]), TrackEventStatus::Duplicate, "insert_id stored by an earlier call");
    assert_eq!(results[4].event_id, earlier);
    assert_eq!(status_of(&results[5]), TrackEventStatus::Rejected);
    assert!(results[5].error.starts_with("timestamp:"), "{}", results[5].error);

    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT id::text, event_name FROM events ORDER BY event_name")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let expected = vec![
        (earlier.clone(), "signup".to_string()),
        (results[0].event_id.clone(), "view".to_string()),
        (results[2].event_id.clone(), "view".to_string()),
    ];
    let mut stored_sorted = stored.clone();
    stored_sorted.sort();
    let mut expected_sorted = expected;
    expected_sorted.sort();
    assert_eq!(stored_sorted, expected_sorted, "only the valid new events are stored");

    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(metric_value(&metrics, "analytics_dedup_hits_total"), 2.0);
    assert_eq!(metric_value(&metrics, "analytics_events_rejected_total{reason=\"duplicate\"}"), 2.0);
    assert_eq!(metric_value(&metrics, "analytics_events_rejected_total{reason=\"invalid_argument\"}"), 2.0);
}

#[tokio::test]
async fn batch_size_limits_are_invalid_argument() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let status = client.track_events(pb::TrackEventsRequest { events: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "events: must not be empty");

    let events = (0..1_001).map(|index| track_request("view", &format!("u{index}"))).collect();
    let status = client.track_events(pb::TrackEventsRequest { events }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most 1000 events"), "{}", status.message());

    let mut big = track_request("view", "u");
    big.properties =
        (0..40).map(|key| (format!("k{key}"), crate::helpers::string_value(&"x".repeat(30_000)))).collect();
    let status = client.track_events(pb::TrackEventsRequest { events: vec![big] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most 1048576"), "{}", status.message());
    assert_eq!(app.event_rows().await, 0);

    let events = (0..1_000).map(|index| track_request("view", &format!("u{index}"))).collect();
    let results = app.track_batch(events).await;
    assert!(results.iter().all(|result| status_of(result) == TrackEventStatus::Accepted));
    assert_eq!(app.event_rows().await, 1_000);
}

#[tokio::test]
async fn the_same_insert_id_sent_twice_in_sequence_is_stored_once() {
    let app = spawn_app().await;
    let first = app.track_keyed("purchase", "u1", "order-42").await;
    let second = app.track_keyed("purchase", "u1", "order-42").await;
    assert!(first.success && second.success);
    assert_eq!(first.event_id, second.event_id, "the retry answers with the original event_id");
    assert_eq!(app.event_rows().await, 1);
    let key: (String, String, String, String) =
        sqlx::query_as("SELECT scope, user_id, insert_id, event_id::text FROM event_insert_ids")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(key, (String::new(), "u1".to_string(), "order-42".to_string(), first.event_id));
}

#[tokio::test]
async fn an_insert_id_belongs_to_its_user() {
    let app = spawn_app().await;
    let alice = app.track_keyed("purchase", "alice", "order-42").await;
    let bob = app.track_keyed("purchase", "bob", "order-42").await;
    let anonymous = app.track_keyed("purchase", "", "order-42").await;
    assert_ne!(alice.event_id, bob.event_id, "another user's key never suppresses an event");
    assert_ne!(anonymous.event_id, alice.event_id);
    assert_eq!(app.event_rows().await, 3);
    // In one batch too, and each user's retry still answers with its own original.
    let results = app
        .track_batch(vec![
            keyed_track_request("purchase", "alice", "order-42"),
            keyed_track_request("purchase", "carol", "order-42"),
            keyed_track_request("purchase", "carol", "order-42"),
        ])
        .await;
    assert_eq!(status_of(&results[0]), TrackEventStatus::Duplicate);
    assert_eq!(results[0].event_id, alice.event_id);
    assert_eq!(status_of(&results[1]), TrackEventStatus::Accepted);
    assert_eq!(status_of(&results[2]), TrackEventStatus::Duplicate);
    assert_eq!(results[2].event_id, results[1].event_id);
    assert_eq!(app.event_rows().await, 4);
}

#[tokio::test]
async fn the_same_insert_id_sent_concurrently_is_stored_once() {
    // No linger and two writers: the copies race through separate commits as often as
    // through the same one, which exercises both the in-batch and the cross-commit path.
    let app = spawn_app_with(TestOptions {
        env: vec![("INGEST_LINGER_MS".into(), "0".into()), ("INGEST_WRITERS".into(), "2".into())],
        ..TestOptions::default()
    })
    .await;
    for round in 0..10 {
        let key = format!("retry-{round}");
        let calls = (0..8).map(|_| async { app.track_keyed("purchase", "u1", &key).await.event_id });
        let ids: HashSet<String> = futures::future::join_all(calls).await.into_iter().collect();
        assert_eq!(ids.len(), 1, "round {round}: every answer carries the same event_id: {ids:?}");
    }
    assert_eq!(app.event_rows().await, 10);
}

#[tokio::test]
async fn the_same_insert_id_sent_to_two_replicas_is_stored_once() {
    let first = spawn_app().await;
    let second =
        start_server(first.config.clone(), first.database_name.clone(), format!("{}:b", first.redis_prefix))
            .await;
    for round in 0..10 {
        let key = format!("replicated-{round}");
        let (one, two) = tokio::join!(
            first.track_keyed("purchase", "u1", &key),
            second.track_keyed("purchase", "u1", &key),
        );
        assert_eq!(one.event_id, two.event_id, "round {round}");
    }
    // And in sequence, across replicas.
    let one = first.track_keyed("purchase", "u2", "seq").await;
    let two = second.track_keyed("purchase", "u2", "seq").await;
    assert_eq!(one.event_id, two.event_id);
    assert_eq!(first.event_rows().await, 11);
}

#[tokio::test]
async fn an_expired_insert_id_is_stored_again() {
    let app = spawn_app().await;
    let first = app.track_keyed("purchase", "u1", "old-key").await;
    sqlx::query("UPDATE event_insert_ids SET created_at = now() - interval '8 days'")
        .execute(&app.pool)
        .await
        .unwrap();
    let second = app.track_keyed("purchase", "u1", "old-key").await;
    assert_ne!(first.event_id, second.event_id, "outside the 7-day window the key is new again");
    assert_eq!(app.event_rows().await, 2);
    let third = app.track_keyed("purchase", "u1", "old-key").await;
    assert_eq!(third.event_id, second.event_id, "and remembered from then on");
}

#[tokio::test]
async fn a_poison_row_fails_only_its_own_caller() {
    let app = spawn_app_with(TestOptions {
        env: vec![("INGEST_LINGER_MS".into(), "20".into())],
        ..TestOptions::default()
    })
    .await;
    sqlx::query("ALTER TABLE events ADD CONSTRAINT no_poison CHECK (event_name <> 'poison')")
        .execute(&app.pool)
        .await
        .unwrap();

    let events = vec![
        track_request("ok", "u1"),
        track_request("poison", "u2"),
        keyed_track_request("ok", "u3", "key-3"),
    ];
    let results = app.track_batch(events).await;
    assert_eq!(status_of(&results[0]), TrackEventStatus::Accepted);
    assert_eq!(status_of(&results[1]), TrackEventStatus::Rejected);
    assert_eq!(results[1].code, Code::Internal as i32);
    assert_eq!(results[1].error, "internal error", "no SQL reaches the caller");
    assert_eq!(status_of(&results[2]), TrackEventStatus::Accepted);

    // Unary calls coalesced with a poison call in one commit (20 ms linger).
    let calls = (0..20).map(|index| {
        let mut client = app.client.clone();
        let name = if index == 7 { "poison" } else { "ok" };
        async move { client.track_event(track_request(name, &format!("v{index}"))).await }
    });
    let answers = futures::future::join_all(calls).await;
    for (index, answer) in answers.iter().enumerate() {
        match answer {
            Ok(_) => assert_ne!(index, 7),
            Err(status) => {
                assert_eq!(index, 7, "{status:?}");
                assert_eq!(status.code(), Code::Internal);
            }
        }
    }
    assert_eq!(app.event_rows().await, 2 + 19);
    let poison: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_name = 'poison'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(poison, 0);
}

#[tokio::test]
async fn a_full_queue_refuses_fast_and_stays_bounded_while_the_database_stalls() {
    const CAPACITY: usize = 4;
    let app = spawn_app_with(TestOptions {
        env: vec![
            ("INGEST_QUEUE_CAPACITY".into(), CAPACITY.to_string()),
            ("INGEST_BATCH_SIZE".into(), "2".into()),
            ("INGEST_WRITERS".into(), "1".into()),
            ("INGEST_LINGER_MS".into(), "0".into()),
        ],
        ..TestOptions::default()
    })
    .await;
    // Stall every insert inside PostgreSQL.
    let mut locker = app.pool.acquire().await.unwrap().detach();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();

    let mut waiting: Vec<tokio::task::JoinHandle<Result<_, tonic::Status>>> = Vec::new();
    let mut refused = 0;
    for wave in 0..3 {
        waiting.extend((0..100).map(|index| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                client.track_event(track_request("view", &format!("w{wave}-{index}"))).await
            })
        }));
        // Refusals come back while the database is still stalled: they wait for nothing.
        // (Bounded wait for the answers to arrive; the assertions follow.)
        wait_until(Duration::from_secs(10), Duration::from_millis(25), async || {
            waiting.iter().filter(|call| !call.is_finished()).count() <= CAPACITY
        })
        .await;
        let mut still_waiting = Vec::new();
        for call in waiting.drain(..) {
            if call.is_finished() {
                let status = call.await.unwrap().expect_err("nothing can succeed while the table is locked");
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert_eq!(status.message(), "ingest queue full, retry later");
                refused += 1;
            } else {
                still_waiting.push(call);
            }
        }
        waiting = still_waiting;
        assert_eq!(waiting.len(), CAPACITY, "wave {wave}: only the queue's capacity waits");
        // The gauge is refreshed every 250 ms by the writer: wait (bounded) for a fresh one.
        let mut depth = 0.0;
        wait_until(Duration::from_secs(2), Duration::from_millis(50), async || {
            depth = metric_value(&app.admin_get("/metrics").await.1, "analytics_ingest_queue_depth");
            depth == CAPACITY as f64
        })
        .await;
        assert_eq!(depth, CAPACITY as f64, "wave {wave}: the queue holds exactly its capacity");
    }
    assert_eq!(refused, 300 - CAPACITY);

    lock.rollback().await.unwrap();
    let mut ids = Vec::new();
    for call in waiting {
        let answer = tokio::time::timeout(Duration::from_secs(10), call).await.expect("completes").unwrap();
        ids.push(answer.expect("admitted calls succeed once the database moves").into_inner().event_id);
    }
    assert_eq!(count_ids(&app.pool, &ids).await, CAPACITY as i64);
    assert_eq!(app.event_rows().await, CAPACITY as i64);
    let (_, metrics) = app.admin_get("/metrics").await;
    assert_eq!(
        metric_value(&metrics, "analytics_events_rejected_total{reason=\"queue_full\"}"),
        (300 - CAPACITY) as f64
    );
}

#[tokio::test]
async fn event_ids_of_a_batch_are_stored_with_their_content() {
    let app = spawn_app().await;
    let events = (0..50).map(|index| track_request(&format!("e{index}"), &format!("u{index}"))).collect();
    let results = app.track_batch(events).await;
    for (index, result) in results.iter().enumerate() {
        let name: String = sqlx::query_scalar("SELECT event_name FROM events WHERE id = $1")
            .bind(Uuid::parse_str(&result.event_id).unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(name, format!("e{index}"), "result {index} names its own event");
    }
}

#[tokio::test]
async fn events_of_a_batch_over_their_senders_budget_are_rejected_alone() {
    let app = spawn_app_with(TestOptions {
        env: vec![("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE".into(), "2".into())],
        ..TestOptions::default()
    })
    .await;
    let events = vec![
        track_request("view", "busy"),
        track_request("view", "busy"),
        track_request("view", "busy"),
        track_request("view", "calm"),
    ];
    let results = app.track_batch(events).await;
    let accepted = results.iter().filter(|result| status_of(result) == TrackEventStatus::Accepted).count();
    let limited: Vec<_> =
        results.iter().filter(|result| status_of(result) == TrackEventStatus::Rejected).collect();
    assert_eq!(accepted, 3, "two of busy's and calm's one");
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].code, Code::ResourceExhausted as i32);
    assert_eq!(limited[0].error, "rate limit exceeded");
    assert_eq!(status_of(&results[3]), TrackEventStatus::Accepted);
    assert_eq!(app.event_rows().await, 3);
}
