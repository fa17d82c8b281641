//! The calls collected for one commit.

use std::time::Duration;

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;

use super::queue::Job;

/// Calls collected for one commit.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) jobs: Vec<Job>,
    pub(super) events: usize,
}

impl Batch {
    pub(super) fn push(&mut self, job: Job) {
        self.events += job.events.len();
        self.jobs.push(job);
    }

    /// The commit's span: a child of the first caller's span (so a lone call's trace
    /// shows its database write), following from every other caller's.
    pub(super) fn span(&self) -> tracing::Span {
        let parent = self.jobs.first().map_or_else(tracing::Span::none, |job| job.span.clone());
        let span = tracing::info_span!(parent: &parent, "ingest.commit", events = self.events, calls = self.jobs.len());
        for job in self.jobs.iter().skip(1) {
            span.follows_from(&job.span);
        }
        span
    }

    /// Adds calls that are already queued, without waiting, until `batch_size` events.
    /// A call is never split, so the last one may overshoot.
    pub(super) fn fill_ready(&mut self, receiver: &mut mpsc::Receiver<Job>, batch_size: usize) {
        while self.events < batch_size {
            match receiver.try_recv() {
                Ok(job) => self.push(job),
                Err(_) => break,
            }
        }
    }

    /// Waits for more calls to join while other commits are in flight: until the batch
    /// holds `batch_size` events, one of those commits ends (`commit_ended`), or `linger`
    /// passes. With no commit in flight (all `writers` permits of `in_flight` free) it
    /// returns at once, so a lone call never waits; under load, batches form from the
    /// calls that queue up behind the commits in flight.
    pub(super) async fn linger(
        &mut self,
        receiver: &mut mpsc::Receiver<Job>,
        batch_size: usize,
        linger: Duration,
        in_flight: &Semaphore,
        writers: usize,
        commit_ended: &Notify,
    ) {
        if linger.is_zero() {
            return;
        }
        let timeout = tokio::time::sleep_until(Instant::now() + linger);
        tokio::pin!(timeout);
        while self.events < batch_size {
            // Registered before the check, so a commit ending in between still wakes it.
            let ended = commit_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if in_flight.available_permits() >= writers {
                return;
            }
            tokio::select! {
                job = receiver.recv() => match job {
                    Some(job) => self.push(job),
                    None => return,
                },
                _ = &mut ended => return,
                _ = &mut timeout => return,
            }
        }
    }
}
