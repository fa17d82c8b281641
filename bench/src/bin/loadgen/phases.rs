//! The measured phases against a running server: the no-op (grpc.health.v1 Check, on the
//! service or the bare server), unary TrackEvent closed loop, open loop at a fixed rate
//! and open loop capped at a number outstanding, and TrackEvents batches. Each samples the
//! server's CPU and RSS ([`Probe`]) and counts rate-limited events as errors.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use analytics_service::pb;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use hdrhistogram::Histogram;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::probe::{Probe, Usage};
use crate::report::{commit_stats, service_row, CommitStats, Cost, Row, ServicePhase};
use crate::workload::synthetic;
use analytics_bench::loops::{capped_open_loop, closed_loop, open_loop};

type Client = AnalyticsServiceClient<Channel>;

/// `concurrency` no-op calls in flight over `channels` against the server `pid`.
pub(crate) async fn noop(
    key: &'static str,
    name: &str,
    channels: &[Channel],
    pid: u32,
    concurrency: usize,
    duration: Duration,
) -> Row {
    let health: Vec<_> = channels.iter().cloned().map(HealthClient::new).collect();
    let probe = Probe::start(pid);
    let (count, latency, errors) =
        closed_loop(concurrency, duration, move |worker, _| {
            let mut client = health[worker % health.len()].clone();
            async move {
                client.check(HealthCheckRequest { service: String::new() }).await.map(|_| 1).map_err(|_| ())
            }
        })
        .await;
    let usage = probe.finish().await;
    let connections = channels.len();
    Row {
        key,
        name: name.into(),
        offered: format!("saturation, {concurrency} in flight on {connections} connection(s)"),
        achieved: count as f64 / duration.as_secs_f64(),
        unit: "calls/s",
        latency: Some(latency),
        errors,
        note: String::new(),
        usage: Some(Cost::new(usage, count)),
    }
}

/// The service under test: its clients, metrics address, process and the event numbers
/// handed out so far (every event of a run is a different synthetic event).
pub(crate) struct Service {
    pub(crate) clients: Vec<Client>,
    pub(crate) admin: SocketAddr,
    pub(crate) pid: u32,
    pub(crate) sequence: Arc<AtomicU64>,
    pub(crate) duration: Duration,
    /// Appended to every row name, e.g. " (Redis off)".
    pub(crate) label: &'static str,
}

/// One unary TrackEvent of event `n`; a refusal by the rate limiter also counts in
/// `limited`.
async fn track_one(mut client: Client, n: u64, limited: Arc<AtomicU64>) -> Result<u64, ()> {
    match client.track_event(synthetic(n)).await {
        Ok(_) => Ok(1),
        Err(status) => {
            if status.code() == Code::ResourceExhausted && status.message().contains("rate limit") {
                limited.fetch_add(1, Ordering::Relaxed);
            }
            Err(())
        }
    }
}

/// The measurement around one phase: stats and probe before, the row after.
struct Running {
    before: CommitStats,
    probe: Probe,
    limited: Arc<AtomicU64>,
}

