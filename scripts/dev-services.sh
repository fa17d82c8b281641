#!/usr/bin/env bash
# Makes sure a local PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) are running,
# installing them from Debian's packages when absent (needs root, as on the project's
# machines), and that Debian's `pgbouncer` is installed (not started: the tests in
# tests/api/pgbouncer.rs start their own). Idempotent: does nothing when all are there.
#
# On a machine where this script had to install PostgreSQL, local TCP logins are set to
# `trust` for 127.0.0.1/::1 (a throwaway development database; never do this elsewhere),
# so the tests and `scripts/run.sh` can log in as `postgres` without a password.
set -euo pipefail

say() { printf 'dev-services: %s\n' "$*"; }

port_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for_port() { # name host port
  for _ in $(seq 1 60); do
    port_open "$2" "$3" && return 0
    sleep 0.5
  done
  say "$1 did not come up on $2:$3"
  return 1
}

apt_install() {
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
    apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null
  fi
}

ensure_postgres() {
  if port_open 127.0.0.1 5432; then
    say "postgresql is running on 127.0.0.1:5432"
    return
  fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    say "installing postgresql (apt-get)"
    apt_install postgresql postgresql-client
  fi
  local version
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  if [[ -z "${version}" ]]; then
    say "no postgresql cluster found under /etc/postgresql"
    exit 1
  fi
  say "starting postgresql ${version}"
  pg_ctlcluster --skip-systemctl-redirect "${version}" main start || true
  wait_for_port postgresql 127.0.0.1 5432
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
    local hba="/etc/postgresql/${version}/main/pg_hba.conf"
    say "allowing passwordless local TCP logins in ${hba} (development machine)"
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "${hba}"
    pg_ctlcluster --skip-systemctl-redirect "${version}" main reload
  fi
}

ensure_redis() {
  # tests/api/redis_topologies.rs builds its Redis Cluster with redis-cli (redis-tools).
  if ! command -v redis-cli >/dev/null 2>&1; then
    say "installing redis-cli (apt-get)"
    apt_install redis-tools
  fi
  if port_open 127.0.0.1 6379; then
    say "redis is running on 127.0.0.1:6379"
    return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    say "installing redis-server (apt-get)"
    apt_install redis-server
  fi
  say "starting redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/dev.log
  wait_for_port redis 127.0.0.1 6379
}

ensure_pgbouncer() {
  if command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]]; then
    return
  fi
  say "installing pgbouncer (apt-get)"
  apt_install pgbouncer
}

ensure_postgres
ensure_redis
ensure_pgbouncer
