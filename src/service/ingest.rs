//! Group commit: the bounded ingest queue between the TrackEvent(s) handlers and
//! PostgreSQL, and the writer task behind it.
//!
//! A call enqueues its validated events with a oneshot for the answer and waits. One
//! writer task coalesces queued calls into multi-row inserts of up to INGEST_BATCH_SIZE
//! events (waiting at most INGEST_LINGER_MS for more), keeps at most INGEST_WRITERS
//! commits in flight, and answers every caller only after its commit: nothing is
//! acknowledged from memory. A row that fails on its own is isolated by bisection, so it
//! fails only its caller. The queue holds at most INGEST_QUEUE_CAPACITY events; a call
//! that does not fit is refused at once (backpressure). On shutdown the queue closes,
//! everything queued is committed, then the writer stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument as _;
use uuid::Uuid;

use super::ServiceError;
use crate::config::Config;
use crate::metrics;
use crate::models::NewEvent;
use crate::repository::postgres::{EventRepository, InsertOutcome, RepositoryError};

/// How often idempotency keys older than the window are deleted.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(3_600);
/// Keys deleted per expiry statement.
const EXPIRY_CHUNK: i64 = 10_000;
/// How often the queue gauges are refreshed while the writer waits.
const GAUGE_INTERVAL: Duration = Duration::from_millis(250);

/// The writer's knobs, from the INGEST_* and IDEMPOTENCY_* variables.
#[derive(Clone, Copy, Debug)]
pub struct IngestSettings {
    pub batch_size: usize,
    pub linger: Duration,
    pub queue_capacity: usize,
    pub writers: usize,
    pub idempotency_window_days: u32,
}

impl IngestSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            batch_size: config.ingest_batch_size,
            linger: config.ingest_linger(),
            queue_capacity: config.ingest_queue_capacity,
            writers: config.ingest_writers,
            idempotency_window_days: config.idempotency_window_days,
        }
    }
}

/// A committed event: stored now, or found stored earlier under its insert_id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Accepted(Uuid),
    /// Not stored again; the id of the event stored for the same insert_id.
    Duplicate(Uuid),
}

impl Stored {
    pub fn event_id(&self) -> Uuid {
        match self {
            Stored::Accepted(id) | Stored::Duplicate(id) => *id,
        }
    }
}

/// The answer for one event of a call.
pub type EventResult = Result<Stored, ServiceError>;

/// One call's events on their way to a commit. The permits are its room in the queue,
/// given back when it is answered; the span is the caller's, so the commit joins its
/// trace.
struct Job {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Vec<EventResult>>,
    room: OwnedSemaphorePermit,
    span: tracing::Span,
}

/// The sending side, held by the service. Cheap to clone; never blocks a caller.
#[derive(Clone, Debug)]
pub struct IngestQueue {
    sender: mpsc::Sender<Job>,
    room: Arc<Semaphore>,
    capacity: usize,
}

impl IngestQueue {
    /// Queues `events` for one group commit and waits for it. Fails at once with
    /// [`ServiceError::Overloaded`] when the queue has no room for them, and with
    /// UNAVAILABLE once shutdown has closed the queue. Otherwise answers one result per
    /// event, in order, after the commit.
    pub async fn submit(&self, events: Vec<NewEvent>) -> Result<Vec<EventResult>, ServiceError> {
        let count = events.len();
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
        match self.sender.try_send(Job { events, reply, room, span }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::record_events_rejected("queue_full", count as u64);
                return Err(ServiceError::Overloaded);
            }
            Err(TrySendError::Closed(_)) => return Err(ServiceError::Unavailable("shutting down")),
        }
        // The writer drops a job unanswered only when it was stopped before committing it.
        answer.await.map_err(|_| ServiceError::Unavailable("shutting down"))
    }

    /// A queue no writer reads: every submit fails with UNAVAILABLE.
    pub fn closed() -> Self {
        let (sender, _) = mpsc::channel(1);
        let room = Arc::new(Semaphore::new(0));
        room.close();
        Self { sender, room, capacity: 0 }
    }

    /// Events queued or being committed now.
    pub fn depth(&self) -> usize {
        self.capacity.saturating_sub(self.room.available_permits())
    }
}

