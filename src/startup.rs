//! Wiring and lifecycle: builds the application from a [`Config`], binds both
//! listeners (port 0 works, for tests), serves until the shutdown future resolves,
//! then drains: NOT_SERVING first, in-flight calls finish, the pool closes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::api::admin;
use crate::api::grpc::{reflection_guard, AnalyticsGrpc};
use crate::api::health::follow_readiness;
use crate::api::middleware::GrpcObservabilityLayer;
use crate::api::preface::with_preface_deadline;
use crate::config::Config;
use crate::metrics;
use crate::pb;
use crate::pb::analytics_service_server::AnalyticsServiceServer;
use crate::repository::postgres::EventRepository;
use crate::repository::postgres::{connect_options, schema, Database};
use crate::repository::redis::{CountCache, SharedBudgets};
use crate::security::authorization::CallerPolicy;
use crate::security::pii::PiiCipher;
use crate::security::tls::{tls_incoming, HandshakeLimits, ReloadingTlsConfig};
use crate::service::fold_task::run_rollup_fold;
use crate::service::ingest::{self, IngestSettings, IngestWriter};
use crate::service::partition_maintenance::run_partition_maintenance;
use crate::service::rate_limit::RateLimiter;
use crate::service::readiness::ReadinessMonitor;
use crate::service::{AnalyticsService, EVENT_STARTED, EVENT_STOPPING};

/// A built, bound, not yet running server.
pub struct Application {
    config: Config,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    database: Database,
    service: Arc<AnalyticsService>,
    readiness: ReadinessMonitor,
    /// mTLS on the gRPC port, when TLS_CERT_FILE and friends are set.
    tls: Option<ReloadingTlsConfig>,
    ingest_writer: IngestWriter,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.check_ca_files()?;
        let grpc_listener = TcpListener::bind(config.grpc_address())
            .await
            .with_context(|| format!("binding the grpc port {}", config.grpc_address()))?;
        let admin_listener = TcpListener::bind(config.admin_address())
            .await
            .with_context(|| format!("binding the admin port {}", config.admin_address()))?;

        if config.migrate_on_start {
            match schema::migrate(&connect_options(&config)).await {
                Ok(report) => tracing::info!(applied = ?report.applied, "migrations applied on start"),
                Err(error) => tracing::error!(error = %error, "MIGRATE_ON_START failed; serving not ready"),
            }
        }

        let database = Database::connect_lazy(&config);
        let cache = CountCache::from_config(&config)
            .context("invalid redis settings (REDIS_HOST, REDIS_PORT, REDIS_TLS_CA_FILE)")?;
        if cache.is_enabled() {
            tracing::info!(host = %config.redis_host, port = config.redis_port, tls = config.redis_tls, ttl_seconds = config.redis_cache_ttl, "redis cache on");
        } else {
            tracing::info!("redis not configured (REDIS_HOST empty or REDIS_CACHE_TTL=0): count cache off");
        }
        let (rate_limiter, pii, tls) = security_from_config(&config)?;
        let readiness = ReadinessMonitor::new(database.clone(), config.readiness_requires_database);
        let events = EventRepository::new(Database::connect_lazy_for_ingest(&config)).with_pii(pii.clone());
        let (ingest_queue, ingest_writer) =
            ingest::start(events, IngestSettings::from_config(&config), readiness.database_health());
        let service = Arc::new(
            AnalyticsService::new(database.clone(), cache, rate_limiter, config.event_max_age())
                .with_pii(pii)
                .with_event_retention(config.event_retention())
                .with_ingest(ingest_queue),
        );
        Ok(Self { config, grpc_listener, admin_listener, database, service, readiness, tls, ingest_writer })
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
        let Application {
            config,
            grpc_listener,
            admin_listener,
            database,
            service,
            readiness,
            tls,
            ingest_writer,
        } = self;
        let metrics_handle = metrics::install();

        // First probe before accepting calls, so a healthy start is ready at once.
        readiness.probe().await;
        let probe_task = tokio::spawn(readiness.clone().run(config.health_poll_interval()));

        let self_tracking = config.self_tracking;
        let lifecycle_task = tokio::spawn(track_started_when_ready(service.clone(), readiness.subscribe()));
        if !self_tracking {
            lifecycle_task.abort();
        }
        let housekeeping_task = tokio::spawn(forget_idle_rate_limits(service.clone()));
        let partition_task = tokio::spawn(run_partition_maintenance(
            database.clone(),
            config.event_max_age(),
            config.event_retention(),
        ));

        let fold_task = tokio::spawn(run_rollup_fold(database.clone()));

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let health_task = tokio::spawn(follow_readiness(health_reporter, readiness.subscribe()));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building reflection v1alpha")?;
        // Reflection answers the callers TLS_ALLOWED_CALLERS names, unless configured open.
        let reflection_callers = if config.tls_allowed_callers_cover_reflection {
            config.caller_policy()?
        } else {
            CallerPolicy::default()
        };
        let reflection_v1 =
            InterceptedService::new(reflection_v1, reflection_guard(reflection_callers.clone()));
        let reflection_v1alpha =
            InterceptedService::new(reflection_v1alpha, reflection_guard(reflection_callers));
        let analytics = AnalyticsServiceServer::new(
            AnalyticsGrpc::new(service.clone(), readiness.subscribe())
                .with_caller_policy(config.caller_policy()?),
        )
        .max_decoding_message_size(config.grpc_max_message_bytes);

