//! GetEventCount and GetUserCount: bucket edges, week starts, ordering, unique users.

use analytics_service::pb;
use tonic::Code;

use analytics_service::service::validation::{MAX_UNIX_SECONDS, MIN_UNIX_SECONDS};

use crate::helpers::{monday_two_weeks_ago, now, spawn_app, track_request};

const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

#[tokio::test]
async fn hourly_counts_respect_bucket_edges_and_exclude_end_time() {
    let app = spawn_app().await;
    let base = monday_two_weeks_ago() + 10 * HOUR;
    app.track("view", "a", base).await; // first second of hour 10
    app.track("view", "b", base + HOUR - 1).await; // last second of hour 10
    app.track("view", "a", base + HOUR).await; // first second of hour 11
    app.track("click", "a", base + HOUR + 5).await;
    app.track("view", "c", base + 2 * HOUR).await; // exactly end_time: excluded

    let hourly = app.counts("", base, base + 2 * HOUR, "hour", "").await;
    assert_eq!(
        hourly,
        vec![("view".into(), base, 2), ("click".into(), base + HOUR, 1), ("view".into(), base + HOUR, 1),],
        "ordered by bucket, then name; the event at end_time is not counted"
    );

    let only_views = app.counts("view", base, base + 2 * HOUR, "hour", "").await;
    assert_eq!(only_views, vec![("view".into(), base, 2), ("view".into(), base + HOUR, 1)]);
}

#[tokio::test]
async fn daily_and_weekly_buckets_are_utc_and_weeks_start_on_monday() {
    let app = spawn_app().await;
    let monday = monday_two_weeks_ago();
    app.track("signup", "a", monday - 1).await; // Sunday 23:59:59 of the previous week
    app.track("signup", "b", monday).await; // Monday 00:00:00
    app.track("signup", "c", monday + 6 * DAY + DAY - 1).await; // Sunday 23:59:59
    app.track("signup", "d", monday + 7 * DAY).await; // next Monday

    let weekly = app.counts("signup", monday - DAY, monday + 8 * DAY, "week", "").await;
    assert_eq!(
        weekly,
        vec![
            ("signup".into(), monday - 7 * DAY, 1),
            ("signup".into(), monday, 2),
            ("signup".into(), monday + 7 * DAY, 1)
        ]
    );

    let daily = app.counts("signup", monday - DAY, monday + 8 * DAY, "day", "").await;
    assert_eq!(
        daily,
        vec![
            ("signup".into(), monday - DAY, 1),
            ("signup".into(), monday, 1),
            ("signup".into(), monday + 6 * DAY, 1),
            ("signup".into(), monday + 7 * DAY, 1),
        ],
        "empty days are omitted"
    );
}

#[tokio::test]
async fn ungrouped_counts_return_one_row_per_name_at_start_time() {
    let app = spawn_app().await;
    let base = monday_two_weeks_ago();
    for offset in [0, HOUR, 3 * DAY] {
        app.track("view", "a", base + offset).await;
    }
    app.track("click", "", base + 5).await;
    let start = base - 10;
    let totals = app.counts("", start, base + 7 * DAY, "", "").await;
    assert_eq!(totals, vec![("click".into(), start, 1), ("view".into(), start, 3)]);
    assert!(app.counts("nothing", start, base + 7 * DAY, "", "").await.is_empty());
}

#[tokio::test]
async fn count_requests_are_validated() {
    let app = spawn_app().await;
    let base = monday_two_weeks_ago();
    let cases = [
        ("unknown group_by", base, base + DAY, "month", "group_by"),
        ("end before start", base, base - 1, "", "end_time"),
        ("empty range", base, base, "hour", "end_time"),
        ("too many buckets", base - 10_001 * HOUR, base, "hour", "group_by"),
    ];
    for (name, start, end, group_by, field) in cases {
        let status = app
            .client
            .clone()
            .get_event_count(pb::GetEventCountRequest {
                event_name: String::new(),
                start_time: start,
                end_time: end,
                group_by: group_by.into(),
                ..Default::default()
            })
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}");
        assert!(status.message().starts_with(field), "{name}: {}", status.message());
    }
    let status = app
        .client
        .clone()
        .get_user_count(pb::GetUserCountRequest { start_time: base, end_time: base - 1 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("end_time"));
}

#[tokio::test]
async fn unique_users_are_distinct_identified_users_in_range() {
    let app = spawn_app().await;
    let base = monday_two_weeks_ago();
    app.track("view", "alice", base).await;
    app.track("view", "alice", base + HOUR).await;
    app.track("click", "bob", base + 2 * HOUR).await;
    app.track("view", "", base + 2 * HOUR).await; // anonymous: never counted
    app.track("view", "carol", base + DAY).await; // at end_time: excluded below

    assert_eq!(app.unique_users(base, base + DAY).await, 2);
    assert_eq!(app.unique_users(base, base + DAY + 1).await, 3);
    assert_eq!(app.unique_users(base + HOUR, base + 2 * HOUR).await, 1);
    assert_eq!(app.unique_users(base - DAY, base).await, 0);
}

