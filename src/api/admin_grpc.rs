//! The AnalyticsAdminService gRPC handlers (erasure and access requests): authorize the
//! caller (closed by default, see [`crate::security::authorization::AdminAccess`]),
//! convert the request, call the service, convert the answer. No business rules here.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::middleware::RequestDeadline;
use crate::metrics;
use crate::models::rpc::Rpc;
use crate::models::UserId;
use crate::pb;
use crate::pb::analytics_admin_service_server::AnalyticsAdminService as AdminApi;
use crate::repository::postgres::erasure::ErasureRequest;
use crate::security::authorization::CallerPolicy;
use crate::security::caller::CallerIdentity;
use crate::service::erasure::hex;
use crate::service::{AnalyticsService, ServiceError, ValidationError};

/// Implements the generated admin server trait on top of [`AnalyticsService`].
#[derive(Clone)]
pub(crate) struct AdminGrpc {
    service: Arc<AnalyticsService>,
    callers: Arc<CallerPolicy>,
}

impl AdminGrpc {
    pub(crate) fn new(service: Arc<AnalyticsService>, callers: CallerPolicy) -> Self {
        Self { service, callers: Arc::new(callers) }
    }

    /// The caller of `request`, recorded on the handler span; PERMISSION_DENIED unless
    /// the policy opens `rpc` to it.
    fn authorize<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<CallerIdentity, Status> {
        let caller = CallerIdentity::of(request.extensions());
        tracing::Span::current().record("caller", caller.name());
        if self.callers.allows(rpc, caller.name()) {
            return Ok(caller);
        }
        let rpc = rpc.method();
        metrics::record_permission_denied(rpc);
        tracing::warn!(
            caller = caller.name(),
            rpc,
            "administrative rpc not allowed for this caller, permission denied"
        );
        Err(ServiceError::PermissionDenied.into())
    }
}

/// A call's deadline when no middleware set one (the server always does).
const UNSET_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// An erasure request as the API shows it.
fn user_deletion(erasure: ErasureRequest) -> pb::UserDeletion {
    let state = if erasure.is_completed() {
        pb::UserDeletionState::Completed
    } else {
        pb::UserDeletionState::Running
    };
    pb::UserDeletion {
        request_id: erasure.id.to_string(),
        state: state.into(),
        subject_hash: hex(&erasure.subject_hash),
        suppress: erasure.suppress,
        events_deleted: erasure.events_deleted,
        identity_deleted: erasure.identity_deleted,
        insert_ids_deleted: erasure.insert_ids_deleted,
        requested_at: erasure.requested_at.timestamp(),
        completed_at: erasure.completed_at.map_or(0, |at| at.timestamp()),
    }
}

/// The stream ExportUser answers with.
pub(crate) type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportUserResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AdminApi for AdminGrpc {
    type ExportUserStream = ExportStream;

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::DeleteUser.method(), caller = tracing::field::Empty))]
    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let _caller = self.authorize(&request, Rpc::DeleteUser)?;
        self.service.subject_hasher()?;
        let deadline = RequestDeadline::of(&request, UNSET_DEADLINE);
        let request = request.into_inner();
        let user_id = UserId::parse(request.user_id).map_err(ServiceError::from)?;
        let erasure = self.service.delete_user(&user_id, request.suppress, deadline).await?;
        Ok(Response::new(pb::DeleteUserResponse { deletion: Some(user_deletion(erasure)) }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::GetUserDeletion.method(), caller = tracing::field::Empty))]
    async fn get_user_deletion(
        &self,
        request: Request<pb::GetUserDeletionRequest>,
    ) -> Result<Response<pb::GetUserDeletionResponse>, Status> {
        let _caller = self.authorize(&request, Rpc::GetUserDeletion)?;
        self.service.subject_hasher()?;
        let id = uuid::Uuid::parse_str(&request.get_ref().request_id).map_err(|_| {
            ServiceError::from(ValidationError::new("request_id", "must be a request_id DeleteUser answered"))
        })?;
        let erasure = self.service.user_deletion(id).await?;
        Ok(Response::new(pb::GetUserDeletionResponse { deletion: Some(user_deletion(erasure)) }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::LiftSuppression.method(), caller = tracing::field::Empty))]
    async fn lift_suppression(
        &self,
        request: Request<pb::LiftSuppressionRequest>,
    ) -> Result<Response<pb::LiftSuppressionResponse>, Status> {
        let _caller = self.authorize(&request, Rpc::LiftSuppression)?;
        self.service.subject_hasher()?;
        let user_id = UserId::parse(request.into_inner().user_id).map_err(ServiceError::from)?;
        let lifted = self.service.lift_suppression(&user_id).await?;
        // audit: the caller, the user's keyed hash and `lifted` are this call's record.
        Ok(Response::new(pb::LiftSuppressionResponse { lifted }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::ExportUser.method(), caller = tracing::field::Empty))]
    async fn export_user(
        &self,
        request: Request<pb::ExportUserRequest>,
    ) -> Result<Response<Self::ExportUserStream>, Status> {
        let _caller = self.authorize(&request, Rpc::ExportUser)?;
        self.service.subject_hasher()?;
        Err(Status::unimplemented("ExportUser is not implemented yet"))
    }
}
