#!/usr/bin/env bash
# Builds the release binary exactly as the Dockerfile does (scripts/build-release.sh) and
# drives it as a user would: `migrate`, `migrate --check`, `serve`, `healthcheck`, grpcurl
# through reflection (list, describe, TrackEvent with a JSON body, GetEventCount), the
# admin port, then SIGTERM and a clean exit. Uses its own throwaway database.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=tools-env.sh
source scripts/tools-env.sh

bash scripts/build-release.sh
binary="target/release/analytics-service"

database="analytics_release_check_$$"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc_port="$(free_port)"
admin_port="$(free_port)"
server_pid=""
cleanup() {
  [[ -n "${server_pid}" ]] && kill "${server_pid}" 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS ${database} WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
fail() { echo "check-release-binary: FAIL: $*"; [[ -f /tmp/${database}.log ]] && tail -20 "/tmp/${database}.log"; exit 1; }

psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE ${database}"
export POSTGRES_HOST=127.0.0.1 POSTGRES_USER=postgres POSTGRES_PASSWORD="" POSTGRES_DB="${database}"
export SERVICE_BIND_ADDRESS=127.0.0.1 SERVICE_PORT="${grpc_port}" PROMETHEUS_PORT="${admin_port}"
export REDIS_HOST=127.0.0.1 REDIS_KEY_PREFIX="release-check-$$" LOG_FORMAT=json

set +e
"${binary}" migrate --check >/dev/null 2>&1
[[ $? -eq 3 ]] || fail "migrate --check on an empty database should exit 3"
set -e
"${binary}" migrate >/dev/null || fail "migrate"
"${binary}" migrate --check >/dev/null || fail "migrate --check after migrate"

"${binary}" serve >"/tmp/${database}.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 50); do
  "${binary}" healthcheck --addr "127.0.0.1:${grpc_port}" >/dev/null 2>&1 && break
  sleep 0.2
done
"${binary}" healthcheck --addr "127.0.0.1:${grpc_port}" || fail "healthcheck"
"${binary}" healthcheck --addr "127.0.0.1:${grpc_port}" --service analytics.v1.AnalyticsService >/dev/null \
  || fail "healthcheck for analytics.v1.AnalyticsService"

target="127.0.0.1:${grpc_port}"
services="$(grpcurl -plaintext "${target}" list)"
grep -qx 'analytics.v1.AnalyticsService' <<<"${services}" || fail "grpcurl list: ${services}"
grep -qx 'grpc.health.v1.Health' <<<"${services}" || fail "grpcurl list: ${services}"
described="$(grpcurl -plaintext "${target}" describe analytics.v1.AnalyticsService)" || fail "grpcurl describe"
grep -q 'rpc TrackEvent' <<<"${described}" || fail "grpcurl describe: ${described}"
tracked="$(grpcurl -plaintext -d '{"event_name":"release_check","user_id":"u1","properties":{"page":{"string_value":"/"}}}' \
  "${target}" analytics.v1.AnalyticsService/TrackEvent)"
grep -q '"success": true' <<<"${tracked}" || fail "TrackEvent: ${tracked}"
rows="$(psql -h 127.0.0.1 -U postgres -d "${database}" -Atc "SELECT count(*) FROM events WHERE event_name = 'release_check'")"
[[ "${rows}" == "1" ]] || fail "expected one stored event, found ${rows}"
now="$(date +%s)"
counted="$(grpcurl -plaintext -d "{\"start_time\":$((now - 60)),\"end_time\":$((now + 60))}" \
  "${target}" analytics.v1.AnalyticsService/GetEventCount)"
grep -q '"eventName": "release_check"' <<<"${counted}" || fail "GetEventCount: ${counted}"
curl -fsS "http://127.0.0.1:${admin_port}/readyz" >/dev/null || fail "/readyz"
# Read the whole page first: `curl | grep -q` fails under pipefail when grep exits early.
metrics="$(curl -fsS "http://127.0.0.1:${admin_port}/metrics")" || fail "/metrics"
grep -qF 'grpc_server_handled_total{grpc_service="analytics.v1.AnalyticsService",grpc_method="TrackEvent",grpc_type="unary",grpc_code="OK"} 1' <<<"${metrics}" \
  || fail "/metrics has no TrackEvent OK count"
started="$(psql -h 127.0.0.1 -U postgres -d "${database}" -Atc "SELECT count(*) FROM events WHERE event_name = 'analytics_service.started'")"
[[ "${started}" == "1" ]] || fail "self-tracking: expected one analytics_service.started event, found ${started}"

kill -TERM "${server_pid}"
wait "${server_pid}" || fail "serve exited non-zero after SIGTERM"
server_pid=""
grep -q '"message":"stopped"' "/tmp/${database}.log" || fail "no clean stop in the log"
for lifecycle in analytics_service.migration_applied analytics_service.stopping; do
  seen="$(psql -h 127.0.0.1 -U postgres -d "${database}" -Atc "SELECT count(*) FROM events WHERE event_name = '${lifecycle}'")"
  [[ "${seen}" == "1" ]] || fail "self-tracking: expected one ${lifecycle} event, found ${seen}"
done
rm -f "/tmp/${database}.log"
echo "check-release-binary: OK: migrate, serve, healthcheck, grpcurl (list, describe, TrackEvent, GetEventCount), admin port, self-tracking, SIGTERM"
