//! The rollup fold task of `serve`: about once a second, folds what the `events` insert
//! trigger appended (event-count deltas and (hour, user) pairs) into the count rollups and
//! the user bitmaps (src/repository/postgres/fold.rs). Counts stay exact whether or not it
//! runs; it keeps them fast. Its watermark, the time of the last completed pass, is the
//! gauge `analytics_rollup_fold_timestamp_seconds`.

use std::time::Duration;

use crate::metrics;
use crate::repository::postgres::{fold, Database};

/// Pause between two passes.
pub(crate) const ROLLUP_FOLD_INTERVAL: Duration = Duration::from_secs(1);

/// Folds everything pending, then again every [`ROLLUP_FOLD_INTERVAL`]. A failure
/// (PostgreSQL down, schema behind) is logged once until a pass succeeds again.
pub(crate) async fn run_rollup_fold(database: Database) {
    let mut failing = false;
    loop {
        match fold::fold_all_pending(&database).await {
            Ok(outcome) => {
                metrics::record_rollup_fold(outcome.folded_deltas, outcome.folded_pairs);
                if failing {
                    tracing::info!("rollup fold recovered");
                }
                failing = false;
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %error, "rollup fold failed, retrying every second");
                }
                failing = true;
            }
        }
        tokio::time::sleep(ROLLUP_FOLD_INTERVAL).await;
    }
}
