//! The `user_identities` table: one row per identified user.

use super::pii::open_properties;
use super::{Database, RepositoryError};
use crate::models::{IdentifyUser, UserId};
use crate::security::pii::PiiCipher;

/// Properties merge (`||`: new keys overwrite, others stay); `first_seen` is written
/// once; `last_seen` and `updated_at` only move forward.
const UPSERT_USER: &str = "
    INSERT INTO user_identities AS existing (user_id, properties, first_seen, last_seen, updated_at)
    VALUES ($1, $2, now(), now(), now())
    ON CONFLICT (user_id) DO UPDATE SET
        properties = COALESCE(existing.properties, '{}'::jsonb) || EXCLUDED.properties,
        last_seen = GREATEST(existing.last_seen, EXCLUDED.last_seen),
        updated_at = GREATEST(existing.updated_at, EXCLUDED.updated_at)";

#[derive(Clone, Debug)]
pub struct UserRepository {
    database: Database,
    pii: PiiCipher,
}

impl UserRepository {
    pub fn new(database: Database) -> Self {
        Self { database, pii: PiiCipher::disabled() }
    }

    /// Encrypts sensitive property values on write and decrypts them on read.
    pub fn with_pii(self, pii: PiiCipher) -> Self {
        Self { pii, ..self }
    }

    /// The stored properties of one user, decrypted; `None` when the user is unknown.
    pub async fn properties(&self, user_id: &UserId) -> Result<Option<serde_json::Value>, RepositoryError> {
        let stored: Option<Option<serde_json::Value>> = self
            .database
            .with_retry("select_user_properties", || async {
                Ok(sqlx::query_scalar("SELECT properties FROM user_identities WHERE user_id = $1")
                    .bind(user_id.as_str())
                    .fetch_optional(self.database.pool())
                    .await?)
            })
            .await?;
        stored.map(|properties| open_properties(&self.pii, properties.unwrap_or_default())).transpose()
    }

    pub async fn upsert(&self, identity: &IdentifyUser) -> Result<(), RepositoryError> {
        let properties = self.pii.sealed(identity.properties.json());
        self.database
            .with_retry("upsert_user", || async {
                sqlx::query(UPSERT_USER)
                    .bind(identity.user_id.as_str())
                    .bind(properties.as_ref())
                    .execute(self.database.pool())
                    .await?;
                Ok(())
            })
            .await
    }
}
