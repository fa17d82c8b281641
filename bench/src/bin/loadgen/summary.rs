//! The targets table printed after the result table: each target with its measured value
//! and pass, fail or "not measured" when the run left out a phase it needs.

use crate::report::Row;
use crate::Args;

fn row<'a>(rows: &'a [Row], key: &str) -> Option<&'a Row> {
    rows.iter().find(|row| row.key == key)
}

fn achieved(rows: &[Row], key: &str) -> Option<f64> {
    row(rows, key).map(|row| row.achieved)
}

/// Latency quantile of a row, milliseconds.
fn quantile_ms(rows: &[Row], key: &str, quantile: f64) -> Option<f64> {
    let histogram = row(rows, key)?.latency.as_ref().filter(|histogram| !histogram.is_empty())?;
    Some(histogram.value_at_quantile(quantile) as f64 / 1000.0)
}

fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "pass",
        Some(false) => "**fail**",
        None => "not measured",
    }
}

/// One line: target, measured value (or what is missing), verdict.
fn line(target: &str, measured: Option<(String, bool)>, missing: &str) {
    let (value, pass) = match measured {
        Some((value, pass)) => (value, Some(pass)),
        None => (format!("- ({missing})"), None),
    };
    println!("| {target} | {value} | {} |", verdict(pass));
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<(f64, f64, f64)> {
    let (numerator, denominator) = (numerator?, denominator?);
    // A zero denominator (nothing succeeded) reads as 0%, a fail rather than "not measured".
    let ratio = if denominator > 0.0 { numerator / denominator } else { 0.0 };
    Some((ratio, numerator, denominator))
}

pub(crate) fn print_summary(args: &Args, rows: &[Row]) {
    println!("| target | measured | |\n|---|---|---|");
    for (name, on, off) in [
        ("unary TrackEvent (saturation)", "unary", "unary-redis-off"),
        ("TrackEvents x1000", "x1000", "x1000-redis-off"),
    ] {
        let measured = ratio(achieved(rows, on), achieved(rows, off)).map(|(ratio, on, off)| {
            (format!("{:.0}% ({on:.0} vs {off:.0} events/s)", 100.0 * ratio), ratio >= 0.90)
        });
        line(
            &format!("{name}: Redis on >= 90% of Redis off"),
            measured,
            "needs the redis-off phase and Redis on",
        );
    }
    let measured =
        ratio(achieved(rows, "conn64-track"), achieved(rows, "conn64-bare")).map(|(ratio, track, bare)| {
            (format!("{:.0}% ({track:.0} vs {bare:.0}/s)", 100.0 * ratio), ratio >= 0.40)
        });
    let in_flight = args.one_connection_in_flight;
    line(
        &format!("TrackEvent {in_flight} in flight on 1 connection >= 40% of the bare no-op's"),
        measured,
        "needs the conn64 phase",
    );
    let measured = ratio(quantile_ms(rows, "one", 0.5), quantile_ms(rows, "floor", 0.5))
        .map(|(ratio, one, floor)| (format!("{ratio:.2}x ({one:.2} vs {floor:.2} ms)"), ratio <= 1.2));
    line(
        "one in flight: TrackEvent p50 <= 1.2x the single-row INSERT commit p50",
        measured,
        "needs the one phase",
    );
    let offered = format!("{}/s offered, at most {} in flight", args.capped_rate, args.capped_in_flight);
    let floor = 0.99 * args.capped_rate as f64;
    line(
        &format!("{offered}: achieved >= 99% of offered ({floor:.0}/s)"),
        row(rows, "capped").map(|row| (format!("{:.0}/s", row.achieved), row.achieved >= floor)),
        "needs the capped phase",
    );
    for (label, quantile, limit) in [("p95 < 10 ms", 0.95, 10.0), ("p99 < 25 ms", 0.99, 25.0)] {
        line(
            &format!("{offered}: {label}"),
            quantile_ms(rows, "capped", quantile).map(|ms| (format!("{ms:.2} ms"), ms < limit)),
            "needs the capped phase",
        );
    }
    let raw = achieved(rows, "raw-unnest").into_iter().chain(achieved(rows, "raw-copy")).reduce(f64::max);
    let measured = ratio(achieved(rows, "x1000"), raw).map(|(ratio, batch, raw)| {
        (format!("{:.0}% ({batch:.0} vs {raw:.0} rows/s)", 100.0 * ratio), ratio >= 0.80)
    });
    line(
        "TrackEvents x1000 >= 80% of the raw insert limit (best of UNNEST, COPY)",
        measured,
        "needs the raw and batch phases",
    );
    let peak = rows
        .iter()
        .filter_map(|row| Some((row.usage?.peak_rss_kib?, row.name.as_str(), row.offered.as_str())))
        .max_by_key(|(kib, _, _)| *kib);
    line(
        "server peak RSS < 150 MiB in every phase",
        peak.map(|(kib, name, offered)| {
            (format!("{:.1} MiB at most ({name}, {offered})", kib as f64 / 1024.0), kib < 150 * 1024)
        }),
        "no server phase",
    );
    let errors: u64 = rows.iter().filter(|row| row.usage.is_some()).map(|row| row.errors).sum();
    line(
        "no errors (rate-limited events included) in any server phase",
        rows.iter().any(|row| row.usage.is_some()).then(|| (errors.to_string(), errors == 0)),
        "no server phase",
    );
    if let Some((ratio, ..)) = ratio(achieved(rows, "unary"), achieved(rows, "noop")) {
        println!(
            "| (no target) unary TrackEvent saturation / service no-op saturation | {:.0}% | |",
            100.0 * ratio
        );
    }
    if let Some((ratio, ..)) = ratio(achieved(rows, "noop"), achieved(rows, "bare")) {
        println!("| (no target) service no-op / bare no-op, saturation | {:.0}% | |", 100.0 * ratio);
    }
}
