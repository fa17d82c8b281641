//! The result table: one row per phase with what it cost the server process, the
//! server's group-commit statistics scraped from its /metrics, and the markdown printed
//! at the end.

use std::net::SocketAddr;

use analytics_bench::scrape::metrics_page;
use hdrhistogram::Histogram;

use crate::probe::Usage;
use crate::Args;

/// One row of the result table.
pub(crate) struct Row {
    /// What the summary finds the row by (e.g. `unary`, `x1000-redis-off`).
    pub(crate) key: &'static str,
    pub(crate) name: String,
    pub(crate) offered: String,
    pub(crate) achieved: f64,
    pub(crate) unit: &'static str,
    pub(crate) latency: Option<Histogram<u64>>,
    pub(crate) errors: u64,
    pub(crate) note: String,
    /// What the phase cost the server process; `None` for phases without a server.
    pub(crate) usage: Option<Cost>,
}

impl Row {
    /// The row of two runs of one phase: mean throughput and CPU per event, both runs'
    /// latencies and errors, the larger peak RSS, and the first run's note.
    pub(crate) fn mean_with(mut self, other: Row) -> Row {
        let runs = format!(
            "runs {:.0} and {:.0}/s, alternated with the other server",
            self.achieved, other.achieved
        );
        self.achieved = (self.achieved + other.achieved) / 2.0;
        self.errors += other.errors;
        match (&mut self.latency, other.latency) {
            (Some(latency), Some(other)) => {
                latency.add(&other).ok();
            }
            (latency @ None, other) => *latency = other,
            _ => {}
        }
        if let (Some(usage), Some(other)) = (&mut self.usage, other.usage) {
            usage.cpu_us_per_unit = match (usage.cpu_us_per_unit, other.cpu_us_per_unit) {
                (Some(first), Some(second)) => Some((first + second) / 2.0),
                (first, second) => first.or(second),
            };
            usage.peak_rss_kib = usage.peak_rss_kib.max(other.peak_rss_kib);
        }
        self.note = if self.note.is_empty() { runs } else { format!("{runs}; {}", self.note) };
        self
    }
}

/// A phase's cost to the server process.
#[derive(Clone, Copy, Default)]
pub(crate) struct Cost {
    /// Server CPU microseconds per event (per call for the no-op phases).
    pub(crate) cpu_us_per_unit: Option<f64>,
    /// The largest VmRSS sampled during the phase, KiB.
    pub(crate) peak_rss_kib: Option<u64>,
}

impl Cost {
    pub(crate) fn new(usage: Usage, units: u64) -> Self {
        Self {
            cpu_us_per_unit: usage.cpu_seconds.filter(|_| units > 0).map(|cpu| 1e6 * cpu / units as f64),
            peak_rss_kib: usage.peak_rss_kib,
        }
    }
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

/// The row of a service phase: events/s over `seconds`, the group-commit note from the
/// server's stats before and after, `limited` events refused by the rate limiter.
pub(crate) struct ServicePhase {
    pub(crate) key: &'static str,
    pub(crate) name: String,
    pub(crate) offered: String,
    pub(crate) count: u64,
    pub(crate) seconds: f64,
    pub(crate) latency: Histogram<u64>,
    pub(crate) errors: u64,
    pub(crate) limited: u64,
    pub(crate) before: CommitStats,
    pub(crate) after: CommitStats,
    pub(crate) usage: Usage,
}

pub(crate) fn service_row(phase: ServicePhase) -> Row {
    let mut note = mean_batch(phase.before, phase.after);
    if phase.limited > 0 {
        let limited = format!("{} events rate-limited (counted as errors)", phase.limited);
        note = if note.is_empty() { limited } else { format!("{limited}; {note}") };
    }
    Row {
        key: phase.key,
        name: phase.name,
        offered: phase.offered,
        achieved: phase.count as f64 / phase.seconds,
        unit: "events/s",
        latency: Some(phase.latency),
        errors: phase.errors,
        note,
        usage: Some(Cost::new(phase.usage, phase.count)),
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

pub(crate) fn print_table(args: &Args, rows: &[Row]) {
    println!(
        "| phase | offered | achieved | p50 ms | p95 ms | p99 ms | max ms | errors | server CPU us/event | server peak RSS MiB | note |\n|---|---|---|---|---|---|---|---|---|---|---|"
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
        let cost = row.usage.unwrap_or_default();
        let cpu = cost.cpu_us_per_unit.map_or("-".into(), |us| format!("{us:.1}"));
        let rss = cost.peak_rss_kib.map_or("-".into(), |kib| format!("{:.1}", kib as f64 / 1024.0));
        println!(
            "| {} | {} | {:.0} {} | {p50} | {p95} | {p99} | {max} | {} | {cpu} | {rss} | {} |",
            row.name, row.offered, row.achieved, row.unit, row.errors, row.note
        );
    }
    println!();
    println!(
        "{} s per phase; {} connections; Redis {}; server env: {}",
        args.seconds,
        args.connections,
        if args.backends.redis_on() {
            format!("on ({}:{})", args.backends.redis_host, args.backends.redis_port)
        } else {
            "off".to_string()
        },
        if args.server_env.is_empty() { "defaults".to_string() } else { args.server_env.join(" ") }
    );
}
