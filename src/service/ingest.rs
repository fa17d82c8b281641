//! Group commit: the bounded ingest queue between the TrackEvent(s) handlers and
//! PostgreSQL, and the writer task behind it.
//!
//! A call enqueues its validated events with a oneshot for the answer and waits until
//! its deadline. One writer task coalesces queued calls into multi-row inserts of up to
//! INGEST_BATCH_SIZE events (waiting at most INGEST_LINGER_MS for more), keeps at most
//! INGEST_WRITERS commits in flight, and answers every caller only after its commit:
//! nothing is acknowledged from memory. A row that fails on its own is isolated by
//! bisection, so it fails only its caller. The queue holds at most INGEST_QUEUE_CAPACITY
//! events; a call that does not fit is refused at once (backpressure). On shutdown the
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

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder as _;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;
use uuid::Uuid;

use super::readiness::DatabaseHealth;
use super::ServiceError;
use crate::config::IngestConfig;
use crate::metrics;
use crate::models::NewEvent;
use crate::repository::postgres::{EventRepository, InsertOutcome, RepositoryError, WriteError};

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
    fn answer_timeout(&self) -> Duration {
        self.commit_timeout + COMMIT_ANSWER_SLACK
    }
}

/// A committed event: stored now, or found stored earlier under its insert_id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    Accepted(Uuid),
    /// Not stored again; the id of the event stored for the same insert_id.
    Duplicate(Uuid),
}

impl Stored {
    pub(crate) fn event_id(&self) -> Uuid {
        match self {
            Stored::Accepted(id) | Stored::Duplicate(id) => *id,
        }
    }
}

/// The answer for one event of a call.
pub(crate) type EventResult = Result<Stored, ServiceError>;

/// Where one call stands between its caller and the writer.
#[derive(Debug, Default)]
struct Claim(AtomicU8);

/// Nothing of the call is stored and none of its statements is in flight.
const QUEUED: u8 = 0;
/// A statement carrying the call is in flight, or was and its outcome is unknown.
const SENT: u8 = 1;
/// The caller gave up while the call was queued: it must never be sent.
const WITHDRAWN: u8 = 2;

impl Claim {
    /// The writer takes the call into a statement; false when the caller withdrew it.
    fn send(&self) -> bool {
        self.0.compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The writer knows its statement failed without storing anything.
    fn release(&self) {
        self.0.store(QUEUED, Ordering::Release);
    }

    /// The caller gives up; true when nothing of the call can be stored any more, false
    /// when a statement carrying it is in flight or of unknown outcome.
    fn withdraw(&self) -> bool {
        match self.0.compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(state) => state == WITHDRAWN,
        }
    }
}

/// Withdraws the call when the caller's future is dropped (the call was cancelled or
/// its deadline cut it short), so a call nobody waits for is never written.
struct WithdrawOnDrop(Arc<Claim>);

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        self.0.withdraw();
    }
}

/// One call's events on their way to a commit. The permits are its room in the queue,
/// given back when it is answered or dropped; the span is the caller's, so the commit
/// joins its trace.
struct Job {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Vec<EventResult>>,
    /// Held, not read: dropping the job gives its room in the queue back.
    _room: OwnedSemaphorePermit,
    span: tracing::Span,
    deadline: Instant,
    claim: Arc<Claim>,
}

impl Job {
    /// Answers UNAVAILABLE, unless the caller already withdrew it. Only for a call none of
    /// whose statements can still commit.
    fn refuse(self, reason: &'static str) {
        metrics::record_events_rejected("database", self.events.len() as u64);
        self.reply.send(vec![Err(ServiceError::Unavailable(reason)); self.events.len()]).ok();
    }
}

