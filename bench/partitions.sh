#!/usr/bin/env bash
# Monthly vs daily partitions of `events`, measured rather than reasoned about.
#
# In a throwaway database (random name, dropped on exit) this applies the service's own
# migrations (`analytics-service migrate`), then builds two copies of the migrated
# `events` table, `CREATE TABLE ... (LIKE events INCLUDING ALL) PARTITION BY RANGE
# (timestamp)`: the same columns, defaults, primary key and indexes, without the rollup
# trigger. `events_monthly` gets one partition per UTC month (as the service does) and
# `events_daily` one per UTC day, both covering the last DAYS days plus partitions created
# ahead (MONTHS_AHEAD months for monthly, as PARTITION_MONTHS_AHEAD does; DAYS_AHEAD days
# for daily). It loads the same EVENTS synthetic rows into both (the countbench generator:
# skewed names and users, timestamps uniform over DAYS days ending now) in timestamp
# order, as the service ingests them (a window's rows then sit together on disk in both
# layouts, as in production; random order would favour the smaller daily heaps). Then it
# measures, interleaved in ROUNDS rounds (monthly,daily then daily,monthly, ...):
#   - ingestion: INSERTS statements of BATCH "now" events each, the service's path
#     (prepared INSERT ... SELECT * FROM UNNEST(arrays) ON CONFLICT DO NOTHING,
#     time-ordered ids as Uuid::now_v7 gives), timed by psql's \timing -> rows/s;
#   - edge reads: the two raw queries count requests make for the partial hours at the
#     edges of a range (date_bin ... event_name, and DISTINCT user_id), each over READS
#     random 30-minute windows inside the last DAYS days, as literal SQL, timed with
#     EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON): planning and execution time separately
#     (one session per round: planning includes each partition's first open in that
#     backend, which a long-lived pooled connection pays once);
#   - the same two queries as prepared statements (PREPARE/EXECUTE, PREPARED executions
#     per session, as sqlx does on a pooled connection), once with plan_cache_mode=auto
#     (what the service gets) and once forced to a generic plan (runtime partition
#     pruning over every partition); the first 6 executions of a session are left out
#     (5 custom plans, then the 6th builds the generic plan to compare: reported apart);
#   - partition count and total size (pg_total_relation_size over the partitions).
# It prints one markdown summary table (p50/p95 in ms of planning+execution), a detail
# table (planning and execution separately), the date, the machine and the parameters.
# Progress goes to stderr, the report to stdout.
#
# Run from anywhere (PostgreSQL at 127.0.0.1:5432, user postgres, trust auth; PGHOST,
# PGPORT and PGUSER override; 2 to 4 minutes with the defaults on a busy 2-core machine).
# The migrations come from the server binary SERVER (default: `cargo run --bin
# analytics-service`, which builds it first):
#   bench/partitions.sh
#   EVENTS=200000 bench/partitions.sh
#   SERVER=target/release/analytics-service bench/partitions.sh --events 200000 --days 90
# Options (environment variable in brackets, default after it):
#   --events N        [EVENTS=2000000]  synthetic rows loaded into each layout
#   --days N          [DAYS=90]         days of history covered (partitions and data)
#   --days-ahead N    [DAYS_AHEAD=14]   daily partitions created ahead of now
#   --months-ahead N  [MONTHS_AHEAD=3]  monthly partitions created ahead of now
#   --inserts N       [INSERTS=200]     ingestion INSERT statements per layout
#   --batch N         [BATCH=500]       rows per INSERT statement
#   --reads N         [READS=200]       literal edge reads per query and layout
#   --prepared N      [PREPARED=20]     EXECUTEs per query, layout, mode and round
#   --rounds N        [ROUNDS=4]        interleaving rounds
set -euo pipefail

