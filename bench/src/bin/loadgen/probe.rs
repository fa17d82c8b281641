//! What a phase cost the server process: CPU time (utime + stime from /proc/<pid>/stat,
//! in clock ticks of `getconf CLK_TCK`) between the phase's start and end, and the peak
//! VmRSS sampled every 50 ms during the phase (VmHWM would be the process lifetime's).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use analytics_bench::cpu::cpu_seconds;

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
