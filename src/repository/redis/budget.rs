//! Event budgets shared by every replica: one GCRA state per budget key in Redis
//! (`{REDIS_KEY_PREFIX}:ratelimit:{key}`, expiring once the budget is full again),
//! checked and spent by one atomic Lua script per key, timed by Redis' own clock so
//! replicas' clocks need not agree. Every check goes through the checker task of
//! `budget_batch`, which sends all checks waiting at once as one pipeline of script
//! calls: one round trip for many keys, each key still decided atomically by Redis.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ::redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};
use tracing::Instrument;

use super::budget_batch::Checker;
use super::connection::{LazyConnection, RedisConnection};
use crate::config::RedisConfig;
use crate::metrics;

/// GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp):
/// `tat` is the theoretical arrival time; `capacity - (tat - now) / interval` tokens are
/// available now (whole tokens count). Grants as many of the `cost` tokens asked for as
/// are available, possibly none, and spends them. Times in microseconds. Returns
/// {granted, 0} when all were granted, else {granted, wait_microseconds until the next
/// token}. Touches only KEYS[1], so each call stays on one Redis Cluster slot.
const GCRA_SCRIPT: &str = r"
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local available = math.floor((now + capacity * interval - tat) / interval)
if available < 0 then available = 0 end
local granted = math.min(cost, available)
local new_tat = tat + granted * interval
if granted > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
end
if granted == cost then return {granted, 0} end
return {granted, new_tat + interval - capacity * interval - now}
";

/// A request for `tokens` tokens of `key`'s budget of `capacity` tokens, refilled one
/// per `interval`.
#[derive(Clone, Debug)]
pub(crate) struct Spend {
    pub(crate) key: String,
    pub(crate) tokens: u32,
    pub(crate) capacity: u32,
    pub(crate) interval: Duration,
}

/// The answer to one [`Spend`]: `granted` of the tokens asked for (the first ones), and
/// when fewer than asked, how long until the next token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) granted: u32,
    pub(crate) wait: Duration,
}

/// A handle to the shared budgets; cheap to clone. The connection and the checker task
/// start on first use.
#[derive(Clone)]
pub(crate) struct SharedBudgets {
    store: Arc<BudgetStore>,
    checker: Arc<OnceLock<Checker>>,
}

/// The connection to Redis and the script; runs the pipelines the checker sends.
pub(super) struct BudgetStore {
    connection: LazyConnection,
    key_prefix: String,
    script: ::redis::Script,
}

impl SharedBudgets {
    /// `None` when Redis is not configured (REDIS_HOST empty).
    pub(crate) fn from_config(config: Option<&RedisConfig>) -> Result<Option<Self>, RedisError> {
        let Some(config) = config else {
            return Ok(None);
        };
        Ok(Some(Self {
            store: Arc::new(BudgetStore {
                connection: LazyConnection::new(config)?,
                key_prefix: config.key_prefix.clone(),
                script: ::redis::Script::new(GCRA_SCRIPT),
            }),
            checker: Arc::new(OnceLock::new()),
        }))
    }

    /// Spends what each of `spends` allows, atomically per key across replicas; the
    /// answers are in the order of `spends`. Checks waiting at the same time share one
    /// round trip. Fails as a whole when the round trip fails.
    pub(crate) async fn spend(&self, spends: Vec<Spend>) -> Result<Vec<Grant>, RedisError> {
        if spends.is_empty() {
            return Ok(Vec::new());
        }
        self.checker.get_or_init(|| Checker::start(self.store.clone())).spend(spends).await
    }
}

impl BudgetStore {
    /// Runs the script once per spend, in one pipeline (one round trip) on one server, as
    /// concurrent single calls in a cluster (see [`RedisConnection::query_each`]). Should
    /// Redis not know the script (first use, restart, failover, SCRIPT FLUSH), loads it
    /// (on every node of a cluster) and runs again only the calls that failed for that
    /// reason (they spent nothing): two more round trips.
    pub(super) async fn spend_all(&self, spends: &[Spend]) -> Result<Vec<Grant>, RedisError> {
        let mut connection = self.connection.get().await?;
        let mut results = self.run_pipeline(&mut connection, spends.iter()).await?;
        let missing: Vec<usize> = (0..results.len()).filter(|&index| is_no_script(&results[index])).collect();
        if !missing.is_empty() {
            self.round_trip(self.script.load_async(&mut connection)).await?;
            let retried =
                self.run_pipeline(&mut connection, missing.iter().map(|&index| &spends[index])).await?;
            for (index, result) in missing.into_iter().zip(retried) {
                results[index] = result;
            }
        }
        results
            .into_iter()
            .map(|result| {
                let (granted, wait_microseconds) = result?;
                Ok(Grant {
                    granted: u32::try_from(granted.max(0)).unwrap_or(u32::MAX),
                    wait: Duration::from_micros(wait_microseconds.max(0) as u64),
                })
            })
            .collect()
    }

    async fn run_pipeline(
        &self,
        connection: &mut RedisConnection,
        spends: impl Iterator<Item = &Spend>,
    ) -> Result<Vec<RedisResult<(i64, i64)>>, RedisError> {
        let calls = spends
            .map(|spend| {
                // One key per call: the script never crosses a Cluster hash slot.
                let mut call = ::redis::cmd("EVALSHA");
                call.arg(self.script.get_hash())
                    .arg(1)
                    .arg(format!("{}:ratelimit:{}", self.key_prefix, spend.key))
                    .arg(spend.interval.as_micros().max(1) as u64)
                    .arg(spend.capacity)
                    .arg(spend.tokens);
                call
            })
            .collect();
        self.round_trip(connection.query_each(calls)).await
    }

    /// One round trip to Redis, timed and counted.
    async fn round_trip<T>(&self, call: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
        let started = Instant::now();
        let result = call.instrument(redis_span()).await;
        metrics::record_redis_call("rate_limit", started.elapsed(), result.is_err());
        metrics::record_rate_limit_round_trip();
        result
    }
}

fn is_no_script<T>(result: &RedisResult<T>) -> bool {
    matches!(result, Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
}

fn redis_span() -> tracing::Span {
    tracing::info_span!(
        "redis.command",
        otel.name = "rate_limit",
        otel.kind = "client",
        db.system = "redis",
        db.operation = "EVALSHA"
    )
}