EVENTS=${EVENTS:-2000000}
DAYS=${DAYS:-90}
DAYS_AHEAD=${DAYS_AHEAD:-14}
MONTHS_AHEAD=${MONTHS_AHEAD:-3}
INSERTS=${INSERTS:-200}
BATCH=${BATCH:-500}
READS=${READS:-200}
PREPARED=${PREPARED:-20}
ROUNDS=${ROUNDS:-4}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while (($# > 0)); do
  case $1 in
    --events) EVENTS=${2:-} ;;
    --days) DAYS=${2:-} ;;
    --days-ahead) DAYS_AHEAD=${2:-} ;;
    --months-ahead) MONTHS_AHEAD=${2:-} ;;
    --inserts) INSERTS=${2:-} ;;
    --batch) BATCH=${2:-} ;;
    --reads) READS=${2:-} ;;
    --prepared) PREPARED=${2:-} ;;
    --rounds) ROUNDS=${2:-} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift 2 || { echo "option $1 needs a value" >&2; exit 2; }
done

for name in EVENTS DAYS DAYS_AHEAD MONTHS_AHEAD INSERTS BATCH READS PREPARED ROUNDS; do
  if ! [[ ${!name} =~ ^[0-9]+$ ]] || ((${!name} < 1)); then
    [[ $name == *_AHEAD && ${!name} == 0 ]] && continue
    echo "$name must be a positive integer, got '${!name}'" >&2
    exit 2
  fi
done
if ((PREPARED <= 6)); then
  echo "PREPARED must be above 6 (the first 6 executions of a session are left out)" >&2
  exit 2
fi
INSERTS_PER_ROUND=$(((INSERTS + ROUNDS - 1) / ROUNDS))
READS_PER_ROUND=$(((READS + ROUNDS - 1) / ROUNDS))

export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DB="bench_partitions_$(date -u +%Y%m%d%H%M%S)_$$_${RANDOM}"
WORK=$(mktemp -d)
STARTED=${SECONDS}

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

cleanup() {
  local status=$?
  psql -X -q -d postgres -c "DROP DATABASE IF EXISTS ${DB} WITH (FORCE)" >/dev/null 2>&1 ||
    echo "warning: could not drop database ${DB}" >&2
  rm -rf "${WORK}"
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# psql on the bench database: no psqlrc, stop at the first error.
q() { psql -X -q -v ON_ERROR_STOP=1 -d "${DB}" "$@"; }

log "creating database ${DB}"
psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE ${DB}"

# The service's migrations, exactly as a deployment applies them (Redis off: not needed).
log "migrating ${DB} with the service's migrations"
migrate() {
  if [[ -n ${SERVER:-} ]]; then
    "${SERVER}" migrate
  else
    cargo run --quiet --manifest-path "${ROOT}/Cargo.toml" --bin analytics-service -- migrate
  fi
}
POSTGRES_HOST=${PGHOST} POSTGRES_PORT=${PGPORT} POSTGRES_USER=${PGUSER} POSTGRES_PASSWORD=${PGPASSWORD:-} \
  POSTGRES_DB=${DB} POSTGRES_SSLMODE=disable REDIS_HOST='' LOG_LEVEL=warn LOG_FORMAT=text migrate >/dev/null

log "schema: events_monthly and events_daily, copies of the migrated events"
q -v days="${DAYS}" -v days_ahead="${DAYS_AHEAD}" -v months_ahead="${MONTHS_AHEAD}" <<'SQL'
SELECT set_config('bench.days', :'days', false) AS days,
       set_config('bench.days_ahead', :'days_ahead', false) AS days_ahead,
       set_config('bench.months_ahead', :'months_ahead', false) AS months_ahead \gset

-- Columns, defaults, primary key and indexes of the migrated table; no trigger.
CREATE TABLE events_monthly (LIKE events INCLUDING ALL) PARTITION BY RANGE (timestamp);
CREATE TABLE events_daily (LIKE events INCLUDING ALL) PARTITION BY RANGE (timestamp);

-- Partitions over [now - days, now + ahead], UTC boundaries, named as the service names them.
DO $do$
DECLARE
    layout text;
    step interval;
    suffix text;
    slot timestamp;
    last_slot timestamp;
BEGIN
    FOR layout, step, suffix, slot, last_slot IN
        SELECT 'events_monthly', interval '1 month', 'YYYYMM',
               date_trunc('month', (now() - make_interval(days => current_setting('bench.days')::int)) AT TIME ZONE 'UTC'),
               date_trunc('month', (now() + make_interval(months => current_setting('bench.months_ahead')::int)) AT TIME ZONE 'UTC')
        UNION ALL
        SELECT 'events_daily', interval '1 day', 'YYYYMMDD',
               date_trunc('day', (now() - make_interval(days => current_setting('bench.days')::int)) AT TIME ZONE 'UTC'),
               date_trunc('day', (now() + make_interval(days => current_setting('bench.days_ahead')::int)) AT TIME ZONE 'UTC')
    LOOP
        WHILE slot <= last_slot LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           layout || '_p' || to_char(slot, suffix), layout,
                           slot AT TIME ZONE 'UTC', (slot + step) AT TIME ZONE 'UTC');
            slot := slot + step;
        END LOOP;
    END LOOP;
