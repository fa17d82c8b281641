//! The calls collected for one commit.

use tokio::sync::mpsc;

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
}
