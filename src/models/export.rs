//! What ExportUser hands out for an access request: a user's identity and events as
//! stored, sensitive values decrypted.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::UserId;

/// The stored identity of a user (IdentifyUser), properties decrypted.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedIdentity {
    pub user_id: UserId,
    /// The stored JSON object (an empty object when none is stored).
    pub properties: serde_json::Value,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// One stored event of a user, properties decrypted.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedEvent {
    pub id: Uuid,
    pub name: String,
    pub timestamp: DateTime<Utc>,
    /// The stored JSON object (an empty object when none is stored).
    pub properties: serde_json::Value,
}

/// One item of an export, in the order the export yields them: the identity (when one
/// exists) first, then the events by (timestamp, id).
#[derive(Clone, Debug, PartialEq)]
pub enum ExportItem {
    Identity(ExportedIdentity),
    Event(ExportedEvent),
}
