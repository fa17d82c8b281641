//! Prometheus metrics: names, help texts, buckets and the small `record_*` helpers the
//! rest of the code calls. The recorder is process-wide and installed once.
//!
//! gRPC metrics are named like go-grpc-prometheus so stock dashboards work.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub(crate) const GRPC_STARTED: &str = "grpc_server_started_total";
pub(crate) const GRPC_HANDLED: &str = "grpc_server_handled_total";
pub(crate) const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
pub(crate) const EVENTS_INGESTED: &str = "analytics_events_ingested_total";
pub(crate) const EVENTS_REJECTED: &str = "analytics_events_rejected_total";
pub(crate) const DB_QUERY_SECONDS: &str = "analytics_db_query_seconds";
pub(crate) const DB_ERRORS: &str = "analytics_db_errors_total";
pub(crate) const DB_POOL_CONNECTIONS: &str = "analytics_db_pool_connections";
pub(crate) const DB_POOL_MAX_CONNECTIONS: &str = "analytics_db_pool_max_connections";
pub(crate) const DATABASE_UP: &str = "analytics_database_up";
pub(crate) const REDIS_COMMAND_SECONDS: &str = "analytics_redis_command_seconds";
pub(crate) const REDIS_ERRORS: &str = "analytics_redis_errors_total";
pub(crate) const CACHE_REQUESTS: &str = "analytics_cache_requests_total";
pub(crate) const READ_REPLICA_QUERIES: &str = "analytics_read_replica_queries_total";
pub(crate) const USER_ORDINAL_LOOKUPS: &str = "analytics_user_ordinal_lookups_total";
pub(crate) const USER_COUNT_REREADS: &str = "analytics_user_count_rereads_total";
pub(crate) const FOLDED_BITMAPS: &str = "analytics_folded_bitmaps_total";
pub(crate) const EDGE_HOURS: &str = "analytics_edge_hours_total";
pub(crate) const HOUR_SPANS_BUILT: &str = "analytics_hour_spans_built_total";
pub(crate) const EDGE_HOUR_SUMMARIES_BUILT: &str = "analytics_edge_hour_summaries_built_total";
pub(crate) const EDGE_HOUR_SUMMARIES_DROPPED: &str = "analytics_edge_hour_summaries_dropped_total";
pub(crate) const READ_REPLICA_FALLBACKS: &str = "analytics_read_replica_fallbacks_total";
pub(crate) const READY: &str = "analytics_ready";
pub(crate) const RATE_LIMITED: &str = "analytics_rate_limited_total";
pub(crate) const BUILD_INFO: &str = "analytics_build_info";
pub(crate) const TLS_HANDSHAKES: &str = "analytics_tls_handshakes_total";
pub(crate) const TLS_RELOADS: &str = "analytics_tls_reloads_total";
pub(crate) const RATE_LIMIT_FALLBACKS: &str = "analytics_rate_limit_fallbacks_total";
pub(crate) const RATE_LIMIT_ROUND_TRIPS: &str = "analytics_rate_limit_redis_roundtrips_total";
pub(crate) const RATE_LIMIT_LEASED_CHECKS: &str = "analytics_rate_limit_leased_checks_total";
pub(crate) const PERMISSION_DENIED: &str = "analytics_permission_denied_total";
pub(crate) const TRACE_EXPORT_FAILURES: &str = "analytics_trace_export_failures_total";
pub(crate) const CONNECTIONS_CLOSED_EARLY: &str = "analytics_grpc_connections_closed_early_total";

/// Latency buckets in seconds: sub-millisecond cache hits up to the request timeout.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (first call) and returns the handle that renders
/// the text exposition format. Later calls return the same handle.
pub(crate) fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("latency buckets are not empty")
                .set_buckets_for_metric(Matcher::Full(INGEST_BATCH_SIZE.into()), BATCH_SIZE_BUCKETS)
                .expect("batch size buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe_all();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "git_commit" => env!("ANALYTICS_GIT_COMMIT")).set(1.0);
            handle
        })
        .clone()
}

