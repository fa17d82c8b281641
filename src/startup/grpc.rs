//! The gRPC port: the services it carries (AnalyticsService, AnalyticsAdminService,
//! grpc.health, reflection
//! behind its caller guard), the connection limits of GRPC_*, and serving over mTLS or
//! plaintext until the shutdown signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::api::admin_grpc::AdminGrpc;
use crate::api::grpc::{reflection_guard, AnalyticsGrpc};
use crate::api::middleware::GrpcObservabilityLayer;
use crate::api::preface::with_preface_deadline;
use crate::config::{GrpcConfig, TlsConfig};
use crate::pb;
use crate::pb::analytics_admin_service_server::AnalyticsAdminServiceServer;
use crate::pb::analytics_service_server::AnalyticsServiceServer;
use crate::security::tls::{tls_incoming, HandshakeLimits, ReloadingTlsConfig};
use crate::service::readiness::Readiness;
use crate::service::AnalyticsService;

/// What the gRPC port serves.
pub(super) struct GrpcServices<H> {
    pub(super) service: Arc<AnalyticsService>,
    pub(super) readiness: watch::Receiver<Readiness>,
    /// grpc.health, following readiness.
    pub(super) health: HealthServer<H>,
}

/// Serves `services` on `listener` (over mTLS when `tls` is set) until `signal`
/// resolves, then lets in-flight calls finish.
pub(super) async fn serve<H: Health>(
    listener: TcpListener,
    tls: Option<ReloadingTlsConfig>,
    grpc: &GrpcConfig,
    callers: &TlsConfig,
    services: GrpcServices<H>,
    signal: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
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
    let reflection_callers = callers.reflection_callers();
    let reflection_v1 = InterceptedService::new(reflection_v1, reflection_guard(reflection_callers.clone()));
    let reflection_v1alpha =
        InterceptedService::new(reflection_v1alpha, reflection_guard(reflection_callers));
    let admin =
        AnalyticsAdminServiceServer::new(AdminGrpc::new(services.service.clone(), callers.callers.clone()))
            .max_decoding_message_size(grpc.max_message_bytes);
    let analytics = AnalyticsServiceServer::new(
        AnalyticsGrpc::new(services.service, services.readiness).with_caller_policy(callers.callers.clone()),
    )
    .max_decoding_message_size(grpc.max_message_bytes);

    // No Server::timeout: the middleware owns the deadline, so a call cut short by it is
    // answered DEADLINE_EXCEEDED (tonic's own timer answers CANCELLED) and counted.
    let mut builder = Server::builder()
        .max_concurrent_streams(grpc.max_concurrent_streams)
        .http2_max_header_list_size(grpc.max_header_list_bytes)
        .http2_keepalive_interval(Some(grpc.keepalive_interval))
        .http2_keepalive_timeout(Some(grpc.keepalive_timeout))
        .layer(GrpcObservabilityLayer::new(grpc.request_timeout));
    if let Some(age) = grpc.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    let router = builder
        .add_service(services.health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(analytics)
        .add_service(admin);
    let preface_timeout = grpc.handshake_timeout;
    match tls {
        Some(tls) => {
            let limits = HandshakeLimits {
                timeout: grpc.handshake_timeout,
                max_pending: grpc.max_pending_tls_handshakes,
            };
            let incoming = tls_incoming(listener, tls, limits);
            router
                .serve_with_incoming_shutdown(with_preface_deadline(incoming, preface_timeout), signal)
                .await
        }
        None => {
            // tonic ignores Server::tcp_nodelay for a caller-supplied listener: without
            // TCP_NODELAY, small responses wait for the peer's delayed ACK (about 40 ms).
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(with_preface_deadline(incoming, preface_timeout), signal)
                .await
        }
    }
    .context("grpc server failed")
}