/// The running writer; [`IngestWriter::stop`] drains it. Dropping it also closes the
/// queue and lets the writer finish what is queued in the background.
pub struct IngestWriter {
    stop: oneshot::Sender<()>,
    room: Arc<Semaphore>,
    task: JoinHandle<()>,
}

/// Starts the writer task (and the hourly expiry of old insert_ids); returns the queue
/// to hand to the service and the handle to stop the writer with.
pub fn start(events: EventRepository, settings: IngestSettings) -> (IngestQueue, IngestWriter) {
    let capacity = settings.queue_capacity.max(1);
    let (sender, receiver) = mpsc::channel(capacity);
    let room = Arc::new(Semaphore::new(capacity));
    let (stop, stop_receiver) = oneshot::channel();
    let queue = IngestQueue { sender, room: room.clone(), capacity };
    metrics::set_ingest_queue(0, capacity);
    let writer = Writer { events, settings, queue: queue.clone() };
    let task = tokio::spawn(writer.run(receiver, stop_receiver));
    (queue, IngestWriter { stop, room, task })
}

impl IngestWriter {
    /// Closes the queue (new calls fail with UNAVAILABLE), commits everything queued and
    /// waits for the commits in flight, for at most `budget`.
    pub async fn stop(self, budget: Duration) {
        self.room.close();
        self.stop.send(()).ok();
        match tokio::time::timeout(budget, self.task).await {
            Ok(_) => tracing::info!("ingest queue drained"),
            Err(_) => tracing::warn!(
                budget_seconds = budget.as_secs(),
                "ingest queue not drained in time; unanswered events were never acknowledged"
            ),
        }
    }
}

#[derive(Clone)]
struct Writer {
    events: EventRepository,
    settings: IngestSettings,
    queue: IngestQueue,
}

