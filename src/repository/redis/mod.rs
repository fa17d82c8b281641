//! Redis: an optional cache for count answers and the event budgets shared by all
//! replicas, on one server, a Sentinel-managed master or a Cluster (`connection`). Redis is never required for correctness; every failure degrades to "no
//! cache" or to the local rate limiter, with a warning.

mod breaker;
mod budget;
mod budget_batch;
mod cache;
mod connection;

pub(crate) use breaker::RedisBreaker;
pub(crate) use budget::{Grant, SharedBudgets, Spend};
pub use cache::CountCache;
