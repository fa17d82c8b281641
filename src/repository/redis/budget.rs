//! Event budgets shared by every replica: one GCRA state per budget key in Redis
//! (`{REDIS_KEY_PREFIX}:ratelimit:{key}`, expiring once the budget is full again),
//! checked and spent by one atomic Lua script, timed by Redis' own clock so replicas'
//! clocks need not agree.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::config::RedisConfig;
use crate::metrics;

/// GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp):
/// `tat` is the theoretical arrival time; a request of `cost` tokens is allowed when
/// `tat + cost * interval - capacity * interval <= now`. Times in microseconds.
/// Returns {1, 0} when allowed, {0, wait_microseconds} when not, {0, -1} when `cost`
/// exceeds the capacity (never allowed).
const GCRA_SCRIPT: &str = r"
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
if cost > capacity then return {0, -1} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allowed_at = new_tat - capacity * interval
if allowed_at > now then return {0, allowed_at - now} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
";

/// The answer of one shared budget check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BudgetDecision {
    Allowed,
    /// Not before this wait.
    Wait(Duration),
    /// More tokens asked for than the budget holds.
    TooLarge,
}

/// A handle to the shared budgets; cheap to clone. The connection is lazy.
#[derive(Clone)]
pub(crate) struct SharedBudgets {
    inner: Arc<BudgetsInner>,
}

struct BudgetsInner {
    client: ::redis::Client,
    connection: OnceCell<ConnectionManager>,
    key_prefix: String,
    timeout: Duration,
    script: ::redis::Script,
}

impl SharedBudgets {
    /// `None` when Redis is not configured (REDIS_HOST empty).
    pub(crate) fn from_config(config: Option<&RedisConfig>) -> Result<Option<Self>, ::redis::RedisError> {
        let Some(config) = config else {
            return Ok(None);
        };
        Ok(Some(Self {
            inner: Arc::new(BudgetsInner {
                client: super::client(config)?,
                connection: OnceCell::new(),
                key_prefix: config.key_prefix.clone(),
                timeout: config.timeout,
                script: ::redis::Script::new(GCRA_SCRIPT),
            }),
        }))
    }

    /// Spends `cost` tokens of `key`'s budget of `capacity` tokens refilled one per
    /// `interval`, atomically across replicas.
    pub(crate) async fn spend(
        &self,
        key: &str,
        cost: u32,
        capacity: u32,
        interval: Duration,
    ) -> Result<BudgetDecision, ::redis::RedisError> {
        let started = Instant::now();
        let result = self.run_script(key, cost, capacity, interval).instrument(redis_span()).await;
        metrics::record_redis_call("rate_limit", started.elapsed(), result.is_err());
        let (allowed, wait_microseconds) = result?;
        Ok(match (allowed, wait_microseconds) {
            (1, _) => BudgetDecision::Allowed,
            (_, wait) if wait < 0 => BudgetDecision::TooLarge,
            (_, wait) => BudgetDecision::Wait(Duration::from_micros(wait as u64)),
        })
    }

    async fn run_script(
        &self,
        key: &str,
        cost: u32,
        capacity: u32,
        interval: Duration,
    ) -> Result<(i64, i64), ::redis::RedisError> {
        let inner = &self.inner;
        let mut connection = inner
            .connection
            .get_or_try_init(|| async {
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(inner.timeout))
                    .set_response_timeout(Some(inner.timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(inner.client.clone(), manager_config).await
            })
            .await?
            .clone();
        inner
            .script
            .key(format!("{}:ratelimit:{key}", inner.key_prefix))
            .arg(interval.as_micros().max(1) as u64)
            .arg(capacity)
            .arg(cost)
            .invoke_async(&mut connection)
            .await
    }
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
