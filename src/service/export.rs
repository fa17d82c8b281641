//! ExportUser, for an access request: everything stored about one user, its identity
//! first (when one exists), then every event in (timestamp, id) order, sensitive values
//! decrypted.
//!
//! Bounded memory for any number of events: a task reads the rows one at a time from
//! one streamed query (see [`crate::repository::postgres::export`]) into a channel of
//! [`EXPORT_CHANNEL_CAPACITY`] items that the response stream drains. A slow client
//! fills the channel and the task waits, so PostgreSQL waits too; a client that goes
//! away closes the channel and the task stops at once, closing its connection. Each
//! running export holds one connection of the read pool until it ends.

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::{repository_failure, AnalyticsService, ServiceError};
use crate::models::{ExportItem, ExportedIdentity, UserId};
use crate::repository::postgres::ExportReader;

/// Items buffered between the database and the client.
pub(crate) const EXPORT_CHANNEL_CAPACITY: usize = 64;

/// The items of one export as they are read. An error is the last item: the export
/// ended there.
pub(crate) type ExportItems = mpsc::Receiver<Result<ExportItem, ServiceError>>;

impl AnalyticsService {
    /// Starts exporting `user_id`. The connection and the identity are had before this
    /// answers, so an unreachable database is an error of the call, not of its stream.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn export_user(&self, user_id: UserId) -> Result<ExportItems, ServiceError> {
        let mut reader = self.exports.reader().await.map_err(repository_failure)?;
        let identity = reader.identity(&user_id).await.map_err(repository_failure)?;
        let (sender, receiver) = mpsc::channel(EXPORT_CHANNEL_CAPACITY);
        tokio::spawn(send_export(reader, user_id, identity, sender).instrument(tracing::Span::current()));
        Ok(receiver)
    }
}

/// Sends the identity, then the events as they are read, until the last one, an error,
/// or the receiver is gone. Only a complete export returns its connection to the pool.
async fn send_export(
    mut reader: ExportReader,
    user_id: UserId,
    identity: Option<ExportedIdentity>,
    sender: mpsc::Sender<Result<ExportItem, ServiceError>>,
) {
    if let Some(identity) = identity {
        if sender.send(Ok(ExportItem::Identity(identity))).await.is_err() {
            return;
        }
    }
    let mut events = reader.events(&user_id);
    loop {
        // The receiver may go away while PostgreSQL is still sorting: stop then too.
        let next = tokio::select! {
            biased;
            () = sender.closed() => return,
            next = events.next() => next,
        };
        match next {
            None => break,
            Some(Ok(event)) => {
                if sender.send(Ok(ExportItem::Event(event))).await.is_err() {
                    return;
                }
            }
            Some(Err(error)) => {
                // The receiver may be gone already; the export ends either way.
                sender.send(Err(repository_failure(error))).await.ok();
                return;
            }
        }
    }
    drop(events);
    reader.finish();
}
