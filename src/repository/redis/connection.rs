//! The connection every Redis user (the count cache, the shared budgets) holds, whatever
//! the topology (REDIS_MODE): a [`ConnectionManager`] to one server, a connection to the
//! master the sentinels name, or a Redis Cluster connection. Each one reconnects by
//! itself: the manager to its one address, the sentinel connection to whichever server
//! the sentinels name master after a failover, the cluster connection to the slot's new
//! master (it follows MOVED and refreshes its slot map).
//!
//! Users see one [`RedisConnection`] that implements the redis crate's `ConnectionLike`
//! (so `AsyncCommands`, scripts and single-slot pipelines work on it) plus
//! [`RedisConnection::query_each`] for batches of independent single-key commands.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use ::redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, FromRedisValue, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, ServerErrorKind, TlsCertificates, TlsMode, Value,
};
use tokio::sync::OnceCell;

use crate::config::{read_ca_bundle, NodeAddress, RedisConfig, RedisTopology};

/// A connection to Redis in any topology; cheap to clone (clones share the sockets).
#[derive(Clone)]
pub(super) enum RedisConnection {
    Standalone(ConnectionManager),
    Sentinel(SentinelConnection),
    Cluster(ClusterConnection),
}

/// Connects on first use and hands out clones of that one connection.
pub(super) struct LazyConnection {
    target: Target,
    timeout: Duration,
    connection: OnceCell<RedisConnection>,
}

/// What to connect to, built from the configuration without any I/O.
// Two per process (cache, budgets), never moved around: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Target {
    Standalone(::redis::Client),
    Sentinel(SentinelConnection),
    Cluster(ClusterClient),
}

impl LazyConnection {
    /// Checks the settings (addresses, CA bundle) and prepares the client; connects later.
    pub(super) fn new(config: &RedisConfig) -> RedisResult<Self> {
        let target = match &config.topology {
            RedisTopology::Standalone { host, port } => {
                Target::Standalone(standalone_client(config, host, *port)?)
            }
            RedisTopology::Sentinel { sentinels, master_name } => {
                Target::Sentinel(SentinelConnection::new(config, sentinels, master_name)?)
            }
            RedisTopology::Cluster { seed_nodes } => Target::Cluster(cluster_client(config, seed_nodes)?),
        };
        Ok(Self { target, timeout: config.timeout, connection: OnceCell::new() })
    }

    /// The connection, made on the first call; a failed attempt is tried again next call.
    pub(super) async fn get(&self) -> RedisResult<RedisConnection> {
        let connection = self
            .connection
            .get_or_try_init(|| async {
                match &self.target {
                    Target::Standalone(client) => {
                        let manager_config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(self.timeout))
                            .set_response_timeout(Some(self.timeout))
                            .set_number_of_retries(1);
                        let manager =
                            ConnectionManager::new_with_config(client.clone(), manager_config).await?;
                        Ok::<_, RedisError>(RedisConnection::Standalone(manager))
                    }
                    // Reaches the master on the first command, so that a master the
                    // sentinels cannot name yet fails calls, not the whole handle.
                    Target::Sentinel(sentinel) => Ok(RedisConnection::Sentinel(sentinel.clone())),
                    Target::Cluster(client) => {
                        Ok(RedisConnection::Cluster(client.get_async_connection().await?))
                    }
                }
            })
            .await?;
        Ok(connection.clone())
    }
}

impl RedisConnection {
    /// Runs independent commands of one key each and returns each command's own result,
    /// in order. One server (standalone, sentinel): one pipeline, one round trip. Cluster:
    /// the keys live on different slots and nodes, so each command is sent on its own, all
    /// at once; the client multiplexes them over its connection per node, so the batch
    /// costs one round trip of latency (to the slowest node) and one request per command,
    /// and each command follows MOVED and failovers by itself. Fails as a whole only when
    /// the round trip of a pipeline fails.
    pub(super) async fn query_each<T: FromRedisValue>(
        &mut self,
        commands: Vec<Cmd>,
    ) -> RedisResult<Vec<RedisResult<T>>> {
        match self {
            Self::Cluster(cluster) => {
                let calls = commands.into_iter().map(|command| {
                    let mut connection = cluster.clone();
                    async move { command.query_async::<T>(&mut connection).await }
                });
                Ok(futures::future::join_all(calls).await)
            }
            Self::Standalone(_) | Self::Sentinel(_) => {
                let mut pipeline = ::redis::pipe();
                pipeline.ignore_errors();
                for command in commands {
                    pipeline.add_command(command);
                }
                pipeline.query_async(self).await
            }
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, command: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(manager) => manager.req_packed_command(command),
            Self::Sentinel(sentinel) => sentinel.req_packed_command(command),
            Self::Cluster(cluster) => cluster.req_packed_command(command),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(manager) => manager.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(sentinel) => sentinel.req_packed_commands(pipeline, offset, count),
            Self::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(manager) => manager.get_db(),
            Self::Sentinel(sentinel) => sentinel.shared.db,
            Self::Cluster(cluster) => cluster.get_db(),
        }
    }
}

