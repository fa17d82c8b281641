//! Suppression: a suppressed user's later TrackEvent, TrackEvents and IdentifyUser store
//! nothing and are answered success with `suppressed` (per event in TrackEvents), counted
//! in `analytics_suppressed_total`; replicas sharing the database honour one list;
//! LiftSuppression lifts it; without SUPPRESSION_KEY_FILE nothing is checked.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use analytics_service::pb::{self, TrackEventStatus};
use analytics_service::security::subject::SubjectHasher;
use tonic::Code;

use crate::helpers::{
    admin_env, keyed_track_request, metric_value, spawn_app_with, start_server, string_value, track_request,
    wait_for_sql, wait_until, TestApp, TestOptions,
};
use crate::proxy::{spawn_app_behind_postgres_proxy, TcpProxy};

/// A server with the administrative RPCs open and a fresh suppression key, and the keyed
/// hash it names users by.
async fn spawn_app_with_suppression(extra_env: Vec<(String, String)>) -> (TestApp, SubjectHasher) {
    let (mut env, key_file) = admin_env();
    env.extend(extra_env);
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    (app, hasher_of(&key_file))
}

fn hasher_of(key_file: &Path) -> SubjectHasher {
    let text = std::fs::read_to_string(key_file).expect("key file reads");
    SubjectHasher::parse(&text, "SUPPRESSION_KEY_FILE").expect("key file parses")
}

/// Puts `user_id` on the suppression list, as DeleteUser(suppress = true) does.
async fn suppress(app: &TestApp, hasher: &SubjectHasher, user_id: &str) {
    sqlx::query("INSERT INTO suppressed_users (subject_hash) VALUES ($1)")
        .bind(hasher.hash(user_id).as_bytes())
        .execute(&app.pool)
        .await
        .unwrap();
}

async fn lift(app: &TestApp, user_id: &str) -> bool {
    app.admin_client()
        .lift_suppression(pb::LiftSuppressionRequest { user_id: user_id.into() })
        .await
        .expect("lift_suppression succeeds")
        .into_inner()
        .lifted
}

async fn identify(app: &TestApp, user_id: &str, plan: &str) -> pb::IdentifyUserResponse {
    let properties = HashMap::from([("plan".to_string(), string_value(plan))]);
    app.client
        .clone()
        .identify_user(pb::IdentifyUserRequest { user_id: user_id.into(), properties })
        .await
        .expect("identify_user succeeds")
        .into_inner()
}

fn status_of(result: &pb::TrackEventResult) -> TrackEventStatus {
    TrackEventStatus::try_from(result.status).expect("a known status")
}

/// What is stored about `user_id` (and the event name it alone uses), wherever ingestion
/// writes: events, idempotency keys, identities, the trigger's count deltas and pending
/// user activity, or where the fold moved them (rollups, user ordinals).
#[derive(Debug, PartialEq, Eq)]
struct StoredTraces {
    events: i64,
    insert_ids: i64,
    identities: i64,
    counted_events: i64,
    active: bool,
}

async fn stored_traces(app: &TestApp, user_id: &str, event_name: &str) -> StoredTraces {
    let (events, insert_ids, identities, counted_events, active): (i64, i64, i64, i64, bool) = sqlx::query_as(
        "SELECT
            (SELECT count(*) FROM events WHERE user_id = $1),
            (SELECT count(*) FROM event_insert_ids WHERE user_id = $1),
            (SELECT count(*) FROM user_identities WHERE user_id = $1),
            coalesce((SELECT sum(event_count) FROM event_count_deltas WHERE event_name = $2), 0)::bigint
                + coalesce((SELECT sum(event_count) FROM event_counts_hourly WHERE event_name = $2), 0)::bigint,
            EXISTS (SELECT 1 FROM user_activity_pending WHERE $1 = ANY(user_ids))
                OR EXISTS (SELECT 1 FROM user_ordinals WHERE user_id = $1)",
    )
    .bind(user_id)
    .bind(event_name)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    StoredTraces { events, insert_ids, identities, counted_events, active }
}

