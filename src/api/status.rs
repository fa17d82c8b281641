//! The one place a [`ServiceError`] becomes a gRPC status. Callers never see SQL,
//! hostnames or stack traces: those stay in the logs.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::service::ServiceError;

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::InvalidArgument(validation) => Status::invalid_argument(validation.to_string()),
            ServiceError::RateLimited { retry_after_seconds } => {
                let mut status = Status::new(Code::ResourceExhausted, "rate limit exceeded");
                status.metadata_mut().insert("retry-after", MetadataValue::from(retry_after_seconds));
                status
            }
            ServiceError::PermissionDenied => Status::permission_denied("caller not allowed"),
            ServiceError::Overloaded => Status::resource_exhausted("ingest queue full, retry later"),
            ServiceError::Unavailable(reason) => Status::unavailable(reason),
            ServiceError::DeadlineExceeded { outcome_unknown: false } => {
                Status::deadline_exceeded("deadline exceeded before the call was written; nothing was stored")
            }
            ServiceError::DeadlineExceeded { outcome_unknown: true } => Status::deadline_exceeded(
                "deadline exceeded while the call was being committed; outcome unknown, retry with the same insert_id",
            ),
            ServiceError::FailedPrecondition(reason) => Status::failed_precondition(reason),
            ServiceError::NotFound(reason) => Status::not_found(reason),
            ServiceError::Internal => Status::internal("internal error"),
        }
    }
}

/// How an administrative call ended, as its audit record says: `ok`, else the
/// canonical name of its gRPC code (`PERMISSION_DENIED`, `CANCELLED`, ...).
pub(crate) fn audit_outcome(code: Code) -> &'static str {
    match code {
        Code::Ok => crate::models::AUDIT_OUTCOME_OK,
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ValidationError;

    #[test]
    fn every_error_maps_to_its_code() {
        let invalid: Status =
            ServiceError::InvalidArgument(ValidationError::new("event_name", "must not be empty")).into();
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.message(), "event_name: must not be empty");

        let limited: Status = ServiceError::RateLimited { retry_after_seconds: 7 }.into();
        assert_eq!(limited.code(), Code::ResourceExhausted);
        assert_eq!(limited.metadata().get("retry-after").unwrap(), "7");

        let denied: Status = ServiceError::PermissionDenied.into();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(denied.message(), "caller not allowed");
        let overloaded: Status = ServiceError::Overloaded.into();
        assert_eq!(overloaded.code(), Code::ResourceExhausted);
        assert_eq!(overloaded.message(), "ingest queue full, retry later");

        let unavailable: Status = ServiceError::Unavailable("database unavailable").into();
        assert_eq!(unavailable.code(), Code::Unavailable);

        let withdrawn: Status = ServiceError::DeadlineExceeded { outcome_unknown: false }.into();
        assert_eq!(withdrawn.code(), Code::DeadlineExceeded);
        let unknown: Status = ServiceError::DeadlineExceeded { outcome_unknown: true }.into();
        assert_eq!(unknown.code(), Code::DeadlineExceeded);
        assert!(unknown.message().contains("insert_id"));

        let internal: Status = ServiceError::Internal.into();
        assert_eq!(internal.code(), Code::Internal);
        assert_eq!(internal.message(), "internal error");
    }

    #[test]
    fn audit_outcomes_are_ok_or_the_canonical_code_name() {
        assert_eq!(audit_outcome(Code::Ok), "ok");
        assert_eq!(audit_outcome(Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(audit_outcome(Code::FailedPrecondition), "FAILED_PRECONDITION");
        assert_eq!(audit_outcome(Code::Cancelled), "CANCELLED");
    }
}
