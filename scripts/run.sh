#!/usr/bin/env bash
# Runs analytics-service locally: starts PostgreSQL and Redis when they are not running,
# creates the `analytics` role and database when absent (and says so, with where the data
# stays), applies migrations, then serves gRPC on :50051 and the admin port on :9090
# (Ctrl-C stops it gracefully).
#
#   scripts/run.sh              debug build
#   scripts/run.sh --release    optimised build (as the container image ships)
#
# Any variable of the configuration table in the README can be set in the environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile_flag=()
if [[ "${1:-}" == "--release" ]]; then
  profile_flag=(--release)
fi

bash scripts/dev-services.sh

# The service's own defaults (the configuration table in the README), spelled out so the
# role and database below match what the binary connects with.
export POSTGRES_HOST="${POSTGRES_HOST:-127.0.0.1}"
export POSTGRES_PORT="${POSTGRES_PORT:-5432}"
export POSTGRES_USER="${POSTGRES_USER:-analytics}"
export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-secret}"
export POSTGRES_DB="${POSTGRES_DB:-analytics}"
export REDIS_HOST="${REDIS_HOST-127.0.0.1}"
export LOG_FORMAT="${LOG_FORMAT:-text}"

say() { printf 'run: %s\n' "$*"; }
admin_psql() {
  psql -h "${POSTGRES_HOST}" -p "${POSTGRES_PORT}" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq "$@"
}
server="${POSTGRES_HOST}:${POSTGRES_PORT}"
if [[ "$(admin_psql -c "SELECT 1 FROM pg_roles WHERE rolname = '${POSTGRES_USER}'")" != "1" ]]; then
  admin_psql -c "CREATE ROLE \"${POSTGRES_USER}\" LOGIN PASSWORD '${POSTGRES_PASSWORD}'"
  say "created PostgreSQL role ${POSTGRES_USER} (login, password from POSTGRES_PASSWORD) on ${server}"
else
  say "using the existing PostgreSQL role ${POSTGRES_USER} on ${server}"
fi
if [[ "$(admin_psql -c "SELECT 1 FROM pg_database WHERE datname = '${POSTGRES_DB}'")" != "1" ]]; then
  admin_psql -c "CREATE DATABASE \"${POSTGRES_DB}\" OWNER \"${POSTGRES_USER}\""
  say "created database ${POSTGRES_DB} (owner ${POSTGRES_USER}) on ${server}"
else
  say "using the existing database ${POSTGRES_DB} on ${server}"
fi
data_directory="$(admin_psql -c 'SHOW data_directory' 2>/dev/null || echo 'its data directory')"
say "events and identities stay in database ${POSTGRES_DB} (files under ${data_directory}) across runs;"
say "  start over with: psql -h ${POSTGRES_HOST} -p ${POSTGRES_PORT} -U postgres -c 'DROP DATABASE \"${POSTGRES_DB}\"'"
if [[ -n "${REDIS_HOST}" ]]; then
  say "Redis at ${REDIS_HOST}:${REDIS_PORT:-6379} holds only cached counts (keys expire); nothing there needs keeping"
fi

cargo build "${profile_flag[@]}" --locked --bin analytics-service
binary="target/$([[ ${#profile_flag[@]} -gt 0 ]] && echo release || echo debug)/analytics-service"
if ! "${binary}" migrate; then
  say "migrate failed. If it names a migration that differs from the applied one, the"
  say "  database was built by another checkout: drop it (command above) and run again."
  exit 1
fi
exec "${binary}" serve