/// The sending side, held by the service. Cheap to clone; never blocks a caller.
#[derive(Clone, Debug)]
pub struct IngestQueue {
    sender: mpsc::Sender<Job>,
    room: Arc<Semaphore>,
    capacity: usize,
    health: Option<DatabaseHealth>,
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

#[derive(Clone)]
struct Writer {
    events: EventRepository,
    settings: IngestSettings,
    queue: IngestQueue,
    health: DatabaseHealth,
}

/// A call inside a commit, and whether a statement carrying it ended with an unknown
/// outcome (then it may be stored already, and it is retried until its deadline).
struct InCommit {
    job: Job,
    outcome_unknown: bool,
}

impl Writer {
    async fn run(self, mut receiver: mpsc::Receiver<Job>, mut stop: oneshot::Receiver<()>) {
        let batch_size = self.settings.batch_size.max(1);
        let writers = self.settings.writers.max(1);
        let in_flight = Arc::new(Semaphore::new(writers));
        let mut expiry = tokio::time::interval(EXPIRY_INTERVAL);
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unreachable = self.health.clone();
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
            if !self.health.is_reachable() {
                refuse_if_queued(first);
                continue;
            }
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
            // shows as a full queue), and refuse the batch as soon as PostgreSQL is known
            // to be unreachable instead of letting it wait for its deadline.
            let commit_slot = loop {
                tokio::select! {
                    slot = in_flight.clone().acquire_owned() => break Some(slot),
                    _ = gauges.tick() => metrics::set_ingest_queue(self.queue.depth(), self.queue.capacity),
                    _ = unreachable.wait_unreachable() => break None,
                }
            };
            let Some(commit_slot) = commit_slot else {
                batch.jobs.into_iter().for_each(refuse_if_queued);
                continue;
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

    /// Writes one batch and answers each of its callers: retries attempts that stored
    /// nothing (within DB_RETRY_MAX_ATTEMPTS, while PostgreSQL is not known to be down)
    /// and attempts of unknown outcome (until each caller's deadline).
    async fn commit(&self, batch: Batch) {
        let mut calls: Vec<InCommit> =
            batch.jobs.into_iter().map(|job| InCommit { job, outcome_unknown: false }).collect();
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.settings.retry_base_delay)
            .with_max_delay(MAX_RETRY_DELAY)
            .with_factor(2.0)
            .without_max_times()
            .build();
        let mut attempt = 0u32;
        loop {
            // Into this attempt go the calls whose callers still wait; a withdrawn call is
            // dropped (its room comes back), as is one of unknown outcome past its
            // deadline (its caller was told DEADLINE_EXCEEDED).
            let now = Instant::now();
            calls.retain(|call| {
                if call.outcome_unknown {
                    now < call.job.deadline && !call.job.reply.is_closed()
                } else {
                    call.job.claim.send()
                }
            });
            if calls.is_empty() {
                return;
            }
            attempt += 1;
            let events: Vec<&NewEvent> = calls.iter().flat_map(|call| call.job.events.iter()).collect();
            let started = std::time::Instant::now();
            let result = self.insert(&events).await;
            metrics::record_ingest_commit(events.len(), started.elapsed());
            let error = match result {
                Ok(outcomes) => {
                    let results: Vec<EventResult> = outcomes
                        .into_iter()
                        .zip(&events)
                        .map(|(outcome, event)| Ok(stored(outcome, event)))
                        .collect();
                    drop(events);
                    answer(calls, results);
                    return;
                }
                Err(WriteError::NotStored(RepositoryError::Query(error))) if events.len() > 1 => {
                    tracing::warn!(events = events.len(), error = %error, "group commit failed, isolating the failing rows");
                    drop(events);
                    self.commit_isolating(calls).await;
                    return;
                }
                Err(error) => error,
            };
            drop(events);
            match &error {
                WriteError::NotStored(_) => {
                    for call in calls.iter().filter(|call| !call.outcome_unknown) {
                        call.job.claim.release();
                    }
                }
                WriteError::OutcomeUnknown(_) => {
                    calls.iter_mut().for_each(|call| call.outcome_unknown = true)
                }
            }
            if matches!(error.error(), RepositoryError::TimedOut(_)) {
                self.health.report_unreachable("a commit did not answer in time");
            } else if error.error().is_retryable() {
                self.health.probe_soon();
            }
            let retry_stored_nothing = error.error().is_retryable()
                && attempt < self.settings.max_attempts
                && self.health.is_reachable();
            if !retry_stored_nothing {
                // Calls none of whose statements can have committed are answered now.
                let (unknown, known): (Vec<_>, Vec<_>) =
                    calls.into_iter().partition(|call| call.outcome_unknown);
                let service_error = super::repository_failure(error.into_error());
                for call in known {
                    let count = call.job.events.len();
                    metrics::record_events_rejected("database", count as u64);
                    call.job.reply.send(vec![Err(service_error.clone()); count]).ok();
                }
                calls = unknown;
                if calls.is_empty() {
                    return;
                }
            } else {
                tracing::warn!(attempt, error = %error, "group commit failed, retrying");
            }
            let pause = delays.next().unwrap_or(MAX_RETRY_DELAY);
            let earliest_deadline =
                calls.iter().map(|call| call.job.deadline).min().unwrap_or_else(Instant::now);
            tokio::time::sleep_until((Instant::now() + pause).min(earliest_deadline)).await;
        }
    }

    /// One attempt of one multi-row insert.
    async fn insert(&self, events: &[&NewEvent]) -> Result<Vec<InsertOutcome>, WriteError> {
        let window_days = i32::try_from(self.settings.idempotency_window_days).unwrap_or(i32::MAX);
        self.events.insert_batch(events, window_days, self.settings.answer_timeout()).await
    }

    /// A statement failed for a reason that may belong to one row (a query error, not
    /// an outage): splits the batch in halves and tries each, down to single rows, so a
    /// poison row fails only itself. Each statement is atomic and idempotent on retry,
    /// so splitting never stores a row twice. A call with a row whose statement ended
    /// with an unknown outcome is not answered (its caller gets DEADLINE_EXCEEDED).
    async fn commit_isolating(&self, calls: Vec<InCommit>) {
        let events: Vec<&NewEvent> = calls.iter().flat_map(|call| call.job.events.iter()).collect();
        let mut results: Vec<Option<EventResult>> = vec![None; events.len()];
        let mut pending = vec![(0, events.len())];
        while let Some((start, end)) = pending.pop() {
            let slice = &events[start..end];
            match self.insert(slice).await {
                Ok(outcomes) => {
                    for ((slot, event), outcome) in results[start..end].iter_mut().zip(slice).zip(outcomes) {
                        *slot = Some(Ok(stored(outcome, event)));
                    }
                }
                Err(WriteError::NotStored(RepositoryError::Query(_))) if slice.len() > 1 => {
                    let middle = start + slice.len() / 2;
                    pending.push((middle, end));
                    pending.push((start, middle));
                }
                Err(WriteError::NotStored(error)) => {
                    let error = super::repository_failure(error);
                    for slot in &mut results[start..end] {
                        *slot = Some(Err(error.clone()));
                    }
                }
                Err(WriteError::OutcomeUnknown(error)) => {
                    tracing::warn!(events = slice.len(), error = %error, "commit outcome unknown while isolating rows");
                }
            }
        }
        drop(events);
        let mut results = results.into_iter();
        for call in calls {
            let answer: Option<Vec<EventResult>> = results.by_ref().take(call.job.events.len()).collect();
            match answer {
                Some(answer) => {
                    record_results(&answer);
                    call.job.reply.send(answer).ok();
                }
                // Left unanswered: the caller waits for its deadline (outcome unknown).
                None => drop(call),
            }
        }
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

/// Answers a call that is still queued with UNAVAILABLE (PostgreSQL is known to be
/// unreachable); a call its caller already withdrew is just dropped.
fn refuse_if_queued(job: Job) {
    if job.claim.withdraw() {
        job.refuse("database unavailable");
    }
}

fn stored(outcome: InsertOutcome, event: &NewEvent) -> Stored {
    match outcome {
        InsertOutcome::Inserted => Stored::Accepted(event.id),
        InsertOutcome::Duplicate { original } => Stored::Duplicate(original),
    }
}

/// Answers every call of a committed batch with its share of `results`, in order.
fn answer(calls: Vec<InCommit>, results: Vec<EventResult>) {
    record_results(&results);
    let mut results = results.into_iter();
    for call in calls {
        let answer: Vec<EventResult> = results.by_ref().take(call.job.events.len()).collect();
        // A caller that went away (deadline, cancel) was never acknowledged.
        call.job.reply.send(answer).ok();
    }
}

fn record_results(results: &[EventResult]) {
    let (mut accepted, mut duplicates, mut failed) = (0u64, 0u64, 0u64);
    for result in results {
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
