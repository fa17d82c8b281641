//! The user-activity fold task of `serve`: about once a second, folds the (hour, user)
//! pairs that the `events` insert trigger left pending into the hourly and daily user
//! bitmaps (src/repository/postgres/user_activity.rs). Counts stay exact whether or not
//! it runs; it keeps them fast. Its watermark, the time of the last completed pass, is
//! the gauge `analytics_user_activity_fold_timestamp_seconds`.

use std::time::Duration;

use crate::metrics;
use crate::repository::postgres::{user_activity, Database};

/// Pause between two passes.
pub const USER_ACTIVITY_FOLD_INTERVAL: Duration = Duration::from_secs(1);

/// Folds everything pending, then again every [`USER_ACTIVITY_FOLD_INTERVAL`]. A failure
/// (PostgreSQL down, schema behind) is logged once until a pass succeeds again.
pub async fn run_user_activity_fold(database: Database) {
    let mut failing = false;
    loop {
        match user_activity::fold_all_pending_pairs(&database).await {
            Ok(folded) => {
                metrics::record_user_activity_fold(folded);
                if failing {
                    tracing::info!("user activity fold recovered");
                }
                failing = false;
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %error, "user activity fold failed, retrying every second");
                }
                failing = true;
            }
        }
        tokio::time::sleep(USER_ACTIVITY_FOLD_INTERVAL).await;
    }
}
