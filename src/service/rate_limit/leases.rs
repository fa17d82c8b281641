//! Tokens of the shared budgets that Redis granted to this replica ahead of use. When a
//! check has to ask Redis anyway, it asks for `lease_tokens - 1` tokens more than its
//! events need and keeps what it gets here, so the key's next events on this replica are
//! answered without a round trip. A key holds at most `lease_tokens - 1` such tokens on a
//! replica (more are dropped, never kept), one check per key and replica tops the lease
//! up at a time, and a lease unused for [`LEASE_LIFETIME`] is dropped.
//!
//! Exactness: every token is still granted by Redis, atomically per key; a token spent
//! here left the shared budget when it was leased. So in any time window a key's accepted
//! events are at most what Redis granted during the window plus what was leased before it
//! and spent in it: at most `lease_tokens - 1` per replica. Dropping a lease (expiry,
//! the key cap, a restart) can only refuse early, never admit more.

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// How long leased tokens stay usable; long enough that a key sending an event every few
/// seconds spends a whole lease, short enough that idle keys free their memory soon.
pub(super) const LEASE_LIFETIME: Duration = Duration::from_secs(60);
/// The most keys holding a lease on one replica (about 100 bytes each); beyond, a check
/// keeps no lease and the key asks Redis for every event, as without leases.
const MAX_LEASED_KEYS: usize = 256 * 1024;

struct Lease {
    tokens: u32,
    expires: Instant,
    /// A check is asking Redis for this key's next lease; the other checks of the key
    /// meanwhile ask for their own tokens only, so concurrent checks of one key do not
    /// each take a lease that the key could not hold.
    topping_up: bool,
}

/// What a check got from its key's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Taken {
    /// Tokens spent from the lease.
    pub(super) tokens: u32,
    /// Tokens to ask Redis for beyond the check's own, for the next lease; when not 0,
    /// the check must end the top-up with [`Leases::refill`], whatever Redis answers.
    pub(super) top_up: u32,
}

/// This replica's leased tokens, per budget key (a sharded map, so concurrent checks of
/// different keys rarely wait for each other).
pub(super) struct Leases {
    spare_per_key: u32,
    keys: DashMap<String, Lease>,
}

impl Leases {
    /// Leases of `lease_tokens` tokens: one for the event that asked, the rest kept. 1 (or
    /// 0) keeps nothing: every token is asked for when it is spent.
    pub(super) fn new(lease_tokens: u32) -> Self {
        Self { spare_per_key: lease_tokens.saturating_sub(1), keys: DashMap::new() }
    }

    /// Spends up to `wanted` of `key`'s leased tokens. When they do not cover `wanted` and
    /// no other check of the key is topping up its lease, this check does.
    pub(super) fn take(&self, key: &str, wanted: u32, now: Instant) -> Taken {
        if self.spare_per_key == 0 || wanted == 0 {
            return Taken { tokens: 0, top_up: 0 };
        }
        let fresh = || Lease { tokens: 0, expires: now + LEASE_LIFETIME, topping_up: false };
        let mut lease = match self.keys.get_mut(key) {
            Some(lease) => lease,
            // Counting the keys locks every shard in turn: done only for a key not leased.
            None if self.keys.len() < MAX_LEASED_KEYS => {
                self.keys.entry(key.to_string()).or_insert_with(fresh)
            }
            None => return Taken { tokens: 0, top_up: 0 },
        };
        if lease.expires <= now {
            *lease = fresh();
        }
        let tokens = lease.tokens.min(wanted);
        lease.tokens -= tokens;
        let top_up = if tokens < wanted && !lease.topping_up {
            lease.topping_up = true;
            self.spare_per_key
        } else {
            0
        };
        drop(lease);
        self.forget_if_empty(key);
        Taken { tokens, top_up }
    }

    /// Ends `key`'s top-up, keeping `tokens` that Redis granted beyond the check's events
    /// (0 when it granted none or failed) for the key's next events, up to the per-key
    /// cap; the rest are dropped.
    pub(super) fn refill(&self, key: &str, tokens: u32, now: Instant) {
        let Some(mut lease) = self.keys.get_mut(key) else { return };
        let held = if lease.expires > now { lease.tokens } else { 0 };
        lease.tokens = held.saturating_add(tokens).min(self.spare_per_key);
        lease.expires = now + LEASE_LIFETIME;
        lease.topping_up = false;
        drop(lease);
        self.forget_if_empty(key);
    }

