//! Storage. PostgreSQL is the system of record (`postgres`); Redis is an optional cache
//! (`redis`). Only this module writes SQL or Redis commands; errors are classified here
//! so the service can decide what a caller sees.

pub mod postgres;
pub mod redis;
