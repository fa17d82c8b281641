//! Readiness: whether this replica should receive traffic. A background task probes
//! PostgreSQL and the schema version; shutdown turns readiness off for good. The state
//! is published on a watch channel that the gRPC health services (grpc.health.v1 and
//! the HealthCheck RPC) and /readyz follow.
//! The ingest path reads and feeds the same state through [`DatabaseHealth`]: a commit
//! that did not answer in time marks PostgreSQL unreachable at once, any other failed
//! commit asks for a probe now, and while PostgreSQL is unreachable it is probed often
//! so calls are taken again soon after it is back.
//!
//! A replica is ready once it has seen a usable schema. A later PostgreSQL outage
//! makes it not ready only under READINESS_REQUIRES_DATABASE: PostgreSQL is shared by
//! every replica, so by default they all stay in the Service and answer UNAVAILABLE
//! rather than all leaving it at once. A schema that is behind (or ahead of) this binary
//! is specific to this version, so it makes the replica not ready either way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::metrics;
use crate::repository::postgres::schema::{self, SchemaStatus};
use crate::repository::postgres::Database;

/// The latest observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Readiness {
    pub database_reachable: bool,
    /// `None` until the first successful probe.
    pub schema: Option<SchemaStatus>,
    pub shutting_down: bool,
    /// READINESS_REQUIRES_DATABASE: an unreachable PostgreSQL means not ready.
    pub database_required: bool,
}

impl Readiness {
    /// Whether this replica should receive traffic (grpc.health.v1, /readyz).
    pub(crate) fn is_ready(&self) -> bool {
        self.serving(self.database_required)
    }

    /// What the HealthCheck RPC answers: ready as if READINESS_REQUIRES_DATABASE were
    /// set, so it reports a PostgreSQL outage even while the replica stays in the Service.
    pub(crate) fn is_healthy(&self) -> bool {
        self.serving(true)
    }

    fn serving(&self, database_required: bool) -> bool {
        (self.database_reachable || !database_required)
            && self.schema.as_ref().is_some_and(SchemaStatus::is_usable)
            && !self.shutting_down
    }
}

/// Longest wait for one probe's answer: a blackholed connection counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Probe interval while PostgreSQL is unreachable (when HEALTH_POLL_INTERVAL_MS is longer).
const UNREACHABLE_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// Owns the readiness state; clone the receiver to observe it.
#[derive(Clone)]
pub struct ReadinessMonitor {
    sender: watch::Sender<Readiness>,
    database: Database,
    probe_now: Arc<Notify>,
    /// Whether the current outage has been logged (the first failed probe of each).
    outage_logged: Arc<AtomicBool>,
}

/// What the ingest path knows of PostgreSQL's reachability, shared with the readiness
/// monitor: read on every call, told about failed commits.
#[derive(Clone, Debug)]
pub struct DatabaseHealth {
    sender: watch::Sender<Readiness>,
    receiver: watch::Receiver<Readiness>,
    probe_now: Arc<Notify>,
}

impl DatabaseHealth {
    /// False from the moment PostgreSQL is known to be unreachable until a probe
    /// reaches it again.
    pub(crate) fn is_reachable(&self) -> bool {
        self.receiver.borrow().database_reachable
    }

    /// Resolves once PostgreSQL is known to be unreachable (at once if it is now).
    pub(crate) async fn wait_unreachable(&mut self) {
        if self.receiver.wait_for(|state| !state.database_reachable).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// A write got no answer in time: PostgreSQL counts as unreachable until a probe
    /// reaches it.
    pub(crate) fn report_unreachable(&self, reason: &'static str) {
        let changed = self.sender.send_if_modified(|state| {
            let was = state.database_reachable;
            state.database_reachable = false;
            was
        });
        if changed {
            tracing::warn!(reason, "postgresql unreachable, refusing writes until a probe reaches it");
            metrics::set_database_up(false);
        }
        self.probe_now.notify_one();
    }

    /// A write failed in a way an outage would explain: probe now rather than at the
    /// next interval.
    pub(crate) fn probe_soon(&self) {
        self.probe_now.notify_one();
    }
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
        Self {
            sender,
            database,
            probe_now: Arc::new(Notify::new()),
            outage_logged: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The ingest path's handle on the same state.
    pub fn database_health(&self) -> DatabaseHealth {
        DatabaseHealth {
            sender: self.sender.clone(),
            receiver: self.sender.subscribe(),
            probe_now: self.probe_now.clone(),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.sender.subscribe()
    }

    /// Probes once and publishes the result (logging transitions, not repeats).
    pub async fn probe(&self) {
        let probe = tokio::time::timeout(PROBE_TIMEOUT, schema::status(&self.database)).await;
        let failure = match probe {
            Ok(Ok(status)) => {
                if self.outage_logged.swap(false, Ordering::Relaxed) {
                    tracing::info!("postgresql reachable again");
                }
                Ok(status)
            }
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => {
                Err(format!("no answer to the readiness probe within {} ms", PROBE_TIMEOUT.as_millis()))
            }
        };
        let (database_reachable, schema_status) = match failure {
            Ok(status) => (true, Some(status)),
            Err(error) => {
                if !self.outage_logged.swap(true, Ordering::Relaxed) {
                    let current = self.sender.borrow().clone();
                    let stays_ready = !current.database_required && current.schema.is_some();
                    tracing::warn!(
                        error,
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
                Some(SchemaStatus::Diverged { version, applied_name, expected_name }) if next.database_reachable => {
                    tracing::error!(
                        version,
                        applied_name,
                        expected_name,
                        "database was built by other migrations (V{version} differs); recreate it, then run `analytics-service migrate`; not ready until then"
                    );
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

    /// Probes every `interval` (more often while PostgreSQL is unreachable, and at once
    /// when the ingest path asks) until shutdown begins.
    pub(crate) async fn run(self, interval: Duration) {
        let mut receiver = self.subscribe();
        loop {
            self.probe().await;
            let pause = if self.sender.borrow().database_reachable {
                interval
            } else {
                interval.min(UNREACHABLE_PROBE_INTERVAL)
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.probe_now.notified() => {}
                _ = receiver.wait_for(|state| state.shutting_down) => return,
            }
        }
    }

    /// Turns readiness off permanently (SIGTERM received).
    pub(crate) fn begin_shutdown(&self) {
        self.sender.send_modify(|state| state.shutting_down = true);
        metrics::set_ready(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(database_reachable: bool, database_required: bool) -> Readiness {
        Readiness {
            database_reachable,
            schema: Some(SchemaStatus::Current { version: 1 }),
            shutting_down: false,
            database_required,
        }
    }

    #[test]
    fn health_check_reports_an_outage_that_readiness_may_ride_out() {
        assert!(state(true, false).is_ready() && state(true, false).is_healthy());
        let outage = state(false, false);
        assert!(outage.is_ready(), "stays in the Service by default");
        assert!(!outage.is_healthy(), "HealthCheck says PostgreSQL is down");
        assert!(!state(false, true).is_ready());
        let behind = Readiness {
            schema: Some(SchemaStatus::Behind { applied: None, expected: 1 }),
            ..state(true, true)
        };
        assert!(!behind.is_ready() && !behind.is_healthy());
        let stopping = Readiness { shutting_down: true, ..state(true, true) };
        assert!(!stopping.is_ready() && !stopping.is_healthy());
        let unprobed = Readiness { schema: None, ..state(true, true) };
        assert!(!unprobed.is_healthy());
    }
}
