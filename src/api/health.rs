//! The standard grpc.health.v1 service (tonic-health), driven by the readiness state:
//! both "" (the whole server) and "analytics.v1.AnalyticsService" are SERVING exactly
//! when the replica is ready, and NOT_SERVING from the moment shutdown begins.

use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::models::rpc::ANALYTICS_SERVICE;
use crate::service::readiness::Readiness;

/// Mirrors every readiness change into the health reporter until the channel closes.
pub(crate) async fn follow_readiness(reporter: HealthReporter, mut readiness: watch::Receiver<Readiness>) {
    loop {
        let status = if readiness.borrow_and_update().is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(ANALYTICS_SERVICE, status).await;
        if readiness.changed().await.is_err() {
            return;
        }
    }
}
