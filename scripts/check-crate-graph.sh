#!/usr/bin/env bash
# Fails if the crate graph breaks a boundary ARCHITECTURE.md states: weir-core reaches none
# of wasmtime, rocksdb, async-nats or an HTTP framework, through any path of normal
# dependencies. Reads `cargo metadata`; builds nothing.
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

# crate -> what it must never reach.
RULES = {
    "weir-core": {"wasmtime", "wasmtime-wasi", "rocksdb", "librocksdb-sys", "async-nats",
                  "axum", "hyper", "cranelift-codegen"},
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
if failed:
    sys.exit(1)
print("check-crate-graph: " + ", ".join(f"{c} reaches none of {len(f)} forbidden crates" for c, f in RULES.items()))
'
