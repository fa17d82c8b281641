//! The AnalyticsAdminService gRPC handlers (erasure and access requests): admit the
//! caller (closed by default, see [`crate::security::authorization::AdminAccess`], and
//! only with SUPPRESSION_KEY_FILE configured), convert the request, call the service,
//! convert the answer. No business rules here.
//!
//! Every call is audited ([`AnalyticsService::audit`]): a refused call
//! (PERMISSION_DENIED, FAILED_PRECONDITION) by [`AdminGrpc::admit`] before it answers,
//! DeleteUser, GetUserDeletion and LiftSuppression with their outcome and counts,
//! ExportUser when its stream ends (before the client sees the end; a client that goes
//! away is recorded as CANCELLED) with the number of events handed to the transport and
//! whether the identity was.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;
use uuid::Uuid;

use super::middleware::RequestDeadline;
use super::status::audit_outcome;
use crate::metrics;
use crate::models::rpc::Rpc;
use crate::models::{AuditRecord, ExportItem, UserId};
use crate::pb;
use crate::pb::analytics_admin_service_server::AnalyticsAdminService as AdminApi;
use crate::repository::postgres::erasure::ErasureRequest;
use crate::security::authorization::CallerPolicy;
use crate::security::caller::CallerIdentity;
use crate::security::subject::{SubjectHash, SubjectHasher};
use crate::service::export::{ExportStep, ExportSteps};
use crate::service::{AnalyticsService, ServiceError, ValidationError};

/// Implements the generated admin server trait on top of [`AnalyticsService`].
#[derive(Clone)]
pub(crate) struct AdminGrpc {
    service: Arc<AnalyticsService>,
    callers: Arc<CallerPolicy>,
}

/// A caller the policy lets in, on a replica that can name users by their keyed hash.
pub(crate) struct Admitted<'a> {
    pub(crate) caller: CallerIdentity,
    pub(crate) subjects: &'a SubjectHasher,
}

/// What an administrative request names, for the audit record of its refusal.
pub(crate) trait AuditedRequest {
    /// The user id the request names; empty when it names none.
    fn user_id(&self) -> &str {
        ""
    }

    /// The erasure request the request names.
    fn request_id(&self) -> Option<Uuid> {
        None
    }
}

impl AuditedRequest for pb::DeleteUserRequest {
    fn user_id(&self) -> &str {
        &self.user_id
    }
}

impl AuditedRequest for pb::GetUserDeletionRequest {
    fn request_id(&self) -> Option<Uuid> {
        Uuid::parse_str(&self.request_id).ok()
    }
}

impl AuditedRequest for pb::LiftSuppressionRequest {
    fn user_id(&self) -> &str {
        &self.user_id
    }
}

impl AuditedRequest for pb::ExportUserRequest {
    fn user_id(&self) -> &str {
        &self.user_id
    }
}

impl AdminGrpc {
    pub(crate) fn new(service: Arc<AnalyticsService>, callers: CallerPolicy) -> Self {
        Self { service, callers: Arc::new(callers) }
    }

    /// The caller of `request` (recorded on the handler span) and the keyed hash of user
    /// ids, or the refusal, audited: PERMISSION_DENIED unless the policy opens `rpc` to
    /// the caller, FAILED_PRECONDITION without SUPPRESSION_KEY_FILE.
    async fn admit<T: AuditedRequest>(&self, request: &Request<T>, rpc: Rpc) -> Result<Admitted<'_>, Status> {
        let caller = CallerIdentity::of(request.extensions());
        tracing::Span::current().record("caller", caller.name());
        let refusal = if self.callers.allows(rpc, caller.name()) {
            match self.service.subject_hasher() {
                Ok(subjects) => return Ok(Admitted { caller, subjects }),
                Err(error) => error,
            }
        } else {
            metrics::record_permission_denied(rpc.method());
            tracing::warn!(
                caller = caller.name(),
                rpc = rpc.method(),
                "administrative rpc not allowed for this caller, permission denied"
            );
            ServiceError::PermissionDenied
        };
        let status = Status::from(refusal);
        let message = request.get_ref();
        let subject =
            self.service.subject_hasher().ok().and_then(|subjects| subject_of(subjects, message.user_id()));
        self.service
            .audit(AuditRecord {
                rpc,
                caller: caller.name(),
                subject,
                request_id: message.request_id(),
                outcome: audit_outcome(status.code()),
                details: serde_json::json!({}),
            })
            .await;
        Err(status)
    }

    /// Audits an admitted unary call's answer: `ok` with `details`, or the status code.
    async fn audit_answer<T>(
        &self,
        rpc: Rpc,
        caller: &CallerIdentity,
        subject: Option<SubjectHash>,
        request_id: Option<Uuid>,
        answer: &Result<T, Status>,
        details: serde_json::Value,
    ) {
        let outcome = audit_outcome(answer.as_ref().err().map_or(Code::Ok, Status::code));
        self.service
            .audit(AuditRecord { rpc, caller: caller.name(), subject, request_id, outcome, details })
            .await;
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
        subject_hash: erasure.subject_hash.to_hex(),
        suppress: erasure.suppress,
        events_deleted: erasure.events_deleted,
        identity_deleted: erasure.identity_deleted,
        insert_ids_deleted: erasure.insert_ids_deleted,
        requested_at: erasure.requested_at.timestamp(),
        completed_at: erasure.completed_at.map_or(0, |at| at.timestamp()),
    }
}

