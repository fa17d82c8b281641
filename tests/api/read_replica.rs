//! Counts from a read replica, against a real streaming replica each test starts: a
//! private primary (initdb) and a hot standby made from it with `pg_basebackup -R`. The
//! replica answers when it has replayed what the primary had at the call's start; while
//! its replay is paused (`pg_wal_replay_pause()`) or it is stopped, counts go to the
//! primary at once, so an acknowledged event is always counted, through the Redis cache
//! too.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use analytics_service::config::Config;
use analytics_service::pb;
use analytics_service::repository::postgres::{connect_options, schema};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;

use crate::helpers::{
    as_postgres_user, closed_port, http_get, metric_value, now, stop_private_postgres, test_config,
    track_request, InProcessServer, TestOptions,
};

const HOUR: i64 = 3_600;

/// A primary and its hot standby on free 127.0.0.1 ports in one temporary directory,
/// stopped and deleted when dropped.
struct StreamingPair {
    directory: PathBuf,
    primary_port: u16,
    replica_port: u16,
}

impl StreamingPair {
    fn start() -> Self {
        let directory =
            std::env::temp_dir().join(format!("analytics-replica-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&directory).unwrap();
        // Dropped (stopped, deleted) even if start-up fails half-way.
        let pair = Self { directory, primary_port: closed_port(), replica_port: closed_port() };
        let chown = Command::new("chown").args(["-R", "postgres:postgres", &pair.path("")]).status().unwrap();
        assert!(chown.success(), "chown the cluster directory");
        // initdb's pg_hba.conf trusts replication connections from 127.0.0.1 too.
        as_postgres_user(
            "initdb",
            &["-D", &pair.path("primary"), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
        );
        // No autovacuum: nothing but the test and the service writes WAL, so a replica that
        // caught up stays caught up until the next write.
        let primary_options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c wal_level=replica -c max_wal_senders=4 \
             -c fsync=off -c autovacuum=off -c max_connections=40",
            pair.primary_port,
            pair.path("")
        );
        pair.pg_ctl("primary", &["-o", &primary_options, "start"]);
        as_postgres_user(
            "pg_basebackup",
            &[
                "-R",
                "-X",
                "stream",
                "-D",
                &pair.path("replica"),
                "-h",
                "127.0.0.1",
                "-p",
                &pair.primary_port.to_string(),
                "-U",
                "postgres",
            ],
        );
        pair.start_replica();
        pair
    }

    fn path(&self, name: &str) -> String {
        self.directory.join(name).display().to_string()
    }

    /// `pg_ctl` on the `cluster` data directory (`primary` or `replica`), waiting for it.
    fn pg_ctl(&self, cluster: &str, args: &[&str]) {
        let data = self.path(cluster);
        let log = self.path(&format!("{cluster}.log"));
        let mut all = vec!["-D", &data, "-l", &log, "-w", "-t", "60"];
        all.extend_from_slice(args);
        as_postgres_user("pg_ctl", &all);
    }

    fn start_replica(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c hot_standby=on -c fsync=off -c max_connections=40",
            self.replica_port,
            self.path("")
        );
        self.pg_ctl("replica", &["-o", &options, "start"]);
    }

    fn stop_replica(&self) {
        self.pg_ctl("replica", &["-m", "fast", "stop"]);
    }

    fn options(port: u16) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .username("postgres")
            .database("postgres")
            .disable_statement_logging()
    }

    async fn primary_pool(&self) -> PgPool {
        PgPoolOptions::new().max_connections(2).connect_with(Self::options(self.primary_port)).await.unwrap()
    }

    async fn replica_pool(&self) -> PgPool {
        PgPoolOptions::new().max_connections(2).connect_with(Self::options(self.replica_port)).await.unwrap()
    }

    /// The service's configuration: the primary, the replica, Redis as every test has it.
    fn config(&self) -> Config {
        let options = TestOptions {
            env: vec![
                ("POSTGRES_HOST".into(), "127.0.0.1".into()),
                ("POSTGRES_PORT".into(), self.primary_port.to_string()),
                ("POSTGRES_USER".into(), "postgres".into()),
                ("POSTGRES_READ_HOST".into(), "127.0.0.1".into()),
                ("POSTGRES_READ_PORT".into(), self.replica_port.to_string()),
                ("POSTGRES_READ_MAX_CONNECTIONS".into(), "3".into()),
            ],
            ..TestOptions::default()
        };
        let prefix = format!("test:{}", uuid::Uuid::now_v7().simple());
        test_config("postgres", &prefix, &options)
    }
}

impl Drop for StreamingPair {
    fn drop(&mut self) {
        for cluster in ["replica", "primary"] {
            stop_private_postgres(&self.path(cluster));
        }
        std::fs::remove_dir_all(&self.directory).ok();
    }
}

type Running = InProcessServer;

