//! The dashboard mix: many clients repeating the same queries while events keep arriving,
//! with the cache hit rate read from the service's own metric and every answer checked
//! against raw SQL.

use std::time::Instant;

use analytics_bench::cpu::{cpu_seconds, cpu_seconds_of, cpu_seconds_since, postgres_pids};
use analytics_bench::scrape::metrics_page;
use analytics_service::pb::analytics_service_client::AnalyticsServiceClient;
use analytics_service::repository::postgres::Database;
use sqlx::PgPool;
use tonic::transport::Channel;

use crate::queries::{millis, raw_answer, service_answer, shapes, Shape, Timings};
use crate::{Arguments, DAY};

/// Many clients repeating the same 20 dashboard queries with a sliding end time while
/// events keep arriving: each round first stores 200 events in the last minute (the open
/// edge) and, every fifth round, one late event somewhere in the last 7 days; then every
/// client asks the 20 queries with an end time 10 s later than the round before; then, with
/// nothing in flight, one of the queries (in turn) is asked again and compared with raw
/// SQL. Reports the cache hit rate from the service's own metric and the stale answers.
pub(crate) async fn dashboard_mix(
    client: &AnalyticsServiceClient<Channel>,
    raw: &PgPool,
    database: &Database,
    arguments: &Arguments,
    end: i64,
    admin_address: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let before = cache_counters(admin_address).await?;
    // CPU seconds during the clients' calls only (not the inserts nor the raw-SQL checks).
    let mut own_cpu = Some(0.0);
    let mut backends_cpu = 0.0;
    let mut postgres_cpu = 0.0;
    let all_shapes = shapes();
    let queries: Vec<Shape> = all_shapes.iter().cycle().take(20).cloned().collect();
    let clients = 8;
    let rounds = arguments.samples.max(2);
    let started = Instant::now();
    let mut timings = Vec::new();
    let mut stale = 0;
    let mut checked = 0;
    let mut late_events = 0;
    for round in 0..rounds {
        let finish = end + (round as i64) * 10;
        let late: i64 = if round % 5 == 4 { 1 } else { 0 };
        late_events += late;
        sqlx::query(
            "INSERT INTO events (event_name, user_id, timestamp)
             SELECT 'event_' || lpad((i % 20)::text, 2, '0'), 'user_' || (i * 7919 % 100000),
                    to_timestamp(CASE WHEN i <= $3 THEN $1 - 7 * 86400 * random() ELSE $1 - 60 * random() END)
               FROM generate_series(1, $2) i",
        )
        .bind(finish as f64)
        .bind(200 + late)
        .bind(late)
        .execute(database.pool())
        .await?;
        // The database's client backends: the service's pools (and this process's idle
        // raw-SQL connections); not autovacuum nor the other processes of the cluster.
        let backends: Vec<u32> = sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend'",
        )
        .fetch_all(raw)
        .await?
        .into_iter()
        .map(|pid| pid as u32)
        .collect();
        let all_postgres = postgres_pids();
        let own_cpu_before = cpu_seconds(std::process::id());
        let (backends_before, postgres_before) = (cpu_seconds_of(&backends), cpu_seconds_of(&all_postgres));
        let mut tasks = Vec::new();
        for client_number in 0..clients {
            let client = client.clone();
            let queries = queries.clone();
            tasks.push(tokio::spawn(async move {
                let mut timings = Vec::new();
                // Clients start at different queries, as dashboards refresh at different moments.
                for index in 0..queries.len() {
                    let shape = &queries[(index + client_number * 3) % queries.len()];
                    let days = shape.days();
                    let call_started = Instant::now();
                    service_answer(&client, shape, finish - days * DAY + 3_600, finish).await?;
                    let took = call_started.elapsed();
                    timings.push((shape.label(), took));
                }
                anyhow::Ok(timings)
            }));
        }
        for task in tasks {
            timings.extend(task.await??);
        }
        // A backend the pools opened during the round is not in `backends`; it is in the
        // next round's.
        backends_cpu += cpu_seconds_since(&backends_before, &cpu_seconds_of(&backends));
        postgres_cpu += cpu_seconds_since(&postgres_before, &cpu_seconds_of(&postgres_pids()));
        own_cpu = own_cpu
            .zip(own_cpu_before)
            .zip(cpu_seconds(std::process::id()))
            .map(|((sum, before), after)| sum + after - before);
        for shape in all_shapes.iter().cycle().skip(round).take(1) {
            let days = shape.days();
            let (start, stop) = (finish - days * DAY + 3_600, finish);
            checked += 1;
            if service_answer(client, shape, start, stop).await?
                != raw_answer(raw, shape, start, stop).await?
            {
                eprintln!("stale answer for {} [{start}, {stop})", shape.label());
                stale += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    let after = cache_counters(admin_address).await?;
    let [hits, misses, fresh] = [0, 1, 2].map(|index| after[index] - before[index]);
    let lookups = hits + misses + fresh;
    let metrics = format!(
        "cache hit {hits:.0}, miss {misses:.0}, fresh {fresh:.0}: hit rate {:.1}%",
        if lookups > 0.0 { hits / lookups * 100.0 } else { 0.0 }
    );
    let (p50, p95, p99) = Timings(timings.iter().map(|(_, took)| *took).collect()).summary();
    println!(
        "dashboard mix: {clients} clients x {rounds} rounds x 20 queries = {} calls in {:.1} s, {} events stored meanwhile ({late_events} of them late, into cached hours); p50 / p95 / p99 {} / {} / {} ms; {metrics}; stale answers {stale}/{checked} checked against raw SQL",
        timings.len(),
        elapsed.as_secs_f64(),
        rounds as i64 * 200 + late_events,
        millis(p50),
        millis(p95),
        millis(p99),
    );
    // CPU moves less than latency with what else the shared machine runs. Both sides over
    // the clients' calls only; this process's includes the 8 clients besides the server,
    // PostgreSQL's any summary build or fold running meanwhile.
    let per_call = |seconds: f64| seconds * 1_000.0 / timings.len().max(1) as f64;
    println!(
        "dashboard mix CPU: the database's backends {backends_cpu:.2} s ({:.2} ms a call; all PostgreSQL processes {postgres_cpu:.2} s, {:.2} ms), countbench's server and clients {} ({} a call)",
        per_call(backends_cpu),
        per_call(postgres_cpu),
        own_cpu.map_or("unknown".into(), |seconds| format!("{seconds:.2} s")),
        own_cpu.map_or("unknown".into(), |seconds| format!("{:.2} ms", per_call(seconds))),
    );
    // Which shapes make the tail: each shape's own percentiles, and its share of the calls
    // over the mix's p95.
    println!(
        "\n| dashboard shape | calls | p50 / p95 / p99 ms | calls over the mix's p95 |\n|---|---|---|---|"
    );
    for shape in &all_shapes {
        let label = shape.label();
        let took: Vec<_> = timings.iter().filter(|(of, _)| *of == label).map(|(_, took)| *took).collect();
        let over = took.iter().filter(|took| **took > p95).count();
        let (shape_p50, shape_p95, shape_p99) = Timings(took.clone()).summary();
        println!(
            "| {label} | {} | {} / {} / {} | {over} |",
            took.len(),
            millis(shape_p50),
            millis(shape_p95),
            millis(shape_p99)
        );
    }
    Ok(())
}

/// Sums of analytics_cache_requests_total by result (hit, miss, fresh), scraped from the
/// service's own /metrics endpoint.
pub(crate) async fn cache_counters(admin_address: std::net::SocketAddr) -> anyhow::Result<[f64; 3]> {
    let body = metrics_page(admin_address).await?;
    let mut counters = [0.0; 3];
    for line in body.lines().filter(|line| line.starts_with("analytics_cache_requests_total{")) {
        let value: f64 = line.rsplit(' ').next().and_then(|value| value.parse().ok()).unwrap_or(0.0);
        for (index, result) in ["hit", "miss", "fresh"].iter().enumerate() {
            if line.contains(&format!("result=\"{result}\"")) {
                counters[index] += value;
            }
        }
    }
    Ok(counters)
}
