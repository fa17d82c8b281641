//! The `events` table: inserting tracked events and counting them.

use sqlx::Row;
use uuid::Uuid;

use super::pii::open_properties;
use super::{Database, RepositoryError};
use crate::models::{EventCount, EventFilter, NewEvent, TimeRange};
use crate::security::pii::PiiCipher;

/// Multi-row insert through UNNEST: one statement and one round trip for any batch size.
const INSERT_EVENTS: &str = "
    INSERT INTO events (id, event_name, user_id, properties, timestamp)
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[])";

/// Bucket start in Unix seconds, truncated in UTC ($3 is `hour`, `day` or `week`;
/// PostgreSQL's weeks start on Monday).
const GROUPED_SELECT: &str = "
    SELECT event_name,
           EXTRACT(EPOCH FROM date_trunc($3, timestamp AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')::bigint AS bucket,
           count(*) AS count
    FROM events
    WHERE timestamp >= $1 AND timestamp < $2";
const GROUPED_ORDER: &str = " GROUP BY event_name, bucket ORDER BY bucket, event_name";

const TOTAL_SELECT: &str = "
    SELECT event_name, count(*) AS count
    FROM events
    WHERE timestamp >= $1 AND timestamp < $2";
const TOTAL_ORDER: &str = " GROUP BY event_name ORDER BY event_name";

const UNIQUE_USERS: &str = "
    SELECT count(DISTINCT user_id) AS unique_users
    FROM events
    WHERE timestamp >= $1 AND timestamp < $2 AND user_id IS NOT NULL AND user_id <> ''";

#[derive(Clone, Debug)]
pub struct EventRepository {
    database: Database,
    pii: PiiCipher,
}

impl EventRepository {
    pub fn new(database: Database) -> Self {
        Self { database, pii: PiiCipher::disabled() }
    }

    /// Encrypts sensitive property values on write and decrypts them on read.
    pub fn with_pii(self, pii: PiiCipher) -> Self {
        Self { pii, ..self }
    }

    /// The stored properties of one event, decrypted; `None` when there is no such event.
    pub async fn properties(&self, event_id: Uuid) -> Result<Option<serde_json::Value>, RepositoryError> {
        let stored: Option<Option<serde_json::Value>> = self
            .database
            .with_retry("select_event_properties", || async {
                Ok(sqlx::query_scalar("SELECT properties FROM events WHERE id = $1")
                    .bind(event_id)
                    .fetch_optional(self.database.pool())
                    .await?)
            })
            .await?;
        stored.map(|properties| open_properties(&self.pii, properties.unwrap_or_default())).transpose()
    }

    /// Stores events in one statement (and so one transaction): all or none commit.
    pub async fn insert_many(&self, events: &[NewEvent]) -> Result<(), RepositoryError> {
        let ids: Vec<Uuid> = events.iter().map(|event| event.id).collect();
        let names: Vec<&str> = events.iter().map(|event| event.name.as_str()).collect();
        let user_ids: Vec<Option<&str>> =
            events.iter().map(|event| event.user_id.as_ref().map(|user| user.as_str())).collect();
        let properties: Vec<serde_json::Value> = events
            .iter()
            .map(|event| {
                let mut properties = event.properties.to_json();
                self.pii.seal(&mut properties);
                properties
            })
            .collect();
        let timestamps: Vec<_> = events.iter().map(|event| event.timestamp).collect();
        self.database
            .with_retry("insert_events", || async {
                sqlx::query(INSERT_EVENTS)
                    .bind(&ids)
                    .bind(&names)
                    .bind(&user_ids)
                    .bind(&properties)
                    .bind(&timestamps)
                    .execute(self.database.pool())
                    .await?;
                Ok(())
            })
            .await
    }

    /// Counts per event name, per bucket when grouped, ordered by bucket then name.
    pub async fn count(&self, filter: &EventFilter) -> Result<Vec<EventCount>, RepositoryError> {
        let range = filter.range;
        let event_name = filter.event_name.as_ref().map(|name| name.as_str());
        self.database
            .with_retry("count_events", || async {
                let rows = match filter.group_by {
                    Some(group_by) => {
                        let sql = match event_name {
                            Some(_) => format!("{GROUPED_SELECT} AND event_name = $4{GROUPED_ORDER}"),
                            None => format!("{GROUPED_SELECT}{GROUPED_ORDER}"),
                        };
                        let mut query = sqlx::query(&sql)
                            .bind(range.start_time())
                            .bind(range.end_time())
                            .bind(group_by.as_str());
                        if let Some(name) = event_name {
                            query = query.bind(name);
                        }
                        query.fetch_all(self.database.pool()).await?
                    }
                    None => {
                        let sql = match event_name {
                            Some(_) => format!("{TOTAL_SELECT} AND event_name = $3{TOTAL_ORDER}"),
                            None => format!("{TOTAL_SELECT}{TOTAL_ORDER}"),
                        };
                        let mut query = sqlx::query(&sql).bind(range.start_time()).bind(range.end_time());
                        if let Some(name) = event_name {
                            query = query.bind(name);
                        }
                        query.fetch_all(self.database.pool()).await?
                    }
                };
                rows.iter()
                    .map(|row| {
                        let bucket_start = match filter.group_by {
                            Some(_) => row.try_get::<i64, _>("bucket")?,
                            None => range.start(),
                        };
                        Ok(EventCount {
                            event_name: row.try_get("event_name")?,
                            bucket_start,
                            count: row.try_get("count")?,
                        })
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
                    .map_err(RepositoryError::from)
            })
            .await
    }

    /// Distinct non-empty user ids with at least one event in the range.
    pub async fn unique_users(&self, range: TimeRange) -> Result<i64, RepositoryError> {
        self.database
            .with_retry("count_unique_users", || async {
                let count: i64 = sqlx::query_scalar(UNIQUE_USERS)
                    .bind(range.start_time())
                    .bind(range.end_time())
                    .fetch_one(self.database.pool())
                    .await?;
                Ok(count)
            })
            .await
    }
}
