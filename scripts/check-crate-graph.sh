#!/usr/bin/env bash
# Fails if the crate graph breaks a boundary ARCHITECTURE.md states, through any path of
# normal dependencies: weir-core reaches none of wasmtime, rocksdb, async-nats or an HTTP
# framework; each adapter (weir-sandbox, weir-store, weir-nats, weir-admin) reaches no other adapter and
# no other adapter's dependency; and weir, the wiring, imports none of those dependencies
# itself. Reads `cargo metadata`; builds nothing.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cargo metadata --quiet --format-version 1 --manifest-path "$repo/Cargo.toml" | python3 -c '
import json, sys

metadata = json.load(sys.stdin)
names = {package["id"]: package["name"] for package in metadata["packages"]}
normal = {}
for node in metadata["resolve"]["nodes"]:
    normal[node["id"]] = [
        dep["pkg"] for dep in node["deps"]
        if any(kind["kind"] is None for kind in dep["dep_kinds"])
    ]

WASM = {"wasmtime", "wasmtime-wasi", "wasmparser", "cranelift-codegen"}
ROCKSDB = {"rocksdb", "librocksdb-sys"}
NATS = {"async-nats"}
HTTP = {"axum", "hyper"}
# crate -> what it must never reach.
RULES = {
    "weir-core": WASM | ROCKSDB | NATS | HTTP,
    "weir-sandbox": ROCKSDB | NATS | HTTP | {"weir-store", "weir-nats", "weir-admin", "weir"},
    "weir-store": WASM | NATS | HTTP | {"weir-sandbox", "weir-nats", "weir-admin", "weir"},
    "weir-nats": WASM | ROCKSDB | HTTP | {"weir-sandbox", "weir-store", "weir-admin", "weir"},
    "weir-admin": WASM | ROCKSDB | NATS | {"weir-sandbox", "weir-store", "weir-nats", "weir"},
}
# crate -> what it must not import itself (it reaches them only through its adapters).
DIRECT = {
    "weir": WASM | ROCKSDB | NATS | HTTP,
}

def reachable(start):
    seen, stack, parent = {start}, [start], {}
    while stack:
        node = stack.pop()
        for dep in normal.get(node, []):
            if dep not in seen:
                seen.add(dep)
                parent[dep] = node
                stack.append(dep)
    return seen, parent

failed = False
for crate, forbidden in RULES.items():
    ids = [i for i, name in names.items() if name == crate]
    if not ids:
        print(f"check-crate-graph: no crate named {crate}", file=sys.stderr)
        failed = True
        continue
    seen, parent = reachable(ids[0])
    for node in seen:
        if names[node] in forbidden:
            path, at = [], node
            while at != ids[0]:
                path.append(names[at])
                at = parent[at]
            path.append(crate)
            print(f"check-crate-graph: {crate} must not depend on {names[node]}: "
                  + " -> ".join(reversed(path)), file=sys.stderr)
            failed = True
for crate, forbidden in DIRECT.items():
    ids = [i for i, name in names.items() if name == crate]
    for dep in normal.get(ids[0], []) if ids else []:
        if names[dep] in forbidden:
            print(f"check-crate-graph: {crate} imports {names[dep]} itself: only its adapter may",
                  file=sys.stderr)
            failed = True
if failed:
    sys.exit(1)
print("check-crate-graph: ok (" + "; ".join(
    [f"{c} reaches none of {len(f)} forbidden crates" for c, f in RULES.items()]
    + [f"{c} imports none of {len(f)} adapter dependencies" for c, f in DIRECT.items()]) + ")")
'
