//! The load loops of the benchmarks: closed (a fixed number of calls in flight, back to
//! back), open (a fixed offered rate, no coordinated omission) and open with a cap on
//! calls outstanding, each returning events stored, a latency histogram in microseconds
//! and failed calls; and the paced loop under the capped one, which runs until told to
//! stop and hands every call's outcome with its scheduled instant to the caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 us to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// `workers` tasks call back to back for `duration`. Each call returns the events it
/// stored. Returns (events, latency histogram in us, failed calls).
pub async fn closed_loop<F, Fut>(workers: usize, duration: Duration, call: F) -> (u64, Histogram<u64>, u64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, ()>> + Send,
{
    let call = Arc::new(call);
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut histogram = new_histogram();
                let (mut events, mut errors) = (0u64, 0u64);
                let mut iteration = 0u64;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    match call(worker, iteration).await {
                        Ok(stored) => {
                            events += stored;
                            histogram.saturating_record(started.elapsed().as_micros() as u64);
                        }
                        Err(()) => errors += 1,
                    }
                    iteration += 1;
                }
                (events, histogram, errors)
            })
        })
        .collect();
    merge(tasks).await
}

/// Offers `rate` calls per second for `duration`, each scheduled at a fixed instant;
/// latency counts from the scheduled instant (no coordinated omission). Calls that a
/// worker could not start within one second of schedule are not sent and counted as
/// errors (the offered rate was not sustained).
pub async fn open_loop<F, Fut>(rate: u64, duration: Duration, call: F) -> (u64, Histogram<u64>, u64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, ()>> + Send,
{
    const WORKERS: u64 = 512;
    let call = Arc::new(call);
    let total = rate * duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let tasks: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut histogram = new_histogram();
                let (mut events, mut errors) = (0u64, 0u64);
                let mut index = worker;
                while index < total {
                    let scheduled = start + interval.mul_f64(index as f64);
                    tokio::time::sleep_until(scheduled).await;
                    if scheduled.elapsed() > Duration::from_secs(1) {
                        errors += 1;
                    } else {
                        match call(worker as usize).await {
                            Ok(stored) => {
                                events += stored;
                                histogram.saturating_record(scheduled.elapsed().as_micros() as u64);
                            }
                            Err(()) => errors += 1,
                        }
                    }
                    index += WORKERS;
                }
                (events, histogram, errors)
            })
        })
        .collect();
    merge(tasks).await
}

/// What one call of [`paced_loop`] came to: `Ok((events stored, latency in us from its
/// scheduled instant))`, or `Err(())` when it failed or could not start within one second
/// of schedule (then it was not sent).
pub type PacedOutcome = Result<(u64, u64), ()>;

/// Offers call number 0, 1, 2, ... at `rate` per second from `start` on, for as long as
/// `more(index)` says so, with at most `cap` outstanding: a call whose scheduled instant
/// comes while `cap` calls are outstanding waits for one to end, and its latency still
/// counts from the scheduled instant. A call that could not start within one second of
/// schedule is not sent. `record` gets every call's scheduled instant and outcome. Returns
/// once every call sent has ended.
pub async fn paced_loop<M, F, Fut, R>(
    rate: u64,
    cap: usize,
    start: tokio::time::Instant,
    mut more: M,
    call: F,
    record: R,
) where
    M: FnMut(u64) -> bool,
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<u64, ()>> + Send + 'static,
    R: Fn(tokio::time::Instant, PacedOutcome) + Send + Sync + 'static,
{
    let cap = cap.max(1);
    let permits = Arc::new(tokio::sync::Semaphore::new(cap));
    let record = Arc::new(record);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut next = 0;
    while more(next) {
        let index = next;
        next += 1;
        let scheduled = start + interval.mul_f64(index as f64);
        tokio::time::sleep_until(scheduled).await;
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        if scheduled.elapsed() > Duration::from_secs(1) {
            record(scheduled, Err(()));
            continue;
        }
        let future = call(index);
        let record = record.clone();
        tokio::spawn(async move {
            let outcome = future.await.map(|stored| (stored, scheduled.elapsed().as_micros() as u64));
            record(scheduled, outcome);
            drop(permit);
        });
    }
    // Every outstanding call has ended once all permits are free again.
    permits.acquire_many(cap as u32).await.ok();
}

/// Offers `rate` calls per second for `duration` with at most `cap` outstanding (a
/// [`paced_loop`] of `rate` x `duration` calls). Returns (events, latency histogram in us,
/// failed calls, seconds from the first scheduled instant until the last call ended, at
/// least `duration`).
pub async fn capped_open_loop<F, Fut>(
    rate: u64,
    cap: usize,
    duration: Duration,
    call: F,
) -> (u64, Histogram<u64>, u64, f64)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, ()>> + Send + 'static,
{
    let histogram = Arc::new(Mutex::new(new_histogram()));
    let (events, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let total = rate * duration.as_secs();
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let (recorded_histogram, recorded_events, recorded_errors) =
        (histogram.clone(), events.clone(), errors.clone());
    paced_loop(
        rate,
        cap,
        start,
        |index| index < total,
        call,
        move |_, outcome| match outcome {
            Ok((stored, latency)) => {
                recorded_events.fetch_add(stored, Ordering::Relaxed);
                recorded_histogram.lock().expect("histogram lock").saturating_record(latency);
            }
            Err(()) => {
                recorded_errors.fetch_add(1, Ordering::Relaxed);
            }
        },
    )
    .await;
    let elapsed = start.elapsed().as_secs_f64().max(duration.as_secs_f64());
    let histogram = histogram.lock().expect("histogram lock").clone();
    (events.load(Ordering::Relaxed), histogram, errors.load(Ordering::Relaxed), elapsed)
}

async fn merge(
    tasks: Vec<tokio::task::JoinHandle<(u64, Histogram<u64>, u64)>>,
) -> (u64, Histogram<u64>, u64) {
    let mut histogram = new_histogram();
    let (mut events, mut errors) = (0, 0);
    for task in tasks {
        if let Ok((task_events, task_histogram, task_errors)) = task.await {
            events += task_events;
            errors += task_errors;
            histogram.add(&task_histogram).ok();
        }
    }
    (events, histogram, errors)
}
