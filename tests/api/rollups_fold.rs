//! Counts are exact whatever share of the insert trigger's output the fold has moved into
//! the rollups, read straight from the repository with plans the service builds.

use analytics_service::models::{EventCountPlan, EventFilter, GroupBy, TimeRange};
use analytics_service::repository::postgres::edge_hours::EdgeHourMemory;
use analytics_service::repository::postgres::rollups::RollupRepository;
use analytics_service::repository::postgres::{connect_options, fold, schema, Database};
use analytics_service::service::counts::plan::{merge_event_counts, user_count_split};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::helpers::{create_database, now, test_config, TestOptions};
use crate::rollups::{brute_force_counts, brute_force_unique_users, insert_random_events, Counts, DAY, HOUR};

/// Counts are exact whatever share of the trigger's output the fold has moved into the
/// rollups (event-count deltas, (hour, user) pairs): all pending, some folded, all folded,
/// and late events and new users after a fold; also through kept summaries of the edge
/// hours (built from the second raw read of an hour on), which those late events change.
#[tokio::test]
async fn counts_are_exact_before_during_and_after_the_fold() {
    let database_name = create_database().await;
    let config = test_config(&database_name, "unused", &TestOptions::default());
    schema::migrate(&connect_options(&config)).await.expect("migrations apply");
    let database = Database::connect_lazy(&config);
    let pool = database.pool().clone();
    let edge_hours = EdgeHourMemory::default();
    let rollups = RollupRepository::new(database.clone()).with_edge_hours(edge_hours.clone());
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut random = StdRng::seed_from_u64(seed);
    let to = now() - HOUR;
    let from = to - 20 * DAY;
    let parse = |start: i64, end: i64| TimeRange::parse(start, end, chrono::Utc::now()).unwrap();
    let mut ranges: Vec<TimeRange> = (0..25)
        .map(|_| {
            let start = random.random_range(from - DAY..to);
            parse(start, start + random.random_range(1..25 * DAY))
        })
        .collect();
    ranges.push(parse(from - DAY, to));
    let check = |stage: &'static str| {
        let ranges = ranges.clone();
        let rollups = rollups.clone();
        let pool = pool.clone();
        async move {
            for (index, range) in ranges.into_iter().enumerate() {
                let (start, end) = (range.start(), range.end());
                let expected = brute_force_unique_users(&pool, start, end).await;
                let answer = rollups.unique_users(user_count_split(range)).await.unwrap();
                assert_eq!(answer, expected, "{stage}: users in [{start}, {end})");
                let group_by = ["", "hour", "day", "week"][index % 4];
                let filter = EventFilter {
                    event_name: None,
                    range,
                    group_by: GroupBy::parse(group_by).unwrap(),
                    time_zone: chrono_tz::UTC,
                };
                let extent = rollups.event_extent().await.unwrap();
                let plan = EventCountPlan::within(&filter, extent);
                let counts: Counts = rollups
                    .event_counts(&filter, &plan)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|count| (count.event_name, count.bucket_start, count.count))
                    .collect();
                let expected = brute_force_counts(&pool, "", start, end, group_by, "").await;
                assert_eq!(counts, expected, "{stage}: counts by {group_by:?} in [{start}, {end})");
                // The cached path's two parts, which read edge hours from kept summaries.
                let parts = rollups.event_counts_parts(&filter, &plan, true).await.unwrap();
                let mut cached: Counts = merge_event_counts(parts.folded.unwrap(), parts.fresh)
                    .into_iter()
                    .map(|count| (count.event_name, count.bucket_start, count.count))
                    .collect();
                if group_by.is_empty() {
                    cached.iter_mut().for_each(|count| count.1 = start);
                }
                assert_eq!(
                    cached, expected,
                    "{stage}: cached-path counts by {group_by:?} in [{start}, {end})"
                );
            }
        }
    };
    let pending = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_activity_pending")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let pending_deltas = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM event_count_deltas")
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    for _ in 0..3 {
        insert_random_events(&pool, &mut random, 800, from, to).await;
    }
    check("all pending").await;
    let pending_before = pending().await;
    assert!(pending_before >= 3, "one row per inserting statement and hour");
    assert!(pending_deltas().await > 3, "one delta per (hour, name) and statement");

    let outcome = fold::fold_pending(&database, 2, pending_before / 3).await.unwrap();
    assert_eq!((outcome.folded_deltas, outcome.folded_user_rows as i64), (2, pending_before / 3));
    assert!(outcome.folded_pairs >= outcome.folded_user_rows);
    assert_eq!(pending().await, pending_before - pending_before / 3);
    check("a third folded").await;

    fold::fold_all_pending(&database).await.unwrap();
    assert_eq!((pending().await, pending_deltas().await), (0, 0));
    check("all folded").await;
    check("all folded, summaries building").await;
    let built = crate::helpers::wait_until(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(50),
        async || edge_hours.summarised_hours() >= 10,
    );
    assert!(built.await, "the edge hours read raw twice were summarised");
    check("all folded, from summaries").await;

    // Late events of known and brand-new users into folded hours, then folded again.
    insert_random_events(&pool, &mut random, 400, from, to).await;
    sqlx::query(
        "INSERT INTO events (event_name, user_id, timestamp)
         SELECT 'view', 'newcomer-' || i, to_timestamp($1 + i * 3001) FROM generate_series(1, 50) i",
    )
    .bind(from)
    .execute(&pool)
    .await
    .unwrap();
    check("late events pending over folded bitmaps").await;
    fold::fold_all_pending(&database).await.unwrap();
    check("late events folded").await;
    let (hours, days): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM user_activity_hourly), (SELECT count(*) FROM user_activity_daily)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(hours > 20 * 20 && days >= 20, "bitmaps per hour ({hours}) and per day ({days})");
    pool.close().await;
    crate::helpers::drop_database(&database_name).await;
}
