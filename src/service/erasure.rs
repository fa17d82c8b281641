//! DeleteUser and GetUserDeletion: erasure requests recorded durably, then carried out
//! by the erasure worker of any replica in bounded batches
//! (src/repository/postgres/erasure.rs says what each step does).
//!
//! A call records the request (and the suppression, with `suppress`), wakes this
//! replica's worker and waits for completion up to its deadline; a request not completed
//! by then is answered RUNNING and goes on. The worker of every replica looks for
//! requests whose lease lapsed (a replica that crashed mid-way), so an erasure completes
//! as long as one replica runs. Erasure batches are separate short transactions: ingestion
//! and counts go on meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::{repository_failure, AnalyticsService, ServiceError};
use crate::metrics;
use crate::models::UserId;
use crate::repository::postgres::erasure::{ErasureRepository, ErasureRequest};
use crate::repository::postgres::Database;

/// Events (and idempotency keys) deleted per batch transaction: a few tens of
/// milliseconds of work, so no lock is held long.
pub(crate) const ERASURE_BATCH_SIZE: i64 = 5_000;

/// How often a worker looks for requests nobody works on (a crashed replica's).
pub(crate) const ERASURE_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The longest a DeleteUser call waits for its erasure before answering RUNNING.
const DELETE_USER_MAX_WAIT: Duration = Duration::from_secs(10);

/// How long before its deadline a waiting DeleteUser call answers.
const ANSWER_MARGIN: Duration = Duration::from_millis(200);

/// How long the final pass of a suppressing erasure waits for writes that started
/// before the suppression; past it, it goes on (and logs that it did).
const SNAPSHOT_BARRIER_LIMIT: Duration = Duration::from_secs(30);

/// Wakes this replica's erasure worker.
#[derive(Clone, Debug, Default)]
pub(crate) struct ErasureSignal(Arc<Notify>);

impl ErasureSignal {
    pub(crate) fn wake(&self) {
        self.0.notify_one();
    }

    async fn woken(&self) {
        self.0.notified().await;
    }
}

impl AnalyticsService {
    /// Records an erasure of `user_id` (with `suppress`, also its suppression) and waits
    /// for it until `deadline` (at most [`DELETE_USER_MAX_WAIT`]); returns the request as
    /// it stands then.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn delete_user(
        &self,
        user_id: &UserId,
        suppress: bool,
        deadline: Instant,
    ) -> Result<ErasureRequest, ServiceError> {
        let subject = self.subject_hasher()?.hash(user_id.as_str());
        let erasures = ErasureRepository::new(self.database.clone());
        let request =
            erasures.record(&subject, user_id.as_str(), suppress).await.map_err(repository_failure)?;
        metrics::record_erasure_requested(suppress);
        self.erasure_signal.wake();
        let wait_until = deadline
            .checked_sub(ANSWER_MARGIN)
            .unwrap_or(deadline)
            .min(Instant::now() + DELETE_USER_MAX_WAIT);
        let mut current = request;
        while !current.is_completed() && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(25).min(wait_until - Instant::now())).await;
            match erasures.get(current.id).await.map_err(repository_failure)? {
                Some(request) => current = request,
                None => return Err(ServiceError::Internal),
            }
        }
        Ok(current)
    }

    /// The request `id` as it stands.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn user_deletion(&self, id: Uuid) -> Result<ErasureRequest, ServiceError> {
        self.subject_hasher()?;
        ErasureRepository::new(self.database.clone())
            .get(id)
            .await
            .map_err(repository_failure)?
            .ok_or(ServiceError::NotFound("no erasure request with this request_id"))
    }

    /// The worker of this replica (see the module documentation); runs until cancelled.
    pub(crate) fn erasure_worker(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        run_erasure_worker(self.database.clone(), self.erasure_signal.clone())
    }
}

/// Works on one leased request after another; between them waits for a wake-up or
/// [`ERASURE_POLL_INTERVAL`]. A failure is logged once until a request completes again.
async fn run_erasure_worker(database: Database, signal: ErasureSignal) {
    let erasures = ErasureRepository::new(database);
    let mut failing = false;
    loop {
        match erasures.lease(None).await {
            Ok(Some(request)) => match erase(&erasures, request).await {
                Ok(completed) => {
                    failing = false;
                    metrics::record_erasure_completed();
                    tracing::info!(
                        target: "audit",
                        request_id = %completed.id,
                        subject_hash = %completed.subject_hash.to_hex(),
                        events_deleted = completed.events_deleted,
                        insert_ids_deleted = completed.insert_ids_deleted,
                        identity_deleted = completed.identity_deleted,
                        suppress = completed.suppress,
                        "user erasure completed"
                    );
                    continue;
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(error = %error, "user erasure failed, resuming later");
                    }
                    failing = true;
                }
            },
            Ok(None) => {}
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %error, "looking for user erasures failed, retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            () = signal.woken() => {}
            () = tokio::time::sleep(ERASURE_POLL_INTERVAL) => {}
        }
    }
}

/// Deletes the request's rows batch by batch, renewing the lease each time, then runs
/// the final transaction.
async fn erase(
    erasures: &ErasureRepository,
    mut request: ErasureRequest,
) -> Result<ErasureRequest, crate::repository::postgres::RepositoryError> {
    loop {
        let batch = erasures.erase_batch(&request, ERASURE_BATCH_SIZE).await?;
        metrics::record_erasure_batch(batch.events);
        match erasures.lease(Some(request.id)).await? {
            Some(renewed) => request = renewed,
            // Completed by another replica meanwhile.
            None => return erasures.complete(request.id).await,
        }
        if batch.events < ERASURE_BATCH_SIZE as u64 && batch.insert_ids < ERASURE_BATCH_SIZE as u64 {
            break;
        }
    }
    if request.suppress {
        let reached = erasures
            .wait_for_older_snapshots(&request, Duration::from_millis(20), SNAPSHOT_BARRIER_LIMIT)
            .await?;
        if !reached {
            tracing::warn!(
                request_id = %request.id,
                "sessions with snapshots older than the suppression still run; completing the erasure anyway"
            );
        }
    }
    erasures.complete(request.id).await
}
