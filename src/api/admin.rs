//! The plain-HTTP admin port (PROMETHEUS_PORT): `/metrics` for Prometheus, `/livez`
//! and `/readyz` for Kubernetes probes. Plain HTTP on purpose, so probes and scrapes
//! work while the gRPC port demands client certificates.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::service::readiness::Readiness;

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    readiness: watch::Receiver<Readiness>,
}

pub(crate) fn router(metrics: PrometheusHandle, readiness: watch::Receiver<Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(live))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, readiness })
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

/// The process answers: that is all liveness means (a database outage must not
/// restart pods).
async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, String) {
    let readiness = state.readiness.borrow().clone();
    if readiness.is_ready() && !readiness.database_reachable {
        return (StatusCode::OK, "ready (postgresql unreachable, not required for readiness)\n".to_string());
    }
    if readiness.is_ready() {
        return (StatusCode::OK, "ready\n".to_string());
    }
    let reason = if readiness.shutting_down {
        "shutting down".to_string()
    } else if !readiness.database_reachable {
        "postgresql unreachable".to_string()
    } else {
        match readiness.schema {
            Some(schema) => {
                format!("database schema not usable: {schema:?}; run `analytics-service migrate`")
            }
            None => "not probed yet".to_string(),
        }
    };
    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n"))
}