END $do$;

CREATE TABLE loads (layout text, seconds float8);
CREATE TABLE inserts (layout text, round int, statements int, rows int8, ms float8);
CREATE TABLE reads (layout text, query text, mode text, round int, seq int,
                    plan_ms float8, exec_ms float8, generic boolean);
CREATE TABLE sizes (layout text, partitions int, bytes int8);
SQL

log "generating ${EVENTS} synthetic events into an unlogged staging table"
q -v events="${EVENTS}" -v days="${DAYS}" <<'SQL'
CREATE UNLOGGED TABLE staging AS
SELECT gen_random_uuid() AS id,
       'event_' || lpad(floor(20 * power(random(), 2))::int::text, 2, '0') AS event_name,
       'user_' || floor(100000 * power(random(), 3))::int AS user_id,
       NULL::jsonb AS properties,
       now() - random() * make_interval(days => :days) AS timestamp,
       now() AS created_at
  FROM generate_series(1, :events);
SQL

for layout in monthly daily; do
  log "loading events_${layout}"
  q -c "CHECKPOINT"
  began=${EPOCHREALTIME}
  q -c "INSERT INTO events_${layout} SELECT * FROM staging ORDER BY timestamp"
  ended=${EPOCHREALTIME}
  q -c "INSERT INTO loads VALUES ('${layout}', ${ended} - ${began})"
done
log "VACUUM (ANALYZE) both layouts (not timed); sizes"
q <<'SQL'
DROP TABLE staging;
VACUUM (ANALYZE) events_monthly, events_daily;
INSERT INTO sizes
SELECT replace(parent, 'events_', ''), count(*), sum(pg_total_relation_size(relid))
  FROM (SELECT 'events_monthly' AS parent, relid FROM pg_partition_tree('events_monthly') WHERE isleaf
        UNION ALL
        SELECT 'events_daily', relid FROM pg_partition_tree('events_daily') WHERE isleaf) leaves
 GROUP BY parent;
CHECKPOINT;
SQL

# Random 30-minute windows (start uniform in [now - DAYS, now - 30 min]): the same for
# both layouts, fresh ones for each round, query and mode (so no pass reads pages an
# earlier pass just cached); seq 0 is the warm-up statement of a literal session.
q -v rounds="${ROUNDS}" -v per_round="$((READS_PER_ROUND > PREPARED ? READS_PER_ROUND : PREPARED))" \
  -v days="${DAYS}" <<'SQL'
CREATE TABLE windows AS
SELECT round, query, mode, seq,
       now() - interval '30 minutes'
             - random() * (make_interval(days => :days) - interval '30 minutes') AS window_start
  FROM generate_series(1, :rounds) round,
       unnest(ARRAY['bins', 'users']) query,
       unnest(ARRAY['literal', 'auto', 'generic']) mode,
       generate_series(0, :per_round) seq;
SQL

EXPLAIN="EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON)"

# The two raw edge queries of a count request (the service's count path), over layout $2
# with bounds $3 and $4 (SQL text: literals, or $1/$2 of a prepared statement).
edge_query() {
  local table="events_$2" lo=$3 hi=$4
  case $1 in
    bins) echo "SELECT date_bin('1 hour', timestamp, TIMESTAMPTZ '1970-01-01 00:00:00+00'), event_name, 1 FROM ${table} WHERE timestamp >= ${lo} AND timestamp < ${hi}" ;;
    users) echo "SELECT DISTINCT user_id FROM ${table} WHERE timestamp >= ${lo} AND timestamp < ${hi} AND user_id <> ''" ;;
  esac
}

