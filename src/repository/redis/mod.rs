//! Redis: an optional cache for count answers. Redis is never required for correctness;
//! every failure degrades to "no cache" with a warning.

mod cache;

pub use cache::CountCache;
