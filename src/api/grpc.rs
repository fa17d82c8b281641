//! The AnalyticsService gRPC handlers: convert the request, call the service, convert
//! the answer. No business rules live here.

use std::sync::Arc;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::convert;
use crate::metrics;
use crate::models::{IdentifyUser, TrackEvent};
use crate::pb;
use crate::pb::analytics_service_server::AnalyticsService as AnalyticsApi;
use crate::service::readiness::Readiness;
use crate::service::{AnalyticsService, ServiceError, ServingStatus};

/// Implements the generated server trait on top of [`AnalyticsService`].
#[derive(Clone)]
pub struct AnalyticsGrpc {
    service: Arc<AnalyticsService>,
    readiness: watch::Receiver<Readiness>,
}

impl AnalyticsGrpc {
    pub fn new(service: Arc<AnalyticsService>, readiness: watch::Receiver<Readiness>) -> Self {
        Self { service, readiness }
    }
}

/// Who called: the peer IP address (the TLS identity once mTLS is on).
fn caller<T>(request: &Request<T>) -> String {
    request.remote_addr().map_or_else(|| "unknown".to_string(), |address| address.ip().to_string())
}

#[tonic::async_trait]
impl AnalyticsApi for AnalyticsGrpc {
    #[tracing::instrument(skip_all, fields(rpc.method = "TrackEvent"))]
    async fn track_event(
        &self,
        request: Request<pb::TrackEventRequest>,
    ) -> Result<Response<pb::TrackEventResponse>, Status> {
        let caller = caller(&request);
        let event = TrackEvent::try_from(request.into_inner()).map_err(|error| {
            metrics::record_event_rejected("invalid_argument");
            ServiceError::from(error)
        })?;
        let event_id = self.service.track_event(event, &caller).await?;
        Ok(Response::new(pb::TrackEventResponse { success: true, event_id: event_id.to_string() }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = "IdentifyUser"))]
    async fn identify_user(
        &self,
        request: Request<pb::IdentifyUserRequest>,
    ) -> Result<Response<pb::IdentifyUserResponse>, Status> {
        let caller = caller(&request);
        let identity = IdentifyUser::try_from(request.into_inner()).map_err(ServiceError::from)?;
        self.service.identify_user(identity, &caller).await?;
        Ok(Response::new(pb::IdentifyUserResponse { success: true }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = "GetEventCount"))]
    async fn get_event_count(
        &self,
        request: Request<pb::GetEventCountRequest>,
    ) -> Result<Response<pb::GetEventCountResponse>, Status> {
        let filter =
            convert::event_filter(request.into_inner(), chrono::Utc::now()).map_err(ServiceError::from)?;
        let counts = self.service.event_counts(filter).await?;
        Ok(Response::new(pb::GetEventCountResponse { counts: counts.into_iter().map(Into::into).collect() }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = "GetUserCount"))]
    async fn get_user_count(
        &self,
        request: Request<pb::GetUserCountRequest>,
    ) -> Result<Response<pb::GetUserCountResponse>, Status> {
        let range =
            convert::user_count_range(request.get_ref(), chrono::Utc::now()).map_err(ServiceError::from)?;
        let unique_users = self.service.unique_users(range).await?;
        Ok(Response::new(pb::GetUserCountResponse { unique_users }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = "HealthCheck"))]
    async fn health_check(
        &self,
        _request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        let shutting_down = self.readiness.borrow().shutting_down;
        let status = match self.service.health().await {
            ServingStatus::Serving if !shutting_down => "SERVING",
            _ => "NOT_SERVING",
        };
        Ok(Response::new(pb::HealthCheckResponse { status: status.to_string() }))
    }
}
