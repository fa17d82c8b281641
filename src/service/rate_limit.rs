//! Per-user event budgets: RATE_LIMIT_EVENTS_PER_USER_PER_MINUTE tokens per user id,
//! refilled evenly over the minute (GCRA, the governor crate). Anonymous events spend a
//! budget per caller instead. This limiter is local to the replica.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Checks and spends event budgets. `None` inside means unlimited (configured 0).
pub struct RateLimiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// `events_per_minute` of 0 disables limiting.
    pub fn per_minute(events_per_minute: u32) -> Self {
        let limiter = NonZeroU32::new(events_per_minute)
            .map(|budget| DefaultKeyedRateLimiter::keyed(Quota::per_minute(budget)));
        Self { limiter, clock: DefaultClock::default() }
    }

    /// Spends one token of `key`'s budget, or says how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check_key(&key.to_string()).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets keys whose buckets are full again, bounding memory (call periodically).
    pub fn forget_idle_keys(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The budget key of an event: its user, or for anonymous events the caller.
pub fn budget_key(user_id: Option<&str>, caller: &str) -> String {
    match user_id {
        Some(user) => format!("user:{user}"),
        None => format!("anonymous:{caller}"),
    }
}

/// `retry-after` in whole seconds, never 0 (a caller told "0" retries at once).
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_exactly_the_budget_then_a_wait() {
        let limiter = RateLimiter::per_minute(3);
        for _ in 0..3 {
            assert!(limiter.check("user:a").is_ok());
        }
        let wait = limiter.check("user:a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(20), "{wait:?}");
        assert!(limiter.check("user:b").is_ok(), "budgets are per key");
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = RateLimiter::per_minute(0);
        for _ in 0..10_000 {
            assert!(limiter.check("user:a").is_ok());
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
