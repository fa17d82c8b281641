//! Reading everything stored about one user for an access request (ExportUser): its
//! identity, then every event in (timestamp, id) order, sensitive values decrypted.
//!
//! Memory stays bounded whatever the number of events: the events are one query whose
//! rows PostgreSQL sends as they are read (it sorts the user's rows once, spilling to
//! disk beyond `work_mem`), decoded one at a time; nothing pages with OFFSET or repeats a
//! top-N sort per page. The query runs on one dedicated connection of the read pool,
//! held by an [`ExportReader`] for as long as the export streams: each running export
//! ties up one read connection (POSTGRES_MAX_CONNECTIONS less the writers' share).
//! An export that ends before its last row (the client went away, a row did not
//! decode) closes its connection instead of returning it to the pool, so the rows still
//! on their way are never read and PostgreSQL stops the query.

use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt as _};

use uuid::Uuid;

use super::pii::open_properties;
use super::{query_span, Database, RepositoryError, Session};
use crate::metrics;
use crate::models::{ExportedEvent, ExportedIdentity, UserId};
use crate::security::pii::PiiCipher;
use tracing::Instrument as _;

const SELECT_IDENTITY: &str =
    "SELECT properties, first_seen, last_seen FROM user_identities WHERE user_id = $1";

/// Every event of the user, in the order the export promises; PostgreSQL finds them
/// through `idx_events_user_id` in each partition and sorts them once.
const SELECT_EVENTS: &str =
    "SELECT id, event_name, timestamp, properties FROM events WHERE user_id = $1 ORDER BY timestamp, id";

type IdentityRow = (Option<serde_json::Value>, DateTime<Utc>, DateTime<Utc>);
type EventRow = (Uuid, String, DateTime<Utc>, Option<serde_json::Value>);

/// Opens [`ExportReader`]s on the read pool, decrypting with the PII cipher.
#[derive(Clone, Debug)]
pub(crate) struct ExportRepository {
    database: Database,
    pii: PiiCipher,
}

impl ExportRepository {
    pub(crate) fn new(database: Database) -> Self {
        Self { database, pii: PiiCipher::disabled() }
    }

    /// Decrypts sensitive property values on read.
    pub(crate) fn with_pii(self, pii: PiiCipher) -> Self {
        Self { pii, ..self }
    }

    /// Resolves once the read pool closes (the end of shutdown, after the drain): an
    /// export still running then must give its connection up, or closing waits for it.
    pub(crate) fn pool_closed(&self) -> impl std::future::Future<Output = ()> + Send + Unpin + 'static {
        self.database.pool().close_event()
    }

    /// A reader on its own connection of the read pool (acquired with the usual
    /// retries), held until the reader is finished or dropped.
    pub(crate) async fn reader(&self) -> Result<ExportReader, RepositoryError> {
        let connection = self
            .database
            .with_retry("acquire_export_connection", || async { Ok(self.database.session().await?) })
            .await?;
        Ok(ExportReader { connection, pii: self.pii.clone(), finished: false })
    }
}

/// One export's connection. Dropped without [`ExportReader::finish`] (the export ended
/// early or failed), it closes the connection instead of returning it to the pool: a
/// query may still be sending rows on it.
pub(crate) struct ExportReader {
    /// Behind a transaction pooler, a read-only transaction that pins one server
    /// connection for the whole export; rolled back when the reader is dropped.
    connection: Session,
    pii: PiiCipher,
    finished: bool,
}

impl ExportReader {
    /// The user's identity, decrypted; `None` when the user never identified.
    pub(crate) async fn identity(
        &mut self,
        user_id: &UserId,
    ) -> Result<Option<ExportedIdentity>, RepositoryError> {
        let started = Instant::now();
        let row: Result<Option<IdentityRow>, RepositoryError> = sqlx::query_as(SELECT_IDENTITY)
            .bind(user_id.as_str())
            .fetch_optional(&mut *self.connection)
            .instrument(query_span("export_user_identity"))
            .await
            .map_err(RepositoryError::from);
        metrics::record_db_call(
            "export_user_identity",
            started.elapsed(),
            row.as_ref().err().map(RepositoryError::kind),
        );
        let Some((properties, first_seen, last_seen)) = row? else { return Ok(None) };
        Ok(Some(ExportedIdentity {
            user_id: user_id.clone(),
            properties: open_properties(&self.pii, properties.unwrap_or_else(empty_object))?,
            first_seen,
            last_seen,
        }))
    }

    /// Every event of the user by (timestamp, id), decrypted, read as the stream is
    /// polled. After an error the caller stops reading (and drops the reader).
    pub(crate) fn events<'a>(
        &'a mut self,
        user_id: &'a UserId,
    ) -> impl Stream<Item = Result<ExportedEvent, RepositoryError>> + Send + 'a {
        let started = Instant::now();
        let ExportReader { connection, pii, .. } = self;
        let pii: &'a PiiCipher = pii;
        sqlx::query_as::<_, EventRow>(SELECT_EVENTS).bind(user_id.as_str()).fetch(&mut **connection).map(
            move |row| {
                let event =
                    row.map_err(RepositoryError::from).and_then(|(id, name, timestamp, properties)| {
                        let properties = open_properties(pii, properties.unwrap_or_else(empty_object))?;
                        Ok(ExportedEvent { id, name, timestamp, properties })
                    });
                if let Err(error) = &event {
                    metrics::record_db_call("export_user_events", started.elapsed(), Some(error.kind()));
                }
                event
            },
        )
    }

    /// The export read its last row: the connection goes back to the pool.
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for ExportReader {
    fn drop(&mut self) {
        if !self.finished {
            self.connection.close_on_drop();
        }
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}