# The EXPLAIN output of a session on stdin -> CSV rows of `reads` (one per statement).
parse_explain() {
  awk -v layout="$1" -v query="$2" -v mode="$3" -v round="$4" '
    /Subplans Removed/ { generic = "t" }
    /^Planning Time:/ { plan = $3 }
    /^Execution Time:/ {
      seq++
      printf "%s,%s,%s,%s,%d,%s,%s,%s\n", layout, query, mode, round, seq, plan, $3, (generic == "t" ? "t" : "f")
      generic = ""
    }'
}

# Literal edge reads: one session per layout, query and round; the first statement (seq 0)
# warms the session's caches and is not recorded.
literal_reads() {
  local layout=$1 query=$2 round=$3 file
  file="${WORK}/literal-${layout}-${query}-${round}.sql"
  q -At -v round="${round}" -v query="${query}" -v n="${READS_PER_ROUND}" \
    -v template="${EXPLAIN} $(edge_query "${query}" "${layout}" '{lo}' '{hi}');" >"${file}" <<'SQL'
SELECT CASE WHEN seq = 0 THEN E'\\o /dev/null\n' ELSE '' END
       || replace(replace(:'template', '{lo}', quote_literal(window_start)),
                  '{hi}', quote_literal(window_start + interval '30 minutes'))
       || CASE WHEN seq = 0 THEN E'\n\\o' ELSE '' END
  FROM windows WHERE round = :round AND query = :'query' AND mode = 'literal' AND seq <= :n
 ORDER BY seq;
SQL
  q -At -f "${file}" | parse_explain "${layout}" "${query}" literal "${round}" >>"${WORK}/reads.csv"
}

# Prepared edge reads: PREPARE once, EXECUTE PREPARED times with parameters, under
# plan_cache_mode auto or force_generic_plan.
prepared_reads() {
  local layout=$1 query=$2 mode=$3 round=$4 file plan_cache_mode=auto
  [[ ${mode} == generic ]] && plan_cache_mode=force_generic_plan
  file="${WORK}/prepared-${layout}-${query}-${mode}-${round}.sql"
  {
    echo "SET plan_cache_mode = ${plan_cache_mode};"
    # shellcheck disable=SC2016 # $1 and $2 are the statement's parameters
    echo "PREPARE edge(timestamptz, timestamptz) AS $(edge_query "${query}" "${layout}" '$1' '$2');"
    q -At -v round="${round}" -v query="${query}" -v mode="${mode}" -v n="${PREPARED}" \
      -v explain="${EXPLAIN}" <<'SQL'
SELECT format('%s EXECUTE edge(%L, %L);', :'explain', window_start, window_start + interval '30 minutes')
  FROM windows WHERE round = :round AND query = :'query' AND mode = :'mode' AND seq BETWEEN 1 AND :n
 ORDER BY seq;
SQL
  } >"${file}"
  q -At -f "${file}" | parse_explain "${layout}" "${query}" "${mode}" "${round}" >>"${WORK}/reads.csv"
}

# Ingestion: the same batches of "now" events (ids time-ordered like Uuid::now_v7) for
# both layouts of a round, each statement timed by \timing.
make_insert_batches() {
  local round=$1
  q -At -v n="${INSERTS_PER_ROUND}" -v batch="${BATCH}" >"${WORK}/inserts-${round}.sql" <<'SQL'
SELECT format('EXECUTE ingest(%L, %L, %L, %L, %L);', ids, names, users, props, stamps)
  FROM (SELECT b,
               array_agg(encode(overlay(uuid_send(gen_random_uuid())
                                        PLACING substring(int8send((extract(epoch FROM ts) * 1000)::int8) FROM 3)
                                        FROM 1 FOR 6), 'hex')::uuid ORDER BY i) AS ids,
               array_agg('event_' || lpad(floor(20 * power(random(), 2))::int::text, 2, '0') ORDER BY i) AS names,
               array_agg('user_' || floor(100000 * power(random(), 3))::int ORDER BY i) AS users,
               array_agg(jsonb_build_object('source', 'bench-partitions', 'n', i) ORDER BY i) AS props,
               array_agg(ts ORDER BY i) AS stamps
          FROM generate_series(1, :n) b
         CROSS JOIN LATERAL (SELECT i, clock_timestamp() AS ts FROM generate_series(1, :batch) i) rows
         GROUP BY b) batches
 ORDER BY b;
SQL
}

