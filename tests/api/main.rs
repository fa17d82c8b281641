//! Integration tests: the real server in-process on port 0, a real gRPC client, a real
//! PostgreSQL (one database per test) and a real Redis (one key prefix per test).

// Test helpers are `pub` for the sibling modules of this test binary.
#![allow(unreachable_pub)]
mod helpers;

mod admin_access;
mod cache;
mod certs;
mod cli;
mod connections;
mod counts;
mod dependency_tls;
mod erasure;
mod export_user;
mod failures;
mod faults;
mod health;
mod hostile;
mod identify_user;
mod ingest;
mod ingest_linger;
mod lifecycle;
mod malformed;
mod migrations;
mod observability;
mod otlp_tls;
mod outage;
mod pgbouncer;
mod pii;
mod proxy;
mod rate_limit;
mod rate_limit_batch;
mod rate_limit_leases;
mod read_replica;
mod readiness;
mod redis_topologies;
mod rollups;
mod rollups_fold;
mod schema_squash;
mod suppression;
mod tls;
mod track_event;
mod validation;
