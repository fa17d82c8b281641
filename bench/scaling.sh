#!/usr/bin/env bash
# Storage, WAL and PostgreSQL CPU per event: the measured inputs of docs/scaling.md.
#
# In a private PostgreSQL 15 cluster (initdb into a temporary directory, its own port, so
# no other database's WAL or CPU is counted; stopped and deleted on exit) this applies the
# service's migrations (`analytics-service migrate`), then:
#   1. ingests EVENTS synthetic events as the service writes them: statements of BATCH
#      rows (one insert trigger run each), time-ordered UUIDv7-like ids, KEYED_PERCENT of
#      them with an insert_id claimed in the same statement, skewed users (USERS) and names
#      (20), a small JSON properties object, timestamps in time order over the last DAYS
#      days;
#   2. runs `analytics-service serve` (Redis off) until its fold has moved every count
#      delta and pending user row into the rollups and bitmaps, then stops it;
#   3. reports, per event and per million events: the bytes on disk of events (heap,
#      indexes, TOAST, every partition), event_insert_ids, the count rollups and the user
#      bitmaps and ordinals; the WAL written by each phase (pg_current_wal_lsn before and
#      after: the cluster does nothing else); the CPU time of every PostgreSQL process of
#      the cluster (utime+stime from /proc, exited backends included through the
#      postmaster's cutime/cstime) per phase; and the monthly partitions.
# Progress goes to stderr, the markdown report to stdout.
#
# Run as root (initdb and the server run as the `postgres` OS user) from the repository:
#   bench/scaling.sh                       # 1,000,000 events, about 2-4 minutes
#   EVENTS=200000 bench/scaling.sh
#   SERVER=target/release/analytics-service bench/scaling.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EVENTS=${EVENTS:-1000000}
BATCH=${BATCH:-500}
USERS=${USERS:-100000}
DAYS=${DAYS:-30}
KEYED_PERCENT=${KEYED_PERCENT:-50}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
if [[ -z "${SERVER:-}" ]]; then
  cargo build --release --bin analytics-service >&2
  SERVER=target/release/analytics-service
fi
SERVER=$(realpath "$SERVER")

log() { printf '%s\n' "$*" >&2; }
as_postgres() { runuser -u postgres -- "$@"; }

dir=$(mktemp -d /tmp/analytics-scaling.XXXXXX)
chown postgres:postgres "$dir"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stop() {
  as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap stop EXIT

log "initdb and start a private cluster on port $port"
as_postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
  -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c shared_buffers=256MB -c max_wal_size=4GB" start >/dev/null
postmaster=$(head -1 "$dir/data/postmaster.pid")

sql() { psql -h 127.0.0.1 -p "$port" -U postgres -d analytics -v ON_ERROR_STOP=1 -qAt "$@"; }
psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qAt -c "CREATE DATABASE analytics" >/dev/null

server_env() {
  env POSTGRES_HOST=127.0.0.1 POSTGRES_PORT="$port" POSTGRES_USER=postgres POSTGRES_PASSWORD= \
    POSTGRES_DB=analytics POSTGRES_SSLMODE=disable REDIS_HOST= LOG_FORMAT=text SELF_TRACKING=false "$@"
}
log "migrate"
server_env "$SERVER" migrate >/dev/null

# CPU ticks of the postmaster and its children, exited children included.
cpu_ticks() {
  local total=0 pid fields
  for pid in "$postmaster" $(pgrep -P "$postmaster" || true); do
    [[ -r /proc/$pid/stat ]] || continue
    read -r -a fields < <(sed 's/^.*) //' "/proc/$pid/stat")
    # After the ") ", field 14 of stat (utime) is index 11; stime 12; cutime 13; cstime 14.
    total=$((total + fields[11] + fields[12]))
    if [[ $pid == "$postmaster" ]]; then total=$((total + fields[13] + fields[14])); fi
  done
  echo "$total"
}
ticks_per_second=$(getconf CLK_TCK)
wal_lsn() { sql -c "SELECT pg_current_wal_lsn()"; }
wal_bytes_since() { sql -c "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$1')::bigint"; }

statements=$(( (EVENTS + BATCH - 1) / BATCH ))
log "ingest $EVENTS events in $statements statements of $BATCH"
wal_start=$(wal_lsn)
cpu_start=$(cpu_ticks)
started=$(date +%s.%N)
sql <<SQL >/dev/null
SELECT format(\$stmt\$
  WITH input AS (
    SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')
            || substr(md5(random()::text || n), 1, 20))::uuid AS id,
           'event_' || floor(20 * random() ^ 2)::int AS event_name,
           'user-' || floor($USERS * random() ^ 3)::int AS user_id,
           jsonb_build_object('page', '/p/' || floor(random() * 1000)::int, 'load_ms', floor(random() * 900)::int) AS properties,
           now() - make_interval(secs => $DAYS * 86400.0 * (1 - (%1\$s + random()) / $statements)) AS timestamp,
           random() * 100 < $KEYED_PERCENT AS keyed
      FROM generate_series(1, $BATCH) AS n
  ), keys AS (
    INSERT INTO event_insert_ids (scope, user_id, insert_id, event_id)
    SELECT '', user_id, 'order-' || id, id FROM input WHERE keyed
  )
  INSERT INTO events (id, event_name, user_id, properties, timestamp)
  SELECT id, event_name, user_id, properties, timestamp FROM input
\$stmt\$, i)
FROM generate_series(0, $statements - 1) AS i
\gexec
SQL
ingest_seconds=$(echo "$(date +%s.%N) - $started" | bc)
ingest_cpu=$(( $(cpu_ticks) - cpu_start ))
ingest_wal=$(wal_bytes_since "$wal_start")
stored=$(sql -c "SELECT count(*) FROM events")