/// A connection to the master the sentinels name. The sentinels are asked on the first
/// command, again after a command fails in a way that says the master moved or went away
/// (connection lost or refused, timeout, READONLY from a demoted master), and in the
/// background at most every [`MASTER_RECHECK`] while commands flow: after a forced
/// failover the old master keeps accepting writes until the sentinels demote it (their
/// next INFO poll, up to 10 s), so waiting for an error would keep budgets there. A failed
/// command is not retried (a GCRA spend may have happened); the next one goes to the
/// master the sentinels name then.
#[derive(Clone)]
pub(super) struct SentinelConnection {
    shared: Arc<SentinelShared>,
}

/// How often commands trigger a background check of which server the sentinels name.
const MASTER_RECHECK: Duration = Duration::from_secs(1);

struct SentinelShared {
    /// Asks the sentinels; the lock also makes concurrent callers share one lookup.
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The master's connection (see [`Master`]).
    master: Mutex<Option<Master>>,
    /// When the last background check started.
    checked_at: Mutex<Instant>,
    connection_config: AsyncConnectionConfig,
    timeout: Duration,
    db: i64,
}

#[derive(Clone)]
struct Master {
    /// Numbers connections, so a failure forgets only the one it happened on.
    generation: u64,
    /// `host:port` as the sentinels named it.
    address: String,
    connection: MultiplexedConnection,
}

impl SentinelConnection {
    fn new(config: &RedisConfig, sentinels: &[NodeAddress], master_name: &str) -> RedisResult<Self> {
        let addresses = sentinels.iter().map(|node| connection_addr(config, &node.host, node.port));
        let mut builder = SentinelClientBuilder::new(addresses, master_name, SentinelServerType::Master)?
            .set_client_to_redis_db(config.db);
        if let Some(username) = &config.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if !config.password.is_empty() {
            builder = builder.set_client_to_redis_password(config.password.expose());
        }
        if config.tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_redis_certificates(certificates(config)?)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_certificates(certificates(config)?);
        }
        Ok(Self {
            shared: Arc::new(SentinelShared {
                sentinels: tokio::sync::Mutex::new(builder.build()?),
                master: Mutex::new(None),
                checked_at: Mutex::new(Instant::now()),
                connection_config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(config.timeout))
                    .set_response_timeout(Some(config.timeout)),
                timeout: config.timeout,
                db: config.db,
            }),
        })
    }

    /// The master's connection, asking the sentinels when there is none.
    async fn master(&self) -> RedisResult<Master> {
        if let Some(current) = self.shared.current() {
            self.recheck_if_due();
            return Ok(current);
        }
        let mut sentinels = self.shared.sentinels.lock().await;
        // Another caller may have found the master while this one waited for the lock.
        if let Some(current) = self.shared.current() {
            return Ok(current);
        }
        let (address, client) = self.shared.ask_sentinels(&mut sentinels).await?;
        let connection = self.shared.connect(&client).await?;
        Ok(self.shared.replace(address, connection))
    }

    /// Starts a background check of the sentinels' master when the last one is older
    /// than [`MASTER_RECHECK`].
    fn recheck_if_due(&self) {
        let mut checked_at = lock(&self.shared.checked_at);
        if checked_at.elapsed() < MASTER_RECHECK {
            return;
        }
        *checked_at = Instant::now();
        drop(checked_at);
        let shared = self.shared.clone();
        tokio::spawn(async move { shared.recheck().await });
    }

    /// Forgets the connection of `generation` when `result` says the master moved or is
    /// gone; the next command asks the sentinels again.
    fn observe<T>(&self, generation: u64, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(error) = &result {
            if master_moved_or_gone(error) {
                self.shared.forget(generation, error);
            }
        }
        result
    }
}

impl SentinelShared {
    fn current(&self) -> Option<Master> {
        lock(&self.master).clone()
    }

    /// Asks the sentinels which server is the master (several round trips: a sentinel,
    /// then the master's ROLE); its `host:port` and a client for it.
    async fn ask_sentinels(&self, sentinels: &mut SentinelClient) -> RedisResult<(String, ::redis::Client)> {
        let client = tokio::time::timeout(4 * self.timeout, sentinels.async_get_client())
            .await
            .map_err(|_| RedisError::from((ErrorKind::Io, "sentinels did not name a master in time")))??;
        Ok((client.get_connection_info().addr().to_string(), client))
    }

    async fn connect(&self, client: &::redis::Client) -> RedisResult<MultiplexedConnection> {
        client.get_multiplexed_async_connection_with_config(&self.connection_config).await
    }

