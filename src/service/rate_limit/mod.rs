//! Per-user event budgets: RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE tokens per user id,
//! refilled evenly over the minute (GCRA). Anonymous events spend a budget per caller
//! identity instead. The budgets live in Redis, shared by every replica; when Redis
//! fails, each replica falls back to its own local limiter (the governor crate) and
//! says so once, then once more when Redis is back. After a failed round trip Redis is
//! skipped for a short cool-down ([`RedisBreaker`]), so callers do not each pay a
//! timeout during an outage.
//!
//! Round trips: a check first spends the tokens this replica leased for the key earlier
//! ([`leases`]); only what they do not cover goes to Redis, topped up by a new lease
//! (RATE_LIMIT_LEASE_TOKENS in all). A TrackEvents call asks once per budget key for as
//! many tokens as it has events of that key, and gets the first k of them when only k
//! are left; all keys of a call, and the checks of every other call waiting at the same
//! moment, go to Redis as one pipeline (see `repository::redis::budget_batch`).
//!
//! Exactness: every token is granted by Redis, atomically per key, so across replicas
//! sharing Redis the events accepted per user within any time window are at most the
//! budget (the GCRA burst, equal to the capacity) plus what refilled during the window,
//! plus the leased tokens left over from before the window: at most lease_tokens - 1
//! per replica. With lease_tokens = 1 the bound is exact (+ 0); the batching adds
//! nothing either way.
//!
//! The fallback cannot see what was spent in Redis or on other replicas, so each replica
//! gets the budget divided by RATE_LIMIT_EXPECTED_REPLICAS (at least 1 event): with that
//! many replicas a user gets about one budget per minute in total during an outage, not
//! one per replica. A failed pipeline sends all of its checks to the fallback.

mod leases;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::metrics;
use crate::repository::redis::{Grant, RedisBreaker, SharedBudgets, Spend};
use leases::Leases;

/// Checks and spends event budgets. Unlimited when configured with 0.
pub struct RateLimiter {
    budget: Option<NonZeroU32>,
    local: Option<DefaultKeyedRateLimiter<String>>,
    shared: Option<SharedBudgets>,
    leases: Leases,
    clock: DefaultClock,
    breaker: RedisBreaker,
}

impl RateLimiter {
    /// A limiter local to this replica; `events_per_minute` of 0 disables limiting.
    pub fn per_minute(events_per_minute: u32) -> Self {
        let budget = NonZeroU32::new(events_per_minute);
        Self {
            budget,
            local: budget.map(|budget| DefaultKeyedRateLimiter::keyed(Quota::per_minute(budget))),
            shared: None,
            leases: Leases::new(1),
            clock: DefaultClock::default(),
            breaker: RedisBreaker::default(),
        }
    }

    /// A limiter whose budgets are shared through Redis, taken `lease_tokens` at a time
    /// (1: each token when it is spent); the local fallback gives each of
    /// `expected_replicas` replicas its share of the budget (at least 1 event).
    pub(crate) fn shared_per_minute(
        events_per_minute: u32,
        expected_replicas: u32,
        lease_tokens: u32,
        shared: SharedBudgets,
    ) -> Self {
        let fallback_share = NonZeroU32::new(events_per_minute)
            .map(|budget| (budget.get() / expected_replicas.max(1)).max(1))
            .and_then(NonZeroU32::new);
        Self {
            shared: Some(shared),
            leases: Leases::new(lease_tokens),
            local: fallback_share.map(|share| DefaultKeyedRateLimiter::keyed(Quota::per_minute(share))),
            ..Self::per_minute(events_per_minute)
        }
    }

    /// Spends one token of `key`'s budget, or says how long until one is available.
    pub(crate) async fn check(&self, key: &str) -> Result<(), Duration> {
        let grant = self.check_each(vec![(key.to_string(), 1)]).await.pop();
        match grant {
            Some(Grant { granted: 0, wait }) => Err(wait),
            _ => Ok(()),
        }
    }

