//! Counts are exact whatever share of the insert trigger's output the fold has moved into
//! the rollups, read straight from the repository with plans the service builds.

use analytics_service::models::user_bitmap::{decode_users, encode_users};
use analytics_service::models::{EventCountPlan, EventFilter, GroupBy, TimeRange};
use analytics_service::repository::postgres::edge_hours::EdgeHourMemory;
use analytics_service::repository::postgres::folded_bitmaps::FoldedBitmapMemory;
use analytics_service::repository::postgres::rollups::RollupRepository;
use analytics_service::repository::postgres::{connect_options, fold, hour_spans, schema, Database};
use analytics_service::service::counts::plan::{merge_event_counts, user_count_split};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::helpers::{create_database, now, test_config, TestOptions};
use crate::rollups::{
    brute_force_counts, brute_force_unique_users, insert_random_events, insert_rows, Counts, DAY, HOUR,
};

/// A new database of the test's own, migrated, and a lazy connection to it.
async fn migrated_database() -> (String, Database) {
    let database_name = create_database().await;
    let config = test_config(&database_name, "unused", &TestOptions::default());
    schema::migrate(&connect_options(&config)).await.expect("migrations apply");
    (database_name, Database::connect_lazy(&config))
}

/// The users of `[start, end)` seen only in its part of the hour starting at `cut_hour`
/// (which the range must start or end inside), none elsewhere in the range; asserts there
/// are some, so a count that leaves that part out must differ.
async fn users_only_in_cut_part(pool: &sqlx::PgPool, start: i64, end: i64, cut_hour: i64) -> i64 {
    let only_in_cut_part: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT user_id) FROM events
          WHERE timestamp >= to_timestamp($1) AND timestamp < to_timestamp($2) AND user_id <> ''
            AND user_id NOT IN (SELECT user_id FROM events
                                 WHERE timestamp >= to_timestamp($3) AND timestamp < to_timestamp($4))",
    )
    .bind(start.max(cut_hour))
    .bind(end.min(cut_hour + HOUR))
    .bind(if start < cut_hour { start } else { cut_hour + HOUR })
    .bind(if start < cut_hour { cut_hour } else { end })
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(only_in_cut_part > 0, "the cut part has users seen nowhere else in [{start}, {end})");
    only_in_cut_part
}