impl Writer {
    async fn run(self, mut receiver: mpsc::Receiver<Job>, mut stop: oneshot::Receiver<()>) {
        let batch_size = self.settings.batch_size.max(1);
        let writers = self.settings.writers.max(1);
        let in_flight = Arc::new(Semaphore::new(writers));
        let mut expiry = tokio::time::interval(EXPIRY_INTERVAL);
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        loop {
            let first = tokio::select! {
                job = receiver.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                _ = &mut stop, if !stopping => {
                    // Refuse new calls; recv() still yields what is queued, then None.
                    stopping = true;
                    receiver.close();
                    continue;
                }
                _ = expiry.tick(), if !stopping => {
                    tokio::spawn(self.clone().expire_insert_ids());
                    continue;
                }
                _ = gauges.tick() => {
                    metrics::set_ingest_queue(self.queue.depth(), self.queue.capacity);
                    continue;
                }
            };
            let mut batch = Batch::default();
            batch.push(first);
            batch.fill_ready(&mut receiver, batch_size);
            if batch.events < batch_size && !self.settings.linger.is_zero() {
                let deadline = Instant::now() + self.settings.linger;
                while batch.events < batch_size {
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(job)) => batch.push(job),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            // Every writer busy: keep the gauges current while waiting (a stalled database
            // shows as a full queue).
            let commit_slot = loop {
                tokio::select! {
                    slot = in_flight.clone().acquire_owned() => break slot,
                    _ = gauges.tick() => metrics::set_ingest_queue(self.queue.depth(), self.queue.capacity),
                }
            };
            let Ok(commit_slot) = commit_slot else { break };
            // Calls that arrived while every writer was busy join this commit.
            batch.fill_ready(&mut receiver, batch_size);
            metrics::set_ingest_queue(self.queue.depth(), self.queue.capacity);
            let writer = self.clone();
            let span = batch.span();
            tokio::spawn(
                async move {
                    writer.commit(batch).await;
                    drop(commit_slot);
                }
                .instrument(span),
            );
        }
        // Every queued call has been handed to a commit; wait for those in flight.
        in_flight.acquire_many(u32::try_from(writers).unwrap_or(u32::MAX)).await.ok();
        metrics::set_ingest_queue(self.queue.depth(), self.queue.capacity);
    }

    /// Writes one batch and answers each of its callers.
    async fn commit(&self, batch: Batch) {
        let started = std::time::Instant::now();
        let mut events = Vec::with_capacity(batch.events);
        let mut callers = Vec::with_capacity(batch.jobs.len());
        for job in batch.jobs {
            callers.push((job.events.len(), job.reply, job.room));
            events.extend(job.events);
        }
        let results = self.store_isolating(&events).await;
        metrics::record_ingest_commit(events.len(), started.elapsed());
        let (mut accepted, mut duplicates, mut failed) = (0u64, 0u64, 0u64);
        for result in &results {
            match result {
                Ok(Stored::Accepted(_)) => accepted += 1,
                Ok(Stored::Duplicate(_)) => duplicates += 1,
                Err(_) => failed += 1,
            }
        }
        metrics::record_events_ingested(accepted);
        if duplicates > 0 {
            metrics::record_dedup_hits(duplicates);
        }
        if failed > 0 {
            metrics::record_events_rejected("database", failed);
        }
        let mut results = results.into_iter();
        for (count, reply, room) in callers {
            let answer: Vec<EventResult> = results.by_ref().take(count).collect();
            drop(room);
            // A caller that went away (deadline, cancel) was never acknowledged.
            reply.send(answer).ok();
        }
    }

    /// Inserts `events` in one statement; when that fails for a reason that may belong
    /// to one row (a query error, not an outage), splits the batch in halves and tries
    /// each, down to single rows, so a poison row fails only itself. Each statement is
    /// atomic and idempotent on retry, so splitting never stores a row twice.
    async fn store_isolating(&self, events: &[NewEvent]) -> Vec<EventResult> {
        let window_days = i32::try_from(self.settings.idempotency_window_days).unwrap_or(i32::MAX);
        let mut results: Vec<Option<EventResult>> = vec![None; events.len()];
        let mut pending = vec![(0, events.len())];
        while let Some((start, end)) = pending.pop() {
            let slice = &events[start..end];
            match self.events.insert_batch(slice, window_days).await {
                Ok(outcomes) => {
                    for ((slot, event), outcome) in results[start..end].iter_mut().zip(slice).zip(outcomes) {
                        *slot = Some(Ok(match outcome {
                            InsertOutcome::Inserted => Stored::Accepted(event.id),
                            InsertOutcome::Duplicate { original } => Stored::Duplicate(original),
                        }));
                    }
                }
                Err(error @ RepositoryError::Query(_)) if slice.len() > 1 => {
                    tracing::warn!(events = slice.len(), error = %error, "group commit failed, isolating the failing rows");
                    let middle = start + slice.len() / 2;
                    pending.push((middle, end));
                    pending.push((start, middle));
                }
                Err(error) => {
                    let error = ServiceError::from(error);
                    for slot in &mut results[start..end] {
                        *slot = Some(Err(error.clone()));
                    }
                }
            }
        }
        results.into_iter().map(|result| result.unwrap_or(Err(ServiceError::Internal))).collect()
    }

    async fn expire_insert_ids(self) {
        let window_days = i32::try_from(self.settings.idempotency_window_days).unwrap_or(i32::MAX);
        match self.events.expire_insert_ids(window_days, EXPIRY_CHUNK).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, window_days, "expired old insert ids"),
            Err(error) => tracing::warn!(error = %error, "expiring old insert ids failed, will retry"),
        }
    }
}

/// Calls collected for one commit.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    events: usize,
}

impl Batch {
    fn push(&mut self, job: Job) {
        self.events += job.events.len();
        self.jobs.push(job);
    }

    /// The commit's span: a child of the first caller's span (so a lone call's trace
    /// shows its database write), following from every other caller's.
    fn span(&self) -> tracing::Span {
        let parent = self.jobs.first().map_or_else(tracing::Span::none, |job| job.span.clone());
        let span = tracing::info_span!(parent: &parent, "ingest.commit", events = self.events, calls = self.jobs.len());
        for job in self.jobs.iter().skip(1) {
            span.follows_from(&job.span);
        }
        span
    }

    /// Adds calls that are already queued, without waiting, until `batch_size` events.
    /// A call is never split, so the last one may overshoot.
    fn fill_ready(&mut self, receiver: &mut mpsc::Receiver<Job>, batch_size: usize) {
        while self.events < batch_size {
            match receiver.try_recv() {
                Ok(job) => self.push(job),
                Err(_) => break,
            }
        }
    }
}
