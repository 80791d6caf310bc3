#!/usr/bin/env bash
# warm_load onto one GPU (run by scripts/gpu-check.sh, needs the CUDA build):
# a >= 8 GB safetensors checkpoint from the page cache to device 0 through the
# whole pipeline (headers, plan, arena, reader threads, pinned staging ring,
# copies), against a bare pinned host-to-device copy of the same bytes in the
# same run. Goal: >= 0.85x the pinned copy's bandwidth. Not part of make
# bench (bench/run.sh runs bench/*.sh; this one exits 0 quietly without a GPU
# build).
#   bash bench/warm_load_gpu.sh [BUILD_DIR]      BENCH_GB (8), BENCH_REPS (2)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-${BUILD:-build}}
GB=${BENCH_GB:-8}
REPS=${BENCH_REPS:-2}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -f "$BUILD/cuda/libmodelprep.a" ]; then
  echo "warm_load_gpu: no CUDA build in $BUILD/cuda (make BUILD=$BUILD cuda): skipped"
  exit 0
fi
work=$(mktemp -d "${BENCH_DIR:-/tmp}/warm_load_gpu.XXXXXX")
trap 'rm -rf "$work"' EXIT
PKGS="libmicrohttpd jansson libcurl sqlite3 openssl"
cc -std=c11 -O2 -D_GNU_SOURCE -DMP_HAVE_CUDA=1 -I. $(pkg-config --cflags $PKGS) \
  bench/warm_load_gpu_bench.c "$BUILD/cuda/libmodelprep.a" $(pkg-config --libs $PKGS) \
  -L"$CUDA_HOME/lib64" -lcudart -lstdc++ -lm -pthread -ldl -o "$work/bench"

if ! command -v nvidia-smi >/dev/null && [ -z "${1:-}" ]; then
  echo "warm_load_gpu: no GPU here: skipped"
  exit 0
fi
mkdir -p "$work/model"
# Written without numpy/safetensors so it runs on a bare node: 32 MiB bf16
# matrices plus small norms, the header as safetensors wants it.
"$PY" - "$work/model/model.safetensors" "$GB" <<'PYEOF'
import json, os, struct, sys
path, gb = sys.argv[1], float(sys.argv[2])
block = os.urandom(32 * 2**20)
norm = b"\x00\x3f" * 4096
names, off, hdr = [], 0, {"__metadata__": {"format": "pt"}}
i = 0
while off < gb * 1e9:
    hdr["model.layers.%d.mlp.w" % i] = {"dtype": "BF16", "shape": [4096, 4096],
                                        "data_offsets": [off, off + len(block)]}
    names.append(block); off += len(block)
    hdr["model.layers.%d.norm.weight" % i] = {"dtype": "BF16", "shape": [4096],
                                              "data_offsets": [off, off + len(norm)]}
    names.append(norm); off += len(norm)
    i += 1
h = json.dumps(hdr, separators=(",", ":")).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for b in names:
        f.write(b)
PYEOF
cat "$work/model/model.safetensors" >/dev/null
cat "$work/model/model.safetensors" >/dev/null
echo "figure: file $(stat -c %s "$work/model/model.safetensors") bytes, page cache warm"
rc=0
LD_LIBRARY_PATH="$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}" "$work/bench" "$work/model" "$REPS" || rc=$?
if [ "$rc" -eq 3 ] && [ -z "${1:-}" ]; then
  echo "warm_load_gpu: no CUDA device here: skipped"
  exit 0
fi
exit "$rc"
