//! The writer task: takes queued calls into group commits, keeps at most
//! INGEST_WRITERS commits in flight, retries, isolates failing rows by bisection and
//! answers every caller after its commit.

use std::sync::Arc;

use backon::BackoffBuilder as _;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::batch::Batch;
use super::queue::{IngestQueue, Job};
use super::{
    EventResult, IngestSettings, Stored, EXPIRY_CHUNK, EXPIRY_INTERVAL, GAUGE_INTERVAL, MAX_RETRY_DELAY,
};
use crate::metrics;
use crate::models::NewEvent;
use crate::repository::postgres::{EventRepository, InsertOutcome, RepositoryError, WriteError};
use crate::service::readiness::DatabaseHealth;

#[derive(Clone)]
pub(super) struct Writer {
    pub(super) events: EventRepository,
    pub(super) settings: IngestSettings,
    pub(super) queue: IngestQueue,
    pub(super) health: DatabaseHealth,
}

/// A call inside a commit, and whether a statement carrying it ended with an unknown
/// outcome (then it may be stored already, and it is retried until its deadline).
struct InCommit {
    job: Job,
    outcome_unknown: bool,
}

impl Writer {
    pub(super) async fn run(self, mut receiver: mpsc::Receiver<Job>, mut stop: oneshot::Receiver<()>) {
        let batch_size = self.settings.batch_size.max(1);
        let writers = self.settings.writers.max(1);
        let in_flight = Arc::new(Semaphore::new(writers));
        // Told each time a commit ends, so a lingering batch can go at once.
        let commit_ended = Arc::new(Notify::new());
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
            batch
                .linger(&mut receiver, batch_size, self.settings.linger, &in_flight, writers, &commit_ended)
                .await;
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
            let commit_ended = commit_ended.clone();
            tokio::spawn(
                async move {
                    writer.commit(batch).await;
                    drop(commit_slot);
                    commit_ended.notify_waiters();
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
                let service_error = crate::service::repository_failure(error.into_error());
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
                    let error = crate::service::repository_failure(error);
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
        InsertOutcome::Suppressed => Stored::Suppressed,
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
            // Counted per RPC by the service (analytics_suppressed_total).
            Ok(Stored::Suppressed) => {}
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
