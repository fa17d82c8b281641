//! Wiring and lifecycle of `serve`: builds the components from a [`Config`] (see
//! [`components`]), binds both listeners (port 0 works, for tests), serves until the
//! shutdown future resolves, then drains: NOT_SERVING first, in-flight calls finish,
//! the background tasks stop, the ingest queue is written, the pool closes.

pub mod components;
mod grpc;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::api::admin;
use crate::api::health::follow_readiness;
use crate::config::Config;
use crate::metrics;
use crate::repository::postgres::{migration_connect_options, schema};
use crate::security::tls::ReloadingTlsConfig;
use crate::service::fold_task::run_rollup_fold;
use crate::service::partition_maintenance::run_partition_maintenance;
use crate::service::readiness::Readiness;
use crate::service::{AnalyticsService, EVENT_STARTED, EVENT_STOPPING};
pub use components::{BackgroundTasks, Components};

/// A built, bound, not yet running server.
pub struct Application {
    config: Config,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    components: Components,
    /// mTLS on the gRPC port, when TLS_CERT_FILE and friends are set.
    tls: Option<ReloadingTlsConfig>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.check_ca_files()?;
        let grpc_address = config.server.grpc_address;
        let grpc_listener = TcpListener::bind(grpc_address)
            .await
            .with_context(|| format!("binding the grpc port {grpc_address}"))?;
        let admin_address = config.server.admin_address;
        let admin_listener = TcpListener::bind(admin_address)
            .await
            .with_context(|| format!("binding the admin port {admin_address}"))?;

        if config.server.migrate_on_start {
            let migrated = match migration_connect_options(&config.postgres) {
                Ok(options) => schema::migrate(&options).await,
                Err(error) => Err(error),
            };
            match migrated {
                Ok(report) => tracing::info!(applied = ?report.applied, "migrations applied on start"),
                Err(error) => tracing::error!(error = %error, "MIGRATE_ON_START failed; serving not ready"),
            }
        }

        let components = Components::build(&config)?;
        let tls = match &config.tls.files {
            Some(files) => Some(ReloadingTlsConfig::load(files.clone()).context("loading the mTLS files")?),
            None => {
                tracing::warn!(
                    "grpc port in plaintext: set TLS_CERT_FILE, TLS_KEY_FILE and TLS_CLIENT_CA_FILE for mTLS"
                );
                None
            }
        };
        Ok(Self { config, grpc_listener, admin_listener, components, tls })
    }

    pub fn grpc_address(&self) -> SocketAddr {
        self.grpc_listener.local_addr().expect("a bound listener has an address")
    }

    pub fn admin_address(&self) -> SocketAddr {
        self.admin_listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains within SHUTDOWN_DRAIN_SECONDS.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application { config, grpc_listener, admin_listener, components, tls } = self;
        let (database, readiness, service) =
            (components.database.clone(), components.readiness.clone(), components.service.clone());
        let tasks = components.tasks.clone();
        let metrics_handle = metrics::install();

        // First probe before accepting calls, so a healthy start is ready at once.
        readiness.probe().await;
        tasks.spawn(readiness.clone().run(config.server.health_poll_interval));
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        tasks.spawn(follow_readiness(health_reporter, readiness.subscribe()));

        // The periodic work ends once the drain is over; readiness, grpc.health and the
        // admin port keep answering until then (probes see "not ready" meanwhile).
        let after_drain = tasks.child_token();
        if config.server.self_tracking {
            tasks.spawn_until(&after_drain, track_started_when_ready(service.clone(), readiness.subscribe()));
        }
        tasks.spawn_until(&after_drain, forget_idle_rate_limits(service.clone()));
        tasks.spawn_until(
            &after_drain,
            run_partition_maintenance(database.clone(), config.events.max_age, config.events.retention),
        );
        tasks.spawn_until(&after_drain, run_rollup_fold(database.clone()));
        tasks.spawn_until(&after_drain, service.erasure_worker());
        if let Some(tls) = &tls {
            tasks.spawn_until(&after_drain, tls.clone().watch(config.tls.reload_interval));
        }
        let admin_server = axum::serve(admin_listener, admin::router(metrics_handle, readiness.subscribe()));
        let admin_stop = after_drain.clone();
        tasks.spawn_to_end(async move {
            if let Err(error) = admin_server.with_graceful_shutdown(admin_stop.cancelled_owned()).await {
                tracing::error!(error = %error, "admin server failed");
            }
        });

        let shutdown_readiness = readiness.clone();
        let (shutdown_started, shutdown_started_receiver) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutdown requested: not serving, draining in-flight calls");
            shutdown_readiness.begin_shutdown();
            let _ = shutdown_started.send(());
        };
        tracing::info!(grpc = %grpc_listener.local_addr()?, admin = %config.server.admin_address, mtls = tls.is_some(), "serving");
        let services = grpc::GrpcServices {
            service: service.clone(),
            readiness: readiness.subscribe(),
            health: health_service,
        };
        let server = grpc::serve(grpc_listener, tls, &config.grpc, &config.tls, services, signal);

        let drain = config.server.shutdown_drain;
        let drain_deadline = async move {
            if shutdown_started_receiver.await.is_ok() {
                tokio::time::sleep(drain).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let served = tokio::select! {
            result = server => result,
            () = drain_deadline => {
                tracing::warn!(drain_seconds = drain.as_secs(), "drain deadline passed, abandoning unfinished calls");
                Ok(())
            }
        };

        readiness.begin_shutdown();
        after_drain.cancel();
        if served.is_ok() && config.server.self_tracking {
            service.track_lifecycle(EVENT_STOPPING, lifecycle_properties()).await;
        }
        // Calls still queued for a group commit are written before the pool closes.
        components.shutdown(drain).await;
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Version and instance (the pod name in Kubernetes) of lifecycle events.
fn lifecycle_properties() -> Vec<(&'static str, String)> {
    vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("instance", std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".to_string())),
    ]
}

/// Records `analytics_service.started` once this replica first becomes ready.
async fn track_started_when_ready(
    service: Arc<AnalyticsService>,
    mut readiness: tokio::sync::watch::Receiver<Readiness>,
) {
    if readiness.wait_for(|state| state.is_ready()).await.is_ok() {
        service.track_lifecycle(EVENT_STARTED, lifecycle_properties()).await;
    }
}

/// Bounds the rate limiter's memory: forgets users whose budget is full again.
async fn forget_idle_rate_limits(service: Arc<AnalyticsService>) {
    let mut interval = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        interval.tick().await;
        service.forget_idle_rate_limits();
    }
}