#[tokio::test]
async fn time_fields_beyond_what_postgres_and_chrono_represent_are_invalid_arguments() {
    let app = spawn_app().await;
    let ranges = [
        (-300_000_000_000, 0, "start_time"),
        (i64::MIN, 5, "start_time"),
        (MIN_UNIX_SECONDS - 1, 0, "start_time"),
        (0, i64::MAX, "end_time"),
        (0, MAX_UNIX_SECONDS + 1, "end_time"),
        (i64::MIN, i64::MAX, "start_time"),
    ];
    for (start, end, field) in ranges {
        for group_by in ["", "week"] {
            let status = app
                .client
                .clone()
                .get_event_count(pb::GetEventCountRequest {
                    start_time: start,
                    end_time: end,
                    group_by: group_by.into(),
                    ..Default::default()
                })
                .await
                .expect_err("out of range");
            assert_eq!(status.code(), Code::InvalidArgument, "[{start}, {end}) {group_by:?}: {status:?}");
            assert!(status.message().starts_with(field), "[{start}, {end}): {}", status.message());
        }
        let status = app
            .client
            .clone()
            .get_user_count(pb::GetUserCountRequest { start_time: start, end_time: end })
            .await
            .expect_err("out of range");
        assert_eq!(status.code(), Code::InvalidArgument, "[{start}, {end}): {status:?}");
        assert!(status.message().starts_with(field), "[{start}, {end}): {}", status.message());
    }
    for timestamp in [-300_000_000_000, i64::MIN, i64::MAX, MIN_UNIX_SECONDS - 1, MAX_UNIX_SECONDS + 1] {
        let status = app
            .client
            .clone()
            .track_event(pb::TrackEventRequest { timestamp, ..track_request("view", "a") })
            .await
            .expect_err("out of range");
        assert_eq!(status.code(), Code::InvalidArgument, "{timestamp}: {status:?}");
        assert!(status.message().starts_with("timestamp"), "{timestamp}: {}", status.message());
    }

    // The extremes themselves are answered, in every grouping and in zones whose local
    // time lies beyond them.
    assert_eq!(app.unique_users(MIN_UNIX_SECONDS, MAX_UNIX_SECONDS).await, 0);
    assert!(app.counts("", MIN_UNIX_SECONDS, MAX_UNIX_SECONDS, "", "").await.is_empty());
    for zone in ["", "Pacific/Chatham", "America/Los_Angeles", "Australia/Lord_Howe"] {
        for (group_by, width) in [("hour", HOUR), ("day", DAY), ("week", 7 * DAY)] {
            let first = MIN_UNIX_SECONDS + 9_000 * width;
            assert!(app.counts("", MIN_UNIX_SECONDS, first, group_by, zone).await.is_empty());
            let last = MAX_UNIX_SECONDS - 9_000 * width;
            assert!(app.counts("", last, MAX_UNIX_SECONDS, group_by, zone).await.is_empty());
        }
    }
}

/// An event acknowledged before a count with end_time 0 ("now") is in that count, however
/// early in its second it was stored and however soon the count is asked.
#[tokio::test]
async fn a_count_up_to_now_includes_every_event_acknowledged_before_it() {
    let app = spawn_app().await;
    let start = now() - 120;
    for round in 1..=30 {
        let user = format!("reader-{round}");
        app.client.clone().track_event(track_request("written", &user)).await.unwrap();
        let counted: i64 =
            app.counts("written", start, 0, "", "").await.iter().map(|(_, _, count)| count).sum();
        assert_eq!(counted, round, "round {round}: GetEventCount up to now");
        let grouped: i64 =
            app.counts("written", start, 0, "hour", "").await.iter().map(|(_, _, count)| count).sum();
        assert_eq!(grouped, round, "round {round}: GetEventCount by hour up to now");
        assert_eq!(app.unique_users(start, 0).await, round, "round {round}: GetUserCount up to now");
    }
}

/// The read pool's sessions run without JIT or parallel workers (see
/// READ_SESSION_SETTINGS): a count's estimate can pass jit_above_cost and favour a
/// parallel plan on a large table while the query reads a few rows.
#[tokio::test]
async fn count_sessions_run_without_jit_or_parallel_workers() {
    let app = crate::helpers::spawn_app().await;
    let database = analytics_service::repository::postgres::Database::connect_lazy(&app.config);
    let settings =
        "SELECT current_setting('jit') || ' ' || current_setting('max_parallel_workers_per_gather')";
    let pool_settings: String = sqlx::query_scalar(settings).fetch_one(database.pool()).await.unwrap();
    assert_eq!(pool_settings, "off 0");
    let server_default: String = sqlx::query_scalar(settings).fetch_one(&app.pool).await.unwrap();
    assert_eq!(server_default, "on 2", "the server's defaults, so the settings are the pool's doing");
}
