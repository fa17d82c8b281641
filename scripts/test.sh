#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
#   1. local PostgreSQL and Redis up (scripts/dev-services.sh); the tool chain in .tools/
#      (scripts/install-tools.sh: grpcurl, buf, helm, ..., and Debian's prometheus/promtool,
#      which the observability tests run for real)
#   2. cargo fmt --all --check, cargo clippy --all-targets -D warnings (the workspace: service
#      and bench/, the default members)
#   3. cargo nextest: unit and integration tests (real PostgreSQL, Redis, gRPC, Prometheus)
#   4. buf lint and buf breaking against the first published proto (proto/baseline/)
#   5. alert rules, their unit tests and the dashboard (scripts/check-observability.sh)
#   6. Dockerfile, Helm chart, kustomize, Tiltfile (scripts/check-deploy.sh)
#   7. the release binary built as the Dockerfile builds it answers `healthcheck`
#      (scripts/check-release-binary.sh)
# Stops at the first failing step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=${SECONDS}

step() { printf '\n==> %s\n' "$*"; }

step "local services"
bash scripts/dev-services.sh

step "tools"
bash scripts/install-tools.sh
# shellcheck source=tools-env.sh
source scripts/tools-env.sh

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "cargo nextest run"
cargo nextest run --locked --no-fail-fast

step "buf lint and buf breaking"
(cd proto && buf lint && buf breaking --against baseline/analytics-v1.binpb)

step "observability checks"
bash scripts/check-observability.sh

step "deployment checks"
bash scripts/check-deploy.sh

step "release binary"
bash scripts/check-release-binary.sh

printf '\nall checks passed in %ss\n' "$((SECONDS - started))"