const NOTHING: StoredTraces =
    StoredTraces { events: 0, insert_ids: 0, identities: 0, counted_events: 0, active: false };

async fn suppressed_metric(app: &TestApp, rpc: &str) -> f64 {
    let metrics = app.admin_get("/metrics").await.1;
    metric_value(&metrics, &format!("analytics_suppressed_total{{rpc=\"{rpc}\"}}"))
}

#[tokio::test]
async fn track_event_of_a_suppressed_user_stores_nothing_and_answers_suppressed() {
    let (app, hasher) = spawn_app_with_suppression(Vec::new()).await;
    suppress(&app, &hasher, "u-gone").await;

    for insert_id in ["", "order-1", "order-1"] {
        let answer = app.track_keyed("gone_event", "u-gone", insert_id).await;
        assert_eq!(
            answer,
            pb::TrackEventResponse { success: true, event_id: String::new(), suppressed: true },
            "insert_id {insert_id:?}"
        );
    }
    let kept = app.track_keyed("kept_event", "u-kept", "order-1").await;
    assert!(kept.success && !kept.suppressed && !kept.event_id.is_empty(), "{kept:?}");
    let anonymous = app.track("kept_event", "", 0).await;
    assert!(!anonymous.suppressed && !anonymous.event_id.is_empty(), "{anonymous:?}");

    assert_eq!(stored_traces(&app, "u-gone", "gone_event").await, NOTHING);
    let kept_traces = stored_traces(&app, "u-kept", "kept_event").await;
    assert_eq!((kept_traces.events, kept_traces.insert_ids), (1, 1));
    assert_eq!(kept_traces.counted_events, 2, "the kept and the anonymous event are counted");
    assert!(kept_traces.active);
    assert_eq!(app.event_rows().await, 2);
    assert_eq!(suppressed_metric(&app, "TrackEvent").await, 3.0);
}

#[tokio::test]
async fn identify_user_of_a_suppressed_user_stores_nothing_and_answers_suppressed() {
    let (app, hasher) = spawn_app_with_suppression(Vec::new()).await;
    assert_eq!(
        identify(&app, "u-known", "free").await,
        pb::IdentifyUserResponse { success: true, suppressed: false }
    );
    suppress(&app, &hasher, "u-gone").await;
    suppress(&app, &hasher, "u-known").await;

    let answer = identify(&app, "u-gone", "pro").await;
    assert_eq!(answer, pb::IdentifyUserResponse { success: true, suppressed: true });
    assert_eq!(stored_traces(&app, "u-gone", "none").await, NOTHING);
    // An identity stored before the suppression is not updated (erasing it is DeleteUser's).
    assert!(identify(&app, "u-known", "pro").await.suppressed);
    let plan: String =
        sqlx::query_scalar("SELECT properties->>'plan' FROM user_identities WHERE user_id = 'u-known'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(plan, "free");

    assert!(!identify(&app, "u-kept", "pro").await.suppressed);
    assert_eq!(stored_traces(&app, "u-kept", "none").await.identities, 1);
    assert_eq!(suppressed_metric(&app, "IdentifyUser").await, 2.0);
}

#[tokio::test]
async fn a_batch_mixing_suppressed_normal_and_anonymous_events_answers_per_event() {
    let (app, hasher) = spawn_app_with_suppression(Vec::new()).await;
    // Keys stored for u-gone before its suppression: a retry with one stores nothing more.
    let before = app.track_keyed("gone_event", "u-gone", "k-old").await;
    assert!(!before.suppressed);
    suppress(&app, &hasher, "u-gone").await;

    let events = vec![
        track_request("gone_event", "u-gone"),
        track_request("kept_event", "u-kept"),
        track_request("kept_event", ""),
        keyed_track_request("gone_event", "u-gone", "k1"),
        keyed_track_request("kept_event", "u-kept", "k1"),
        keyed_track_request("gone_event", "u-gone", "k1"),
        keyed_track_request("kept_event", "u-kept", "k1"),
        keyed_track_request("gone_event", "u-gone", "k-old"),
        keyed_track_request("kept_event", "", "k1"),
        track_request("", "u-gone"),
    ];
    let results = app.track_batch(events).await;
    let statuses: Vec<TrackEventStatus> = results.iter().map(status_of).collect();
    use TrackEventStatus::{Accepted, Duplicate, Rejected, Suppressed};
    assert_eq!(
        statuses,
        [
            Suppressed, Accepted, Accepted, Suppressed, Accepted, Suppressed, Duplicate, Suppressed,
            Accepted, Rejected
        ]
    );
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result.index, index as i32);
        if status_of(result) == Suppressed {
            assert!(result.event_id.is_empty() && result.error.is_empty() && result.code == 0, "{result:?}");
        }
    }
    assert_eq!(results[6].event_id, results[4].event_id, "the repeated key answers the first event's id");
    assert_eq!(results[9].code, Code::InvalidArgument as i32, "validation still comes first");

    let gone = stored_traces(&app, "u-gone", "gone_event").await;
    assert_eq!((gone.events, gone.insert_ids), (1, 1), "only the event stored before the suppression");
    assert_eq!(gone.counted_events, 1);
    let kept = stored_traces(&app, "u-kept", "kept_event").await;
    assert_eq!((kept.events, kept.insert_ids), (2, 1));
    assert_eq!(app.event_rows().await, 1 + 4);
    assert_eq!(suppressed_metric(&app, "TrackEvents").await, 4.0);
    assert_eq!(suppressed_metric(&app, "TrackEvent").await, 0.0);
}

