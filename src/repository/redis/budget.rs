//! Event budgets shared by every replica: one GCRA state per budget key in Redis
//! (`{REDIS_KEY_PREFIX}:ratelimit:{key}`, expiring once the budget is full again),
//! checked and spent by an atomic Lua script, timed by Redis' own clock so replicas'
//! clocks need not agree. Every check goes through the checker task of `budget_batch`,
//! which sends all checks waiting at once as one round trip.
//!
//! One script call decides many keys (up to [`MAX_KEYS_PER_CALL`], in the order given,
//! each key atomically), so Redis runs one script per chunk of checks rather than one
//! per key. Standalone Redis, the only mode configured, lets one script touch keys of
//! any hash slot, so a chunk takes the checks as they come. Redis Cluster would require
//! the keys of one call to share a slot: there, calls would group the checks by
//! `slot::slot` instead, keeping each key's checks in their order.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};
use tokio::sync::OnceCell;
use tracing::Instrument;

use super::budget_batch::Checker;
use crate::config::RedisConfig;
use crate::metrics;

/// GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp) for
/// every key of KEYS, in order: `tat` is the theoretical arrival time; `capacity - (tat -
/// now) / interval` tokens are available now (whole tokens count). ARGV holds three
/// values per key: interval, capacity and cost. Grants as many of the `cost` tokens
/// asked for as are available, possibly none, and spends them. A key given twice is
/// spent twice, the second time from the state the first left. Times in microseconds.
/// Returns, per key, granted and then 0 when all were granted, else the wait in
/// microseconds until the next token.
const GCRA_SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local answers = {}
for index, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[index * 3 - 2])
  local capacity = tonumber(ARGV[index * 3 - 1])
  local cost = tonumber(ARGV[index * 3])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local available = math.floor((now + capacity * interval - tat) / interval)
  if available < 0 then available = 0 end
  local granted = math.min(cost, available)
  local new_tat = tat + granted * interval
  if granted > 0 then
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  end
  answers[index * 2 - 1] = granted
  if granted == cost then
    answers[index * 2] = 0
  else
    answers[index * 2] = new_tat + interval - capacity * interval - now
  end
end
return answers
";

/// The most keys one script call decides, bounding how long one call holds Redis.
const MAX_KEYS_PER_CALL: usize = 256;

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
    client: ::redis::Client,
    connection: OnceCell<ConnectionManager>,
    key_prefix: String,
    timeout: Duration,
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
                client: super::client(config)?,
                connection: OnceCell::new(),
                key_prefix: config.key_prefix.clone(),
                timeout: config.timeout,
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
    /// Runs the script once per chunk of up to [`MAX_KEYS_PER_CALL`] spends, all chunks
    /// in one pipeline (one round trip). Should Redis not know the script (first use,
    /// restart, SCRIPT FLUSH), loads it and runs again only the calls that failed for that
    /// reason (they spent nothing): two more round trips.
    pub(super) async fn spend_all(&self, spends: &[Spend]) -> Result<Vec<Grant>, RedisError> {
        let calls: Vec<&[Spend]> = spends.chunks(MAX_KEYS_PER_CALL).collect();
        let mut connection = self.connection().await?;
        let mut results = self.run_pipeline(&mut connection, calls.iter().copied()).await?;
        let missing: Vec<usize> = (0..results.len()).filter(|&index| is_no_script(&results[index])).collect();
        if !missing.is_empty() {
            self.round_trip(self.script.load_async(&mut connection)).await?;
            let retried =
                self.run_pipeline(&mut connection, missing.iter().map(|&index| calls[index])).await?;
            for (index, result) in missing.into_iter().zip(retried) {
                results[index] = result;
            }
        }
        let mut grants = Vec::with_capacity(spends.len());
        for (call, result) in calls.iter().zip(results) {
            let answers = result?;
            if answers.len() != call.len() * 2 {
                return Err(RedisError::from((ErrorKind::Parse, "unexpected rate limit script answer")));
            }
            grants.extend(answers.chunks(2).map(|answer| Grant {
                granted: u32::try_from(answer[0].max(0)).unwrap_or(u32::MAX),
                wait: Duration::from_micros(answer[1].max(0) as u64),
            }));
        }
        Ok(grants)
    }

    /// One EVALSHA per call, all in one pipeline; each call's answer or error.
    async fn run_pipeline<'a>(
        &self,
        connection: &mut ConnectionManager,
        calls: impl Iterator<Item = &'a [Spend]>,
    ) -> Result<Vec<RedisResult<Vec<i64>>>, RedisError> {
        let mut pipeline = ::redis::pipe();
        pipeline.ignore_errors();
        for call in calls {
            let command = pipeline.cmd("EVALSHA").arg(self.script.get_hash()).arg(call.len());
            for spend in call {
                command.arg(format!("{}:ratelimit:{}", self.key_prefix, spend.key));
            }
            for spend in call {
                command.arg(spend.interval.as_micros().max(1) as u64).arg(spend.capacity).arg(spend.tokens);
            }
        }
        self.round_trip(pipeline.query_async(connection)).await
    }

    /// One round trip to Redis, timed and counted.
    async fn round_trip<T>(&self, call: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
        let started = Instant::now();
        let result = call.instrument(redis_span()).await;
        metrics::record_redis_call("rate_limit", started.elapsed(), result.is_err());
        metrics::record_rate_limit_round_trip();
        result
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        Ok(self
            .connection
            .get_or_try_init(|| async {
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), manager_config).await
            })
            .await?
            .clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A store on the test Redis (TEST_REDIS_PORT, else 6379) under a prefix of its own.
    fn store() -> BudgetStore {
        let port = std::env::var("TEST_REDIS_PORT").ok().and_then(|port| port.parse().ok()).unwrap_or(6379);
        BudgetStore {
            client: ::redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client"),
            connection: OnceCell::new(),
            key_prefix: format!("budget-test-{}", uuid::Uuid::new_v4()),
            timeout: Duration::from_secs(5),
            script: ::redis::Script::new(GCRA_SCRIPT),
        }
    }

    fn spend(key: &str, tokens: u32) -> Spend {
        Spend { key: key.into(), tokens, capacity: 5, interval: Duration::from_secs(60) }
    }

    #[tokio::test]
    async fn a_key_repeated_in_one_call_is_spent_in_order() {
        let store = store();
        let spends = [spend("a", 3), spend("b", 1), spend("a", 3), spend("a", 1), spend("b", 5)];
        let grants = store.spend_all(&spends).await.expect("spend");
        let granted: Vec<u32> = grants.iter().map(|grant| grant.granted).collect();
        assert_eq!(granted, [3, 1, 2, 0, 4]);
        assert_eq!(grants[0].wait, Duration::ZERO);
        assert!(grants[2].wait > Duration::from_secs(50), "{grants:?}");
        assert!(grants[3].wait > Duration::from_secs(50), "{grants:?}");
        assert!(grants[4].wait > Duration::from_secs(50), "{grants:?}");
    }

    #[tokio::test]
    async fn spends_beyond_one_call_keep_their_order() {
        let store = store();
        let spends: Vec<Spend> =
            (0..MAX_KEYS_PER_CALL * 2 + 7).map(|index| spend(&format!("k{}", index % 3), 1)).collect();
        let grants = store.spend_all(&spends).await.expect("spend");
        assert_eq!(grants.len(), spends.len());
        // Each of the three keys grants its first 5 spends, in call order.
        for (index, grant) in grants.iter().enumerate() {
            assert_eq!(grant.granted, u32::from(index < 15), "spend {index}: {grant:?}");
        }
    }
}
