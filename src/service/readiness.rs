//! Readiness: whether this replica should receive traffic. A background task probes
//! PostgreSQL and the schema version; shutdown turns readiness off for good. The state
//! is published on a watch channel that the gRPC health service and /readyz follow.

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
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.database_reachable
            && self.schema.as_ref().is_some_and(SchemaStatus::is_usable)
            && !self.shutting_down
    }
}

/// Owns the readiness state; clone the receiver to observe it.
#[derive(Clone)]
pub struct ReadinessMonitor {
    sender: watch::Sender<Readiness>,
    database: Database,
}

impl ReadinessMonitor {
    pub fn new(database: Database) -> Self {
        let (sender, _) =
            watch::channel(Readiness { database_reachable: false, schema: None, shutting_down: false });
        metrics::set_ready(false);
        Self { sender, database }
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
            Ok(status) => (true, Some(status)),
            Err(error) => {
                if self.sender.borrow().database_reachable {
                    tracing::warn!(error = %error, "postgresql unreachable, not ready");
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
