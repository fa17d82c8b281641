//! Which server a count call reads: the read replica (POSTGRES_READ_HOST) when it proves
//! it holds every write acknowledged before the call, else the primary. An answer from
//! either is one the primary could have given at some moment of the call, so the
//! never-stale guarantee holds, through the cache too (its stamps are read in the same
//! snapshot as the fresh part, on whichever server that is).
//!
//! Per call with a replica configured: one small statement on the primary (its WAL
//! position), one on the replica (the replay check), then the count's own statements on
//! the replica. A lagging replica (check false) or a failing one (no connection, an
//! error, no answer in time, also in the middle of the count) sends the call to the
//! primary; `analytics_read_replica_fallbacks_total{reason}` counts those calls,
//! `analytics_read_replica_queries_total` the ones the replica answered.

use super::super::{AnalyticsService, ServiceError};
use crate::metrics;
use crate::models::{EventCount, EventFilter, TimeRange};
use crate::repository::postgres::replica::{CountSource, ReplicaRefusal, WalPosition};
use crate::repository::postgres::rollups::RollupRepository;

impl AnalyticsService {
    /// Event counts per name (per bucket of the caller's time zone when grouped).
    #[tracing::instrument(skip_all)]
    pub(crate) async fn event_counts(&self, filter: EventFilter) -> Result<Vec<EventCount>, ServiceError> {
        if let Some(group_by) = filter.group_by {
            group_by.check_bucket_count(filter.range)?;
        }
        let source = self.count_source().await;
        if !source.is_replica() {
            return self.event_counts_from(&self.rollups(source), filter).await;
        }
        match self.event_counts_from(&self.rollups(source), filter.clone()).await {
            Ok(counts) => {
                metrics::record_read_replica_query();
                Ok(counts)
            }
            Err(error) => {
                self.replica_failed(&error);
                self.event_counts_from(&self.rollups(self.database.clone().into()), filter).await
            }
        }
    }

    /// Exact distinct identified users with events in the range.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn unique_users(&self, range: TimeRange) -> Result<i64, ServiceError> {
        let source = self.count_source().await;
        if !source.is_replica() {
            return self.unique_users_from(&self.rollups(source), range).await;
        }
        match self.unique_users_from(&self.rollups(source), range).await {
            Ok(count) => {
                metrics::record_read_replica_query();
                Ok(count)
            }
            Err(error) => {
                self.replica_failed(&error);
                self.unique_users_from(&self.rollups(self.database.clone().into()), range).await
            }
        }
    }

    /// The rollups of `source`, with this replica's remembered user ordinals, summaries
    /// of folded edge hours and decoded folded bitmaps.
    fn rollups(&self, source: CountSource) -> RollupRepository {
        RollupRepository::new(source)
            .with_user_ordinals(self.user_ordinals.clone())
            .with_edge_hours(self.edge_hours.clone())
            .with_folded_bitmaps(self.folded_bitmaps.clone())
    }

    /// Where this call's statements run: a replica connection that has replayed the
    /// primary's WAL position as read now, or the primary.
    async fn count_source(&self) -> CountSource {
        let Some(replica) = &self.read_replica else {
            return self.database.clone().into();
        };
        let refusal = match WalPosition::read(&self.database).await {
            Ok(position) => match replica.session_at(&position).await {
                Ok(source) => return source,
                Err(refusal) => refusal,
            },
            // The primary's own statements retry and answer for it.
            Err(error) => ReplicaRefusal::Unavailable(error),
        };
        let reason = match refusal {
            ReplicaRefusal::Lagging => "lagging",
            ReplicaRefusal::CoolingDown | ReplicaRefusal::NotStandby | ReplicaRefusal::Unavailable(_) => {
                "unavailable"
            }
        };
        metrics::record_read_replica_fallback(reason);
        self.database.clone().into()
    }

    /// A count failed on the replica after its check passed: skip the replica for its
    /// cool-down, and count the call's retry on the primary.
    fn replica_failed(&self, error: &ServiceError) {
        if let Some(replica) = &self.read_replica {
            replica.record_failure(error);
        }
        metrics::record_read_replica_fallback("unavailable");
    }
}
