//! What a phase cost the server process: CPU time (utime + stime from /proc/<pid>/stat,
//! in clock ticks of `getconf CLK_TCK`) between the phase's start and end, and the peak
//! VmRSS sampled every 50 ms during the phase (VmHWM would be the process lifetime's).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Clock ticks per second of /proc/<pid>/stat, read once from `getconf CLK_TCK`.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse::<f64>().ok())
            .filter(|ticks| *ticks > 0.0)
            .unwrap_or(100.0)
    })
}

/// utime + stime of `pid` in seconds; `None` when /proc cannot say.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, "state";
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix("VmRSS:")
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    })
}

/// A phase's measurement of one server process, started with [`Probe::start`].
pub(crate) struct Probe {
    pid: u32,
    cpu_before: Option<f64>,
    peak_kib: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<()>,
}

/// What [`Probe::finish`] measured.
#[derive(Clone, Copy, Default)]
pub(crate) struct Usage {
    /// CPU seconds the process used during the phase.
    pub(crate) cpu_seconds: Option<f64>,
    /// The largest VmRSS seen during the phase, KiB.
    pub(crate) peak_rss_kib: Option<u64>,
}

impl Probe {
    pub(crate) fn start(pid: u32) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let running = Arc::new(AtomicBool::new(true));
        let sampler = tokio::spawn({
            let (peak_kib, running) = (peak_kib.clone(), running.clone());
            async move {
                while running.load(Ordering::Relaxed) {
                    if let Some(kib) = rss_kib(pid) {
                        peak_kib.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self { pid, cpu_before: cpu_seconds(pid), peak_kib, running, sampler }
    }

    pub(crate) async fn finish(self) -> Usage {
        let cpu_after = cpu_seconds(self.pid);
        self.running.store(false, Ordering::Relaxed);
        self.sampler.await.ok();
        if let Some(kib) = rss_kib(self.pid) {
            self.peak_kib.fetch_max(kib, Ordering::Relaxed);
        }
        let peak = self.peak_kib.load(Ordering::Relaxed);
        Usage {
            cpu_seconds: self.cpu_before.zip(cpu_after).map(|(before, after)| after - before),
            peak_rss_kib: (peak > 0).then_some(peak),
        }
    }
}
