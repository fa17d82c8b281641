//! The checker task of the shared budgets: a group commit for rate limiting, without a
//! linger. Callers queue their checks; the task takes every check waiting, sends them to
//! Redis as one pipeline and answers each caller from its part of the replies. While a
//! pipeline is in flight the next checks accumulate, so under load a round trip carries
//! many checks, and an idle service answers a lone check at once.
//!
//! Batching changes no decision: every token is still granted by the script on Redis,
//! atomically per key, so replicas sharing Redis never grant more than the budget
//! together, as if each check had its own round trip.

use std::sync::Arc;

use ::redis::{ErrorKind, RedisError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::budget::{BudgetStore, Grant, Spend};

/// Pipelines in flight at once; more checks wait and join the next pipeline.
const PIPELINES_IN_FLIGHT: usize = 2;
/// The most callers' checks one pipeline carries (each of them one or more keys).
const MAX_REQUESTS_PER_PIPELINE: usize = 1024;

struct Request {
    spends: Vec<Spend>,
    reply: oneshot::Sender<Result<Vec<Grant>, RedisError>>,
}

/// The queue of the checker task; the task ends when the checker is dropped.
pub(super) struct Checker {
    requests: mpsc::UnboundedSender<Request>,
}

impl Checker {
    /// Starts the task on the current Tokio runtime.
    pub(super) fn start(store: Arc<BudgetStore>) -> Self {
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(store, queue));
        Self { requests }
    }

    /// Queues `spends` for the next pipeline and waits for their answers.
    pub(super) async fn spend(&self, spends: Vec<Spend>) -> Result<Vec<Grant>, RedisError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request { spends, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> RedisError {
    RedisError::from((ErrorKind::Client, "rate limit checker stopped"))
}

async fn run(store: Arc<BudgetStore>, mut queue: mpsc::UnboundedReceiver<Request>) {
    let in_flight = Arc::new(Semaphore::new(PIPELINES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        // Waiting for a free pipeline slot lets more checks queue up behind `first`.
        let Ok(slot) = in_flight.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_REQUESTS_PER_PIPELINE {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            answer(&store, batch).await;
            drop(slot);
        });
    }
}

/// Sends the batch's checks as one pipeline and hands each caller its answers; a failed
/// round trip fails every check of the batch (each caller then falls back).
async fn answer(store: &BudgetStore, batch: Vec<Request>) {
    let mut spends = Vec::new();
    let mut callers = Vec::with_capacity(batch.len());
    for request in batch {
        callers.push((request.spends.len(), request.reply));
        spends.extend(request.spends);
    }
    match store.spend_all(&spends).await {
        Ok(grants) => {
            let mut grants = grants.into_iter();
            for (size, reply) in callers {
                drop(reply.send(Ok(grants.by_ref().take(size).collect())));
            }
        }
        Err(error) => {
            for (_, reply) in callers {
                drop(reply.send(Err(error.clone())));
            }
        }
    }
}
