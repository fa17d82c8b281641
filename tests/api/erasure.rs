//! DeleteUser and GetUserDeletion: what an erasure removes (events in every partition,
//! identity, idempotency keys, the user's share of every rollup, bitmap and cached
//! answer), that counts afterwards equal raw SQL over what remains, that nothing of the
//! user id is left in a dump, and that an erasure killed with -9 mid-way completes after
//! a restart.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use analytics_service::pb;
use analytics_service::pb::analytics_admin_service_client::AnalyticsAdminServiceClient;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use analytics_service::security::subject::SubjectHasher;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tonic::transport::Channel;
use tonic::Code;

use crate::helpers::{
    admin_env, binary_command, closed_port, create_database, drop_database, keyed_track_request,
    metric_value, now, postgres_host, postgres_port, postgres_user, spawn_app_with, string_value,
    wait_serving, wait_until, TestApp, TestOptions,
};
use crate::rollups::{
    brute_force_counts, brute_force_unique_users, insert_random_events, DAY, HOUR, NAMES, ZONES,
};

async fn spawn_admin_app(extra: &[(&str, &str)]) -> TestApp {
    let (mut env, _key) = admin_env();
    env.extend(extra.iter().map(|(name, value)| (name.to_string(), value.to_string())));
    spawn_app_with(TestOptions { env, ..TestOptions::default() }).await
}

async fn delete_user(app: &TestApp, user_id: &str, suppress: bool) -> pb::UserDeletion {
    app.admin_client()
        .delete_user(pb::DeleteUserRequest { user_id: user_id.into(), suppress })
        .await
        .expect("DeleteUser succeeds")
        .into_inner()
        .deletion
        .expect("a deletion")
}

/// DeleteUser, then GetUserDeletion until COMPLETED.
async fn erase(app: &TestApp, user_id: &str) -> pb::UserDeletion {
    let deletion = delete_user(app, user_id, false).await;
    wait_completed(&mut app.admin_client(), &deletion.request_id, Duration::from_secs(60)).await
}

async fn wait_completed(
    admin: &mut AnalyticsAdminServiceClient<Channel>,
    request_id: &str,
    timeout: Duration,
) -> pb::UserDeletion {
    let mut last = None;
    let completed = wait_until(timeout, Duration::from_millis(100), async || {
        let Ok(answer) =
            admin.get_user_deletion(pb::GetUserDeletionRequest { request_id: request_id.into() }).await
        else {
            return false;
        };
        let deletion = answer.into_inner().deletion.unwrap();
        let done = deletion.state == pb::UserDeletionState::Completed as i32;
        last = Some(deletion);
        done
    })
    .await;
    assert!(completed, "erasure {request_id} did not complete: {last:?}");
    last.unwrap()
}

async fn count_rows(pool: &PgPool, sql: &str, user_id: &str) -> i64 {
    sqlx::query_scalar(sql).bind(user_id).fetch_one(pool).await.unwrap()
}

/// Everything stored under `user_id`, table by table.
async fn traces_of(pool: &PgPool, user_id: &str) -> Vec<(&'static str, i64)> {
    let checks = [
        ("events", "SELECT count(*) FROM events WHERE user_id = $1"),
        ("user_identities", "SELECT count(*) FROM user_identities WHERE user_id = $1"),
        ("event_insert_ids", "SELECT count(*) FROM event_insert_ids WHERE user_id = $1"),
        ("user_ordinals", "SELECT count(*) FROM user_ordinals WHERE user_id = $1"),
        ("user_activity_pending", "SELECT count(*) FROM user_activity_pending WHERE $1 = ANY(user_ids)"),
        ("erasure_requests", "SELECT count(*) FROM erasure_requests WHERE user_id = $1"),
    ];
    let mut traces = Vec::new();
    for (table, sql) in checks {
        traces.push((table, count_rows(pool, sql, user_id).await));
    }
    traces
}

