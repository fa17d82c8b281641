//! The processes the benchmarks measure (loadgen, erasebench): the service binary
//! (`migrate`, then `serve` with Redis on or off) and the bare tonic no-op server, each a
//! child process on free 127.0.0.1 ports, terminated when dropped; the PostgreSQL and
//! Redis they use ([`Backends`], shared command-line options); the client channels to
//! them; and the removal of a run's Redis keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use anyhow::{bail, Context as _};
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The PostgreSQL and Redis a benchmark and the service it starts use (command-line
/// options, or the TEST_* variables of the test suite).
#[derive(clap::Args, Debug, Clone)]
pub struct Backends {
    /// Redis the service uses (REDIS_HOST); empty = Redis off for the whole run. Each
    /// run uses its own REDIS_KEY_PREFIX and deletes its keys afterwards.
    #[arg(long, env = "TEST_REDIS_HOST", default_value = "127.0.0.1")]
    pub redis_host: String,
    #[arg(long, env = "TEST_REDIS_PORT", default_value_t = 6379)]
    pub redis_port: u16,
    #[arg(long, env = "TEST_POSTGRES_HOST", default_value = "127.0.0.1")]
    pub postgres_host: String,
    #[arg(long, env = "TEST_POSTGRES_PORT", default_value_t = 5432)]
    pub postgres_port: u16,
    #[arg(long, env = "TEST_POSTGRES_USER", default_value = "postgres")]
    pub postgres_user: String,
    #[arg(long, env = "TEST_POSTGRES_PASSWORD", default_value = "")]
    pub postgres_password: String,
}

impl Backends {
    /// Whether the run uses Redis at all (--redis-host not empty).
    pub fn redis_on(&self) -> bool {
        !self.redis_host.is_empty()
    }

    /// Connect options for `database` on the benchmark's PostgreSQL, statements not logged.
    pub fn postgres(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(&self.postgres_host)
            .port(self.postgres_port)
            .username(&self.postgres_user)
            .password(&self.postgres_password)
            .database(database)
            .disable_statement_logging()
    }
}

/// A binary next to the running one unless `given`.
pub fn sibling(given: &Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    Ok(match given {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name(name),
    })
}

/// The 1-, 5- and 15-minute load averages of /proc/loadavg (other processes share the
/// cores a benchmark runs on).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server child; terminated with SIGTERM (then killed) when dropped.
pub struct ServerProcess {
    child: Child,
    /// Its gRPC address.
    pub address: SocketAddr,
    /// Its Prometheus address (the service only).
    pub admin: Option<SocketAddr>,
}

impl ServerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().ok();
        for _ in 0..300 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// How the service is started: its binary, database and Redis.
pub struct ServiceLauncher<'a> {
    pub backends: &'a Backends,
    /// KEY=VALUE pairs applied last to `serve`'s environment.
    pub server_env: &'a [String],
    pub binary: &'a Path,
    pub database: &'a str,
    /// REDIS_KEY_PREFIX of this run: unique, so runs never share budgets.
    pub redis_prefix: &'a str,
}

impl ServiceLauncher<'_> {
    /// The service's environment: the bench database, Redis on (`redis` true and
    /// --redis-host non-empty) or off, production defaults for everything else.
    fn command(&self, redis: bool) -> Command {
        let backends = self.backends;
        let mut command = Command::new(self.binary);
        command
            .env("POSTGRES_HOST", &backends.postgres_host)
            .env("POSTGRES_PORT", backends.postgres_port.to_string())
            .env("POSTGRES_USER", &backends.postgres_user)
            .env("POSTGRES_PASSWORD", &backends.postgres_password)
            .env("POSTGRES_DB", self.database)
            .env("POSTGRES_SSLMODE", "disable")
            .env("REDIS_HOST", if redis { backends.redis_host.as_str() } else { "" })
            .env("REDIS_PORT", backends.redis_port.to_string())
            .env("REDIS_KEY_PREFIX", self.redis_prefix)
            .env("LOG_LEVEL", "warn")
            .env("LOG_FORMAT", "text")
            .stdin(Stdio::null());
        command
    }

    pub fn migrate(&self) -> anyhow::Result<()> {
        let status = self.command(false).arg("migrate").stdout(Stdio::null()).status()?;
        if !status.success() {
            bail!("migrate failed: {status}");
        }
        Ok(())
    }

    /// Starts `serve` (Redis on or off) with `server_env` applied last.
    pub fn serve(&self, redis: bool) -> anyhow::Result<ServerProcess> {
        let grpc_port = free_port()?;
        let admin_port = free_port()?;
        let mut command = self.command(redis);
        command
            .env("SERVICE_BIND_ADDRESS", "127.0.0.1")
            .env("SERVICE_PORT", grpc_port.to_string())
            .env("PROMETHEUS_PORT", admin_port.to_string())
            .stdout(Stdio::null());
        for pair in self.server_env {
            let (key, value) = pair.split_once('=').context("server environment wants KEY=VALUE")?;
            command.env(key, value);
        }
        Ok(ServerProcess {
            child: command.arg("serve").spawn()?,
            address: format!("127.0.0.1:{grpc_port}").parse()?,
            admin: Some(format!("127.0.0.1:{admin_port}").parse()?),
        })
    }
}

/// Starts the bare tonic no-op server (`bare-noop-server` next to loadgen by default).
pub fn spawn_bare(binary: &Path) -> anyhow::Result<ServerProcess> {
    if !binary.exists() {
        bail!("{} not found: build it with `cargo build --release --bins`", binary.display());
    }
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let child =
        Command::new(binary).arg(address.to_string()).stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
    Ok(ServerProcess { child, address, admin: None })
}

/// `connections` channels to `server` once it answers: the service's HealthCheck says
/// SERVING, or (the bare server) grpc.health.v1 Check answers.
pub async fn connect(server: &ServerProcess, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = format!("http://{}", server.address);
    for _ in 0..400 {
        let Ok(channel) = Channel::from_shared(endpoint.clone())?.connect().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ready = if server.admin.is_some() {
            let health = AnalyticsServiceClient::new(channel).health_check(pb::HealthCheckRequest {}).await;
            health.is_ok_and(|health| health.into_inner().status == "SERVING")
        } else {
            HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.is_ok()
        };
        if ready {
            let mut channels = Vec::new();
            for _ in 0..connections.max(1) {
                channels.push(Channel::from_shared(endpoint.clone())?.connect().await?);
            }
            return Ok(channels);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the server at {} did not become ready", server.address)
}

/// Deletes every key under `prefix` (SCAN + DEL); returns how many were deleted.
pub async fn delete_redis_keys(backends: &Backends, prefix: &str) -> anyhow::Result<u64> {
    let client = redis::Client::open(format!("redis://{}:{}/", backends.redis_host, backends.redis_port))?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}*");
    let mut cursor = 0u64;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await?;
        if !keys.is_empty() {
            let removed: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut connection).await?;
            deleted += removed;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