        let admin_readiness = readiness.subscribe();
        let mut admin_stop = readiness.subscribe();
        let admin_server = axum::serve(admin_listener, admin::router(metrics_handle, admin_readiness));
        // The admin port outlives the gRPC drain so probes see "not ready" meanwhile; it
        // stops once the drain is over (signalled by dropping `drain_done`).
        let (drain_done, mut drain_done_receiver) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(async move {
            let stopped = async move {
                admin_stop.wait_for(|state| state.shutting_down).await.ok();
                let _ = (&mut drain_done_receiver).await;
            };
            if let Err(error) = admin_server.with_graceful_shutdown(stopped).await {
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

        // No Server::timeout: the middleware owns the deadline, so a call cut short by it is
        // answered DEADLINE_EXCEEDED (tonic's own timer answers CANCELLED) and counted.
        let mut builder = Server::builder()
            .max_concurrent_streams(config.grpc_max_concurrent_streams)
            .http2_max_header_list_size(config.grpc_max_header_list_bytes)
            .http2_keepalive_interval(Some(config.grpc_keepalive_interval()))
            .http2_keepalive_timeout(Some(config.grpc_keepalive_timeout()))
            .layer(GrpcObservabilityLayer::new(config.request_timeout()));
        if let Some(age) = config.max_connection_age() {
            builder = builder.max_connection_age(age);
        }
        let grpc_address = grpc_listener.local_addr()?;
        tracing::info!(grpc = %grpc_address, admin = %config.admin_address(), mtls = tls.is_some(), "serving");
        let router = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(analytics);
        let tls_reload_task = tls.clone().map(|tls| tokio::spawn(tls.watch(config.tls_reload_interval())));
        let preface_timeout = config.grpc_handshake_timeout();
        let handshake_limits = HandshakeLimits {
            timeout: config.grpc_handshake_timeout(),
            max_pending: config.grpc_max_pending_tls_handshakes,
        };
        let server = async move {
            match tls {
                Some(tls) => {
                    let incoming = tls_incoming(grpc_listener, tls, handshake_limits);
                    router
                        .serve_with_incoming_shutdown(
                            with_preface_deadline(incoming, preface_timeout),
                            signal,
                        )
                        .await
                }
                None => {
                    // tonic ignores Server::tcp_nodelay for a caller-supplied listener: without
                    // TCP_NODELAY, small responses wait for the peer's delayed ACK (about 40 ms).
                    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
                    router
                        .serve_with_incoming_shutdown(
                            with_preface_deadline(incoming, preface_timeout),
                            signal,
                        )
                        .await
                }
            }
        };

        let drain = config.shutdown_drain();
        let drain_deadline = async move {
            if shutdown_started_receiver.await.is_ok() {
                tokio::time::sleep(drain).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = server => result.context("grpc server failed")?,
            () = drain_deadline => tracing::warn!(drain_seconds = drain.as_secs(), "drain deadline passed, abandoning unfinished calls"),
        }

        drop(drain_done);
        readiness.begin_shutdown();
        lifecycle_task.abort();
        housekeeping_task.abort();
        if let Some(task) = tls_reload_task {
            task.abort();
        }
        partition_task.abort();
        fold_task.abort();
        if self_tracking {
            service.track_lifecycle(EVENT_STOPPING, lifecycle_properties()).await;
        }
        admin_task.await.ok();
        probe_task.abort();
        health_task.abort();
        // Calls still queued for a group commit are written before the pool closes.
        ingest_writer.stop(config.shutdown_drain()).await;
        database.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The rate limiter (Redis-shared when Redis is configured), the PII cipher and the
/// mTLS configuration; each says in the log what it runs with.
fn security_from_config(
    config: &Config,
) -> anyhow::Result<(RateLimiter, PiiCipher, Option<ReloadingTlsConfig>)> {
    let per_minute = config.rate_limit_events_per_user_per_minute;
    let rate_limiter = match SharedBudgets::from_config(config)
        .context("invalid redis settings (REDIS_HOST, REDIS_PORT, REDIS_TLS_CA_FILE)")?
    {
        Some(shared) => {
            tracing::info!(per_minute, "rate limits shared through redis, local fallback");
            RateLimiter::shared_per_minute(per_minute, config.rate_limit_expected_replicas, shared)
        }
        None => {
            tracing::info!(per_minute, "redis not configured: rate limits per replica");
            RateLimiter::per_minute(per_minute)
        }
    };
    let pii = match config.pii_keys()? {
        Some(keys) => {
            tracing::info!(fields = %config.pii_fields.trim(), current_key_id = keys.current_key_id(), "pii encryption on");
            PiiCipher::new(config.pii_fields(), keys)
        }
        None => {
            tracing::warn!("pii encryption off: set PII_KEYS_FILE to encrypt PII_FIELDS at rest");
            PiiCipher::disabled()
        }
    };
    let tls = match config.tls_files() {
        Some(files) => Some(ReloadingTlsConfig::load(files).context("loading the mTLS files")?),
        None => {
            tracing::warn!(
                "grpc port in plaintext: set TLS_CERT_FILE, TLS_KEY_FILE and TLS_CLIENT_CA_FILE for mTLS"
            );
            None
        }
    };
    Ok((rate_limiter, pii, tls))
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
    mut readiness: tokio::sync::watch::Receiver<crate::service::readiness::Readiness>,
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
