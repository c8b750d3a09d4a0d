#!/usr/bin/env bash
# Builds every plugin in plugins/ to a wasm component in plugins/dist/.
#
# Rust plugins: uses the installed wasm32-wasip2 Rust target when there is one; otherwise the
# no_std sysroot named by WEIR_WASM_SYSROOT (made by ../shared/toolchain/build-wasm-sysroot.sh);
# otherwise stops and says how to get one of them.
# Python plugins (plugins/*-py, the contract version in each one's wit-version file):
# componentize-py, from WEIR_COMPONENTIZE_PY or PATH.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
target=wasm32-wasip2
out="$repo/plugins/dist"

rustflags=""
if rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  echo "build-plugins: using the installed $target target"
elif [ -n "${WEIR_WASM_SYSROOT:-}" ]; then
  if [ ! -d "$WEIR_WASM_SYSROOT/lib/rustlib/$target" ]; then
    echo "build-plugins: WEIR_WASM_SYSROOT=$WEIR_WASM_SYSROOT has no $target libraries" >&2
    echo "  hint: rebuild it with ../shared/toolchain/build-wasm-sysroot.sh DIR $target, then WEIR_WASM_SYSROOT=DIR/sysroot" >&2
    exit 1
  fi
  echo "build-plugins: using the sysroot $WEIR_WASM_SYSROOT"
  rustflags="--sysroot $WEIR_WASM_SYSROOT"
else
  echo "build-plugins: the $target Rust target is not installed" >&2
  echo "  hint: run 'rustup target add $target', or set WEIR_WASM_SYSROOT to a no_std sysroot" >&2
  echo "        built by ../shared/toolchain/build-wasm-sysroot.sh DIR $target (then DIR/sysroot)" >&2
  exit 1
fi

target_dir="${CARGO_TARGET_DIR:-$repo/target}/plugins"
RUSTFLAGS="$rustflags" CARGO_TARGET_DIR="$target_dir" \
  cargo build --quiet --release --target "$target" --manifest-path "$repo/plugins/Cargo.toml"

mkdir -p "$out"
for manifest in "$repo"/plugins/*/Cargo.toml; do
  name=$(basename "$(dirname "$manifest")")
  cp "$target_dir/$target/release/${name//-/_}.wasm" "$out/$name.wasm"
  printf 'build-plugins: %-28s %9d bytes\n' "plugins/dist/$name.wasm" "$(stat -c %s "$out/$name.wasm")"
done

componentize=${WEIR_COMPONENTIZE_PY:-$(command -v componentize-py || true)}
if [ -z "$componentize" ]; then
  echo "build-plugins: componentize-py is missing, so the Python plugins cannot be built" >&2
  echo "  hint: pip install componentize-py==0.25.1 (or source scripts/prerequisites.sh, which installs it)" >&2
  exit 1
fi
for app in "$repo"/plugins/*-py/app.py; do
  dir=$(dirname "$app")
  name=$(basename "$dir")
  # The contract version the plugin is written against, in its wit-version file.
  version=$(cat "$dir/wit-version" 2>/dev/null || true)
  if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || [ ! -d "$repo/wit/$version" ]; then
    echo "build-plugins: $dir/wit-version must name a contract version of wit/ (such as 0.2.0); it says '$version'" >&2
    exit 1
  fi
  # componentize-py reads the module from the working directory (its __pycache__ is ignored).
  (cd "$dir" && "$componentize" --wit-path "$repo/wit/$version" --world plugin \
    componentize app --output "$out/$name.wasm" >/dev/null)
  printf 'build-plugins: %-28s %9d bytes\n' "plugins/dist/$name.wasm" "$(stat -c %s "$out/$name.wasm")"
done