/// Counts are exact whatever share of the trigger's output the fold has moved into the
/// rollups (event-count deltas, (hour, user) pairs): all pending, some folded, all folded,
/// and late events and new users after a fold; also through kept summaries of the edge
/// hours (built from the second raw read of an hour on), which those late events change.
#[tokio::test]
async fn counts_are_exact_before_during_and_after_the_fold() {
    let (database_name, database) = migrated_database().await;
    let pool = database.pool().clone();
    let edge_hours = EdgeHourMemory::default();
    let rollups = RollupRepository::new(database.clone())
        .with_edge_hours(edge_hours.clone())
        .with_folded_bitmaps(FoldedBitmapMemory::default());
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

/// Unique-user counts read a partial edge hour from its stored spans when the statement
/// finds them current, and never once the hour changed: a late event (pending, then
/// folded), a deletion, each answered exactly while the spans are outdated and again once
/// the builder wrote them anew. A positive control: spans emptied behind the builder's
/// back change the answer while their stamp holds, and stop mattering once it does not.
#[tokio::test]
async fn stored_hour_spans_answer_edge_hours_and_never_outlive_a_change() {
    let (database_name, database) = migrated_database().await;
    let pool = database.pool().clone();
    // No kept summaries: the edge hours come from the stored spans or the raw events.
    let rollups = RollupRepository::new(database.clone());
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut random = StdRng::seed_from_u64(seed);
    let current = now();
    let to = current.div_euclid(HOUR) * HOUR - 2 * HOUR;
    let from = to - 3 * DAY;
    for _ in 0..3 {
        insert_random_events(&pool, &mut random, 1_500, from, to).await;
    }
    // One hour the ranges below cut, with a user seen only in each of its two parts.
    let cut_hour = from + DAY + 5 * HOUR;
    insert_rows(
        &pool,
        &[
            ("view", "only-early", (cut_hour + 5 * 60) as f64),
            ("view", "only-late", (cut_hour + 45 * 60) as f64),
        ],
    )
    .await;
    fold::fold_all_pending(&database).await.unwrap();
    let hours_with_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_totals_hourly").fetch_one(&pool).await.unwrap();
    let built = hour_spans::build_all_hour_spans(&database, current).await.unwrap();
    assert_eq!(built as i64, hours_with_events, "every closed hour is spanned");
    assert_eq!(hour_spans::build_all_hour_spans(&database, current).await.unwrap(), 0, "and once only");

    let parse = |start: i64, end: i64| TimeRange::parse(start, end, chrono::Utc::now()).unwrap();
    let mut ranges: Vec<(i64, i64)> = (0..30)
        .map(|_| {
            let start = random.random_range(from..to - HOUR);
            (start, random.random_range(start + HOUR..to))
        })
        .collect();
    // The cut hour's first 20 minutes and its last 40.
    ranges.push((cut_hour - DAY, cut_hour + 20 * 60));
    ranges.push((cut_hour + 20 * 60, cut_hour + DAY));
    let check = async |stage: &str| {
        for (start, end) in ranges.iter().copied() {
            let expected = brute_force_unique_users(&pool, start, end).await;
            let answer = rollups.unique_users(user_count_split(parse(start, end))).await.unwrap();
            assert_eq!(answer, expected, "{stage}: users in [{start}, {end})");
        }
    };
    check("from stored spans").await;

    // The positive control: the cut hour's spans emptied, stamp kept.
    let emptied = sqlx::query(
        "UPDATE user_activity_hour_spans SET spans = ''::bytea WHERE hour_start = to_timestamp($1)",
    )
    .bind(cut_hour)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(emptied.rows_affected(), 1);
    for (start, end) in [(cut_hour - DAY, cut_hour + 20 * 60), (cut_hour + 20 * 60, cut_hour + DAY)] {
        let split = user_count_split(parse(start, end));
        let parts = rollups.user_count_parts(split, true).await.unwrap();
        let with_emptied = parts.count(parts.folded.as_ref().unwrap());
        let expected = brute_force_unique_users(&pool, start, end).await;
        let only_in_cut_part = users_only_in_cut_part(&pool, start, end, cut_hour).await;
        assert_eq!(
            with_emptied,
            expected - only_in_cut_part,
            "the emptied spans were read for [{start}, {end})"
        );
    }

    // A late event of a new user into the cut hour: pending, the spans are not current.
    insert_rows(
        &pool,
        &[
            ("view", "late-comer", (cut_hour + 10 * 60) as f64),
            ("view", "late-comer-2", (cut_hour + 50 * 60) as f64),
        ],
    )
    .await;
    check("a late event pending over emptied spans").await;
    fold::fold_all_pending(&database).await.unwrap();
    check("the late event folded, spans outdated").await;
    sqlx::query("DELETE FROM user_activity_hour_spans WHERE hour_start = to_timestamp($1)")
        .bind(cut_hour)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(hour_spans::build_all_hour_spans(&database, current).await.unwrap(), 1, "the cut hour again");
    check("spans written again").await;

    // A deletion in a spanned hour: deltas pending, then folded, then spanned again.
    let deleted = sqlx::query(
        "DELETE FROM events WHERE timestamp >= to_timestamp($1) AND timestamp < to_timestamp($1) + interval '1 hour'
           AND user_id IN (SELECT user_id FROM events WHERE timestamp >= to_timestamp($1) ORDER BY timestamp LIMIT 3)",
    )
    .bind(cut_hour)
    .execute(&pool)
    .await
    .unwrap();
    assert!(deleted.rows_affected() > 0);
    check("a deletion pending").await;
    fold::fold_all_pending(&database).await.unwrap();
    check("the deletion folded, spans outdated").await;
    assert_eq!(hour_spans::build_all_hour_spans(&database, current).await.unwrap(), 1, "the cut hour again");
    check("spans written after the deletion").await;
    pool.close().await;
    crate::helpers::drop_database(&database_name).await;
}

/// A unique-user count takes the folded bitmaps this replica remembers from its memory
/// only while their rows are the row versions it read: a fold into a remembered day or
/// hour, an erasure's rewrite, and a row deleted and written again with the same version
/// (retention, then a fold) are each read again. Checked against raw SQL, and against a
/// count without the memory where the rows are rewritten by hand.
#[tokio::test]
async fn remembered_folded_bitmaps_are_used_only_while_their_rows_are_unchanged() {
    let (database_name, database) = migrated_database().await;
    let pool = database.pool().clone();
    let rollups = RollupRepository::new(database.clone()).with_folded_bitmaps(FoldedBitmapMemory::default());
    let without_memory = RollupRepository::new(database.clone());
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut random = StdRng::seed_from_u64(seed);
    let today = now().div_euclid(DAY) * DAY;
    let from = today - 8 * DAY;
    insert_random_events(&pool, &mut random, 3_000, from, today - HOUR).await;
    fold::fold_all_pending(&database).await.unwrap();
    let parse = |start: i64, end: i64| TimeRange::parse(start, end, chrono::Utc::now()).unwrap();
    // Six whole days and a few whole hours on each side of them.
    let (start, end) = (from + DAY - 5 * HOUR, from + 7 * DAY + 3 * HOUR);
    let split = user_count_split(parse(start, end));
    let count = async |rollups: &RollupRepository| {
        let parts = rollups.user_count_parts(split, true).await.unwrap();
        (parts.count(parts.folded.as_ref().unwrap()), parts.remembered_bitmaps)
    };
    let expect = async |stage: &str, remembered: std::ops::RangeInclusive<usize>| {
        let (answer, from_memory) = count(&rollups).await;
        assert_eq!(answer, brute_force_unique_users(&pool, start, end).await, "{stage}");
        assert!(
            remembered.contains(&from_memory),
            "{stage}: {from_memory} bitmaps from memory, expected {remembered:?}"
        );
    };
    let (_, first) = count(&rollups).await;
    assert_eq!(first, 0, "nothing remembered before the first count");
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM user_activity_daily WHERE bucket_start >= to_timestamp($1) AND bucket_start < to_timestamp($2))
              + (SELECT count(*) FROM user_activity_hourly WHERE (bucket_start >= to_timestamp($3) AND bucket_start < to_timestamp($1))
                                                              OR (bucket_start >= to_timestamp($2) AND bucket_start < to_timestamp($4)))",
    )
    .bind(from + DAY)
    .bind(from + 7 * DAY)
    .bind(start)
    .bind(end)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(rows >= 8, "six days and some hours folded: {rows} rows");
    let rows = rows as usize;
    expect("every bitmap remembered", rows..=rows).await;

    // A new user's late event in a remembered day and in a remembered hour, folded.
    let day = from + 3 * DAY;
    insert_rows(
        &pool,
        &[("view", "late-day", (day + 7 * HOUR) as f64), ("view", "late-hour", (start + 60) as f64)],
    )
    .await;
    fold::fold_all_pending(&database).await.unwrap();
    expect("a day and an hour folded into", rows - 2..=rows - 2).await;

    // An erasure's rewrite (a user taken out of a bitmap, the version bumped), here by
    // hand on the remembered day: late-day is in no other bitmap of the range.
    let ordinal: i32 = sqlx::query_scalar("SELECT ordinal FROM user_ordinals WHERE user_id = 'late-day'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let day_users = async || {
        let bytes: Vec<u8> =
            sqlx::query_scalar("SELECT users FROM user_activity_daily WHERE bucket_start = to_timestamp($1)")
                .bind(day)
                .fetch_one(&pool)
                .await
                .unwrap();
        decode_users(&bytes).unwrap()
    };
    let (with_late_day, _) = count(&rollups).await;
    let mut users = day_users().await;
    assert!(users.remove(ordinal as u32));
    sqlx::query("UPDATE user_activity_daily SET users = $2, version = version + 1 WHERE bucket_start = to_timestamp($1)")
        .bind(day)
        .bind(encode_users(&users))
        .execute(&pool)
        .await
        .unwrap();
    let (answer, from_memory) = count(&rollups).await;
    assert_eq!((answer, from_memory), (with_late_day - 1, rows - 1), "the rewritten day read again");
    assert_eq!(
        answer,
        brute_force_unique_users(&pool, start, end).await - 1,
        "late-day taken out of its only bitmap"
    );
    assert_eq!(count(&rollups).await, (answer, rows), "and remembered again");

    // Deleted, then written again by a later transaction with the version the remembered
    // row had (retention, then a fold): the same bucket and version, other users (one
    // ordinal no other bitmap holds added). Only the row version tells the two apart.
    let version: i64 =
        sqlx::query_scalar("SELECT version FROM user_activity_daily WHERE bucket_start = to_timestamp($1)")
            .bind(day)
            .fetch_one(&pool)
            .await
            .unwrap();
    let mut other_users = day_users().await;
    other_users.insert(9_999_999);
    sqlx::query("DELETE FROM user_activity_daily WHERE bucket_start = to_timestamp($1)")
        .bind(day)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO user_activity_daily (bucket_start, users, version) VALUES (to_timestamp($1), $2, $3)",
    )
    .bind(day)
    .bind(encode_users(&other_users))
    .bind(version)
    .execute(&pool)
    .await
    .unwrap();
    let (answer, from_memory) = count(&rollups).await;
    assert_eq!(answer, count(&without_memory).await.0, "the day written again read again");
    assert_eq!(
        (answer, from_memory),
        (with_late_day, rows - 1),
        "one user more than before, from the new row"
    );
    pool.close().await;
    crate::helpers::drop_database(&database_name).await;
}

