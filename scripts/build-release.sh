#!/usr/bin/env bash
# Builds the release binary exactly as the Dockerfile's builder stage does, so CI can test
# the binary that the image wraps. Output: target/release/analytics-service.
#
# Usage: scripts/build-release.sh [extra cargo args...]
# scripts/check-deploy.sh fails when this command line and the Dockerfile's drift apart.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Keep in sync with the Dockerfile (checked): the release build command line.
RELEASE_BUILD_COMMAND=(cargo build --release --locked --bin analytics-service)

"${RELEASE_BUILD_COMMAND[@]}" "$@"
echo "build-release: built $(pwd)/target/release/analytics-service"
