//! The bounded queue between the TrackEvent(s) handlers and the writer: a call's
//! [`Job`], its [`Claim`] and the sending side [`IngestQueue`].

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;

use super::EventResult;
use crate::metrics;
use crate::models::NewEvent;
use crate::service::readiness::DatabaseHealth;
use crate::service::ServiceError;

/// Where one call stands between its caller and the writer.
#[derive(Debug, Default)]
pub(super) struct Claim(AtomicU8);

/// Nothing of the call is stored and none of its statements is in flight.
const QUEUED: u8 = 0;
/// A statement carrying the call is in flight, or was and its outcome is unknown.
const SENT: u8 = 1;
/// The caller gave up while the call was queued: it must never be sent.
const WITHDRAWN: u8 = 2;

impl Claim {
    /// The writer takes the call into a statement; false when the caller withdrew it.
    pub(super) fn send(&self) -> bool {
        self.0.compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The writer knows its statement failed without storing anything.
    pub(super) fn release(&self) {
        self.0.store(QUEUED, Ordering::Release);
    }

    /// The caller gives up; true when nothing of the call can be stored any more, false
    /// when a statement carrying it is in flight or of unknown outcome.
    pub(super) fn withdraw(&self) -> bool {
        match self.0.compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(state) => state == WITHDRAWN,
        }
    }
}

/// Withdraws the call when the caller's future is dropped (the call was cancelled or
/// its deadline cut it short), so a call nobody waits for is never written.
pub(super) struct WithdrawOnDrop(Arc<Claim>);

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        self.0.withdraw();
    }
}

/// One call's events on their way to a commit. The permits are its room in the queue,
/// given back when it is answered or dropped; the span is the caller's, so the commit
/// joins its trace.
pub(super) struct Job {
    pub(super) events: Vec<NewEvent>,
    pub(super) reply: oneshot::Sender<Vec<EventResult>>,
    /// Held, not read: dropping the job gives its room in the queue back.
    _room: OwnedSemaphorePermit,
    pub(super) span: tracing::Span,
    pub(super) deadline: Instant,
    pub(super) claim: Arc<Claim>,
}

impl Job {
    /// Answers UNAVAILABLE, unless the caller already withdrew it. Only for a call none of
    /// whose statements can still commit.
    pub(super) fn refuse(self, reason: &'static str) {
        metrics::record_events_rejected("database", self.events.len() as u64);
        self.reply.send(vec![Err(ServiceError::Unavailable(reason)); self.events.len()]).ok();
    }
}

/// The sending side, held by the service. Cheap to clone; never blocks a caller.
#[derive(Clone, Debug)]
pub struct IngestQueue {
    pub(super) sender: mpsc::Sender<Job>,
    pub(super) room: Arc<Semaphore>,
    pub(super) capacity: usize,
    pub(super) health: Option<DatabaseHealth>,
}

impl IngestQueue {
    /// Queues `events` for one group commit and waits for it until `deadline`. Fails at
    /// once with [`ServiceError::Overloaded`] when the queue has no room for them, and
    /// with UNAVAILABLE while PostgreSQL is known to be unreachable or once shutdown has
    /// closed the queue. Otherwise answers one result per event, in order, after the
    /// commit; or DEADLINE_EXCEEDED when the deadline passes first.
    pub(crate) async fn submit(
        &self,
        events: Vec<NewEvent>,
        deadline: Instant,
    ) -> Result<Vec<EventResult>, ServiceError> {
        let count = events.len();
        if self.health.as_ref().is_some_and(|health| !health.is_reachable()) {
            metrics::record_events_rejected("database", count as u64);
            return Err(ServiceError::Unavailable("database unavailable"));
        }
        // A call larger than the whole queue takes all of it rather than never fitting.
        let wanted = u32::try_from(count.min(self.capacity)).unwrap_or(u32::MAX);
        let room = match self.room.clone().try_acquire_many_owned(wanted) {
            Ok(room) => room,
            Err(TryAcquireError::NoPermits) => {
                metrics::record_events_rejected("queue_full", count as u64);
                return Err(ServiceError::Overloaded);
            }
            Err(TryAcquireError::Closed) => return Err(ServiceError::Unavailable("shutting down")),
        };
        let (reply, answer) = oneshot::channel();
        let span = tracing::Span::current();
        let claim = Arc::new(Claim::default());
        let _withdraw_on_drop = WithdrawOnDrop(claim.clone());
        match self.sender.try_send(Job { events, reply, _room: room, span, deadline, claim: claim.clone() }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::record_events_rejected("queue_full", count as u64);
                return Err(ServiceError::Overloaded);
            }
            Err(TrySendError::Closed(_)) => return Err(ServiceError::Unavailable("shutting down")),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(results)) => Ok(results),
            // The writer was stopped before answering: only a call it never sent is safe
            // to call unavailable.
            Ok(Err(_)) if claim.withdraw() => Err(ServiceError::Unavailable("shutting down")),
            Ok(Err(_)) => {
                tokio::time::sleep_until(deadline).await;
                Err(ServiceError::DeadlineExceeded { outcome_unknown: true })
            }
            Err(_) => {
                let outcome_unknown = !claim.withdraw();
                if !outcome_unknown {
                    metrics::record_events_rejected("deadline", count as u64);
                }
                Err(ServiceError::DeadlineExceeded { outcome_unknown })
            }
        }
    }

    /// A queue no writer reads: every submit fails with UNAVAILABLE.
    pub fn closed() -> Self {
        let (sender, _) = mpsc::channel(1);
        let room = Arc::new(Semaphore::new(0));
        room.close();
        Self { sender, room, capacity: 0, health: None }
    }

    /// Events queued or being committed now.
    pub(crate) fn depth(&self) -> usize {
        self.capacity.saturating_sub(self.room.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_either_withdrawn_or_sent_never_both() {
        let claim = Claim::default();
        assert!(claim.send(), "a queued call can be sent");
        assert!(!claim.withdraw(), "a call in flight cannot be withdrawn");
        claim.release();
        assert!(claim.withdraw(), "a call whose statement stored nothing can be withdrawn");
        assert!(!claim.send(), "a withdrawn call is never sent");
        assert!(claim.withdraw(), "withdrawing twice is harmless");
    }
}
