//! Redis: an optional cache for count answers and the event budgets shared by all
//! replicas. Redis is never required for correctness; every failure degrades to "no
//! cache" or to the local rate limiter, with a warning.

mod budget;
mod cache;

pub use budget::{BudgetDecision, SharedBudgets};
pub use cache::CountCache;
