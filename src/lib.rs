//! analytics-service: event tracking and user identification over gRPC,
//! stored in PostgreSQL, with Redis as an optional cache.
//!
//! Data flows one way: `api` (gRPC, admin HTTP) -> `service` (rules) -> `repository`
//! (PostgreSQL, Redis). `models` holds the validated domain types all layers share.

pub mod api;
pub mod config;
pub mod metrics;
pub mod models;
pub mod repository;
pub mod security;
pub mod service;
pub mod startup;
pub mod telemetry;

/// Code generated from proto/analytics/v1/analytics.proto (in OUT_DIR, never committed).
#[allow(unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("analytics.v1");

    /// Encoded descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("analytics_descriptor");
}
