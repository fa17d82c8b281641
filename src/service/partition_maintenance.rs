//! The periodic partition task of `serve`: keeps monthly `events` partitions created
//! ahead of time and applies EVENT_RETENTION_DAYS by dropping whole old partitions.

use std::time::Duration;

use chrono::Utc;

use crate::repository::postgres::{partitions, Database};

/// How often `serve` checks partitions and retention.
pub(crate) const PARTITION_MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3_600);

/// Runs one maintenance pass now, then every [`PARTITION_MAINTENANCE_INTERVAL`]. Failures
/// (e.g. a database user without DDL rights, or PostgreSQL down) are logged and retried
/// on the next pass; `migrate` also creates partitions ahead, so serving does not depend on it.
pub(crate) async fn run_partition_maintenance(
    database: Database,
    event_max_age: chrono::Duration,
    event_retention: Option<chrono::Duration>,
) {
    let mut interval = tokio::time::interval(PARTITION_MAINTENANCE_INTERVAL);
    loop {
        interval.tick().await;
        match partitions::maintain_partitions(&database, Utc::now(), event_max_age, event_retention).await {
            Ok((created, dropped)) => {
                if created > 0 || !dropped.is_empty() {
                    tracing::info!(created, dropped = ?dropped, "event partitions maintained");
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "event partition maintenance failed, retrying next pass")
            }
        }
    }
}