/// Unique-user counts read a partial edge hour that still takes events from the live spans
/// the fold keeps of it (with its pending rows' seconds) while the statement finds them
/// current, and never once they are not: a bitmap changed behind the fold's back, pending
/// rows without seconds (written before the migration), a deletion, and an hour with more
/// users than a live row keeps. Every stage is checked against raw SQL; a positive control
/// empties a current row and sees the answer change.
#[tokio::test]
async fn live_spans_answer_edges_of_hours_still_taking_events_and_never_outlive_a_change() {
    let (database_name, database) = migrated_database().await;
    let pool = database.pool().clone();
    // No kept summaries and no stored spans: edge hours come from live spans or raw events.
    let rollups = RollupRepository::new(database.clone());
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut random = StdRng::seed_from_u64(seed);
    let open = now().div_euclid(HOUR) * HOUR - 6 * HOUR;
    let [late, unstamped, deleted, crowded] = [1, 2, 3, 4].map(|hours| open + hours * HOUR);
    insert_random_events(&pool, &mut random, 600, open - DAY, open).await;
    fold::fold_all_pending(&database).await.unwrap();
    let live_row = async |hour: i64| -> Option<bool> {
        sqlx::query_scalar(
            "SELECT live.bitmap_version = bitmap.version FROM user_activity_live_spans live
               JOIN user_activity_hourly bitmap ON bitmap.bucket_start = live.hour_start
              WHERE live.hour_start = to_timestamp($1)",
        )
        .bind(hour)
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    let parse = |start: i64, end: i64| TimeRange::parse(start, end, chrono::Utc::now()).unwrap();
    // Each hour's first 20 minutes and its last 40, from and to a day away.
    let ranges: Vec<(i64, i64)> = [open, late, unstamped, deleted, crowded]
        .into_iter()
        .flat_map(|hour| [(hour - DAY, hour + 20 * 60), (hour + 20 * 60, hour + DAY)])
        .chain([(open - DAY + 1_234, open + 59 * 60 + 59)])
        .collect();
    let check = async |stage: &str| {
        for (start, end) in ranges.iter().copied() {
            let expected = brute_force_unique_users(&pool, start, end).await;
            let answer = rollups.unique_users(user_count_split(parse(start, end))).await.unwrap();
            assert_eq!(answer, expected, "{stage}: users in [{start}, {end})");
        }
    };
    // Hours still taking events, several statements each; users seen only in one part.
    let fill = async |hour: i64, random: &mut StdRng| {
        for _ in 0..3 {
            insert_random_events(&pool, random, 150, hour, hour + HOUR).await;
        }
        insert_rows(
            &pool,
            &[
                ("view", &format!("only-early-{hour}"), (hour + 5 * 60) as f64 + 0.5),
                ("view", &format!("only-late-{hour}"), (hour + 45 * 60) as f64),
                ("view", &format!("at-the-cut-{hour}"), (hour + 20 * 60) as f64),
                ("view", &format!("early-and-late-{hour}"), (hour + 6 * 60) as f64),
                ("view", &format!("early-and-late-{hour}"), (hour + 50 * 60) as f64),
            ],
        )
        .await;
    };
    fill(open, &mut random).await;
    check("all pending").await;
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_activity_pending").fetch_one(&pool).await.unwrap();
    fold::fold_pending(&database, 1_000, pending / 2).await.unwrap();
    assert_eq!(live_row(open).await, Some(true), "the fold started the open hour's live row");
    check("half folded").await;
    fill(open, &mut random).await;
    fold::fold_all_pending(&database).await.unwrap();
    assert_eq!(live_row(open).await, Some(true), "and kept it current");
    check("all folded").await;

    // The positive control: the open hour's live spans emptied, stamp kept.
    let emptied = sqlx::query(
        "UPDATE user_activity_live_spans SET spans = ''::bytea WHERE hour_start = to_timestamp($1)",
    )
    .bind(open)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(emptied.rows_affected(), 1);
    for (start, end) in [(open - DAY, open + 20 * 60), (open + 20 * 60, open + DAY)] {
        let expected = brute_force_unique_users(&pool, start, end).await;
        let only_in_part = users_only_in_cut_part(&pool, start, end, open).await;
        let answer = rollups.unique_users(user_count_split(parse(start, end))).await.unwrap();
        assert_eq!(answer, expected - only_in_part, "the emptied live spans were read for [{start}, {end})");
    }
    // The bitmap changed behind the fold's back (as an erasure's clearing does): not used,
    // and the next fold into the hour ends the row.
    sqlx::query(
        "UPDATE user_activity_hourly SET version = version + 1 WHERE bucket_start = to_timestamp($1)",
    )
    .bind(open)
    .execute(&pool)
    .await
    .unwrap();
    check("an outdated live row").await;
    insert_rows(&pool, &[("view", "late-comer", (open + 10 * 60) as f64)]).await;
    check("a late event over an outdated live row").await;
    fold::fold_all_pending(&database).await.unwrap();
    assert_eq!(live_row(open).await, None, "the fold ended the outdated row");
    check("the late event folded, no live row").await;

    // A late event into a live hour: pending, then folded into its live row.
    fill(late, &mut random).await;
    fold::fold_all_pending(&database).await.unwrap();
    insert_rows(
        &pool,
        &[
            ("view", &format!("only-late-{late}"), (late + 1) as f64),
            ("view", "late-newcomer", (late + 19 * 60 + 59) as f64 + 0.9),
        ],
    )
    .await;
    check("a late event pending over a live row").await;
    fold::fold_all_pending(&database).await.unwrap();
    assert_eq!(live_row(late).await, Some(true));
    check("the late event folded into the live row").await;

    // Pending rows without seconds (written before the migration): read raw, and the fold
    // starts no live row from them.
    fill(unstamped, &mut random).await;
    sqlx::query(
        "UPDATE user_activity_pending SET first_seconds = NULL, last_seconds = NULL
          WHERE ctid = (SELECT ctid FROM user_activity_pending WHERE hour_start = to_timestamp($1) LIMIT 1)",
    )
    .bind(unstamped)
    .execute(&pool)
    .await
    .unwrap();
    check("a pending row without seconds").await;
    fold::fold_all_pending(&database).await.unwrap();
    assert_eq!(live_row(unstamped).await, None, "no live row from rows without seconds");
    check("rows without seconds folded").await;

    // A deletion: a user's early event goes (the late one stays, so the hour's bitmap
    // still holds them rightly), the live row would still put them in the first part.
    fill(deleted, &mut random).await;
    fold::fold_all_pending(&database).await.unwrap();
    assert_eq!(live_row(deleted).await, Some(true));
    let removed = sqlx::query("DELETE FROM events WHERE user_id = $1 AND timestamp < to_timestamp($2)")
        .bind(format!("early-and-late-{deleted}"))
        .bind(deleted + 20 * 60)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(removed.rows_affected(), 1);
    check("a deletion pending").await;
    fold::fold_all_pending(&database).await.unwrap();
    assert_eq!(live_row(deleted).await, None, "the fold of a deletion ends the live row");
    check("the deletion folded").await;

    // More users than a live row keeps.
    sqlx::query(
        "INSERT INTO events (event_name, user_id, timestamp)
         SELECT 'view', 'crowd-' || i, to_timestamp($1 + i % 3600) FROM generate_series(1, $2) i",
    )
    .bind(crowded)
    .bind(fold::LIVE_SPANS_MAX_USERS as i64 + 1)
    .execute(&pool)
    .await
    .unwrap();
    fold::fold_all_pending(&database).await.unwrap();
    assert_eq!(live_row(crowded).await, None, "no live row past the cap");
    check("a crowded hour").await;

    // The span builder ends the live rows of settled hours.
    hour_spans::build_all_hour_spans(&database, now()).await.unwrap();
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_activity_live_spans").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0, "settled hours keep no live rows");
    check("stored spans").await;
    pool.close().await;
    crate::helpers::drop_database(&database_name).await;
}

/// A cache hit's unique-user statement (no bitmaps: what a dashboard repeats) runs with a
/// generic plan, planned once on its connection; a count that reads bitmaps is planned
/// per call. Read from `pg_prepared_statements` on the one connection the counts used.
#[tokio::test]
async fn a_cache_hits_user_statement_is_planned_once_and_a_miss_per_call() {
    let database_name = create_database().await;
    let config = test_config(&database_name, "unused", &TestOptions::default());
    schema::migrate(&connect_options(&config)).await.expect("migrations apply");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(connect_options(&config))
        .await
        .unwrap();
    let rollups = RollupRepository::new(Database::from(pool.clone()));
    let mut random = StdRng::seed_from_u64(7);
    let to = now().div_euclid(HOUR) * HOUR - 2 * HOUR;
    insert_random_events(&pool, &mut random, 500, to - 2 * DAY, to).await;
    fold::fold_all_pending(&Database::from(pool.clone())).await.unwrap();
    // Both edge hours partial, the range over a day of whole hours.
    let range = TimeRange::parse(to - DAY - 20 * 60, to - 40 * 60, chrono::Utc::now()).unwrap();
    // Five: PostgreSQL's own choice (plan_cache_mode = auto) plans the first five calls of
    // a prepared statement per call, whatever it does after.
    for _ in 0..5 {
        rollups.user_count_parts(user_count_split(range), false).await.unwrap();
        rollups.user_count_parts(user_count_split(range), true).await.unwrap();
    }
    let plans: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements
          WHERE statement LIKE '%FROM erasure_generation%' AND statement LIKE '%unnest(user_ids)%'
            AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let (hits, misses): (Vec<_>, Vec<_>) =
        plans.iter().partition(|(statement, _, _)| !statement.contains("ELSE users END"));
    assert_eq!(hits.len(), 1, "one hit statement: {plans:?}");
    assert_eq!(misses.len(), 1, "one miss statement: {plans:?}");
    assert_eq!((hits[0].1, hits[0].2), (5, 0), "the hit statement ran its generic plan every time");
    assert_eq!((misses[0].1, misses[0].2), (0, 5), "the miss statement was planned per call");
    pool.close().await;
    crate::helpers::drop_database(&database_name).await;
}
