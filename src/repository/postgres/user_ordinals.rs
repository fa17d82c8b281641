//! This replica's memory of `user_ordinals`: which bit a user id has in the user bitmaps.
//! A unique-user count must put every user not folded yet (the pending pairs and the raw
//! edge hours: thousands of ids per call at 10M events) on the bitmaps' ordinals; reading
//! them from `user_ordinals` was one index probe per id in every call, most of a cached
//! count's time. An id's ordinal never changes while it exists: only an erasure deletes it
//! (the user may come back later under a new one), and every erasure transaction bumps
//! the erasure generation. So each remembered ordinal carries the generation it was read
//! under, and is used only by a count whose own snapshot reads that same generation.
//!
//! Bounded: at most [`CAPACITY`] ids, the least recently useful evicted first (the
//! quick_cache crate's CLOCK-Pro), about 100 bytes each.

use std::sync::Arc;

use quick_cache::sync::Cache;

/// Ids remembered per replica: about 20 MB at most. The ids a count needs are those
/// active in the last hours (the pending pairs) and at the range's edges, so the active
/// users of a busy day fit.
const CAPACITY: usize = 200_000;

/// Remembered ordinals; cheap to clone (one shared cache per replica).
#[derive(Clone)]
pub struct UserOrdinals {
    /// user id -> (ordinal, erasure generation it was read under).
    cache: Arc<Cache<String, (u32, i64)>>,
}

impl Default for UserOrdinals {
    fn default() -> Self {
        Self { cache: Arc::new(Cache::new(CAPACITY)) }
    }
}

impl std::fmt::Debug for UserOrdinals {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("UserOrdinals").field("remembered", &self.cache.len()).finish()
    }
}

impl UserOrdinals {
    /// The ordinal of `user_id` as read under erasure `generation`, if remembered.
    pub(crate) fn get(&self, user_id: &str, generation: i64) -> Option<u32> {
        match self.cache.get(user_id) {
            Some((ordinal, read_under)) if read_under == generation => Some(ordinal),
            _ => None,
        }
    }

    /// Remembers `user_id`'s ordinal, read in a snapshot of erasure `generation`.
    pub(crate) fn remember(&self, user_id: String, ordinal: u32, generation: i64) {
        self.cache.insert(user_id, (ordinal, generation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinal_is_used_only_under_the_generation_it_was_read_under() {
        let ordinals = UserOrdinals::default();
        ordinals.remember("alice".into(), 7, 3);
        assert_eq!(ordinals.get("alice", 3), Some(7));
        assert_eq!(ordinals.get("alice", 4), None, "an erasure since: alice may have a new ordinal");
        assert_eq!(ordinals.get("alice", 2), None, "a snapshot older than the reading");
        assert_eq!(ordinals.get("bob", 3), None);
        ordinals.remember("alice".into(), 9, 4);
        assert_eq!(ordinals.get("alice", 4), Some(9));
    }
}