/// The service over the pair, in-process, after migrating the primary.
async fn start_over(pair: &StreamingPair) -> Running {
    let config = pair.config();
    schema::migrate(&connect_options(&config)).await.expect("migrations apply on the primary");
    InProcessServer::start(config).await
}

impl InProcessServer {
    async fn track_at(&self, name: &str, user_id: &str, timestamp: i64) {
        self.client
            .clone()
            .track_event(pb::TrackEventRequest { timestamp, ..track_request(name, user_id) })
            .await
            .expect("track_event succeeds");
    }

    /// GetEventCount as sorted (event_name, bucket start, count) rows.
    async fn counts(&self, start: i64, end: i64, group_by: &str) -> Vec<(String, i64, i64)> {
        let request = pb::GetEventCountRequest {
            event_name: String::new(),
            start_time: start,
            end_time: end,
            group_by: group_by.into(),
            time_zone: String::new(),
        };
        let mut counts: Vec<_> = self
            .client
            .clone()
            .get_event_count(request)
            .await
            .expect("get_event_count succeeds")
            .into_inner()
            .counts
            .into_iter()
            .map(|count| (count.event_name, count.timestamp, count.count))
            .collect();
        counts.sort();
        counts
    }

    async fn unique_users(&self, start: i64, end: i64) -> i64 {
        self.client
            .clone()
            .get_user_count(pb::GetUserCountRequest { start_time: start, end_time: end })
            .await
            .expect("get_user_count succeeds")
            .into_inner()
            .unique_users
    }

    /// (answered by the replica, fallbacks lagging, fallbacks unavailable).
    async fn replica_metrics(&self) -> (f64, f64, f64) {
        let (_, metrics) = http_get(self.admin_address, "/metrics").await;
        let fallbacks = |reason: &str| {
            metric_value(&metrics, &format!("analytics_read_replica_fallbacks_total{{reason=\"{reason}\"}}"))
        };
        (
            metric_value(&metrics, "analytics_read_replica_queries_total"),
            fallbacks("lagging"),
            fallbacks("unavailable"),
        )
    }
}

/// What the counts must be, from the primary's raw events: per name, per (name, UTC
/// hour), and distinct users, over [start, end).
async fn raw_counts(
    primary: &PgPool,
    start: i64,
    end: i64,
) -> (Vec<(String, i64, i64)>, Vec<(String, i64, i64)>, i64) {
    let totals: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_name::text, count(*) FROM events \
         WHERE timestamp >= to_timestamp($1) AND timestamp < to_timestamp($2) GROUP BY 1",
    )
    .bind(start as f64)
    .bind(end as f64)
    .fetch_all(primary)
    .await
    .unwrap();
    let mut totals: Vec<_> = totals.into_iter().map(|(name, count)| (name, start, count)).collect();
    totals.sort();
    let mut hours: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT event_name::text, extract(epoch FROM date_trunc('hour', timestamp))::bigint, count(*) \
         FROM events WHERE timestamp >= to_timestamp($1) AND timestamp < to_timestamp($2) GROUP BY 1, 2",
    )
    .bind(start as f64)
    .bind(end as f64)
    .fetch_all(primary)
    .await
    .unwrap();
    hours.sort();
    let users: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT user_id) FROM events \
         WHERE timestamp >= to_timestamp($1) AND timestamp < to_timestamp($2) AND user_id <> ''",
    )
    .bind(start as f64)
    .bind(end as f64)
    .fetch_one(primary)
    .await
    .unwrap();
    (totals, hours, users)
}

/// Asserts the three counts over [start, end) equal the primary's raw events.
async fn assert_counts_match(app: &Running, primary: &PgPool, start: i64, end: i64, context: &str) {
    let (totals, hours, users) = raw_counts(primary, start, end).await;
    assert!(!totals.is_empty(), "{context}: the range holds events");
    assert_eq!(app.counts(start, end, "").await, totals, "{context}: totals");
    assert_eq!(app.counts(start, end, "hour").await, hours, "{context}: per hour");
    assert_eq!(app.unique_users(start, end).await, users, "{context}: unique users");
}