impl Service {
    async fn begin(&self) -> Running {
        Running {
            before: commit_stats(self.admin).await,
            probe: Probe::start(self.pid),
            limited: Arc::new(AtomicU64::new(0)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn end(
        &self,
        running: Running,
        key: &'static str,
        name: &str,
        offered: String,
        (count, latency, errors): (u64, Histogram<u64>, u64),
        seconds: f64,
    ) -> Row {
        let usage: Usage = running.probe.finish().await;
        service_row(ServicePhase {
            key,
            name: format!("{name}{}", self.label),
            offered,
            count,
            seconds,
            latency,
            errors,
            limited: running.limited.load(Ordering::Relaxed),
            before: running.before,
            after: commit_stats(self.admin).await,
            usage,
        })
    }

    /// Unary TrackEvent, `concurrency` calls in flight over the first `connections`
    /// clients.
    pub(crate) async fn unary_closed(
        &self,
        key: &'static str,
        concurrency: usize,
        connections: usize,
    ) -> Row {
        let running = self.begin().await;
        let clients: Vec<Client> = self.clients.iter().take(connections.max(1)).cloned().collect();
        let used = clients.len();
        let (sequence, limited) = (self.sequence.clone(), running.limited.clone());
        let result = closed_loop(concurrency, self.duration, move |worker, _| {
            let n = sequence.fetch_add(1, Ordering::Relaxed);
            track_one(clients[worker % clients.len()].clone(), n, limited.clone())
        })
        .await;
        let offered = if concurrency == 1 {
            "1 in flight".to_string()
        } else {
            format!("saturation, {concurrency} in flight on {used} connection(s)")
        };
        let seconds = self.duration.as_secs_f64();
        self.end(running, key, "service: unary TrackEvent", offered, result, seconds).await
    }

    /// Unary TrackEvent offered at `rate` per second (open loop).
    pub(crate) async fn unary_rate(&self, rate: u64) -> Row {
        let running = self.begin().await;
        let clients = self.clients.clone();
        let (sequence, limited) = (self.sequence.clone(), running.limited.clone());
        let result = open_loop(rate, self.duration, move |worker| {
            let n = sequence.fetch_add(1, Ordering::Relaxed);
            track_one(clients[worker % clients.len()].clone(), n, limited.clone())
        })
        .await;
        let seconds = self.duration.as_secs_f64();
        self.end(running, "rate", "service: unary TrackEvent", format!("{rate}/s"), result, seconds).await
    }

    /// Unary TrackEvent offered at `rate` per second with at most `cap` outstanding.
    pub(crate) async fn unary_capped(&self, rate: u64, cap: usize) -> Row {
        let running = self.begin().await;
        let clients = self.clients.clone();
        let (sequence, limited) = (self.sequence.clone(), running.limited.clone());
        let (count, latency, errors, seconds) = capped_open_loop(rate, cap, self.duration, move |index| {
            let n = sequence.fetch_add(1, Ordering::Relaxed);
            track_one(clients[index as usize % clients.len()].clone(), n, limited.clone())
        })
        .await;
        let offered = format!("{rate}/s, at most {cap} in flight");
        let name = "service: unary TrackEvent";
        self.end(running, "capped", name, offered, (count, latency, errors), seconds).await
    }

    /// TrackEvents batches of `size`, `concurrency` calls in flight; a call with any event
    /// not accepted is an error.
    pub(crate) async fn batch(&self, key: &'static str, size: u64, concurrency: usize) -> Row {
        let running = self.begin().await;
        let clients = self.clients.clone();
        let (sequence, limited) = (self.sequence.clone(), running.limited.clone());
        let result = closed_loop(concurrency, self.duration, move |worker, _| {
            let mut client = clients[worker % clients.len()].clone();
            let first = sequence.fetch_add(size, Ordering::Relaxed);
            let events = (first..first + size).map(synthetic).collect();
            let limited = limited.clone();
            async move {
                let response =
                    client.track_events(pb::TrackEventsRequest { events }).await.map_err(|status| {
                        if status.code() == Code::ResourceExhausted && status.message().contains("rate limit")
                        {
                            limited.fetch_add(size, Ordering::Relaxed);
                        }
                    })?;
                let results = response.into_inner().results;
                let accepted = results
                    .iter()
                    .filter(|result| result.status == pb::TrackEventStatus::Accepted as i32)
                    .count() as u64;
                let refused = results
                    .iter()
                    .filter(|result| {
                        result.status == pb::TrackEventStatus::Rejected as i32
                            && result.code == Code::ResourceExhausted as i32
                            && result.error.contains("rate limit")
                    })
                    .count() as u64;
                limited.fetch_add(refused, Ordering::Relaxed);
                if accepted == size {
                    Ok(size)
                } else {
                    Err(())
                }
            }
        })
        .await;
        let offered = format!("saturation, {concurrency} in flight");
        let name = format!("service: TrackEvents x{size}");
        let seconds = self.duration.as_secs_f64();
        self.end(running, key, &name, offered, result, seconds).await
    }
}
