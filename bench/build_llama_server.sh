#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the llama.cpp that llama-cpp-python's sdist vendors, so the
# batching benchmark compares edgeserve with the exact llama.cpp revision it runs on.
# Idempotent: prints the binary's path and exits at once when it is already built.
# Usage: bench/build_llama_server.sh [cache_dir]   (default ~/.cache/edgeserve-bench)
set -euo pipefail
VERSION="0.3.36"
CACHE="${1:-${EDGESERVE_BENCH_CACHE:-$HOME/.cache/edgeserve-bench}}"
SRC="$CACHE/llama_cpp_python-$VERSION"
BUILD="$CACHE/llama-server-build-$VERSION"
BIN="$BUILD/bin/llama-server"
PY="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"

if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$CACHE"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    # pip is the registry's ordinary client; --no-binary forces the sdist (there is no wheel anyway).
    "$PY" -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$CACHE" >&2
    tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
# Static build (no shared libs to find at run time), no libcurl (no network models needed);
# -march=native as llama-cpp-python's own default build, so both run the same kernels.
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$BUILD" --target llama-server -j "${JOBS:-2}" >&2
test -x "$BIN"
echo "$BIN"
