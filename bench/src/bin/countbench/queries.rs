//! The query shapes countbench times (GetEventCount and GetUserCount over several ranges),
//! their answers through the service and through raw SQL, and the percentiles it reports.

use std::time::Duration;

use analytics_bench::baseline;
use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use sqlx::PgPool;
use tonic::transport::Channel;

#[derive(Clone, Debug)]
pub(crate) enum Shape {
    Events { group_by: &'static str, days: i64, with_name: bool },
    Users { days: i64 },
}

impl Shape {
    pub(crate) fn days(&self) -> i64 {
        match self {
            Shape::Events { days, .. } | Shape::Users { days } => *days,
        }
    }

    pub(crate) fn label(&self) -> String {
        match self {
            Shape::Events { group_by, days, with_name } => {
                let name = if *with_name { ", one name" } else { ", all names" };
                format!("GetEventCount {group_by} over {days} d{name}")
            }
            Shape::Users { days } => format!("GetUserCount exact over {days} d"),
        }
    }
}

pub(crate) fn shapes() -> Vec<Shape> {
    let mut shapes = Vec::new();
    for with_name in [false, true] {
        shapes.push(Shape::Events { group_by: "hour", days: 7, with_name });
        shapes.push(Shape::Events { group_by: "day", days: 90, with_name });
        shapes.push(Shape::Events { group_by: "week", days: 90, with_name });
    }
    for days in [1, 30, 90] {
        shapes.push(Shape::Users { days });
    }
    shapes
}

pub(crate) fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub(crate) fn millis(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1_000.0)
}

pub(crate) struct Timings(pub(crate) Vec<Duration>);

impl Timings {
    pub(crate) fn summary(&self) -> (Duration, Duration, Duration) {
        let mut sorted = self.0.clone();
        sorted.sort();
        (percentile(&sorted, 0.5), percentile(&sorted, 0.95), percentile(&sorted, 0.99))
    }
}

/// An answer in a comparable form: sorted (name, bucket, count) rows, or the user count.
pub(crate) type Answer = Vec<(String, i64, i64)>;

/// The raw-SQL answer (scanning `events`, no rollups, no cache) to `shape` over [start, end).
pub(crate) async fn raw_answer(pool: &PgPool, shape: &Shape, start: i64, end: i64) -> anyhow::Result<Answer> {
    match shape {
        Shape::Events { group_by, with_name, .. } => {
            let name = with_name.then_some("event_00");
            Ok(baseline::event_counts(pool, group_by, name, start, end).await?)
        }
        Shape::Users { .. } => Ok(vec![(String::new(), 0, baseline::unique_users(pool, start, end).await?)]),
    }
}

pub(crate) async fn service_answer(
    client: &AnalyticsServiceClient<Channel>,
    shape: &Shape,
    start: i64,
    end: i64,
) -> anyhow::Result<Answer> {
    match shape {
        Shape::Events { group_by, with_name, .. } => {
            let response = client
                .clone()
                .get_event_count(pb::GetEventCountRequest {
                    event_name: if *with_name { "event_00".into() } else { String::new() },
                    start_time: start,
                    end_time: end,
                    group_by: (*group_by).into(),
                    time_zone: String::new(),
                })
                .await?;
            Ok(response
                .into_inner()
                .counts
                .into_iter()
                .map(|count| (count.event_name, count.timestamp, count.count))
                .collect())
        }
        Shape::Users { .. } => {
            let response = client
                .clone()
                .get_user_count(pb::GetUserCountRequest { start_time: start, end_time: end })
                .await?;
            Ok(vec![(String::new(), 0, response.into_inner().unique_users)])
        }
    }
}
