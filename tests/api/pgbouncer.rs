//! The service through a real PgBouncer in transaction pooling mode (Debian's
//! `pgbouncer`, 1.18: no protocol-level prepared statements): a private PgBouncer on a
//! free port in front of the local PostgreSQL, with fewer server connections than the
//! service opens client connections, so server connections really change hands between
//! transactions.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use analytics_service::pb;
use analytics_service::repository::postgres::{migration_connect_options, partitions, schema, Database};
use chrono::{Datelike, Utc};
use tonic::Code;

use crate::helpers::{
    admin_env, closed_port, keyed_track_request, now, postgres_host, postgres_port, postgres_user,
    spawn_app_with, string_value, track_request, wait_until, TestApp, TestOptions,
};

/// Server connections PgBouncer opens per database and user: fewer than the service's
/// pools hold, so client connections share them.
const SERVER_CONNECTIONS: u32 = 4;

/// A PgBouncer in transaction pooling mode on 127.0.0.1 at a free port, running as the
/// `postgres` OS user (it refuses root); killed and its directory deleted when dropped.
pub struct PgBouncer {
    pub port: u16,
    directory: PathBuf,
    process: Child,
}

impl PgBouncer {
    pub fn start() -> Self {
        let directory =
            std::env::temp_dir().join(format!("analytics-pgbouncer-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&directory).unwrap();
        let port = closed_port();
        let path = |name: &str| directory.join(name).display().to_string();
        let user = postgres_user();
        std::fs::write(path("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        let ini = format!(
            "[databases]\n\
             * = host={host} port={postgres_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {auth_file}\n\
             pool_mode = transaction\n\
             default_pool_size = {SERVER_CONNECTIONS}\n\
             min_pool_size = 0\n\
             reserve_pool_size = 0\n\
             max_client_conn = 200\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {logfile}\n\
             pidfile = {pidfile}\n",
            host = postgres_host(),
            postgres_port = postgres_port(),
            auth_file = path("users.txt"),
            logfile = path("pgbouncer.log"),
            pidfile = path("pgbouncer.pid"),
        );
        std::fs::write(path("pgbouncer.ini"), ini).unwrap();
        let chown = Command::new("chown").args(["-R", "postgres:postgres", &path("")]).status().unwrap();
        assert!(chown.success(), "chown the pgbouncer directory");
        let process = Command::new("runuser")
            .args(["-u", "postgres", "--", "pgbouncer", &path("pgbouncer.ini")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgbouncer starts (scripts/dev-services.sh installs it)");
        let bouncer = Self { port, directory, process };
        bouncer.wait_until_listening();
        bouncer
    }

    fn wait_until_listening(&self) {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pgbouncer did not listen on {}: {}", self.port, self.log());
    }

    /// PgBouncer's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.directory.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser does not pass SIGKILL on: stop pgbouncer itself (SIGINT: at once).
        if let Ok(pid) = std::fs::read_to_string(self.directory.join("pgbouncer.pid")) {
            Command::new("kill").args(["-INT", pid.trim()]).status().ok();
        }
        self.process.kill().ok();
        self.process.wait().ok();
        std::fs::remove_dir_all(&self.directory).ok();
    }
}

/// The environment of a server whose PostgreSQL is `bouncer`: 12 client connections in
/// all (3 for the group commits, 9 for the rest) over the pooler's 4 server connections.
fn through(bouncer: &PgBouncer, pooler_setting: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("POSTGRES_PORT".to_string(), bouncer.port.to_string()),
        ("POSTGRES_MAX_CONNECTIONS".to_string(), "12".to_string()),
        ("POSTGRES_ACQUIRE_TIMEOUT_MS".to_string(), "3000".to_string()),
        ("MIGRATION_POSTGRES_PORT".to_string(), postgres_port().to_string()),
        ("RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE".to_string(), "0".to_string()),
    ];
    if pooler_setting {
        env.push(("POSTGRES_POOLER".to_string(), "transaction".to_string()));
    }
    env
}

/// A server through `bouncer`, not migrated: the test migrates through the migration
/// address, as the chart's Job does.
async fn spawn_through(bouncer: &PgBouncer, pooler_setting: bool) -> (TestApp, PathBuf) {
    let (mut env, key_file) = admin_env();
    env.extend(through(bouncer, pooler_setting));
    let app = spawn_app_with(TestOptions { migrate: false, env, ..TestOptions::default() }).await;
    (app, key_file)
}

async fn event_count(app: &TestApp, start: i64, end: i64) -> i64 {
    app.counts("", start, end, "", "").await.iter().map(|(_, _, count)| count).sum()
}

#[tokio::test]
async fn the_whole_api_works_through_pgbouncer_in_transaction_mode() {
    let bouncer = PgBouncer::start();
    let (app, key_file) = spawn_through(&bouncer, true).await;
    let refused = migration_connect_options(&{
        let mut config = app.config.postgres.clone();
        config.migration_port = None;
        config
    });
    assert!(refused.is_err(), "migrate without a direct address is refused behind a transaction pooler");
    schema::migrate(&migration_connect_options(&app.config).unwrap()).await.expect("migrate runs directly");
    app.wait_for_readyz(200).await;
    let health = app.client.clone().health_check(pb::HealthCheckRequest {}).await.unwrap().into_inner();
    assert_eq!(health.status, "SERVING");

    let mut client = app.client.clone();
    let plain = client.track_event(track_request("page_view", "alice")).await.unwrap().into_inner();
    assert!(plain.success);
    let keyed =
        client.track_event(keyed_track_request("purchase", "alice", "order-1")).await.unwrap().into_inner();
    let again =
        client.track_event(keyed_track_request("purchase", "alice", "order-1")).await.unwrap().into_inner();
    assert_eq!(again.event_id, keyed.event_id, "a repeated insert_id answers the original event");
    let batch = client
        .track_events(pb::TrackEventsRequest {
            events: vec![
                track_request("page_view", "bob"),
                keyed_track_request("purchase", "bob", "order-2"),
                keyed_track_request("purchase", "bob", "order-2"),
                keyed_track_request("purchase", "alice", "order-1"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let statuses: Vec<i32> = batch.iter().map(|result| result.status).collect();
    let accepted = pb::TrackEventStatus::Accepted as i32;
    let duplicate = pb::TrackEventStatus::Duplicate as i32;
    assert_eq!(statuses, vec![accepted, accepted, duplicate, duplicate]);
    assert_eq!(batch[3].event_id, keyed.event_id);
    let properties = [("plan".to_string(), string_value("pro"))].into_iter().collect();
    client
        .identify_user(pb::IdentifyUserRequest { user_id: "alice".into(), properties })
        .await
        .expect("IdentifyUser through pgbouncer");

    // 32 callers at once for 3 s: the group commits and the reads share 4 server sessions.
    let load_until = Instant::now() + Duration::from_secs(3);
    let callers = (0..32).map(|caller| {
        let mut client = app.client.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < load_until {
                let user = format!("load-{caller}-{}", sent % 5);
                let request = if sent % 3 == 0 {
                    keyed_track_request("load", &user, &format!("key-{caller}-{sent}"))
                } else {
                    track_request("load", &user)
                };
                let answer = client.track_event(request).await.map_err(|status| (caller, sent, status))?;
                assert!(answer.into_inner().success);
                sent += 1;
            }
            Ok::<u64, (i32, u64, tonic::Status)>(sent)
        })
    });
    let mut load_events = 0;
    for caller in futures::future::join_all(callers).await {
        load_events +=
            caller.unwrap().unwrap_or_else(|failure| panic!("a call failed under load: {failure:?}"));
    }
    assert!(load_events > 32, "the load phase sent {load_events} events");

    // The fold runs through the pooler too: the pending users empty, and the counts are exact.
    let folded = wait_until(Duration::from_secs(20), Duration::from_millis(100), async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_activity_pending")
            .fetch_one(&app.pool)
            .await
            .unwrap()
            == 0
    })
    .await;
    assert!(folded, "the fold emptied user_activity_pending");
    let stored = app.event_rows().await;
    assert_eq!(stored, 4 + load_events as i64, "one row per accepted event, none for duplicates");
    let (start, end) = (now() - 3600, now() + 1);
    assert_eq!(event_count(&app, start, end).await, stored);
    let users: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT user_id) FROM events").fetch_one(&app.pool).await.unwrap();
    assert_eq!(app.unique_users(start, end).await, users);

    // Partition maintenance through the pooler (its SQL takes a transaction-level lock).
    let through_pooler = Database::connect_lazy(&app.config);
    let far = Utc::now() + chrono::Duration::days(400);
    let created =
        partitions::ensure_partitions(&through_pooler, far, far).await.expect("partitions through pgbouncer");
    assert_eq!(created, 1);
    let partition = format!("events_p{:04}{:02}", far.year(), far.month());
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&partition)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(exists, "{partition} was created");

    // ExportUser streams alice's events from one query pinned to one server connection.
    let mut export = app
        .admin_client()
        .export_user(pb::ExportUserRequest { user_id: "alice".into() })
        .await
        .expect("ExportUser through pgbouncer")
        .into_inner();
    let mut exported_events = 0;
    while let Some(item) = export.message().await.expect("the export streams through pgbouncer") {
        if matches!(item.item, Some(pb::export_user_response::Item::Event(_))) {
            exported_events += 1;
        }
    }
    assert_eq!(exported_events, 2, "alice's two events");

    // The erasure's leased batches and final pass through the pooler, with a suppression
    // that the insert statement then checks and LiftSuppression removes.
    let deletion = app
        .admin_client()
        .delete_user(pb::DeleteUserRequest { user_id: "alice".into(), suppress: true })
        .await
        .expect("DeleteUser through pgbouncer")
        .into_inner()
        .deletion
        .unwrap();
    let completed = wait_until(Duration::from_secs(30), Duration::from_millis(100), async || {
        let answer = app
            .admin_client()
            .get_user_deletion(pb::GetUserDeletionRequest { request_id: deletion.request_id.clone() })
            .await
            .expect("GetUserDeletion through pgbouncer");
        answer.into_inner().deletion.unwrap().state == pb::UserDeletionState::Completed as i32
    })
    .await;
    assert!(completed, "the erasure completed");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE user_id = 'alice'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(
        event_count(&app, start, end).await,
        stored - 2,
        "alice's two events are gone from the counts"
    );
    assert!(app.track("view", "alice", 0).await.suppressed, "suppressed through the pooler");
    let lifted = app
        .admin_client()
        .lift_suppression(pb::LiftSuppressionRequest { user_id: "alice".into() })
        .await
        .expect("LiftSuppression through pgbouncer");
    assert!(lifted.into_inner().lifted);
    assert!(!app.track("view", "alice", 0).await.suppressed);

    let log = bouncer.log();
    assert!(!log.contains("pooler error"), "pgbouncer refused something:\n{log}");
    std::fs::remove_file(key_file).ok();
}

#[tokio::test]
async fn without_the_pooler_setting_the_service_fails_through_pgbouncer() {
    let bouncer = PgBouncer::start();
    let (app, key_file) = spawn_through(&bouncer, false).await;
    schema::migrate(&migration_connect_options(&app.config).unwrap()).await.expect("migrate runs directly");
    let write = app.client.clone().track_event(track_request("page_view", "alice")).await;
    assert_eq!(write.unwrap_err().code(), Code::Unavailable, "the writers' start-up parameter is refused");
    assert!(bouncer.log().contains("unsupported startup parameter: options"), "{}", bouncer.log());

    // Reads with sqlx's named statements: a statement prepared by one client connection
    // is missing from, or taken on, the server session the next transaction lands on.
    let (start, end) = (now() - 3600, now() + 1);
    let reads = (0..32).map(|_| {
        let mut client = app.client.clone();
        async move {
            client
                .get_event_count(pb::GetEventCountRequest {
                    event_name: String::new(),
                    start_time: start,
                    end_time: end,
                    group_by: "hour".into(),
                    time_zone: String::new(),
                })
                .await
        }
    });
    let failed = futures::future::join_all(reads).await.iter().filter(|answer| answer.is_err()).count();
    assert!(failed > 0, "every read succeeded without POSTGRES_POOLER=transaction");
    std::fs::remove_file(key_file).ok();
}
