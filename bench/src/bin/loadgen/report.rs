//! The result table: one row per phase, the server's group-commit statistics scraped
//! from its /metrics, and the markdown printed at the end.

use std::net::SocketAddr;
use std::time::Duration;

use analytics_bench::scrape::metrics_page;
use hdrhistogram::Histogram;

use crate::Args;

/// One row of the result table.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) offered: String,
    pub(crate) achieved: f64,
    pub(crate) unit: &'static str,
    pub(crate) latency: Option<Histogram<u64>>,
    pub(crate) errors: u64,
    pub(crate) note: String,
}

/// (events, commits, commit seconds, TrackEvent(s) calls, their handling seconds) so
/// far, from the server's /metrics.
pub(crate) type CommitStats = (f64, f64, f64, f64, f64);

pub(crate) async fn commit_stats(admin: SocketAddr) -> CommitStats {
    let Ok(body) = metrics_page(admin).await else { return Default::default() };
    let value = |series: &str| {
        body.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let handling = |suffix: &str| {
        ["TrackEvent", "TrackEvents"]
            .iter()
            .map(|method| {
                value(&format!(
                    "grpc_server_handling_seconds{suffix}{{grpc_service=\"analytics.v1.AnalyticsService\",grpc_method=\"{method}\",grpc_type=\"unary\"}} "
                ))
            })
            .sum::<f64>()
    };
    (
        value("analytics_ingest_batch_size_sum "),
        value("analytics_ingest_batch_size_count "),
        value("analytics_ingest_commit_seconds_sum "),
        handling("_count"),
        handling("_sum"),
    )
}

/// The row of a service phase: events/s over `duration`, the group-commit note from the
/// server's stats before and after.
#[allow(clippy::too_many_arguments)]
pub(crate) fn service_row(
    name: impl Into<String>,
    offered: String,
    count: u64,
    duration: Duration,
    latency: Histogram<u64>,
    errors: u64,
    before: CommitStats,
    after: CommitStats,
) -> Row {
    Row {
        name: name.into(),
        offered,
        achieved: count as f64 / duration.as_secs_f64(),
        unit: "events/s",
        latency: Some(latency),
        errors,
        note: mean_batch(before, after),
    }
}

fn mean_batch(before: CommitStats, after: CommitStats) -> String {
    let commits = after.1 - before.1;
    if commits <= 0.0 {
        return String::new();
    }
    let calls = after.3 - before.3;
    let server_mean = if calls > 0.0 { 1000.0 * (after.4 - before.4) / calls } else { 0.0 };
    format!(
        "{:.0} events/commit, {:.1} ms/commit, server-side mean {server_mean:.1} ms/call",
        (after.0 - before.0) / commits,
        1000.0 * (after.2 - before.2) / commits
    )
}

fn millis(histogram: &Histogram<u64>, quantile: f64) -> String {
    if histogram.is_empty() {
        return "-".into();
    }
    format!("{:.2}", histogram.value_at_quantile(quantile) as f64 / 1000.0)
}

pub(crate) fn print_table(args: &Args, rows: &[Row], peak_rss_kib: u64) {
    println!(
        "| phase | offered | achieved | p50 ms | p95 ms | p99 ms | max ms | errors | note |\n|---|---|---|---|---|---|---|---|---|"
    );
    for row in rows {
        let (p50, p95, p99, max) = match &row.latency {
            Some(histogram) => (
                millis(histogram, 0.50),
                millis(histogram, 0.95),
                millis(histogram, 0.99),
                if histogram.is_empty() {
                    "-".into()
                } else {
                    format!("{:.2}", histogram.max() as f64 / 1000.0)
                },
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {:.0} {} | {p50} | {p95} | {p99} | {max} | {} | {} |",
            row.name, row.offered, row.achieved, row.unit, row.errors, row.note
        );
    }
    let find = |prefix: &str, offered_prefix: &str| {
        rows.iter()
            .filter(|row| row.name.starts_with(prefix) && row.offered.starts_with(offered_prefix))
            .map(|row| row.achieved)
            .fold(None, |best: Option<f64>, value| Some(best.map_or(value, |best| best.max(value))))
    };
    let raw = find("limit: raw", "");
    let transport = find("transport limit", "");
    let unary = find("service: unary", "saturation");
    let batch = find("service: TrackEvents x1000", "");
    println!();
    println!("| ratio | value |\n|---|---|");
    if let (Some(unary), Some(transport)) = (unary, transport) {
        println!("| service unary (saturation) / transport limit | {:.0}% |", 100.0 * unary / transport);
    }
    if let (Some(batch), Some(raw)) = (batch, raw) {
        println!(
            "| service TrackEvents x1000 / raw insert limit (best of UNNEST, COPY) | {:.0}% |",
            100.0 * batch / raw
        );
    }
    println!("| server peak RSS (VmHWM) | {:.1} MiB |", peak_rss_kib as f64 / 1024.0);
    println!();
    println!(
        "{} s per phase; {} connections; server env: {}",
        args.seconds,
        args.connections,
        if args.server_env.is_empty() { "defaults".to_string() } else { args.server_env.join(" ") }
    );
}