fn describe_all() {
    describe_counter!(GRPC_STARTED, "RPCs started on the server.");
    describe_counter!(GRPC_HANDLED, "RPCs completed on the server, by status code.");
    describe_counter!(
        CONNECTIONS_CLOSED_EARLY,
        "gRPC connections closed before carrying a call, by reason (no_preface, handshake_backlog)."
    );
    describe_histogram!(
        GRPC_HANDLING_SECONDS,
        Unit::Seconds,
        "Time to handle an RPC, until the response headers."
    );
    describe_counter!(EVENTS_INGESTED, "Events committed to PostgreSQL.");
    describe_counter!(EVENTS_REJECTED, "Events not stored, by reason.");
    describe_histogram!(
        DB_QUERY_SECONDS,
        Unit::Seconds,
        "Database call latency including retries, by operation."
    );
    describe_counter!(DB_ERRORS, "Database calls that failed after retries, by operation and kind.");
    describe_gauge!(DB_POOL_CONNECTIONS, "Open database connections, by state.");
    describe_gauge!(DB_POOL_MAX_CONNECTIONS, "Configured size of the database pool.");
    describe_gauge!(DATABASE_UP, "1 when PostgreSQL answered the last health probe, else 0.");
    describe_histogram!(REDIS_COMMAND_SECONDS, Unit::Seconds, "Redis call latency, by operation.");
    describe_counter!(REDIS_ERRORS, "Failed Redis calls, by operation.");
    describe_counter!(
        CACHE_REQUESTS,
        "Count-cache lookups, by query and result (hit, miss, or fresh for answers over open buckets)."
    );
    describe_counter!(READ_REPLICA_QUERIES, "Count calls answered from the read replica.");
    describe_counter!(
        USER_ORDINAL_LOOKUPS,
        "Ordinals of users not folded yet that unique-user counts needed, by result (hit: remembered by this replica, miss: read from PostgreSQL)."
    );
    describe_counter!(
        USER_COUNT_REREADS,
        "Unique-user counts read again with the ordinals probed in one statement, because an erasure committed between their two statements."
    );
    describe_counter!(
        FOLDED_BITMAPS,
        "Folded user bitmaps (whole days and hours) that unique-user counts not cached needed, by source (memory: remembered by this replica as the count's snapshot shows them, read: sent by PostgreSQL)."
    );
    describe_counter!(
        EDGE_HOURS,
        "Partial hours at the edges of counts that could not be read whole, by query and source (summary: a kept summary of the folded hour, spans: the hour's stored spans, live_spans: the live spans the fold keeps of an hour still taking events, raw: the raw events)."
    );
    describe_counter!(HOUR_SPANS_BUILT, "Closed hours whose user spans the span builder wrote (first and last second of each user, for unique-user counts).");
    describe_counter!(
        EDGE_HOUR_SUMMARIES_BUILT,
        "Summaries of folded hours built and kept for the partial hours at the edges of counts."
    );
    describe_counter!(
        EDGE_HOUR_SUMMARIES_DROPPED,
        "Summaries of folded hours not built because the queue of builds (one runs at a time) was full."
    );
    describe_counter!(
        READ_REPLICA_FALLBACKS,
        "Count calls answered from the primary although a read replica is configured, by reason (lagging, unavailable)."
    );
    describe_gauge!(READY, "1 when the service is ready to serve, else 0.");
    describe_counter!(RATE_LIMITED, "Events refused because their budget was spent.");
    describe_gauge!(BUILD_INFO, "Build information; the value is always 1.");
    describe_counter!(TLS_HANDSHAKES, "TLS handshakes on the gRPC port, by result (ok or refused).");
    describe_counter!(TLS_RELOADS, "Changes of the TLS files seen, by result (ok or invalid).");
    describe_counter!(RATE_LIMIT_FALLBACKS, "Switches from the Redis-shared rate limiter to the local one.");
    describe_counter!(
        RATE_LIMIT_ROUND_TRIPS,
        "Round trips to Redis for rate limiting (a pipeline of budget checks, or a script load)."
    );
    describe_counter!(
        RATE_LIMIT_LEASED_CHECKS,
        "Budget checks (one per budget key of a call) answered in full from tokens this replica leased from Redis earlier, without a round trip."
    );
    describe_counter!(
        TRACE_EXPORT_FAILURES,
        "Trace export failures, by stage: setup (exporter not built, tracing off) or export (a batch not delivered)."
    );
    describe_counter!(
        PERMISSION_DENIED,
        "Calls refused because the caller is not on the allow-list, by method."
    );
    describe_ingest();
    describe_erasure();
}

