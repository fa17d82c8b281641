//! analytics-bench: what the benchmark binaries (`loadgen`, `countbench`, `erasebench`)
//! share: the raw-SQL baselines of the service's count queries, CPU time from /proc, a
//! scrape of the server's Prometheus page, the load loops and the server processes they start. README
//! "Benchmarks" says how to run them.

pub mod baseline;
pub mod cpu;
pub mod loops;
pub mod scrape;
pub mod server;