log "fold (analytics-service serve until nothing is pending)"
wal_start=$(wal_lsn)
cpu_start=$(cpu_ticks)
started=$(date +%s.%N)
server_env SERVICE_BIND_ADDRESS=127.0.0.1 SERVICE_PORT=0 PROMETHEUS_PORT=0 "$SERVER" serve >"$dir/serve.log" 2>&1 &
serve=$!
while true; do
  pending=$(sql -c "SELECT (SELECT count(*) FROM event_count_deltas) + (SELECT count(*) FROM user_activity_pending)")
  [[ $pending == 0 ]] && break
  kill -0 "$serve" 2>/dev/null || { cat "$dir/serve.log" >&2; exit 1; }
  sleep 0.5
done
fold_seconds=$(echo "$(date +%s.%N) - $started" | bc)
kill -TERM "$serve"; wait "$serve" || true
fold_cpu=$(( $(cpu_ticks) - cpu_start ))
fold_wal=$(wal_bytes_since "$wal_start")
sql -c "VACUUM ANALYZE" >/dev/null

size_of() { sql -c "SELECT coalesce(sum(pg_total_relation_size(c)), 0)::bigint FROM unnest(ARRAY[$1]::regclass[]) AS c"; }
events_bytes=$(sql -c "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::bigint FROM pg_inherits WHERE inhparent = 'events'::regclass")
keys_bytes=$(size_of "'event_insert_ids'")
counts_bytes=$(size_of "'event_counts_hourly','event_counts_daily','event_totals_hourly'")
users_bytes=$(size_of "'user_activity_hourly','user_activity_daily','user_ordinals'")
partitions=$(sql -c "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass")
distinct_users=$(sql -c "SELECT count(*) FROM user_ordinals")

per_event() { echo "scale=1; $1 / $stored" | bc; }
per_million_mb() { echo "scale=1; $1 * 1000000 / $stored / 1048576" | bc; }
cpu_us_per_event() { echo "scale=1; $1 * 1000000 / $ticks_per_second / $stored" | bc; }
total_bytes=$((events_bytes + keys_bytes + counts_bytes + users_bytes))

cat <<REPORT
$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(nproc) cores, PostgreSQL $(sql -c "SHOW server_version" | cut -d' ' -f1) (private cluster, shared_buffers 256MB)
\`EVENTS=$EVENTS BATCH=$BATCH USERS=$USERS DAYS=$DAYS KEYED_PERCENT=$KEYED_PERCENT bench/scaling.sh\`: $stored events, $distinct_users distinct users, $partitions monthly partitions

| | total | per event | per million events |
|---|---:|---:|---:|
| events (heap, 4 indexes, TOAST) | $((events_bytes / 1048576)) MiB | $(per_event "$events_bytes") B | $(per_million_mb "$events_bytes") MiB |
| event_insert_ids ($KEYED_PERCENT% keyed) | $((keys_bytes / 1048576)) MiB | $(per_event "$keys_bytes") B | $(per_million_mb "$keys_bytes") MiB |
| count rollups (hourly, daily, totals) | $((counts_bytes / 1048576)) MiB | $(per_event "$counts_bytes") B | $(per_million_mb "$counts_bytes") MiB |
| user bitmaps and ordinals | $((users_bytes / 1048576)) MiB | $(per_event "$users_bytes") B | $(per_million_mb "$users_bytes") MiB |
| all of the above | $((total_bytes / 1048576)) MiB | $(per_event "$total_bytes") B | $(per_million_mb "$total_bytes") MiB |
| WAL, ingestion | $((ingest_wal / 1048576)) MiB | $(per_event "$ingest_wal") B | $(per_million_mb "$ingest_wal") MiB |
| WAL, fold | $((fold_wal / 1048576)) MiB | $(per_event "$fold_wal") B | $(per_million_mb "$fold_wal") MiB |
| PostgreSQL CPU, ingestion | $(echo "scale=1; $ingest_cpu / $ticks_per_second" | bc) s in ${ingest_seconds%.*} s | $(cpu_us_per_event "$ingest_cpu") µs | $(echo "scale=1; $ingest_cpu / $ticks_per_second * 1000000 / $stored" | bc) s |
| PostgreSQL CPU, fold | $(echo "scale=1; $fold_cpu / $ticks_per_second" | bc) s in ${fold_seconds%.*} s | $(cpu_us_per_event "$fold_cpu") µs | $(echo "scale=1; $fold_cpu / $ticks_per_second * 1000000 / $stored" | bc) s |
REPORT