/// Uses the handle kept in `slot`, registering it with `register` on first use. Before
/// the recorder is installed a handle would stay a no-op forever, so none is kept then.
fn cached<T>(slot: &OnceLock<T>, register: impl FnOnce() -> T, record: impl FnOnce(&T)) {
    if HANDLE.get().is_some() {
        record(slot.get_or_init(register));
    } else {
        record(&register());
    }
}

/// Status codes a gRPC answer can carry (0 OK to 16 UNAUTHENTICATED).
const GRPC_CODES: usize = 17;

/// The go-grpc-prometheus series of one (grpc_service, grpc_method, grpc_type). Each
/// handle is registered on first use and kept, so recording a call costs no registry
/// lookup (a key built, hashed and compared per series per call); a series shows up
/// only once it was recorded, as before.
pub(crate) struct GrpcSeries {
    service: &'static str,
    method: &'static str,
    kind: &'static str,
    started: OnceLock<Counter>,
    handling: OnceLock<Histogram>,
    handled: [OnceLock<Counter>; GRPC_CODES],
}

impl GrpcSeries {
    pub(crate) const fn new(service: &'static str, method: &'static str, kind: &'static str) -> Self {
        Self {
            service,
            method,
            kind,
            started: OnceLock::new(),
            handling: OnceLock::new(),
            handled: [const { OnceLock::new() }; GRPC_CODES],
        }
    }

    pub(crate) fn record_started(&self) {
        let (service, method, kind) = (self.service, self.method, self.kind);
        cached(
            &self.started,
            || counter!(GRPC_STARTED, "grpc_service" => service, "grpc_method" => method, "grpc_type" => kind),
            |started| started.increment(1),
        );
    }

    /// One call answered with `code` (its number) named `code_name`, after `elapsed`.
    pub(crate) fn record_handled(&self, code: usize, code_name: &'static str, elapsed: Duration) {
        let (service, method, kind) = (self.service, self.method, self.kind);
        let handled = || counter!(GRPC_HANDLED, "grpc_service" => service, "grpc_method" => method, "grpc_type" => kind, "grpc_code" => code_name);
        match self.handled.get(code) {
            Some(slot) => cached(slot, handled, |handled| handled.increment(1)),
            None => handled().increment(1),
        }
        cached(
            &self.handling,
            || histogram!(GRPC_HANDLING_SECONDS, "grpc_service" => service, "grpc_method" => method, "grpc_type" => kind),
            |handling| handling.record(elapsed.as_secs_f64()),
        );
    }
}

pub(crate) fn record_db_call(operation: &'static str, elapsed: Duration, error_kind: Option<&'static str>) {
    histogram!(DB_QUERY_SECONDS, "operation" => operation).record(elapsed.as_secs_f64());
    if let Some(kind) = error_kind {
        counter!(DB_ERRORS, "operation" => operation, "kind" => kind).increment(1);
    }
}

pub(crate) fn record_redis_call(operation: &'static str, elapsed: Duration, failed: bool) {
    histogram!(REDIS_COMMAND_SECONDS, "operation" => operation).record(elapsed.as_secs_f64());
    if failed {
        counter!(REDIS_ERRORS, "operation" => operation).increment(1);
    }
}

pub(crate) fn record_cache_lookup(query: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    counter!(CACHE_REQUESTS, "query" => query, "result" => result).increment(1);
}

