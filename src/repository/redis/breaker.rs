//! The "Redis is down" breaker shared by every Redis user (the count cache, the shared
//! event budgets): after a failed call Redis is skipped for a short cool-down, so
//! callers do not each pay a timeout during an outage, and the first failure and the
//! first success after it are reported once each, so the log gets one warning per
//! outage instead of one per request. Callers decide what to log and count.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long Redis is bypassed after a failed call.
const COOL_DOWN: Duration = Duration::from_secs(1);

/// One breaker per Redis user; lock-free, shared by reference.
#[derive(Debug)]
pub(crate) struct RedisBreaker {
    cool_down: Duration,
    /// Creation time, the origin of `skip_until_millis`.
    epoch: Instant,
    skip_until_millis: AtomicU64,
    /// Whether the last call failed (an outage is under way).
    down: AtomicBool,
}

impl Default for RedisBreaker {
    fn default() -> Self {
        Self::with_cool_down(COOL_DOWN)
    }
}

impl RedisBreaker {
    pub(crate) fn with_cool_down(cool_down: Duration) -> Self {
        Self {
            cool_down,
            epoch: Instant::now(),
            skip_until_millis: AtomicU64::new(0),
            down: AtomicBool::new(false),
        }
    }

    /// Whether Redis failed less than the cool-down ago: skip it without trying.
    pub(crate) fn is_cooling_down(&self) -> bool {
        self.now_millis() < self.skip_until_millis.load(Ordering::Relaxed)
    }

    /// Records a successful call. True when it ends an outage (say once that Redis is
    /// back).
    pub(crate) fn record_success(&self) -> bool {
        self.down.swap(false, Ordering::Relaxed)
    }

    /// Records a failed call and starts the cool-down. True when it starts an outage
    /// (warn once).
    pub(crate) fn record_failure(&self) -> bool {
        let until = self.epoch.elapsed() + self.cool_down;
        self.skip_until_millis.store(until.as_millis() as u64, Ordering::Relaxed);
        !self.down.swap(true, Ordering::Relaxed)
    }

    fn now_millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_opens_the_cool_down_and_is_reported_once_per_outage() {
        let breaker = RedisBreaker::default();
        assert!(!breaker.is_cooling_down(), "closed until a failure");
        assert!(!breaker.record_success(), "no outage to end");
        assert!(breaker.record_failure(), "the first failure starts an outage");
        assert!(breaker.is_cooling_down());
        assert!(!breaker.record_failure(), "later failures of the same outage stay quiet");
        assert!(breaker.record_success(), "the first success ends it");
        assert!(!breaker.record_success());
        assert!(breaker.record_failure(), "a new outage is reported again");
    }

    #[test]
    fn the_cool_down_ends_on_its_own() {
        let breaker = RedisBreaker::with_cool_down(Duration::from_millis(20));
        breaker.record_failure();
        assert!(breaker.is_cooling_down());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!breaker.is_cooling_down(), "Redis is tried again after the cool-down");
        assert!(breaker.record_success(), "still one outage until a call succeeds");
    }
}
