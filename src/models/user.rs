//! User identities: who IdentifyUser describes and who events belong to.

use super::Properties;

/// A valid user id: 1-255 bytes, no control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserId(pub(crate) String);

impl UserId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An IdentifyUser request after parsing.
#[derive(Clone, Debug)]
pub struct IdentifyUser {
    pub user_id: UserId,
    /// Merged into the stored properties: new keys overwrite, other keys stay.
    pub properties: Properties,
}
