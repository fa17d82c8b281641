//! analytics-bench: what the benchmark binaries (`loadgen`, `countbench`) share: the
//! raw-SQL baselines of the service's count queries and a scrape of the server's
//! Prometheus page. README "Benchmarks" says how to run them.

pub mod baseline;
pub mod scrape;