    fn replace(&self, address: String, connection: MultiplexedConnection) -> Master {
        let mut master = lock(&self.master);
        let generation = master.as_ref().map_or(0, |current| current.generation + 1);
        let fresh = Master { generation, address, connection };
        *master = Some(fresh.clone());
        fresh
    }

    fn forget(&self, generation: u64, error: &RedisError) {
        let mut master = lock(&self.master);
        if master.as_ref().is_some_and(|current| current.generation == generation) {
            *master = None;
            drop(master);
            tracing::info!(error = %error, "redis master lost, asking the sentinels again");
        }
    }

    /// Switches to the master the sentinels name now when it is another server.
    async fn recheck(&self) {
        // A lookup under way answers the same question.
        let Ok(mut sentinels) = self.sentinels.try_lock() else { return };
        let (address, client) = match self.ask_sentinels(&mut sentinels).await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::debug!(error = %error, "sentinels not asked, keeping the current master");
                return;
            }
        };
        let previous = self.current().map(|current| current.address);
        if previous.as_deref() == Some(address.as_str()) {
            return;
        }
        match self.connect(&client).await {
            Ok(connection) => {
                tracing::info!(previous = ?previous, master = %address, "redis master moved, switching to it");
                self.replace(address, connection);
            }
            Err(error) => {
                tracing::warn!(master = %address, error = %error, "new redis master not reachable yet")
            }
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, command: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let Master { generation, mut connection, .. } = self.master().await?;
            let result = connection.req_packed_command(command).await;
            self.observe(generation, result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let Master { generation, mut connection, .. } = self.master().await?;
            let result = connection.req_packed_commands(pipeline, offset, count).await;
            // A pipeline with errors ignored reports READONLY inside its values.
            let demoted = result.as_ref().is_ok_and(|values| {
                values.iter().any(|value| {
                    matches!(value, Value::ServerError(error) if error.kind() == Some(ServerErrorKind::ReadOnly))
                })
            });
            if demoted {
                self.observe::<()>(
                    generation,
                    Err(RedisError::from((ServerErrorKind::ReadOnly.into(), "master demoted"))),
                )
                .ok();
            }
            self.observe(generation, result)
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.db
    }
}

fn master_moved_or_gone(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly) | ErrorKind::Server(ServerErrorKind::MasterDown)
        )
}

/// The address of one node, over TLS under REDIS_TLS (the name checked is `host`).
fn connection_addr(config: &RedisConfig, host: &str, port: u16) -> ConnectionAddr {
    if config.tls {
        ConnectionAddr::TcpTls { host: host.to_string(), port, insecure: false, tls_params: None }
    } else {
        ConnectionAddr::Tcp(host.to_string(), port)
    }
}

/// The CAs trusted for the servers' certificates: REDIS_TLS_CA_FILE, else the system roots.
fn certificates(config: &RedisConfig) -> RedisResult<TlsCertificates> {
    let root_cert = match &config.tls_ca_file {
        Some(path) => Some(read_ca_bundle("REDIS_TLS_CA_FILE", path).map_err(|error| {
            RedisError::from((ErrorKind::InvalidClientConfig, "unusable CA bundle", error.to_string()))
        })?),
        None => None,
    };
    Ok(TlsCertificates { client_tls: None, root_cert })
}

fn redis_settings(config: &RedisConfig) -> ::redis::RedisConnectionInfo {
    let mut settings = ::redis::RedisConnectionInfo::default().set_db(config.db);
    if let Some(username) = &config.username {
        settings = settings.set_username(username);
    }
    if !config.password.is_empty() {
        settings = settings.set_password(config.password.expose());
    }
    settings
}

/// A client for one server (host, port, database, ACL user and password, TLS); it
/// connects lazily. Under REDIS_TLS the certificate must be issued for REDIS_HOST.
fn standalone_client(config: &RedisConfig, host: &str, port: u16) -> RedisResult<::redis::Client> {
    let info = connection_addr(config, host, port)
        .into_connection_info()?
        .set_redis_settings(redis_settings(config));
    if !config.tls {
        return ::redis::Client::open(info);
    }
    ::redis::Client::build_with_tls(info, certificates(config)?)
}

/// A cluster client from the seed nodes; the ACL user, password and TLS apply to every
/// node it discovers.
fn cluster_client(config: &RedisConfig, seed_nodes: &[NodeAddress]) -> RedisResult<ClusterClient> {
    let nodes = seed_nodes
        .iter()
        .map(|node| connection_addr(config, &node.host, node.port).into_connection_info())
        .collect::<RedisResult<Vec<_>>>()?;
    let mut builder = ClusterClient::builder(nodes)
        .connection_timeout(config.timeout)
        .response_timeout(config.timeout)
        .retries(2);
    if let Some(username) = &config.username {
        builder = builder.username(username);
    }
    if !config.password.is_empty() {
        builder = builder.password(config.password.expose());
    }
    if config.tls {
        builder = builder.tls(TlsMode::Secure).certs(certificates(config)?);
    }
    builder.build()
}
