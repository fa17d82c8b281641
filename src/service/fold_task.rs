//! The rollup fold task of `serve`: about once a second, folds what the `events` insert
//! trigger appended (event-count deltas and (hour, user) pairs) into the count rollups and
//! the user bitmaps (src/repository/postgres/fold.rs). Counts stay exact whether or not it
//! runs; it keeps them fast. Its watermark, the time of the last completed pass, is the
//! gauge `analytics_rollup_fold_timestamp_seconds`. After a fold it spans closed hours
//! for unique-user counts (src/repository/postgres/hour_spans.rs): every pass while a pass
//! finds hours left, else every [`SPAN_CHECK_INTERVAL`].

use std::time::{Duration, Instant};

use crate::metrics;
use crate::repository::postgres::{fold, hour_spans, Database};

/// Pause between two passes.
pub(crate) const ROLLUP_FOLD_INTERVAL: Duration = Duration::from_secs(1);

/// How often the task looks for hours to span when the last look found none: a closed
/// hour changed by late events is spanned again within this.
pub(crate) const SPAN_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Folds everything pending, then again every [`ROLLUP_FOLD_INTERVAL`]. A failure
/// (PostgreSQL down, schema behind) is logged once until a pass succeeds again.
pub(crate) async fn run_rollup_fold(database: Database) {
    let mut failing = false;
    let mut spans_checked: Option<Instant> = None;
    let mut spans_left = false;
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
        if spans_left || spans_checked.is_none_or(|checked| checked.elapsed() >= SPAN_CHECK_INTERVAL) {
            spans_checked = Some(Instant::now());
            match hour_spans::build_hour_spans(&database, chrono::Utc::now().timestamp()).await {
                Ok(pass) => {
                    metrics::record_hour_spans_built(pass.built);
                    spans_left = pass.built > 0;
                }
                Err(error) => {
                    tracing::debug!(error = %error, "spanning closed hours failed");
                    spans_left = false;
                }
            }
        }
        tokio::time::sleep(ROLLUP_FOLD_INTERVAL).await;
    }
}
