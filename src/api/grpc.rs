//! The AnalyticsService gRPC handlers: convert the request, call the service, convert
//! the answer. No business rules live here.

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::convert;
use super::middleware::RequestDeadline;
use crate::metrics;
use crate::models::rpc::Rpc;
use crate::models::{Caller, IdentifyUser, TrackEvent};
use crate::pb;
use crate::pb::analytics_service_server::AnalyticsService as AnalyticsApi;
use crate::security::authorization::CallerPolicy;
use crate::security::caller::CallerIdentity;
use crate::service::readiness::Readiness;
use crate::service::{validation, AnalyticsService, Identified, ServiceError, Stored};

/// A call's deadline when no middleware set one (the server always does).
const UNSET_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Implements the generated server trait on top of [`AnalyticsService`].
#[derive(Clone)]
pub(crate) struct AnalyticsGrpc {
    service: Arc<AnalyticsService>,
    readiness: watch::Receiver<Readiness>,
    callers: Arc<CallerPolicy>,
}

impl AnalyticsGrpc {
    pub(crate) fn new(service: Arc<AnalyticsService>, readiness: watch::Receiver<Readiness>) -> Self {
        Self { service, readiness, callers: Arc::new(CallerPolicy::default()) }
    }

    /// Restricts the RPCs to the callers TLS_ALLOWED_CALLERS(_PER_RPC) name.
    pub(crate) fn with_caller_policy(self, callers: CallerPolicy) -> Self {
        Self { callers: Arc::new(callers), ..self }
    }

    /// The caller of `request` (see [`CallerIdentity`]), recorded on the handler span;
    /// PERMISSION_DENIED when not on the allow-list of `rpc`.
    fn authorize<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<CallerIdentity, Status> {
        let caller = CallerIdentity::of(request.extensions());
        tracing::Span::current().record("caller", caller.name());
        if self.callers.allows(rpc, caller.name()) {
            return Ok(caller);
        }
        let rpc = rpc.method();
        metrics::record_permission_denied(rpc);
        tracing::warn!(caller = caller.name(), rpc, "caller not on the allow-list, permission denied");
        Err(ServiceError::PermissionDenied.into())
    }

    /// [`Self::authorize`], as the [`Caller`] the service takes.
    fn authorized_caller<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<Caller, Status> {
        let caller = self.authorize(request, rpc)?;
        Ok(Caller { key_scope: caller.key_scope().to_string(), name: caller.name().to_string() })
    }
}

/// Guards server reflection with TLS_ALLOWED_CALLERS (a tonic interceptor):
/// PERMISSION_DENIED for a caller not on the list, counted like the RPCs' refusals.
pub(crate) fn reflection_guard(
    callers: CallerPolicy,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    let callers = Arc::new(callers);
    move |request: Request<()>| {
        let caller = CallerIdentity::of(request.extensions());
        if callers.allows_reflection(caller.name()) {
            return Ok(request);
        }
        metrics::record_permission_denied(Rpc::ReflectionV1.method());
        tracing::warn!(caller = caller.name(), "caller not on the allow-list, reflection denied");
        Err(ServiceError::PermissionDenied.into())
    }
}

#[tonic::async_trait]
impl AnalyticsApi for AnalyticsGrpc {
    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::TrackEvent.method(), caller = tracing::field::Empty))]
    async fn track_event(
        &self,
        request: Request<pb::TrackEventRequest>,
    ) -> Result<Response<pb::TrackEventResponse>, Status> {
        let caller = self.authorized_caller(&request, Rpc::TrackEvent)?;
        let deadline = RequestDeadline::of(&request, UNSET_DEADLINE);
        let event = TrackEvent::try_from(request.into_inner()).map_err(|error| {
            metrics::record_event_rejected("invalid_argument");
            ServiceError::from(error)
        })?;
        let stored = self.service.track_event(event, &caller, deadline).await?;
        Ok(Response::new(pb::TrackEventResponse {
            success: true,
            event_id: stored.event_id().map(|id| id.to_string()).unwrap_or_default(),
            suppressed: stored == Stored::Suppressed,
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::TrackEvents.method(), caller = tracing::field::Empty))]
    async fn track_events(
        &self,
        request: Request<pb::TrackEventsRequest>,
    ) -> Result<Response<pb::TrackEventsResponse>, Status> {
        let caller = self.authorized_caller(&request, Rpc::TrackEvents)?;
        let deadline = RequestDeadline::of(&request, UNSET_DEADLINE);
        let request = request.into_inner();
        validation::check_batch(request.events.len(), request.encoded_len()).map_err(|error| {
            metrics::record_events_rejected("invalid_argument", request.events.len() as u64);
            ServiceError::from(error)
        })?;
        let events = request.events.into_iter().map(TrackEvent::try_from).collect();
        let results = self.service.track_events(events, &caller, deadline).await?;
        Ok(Response::new(convert::track_events_response(results)))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::IdentifyUser.method(), caller = tracing::field::Empty))]
    async fn identify_user(
        &self,
        request: Request<pb::IdentifyUserRequest>,
    ) -> Result<Response<pb::IdentifyUserResponse>, Status> {
        let caller = self.authorize(&request, Rpc::IdentifyUser)?;
        let deadline = RequestDeadline::of(&request, UNSET_DEADLINE);
        let identity = IdentifyUser::try_from(request.into_inner()).map_err(ServiceError::from)?;
        let identified = self.service.identify_user(identity, caller.name(), deadline).await?;
        Ok(Response::new(pb::IdentifyUserResponse {
            success: true,
            suppressed: identified == Identified::Suppressed,
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::GetEventCount.method(), caller = tracing::field::Empty))]
    async fn get_event_count(
        &self,
        request: Request<pb::GetEventCountRequest>,
    ) -> Result<Response<pb::GetEventCountResponse>, Status> {
        self.authorize(&request, Rpc::GetEventCount)?;
        let filter =
            convert::event_filter(request.into_inner(), chrono::Utc::now()).map_err(ServiceError::from)?;
        let counts = self.service.event_counts(filter).await?;
        Ok(Response::new(pb::GetEventCountResponse { counts: counts.into_iter().map(Into::into).collect() }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::GetUserCount.method(), caller = tracing::field::Empty))]
    async fn get_user_count(
        &self,
        request: Request<pb::GetUserCountRequest>,
    ) -> Result<Response<pb::GetUserCountResponse>, Status> {
        self.authorize(&request, Rpc::GetUserCount)?;
        let range =
            convert::user_count_range(request.get_ref(), chrono::Utc::now()).map_err(ServiceError::from)?;
        let unique_users = self.service.unique_users(range).await?;
        Ok(Response::new(pb::GetUserCountResponse { unique_users }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::HealthCheck.method(), caller = tracing::field::Empty))]
    async fn health_check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        self.authorize(&request, Rpc::HealthCheck)?;
        // The readiness monitor's latest probe (no query per call); see Readiness::is_healthy.
        let status = if self.readiness.borrow().is_healthy() { "SERVING" } else { "NOT_SERVING" };
        Ok(Response::new(pb::HealthCheckResponse { status: status.to_string() }))
    }
}
