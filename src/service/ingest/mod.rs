//! Group commit: the bounded ingest queue between the TrackEvent(s) handlers and
//! PostgreSQL, and the writer task behind it.
//!
//! A call enqueues its validated events with a oneshot for the answer and waits until
//! its deadline. One writer task coalesces queued calls into multi-row inserts of up to
//! INGEST_BATCH_SIZE events, keeps at most INGEST_WRITERS commits in flight, and answers
//! every caller only after its commit:
//! nothing is acknowledged from memory. A row that fails on its own is isolated by
//! bisection, so it fails only its caller. The queue holds at most INGEST_QUEUE_CAPACITY
//! events; a call that does not fit is refused at once (backpressure).
//!
//! With no commit in flight, what is queued is committed at once: a lone call never
//! waits for company. Batches form from the calls that queue up while commits are in
//! flight; a batch that is not full then waits for more until one of those commits
//! ends, or at most INGEST_LINGER_MS. On shutdown the
//! queue closes, everything queued is committed, then the writer stops.
//!
//! What an answer means (the durability contract):
//! - OK: committed.
//! - UNAVAILABLE / RESOURCE_EXHAUSTED: nothing of the call is stored, ever. A call is
//!   refused at once while PostgreSQL is known to be unreachable, and calls still queued
//!   when that becomes known are refused too.
//! - DEADLINE_EXCEEDED: the call's deadline passed. A call still queued then is withdrawn
//!   and never stored; only a call inside a commit whose outcome is not known (the
//!   connection broke, or no answer within INGEST_COMMIT_TIMEOUT_MS) may have been
//!   stored. Until its deadline such a call's commit is retried (the insert is
//!   idempotent), so it usually ends OK.
//!
//! Each call carries a [`Claim`], the handshake between the waiting caller and the
//! writer: the writer may put a call into a statement only while the caller still waits,
//! and the caller may only give up on its own (withdraw) while none of its statements is
//! in flight or of unknown outcome.

mod batch;
mod queue;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

pub use queue::IngestQueue;

use super::readiness::DatabaseHealth;
use super::ServiceError;
use crate::config::IngestConfig;
use crate::metrics;
use crate::repository::postgres::EventRepository;
use writer::Writer;

/// How often idempotency keys older than the window are deleted.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(3_600);
/// Keys deleted per expiry statement.
const EXPIRY_CHUNK: i64 = 10_000;
/// How often the queue gauges are refreshed while the writer waits.
const GAUGE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest pause between two attempts of a commit whose outcome is unknown.
const MAX_RETRY_DELAY: Duration = Duration::from_millis(500);
/// How long past INGEST_COMMIT_TIMEOUT_MS (which PostgreSQL enforces as the ingest
/// connections' statement_timeout) the writer waits for an answer before it treats the
/// connection as dead: PostgreSQL's own cancellation normally arrives first, as a
/// definite failure.
const COMMIT_ANSWER_SLACK: Duration = Duration::from_millis(500);

/// The writer's knobs, from the INGEST_*, IDEMPOTENCY_* and DB_RETRY_* variables.
#[derive(Clone, Copy, Debug)]
pub struct IngestSettings {
    pub batch_size: usize,
    pub linger: Duration,
    pub queue_capacity: usize,
    pub writers: usize,
    pub idempotency_window_days: u32,
    /// Longest a commit statement may run (PostgreSQL cancels it after this).
    pub commit_timeout: Duration,
    /// Attempts of a commit that failed without storing anything, the first included.
    pub max_attempts: u32,
    /// Pause before the second attempt; doubles per attempt.
    pub retry_base_delay: Duration,
}

impl IngestSettings {
    pub fn from_config(config: &IngestConfig) -> Self {
        Self {
            batch_size: config.batch_size,
            linger: config.linger,
            queue_capacity: config.queue_capacity,
            writers: config.writers,
            idempotency_window_days: config.idempotency_window_days,
            commit_timeout: config.commit_timeout,
            max_attempts: config.retry.max_attempts,
            retry_base_delay: config.retry.base_delay,
        }
    }

    /// How long the writer waits for one commit statement's answer.
    pub(super) fn answer_timeout(&self) -> Duration {
        self.commit_timeout + COMMIT_ANSWER_SLACK
    }
}

/// A committed event: stored now, found stored earlier under its insert_id, or
/// deliberately not stored because its user is suppressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    Accepted(Uuid),
    /// Not stored again; the id of the event stored for the same insert_id.
    Duplicate(Uuid),
    /// Not stored: its user is on the suppression list. A success for the caller.
    Suppressed,
}

impl Stored {
    /// The id of the stored event; `None` when suppressed.
    pub(crate) fn event_id(&self) -> Option<Uuid> {
        match self {
            Stored::Accepted(id) | Stored::Duplicate(id) => Some(*id),
            Stored::Suppressed => None,
        }
    }
}

/// The answer for one event of a call.
pub(crate) type EventResult = Result<Stored, ServiceError>;

/// The running writer; [`IngestWriter::stop`] drains it. Dropping it also closes the
/// queue and lets the writer finish what is queued in the background.
pub struct IngestWriter {
    stop: oneshot::Sender<()>,
    room: Arc<Semaphore>,
    task: JoinHandle<()>,
}

/// Starts the writer task under `tasks` (and the hourly expiry of old insert_ids);
/// returns the queue to hand to the service and the handle to stop the writer with. `events` should
/// write through connections whose statement_timeout is `settings.commit_timeout`
/// ([`crate::repository::postgres::Database::connect_lazy_for_ingest`]); `health` is
/// told about failed commits and refuses calls while PostgreSQL is unreachable.
pub fn start(
    events: EventRepository,
    settings: IngestSettings,
    health: DatabaseHealth,
    tasks: &TaskTracker,
) -> (IngestQueue, IngestWriter) {
    let capacity = settings.queue_capacity.max(1);
    let (sender, receiver) = mpsc::channel(capacity);
    let room = Arc::new(Semaphore::new(capacity));
    let (stop, stop_receiver) = oneshot::channel();
    let queue = IngestQueue { sender, room: room.clone(), capacity, health: Some(health.clone()) };
    metrics::set_ingest_queue(0, capacity);
    let writer = Writer { events, settings, queue: queue.clone(), health };
    let task = tasks.spawn(writer.run(receiver, stop_receiver));
    (queue, IngestWriter { stop, room, task })
}

impl IngestWriter {
    /// Closes the queue (new calls fail with UNAVAILABLE), commits everything queued and
    /// waits for the commits in flight, for at most `budget`; then the writer task is
    /// ended, so the task tracker it runs under can finish.
    pub async fn stop(mut self, budget: Duration) {
        self.room.close();
        self.stop.send(()).ok();
        match tokio::time::timeout(budget, &mut self.task).await {
            Ok(_) => tracing::info!("ingest queue drained"),
            Err(_) => {
                self.task.abort();
                tracing::warn!(
                    budget_seconds = budget.as_secs(),
                    "ingest queue not drained in time; unanswered events were never acknowledged"
                )
            }
        }
    }
}