    /// Frees `key` when it holds no token and no check is topping it up.
    fn forget_if_empty(&self, key: &str) {
        self.keys.remove_if(key, |_, lease| lease.tokens == 0 && !lease.topping_up);
    }

    /// Drops the expired leases, freeing their keys' memory (call periodically).
    pub(super) fn forget_expired(&self, now: Instant) {
        self.keys.retain(|_, lease| lease.expires > now);
        self.keys.shrink_to_fit();
    }

    #[cfg(test)]
    fn leased_keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(tokens: u32, top_up: u32) -> Taken {
        Taken { tokens, top_up }
    }

    #[test]
    fn kept_tokens_are_spent_once_and_capped_per_key() {
        let leases = Leases::new(10);
        let now = Instant::now();
        assert_eq!(leases.take("user:a", 3, now), taken(0, 9), "nothing leased yet: top up");
        leases.refill("user:a", 12, now);
        assert_eq!(leases.take("user:a", 100, now), taken(9, 9), "at most lease_tokens - 1 kept per key");
        leases.refill("user:a", 5, now);
        assert_eq!(leases.take("user:b", 5, now), taken(0, 9), "per key");
        leases.refill("user:b", 0, now);
        assert_eq!(leases.take("user:a", 2, now), taken(2, 0), "covered: no round trip");
        assert_eq!(leases.take("user:a", 3, now), taken(3, 0));
        assert_eq!(leases.leased_keys(), 0, "a spent lease frees its key");
    }

    #[test]
    fn one_check_of_a_key_tops_up_at_a_time() {
        let leases = Leases::new(10);
        let now = Instant::now();
        assert_eq!(leases.take("user:a", 1, now), taken(0, 9));
        assert_eq!(leases.take("user:a", 1, now), taken(0, 0), "another check is topping up");
        assert_eq!(leases.take("user:a", 4, now), taken(0, 0));
        leases.refill("user:a", 9, now);
        assert_eq!(leases.take("user:a", 1, now), taken(1, 0));
        assert_eq!(leases.take("user:a", 9, now), taken(8, 9), "spent: the next check tops up");
        leases.refill("user:a", 0, now);
        assert_eq!(leases.leased_keys(), 0, "a failed top-up leaves nothing behind");
        assert_eq!(leases.take("user:a", 1, now), taken(0, 9));
    }

    #[test]
    fn a_lease_expires_unused_and_so_does_a_top_up_that_never_ended() {
        let leases = Leases::new(10);
        let then = Instant::now();
        leases.take("user:a", 1, then);
        leases.refill("user:a", 9, then);
        leases.take("user:b", 1, then);
        let later = then + LEASE_LIFETIME;
        assert_eq!(leases.take("user:a", 1, later), taken(0, 9), "expired tokens are not spent");
        leases.refill("user:a", 2, later);
        assert_eq!(leases.take("user:a", 9, later), taken(2, 9), "nor topped up");
        assert_eq!(leases.take("user:b", 1, later), taken(0, 9), "an abandoned top-up expires too");
        leases.take("user:c", 1, then);
        leases.refill("user:c", 4, then);
        leases.forget_expired(later);
        assert_eq!(leases.leased_keys(), 2, "c's lease is dropped; a's and b's were renewed");
    }

    #[test]
    fn one_token_leases_keep_nothing() {
        let leases = Leases::new(1);
        let now = Instant::now();
        assert_eq!(leases.take("user:a", 5, now), taken(0, 0));
        leases.refill("user:a", 5, now);
        assert_eq!(leases.take("user:a", 5, now), taken(0, 0));
        assert_eq!(leases.leased_keys(), 0);
    }

    #[test]
    fn the_number_of_leased_keys_is_bounded() {
        let leases = Leases::new(2);
        let now = Instant::now();
        for user in 0..(2 * MAX_LEASED_KEYS) {
            let key = format!("user:{user}");
            let top_up = leases.take(&key, 1, now).top_up;
            if top_up > 0 {
                leases.refill(&key, top_up, now);
            }
        }
        let kept = leases.leased_keys();
        assert!(kept <= MAX_LEASED_KEYS && kept > MAX_LEASED_KEYS * 9 / 10, "{kept}");
    }
}
