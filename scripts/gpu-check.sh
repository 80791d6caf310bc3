#!/usr/bin/env bash
# gpu-check.sh - the one prepared script for a machine with NVIDIA GPUs
# (written for an H200 node with Debian and CUDA under /usr/local/cuda, no
# network). Builds the CUDA backend, runs the GPU tests (tests/cuda), checks
# that the CUDA build of modelprepd lists the GPUs on /v1/devices, runs the
# warm_load GPU benchmark when it exists, and prints every figure as a
# "figure:" line followed by one closing line. Exit status 0 = all passed.
#
#   bash scripts/gpu-check.sh            BUILD=dir to build elsewhere
#
# Needs nothing outside the repository: scripts/deps.sh cuda (which may want the
# network) runs only when the build's pkg-config libraries are missing.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpucheck}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$PATH:$CUDA_HOME/bin"
JOBS=$(nproc 2>/dev/null || echo 4)
pass=0; fail=0; failed=()
ok() { pass=$((pass+1)); echo "ok: $1"; }
ko() { fail=$((fail+1)); failed+=("$1"); echo "FAILED: $1"; }

echo "== machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv,noheader \
    | sed 's/^/figure: nvidia-smi /'
else
  echo "no nvidia-smi"
fi
command -v nvcc >/dev/null || { echo "FAILED: no nvcc under $CUDA_HOME/bin"; exit 1; }
nvcc --version | tail -1

echo "== build"
if ! pkg-config --exists libmicrohttpd jansson libcurl sqlite3 openssl cmocka 2>/dev/null; then
  echo "build libraries missing: running scripts/deps.sh cuda"
  bash scripts/deps.sh cuda || echo "scripts/deps.sh cuda failed (no network?)"
fi
mkdir -p "$BUILD"
t0=$SECONDS
if make -j"$JOBS" --no-print-directory BUILD="$BUILD" cuda >"$BUILD/cuda-build.log" 2>&1; then
  ok "cuda build"
  echo "figure: cuda build $((SECONDS - t0)) s"
else
  tail -40 "$BUILD/cuda-build.log"; ko "cuda build"
  echo; echo "gpu-check: $pass passed, $fail failed"; exit 1
fi
CUDA_BIN="$BUILD/cuda"

echo "== tests/cuda"
if timeout 300 "$CUDA_BIN/tests/cuda/test_gpu_cuda"; then ok "test_gpu_cuda"; else ko "test_gpu_cuda"; fi

fetch() {
  if command -v curl >/dev/null; then curl -sf "$1"
  else python3 -c 'import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=10).read().decode())' "$1"; fi
}

echo "== modelprepd (CUDA build) /v1/devices and /v1/version"
tmp=$(mktemp -d)
"$CUDA_BIN/modelprepd" --listen 127.0.0.1:0 --data-dir "$tmp/data" --devices auto \
  >"$tmp/out" 2>"$tmp/err" &
pid=$!
url=""
for _ in $(seq 100); do
  url=$(sed -n 's/^listening on \(http:[^ ]*\).*/\1/p' "$tmp/out" | head -1)
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ -n "$url" ]; then
  devs=$(fetch "$url/v1/devices" 2>/dev/null || true)
  ver=$(fetch "$url/v1/version" 2>/dev/null || true)
  echo "figure: /v1/devices $devs"
  echo "figure: /v1/version $ver"
  if echo "$devs" | grep -q '"kind": *"cuda"' && echo "$ver" | grep -q '"runtime"'; then
    ok "server lists CUDA devices"
  else
    ko "server lists CUDA devices"
  fi
else
  cat "$tmp/err"; ko "server start"
fi
kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
rm -rf "$tmp"

# ---- warm_load GPU benchmark -------------------------------------------------
# Place for the warm_load author: bench/warm_load_gpu.sh BUILD_DIR, run with
# the CUDA build in $BUILD/cuda; it prints its own "figure:" lines and exits
# nonzero on failure. Keep it within a couple of minutes of device time.
if [ -f bench/warm_load_gpu.sh ]; then
  echo "== bench/warm_load_gpu.sh"
  if timeout 420 bash bench/warm_load_gpu.sh "$BUILD"; then ok "warm_load gpu bench"; else ko "warm_load gpu bench"; fi
else
  echo "== warm_load GPU benchmark: not present yet (bench/warm_load_gpu.sh)"
fi
# ------------------------------------------------------------------------------

echo
[ ${#failed[@]} -gt 0 ] && printf 'FAILED: %s\n' "${failed[@]}"
echo "gpu-check: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
