#!/usr/bin/env bash
# Runs analytics-service locally: starts PostgreSQL and Redis when they are not running,
# creates the `analytics` role and database, applies migrations, then serves
# gRPC on :50051 and the admin port on :9090 (Ctrl-C stops it gracefully).
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

# The design's defaults: user analytics / password secret / database analytics.
export POSTGRES_HOST="${POSTGRES_HOST:-127.0.0.1}"
export POSTGRES_USER="${POSTGRES_USER:-analytics}"
export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-secret}"
export POSTGRES_DB="${POSTGRES_DB:-analytics}"
export REDIS_HOST="${REDIS_HOST-127.0.0.1}"
export LOG_FORMAT="${LOG_FORMAT:-text}"

admin_psql() { psql -h "${POSTGRES_HOST}" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq "$@"; }
if [[ "$(admin_psql -c "SELECT 1 FROM pg_roles WHERE rolname = '${POSTGRES_USER}'")" != "1" ]]; then
  admin_psql -c "CREATE ROLE \"${POSTGRES_USER}\" LOGIN PASSWORD '${POSTGRES_PASSWORD}'"
fi
if [[ "$(admin_psql -c "SELECT 1 FROM pg_database WHERE datname = '${POSTGRES_DB}'")" != "1" ]]; then
  admin_psql -c "CREATE DATABASE \"${POSTGRES_DB}\" OWNER \"${POSTGRES_USER}\""
fi

cargo build "${profile_flag[@]}" --locked --bin analytics-service
binary="target/$([[ ${#profile_flag[@]} -gt 0 ]] && echo release || echo debug)/analytics-service"
"${binary}" migrate
exec "${binary}" serve
