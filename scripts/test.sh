#!/usr/bin/env bash
# The test suite: builds the plugins and the workspace, then runs every test (unit tests and
# end-to-end tests against a real nats-server, real RocksDB and the real plugins).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# The status page's test needs a real browser: prerequisites.sh installs Chromium too.
export WEIR_NEEDS_BROWSER=1
source scripts/prerequisites.sh
scripts/build-plugins.sh
cargo build --workspace
# Every plugin that weir can run has golden fixtures (plugins/*/fixtures).
weir="${CARGO_TARGET_DIR:-$repo/target}/debug/weir"
"$weir" plugin test plugins/dist/orders.wasm --fixtures plugins/orders/fixtures
"$weir" plugin test plugins/dist/hostile.wasm --fixtures plugins/hostile/fixtures --fuel 10000000
"$weir" plugin test plugins/dist/stamp-py.wasm --fixtures plugins/stamp-py/fixtures
"$weir" plugin test plugins/dist/tally-py.wasm --fixtures plugins/tally-py/fixtures
"$weir" plugin test plugins/dist/balances.wasm --fixtures plugins/balances/fixtures --fuzz 500
"$weir" plugin test plugins/dist/window-counts.wasm --fixtures plugins/window-counts/fixtures --fuzz 500
"$weir" plugin test plugins/dist/echo-v1.wasm --fixtures plugins/echo-v1/fixtures
# plugins/stateful has fixtures too, and must fail them: the e2e harness test checks that.
cargo test --workspace "$@"