/// The keyed hash of `user_id`; `None` for an empty one (the request names no user).
fn subject_of(subjects: &SubjectHasher, user_id: &str) -> Option<SubjectHash> {
    (!user_id.is_empty()).then(|| subjects.hash(user_id))
}

/// The stream ExportUser answers with.
pub(crate) type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportUserResponse, Status>> + Send>>;

type AuditFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the audit record of one ExportUser call says, gathered while it streams.
struct ExportAudit {
    service: Arc<AnalyticsService>,
    caller: String,
    subject: Option<SubjectHash>,
    identity_exported: bool,
    events_exported: u64,
    /// The handler's span: the record is written after the handler returned.
    span: tracing::Span,
}

impl ExportAudit {
    fn count(&mut self, item: &ExportItem) {
        match item {
            ExportItem::Identity(_) => self.identity_exported = true,
            ExportItem::Event(_) => self.events_exported += 1,
        }
    }

    /// Records the call as ended with `code`.
    fn record(self, code: Code) -> AuditFuture {
        let span = self.span.clone();
        let recording = async move {
            let details = serde_json::json!({
                "events_exported": self.events_exported,
                "identity_exported": self.identity_exported,
            });
            self.service
                .audit(AuditRecord {
                    rpc: Rpc::ExportUser,
                    caller: &self.caller,
                    subject: self.subject,
                    request_id: None,
                    outcome: audit_outcome(code),
                    details,
                })
                .await;
        };
        Box::pin(recording.instrument(span))
    }
}

/// The response stream of ExportUser: the service's items as messages, and the audit
/// record once they end (written before the end reaches the client) or the client goes
/// away (written by a task of its own).
struct AuditedExport {
    items: ExportSteps,
    /// Until the export ends.
    audit: Option<ExportAudit>,
    /// The audit record being written after the end.
    recording: Option<AuditFuture>,
}

impl Stream for AuditedExport {
    type Item = Result<pb::ExportUserResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(recording) = this.recording.as_mut() {
                ready!(recording.as_mut().poll(context));
                this.recording = None;
                return Poll::Ready(None);
            }
            let Some(audit) = this.audit.as_mut() else { return Poll::Ready(None) };
            let failure = match ready!(this.items.poll_recv(context)) {
                Some(ExportStep::Item(item)) => {
                    audit.count(&item);
                    return Poll::Ready(Some(Ok(item.into())));
                }
                Some(ExportStep::Complete) => {
                    this.recording = this.audit.take().map(|audit| audit.record(Code::Ok));
                    continue;
                }
                Some(ExportStep::Failed(error)) => Status::from(error),
                None => {
                    tracing::error!(rpc = Rpc::ExportUser.method(), "export ended without completing");
                    Status::from(ServiceError::Internal)
                }
            };
            this.recording = this.audit.take().map(|audit| audit.record(failure.code()));
            return Poll::Ready(Some(Err(failure)));
        }
    }
}

impl Drop for AuditedExport {
    fn drop(&mut self) {
        let unfinished = match (self.audit.take(), self.recording.take()) {
            (Some(audit), _) => audit.record(Code::Cancelled),
            (None, Some(recording)) => recording,
            (None, None) => return,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(unfinished)),
            Err(_) => tracing::error!(rpc = Rpc::ExportUser.method(), "audit record not stored: no runtime"),
        }
    }
}