#[tokio::test]
async fn a_poison_row_in_a_batch_with_suppressed_events_fails_only_itself() {
    let (app, hasher) = spawn_app_with_suppression(Vec::new()).await;
    suppress(&app, &hasher, "u-gone").await;
    sqlx::query("ALTER TABLE events ADD CONSTRAINT no_poison CHECK (event_name <> 'poison')")
        .execute(&app.pool)
        .await
        .unwrap();

    let events = vec![
        keyed_track_request("gone_event", "u-gone", "k1"),
        track_request("ok", "u1"),
        track_request("poison", "u2"),
        track_request("gone_event", "u-gone"),
        keyed_track_request("ok", "u3", "k3"),
    ];
    let statuses: Vec<TrackEventStatus> = app.track_batch(events).await.iter().map(status_of).collect();
    use TrackEventStatus::{Accepted, Rejected, Suppressed};
    assert_eq!(statuses, [Suppressed, Accepted, Rejected, Suppressed, Accepted]);
    assert_eq!(stored_traces(&app, "u-gone", "gone_event").await, NOTHING);
    assert_eq!(app.event_rows().await, 2);
}

#[tokio::test]
async fn replicas_sharing_the_database_honour_one_suppression_list_and_its_lifting() {
    let (first, hasher) = spawn_app_with_suppression(Vec::new()).await;
    let second =
        start_server(first.config.clone(), first.database_name.clone(), first.redis_prefix.clone()).await;
    // Data stored through the second replica, then DeleteUser with suppress through the
    // first: erased, and refused from then on by both.
    assert!(!second.track("gone_event", "u-gone", 0).await.suppressed);
    assert!(!identify(&second, "u-gone", "free").await.suppressed);
    let deletion = first
        .admin_client()
        .delete_user(pb::DeleteUserRequest { user_id: "u-gone".into(), suppress: true })
        .await
        .unwrap()
        .into_inner()
        .deletion
        .unwrap();
    assert_eq!(deletion.state, pb::UserDeletionState::Completed as i32, "{deletion:?}");
    assert_eq!((deletion.events_deleted, deletion.identity_deleted, deletion.suppress), (1, true, true));
    assert_eq!(deletion.subject_hash, hasher.hash("u-gone").to_hex());

    for replica in [&first, &second] {
        assert!(replica.track("gone_event", "u-gone", 0).await.suppressed);
        let batch = replica.track_batch(vec![keyed_track_request("gone_event", "u-gone", "k1")]).await;
        assert_eq!(status_of(&batch[0]), TrackEventStatus::Suppressed);
        assert!(identify(replica, "u-gone", "pro").await.suppressed);
    }
    assert_eq!(stored_traces(&first, "u-gone", "gone_event").await, NOTHING);

    assert!(lift(&first, "u-gone").await, "lifted through the first replica");
    let stored = second.track_keyed("gone_event", "u-gone", "k1").await;
    assert!(!stored.suppressed && !stored.event_id.is_empty(), "{stored:?}");
    assert!(!identify(&second, "u-gone", "pro").await.suppressed);
    let traces = stored_traces(&first, "u-gone", "gone_event").await;
    assert_eq!((traces.events, traces.insert_ids, traces.identities), (1, 1, 1));
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM suppressed_users").fetch_one(&first.pool).await.unwrap();
    assert_eq!(left, 0);

    assert!(!lift(&second, "u-gone").await, "not suppressed any more");
    assert!(!lift(&second, "u-never").await);
    let invalid = first
        .admin_client()
        .lift_suppression(pb::LiftSuppressionRequest { user_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(invalid.message().starts_with("user_id"), "{invalid:?}");
}

#[tokio::test]
async fn the_suppression_list_stores_only_keyed_hashes() {
    let (app, hasher) = spawn_app_with_suppression(Vec::new()).await;
    suppress(&app, &hasher, "u-gone").await;
    let hashes: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT subject_hash FROM suppressed_users").fetch_all(&app.pool).await.unwrap();
    assert_eq!(hashes, [hasher.hash("u-gone").as_bytes().to_vec()]);
    // The hash is keyed: another key names the same id differently.
    assert_ne!(SubjectHasher::new(&[0; 32]).hash("u-gone"), hasher.hash("u-gone"));
    assert!(app.track("gone_event", "u-gone", 0).await.suppressed);
}

#[tokio::test]
async fn without_a_suppression_key_nothing_is_checked() {
    let (env, key_file) = admin_env();
    let env = env.into_iter().filter(|(name, _)| name != "SUPPRESSION_KEY_FILE").collect();
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    // The list names the user under the key the server was not given.
    suppress(&app, &hasher_of(&key_file), "u-gone").await;

    let answer = app.track_keyed("gone_event", "u-gone", "k1").await;
    assert!(!answer.suppressed && !answer.event_id.is_empty(), "{answer:?}");
    let batch = app.track_batch(vec![track_request("gone_event", "u-gone")]).await;
    assert_eq!(status_of(&batch[0]), TrackEventStatus::Accepted);
    assert!(!identify(&app, "u-gone", "pro").await.suppressed);
    let traces = stored_traces(&app, "u-gone", "gone_event").await;
    assert_eq!((traces.events, traces.insert_ids, traces.identities), (2, 1, 1));
    let metrics = app.admin_get("/metrics").await.1;
    assert!(!metrics.contains("analytics_suppressed_total{"), "nothing counted as suppressed");
    let refused = app
        .admin_client()
        .lift_suppression(pb::LiftSuppressionRequest { user_id: "u-gone".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
}

/// Cuts the server's connections while the commit storing `events` events of `user_id`
/// runs (its trigger sleeps), waits until that commit is visible, then heals the network:
/// the server never got the answer and retries.
async fn lose_the_answer_of_the_commit_storing(app: &TestApp, proxy: &TcpProxy, user_id: &str, events: i64) {
    let running = wait_for_sql(
        &app.pool,
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep')",
        Duration::from_secs(10),
        Duration::from_millis(10),
    )
    .await;
    assert!(running, "the commit started");
    proxy.cut();
    let committed = wait_until(Duration::from_secs(10), Duration::from_millis(10), async || {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        stored == events
    })
    .await;
    assert!(committed, "the commit went through although its connection was cut");
    proxy.restore();
}

/// A commit whose answer is lost is retried; when its user was suppressed in between, the
/// retry finds the events that first attempt stored and answers them as stored, with
/// their ids, not as suppressed.
#[tokio::test]
async fn a_retry_after_a_lost_answer_reports_events_stored_before_the_suppression() {
    let (env, key_file) = admin_env();
    let mut env: Vec<(&str, &str)> =
        env.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
    env.extend([("INGEST_COMMIT_TIMEOUT_MS", "5000"), ("POSTGRES_ACQUIRE_TIMEOUT_MS", "200")]);
    let (proxy, app) = spawn_app_behind_postgres_proxy(env).await;
    let hasher = hasher_of(&key_file);
    // Storing an event of a u-race user suppresses that user in the same transaction,
    // and takes long enough for the test to cut the connection before the answer.
    sqlx::query("CREATE TABLE race_hashes (user_id TEXT PRIMARY KEY, subject_hash BYTEA NOT NULL)")
        .execute(&app.pool)
        .await
        .unwrap();
    for user_id in ["u-race-batch", "u-race-unary"] {
        sqlx::query("INSERT INTO race_hashes VALUES ($1, $2)")
            .bind(user_id)
            .bind(hasher.hash(user_id).as_bytes())
            .execute(&app.pool)
            .await
            .unwrap();
    }
    sqlx::raw_sql(
        "CREATE FUNCTION suppress_while_storing() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO suppressed_users (subject_hash)
             SELECT subject_hash FROM race_hashes WHERE user_id = NEW.user_id
             ON CONFLICT DO NOTHING;
             PERFORM pg_sleep(0.5);
             RETURN NULL;
         END $$;
         CREATE TRIGGER suppress_while_storing AFTER INSERT ON events
         FOR EACH ROW WHEN (NEW.user_id LIKE 'u-race%') EXECUTE FUNCTION suppress_while_storing();",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    let batch = tokio::spawn({
        let app_client = app.client.clone();
        async move {
            let events = vec![
                track_request("race_event", "u-race-batch"),
                keyed_track_request("race_event", "u-race-batch", "k1"),
            ];
            app_client.clone().track_events(pb::TrackEventsRequest { events }).await
        }
    });
    lose_the_answer_of_the_commit_storing(&app, &proxy, "u-race-batch", 2).await;
    let results = batch.await.unwrap().expect("the retried batch succeeds").into_inner().results;
    let statuses: Vec<TrackEventStatus> = results.iter().map(status_of).collect();
    assert_eq!(statuses, [TrackEventStatus::Accepted, TrackEventStatus::Accepted]);
    let mut stored: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM events WHERE user_id = 'u-race-batch' ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let mut answered: Vec<String> = results.into_iter().map(|result| result.event_id).collect();
    stored.sort();
    answered.sort();
    assert_eq!(answered, stored, "the answer names the events the first attempt stored");

    let unary = tokio::spawn({
        let mut client = app.client.clone();
        async move { client.track_event(track_request("race_event", "u-race-unary")).await }
    });
    lose_the_answer_of_the_commit_storing(&app, &proxy, "u-race-unary", 1).await;
    let answer = unary.await.unwrap().expect("the retried call succeeds").into_inner();
    assert!(!answer.suppressed, "{answer:?}");
    let stored: String = sqlx::query_scalar("SELECT id::text FROM events WHERE user_id = 'u-race-unary'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(answer.event_id, stored);

    // Both users are suppressed now: their next events are not stored.
    assert!(app.track("race_event", "u-race-unary", 0).await.suppressed);
    assert_eq!(
        suppressed_metric(&app, "TrackEvents").await + suppressed_metric(&app, "TrackEvent").await,
        1.0
    );
}
