//! The durability contract under a PostgreSQL outage, tried the way it fails: clients
//! write under load while a proxy in front of PostgreSQL resets every connection or
//! blackholes them (packets vanish; what was in flight is delivered when the network
//! heals). Every event carries a unique marker (its user id), and afterwards:
//! - every event answered OK is stored exactly once;
//! - no event of a call answered UNAVAILABLE or RESOURCE_EXHAUSTED is stored, also not
//!   later, when held statements arrive after the heal;
//! - DEADLINE_EXCEEDED (outcome unknown) events are stored at most once;
//! - no other code is answered, and every call is counted once in
//!   `grpc_server_handled_total` with the code the client got.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use analytics_service::pb;
use tonic::Code;

use crate::helpers::{metric_value, track_request, wait_until, TestApp};
use crate::proxy::spawn_app_behind_postgres_proxy;

#[derive(Clone, Copy, Debug)]
enum Outage {
    /// Every connection reset, new ones refused.
    Reset,
    /// Packets vanish; held traffic is delivered when the network heals.
    Blackhole,
}

/// What one event's call was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Answer {
    Stored,
    Refused(Code),
    Unknown,
}

/// Every event sent, by marker, with what it was answered.
#[derive(Default)]
struct Ledger {
    answers: Mutex<HashMap<String, Answer>>,
    stored_after_restore: AtomicUsize,
}

impl Ledger {
    fn record(&self, marker: String, answer: Answer, restored: bool) {
        if restored && answer == Answer::Stored {
            self.stored_after_restore.fetch_add(1, Ordering::SeqCst);
        }
        self.answers.lock().unwrap().insert(marker, answer);
    }

    fn count(&self, answer: Answer) -> usize {
        self.answers.lock().unwrap().values().filter(|recorded| **recorded == answer).count()
    }
}

fn answer_of(status: &tonic::Status) -> Answer {
    match status.code() {
        Code::DeadlineExceeded => Answer::Unknown,
        // tonic's client reports its own grpc-timeout expiring as CANCELLED with this
        // message (other gRPC clients say DEADLINE_EXCEEDED): the deadline passed.
        Code::Cancelled if status.message() == "Timeout expired" => Answer::Unknown,
        code => Answer::Refused(code),
    }
}

