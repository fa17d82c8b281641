//! ExportUser, for an access request: everything stored about one user, its identity
//! first (when one exists), then every event in (timestamp, id) order, sensitive values
//! decrypted.
//!
//! Bounded memory for any number of events: a task reads the rows one at a time from
//! one streamed query (see [`crate::repository::postgres::export`]) into a channel of
//! [`EXPORT_CHANNEL_CAPACITY`] items that the response stream drains. A slow client
//! fills the channel and the task waits, so PostgreSQL waits too; a client that goes
//! away closes the channel and the task stops at once, closing its connection. Each
//! running export holds one connection of the read pool until it ends. An export still
//! running when the pool closes (shutdown, once the drain is over) gives its connection
//! up and ends UNAVAILABLE, so it never holds shutdown up. The task ends the channel
//! with an explicit step, complete or failed: a truncated export never looks complete.

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::{repository_failure, AnalyticsService, ServiceError};
use crate::models::{ExportItem, ExportedIdentity, UserId};
use crate::repository::postgres::ExportReader;

/// Items buffered between the database and the client.
pub(crate) const EXPORT_CHANNEL_CAPACITY: usize = 64;

/// What an export sends: its items, then exactly one end. A channel that closes
/// without an end (the task was dropped) is not a complete export.
#[derive(Debug)]
pub(crate) enum ExportStep {
    Item(ExportItem),
    /// Every item was sent.
    Complete,
    /// The export stopped here.
    Failed(ServiceError),
}

/// The steps of one export as they are read.
pub(crate) type ExportSteps = mpsc::Receiver<ExportStep>;

impl AnalyticsService {
    /// Starts exporting `user_id`. The connection and the identity are had before this
    /// answers, so an unreachable database is an error of the call, not of its stream.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn export_user(&self, user_id: UserId) -> Result<ExportSteps, ServiceError> {
        let mut reader = self.exports.reader().await.map_err(repository_failure)?;
        let identity = reader.identity(&user_id).await.map_err(repository_failure)?;
        let (sender, receiver) = mpsc::channel(EXPORT_CHANNEL_CAPACITY);
        let export = Export { reader, user_id, sender };
        let pool_closed = self.exports.pool_closed();
        tokio::spawn(export.send(identity, pool_closed).instrument(tracing::Span::current()));
        Ok(receiver)
    }
}

/// One running export: its connection, its user, where its items go.
struct Export {
    reader: ExportReader,
    user_id: UserId,
    sender: mpsc::Sender<ExportStep>,
}

/// Why an export stopped before its last event.
enum Stopped {
    /// The receiver is gone (the client went away): nobody to tell.
    ReceiverGone,
    /// The export failed; the receiver is told.
    Failed(ServiceError),
}

impl Export {
    /// Sends the identity, then the events as they are read, until the last one, an
    /// error, the receiver going away, or the pool closing (shutdown after the drain:
    /// the export ends UNAVAILABLE). Only a complete export returns its connection to
    /// the pool; any other end closes it before telling the receiver.
    async fn send(
        self,
        identity: Option<ExportedIdentity>,
        mut pool_closed: impl std::future::Future<Output = ()> + Unpin,
    ) {
        let Export { mut reader, user_id, sender } = self;
        let outcome = async {
            if let Some(identity) = identity {
                sender
                    .send(ExportStep::Item(ExportItem::Identity(identity)))
                    .await
                    .map_err(|_| Stopped::ReceiverGone)?;
            }
            let mut events = reader.events(&user_id);
            loop {
                // The receiver may go away while PostgreSQL is still sorting: stop then too.
                let next = tokio::select! {
                    biased;
                    () = sender.closed() => return Err(Stopped::ReceiverGone),
                    () = &mut pool_closed => {
                        return Err(Stopped::Failed(ServiceError::Unavailable("server shutting down")))
                    }
                    next = events.next() => next,
                };
                match next {
                    None => return Ok(()),
                    Some(Ok(event)) => {
                        let item = ExportStep::Item(ExportItem::Event(event));
                        sender.send(item).await.map_err(|_| Stopped::ReceiverGone)?
                    }
                    Some(Err(error)) => return Err(Stopped::Failed(repository_failure(error))),
                }
            }
        }
        .await;
        // The receiver may be gone by now; the export ends either way.
        match outcome {
            Ok(()) => {
                reader.finish();
                sender.send(ExportStep::Complete).await.ok();
            }
            Err(Stopped::ReceiverGone) => {}
            Err(Stopped::Failed(error)) => {
                drop(reader);
                sender.send(ExportStep::Failed(error)).await.ok();
            }
        }
    }
}
