//! Readiness: whether this replica should receive traffic. A background task probes
//! PostgreSQL and the schema version; shutdown turns readiness off for good. The state
//! is published on a watch channel that the gRPC health service and /readyz follow.
//!
//! A replica is ready once it has seen a usable schema. A later PostgreSQL outage
//! makes it not ready only under READINESS_REQUIRES_DATABASE: PostgreSQL is shared by
//! every replica, so by default they all stay in the Service and answer UNAVAILABLE
//! rather than all leaving it at once. A schema that is behind (or ahead of) this binary
//! is specific to this version, so it makes the replica not ready either way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics;
use crate::repository::postgres::schema::{self, SchemaStatus};
use crate::repository::postgres::Database;

/// The latest observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub database_reachable: bool,
    /// `None` until the first successful probe.
    pub schema: Option<SchemaStatus>,
    pub shutting_down: bool,
    /// READINESS_REQUIRES_DATABASE: an unreachable PostgreSQL means not ready.
    pub database_required: bool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        (self.database_reachable || !self.database_required)
            && self.schema.as_ref().is_some_and(SchemaStatus::is_usable)
            && !self.shutting_down
    }
}

/// Owns the readiness state; clone the receiver to observe it.
#[derive(Clone)]
pub struct ReadinessMonitor {
    sender: watch::Sender<Readiness>,
    database: Database,
    /// Whether the current outage has been logged (the first failed probe of each).
    outage_logged: Arc<AtomicBool>,
}

impl ReadinessMonitor {
    /// `database_required`: READINESS_REQUIRES_DATABASE.
    pub fn new(database: Database, database_required: bool) -> Self {
        let (sender, _) = watch::channel(Readiness {
            database_reachable: false,
            schema: None,
            shutting_down: false,
            database_required,
        });
        metrics::set_ready(false);
        Self { sender, database, outage_logged: Arc::new(AtomicBool::new(false)) }
    }

    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.sender.subscribe()
    }

    pub fn current(&self) -> Readiness {
        self.sender.borrow().clone()
    }

    /// Probes once and publishes the result (logging transitions, not repeats).
    pub async fn probe(&self) {
        let (database_reachable, schema_status) = match schema::status(self.database.pool()).await {
            Ok(status) => {
                if self.outage_logged.swap(false, Ordering::Relaxed) {
                    tracing::info!("postgresql reachable again");
                }
                (true, Some(status))
            }
            Err(error) => {
                if !self.outage_logged.swap(true, Ordering::Relaxed) {
                    let current = self.sender.borrow().clone();
                    let stays_ready = !current.database_required && current.schema.is_some();
                    tracing::warn!(
                        error = %error,
                        stays_ready,
                        "postgresql unreachable; calls that need it answer UNAVAILABLE"
                    );
                }
                (false, None)
            }
        };
        let pool = self.database.pool();
        metrics::set_pool_stats(pool.size(), pool.num_idle(), pool.options().get_max_connections());
        metrics::set_database_up(database_reachable);
        self.sender.send_if_modified(|state| {
            if state.shutting_down {
                return false;
            }
            let next = Readiness {
                database_reachable,
                schema: schema_status.clone().or_else(|| state.schema.clone()),
                shutting_down: false,
                database_required: state.database_required,
            };
            if *state == next {
                return false;
            }
            match &next.schema {
                Some(SchemaStatus::Behind { applied, expected }) if next.database_reachable => {
                    tracing::error!(
                        applied = ?applied,
                        expected,
                        "database schema is behind, run `analytics-service migrate`; not ready until then"
                    );
                }
                Some(SchemaStatus::Ahead { applied, expected }) if next.database_reachable => {
                    tracing::warn!(applied, expected, "database schema is newer than this binary");
                }
                _ => {}
            }
            let ready = next.is_ready();
            if ready != state.is_ready() {
                tracing::info!(ready, "readiness changed");
            }
            metrics::set_ready(ready);
            *state = next;
            true
        });
    }

    /// Probes every `interval` until shutdown begins.
    pub async fn run(self, interval: Duration) {
        let mut receiver = self.subscribe();
        loop {
            self.probe().await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = receiver.wait_for(|state| state.shutting_down) => return,
            }
        }
    }

    /// Turns readiness off permanently (SIGTERM received).
    pub fn begin_shutdown(&self) {
        self.sender.send_modify(|state| state.shutting_down = true);
        metrics::set_ready(false);
    }
}