/// A request whose deadline is `timeout` (sent as `grpc-timeout`), or the server's own.
fn with_deadline<T>(message: T, timeout: Option<Duration>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// `clients` tasks writing back to back until `stop`: three unary calls, then a
/// TrackEvents call of 5 events. A refused call pauses the client for 20 ms.
fn start_load(
    app: &TestApp,
    clients: usize,
    client_timeout: Option<Duration>,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    restored: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|worker| {
            let mut client = app.client.clone();
            let ledger = ledger.clone();
            let stop = stop.clone();
            let restored = restored.clone();
            tokio::spawn(async move {
                let mut call = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    call += 1;
                    let marker = format!("w{worker}c{call}");
                    let refused = if call % 4 == 0 {
                        let markers: Vec<String> = (0..5).map(|index| format!("{marker}e{index}")).collect();
                        let events = markers.iter().map(|marker| track_request("load", marker)).collect();
                        let request = with_deadline(pb::TrackEventsRequest { events }, client_timeout);
                        let after_restore = restored.load(Ordering::SeqCst);
                        match client.track_events(request).await {
                            Ok(response) => {
                                let results = response.into_inner().results;
                                assert_eq!(results.len(), markers.len());
                                let mut refused = false;
                                for (marker, result) in markers.into_iter().zip(results) {
                                    let answer = if result.status() == pb::TrackEventStatus::Accepted {
                                        Answer::Stored
                                    } else {
                                        refused = true;
                                        answer_of(&tonic::Status::new(
                                            Code::from_i32(result.code),
                                            result.error,
                                        ))
                                    };
                                    ledger.record(marker, answer, after_restore);
                                }
                                refused
                            }
                            Err(status) => {
                                for marker in markers {
                                    ledger.record(marker, answer_of(&status), after_restore);
                                }
                                true
                            }
                        }
                    } else {
                        let request = with_deadline(track_request("load", &marker), client_timeout);
                        let after_restore = restored.load(Ordering::SeqCst);
                        match client.track_event(request).await {
                            Ok(_) => {
                                ledger.record(marker, Answer::Stored, after_restore);
                                false
                            }
                            Err(status) => {
                                ledger.record(marker, answer_of(&status), after_restore);
                                true
                            }
                        }
                    };
                    if refused {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect()
}

/// Sum of a counter over every series of the AnalyticsService write RPCs.
fn write_rpc_total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name))
        .filter(|line| {
            line.contains(r#"grpc_method="TrackEvent""#) || line.contains(r#"grpc_method="TrackEvents""#)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn outage_under_load(outage: Outage, client_timeout: Option<Duration>) {
    let (proxy, app) = spawn_app_behind_postgres_proxy(vec![
        ("POSTGRES_MAX_CONNECTIONS", "8"),
        ("POSTGRES_ACQUIRE_TIMEOUT_MS", "300"),
        ("INGEST_COMMIT_TIMEOUT_MS", "300"),
        ("REQUEST_TIMEOUT_SECONDS", "3"),
        // Every event has its own user: no budget interferes.
        ("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE", "0"),
    ])
    .await;
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let restored = Arc::new(AtomicBool::new(false));
    let workers = start_load(&app, 16, client_timeout, ledger.clone(), stop.clone(), restored.clone());

    let warmed_up = wait_until(Duration::from_secs(30), Duration::from_millis(50), async || {
        ledger.count(Answer::Stored) >= 300
    })
    .await;
    assert!(warmed_up, "load before the outage: {} stored", ledger.count(Answer::Stored));
    match outage {
        Outage::Reset => proxy.cut(),
        Outage::Blackhole => proxy.blackhole(),
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    restored.store(true, Ordering::SeqCst);
    let recovered = wait_until(Duration::from_secs(30), Duration::from_millis(50), async || {
        ledger.stored_after_restore.load(Ordering::SeqCst) >= 300
    })
    .await;
    assert!(recovered, "the service writes again after the outage");
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(30), worker).await.expect("load stops").unwrap();
    }
    // Statements a blackhole held reach PostgreSQL after the heal: give them time to land.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT user_id, count(*) FROM events WHERE event_name = 'load' GROUP BY user_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let stored: HashMap<String, i64> = rows.into_iter().collect();
    let answers = ledger.answers.lock().unwrap().clone();
    let mut tally: HashMap<Answer, usize> = HashMap::new();
    for (marker, answer) in &answers {
        *tally.entry(*answer).or_default() += 1;
        let copies = stored.get(marker).copied().unwrap_or(0);
        match answer {
            Answer::Stored => {
                assert_eq!(copies, 1, "{outage:?}: {marker} was answered OK and stored {copies} times")
            }
            Answer::Refused(code) => {
                assert!(
                    matches!(code, Code::Unavailable | Code::ResourceExhausted),
                    "{outage:?}: {marker} answered {code:?}, not a code of the contract"
                );
                assert_eq!(copies, 0, "{outage:?}: {marker} was answered {code:?} yet stored");
            }
            Answer::Unknown => assert!(copies <= 1, "{outage:?}: {marker} stored {copies} times"),
        }
    }
    assert!(
        stored.keys().all(|marker| answers.contains_key(marker)),
        "only events that were sent are stored"
    );
    let unavailable = tally.get(&Answer::Refused(Code::Unavailable)).copied().unwrap_or(0);
    let unknown = tally.get(&Answer::Unknown).copied().unwrap_or(0);
    println!("{outage:?} client_timeout={client_timeout:?}: {tally:?}");
    assert!(unavailable > 0, "the outage was noticed: {tally:?}");
    // Fail fast: once PostgreSQL is known to be down, calls are refused at once instead
    // of waiting for their deadline, so refusals far outnumber unknown outcomes (only
    // calls inside a commit when the outage began can end unknown).
    assert!(unavailable > 4 * unknown, "calls were refused rather than left to time out: {tally:?}");

    let (_, metrics) = app.admin_get("/metrics").await;
    let started = write_rpc_total(&metrics, "grpc_server_started_total");
    let handled = write_rpc_total(&metrics, "grpc_server_handled_total");
    assert_eq!(started, handled, "every call is counted as handled once:\n{metrics}");
    assert!(!metrics.contains(r#"grpc_code="Canceled""#), "no call ends CANCELLED: {metrics}");
    let unknown_calls = metric_value(
        &metrics,
        r#"grpc_server_handled_total{grpc_service="analytics.v1.AnalyticsService",grpc_method="TrackEvent",grpc_type="unary",grpc_code="DeadlineExceeded"}"#,
    );
    let unknown_unary = answers
        .iter()
        .filter(|(marker, answer)| **answer == Answer::Unknown && !marker.contains('e'))
        .count();
    assert_eq!(
        unknown_calls as usize, unknown_unary,
        "DEADLINE_EXCEEDED is counted with the code the client got"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_postgres_under_load_keeps_every_answer_true() {
    outage_under_load(Outage::Reset, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_postgres_under_load_keeps_every_answer_true_with_client_deadlines() {
    outage_under_load(Outage::Reset, Some(Duration::from_millis(800))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blackholed_postgres_under_load_keeps_every_answer_true() {
    outage_under_load(Outage::Blackhole, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blackholed_postgres_under_load_keeps_every_answer_true_with_client_deadlines() {
    outage_under_load(Outage::Blackhole, Some(Duration::from_millis(800))).await;
}

/// A commit whose answer is lost (PostgreSQL committed it, the network then ate the
/// reply) is of unknown outcome: the call ends DEADLINE_EXCEEDED saying so, never
/// UNAVAILABLE, even though PostgreSQL is meanwhile known to be unreachable; a retry
/// with the same insert_id finds the stored event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_ends_deadline_exceeded_never_unavailable() {
    let (proxy, app) = spawn_app_behind_postgres_proxy(vec![
        ("POSTGRES_ACQUIRE_TIMEOUT_MS", "300"),
        // Longer than the call may take: the commit is still waiting when the deadline passes.
        ("INGEST_COMMIT_TIMEOUT_MS", "8000"),
        ("REQUEST_TIMEOUT_SECONDS", "3"),
        ("INGEST_WRITERS", "1"),
    ])
    .await;
    // The writer's connection has the insert prepared, so the next one is sent whole
    // (parse, bind, execute) and waits inside PostgreSQL's execution.
    for warm_up in 0..3 {
        app.track_keyed("warm_up", "bob", &format!("warm-{warm_up}")).await;
    }
    // Hold the insert inside PostgreSQL: the statement is sent and waits for the lock.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let mut client = app.client.clone();
    let call = tokio::spawn(async move {
        client.track_event(crate::helpers::keyed_track_request("lost_answer", "alice", "order-7")).await
    });
    let waiting = wait_until(Duration::from_secs(10), Duration::from_millis(20), async || {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO events%'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    assert!(waiting, "the insert reached PostgreSQL and waits for the lock");
    // The network drops the answer; PostgreSQL commits the insert once the lock goes.
    proxy.blackhole();
    lock.commit().await.unwrap();
    let stored = wait_until(Duration::from_secs(5), Duration::from_millis(20), async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event_name = 'lost_answer'")
            .fetch_one(&app.pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    if !stored {
        let activity: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT state, wait_event_type, left(query, 80) FROM pg_stat_activity WHERE datname = current_database()",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        let events: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT event_name, user_id FROM events").fetch_all(&app.pool).await.unwrap();
        let keys: Vec<(String, String, String)> =
            sqlx::query_as("SELECT scope, user_id, insert_id FROM event_insert_ids")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        panic!("PostgreSQL did not commit the insert: {activity:?} {events:?} {keys:?}");
    }

    let status = call.await.unwrap().expect_err("the answer never came back");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("outcome unknown"), "{status:?}");

    proxy.restore();
    let retried = wait_until(Duration::from_secs(10), Duration::from_millis(100), async || {
        app.client
            .clone()
            .track_event(crate::helpers::keyed_track_request("lost_answer", "alice", "order-7"))
            .await
            .is_ok()
    })
    .await;
    assert!(retried, "the retry with the same insert_id succeeds once PostgreSQL is back");
    let copies: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_name = 'lost_answer'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(copies, 1, "the retry found the stored event instead of storing it again");
}
