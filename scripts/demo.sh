#!/usr/bin/env bash
# The demo: starts a local nats-server, builds the plugins and weir, runs the orders pipeline
# as `weir run` would in production, publishes orders (some malformed) and shows the outputs,
# the dead letters and the throughput.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
source scripts/prerequisites.sh
scripts/build-plugins.sh
cargo build --workspace
cargo run --quiet -p weir-tests --bin weir-demo -- "$@"