#[tonic::async_trait]
impl AdminApi for AdminGrpc {
    type ExportUserStream = ExportStream;

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::DeleteUser.method(), caller = tracing::field::Empty))]
    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let Admitted { caller, subjects } = self.admit(&request, Rpc::DeleteUser).await?;
        let deadline = RequestDeadline::of(&request, UNSET_DEADLINE);
        let request = request.into_inner();
        let subject = subject_of(subjects, &request.user_id);
        let suppress = request.suppress;
        let result = async {
            let user_id = UserId::parse(request.user_id).map_err(ServiceError::from)?;
            self.service.delete_user(&user_id, suppress, deadline).await
        }
        .await;
        let details = match &result {
            Ok(erasure) => serde_json::json!({
                "suppress": erasure.suppress,
                "completed": erasure.is_completed(),
                "events_deleted": erasure.events_deleted,
                "insert_ids_deleted": erasure.insert_ids_deleted,
                "identity_deleted": erasure.identity_deleted,
            }),
            Err(_) => serde_json::json!({ "suppress": suppress }),
        };
        let request_id = result.as_ref().ok().map(|erasure| erasure.id);
        let result = result.map_err(Status::from);
        self.audit_answer(Rpc::DeleteUser, &caller, subject, request_id, &result, details).await;
        Ok(Response::new(pb::DeleteUserResponse { deletion: Some(user_deletion(result?)) }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::GetUserDeletion.method(), caller = tracing::field::Empty))]
    async fn get_user_deletion(
        &self,
        request: Request<pb::GetUserDeletionRequest>,
    ) -> Result<Response<pb::GetUserDeletionResponse>, Status> {
        let Admitted { caller, subjects: _ } = self.admit(&request, Rpc::GetUserDeletion).await?;
        let request_id = request.get_ref().request_id();
        let result = async {
            let id = request_id.ok_or_else(|| {
                ServiceError::from(ValidationError::new(
                    "request_id",
                    "must be a request_id DeleteUser answered",
                ))
            })?;
            self.service.user_deletion(id).await
        }
        .await;
        let details = match &result {
            Ok(erasure) => serde_json::json!({
                "completed": erasure.is_completed(),
                "events_deleted": erasure.events_deleted,
            }),
            Err(_) => serde_json::json!({}),
        };
        // The erasure's keyed hash names the user of the request read.
        let subject = result.as_ref().ok().map(|erasure| erasure.subject_hash);
        let result = result.map_err(Status::from);
        self.audit_answer(Rpc::GetUserDeletion, &caller, subject, request_id, &result, details).await;
        Ok(Response::new(pb::GetUserDeletionResponse { deletion: Some(user_deletion(result?)) }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::LiftSuppression.method(), caller = tracing::field::Empty))]
    async fn lift_suppression(
        &self,
        request: Request<pb::LiftSuppressionRequest>,
    ) -> Result<Response<pb::LiftSuppressionResponse>, Status> {
        let Admitted { caller, subjects } = self.admit(&request, Rpc::LiftSuppression).await?;
        let user_id = request.into_inner().user_id;
        let subject = subject_of(subjects, &user_id);
        let result = async {
            let user_id = UserId::parse(user_id).map_err(ServiceError::from)?;
            self.service.lift_suppression(&user_id).await
        }
        .await;
        let details = match &result {
            Ok(lifted) => serde_json::json!({ "lifted": lifted }),
            Err(_) => serde_json::json!({}),
        };
        let result = result.map_err(Status::from);
        self.audit_answer(Rpc::LiftSuppression, &caller, subject, None, &result, details).await;
        Ok(Response::new(pb::LiftSuppressionResponse { lifted: result? }))
    }

    #[tracing::instrument(skip_all, fields(rpc.method = Rpc::ExportUser.method(), caller = tracing::field::Empty))]
    async fn export_user(
        &self,
        request: Request<pb::ExportUserRequest>,
    ) -> Result<Response<Self::ExportUserStream>, Status> {
        let Admitted { caller, subjects } = self.admit(&request, Rpc::ExportUser).await?;
        let user_id = request.into_inner().user_id;
        let audit = ExportAudit {
            service: self.service.clone(),
            caller: caller.name().to_string(),
            subject: subject_of(subjects, &user_id),
            identity_exported: false,
            events_exported: 0,
            span: tracing::Span::current(),
        };
        let started = async {
            let user_id = UserId::parse(user_id)?;
            self.service.export_user(user_id).await
        };
        match started.await {
            Ok(items) => {
                Ok(Response::new(Box::pin(AuditedExport { items, audit: Some(audit), recording: None })))
            }
            Err(error) => {
                let status = Status::from(error);
                audit.record(status.code()).await;
                Err(status)
            }
        }
    }
}