ingest() {
  local layout=$1 round=$2 ms
  ms=$({
    echo "PREPARE ingest(uuid[], text[], text[], jsonb[], timestamptz[]) AS
            INSERT INTO events_${layout} (id, event_name, user_id, properties, timestamp)
            SELECT * FROM UNNEST(\$1, \$2, \$3, \$4, \$5) ON CONFLICT DO NOTHING;"
    printf '%s\n' '\timing on'
    cat "${WORK}/inserts-${round}.sql"
  } | q -At | awk '/^Time:/ { sum += $2; n++ } END { printf "%.3f", sum }')
  echo "${layout},${round},${INSERTS_PER_ROUND},$((INSERTS_PER_ROUND * BATCH)),${ms}" >>"${WORK}/inserts.csv"
}

: >"${WORK}/reads.csv"
: >"${WORK}/inserts.csv"
for round in $(seq 1 "${ROUNDS}"); do
  make_insert_batches "${round}"
  if ((round % 2 == 1)); then order=(monthly daily); else order=(daily monthly); fi
  for layout in "${order[@]}"; do
    log "round ${round}/${ROUNDS}: ${layout}"
    ingest "${layout}" "${round}"
    for query in bins users; do
      literal_reads "${layout}" "${query}" "${round}"
      prepared_reads "${layout}" "${query}" auto "${round}"
      prepared_reads "${layout}" "${query}" generic "${round}"
    done
  done
done

q -c "\\copy reads FROM '${WORK}/reads.csv' (FORMAT csv)" \
  -c "\\copy inserts FROM '${WORK}/inserts.csv' (FORMAT csv)"

ELAPSED=$((SECONDS - STARTED))
log "done in ${ELAPSED} s; report on stdout"

q -At -v elapsed="${ELAPSED}" -v nproc="$(nproc)" -v load="$(cut -d' ' -f1-3 /proc/loadavg)" \
  -v params="EVENTS=${EVENTS} DAYS=${DAYS} DAYS_AHEAD=${DAYS_AHEAD} MONTHS_AHEAD=${MONTHS_AHEAD} INSERTS=${INSERTS} BATCH=${BATCH} READS=${READS} PREPARED=${PREPARED} ROUNDS=${ROUNDS}" <<'SQL'
CREATE FUNCTION pct(float8[], float8) RETURNS float8 LANGUAGE sql IMMUTABLE AS
  $$ SELECT percentile_cont($2) WITHIN GROUP (ORDER BY v) FROM unnest($1) v $$;
CREATE FUNCTION ms(float8) RETURNS text LANGUAGE sql IMMUTABLE AS
  $$ SELECT CASE WHEN $1 < 10 THEN to_char($1, 'FM990.000') ELSE to_char($1, 'FM999990.0') END $$;
CREATE FUNCTION p50_95(float8[]) RETURNS text LANGUAGE sql IMMUTABLE AS
  $$ SELECT ms(pct($1, 0.5)) || '/' || ms(pct($1, 0.95)) $$;

-- Recorded statements: literal reads from seq 1 (seq 0 was the warm-up, not printed),
-- prepared reads from the 7th execution of a session (the steady state of a pooled
-- connection: plan_cache_mode=auto plans the first 5 as custom plans, and the 6th also
-- builds the generic plan to compare costs, a one-off per connection shown apart).
CREATE VIEW measured AS
SELECT *, plan_ms + exec_ms AS total_ms FROM reads WHERE mode = 'literal' OR seq > 6;
CREATE VIEW per_query AS
SELECT m.layout, m.query, m.mode, count(*) AS n, avg(m.generic::int) AS generic_share,
       array_agg(m.plan_ms) AS plan, array_agg(m.exec_ms) AS exec, array_agg(m.total_ms) AS total,
       (SELECT pct(array_agg(r.plan_ms + r.exec_ms), 0.5) FROM reads r
         WHERE r.layout = m.layout AND r.query = m.query AND r.mode = 'auto' AND r.seq = 6
           AND m.mode = 'auto') AS sixth
  FROM measured m GROUP BY m.layout, m.query, m.mode;