#[tokio::test]
async fn delete_user_erases_every_trace_and_answers_what_it_removed() {
    let app = spawn_admin_app(&[("EVENT_MAX_AGE_DAYS", "100")]).await;
    let mut client = app.client.clone();
    let doomed = "erase-me@example.com";
    // Events in three monthly partitions, with and without insert_ids, and an identity.
    let mut tracked = 0;
    for (days_ago, insert_id) in [(70, "k1"), (40, ""), (1, "k2"), (0, "k3")] {
        for name in ["view", "click"] {
            let mut request = keyed_track_request(name, doomed, insert_id);
            request.insert_id =
                if insert_id.is_empty() { String::new() } else { format!("{insert_id}-{name}") };
            request.timestamp = now() - days_ago * DAY;
            client.track_event(request).await.unwrap();
            tracked += 1;
        }
        client
            .track_event(pb::TrackEventRequest {
                timestamp: now() - days_ago * DAY,
                ..keyed_track_request("view", "keeper", "")
            })
            .await
            .unwrap();
    }
    client
        .identify_user(pb::IdentifyUserRequest {
            user_id: doomed.into(),
            properties: [("plan".to_string(), string_value("pro"))].into(),
        })
        .await
        .unwrap();
    let (start, end) = (now() - 80 * DAY, now() + HOUR);
    assert_eq!(app.unique_users(start, end).await, 2);
    let before = app.counts("", start, end, "day", "Europe/Berlin").await;
    assert_eq!(before.iter().map(|count| count.2).sum::<i64>(), tracked + 4);

    let deletion = delete_user(&app, doomed, false).await;
    let deletion = if deletion.state == pb::UserDeletionState::Completed as i32 {
        deletion
    } else {
        wait_completed(&mut app.admin_client(), &deletion.request_id, Duration::from_secs(30)).await
    };
    assert_eq!(deletion.events_deleted, tracked);
    assert_eq!(deletion.insert_ids_deleted, 6);
    assert!(deletion.identity_deleted);
    assert!(!deletion.suppress);
    assert!(deletion.completed_at >= deletion.requested_at && deletion.requested_at > 0);
    let key = std::fs::read_to_string(app.config.pii.suppression_key_file.as_ref().unwrap()).unwrap();
    assert_eq!(deletion.subject_hash, SubjectHasher::parse(&key, "key").unwrap().hash(doomed).to_hex());
    assert!(
        traces_of(&app.pool, doomed).await.iter().all(|(_, rows)| *rows == 0),
        "{:?}",
        traces_of(&app.pool, doomed).await
    );

    // Audited under the keyed hash, with the request and what it removed.
    let (outcome, subject_hash, request_id, details): (String, Vec<u8>, uuid::Uuid, serde_json::Value) =
        sqlx::query_as(
            "SELECT outcome, subject_hash, request_id, details FROM admin_audit WHERE rpc = 'DeleteUser' ORDER BY id LIMIT 1",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "ok");
    assert_eq!(SubjectHasher::parse(&key, "key").unwrap().hash(doomed).as_bytes(), subject_hash.as_slice());
    assert_eq!(request_id.to_string(), deletion.request_id);
    assert_eq!(details["suppress"], false);

    // The answers cached before the erasure are not used after it.
    assert_eq!(app.unique_users(start, end).await, 1);
    let after = app.counts("", start, end, "day", "Europe/Berlin").await;
    assert_same_counts(
        &after,
        &brute_force_counts(&app.pool, "", start, end, "day", "Europe/Berlin").await,
        "after",
    );
    assert_eq!(after.iter().map(|count| count.2).sum::<i64>(), 4);

    // Idempotent: again, and for a user that never existed, completed with nothing removed.
    for user_id in [doomed, "never-seen"] {
        let again = erase(&app, user_id).await;
        assert_eq!((again.events_deleted, again.insert_ids_deleted, again.identity_deleted), (0, 0, false));
    }
    // Unknown and malformed request ids.
    let mut admin = app.admin_client();
    let unknown = admin
        .get_user_deletion(pb::GetUserDeletionRequest { request_id: uuid::Uuid::now_v7().to_string() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let malformed =
        admin.get_user_deletion(pb::GetUserDeletionRequest { request_id: "nope".into() }).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    let empty = admin.delete_user(pb::DeleteUserRequest { user_id: String::new(), suppress: false }).await;
    assert_eq!(empty.unwrap_err().code(), Code::InvalidArgument);
}

/// Asserts equal counts, showing only the rows that differ.
fn assert_same_counts(answer: &[(String, i64, i64)], expected: &[(String, i64, i64)], context: &str) {
    if answer == expected {
        return;
    }
    let only_answer: Vec<_> = answer.iter().filter(|row| !expected.contains(row)).collect();
    let only_expected: Vec<_> = expected.iter().filter(|row| !answer.contains(row)).collect();
    panic!(
        "{context}: answered but not in raw SQL {only_answer:?}; raw SQL but not answered {only_expected:?}"
    );
}

/// One count query: name, [start, end), grouping and zone.
type Query = (&'static str, i64, i64, &'static str, &'static str);

fn random_queries(random: &mut StdRng, from: i64, to: i64, count: usize) -> Vec<Query> {
    (0..count)
        .map(|_| {
            let start = random.random_range(from - DAY..to);
            let end = start + random.random_range(1..30 * DAY);
            let name = if random.random_bool(0.5) { "" } else { NAMES[random.random_range(0..NAMES.len())] };
            let group_by = ["", "hour", "day", "week"][random.random_range(0..4)];
            (name, start, end, group_by, ZONES[random.random_range(0..ZONES.len())])
        })
        .collect()
}

async fn assert_queries_equal_raw_sql(app: &TestApp, queries: &[Query], when: &str) {
    for &(name, start, end, group_by, zone) in queries {
        let answer = app.counts(name, start, end, group_by, zone).await;
        let expected = brute_force_counts(&app.pool, name, start, end, group_by, zone).await;
        assert_same_counts(
            &answer,
            &expected,
            &format!("{when}: name {name:?} [{start}, {end}) {group_by:?} {zone:?}"),
        );
        let users = app.unique_users(start, end).await;
        assert_eq!(
            users,
            brute_force_unique_users(&app.pool, start, end).await,
            "{when}: users [{start}, {end})"
        );
    }
}

/// Random events for random users; the same queries asked before (so cached: stamped
/// answers over recent ranges, immutable ones over ranges older than EVENT_MAX_AGE_DAYS)
/// and after erasing a random subset of users, some while the fold has not run, equal
/// raw SQL over what remains.
#[tokio::test]
async fn counts_after_erasing_random_users_equal_raw_sql_for_every_grouping_zone_and_cached_range() {
    let app = spawn_admin_app(&[("EVENT_MAX_AGE_DAYS", "10")]).await;
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut random = StdRng::seed_from_u64(seed);
    let to = now();
    let from = to - 40 * DAY;
    for _ in 0..4 {
        insert_random_events(&app.pool, &mut random, 1_500, from, to).await;
    }
    let queries = random_queries(&mut random, from, to, 40);
    assert_queries_equal_raw_sql(&app, &queries, "before").await;

    let users: Vec<String> = sqlx::query_scalar("SELECT DISTINCT user_id FROM events WHERE user_id <> ''")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let mut doomed = BTreeSet::new();
    while doomed.len() < 12 {
        doomed.insert(users[random.random_range(0..users.len())].clone());
    }
    for (round, user_id) in doomed.iter().enumerate() {
        if round % 4 == 0 {
            // Late events arrive between erasures, some for users erased next.
            insert_random_events(&app.pool, &mut random, 200, from, to).await;
        }
        erase(&app, user_id).await;
        // Later random events may belong to this user again (it is not suppressed).
        let traces = traces_of(&app.pool, user_id).await;
        assert!(traces.iter().all(|(_, rows)| *rows == 0), "{user_id}: {traces:?}");
        if round % 3 == 0 {
            assert_queries_equal_raw_sql(&app, &queries[..10], &format!("after erasing {user_id}")).await;
        }
    }
    assert_queries_equal_raw_sql(&app, &queries, "after every erasure").await;
    // Once everything is folded too.
    app.wait_for_the_fold().await;
    assert_queries_equal_raw_sql(&app, &queries, "folded").await;
    let emptied: i64 =
        sqlx::query_scalar("SELECT (SELECT count(*) FROM event_counts_hourly WHERE event_count <= 0) + (SELECT count(*) FROM event_counts_daily WHERE event_count <= 0)")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(emptied, 0, "a rollup row brought to zero is deleted");
}

/// A replica remembers the bitmap ordinals of the users its unique-user counts read raw
/// (see UserOrdinals). An erased user who comes back gets a new ordinal; the remembered
/// old one must not be used, or the user is counted twice: once under the old ordinal
/// (raw, at the range's edge) and once under the new one (in a folded hour's bitmap).
#[tokio::test]
async fn an_erased_user_who_comes_back_is_counted_once_under_a_new_ordinal() {
    let app = spawn_admin_app(&[]).await;
    // Its edge hours are read raw (or from kept summaries), not from stored or live spans.
    let _no_spans = app.hold_the_span_builder().await;
    let hour = (now() - 5 * HOUR).div_euclid(HOUR) * HOUR;
    // [hour + 30 min, hour + 3 h 30 min): its first and last hours are partial; an event in
    // the start hour before the range keeps that hour from being read whole, so the users
    // of its part inside are read raw and looked up by ordinal.
    let (start, end) = (hour + 30 * 60, hour + 3 * HOUR + 30 * 60);
    app.track("view", "early", hour + 10 * 60).await;
    for user in ["returner", "other"] {
        app.track("view", user, hour + 40 * 60).await;
        app.track("view", user, hour + HOUR + 5 * 60).await;
    }
    app.wait_for_the_fold().await;
    app.forget_live_spans().await;
    let lookups = |result: &'static str| {
        let app = &app;
        async move {
            let metrics = app.admin_get("/metrics").await.1;
            metric_value(&metrics, &format!("analytics_user_ordinal_lookups_total{{result=\"{result}\"}}"))
        }
    };
    assert_eq!(app.unique_users(start, end).await, 2);
    let read = lookups("miss").await;
    assert!(read >= 2.0, "the edge users' ordinals were read ({read})");
    // Another range with the same raw edge: the ordinals come from memory now.
    assert_eq!(app.unique_users(start, end + HOUR).await, 2);
    assert!(lookups("hit").await >= 2.0, "remembered ordinals were used");
    let before: i32 = sqlx::query_scalar("SELECT ordinal FROM user_ordinals WHERE user_id = 'returner'")
        .fetch_one(&app.pool)
        .await
        .unwrap();

    erase(&app, "returner").await;
    assert_eq!(app.unique_users(start, end).await, 1);
    app.track("view", "returner", hour + 40 * 60).await;
    app.track("view", "returner", hour + HOUR + 5 * 60).await;
    app.wait_for_the_fold().await;
    let after: i32 = sqlx::query_scalar("SELECT ordinal FROM user_ordinals WHERE user_id = 'returner'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_ne!(before, after, "the user came back under a new ordinal");
    for (from, to) in [(start, end), (start, end + HOUR)] {
        assert_eq!(app.unique_users(from, to).await, brute_force_unique_users(&app.pool, from, to).await);
        assert_eq!(app.unique_users(from, to).await, 2, "returner and other, once each");
    }
}

/// A partial edge hour read raw twice gets a summary (each user's first and last second
/// in the hour, each name's events per second), and counts take the hour's part from it
/// while the count's own snapshot shows the hour unchanged. A late event that moves a
/// user's last second into the range, the fold that follows, and an erasure each change
/// the hour under a kept summary: every answer still equals raw SQL, unique users (the
/// start hour's part by last second, the end hour's by first second) and event counts
/// (ungrouped, by hour and by day in zones whole hours and half hours off UTC, one name).
#[tokio::test]
async fn a_kept_summary_of_an_edge_hour_never_outlives_a_late_event_or_an_erasure() {
    let app = spawn_admin_app(&[]).await;
    // Its edge hours are read raw (or from kept summaries), not from stored or live spans.
    let _no_spans = app.hold_the_span_builder().await;
    let hour = (now() - 8 * HOUR).div_euclid(HOUR) * HOUR;
    let end_hour = hour + 3 * HOUR;
    let metric = |name: &'static str| {
        let app = &app;
        async move { metric_value(&app.admin_get("/metrics").await.1, name) }
    };
    let summarised = async |query: &str| {
        let name = format!("analytics_edge_hours_total{{query=\"{query}\",source=\"summary\"}}");
        metric_value(&app.admin_get("/metrics").await.1, &name)
    };
    let built = async || metric("analytics_edge_hour_summaries_built_total").await;
    // [hour + 30 min, end_hour + 25 min): an event before the range's start and one after
    // its end keep both partial hours from being read whole.
    let (start, end) = (hour + 30 * 60, end_hour + 25 * 60);
    app.track("view", "early", hour + 10 * 60).await;
    app.track("view", "mover", hour + 20 * 60).await;
    app.track("view", "stayer", hour + 40 * 60).await;
    app.track("view", "gone", hour + 50 * 60).await;
    app.track("view", "stayer", end_hour + 5 * 60).await;
    app.track("view", "late-starter", end_hour + 30 * 60).await;
    app.track("view", "gone", end_hour + 20 * 60).await;
    app.wait_for_the_fold().await;
    app.forget_live_spans().await;
    let exact = async |stage: &str| {
        for (from, to) in [(start, end), (start, end_hour), (hour + 2 * HOUR, end)] {
            let expected = brute_force_unique_users(&app.pool, from, to).await;
            assert_eq!(app.unique_users(from, to).await, expected, "{stage}: users in [{from}, {to})");
            for (name, group_by, zone) in [
                ("", "", ""),
                ("", "hour", "Asia/Kolkata"),
                ("view", "day", "America/New_York"),
                ("", "hour", ""),
            ] {
                let answer = app.counts(name, from, to, group_by, zone).await;
                let expected = brute_force_counts(&app.pool, name, from, to, group_by, zone).await;
                let context = format!("{stage}: counts by {group_by:?} in {zone:?} over [{from}, {to})");
                assert_same_counts(&answer, &expected, &context);
            }
        }
    };
    let summaries_built = async |more_than: f64| {
        let wait = wait_until(Duration::from_secs(10), Duration::from_millis(50), async || {
            exact("building").await;
            built().await > more_than
        });
        let done = wait.await;
        let metrics = app.admin_get("/metrics").await.1;
        let edge_lines: Vec<&str> =
            metrics.lines().filter(|line| line.starts_with("analytics_edge_hour")).collect();
        assert!(done, "summaries of the edge hours were built (more than {more_than}): {edge_lines:?}");
    };

    assert_eq!(app.unique_users(start, end).await, 2, "stayer and gone");
    summaries_built(0.0).await;
    let before = (summarised("user_count").await, summarised("event_count").await);
    exact("summaries kept").await;
    assert!(summarised("user_count").await > before.0, "the kept summaries were used for users");
    assert!(summarised("event_count").await > before.1, "the kept summaries were used for events");

    // mover's last second in the start hour moves into the range: a summary that missed
    // the change would leave mover out. The start hour is counted whole minus its part
    // before the range, whose events a stale summary would not hold: one too many.
    let built_before_late_events = built().await;
    app.track("view", "mover", hour + 45 * 60).await;
    app.track("view", "early", hour + 15 * 60).await;
    exact("late event, maybe not folded yet").await;
    app.wait_for_the_fold().await;
    exact("late event folded").await;
    assert_eq!(app.unique_users(start, end).await, 3, "mover, stayer and gone");

    // The start hour's summary is built again; the erasure then changes both hours under
    // their kept summaries.
    summaries_built(built_before_late_events).await;
    erase(&app, "gone").await;
    exact("after the erasure").await;
    assert_eq!(app.unique_users(start, end).await, 2, "mover and stayer");
}

/// A unique-user count reads its partial edge hours from their stored spans; an erasure
/// deletes the spans of the erased user's hours with the user's ordinal (no row names it
/// after), leaves the other hours' spans alone, and every count stays exact before the
/// builder writes those hours again and after.
#[tokio::test]
async fn an_erasure_deletes_the_stored_spans_of_its_hours_and_counts_stay_exact() {
    let app = spawn_admin_app(&[]).await;
    let hour = (now() - 8 * HOUR).div_euclid(HOUR) * HOUR;
    let end_hour = hour + 3 * HOUR;
    let (start, end) = (hour + 30 * 60, end_hour + 25 * 60);
    // An event before the start and one after the end keep both edge hours partial.
    app.track("view", "early", hour + 10 * 60).await;
    app.track("view", "gone", hour + 40 * 60).await;
    app.track("view", "stayer", hour + 50 * 60).await;
    app.track("view", "other", hour + HOUR + 60).await;
    app.track("view", "gone", end_hour + 5 * 60).await;
    app.track("view", "late", end_hour + 30 * 60).await;
    app.wait_for_the_fold().await;
    app.span_closed_hours().await;
    let spans_of = async |hour_start: i64| -> Option<Vec<u8>> {
        sqlx::query_scalar("SELECT spans FROM user_activity_hour_spans WHERE hour_start = to_timestamp($1)")
            .bind(hour_start)
            .fetch_optional(&app.pool)
            .await
            .unwrap()
    };
    for hour_start in [hour, hour + HOUR, end_hour] {
        assert!(spans_of(hour_start).await.is_some(), "the hour at {hour_start} is spanned");
    }
    let spanned = async || {
        let metrics = app.admin_get("/metrics").await.1;
        metric_value(&metrics, "analytics_edge_hours_total{query=\"user_count\",source=\"spans\"}")
    };
    let exact = async |stage: &str| {
        let expected = brute_force_unique_users(&app.pool, start, end).await;
        assert_eq!(app.unique_users(start, end).await, expected, "{stage}");
        expected
    };
    let before = spanned().await;
    assert_eq!(exact("spanned").await, 3, "gone, stayer, other");
    assert!(spanned().await >= before + 2.0, "both edge hours were read from their spans");

    let ordinal: i32 = sqlx::query_scalar("SELECT ordinal FROM user_ordinals WHERE user_id = 'gone'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let other_hour = spans_of(hour + HOUR).await;
    erase(&app, "gone").await;
    let stored: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT spans FROM user_activity_hour_spans").fetch_all(&app.pool).await.unwrap();
    for spans in &stored {
        assert!(
            spans
                .chunks_exact(8)
                .all(|span| i32::from_be_bytes([span[0], span[1], span[2], span[3]]) != ordinal),
            "no stored spans name the erased ordinal {ordinal}"
        );
    }
    assert_eq!(spans_of(hour + HOUR).await, other_hour, "an hour the user had no event in keeps its spans");
    assert_eq!(exact("erased, spans deleted").await, 2, "stayer, other");
    // The builder writes settled hours only: the erasure's deletions folded first.
    app.wait_for_the_fold().await;
    app.span_closed_hours().await;
    assert!(spans_of(hour).await.is_some() && spans_of(end_hour).await.is_some(), "written again");
    let before = spanned().await;
    assert_eq!(exact("erased, spans written again").await, 2);
    assert!(spanned().await >= before + 2.0, "both edge hours were read from their spans again");
}

/// A unique-user count reads the ordinals it does not remember in a second statement; if an
/// erasure committed between its two statements (the erasure generation moved), it is read
/// again with the ordinals probed in one statement. Bumping the generation as fast as
/// PostgreSQL commits, while counting a range whose edge users are read raw, takes that path
/// within a few calls; every answer stays exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_count_racing_an_erasure_generation_is_read_again_and_stays_exact() {
    let app = spawn_admin_app(&[]).await;
    // Its edge hours are read raw (or from kept summaries), not from stored or live spans.
    let _no_spans = app.hold_the_span_builder().await;
    let hour = (now() - 5 * HOUR).div_euclid(HOUR) * HOUR;
    let (start, end) = (hour + 30 * 60, hour + 3 * HOUR + 30 * 60);
    // As above: the start hour is read raw, so its 40 users are looked up by ordinal.
    app.track("view", "early", hour + 10 * 60).await;
    for user in 0..40 {
        app.track("view", &format!("user-{user}"), hour + 40 * 60).await;
    }
    app.track("view", "user-0", hour + HOUR + 5 * 60).await;
    app.wait_for_the_fold().await;
    app.forget_live_spans().await;
    let expected = brute_force_unique_users(&app.pool, start, end).await;
    assert_eq!(expected, 40);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bumper = tokio::spawn({
        let (pool, stop) = (app.pool.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query("UPDATE erasure_generation SET generation = generation + 1")
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
    });
    let rereads =
        async || metric_value(&app.admin_get("/metrics").await.1, "analytics_user_count_rereads_total");
    let mut calls = 0;
    while rereads().await == 0.0 && calls < 1_000 {
        // A range end one second later each call: the end hour holds no event either way.
        assert_eq!(app.unique_users(start, end + calls).await, expected, "call {calls}");
        calls += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    bumper.await.unwrap();
    assert!(rereads().await > 0.0, "no count was read again in {calls} calls");
    println!("read again after {calls} calls");
    assert_eq!(app.unique_users(start, end).await, expected);
}

/// After an erasure, a data-only pg_dump of the database holds the user id nowhere
/// (the suppression list and the audit records hold its keyed hash only).
#[tokio::test]
async fn a_dump_after_erasure_holds_no_trace_of_the_user_id() {
    let app = spawn_admin_app(&[]).await;
    let doomed = "dump-check-7f3a9c21";
    let mut client = app.client.clone();
    for insert_id in ["", "a", "b"] {
        client.track_event(keyed_track_request("view", doomed, insert_id)).await.unwrap();
    }
    client
        .identify_user(pb::IdentifyUserRequest {
            user_id: doomed.into(),
            properties: [("email".to_string(), string_value("x@example.com"))].into(),
        })
        .await
        .unwrap();
    // Folded into the bitmaps and ordinals first, so those hold it too.
    wait_until(Duration::from_secs(10), Duration::from_millis(100), async || {
        count_rows(&app.pool, "SELECT count(*) FROM user_ordinals WHERE user_id = $1", doomed).await == 1
    })
    .await;
    let deletion = delete_user(&app, doomed, true).await;
    wait_completed(&mut app.admin_client(), &deletion.request_id, Duration::from_secs(30)).await;

    let dump = Command::new("pg_dump")
        .args([
            "--data-only",
            "-h",
            &postgres_host(),
            "-p",
            &postgres_port().to_string(),
            "-U",
            &postgres_user(),
        ])
        .arg(&app.database_name)
        .output()
        .expect("pg_dump runs");
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("suppressed_users"), "the dump covers the tables");
    assert!(!dump.contains(doomed), "the dump names the erased user");
}

/// A server binary on its own database, killable with -9.
struct Server {
    process: Child,
    address: SocketAddr,
}

impl Server {
    async fn start(database: &str, key_file: &std::path::Path) -> Self {
        let port = closed_port();
        let process = binary_command(database)
            .env("REDIS_HOST", "")
            .env("SERVICE_BIND_ADDRESS", "127.0.0.1")
            .env("SERVICE_PORT", port.to_string())
            .env("PROMETHEUS_PORT", "0")
            .env("ADMIN_RPCS_ENABLED", "true")
            .env("SUPPRESSION_KEY_FILE", key_file)
            .env("SELF_TRACKING", "false")
            .stdout(Stdio::null())
            .arg("serve")
            .spawn()
            .unwrap();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(wait_serving(address, Duration::from_secs(20)).await, "the server came up");
        Self { process, address }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.address)).unwrap().connect().await.unwrap()
    }

    fn kill_9(mut self) {
        let killed = Command::new("kill").args(["-KILL", &self.process.id().to_string()]).status().unwrap();
        assert!(killed.success());
        self.process.wait().ok();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.process.kill().ok();
        self.process.wait().ok();
    }
}

/// kill -9 of the server while it erases a user with 200k events; after a restart the
/// erasure resumes (once the dead replica's lease lapses) and completes, counts exact.
/// Ingestion for other users goes on during the erasure.
#[tokio::test]
async fn an_erasure_killed_mid_way_completes_after_restart_with_exact_counts() {
    let database = create_database().await;
    let (_, key_file) = admin_env();
    let migrate = binary_command(&database)
        .env("REDIS_HOST", "")
        .stdout(Stdio::null())
        .arg("migrate")
        .status()
        .unwrap();
    assert!(migrate.success());
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(
            sqlx::postgres::PgConnectOptions::new()
                .host(&postgres_host())
                .port(postgres_port())
                .username(&postgres_user())
                .database(&database),
        )
        .await
        .unwrap();
    let doomed = "heavy-user";
    let (start, end) = (now() - 20 * DAY, now() + HOUR);
    // 200k events of the user over 20 days (ten statements, as ingestion would write
    // them), and some of others.
    for chunk in 0..10 {
        sqlx::query(
            "INSERT INTO events (event_name, user_id, timestamp)
             SELECT (ARRAY['view','click','buy'])[1 + n % 3], $1, to_timestamp($2 + (n * 8.64)::bigint)
               FROM generate_series($3::bigint, $3 + 19999) AS n",
        )
        .bind(doomed)
        .bind(start)
        .bind(chunk * 20_000_i64)
        .execute(&pool)
        .await
        .unwrap();
    }
    insert_random_events(&pool, &mut StdRng::seed_from_u64(7), 3_000, start, now()).await;

    let server = Server::start(&database, &key_file).await;
    let mut admin = AnalyticsAdminServiceClient::new(server.channel().await);
    let mut request = tonic::Request::new(pb::DeleteUserRequest { user_id: doomed.into(), suppress: false });
    request.set_timeout(Duration::from_millis(500));
    let deletion = admin.delete_user(request).await.unwrap().into_inner().deletion.unwrap();
    assert_eq!(deletion.state, pb::UserDeletionState::Running as i32, "200k events take longer than 0.5 s");

    // Ingestion keeps answering while the erasure runs.
    let mut client = AnalyticsServiceClient::new(server.channel().await);
    for index in 0..20 {
        client.track_event(keyed_track_request("during", &format!("other-{index}"), "")).await.unwrap();
    }
    let mut partial = 0;
    let midway = wait_until(Duration::from_secs(60), Duration::from_millis(20), async || {
        let answer = admin
            .get_user_deletion(pb::GetUserDeletionRequest { request_id: deletion.request_id.clone() })
            .await
            .unwrap()
            .into_inner()
            .deletion
            .unwrap();
        partial = answer.events_deleted;
        partial > 0
    })
    .await;
    assert!(midway && partial < 200_000, "caught mid-way: {partial}");
    server.kill_9();

    let server = Server::start(&database, &key_file).await;
    let mut admin = AnalyticsAdminServiceClient::new(server.channel().await);
    let completed = wait_completed(&mut admin, &deletion.request_id, Duration::from_secs(90)).await;
    assert_eq!(completed.events_deleted, 200_000, "every event counted once across the crash");
    assert!(traces_of(&pool, doomed).await.iter().all(|(_, rows)| *rows == 0));
    let mut client = AnalyticsServiceClient::new(server.channel().await);
    for zone in ["", "Asia/Kathmandu"] {
        for group_by in ["", "day", "hour"] {
            let answer: Vec<(String, i64, i64)> = client
                .get_event_count(pb::GetEventCountRequest {
                    event_name: String::new(),
                    start_time: start - DAY,
                    end_time: end,
                    group_by: group_by.into(),
                    time_zone: zone.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .counts
                .into_iter()
                .map(|count| (count.event_name, count.timestamp, count.count))
                .collect();
            let expected = brute_force_counts(&pool, "", start - DAY, end, group_by, zone).await;
            assert_same_counts(&answer, &expected, &format!("after restart, {group_by:?} {zone:?}"));
        }
    }
    let users = client
        .get_user_count(pb::GetUserCountRequest { start_time: start - DAY, end_time: end })
        .await
        .unwrap();
    assert_eq!(users.into_inner().unique_users, brute_force_unique_users(&pool, start - DAY, end).await);
    drop(server);
    pool.close().await;
    drop_database(&database).await;
}