/// The ordinals a unique-user count took from this replica's memory (`hits`) and had
/// to read from PostgreSQL (`misses`).
pub(crate) fn record_user_ordinals_lookups(hits: usize, misses: usize) {
    static HITS: OnceLock<Counter> = OnceLock::new();
    static MISSES: OnceLock<Counter> = OnceLock::new();
    cached(
        &HITS,
        || counter!(USER_ORDINAL_LOOKUPS, "result" => "hit"),
        |counter| counter.increment(hits as u64),
    );
    cached(
        &MISSES,
        || counter!(USER_ORDINAL_LOOKUPS, "result" => "miss"),
        |counter| counter.increment(misses as u64),
    );
}

/// A unique-user count read again because an erasure committed between its statements.
pub(crate) fn record_user_ordinals_reread() {
    counter!(USER_COUNT_REREADS).increment(1);
}

/// The partial edge hours a count (`query`) could not read whole: those answered from a
/// kept summary, from the hour's stored spans, from its live spans, and from the raw events.
pub(crate) fn record_edge_hours(
    query: &'static str,
    summarised: usize,
    spanned: usize,
    live: usize,
    raw: usize,
) {
    if summarised > 0 {
        counter!(EDGE_HOURS, "query" => query, "source" => "summary").increment(summarised as u64);
    }
    if spanned > 0 {
        counter!(EDGE_HOURS, "query" => query, "source" => "spans").increment(spanned as u64);
    }
    if live > 0 {
        counter!(EDGE_HOURS, "query" => query, "source" => "live_spans").increment(live as u64);
    }
    if raw > 0 {
        counter!(EDGE_HOURS, "query" => query, "source" => "raw").increment(raw as u64);
    }
}

/// The folded bitmaps a unique-user count used: `remembered` from this replica's memory,
/// `read` from PostgreSQL.
pub(crate) fn record_folded_bitmaps(remembered: usize, read: usize) {
    static REMEMBERED: OnceLock<Counter> = OnceLock::new();
    static READ: OnceLock<Counter> = OnceLock::new();
    cached(
        &REMEMBERED,
        || counter!(FOLDED_BITMAPS, "source" => "memory"),
        |counter| counter.increment(remembered as u64),
    );
    cached(&READ, || counter!(FOLDED_BITMAPS, "source" => "read"), |counter| counter.increment(read as u64));
}

/// Closed hours whose spans one builder pass wrote.
pub(crate) fn record_hour_spans_built(hours: usize) {
    counter!(HOUR_SPANS_BUILT).increment(hours as u64);
}

/// A summary of a folded hour was built and kept.
pub(crate) fn record_edge_hour_summary_built() {
    counter!(EDGE_HOUR_SUMMARIES_BUILT).increment(1);
}

/// A summary of a folded hour was not built: the queue of builds was full.
pub(crate) fn record_edge_hour_summary_dropped() {
    counter!(EDGE_HOUR_SUMMARIES_DROPPED).increment(1);
}

/// A count call answered from the read replica.
pub(crate) fn record_read_replica_query() {
    counter!(READ_REPLICA_QUERIES).increment(1);
}

/// A count call sent to the primary although a read replica is configured: `lagging`
/// (not replayed up to the primary's position) or `unavailable` (down, failing, skipped
/// during its cool-down, or not a standby).
pub(crate) fn record_read_replica_fallback(reason: &'static str) {
    counter!(READ_REPLICA_FALLBACKS, "reason" => reason).increment(1);
}

/// An answer that touches open buckets: computed fresh, never cached (`result="fresh"`).
pub(crate) fn record_cache_fresh(query: &'static str) {
    counter!(CACHE_REQUESTS, "query" => query, "result" => "fresh").increment(1);
}

pub(crate) fn record_events_ingested(count: u64) {
    static INGESTED: OnceLock<Counter> = OnceLock::new();
    cached(&INGESTED, || counter!(EVENTS_INGESTED), |ingested| ingested.increment(count));
}

pub(crate) fn record_event_rejected(reason: &'static str) {
    counter!(EVENTS_REJECTED, "reason" => reason).increment(1);
}

pub(crate) fn record_rate_limited(events: u64) {
    counter!(RATE_LIMITED).increment(events);
}

