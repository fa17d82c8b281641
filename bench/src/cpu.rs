//! CPU time of processes from /proc: one process's utime + stime, and that of a set of
//! processes (PostgreSQL's backends, or all its processes), so a benchmark can say what a
//! phase cost each side in CPU seconds rather than only in latency, which moves with
//! whatever else the shared machine runs.

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
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, "state";
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// The pids of every process named `postgres` (backends, writers, autovacuum).
pub fn postgres_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres")
        })
        .collect()
}

/// The CPU seconds of each of `pids` at this moment. A difference of two readings counts
/// only processes alive at both (a process that ended between them took its CPU with it),
/// so compare the readings with [`cpu_seconds_since`].
pub fn cpu_seconds_of(pids: &[u32]) -> std::collections::HashMap<u32, f64> {
    pids.iter().filter_map(|pid| Some((*pid, cpu_seconds(*pid)?))).collect()
}

/// The CPU seconds the processes of `before` used since then: those still alive, plus
/// all of any process started since (it started at zero).
pub fn cpu_seconds_since(
    before: &std::collections::HashMap<u32, f64>,
    after: &std::collections::HashMap<u32, f64>,
) -> f64 {
    after.iter().map(|(pid, now)| now - before.get(pid).copied().unwrap_or(0.0)).sum()
}
