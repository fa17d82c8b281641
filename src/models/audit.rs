//! One record of the audit trail of administrative calls (table `admin_audit`): which
//! RPC, who called it, which user it concerned (by keyed hash only, never the user id),
//! the erasure request it names, how it ended and what it did.

use uuid::Uuid;

use super::rpc::Rpc;
use crate::security::subject::SubjectHash;

/// Outcome of a call that succeeded; failed calls record their gRPC code name
/// (`PERMISSION_DENIED`, `FAILED_PRECONDITION`, `CANCELLED`, ...).
pub(crate) const AUDIT_OUTCOME_OK: &str = "ok";

/// What is recorded about one administrative call when it ends.
#[derive(Clone, Debug)]
pub(crate) struct AuditRecord<'a> {
    pub(crate) rpc: Rpc,
    /// The caller's identity (its verified certificate identity under mTLS, its peer
    /// address in plaintext).
    pub(crate) caller: &'a str,
    /// The keyed hash of the user id the call names; `None` when the call names none or
    /// no SUPPRESSION_KEY_FILE is configured.
    pub(crate) subject: Option<SubjectHash>,
    /// The erasure request the call created or read.
    pub(crate) request_id: Option<Uuid>,
    /// [`AUDIT_OUTCOME_OK`] or the gRPC code name the call ended with.
    pub(crate) outcome: &'a str,
    /// Counts of what the call did (a JSON object, never property values or user ids),
    /// e.g. `{"events_exported": 12, "identity_exported": true}`.
    pub(crate) details: serde_json::Value,
}