pub(crate) fn record_tls_handshake(succeeded: bool) {
    counter!(TLS_HANDSHAKES, "result" => if succeeded { "ok" } else { "refused" }).increment(1);
}

/// A connection closed before it carried a call: `no_preface` (no HTTP/2 preface within
/// GRPC_HANDSHAKE_TIMEOUT_SECONDS) or `handshake_backlog` (GRPC_MAX_PENDING_TLS_HANDSHAKES
/// already waiting).
pub(crate) fn record_connection_closed_early(reason: &'static str) {
    counter!(CONNECTIONS_CLOSED_EARLY, "reason" => reason).increment(1);
}

pub(crate) fn record_tls_reload(succeeded: bool) {
    counter!(TLS_RELOADS, "result" => if succeeded { "ok" } else { "invalid" }).increment(1);
}

pub(crate) fn record_rate_limit_fallback() {
    counter!(RATE_LIMIT_FALLBACKS).increment(1);
}

pub(crate) fn record_rate_limit_leased_checks(checks: u64) {
    static LEASED: OnceLock<Counter> = OnceLock::new();
    cached(&LEASED, || counter!(RATE_LIMIT_LEASED_CHECKS), |leased| leased.increment(checks));
}

pub(crate) fn record_rate_limit_round_trip() {
    counter!(RATE_LIMIT_ROUND_TRIPS).increment(1);
}

/// A trace exporter that could not be built (`setup`) or a span batch the collector did
/// not take (`export`).
pub(crate) fn record_trace_export_failure(stage: &'static str) {
    counter!(TRACE_EXPORT_FAILURES, "stage" => stage).increment(1);
}

pub(crate) fn record_permission_denied(method: &'static str) {
    counter!(PERMISSION_DENIED, "method" => method).increment(1);
}

pub(crate) fn set_database_up(up: bool) {
    gauge!(DATABASE_UP).set(if up { 1.0 } else { 0.0 });
}

pub(crate) fn set_ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

pub(crate) fn set_pool_stats(size: u32, idle: usize, max: u32) {
    let idle = idle as f64;
    gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
    gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set((f64::from(size) - idle).max(0.0));
    gauge!(DB_POOL_MAX_CONNECTIONS).set(f64::from(max));
}

// ---- ingestion (group commit) ----

pub(crate) const INGEST_BATCH_SIZE: &str = "analytics_ingest_batch_size";
pub(crate) const INGEST_COMMIT_SECONDS: &str = "analytics_ingest_commit_seconds";
pub(crate) const INGEST_QUEUE_DEPTH: &str = "analytics_ingest_queue_depth";
pub(crate) const INGEST_QUEUE_CAPACITY: &str = "analytics_ingest_queue_capacity";
pub(crate) const DEDUP_HITS: &str = "analytics_dedup_hits_total";
pub(crate) const SUPPRESSED: &str = "analytics_suppressed_total";
pub(crate) const EVENT_COUNT_DELTAS_FOLDED: &str = "analytics_event_count_deltas_folded_total";
pub(crate) const USER_ACTIVITY_FOLDED: &str = "analytics_user_activity_folded_pairs_total";
pub(crate) const ROLLUP_FOLD_TIMESTAMP: &str = "analytics_rollup_fold_timestamp_seconds";

/// Events per group commit: from a lone call to a full TrackEvents batch and beyond.
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0];

fn describe_ingest() {
    describe_histogram!(INGEST_BATCH_SIZE, Unit::Count, "Events written per group commit.");
    describe_histogram!(
        INGEST_COMMIT_SECONDS,
        Unit::Seconds,
        "Time to write one group commit to PostgreSQL, retries and row isolation included."
    );
    describe_gauge!(INGEST_QUEUE_DEPTH, "Events queued for or inside a group commit.");
    describe_gauge!(INGEST_QUEUE_CAPACITY, "Most events the ingest queue holds (INGEST_QUEUE_CAPACITY).");
    describe_counter!(DEDUP_HITS, "Events not stored because their insert_id was already stored.");
    describe_counter!(
        SUPPRESSED,
        "Events and identities not stored because their user is suppressed, by rpc (TrackEvent, TrackEvents, IdentifyUser)."
    );
    describe_counter!(EVENT_COUNT_DELTAS_FOLDED, "Event-count deltas folded into the count rollups.");
    describe_counter!(USER_ACTIVITY_FOLDED, "Pending (hour, user) pairs folded into the user bitmaps.");
    describe_gauge!(
        ROLLUP_FOLD_TIMESTAMP,
        Unit::Seconds,
        "Unix time of the last completed fold pass of this replica (the fold watermark)."
    );
}

