#!/usr/bin/env bash
# The test suite: builds the plugins and the workspace, then runs every test (unit tests and
# end-to-end tests against a real nats-server, real RocksDB and the real plugins).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
source scripts/prerequisites.sh
scripts/build-plugins.sh
cargo build --workspace
cargo test --workspace "$@"
