//! The `user_identities` table: one row per identified user.

use super::{Database, RepositoryError};
use crate::models::IdentifyUser;

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
}

impl UserRepository {
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    pub async fn upsert(&self, identity: &IdentifyUser) -> Result<(), RepositoryError> {
        let properties = identity.properties.to_json();
        self.database
            .with_retry("upsert_user", || async {
                sqlx::query(UPSERT_USER)
                    .bind(identity.user_id.as_str())
                    .bind(&properties)
                    .execute(self.database.pool())
                    .await?;
                Ok(())
            })
            .await
    }
}
