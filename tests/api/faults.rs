//! Faults under load, against the durability contract: SIGTERM and kill -9 of the real
//! binary while clients write, and a PostgreSQL outage (a proxy the test cuts). After
//! each, every event a client saw acknowledged is in the database.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use sqlx::postgres::PgPoolOptions;
use sqlx::ConnectOptions;
use tonic::transport::Channel;
use tonic::Code;

use crate::helpers::{
    binary_command, closed_port, create_database, keyed_track_request, postgres_host, postgres_port,
    postgres_user, track_request, wait_serving, wait_until,
};
use crate::proxy::spawn_app_behind_postgres_proxy;

/// Clients that write until told to stop, remembering every acknowledged event id.
struct Load {
    acknowledged: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` tasks, each sending unary calls (every 4th call a batch of 10)
    /// back to back, at most `max_calls` each.
    fn start(address: SocketAddr, clients: usize, max_calls: usize) -> Self {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..clients)
            .map(|worker| {
                let acknowledged = acknowledged.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(channel) =
                        Channel::from_shared(format!("http://{address}")).unwrap().connect().await
                    else {
                        return;
                    };
                    let mut client = AnalyticsServiceClient::new(channel);
                    for call in 0..max_calls {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let user = format!("w{worker}");
                        let key = format!("w{worker}-c{call}");
                        let acked: Vec<String> = if call % 4 == 3 {
                            let events = (0..10)
                                .map(|index| keyed_track_request("load", &user, &format!("{key}-{index}")))
                                .collect();
                            match client.track_events(pb::TrackEventsRequest { events }).await {
                                Ok(response) => response
                                    .into_inner()
                                    .results
                                    .into_iter()
                                    .filter(|result| !result.event_id.is_empty())
                                    .map(|result| result.event_id)
                                    .collect(),
                                Err(_) => Vec::new(),
                            }
                        } else {
                            match client.track_event(keyed_track_request("load", &user, &key)).await {
                                Ok(response) => vec![response.into_inner().event_id],
                                Err(_) => Vec::new(),
                            }
                        };
                        acknowledged.lock().unwrap().extend(acked);
                    }
                })
            })
            .collect();
        Self { acknowledged, stop, workers }
    }

    fn acknowledged_count(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    /// Waits (bounded) until at least `count` events were acknowledged.
    async fn wait_for(&self, count: usize) {
        let reached = wait_until(Duration::from_secs(30), Duration::from_millis(50), async || {
            self.acknowledged_count() >= count
        })
        .await;
        assert!(reached, "only {} events acknowledged, wanted {count}", self.acknowledged_count());
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            tokio::time::timeout(Duration::from_secs(30), worker).await.expect("load stops").ok();
        }
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        acknowledged
    }
}

/// How many of `ids` are rows of `events` in `database` (dropped afterwards).
async fn stored(database: &str, ids: &[String]) -> i64 {
    let options = sqlx::postgres::PgConnectOptions::new()
        .host(&postgres_host())
        .port(postgres_port())
        .username(&postgres_user())
        .database(database)
        .disable_statement_logging();
    let pool = PgPoolOptions::new().max_connections(1).connect_with(options.clone()).await.unwrap();
    let count = sqlx::query_scalar("SELECT count(*) FROM events WHERE id::text = ANY($1)")
        .bind(ids)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut admin = options.database("postgres").connect().await.unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&mut admin).await.ok();
    count
}

/// A migrated database and the real binary serving it on a known port.
async fn start_binary() -> (String, Child, SocketAddr) {
    let database = create_database().await;
    let base = || {
        let mut command = binary_command(&database);
        command.env("POSTGRES_MAX_CONNECTIONS", "8").env("REDIS_HOST", "").stdout(Stdio::null());
        command
    };
    assert!(base().arg("migrate").status().unwrap().success());
    let grpc_port = closed_port();
    let server = base()
        .env("SERVICE_BIND_ADDRESS", "127.0.0.1")
        .env("SERVICE_PORT", grpc_port.to_string())
        .env("PROMETHEUS_PORT", "0")
        .env("SHUTDOWN_DRAIN_SECONDS", "20")
        .arg("serve")
        .spawn()
        .unwrap();
    let address: SocketAddr = format!("127.0.0.1:{grpc_port}").parse().unwrap();
    let serving = wait_serving(address, Duration::from_secs(10)).await;
    if serving {
        return (database, server, address);
    }
    let mut server = server;
    server.kill().ok();
    server.wait().ok();
    panic!("the server did not come up");
}

async fn wait_exit(server: &mut Child) -> std::process::ExitStatus {
    let mut exit = None;
    wait_until(Duration::from_secs(30), Duration::from_millis(50), async || {
        exit = server.try_wait().unwrap();
        exit.is_some()
    })
    .await;
    if let Some(status) = exit {
        return status;
    }
    server.kill().ok();
    server.wait().ok();
    panic!("the server did not exit");
}

/// Sends `signal` to the real binary while 16 clients write; once it has exited as
/// `expected_exit` says, every event a client saw acknowledged must be stored.
async fn signal_under_load_loses_no_acknowledged_event(
    signal: &str,
    expected_exit: Option<i32>,
    exit_meaning: &str,
) {
    let (database, mut server, address) = start_binary().await;
    let load = Load::start(address, 16, 100_000);
    load.wait_for(2_000).await;

    let killed = Command::new("kill").args([signal, &server.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let exit = wait_exit(&mut server).await;
    assert_eq!(exit.code(), expected_exit, "{exit_meaning}");

    let acknowledged = load.finish().await;
    assert!(acknowledged.len() >= 2_000);
    assert_eq!(
        stored(&database, &acknowledged).await,
        acknowledged.len() as i64,
        "no acknowledged event is missing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_loses_no_acknowledged_event() {
    signal_under_load_loses_no_acknowledged_event("-TERM", Some(0), "a drained shutdown exits 0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_loses_no_acknowledged_event() {
    signal_under_load_loses_no_acknowledged_event("-KILL", None, "killed by a signal").await;
}

#[tokio::test]
async fn a_postgres_outage_is_unavailable_then_recovers_without_restart() {
    let (proxy, app) = spawn_app_behind_postgres_proxy(vec![("POSTGRES_ACQUIRE_TIMEOUT_MS", "200")]).await;
    let mut acknowledged = Vec::new();
    for index in 0..20 {
        let response =
            app.client.clone().track_event(track_request("before", &format!("u{index}"))).await.unwrap();
        acknowledged.push(response.into_inner().event_id);
    }

    proxy.cut();
    let unary = (0..10).map(|index| {
        let mut client = app.client.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                client.track_event(keyed_track_request("during", &format!("u{index}"), &format!("k{index}"))),
            )
            .await
        }
    });
    for answer in futures::future::join_all(unary).await {
        let status =
            answer.expect("answers within the retry budget, no hang").expect_err("database is cut off");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "database unavailable");
    }
    let batch =
        pb::TrackEventsRequest { events: vec![track_request("during", "u"), track_request("during", "v")] };
    let status = tokio::time::timeout(Duration::from_secs(20), app.client.clone().track_events(batch))
        .await
        .expect("no hang")
        .expect_err("a batch that stored nothing fails as a call");
    assert_eq!(status.code(), Code::Unavailable);
    // PostgreSQL is shared by every replica: by default the replica stays ready.
    app.wait_for_readyz(200).await;

    proxy.restore();
    let recovered = wait_until(Duration::from_secs(10), Duration::from_millis(100), async || {
        match app.client.clone().track_event(keyed_track_request("after", "u", "k0")).await {
            Ok(response) => {
                acknowledged.push(response.into_inner().event_id);
                true
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(recovered, "the service reconnects by itself");
    app.wait_for_readyz(200).await;
    for index in 0..20 {
        let response =
            app.client.clone().track_event(track_request("after", &format!("u{index}"))).await.unwrap();
        acknowledged.push(response.into_inner().event_id);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE id::text = ANY($1)")
        .bind(&acknowledged)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, acknowledged.len() as i64, "no acknowledged event is missing");
    let during: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_name = 'during'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(during, 0, "nothing refused during the outage was stored");
}

/// The read pool pings only connections that sat idle for a second or more, not every
/// connection it hands out. When PostgreSQL drops every read connection at once (a
/// restart), the counts asked right after, on connections used moments before, are
/// answered: a statement that fails on a dropped connection is retried on another one.
#[tokio::test]
async fn counts_asked_right_after_the_read_connections_drop_are_answered() {
    let (proxy, app) = spawn_app_behind_postgres_proxy(vec![]).await;
    let now = chrono::Utc::now().timestamp();
    for index in 0..20 {
        app.client.clone().track_event(track_request("view", &format!("u{index}"))).await.unwrap();
    }
    let client = app.client.clone();
    let counts = |round: usize| {
        let client = client.clone();
        let calls = (0..8).map(move |index| {
            let mut client = client.clone();
            async move {
                // Distinct ranges, so no answer is served whole from an immutable cache entry.
                let start = now - 86_400 - (round * 8 + index) as i64;
                let events = client
                    .get_event_count(pb::GetEventCountRequest {
                        start_time: start,
                        end_time: now + 60,
                        ..Default::default()
                    })
                    .await
                    .map(|response| {
                        response.into_inner().counts.iter().map(|count| count.count).sum::<i64>()
                    });
                let users = client
                    .get_user_count(pb::GetUserCountRequest { start_time: start, end_time: now + 60 })
                    .await
                    .map(|response| response.into_inner().unique_users);
                (events, users)
            }
        });
        futures::future::join_all(calls)
    };
    // The read pool now holds several connections, all used within the last moment.
    for (events, users) in counts(0).await {
        assert_eq!((events.unwrap(), users.unwrap()), (20, 20));
    }
    let opened_before = proxy.accepted();
    proxy.cut();
    proxy.restore();
    for (events, users) in counts(1).await {
        let (events, users) = (events.expect("event count answered"), users.expect("user count answered"));
        assert_eq!((events, users), (20, 20), "the same answers as before the drop");
    }
    assert!(proxy.accepted() > opened_before, "the answers came over new connections");
}