    /// Spends up to `tokens` tokens of each key's budget (one per event): first from the
    /// key's lease on this replica, the rest in one round trip for all keys. Answers per
    /// key, in order: how many of its tokens were granted (the first ones: its first
    /// events), and when fewer than asked, how long until the next one.
    pub(crate) async fn check_each(&self, demands: Vec<(String, u32)>) -> Vec<Grant> {
        let Some(budget) = self.budget else {
            return demands
                .iter()
                .map(|(_, tokens)| Grant { granted: *tokens, wait: Duration::ZERO })
                .collect();
        };
        let now = Instant::now();
        let mut grants = Vec::with_capacity(demands.len());
        // What the leases did not cover: (index into demands, tokens short, top-up asked).
        let mut shortfalls = Vec::new();
        for (index, (key, tokens)) in demands.iter().enumerate() {
            let taken = self.leases.take(key, *tokens, now);
            grants.push(Grant { granted: taken.tokens, wait: Duration::ZERO });
            if taken.tokens < *tokens {
                shortfalls.push((index, tokens - taken.tokens, taken.top_up));
            }
        }
        let leased = demands.len() - shortfalls.len();
        if leased > 0 {
            metrics::record_rate_limit_leased_checks(leased as u64);
        }
        if shortfalls.is_empty() {
            return grants;
        }
        if let Some(shared) = self.redis_if_not_cooling_down() {
            let interval = Duration::from_secs(60) / budget.get();
            let spends = shortfalls
                .iter()
                .map(|&(index, shortfall, top_up)| Spend {
                    key: demands[index].0.clone(),
                    tokens: shortfall.saturating_add(top_up),
                    capacity: budget.get(),
                    interval,
                })
                .collect();
            match shared.spend(spends).await {
                Ok(answers) => {
                    if self.breaker.record_success() {
                        tracing::info!("redis is reachable again, rate limits shared across replicas again");
                    }
                    let now = Instant::now();
                    for ((index, shortfall, top_up), answer) in shortfalls.into_iter().zip(answers) {
                        let for_events = answer.granted.min(shortfall);
                        grants[index].granted += for_events;
                        if for_events < shortfall {
                            grants[index].wait = answer.wait;
                        }
                        if top_up > 0 {
                            self.leases.refill(&demands[index].0, answer.granted - for_events, now);
                        }
                    }
                    return grants;
                }
                Err(error) => {
                    if self.breaker.record_failure() {
                        metrics::record_rate_limit_fallback();
                        tracing::warn!(error = %error, "redis unreachable, rate limiting per replica until it is back");
                    }
                }
            }
        }
        let now = Instant::now();
        for (index, shortfall, top_up) in shortfalls {
            if top_up > 0 {
                self.leases.refill(&demands[index].0, 0, now);
            }
            let local = self.check_locally(&demands[index].0, shortfall);
            grants[index].granted += local.granted;
            grants[index].wait = local.wait;
        }
        grants
    }

    fn redis_if_not_cooling_down(&self) -> Option<&SharedBudgets> {
        self.shared.as_ref().filter(|_| !self.breaker.is_cooling_down())
    }

    /// Grants `key`'s tokens one at a time from the local limiter until one is refused.
    fn check_locally(&self, key: &str, tokens: u32) -> Grant {
        let Some(limiter) = &self.local else { return Grant { granted: tokens, wait: Duration::ZERO } };
        let key = key.to_string();
        for granted in 0..tokens {
            if let Err(not_until) = limiter.check_key(&key) {
                return Grant { granted, wait: not_until.wait_time_from(self.clock.now()) };
            }
        }
        Grant { granted: tokens, wait: Duration::ZERO }
    }

    /// Forgets local keys whose buckets are full again and expired leases, bounding
    /// memory (call periodically). Redis keys expire on their own.
    pub(crate) fn forget_idle_keys(&self) {
        self.leases.forget_expired(Instant::now());
        if let Some(limiter) = &self.local {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The budget key of an event: its user, or for anonymous events the caller.
pub(crate) fn budget_key(user_id: Option<&str>, caller: &str) -> String {
    match user_id {
        Some(user) => format!("user:{user}"),
        None => format!("anonymous:{caller}"),
    }
}

/// `retry-after` in whole seconds, never 0 (a caller told "0" retries at once).
pub(crate) fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_user_gets_exactly_the_budget_then_a_wait() {
        let limiter = RateLimiter::per_minute(3);
        for _ in 0..3 {
            assert!(limiter.check("user:a").await.is_ok());
        }
        let wait = limiter.check("user:a").await.unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(20), "{wait:?}");
        assert!(limiter.check("user:b").await.is_ok(), "budgets are per key");
    }

    #[tokio::test]
    async fn a_batch_gets_the_tokens_left_for_its_first_events() {
        let limiter = RateLimiter::per_minute(5);
        let grants = limiter.check_each(vec![("user:a".into(), 3), ("user:b".into(), 7)]).await;
        assert_eq!(grants[0], Grant { granted: 3, wait: Duration::ZERO });
        assert_eq!(grants[1].granted, 5, "the whole budget, not nothing");
        assert!(grants[1].wait > Duration::ZERO);
        let grants = limiter.check_each(vec![("user:a".into(), 3)]).await;
        assert_eq!(grants[0].granted, 2, "only 2 tokens left");
        assert!(grants[0].wait > Duration::ZERO && grants[0].wait <= Duration::from_secs(12), "{grants:?}");
    }

    #[tokio::test]
    async fn zero_means_unlimited() {
        let limiter = RateLimiter::per_minute(0);
        for _ in 0..10_000 {
            assert!(limiter.check("user:a").await.is_ok());
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2_001)), 3);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
