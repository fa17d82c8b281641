//! This replica's memory of decoded folded user bitmaps: the rows of
//! `user_activity_daily` and `user_activity_hourly` that unique-user counts read. A count
//! whose union is not cached reads the bitmap of every whole day and hour of its range: at
//! 10M events, 89 day bitmaps of about 22 KB for 90 days, 2 MB to detoast, send, copy and
//! decode per call, most of them the same rows the previous call read (a dashboard's
//! ranges slide by minutes; every fold changes the stamp of every cached union, so each
//! cached range reads all its rows again after each fold).
//!
//! A count sends the identity of each row it remembers ([`RowIdentity`]: the row
//! version's `xmin`, the transaction that wrote it, and the row's `version`), and the
//! statement returns the bytes only of the rows whose identity differs, in its own
//! snapshot; the others come from here. Never stale: a row's bytes change only by an
//! UPDATE (a fold or an erasure, which also bump `version`) or by a DELETE and a new
//! INSERT (retention, then a fold into the same day), and each writes a new row version
//! with the xmin of its own transaction. Two row versions of a bucket could share an
//! identity only if one transaction wrote the same bucket twice with the same `version`,
//! which no statement here does, or after about four billion transactions (xmin wraps),
//! by which time this replica has long forgotten the older one.
//!
//! Bounded: at most [`CAPACITY_BYTES`] of serialized bitmap bytes (the decoded form is
//! about as large), the least recently useful row evicted first (quick_cache's CLOCK-Pro).

use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;
use roaring::RoaringBitmap;

/// Serialized bytes of the remembered bitmaps: 32 MiB. At 10M events over 90 days a day's
/// bitmap is about 22 KB, so the days of a year's ranges take about 8 MB.
const CAPACITY_BYTES: u64 = 32 * 1024 * 1024;

/// Which rollup a bitmap belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BitmapTable {
    Daily,
    Hourly,
}

impl BitmapTable {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Daily => "user_activity_daily",
            Self::Hourly => "user_activity_hourly",
        }
    }
}

/// Which row version a bitmap was read from: its `xmin` (as a number) and its `version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowIdentity {
    pub(crate) xmin: i64,
    pub(crate) version: i64,
}

/// A folded bitmap row's key as a statement computes it from the row; [`RowIdentity::key`]
/// is the same key computed here.
pub(crate) const ROW_KEY_SQL: &str =
    "extract(epoch FROM bucket_start)::bigint || '/' || xmin::text || '/' || version";

impl RowIdentity {
    /// The key of this row version of the bucket starting at `bucket_start` (Unix
    /// seconds), as [`ROW_KEY_SQL`] computes it.
    pub(crate) fn key(self, bucket_start: i64) -> String {
        format!("{bucket_start}/{}/{}", self.xmin, self.version)
    }
}

/// A remembered bitmap and the row version it was decoded from.
#[derive(Clone, Debug)]
pub(crate) struct RememberedBitmap {
    pub(crate) identity: RowIdentity,
    pub(crate) users: Arc<RoaringBitmap>,
    serialized_bytes: u64,
}

#[derive(Clone)]
struct SerializedBytesWeighter;

impl Weighter<(BitmapTable, i64), RememberedBitmap> for SerializedBytesWeighter {
    fn weight(&self, _key: &(BitmapTable, i64), bitmap: &RememberedBitmap) -> u64 {
        bitmap.serialized_bytes.max(1)
    }
}

/// Remembered bitmaps by (table, bucket start in Unix seconds); cheap to clone (one shared
/// memory per replica).
#[derive(Clone)]
pub struct FoldedBitmapMemory {
    bitmaps: Arc<Cache<(BitmapTable, i64), RememberedBitmap, SerializedBytesWeighter>>,
}

impl Default for FoldedBitmapMemory {
    fn default() -> Self {
        Self { bitmaps: Arc::new(Cache::with_weighter(4_096, CAPACITY_BYTES, SerializedBytesWeighter)) }
    }
}

impl std::fmt::Debug for FoldedBitmapMemory {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FoldedBitmapMemory")
            .field("bitmaps", &self.bitmaps.len())
            .field("bytes", &self.bitmaps.weight())
            .finish()
    }
}

impl FoldedBitmapMemory {
    /// The remembered bitmap of `table`'s bucket starting at `bucket_start`, whatever row
    /// version it came from (the count's statement checks that).
    pub(crate) fn get(&self, table: BitmapTable, bucket_start: i64) -> Option<RememberedBitmap> {
        self.bitmaps.get(&(table, bucket_start))
    }

    /// Remembers `users`, decoded from `serialized_bytes` bytes of the row version
    /// `identity` of `table`'s bucket at `bucket_start`.
    pub(crate) fn remember(
        &self,
        table: BitmapTable,
        bucket_start: i64,
        identity: RowIdentity,
        users: Arc<RoaringBitmap>,
        serialized_bytes: usize,
    ) {
        let bitmap = RememberedBitmap { identity, users, serialized_bytes: serialized_bytes as u64 };
        self.bitmaps.insert((table, bucket_start), bitmap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_remembered_per_table_with_its_row_identity() {
        let memory = FoldedBitmapMemory::default();
        let identity = RowIdentity { xmin: 812, version: 3 };
        memory.remember(BitmapTable::Daily, 86_400, identity, Arc::new(RoaringBitmap::from_iter([1, 5])), 20);
        let remembered = memory.get(BitmapTable::Daily, 86_400).expect("remembered");
        assert_eq!(remembered.identity, identity);
        assert_eq!(remembered.users.len(), 2);
        assert!(memory.get(BitmapTable::Hourly, 86_400).is_none(), "the hour starting there is another row");
        assert_eq!(identity.key(86_400), "86400/812/3");
    }

    #[test]
    fn the_memory_keeps_at_most_its_capacity_in_serialized_bytes() {
        let memory = FoldedBitmapMemory::default();
        let users = Arc::new(RoaringBitmap::new());
        let identity = RowIdentity { xmin: 1, version: 1 };
        for day in 0..100 {
            memory.remember(BitmapTable::Daily, day * 86_400, identity, users.clone(), 1024 * 1024);
        }
        assert!(memory.bitmaps.weight() <= CAPACITY_BYTES);
        let kept = (0..100).filter(|day| memory.get(BitmapTable::Daily, day * 86_400).is_some()).count();
        assert!(kept > 0 && kept <= 32, "kept {kept} bitmaps of 1 MiB in 32 MiB");
    }
}