SELECT format('Partition layout benchmark, %s; machine: %s cores (nproc), load average %s; PostgreSQL %s',
              to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"'), :'nproc', :'load',
              current_setting('server_version'));
SELECT format('Parameters: %s; run time %s s', :'params', :'elapsed');
SELECT '';
SELECT '| layout | partitions | load s | insert rows/s | edge query p50/p95 (plan+exec) ms | prepared edge p50/p95 ms | size MB |';
SELECT '|---|---:|---:|---:|---|---|---:|';
SELECT format('| %s | %s | %s | %s | counts %s · users %s | auto: counts %s · users %s; generic: counts %s · users %s | %s |',
              l.layout, s.partitions, to_char(l.seconds, 'FM99990.0'),
              to_char(i.rows / (i.ms / 1000), 'FM999999990'),
              p50_95(lb.total), p50_95(lu.total), p50_95(ab.total), p50_95(au.total),
              p50_95(gb.total), p50_95(gu.total), to_char(s.bytes / 1048576.0, 'FM999990'))
  FROM loads l
  JOIN sizes s USING (layout)
  JOIN (SELECT layout, sum(rows) AS rows, sum(ms) AS ms FROM inserts GROUP BY layout) i USING (layout)
  JOIN per_query lb ON lb.layout = l.layout AND lb.query = 'bins' AND lb.mode = 'literal'
  JOIN per_query lu ON lu.layout = l.layout AND lu.query = 'users' AND lu.mode = 'literal'
  JOIN per_query ab ON ab.layout = l.layout AND ab.query = 'bins' AND ab.mode = 'auto'
  JOIN per_query au ON au.layout = l.layout AND au.query = 'users' AND au.mode = 'auto'
  JOIN per_query gb ON gb.layout = l.layout AND gb.query = 'bins' AND gb.mode = 'generic'
  JOIN per_query gu ON gu.layout = l.layout AND gu.query = 'users' AND gu.mode = 'generic'
 ORDER BY l.layout DESC;
SELECT '';
SELECT 'counts = SELECT date_bin(''1 hour'', timestamp, ...), event_name, 1 ... ; users = SELECT DISTINCT user_id ... ; 30-minute windows.';
SELECT 'literal = SQL with literal bounds (planned each time); auto = PREPARE/EXECUTE, plan_cache_mode=auto (sqlx''s path);';
SELECT 'generic = PREPARE/EXECUTE, plan_cache_mode=force_generic_plan (runtime pruning). Prepared: executions 7+ of each session;';
SELECT '6th EXECUTE = the one where plan_cache_mode=auto also builds the generic plan (once per connection and statement), median.';
SELECT 'Insert rows/s: rows over the sum of the per-statement \timing of the EXECUTEs.';
SELECT '';
SELECT '| layout | query | mode | n | generic plans | plan p50/p95 ms | exec p50/p95 ms | plan+exec p50/p95 ms | 6th EXECUTE ms |';
SELECT '|---|---|---|---:|---:|---|---|---|---:|';
SELECT format('| %s | %s | %s | %s | %s%% | %s | %s | %s | %s |', layout, query, mode, n,
              round(100 * generic_share), p50_95(plan), p50_95(exec), p50_95(total), coalesce(ms(sixth), '–'))
  FROM per_query
 ORDER BY query, array_position(ARRAY['literal', 'auto', 'generic'], mode), layout DESC;
SELECT '';
SELECT '| layout | insert rows/s per round |';
SELECT '|---|---|';
SELECT format('| %s | %s |', layout,
              string_agg(to_char(rows / (ms / 1000), 'FM999999990'), ', ' ORDER BY round))
  FROM inserts GROUP BY layout ORDER BY layout DESC;
SQL
