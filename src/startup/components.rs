//! The components of the service built from the configuration, in one place: the
//! PostgreSQL pools, the count cache, the rate limiter, the PII cipher, readiness, the
//! group-commit writer and the use cases over them. `serve` and `migrate` (and the
//! benchmarks) build them here; each component gets its own configuration section.
//! Background work runs under one [`BackgroundTasks`], so stopping is: cancel, drain the
//! ingest queue, wait for every task, close the pool.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, PiiConfig, RateLimitConfig, RedisConfig};
use crate::repository::postgres::replica::ReadReplica;
use crate::repository::postgres::{Database, EventRepository};
use crate::repository::redis::{CountCache, SharedBudgets};
use crate::security::pii::PiiCipher;
use crate::security::subject::SubjectHasher;
use crate::service::ingest::{self, IngestSettings, IngestWriter};
use crate::service::rate_limit::RateLimiter;
use crate::service::readiness::ReadinessMonitor;
use crate::service::AnalyticsService;

/// The tasks that run beside the servers, all tracked so shutdown can wait for them.
/// A task spawned with [`BackgroundTasks::spawn_until`] ends when its token is cancelled;
/// [`BackgroundTasks::stop`] cancels the root token and waits for every task.
#[derive(Clone, Debug, Default)]
pub struct BackgroundTasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl BackgroundTasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tracker, for components that spawn their own tasks (the ingest writer).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// A token cancelled at the latest when the tasks stop; cancel it earlier to end
    /// the tasks spawned with it first.
    pub fn child_token(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Runs `task` until it returns or the tasks stop.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.spawn_until(&self.stop, task);
    }

    /// Runs `task` until it returns or `token` is cancelled.
    pub fn spawn_until(&self, token: &CancellationToken, task: impl Future<Output = ()> + Send + 'static) {
        let token = token.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// Runs `task` to its end (it watches its own stop signal, e.g. a graceful server).
    pub fn spawn_to_end(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// Cancels every task spawned with a token (tasks running to their own end go on).
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Cancels every task and waits until all have ended.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The built components of one process.
pub struct Components {
    /// The read pool (counts, identities, readiness, partitions, folding).
    pub database: Database,
    /// The hot standby counts may read (POSTGRES_READ_HOST), when configured.
    pub read_replica: Option<ReadReplica>,
    pub readiness: ReadinessMonitor,
    pub service: Arc<AnalyticsService>,
    pub tasks: BackgroundTasks,
    ingest_writer: IngestWriter,
}

impl Components {
    /// Everything `serve` runs with: the Redis cache and shared budgets when Redis is
    /// configured, PII encryption when PII_KEYS_FILE is set, the keyed hash of user ids when
    /// SUPPRESSION_KEY_FILE is set (the files are read now).
    pub fn build(config: &Config) -> anyhow::Result<Self> {
        let cache = count_cache(config.redis.as_ref())?;
        let rate_limiter = rate_limiter(&config.rate_limit, config.redis.as_ref())?;
        let pii = pii_cipher(&config.pii)?;
        let subjects = config.pii.subject_hasher()?;
        if subjects.is_none() {
            tracing::info!("SUPPRESSION_KEY_FILE not set: erasure and access requests (AnalyticsAdminService) answer FAILED_PRECONDITION");
        }
        Ok(Self::new(config, cache, rate_limiter, pii, subjects))
    }

    /// The components of a one-shot command that records events of its own (`migrate`):
    /// no cache, no rate limit, no PII keys (its events hold no personal data).
    pub fn for_command(config: &Config) -> Self {
        Self::new(config, CountCache::disabled(), RateLimiter::per_minute(0), PiiCipher::disabled(), None)
    }

    /// The pools, readiness, the group-commit writer (started now) and the use cases,
    /// over the given cache, rate limiter, PII cipher and keyed hash of user ids.
    pub fn new(
        config: &Config,
        cache: CountCache,
        rate_limiter: RateLimiter,
        pii: PiiCipher,
        subjects: Option<SubjectHasher>,
    ) -> Self {
        let tasks = BackgroundTasks::new();
        let database = Database::connect_lazy(&config.postgres);
        let read_replica = config.postgres.read_replica.as_ref().map(|replica| {
            tracing::info!(host = %replica.host, port = replica.port, max_connections = replica.max_connections, "read replica on: counts read it when it has replayed the primary's position");
            ReadReplica::connect_lazy(&config.postgres, replica)
        });
        let readiness = ReadinessMonitor::new(database.clone(), config.server.readiness_requires_database);
        let events =
            EventRepository::new(Database::connect_lazy_for_ingest(&config.postgres)).with_pii(pii.clone());
        let (ingest_queue, ingest_writer) = ingest::start(
            events,
            IngestSettings::from_config(&config.ingest),
            readiness.database_health(),
            tasks.tracker(),
        );
        let service = Arc::new(
            AnalyticsService::new(database.clone(), ingest_queue, cache, rate_limiter, pii, &config.events)
                .with_subject_hasher(subjects)
                .with_read_replica(read_replica.clone()),
        );
        Self { database, read_replica, readiness, service, tasks, ingest_writer }
    }

    /// Stops the background tasks, writes what is still queued for a group commit
    /// (within `drain`), then closes the pools.
    pub async fn shutdown(self, drain: Duration) {
        let Components { database, read_replica, readiness: _, service: _, tasks, ingest_writer } = self;
        tasks.cancel();
        ingest_writer.stop(drain).await;
        tasks.stop().await;
        database.close().await;
        if let Some(read_replica) = read_replica {
            read_replica.close().await;
        }
    }
}

/// The count cache: on when Redis is configured and REDIS_CACHE_TTL is not 0.
fn count_cache(redis: Option<&RedisConfig>) -> anyhow::Result<CountCache> {
    let cache = CountCache::from_config(redis).context(
        "invalid redis settings (REDIS_MODE, REDIS_HOST, REDIS_PORT, REDIS_NODES, REDIS_TLS_CA_FILE)",
    )?;
    match redis {
        Some(redis) if cache.is_enabled() => {
            tracing::info!(topology = %redis.topology, tls = redis.tls, ttl_seconds = redis.cache_ttl.unwrap_or_default().as_secs(), "redis cache on")
        }
        _ => tracing::info!("redis not configured (REDIS_HOST empty or REDIS_CACHE_TTL=0): count cache off"),
    }
    Ok(cache)
}

/// The rate limiter: Redis-shared when Redis is configured, per replica otherwise.
fn rate_limiter(limits: &RateLimitConfig, redis: Option<&RedisConfig>) -> anyhow::Result<RateLimiter> {
    let per_minute = limits.events_per_user_per_minute;
    let shared = SharedBudgets::from_config(redis).context(
        "invalid redis settings (REDIS_MODE, REDIS_HOST, REDIS_PORT, REDIS_NODES, REDIS_TLS_CA_FILE)",
    )?;
    Ok(match shared {
        Some(shared) => {
            let lease_tokens = limits.lease_tokens();
            tracing::info!(per_minute, lease_tokens, "rate limits shared through redis, local fallback");
            RateLimiter::shared_per_minute(per_minute, limits.expected_replicas, lease_tokens, shared)
        }
        None => {
            tracing::info!(per_minute, "redis not configured: rate limits per replica");
            RateLimiter::per_minute(per_minute)
        }
    })
}

/// The PII cipher: on with the keys of PII_KEYS_FILE, off (with a warning) without.
pub fn pii_cipher(pii: &PiiConfig) -> anyhow::Result<PiiCipher> {
    Ok(match pii.keys()? {
        Some(keys) => {
            tracing::info!(fields = %pii.fields.join(","), current_key_id = keys.current_key_id(), "pii encryption on");
            PiiCipher::new(pii.fields.clone(), keys)
        }
        None => {
            tracing::warn!("pii encryption off: set PII_KEYS_FILE to encrypt PII_FIELDS at rest");
            PiiCipher::disabled()
        }
    })
}