/// Waits until the replica has replayed everything the primary has written.
async fn wait_for_replay(primary: &PgPool, replica: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let position: String =
            sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(primary).await.unwrap();
        let caught_up: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&position)
            .fetch_one(replica)
            .await
            .unwrap();
        if caught_up {
            return;
        }
        assert!(Instant::now() < deadline, "the replica never replayed {position}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the fold has moved every pending delta into the rollups.
async fn wait_for_fold(primary: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM event_count_deltas").fetch_one(primary).await.unwrap();
        if pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the fold never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn counts_come_from_the_replica_when_it_caught_up_and_from_the_primary_while_it_lags() {
    let pair = StreamingPair::start();
    let app = start_over(&pair).await;
    let primary = pair.primary_pool().await;
    let replica = pair.replica_pool().await;

    // Events in whole past hours (folded, cached with a stamp) and in the open hour.
    let current_hour = now().div_euclid(HOUR) * HOUR;
    let start = current_hour - 5 * HOUR;
    let end = now() + 2;
    for (offset, name, user) in
        [(4, "view", "alice"), (3, "view", "bob"), (3, "click", "alice"), (2, "view", "carol")]
    {
        app.track_at(name, user, current_hour - offset * HOUR + 60).await;
    }
    app.track_at("view", "dave", 0).await;
    wait_for_fold(&primary).await;
    wait_for_replay(&primary, &replica).await;

    // Caught up: the replica answers, equal to the raw events on the primary.
    assert_counts_match(&app, &primary, start, end, "replica caught up").await;
    let (served, lagging, unavailable) = app.replica_metrics().await;
    assert_eq!((served, lagging, unavailable), (3.0, 0.0, 0.0), "every count came from the replica");

    // Replay paused: an event acknowledged on the primary is counted at once (the
    // primary answers), a late one in a cached whole hour too, before and after the fold
    // moves it into the rollups.
    sqlx::query("SELECT pg_wal_replay_pause()").execute(&replica).await.unwrap();
    app.track_at("view", "erin", 0).await;
    app.track_at("view", "frank", current_hour - 3 * HOUR + 120).await;
    let end = now() + 2;
    assert_counts_match(&app, &primary, start, end, "replay paused").await;
    let (served_paused, lagging, _) = app.replica_metrics().await;
    assert_eq!(served_paused, served, "no count came from the lagging replica");
    assert_eq!(lagging, 3.0, "each count fell back as lagging");
    wait_for_fold(&primary).await;
    assert_counts_match(&app, &primary, start, end, "replay paused, late event folded").await;
    let replica_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&replica).await.unwrap();
    let primary_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&primary).await.unwrap();
    assert!(replica_events < primary_events, "the replica really lags: {replica_events} of {primary_events}");

    // Resumed: once it caught up, the replica answers again, with the same counts.
    sqlx::query("SELECT pg_wal_replay_resume()").execute(&replica).await.unwrap();
    wait_for_replay(&primary, &replica).await;
    assert_counts_match(&app, &primary, start, end, "replay resumed").await;
    let (served_resumed, lagging_resumed, unavailable) = app.replica_metrics().await;
    assert_eq!(served_resumed, served + 3.0, "the replica answers again");
    assert_eq!((lagging_resumed, unavailable), (6.0, 0.0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_replica_sends_counts_to_the_primary_without_waiting_on_each_call() {
    let pair = StreamingPair::start();
    let app = start_over(&pair).await;
    let primary = pair.primary_pool().await;
    let replica = pair.replica_pool().await;
    let current_hour = now().div_euclid(HOUR) * HOUR;
    let start = current_hour - 3 * HOUR;
    app.track_at("view", "alice", current_hour - 2 * HOUR + 60).await;
    app.track_at("view", "bob", 0).await;
    wait_for_replay(&primary, &replica).await;
    assert_counts_match(&app, &primary, start, now() + 2, "replica up").await;
    assert_eq!(app.replica_metrics().await, (3.0, 0.0, 0.0));

    replica.close().await;
    pair.stop_replica();
    app.track_at("view", "carol", 0).await;
    let end = now() + 2;
    let (totals, _, users) = raw_counts(&primary, start, end).await;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for _ in 0..10 {
        let call = Instant::now();
        assert_eq!(app.counts(start, end, "").await, totals, "counts answer from the primary");
        assert_eq!(app.unique_users(start, end).await, users);
        slowest = slowest.max(call.elapsed());
    }
    let elapsed = started.elapsed();
    // The first call pays at most the replica check's timeout (500 ms); the cool-down
    // spares the others.
    assert!(slowest < Duration::from_millis(1_500), "slowest pair of calls took {slowest:?}");
    assert!(elapsed < Duration::from_secs(3), "20 calls took {elapsed:?}");
    let (served, lagging, unavailable) = app.replica_metrics().await;
    assert_eq!((served, lagging, unavailable), (3.0, 0.0, 20.0), "every call fell back as unavailable");
    let (status, body) = http_get(app.admin_address, "/readyz").await;
    assert_eq!(status, 200, "readiness does not depend on the read replica: {body}");

    // Back up: after the cool-down (5 s) a call probes it, and it answers again (its
    // pooled connections, broken by the restart, are replaced).
    pair.start_replica();
    let replica = pair.replica_pool().await;
    wait_for_replay(&primary, &replica).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.replica_metrics().await.0 == served {
        assert!(Instant::now() < deadline, "the replica never answered again");
        assert_eq!(app.counts(start, end, "").await, totals);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}