/// One group commit of `events` events, answered after `elapsed`. Called by the
/// writer, off the request path.
pub(crate) fn record_ingest_commit(events: usize, elapsed: Duration) {
    static SIZE: OnceLock<Histogram> = OnceLock::new();
    static SECONDS: OnceLock<Histogram> = OnceLock::new();
    cached(&SIZE, || histogram!(INGEST_BATCH_SIZE), |size| size.record(events as f64));
    cached(&SECONDS, || histogram!(INGEST_COMMIT_SECONDS), |seconds| seconds.record(elapsed.as_secs_f64()));
}

pub(crate) fn set_ingest_queue(depth: usize, capacity: usize) {
    static DEPTH: OnceLock<Gauge> = OnceLock::new();
    static CAPACITY: OnceLock<Gauge> = OnceLock::new();
    cached(&DEPTH, || gauge!(INGEST_QUEUE_DEPTH), |gauge| gauge.set(depth as f64));
    cached(&CAPACITY, || gauge!(INGEST_QUEUE_CAPACITY), |gauge| gauge.set(capacity as f64));
}

/// Events answered as duplicates of an earlier insert_id.
pub(crate) fn record_dedup_hits(count: u64) {
    counter!(DEDUP_HITS).increment(count);
    counter!(EVENTS_REJECTED, "reason" => "duplicate").increment(count);
}

/// Events (or an identity) of `rpc` answered as suppressed: their user is on the
/// suppression list, so nothing was stored.
pub(crate) fn record_suppressed(rpc: &'static str, count: u64) {
    counter!(SUPPRESSED, "rpc" => rpc).increment(count);
}

/// Events not stored for `reason`, counted in one step (a failed group commit).
pub(crate) fn record_events_rejected(reason: &'static str, count: u64) {
    counter!(EVENTS_REJECTED, "reason" => reason).increment(count);
}

/// One completed fold pass that folded `deltas` event-count deltas and `pairs` pairs.
pub(crate) fn record_rollup_fold(deltas: usize, pairs: usize) {
    counter!(EVENT_COUNT_DELTAS_FOLDED).increment(deltas as u64);
    counter!(USER_ACTIVITY_FOLDED).increment(pairs as u64);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    gauge!(ROLLUP_FOLD_TIMESTAMP).set(now.as_secs_f64());
}

// Erasure (DeleteUser).
pub(crate) const ERASURES_REQUESTED: &str = "analytics_erasures_requested_total";
pub(crate) const ERASURES_COMPLETED: &str = "analytics_erasures_completed_total";
pub(crate) const ERASED_EVENTS: &str = "analytics_erased_events_total";

fn describe_erasure() {
    describe_counter!(ERASURES_REQUESTED, "DeleteUser requests recorded, by whether they suppress the user.");
    describe_counter!(ERASURES_COMPLETED, "User erasures this replica completed.");
    describe_counter!(ERASED_EVENTS, "Events deleted by user erasures on this replica.");
}

/// A DeleteUser request recorded (or joined to the running one).
pub(crate) fn record_erasure_requested(suppress: bool) {
    counter!(ERASURES_REQUESTED, "suppress" => if suppress { "true" } else { "false" }).increment(1);
}

/// One erasure batch that deleted `events` events.
pub(crate) fn record_erasure_batch(events: u64) {
    counter!(ERASED_EVENTS).increment(events);
}

/// An erasure completed by this replica.
pub(crate) fn record_erasure_completed() {
    counter!(ERASURES_COMPLETED).increment(1);
}
