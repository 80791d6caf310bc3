#!/usr/bin/env bash
# Safetensors read throughput, page cache warm: our reader (pread and mmap
# paths, every tensor into one preallocated buffer) vs a plain sequential
# read() of the file (same C program) and vs Python safetensors
# safe_open(framework="numpy") reading every tensor. Goals: >= 0.9x plain
# read, >= 1.5x Python. Makes a >= 2 GB file in $BENCH_DIR (default /tmp)
# and deletes it. BENCH_GB sets the size, BENCH_REPS the best-of count.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
GB=${BENCH_GB:-2}
REPS=${BENCH_REPS:-3}
PY=${PY:-.venv/bin/python}
work=$(mktemp -d "${BENCH_DIR:-/tmp}/formats_st.XXXXXX")
trap 'rm -rf "$work"' EXIT

make -s BUILD="$BUILD" "$BUILD/libmodelprep.a" >/dev/null
PKGS="libmicrohttpd jansson libcurl sqlite3 openssl"
cc -std=c11 -O2 -D_GNU_SOURCE -I. $(pkg-config --cflags $PKGS) bench/st_read_bench.c \
  "$BUILD/libmodelprep.a" $(pkg-config --libs $PKGS) -lm -pthread -ldl -o "$work/st_read_bench"

f="$work/bench.safetensors"
"$PY" - "$f" "$GB" <<'PYEOF'
import sys, numpy as np
from safetensors.numpy import save_file
path, gb = sys.argv[1], float(sys.argv[2])
# a model-like mix: many 32 MiB matrices (f16/f32) plus small vectors
rng = np.random.default_rng(0)
block = rng.integers(0, 65535, 16 * 2**20, dtype=np.uint16)
ts, total, i = {}, 0, 0
while total < gb * 2**30:
    if i % 2:
        ts["layers.%d.w" % i] = block.view(np.float16).reshape(4096, 4096).copy()
    else:
        ts["layers.%d.w" % i] = block.view(np.float32).reshape(2048, 4096).copy()
    ts["layers.%d.norm" % i] = np.ones(4096, np.float32)
    total += 32 * 2**20 + 4096 * 4
    i += 1
save_file(ts, path, metadata={"format": "pt"})
PYEOF
cat "$f" >/dev/null  # warm the page cache
cat "$f" >/dev/null

declare -A r
while read -r k v; do r[$k]=$v; done < <("$work/st_read_bench" "$f" "$REPS")
py_s=$("$PY" - "$f" "$REPS" <<'PYEOF'
import sys, time
from safetensors import safe_open
path, reps = sys.argv[1], int(sys.argv[2])
best = 1e9
for _ in range(reps):
    t0 = time.perf_counter()
    with safe_open(path, framework="numpy") as f:
        n = 0
        for k in f.keys():
            n += f.get_tensor(k).nbytes
    best = min(best, time.perf_counter() - t0)
print("%.6f" % best)
PYEOF
)
awk -v fb="${r[file_bytes]}" -v tb="${r[tensor_bytes]}" -v plain="${r[plain_read_s]}" \
    -v pr="${r[st_pread_s]}" -v mm="${r[st_mmap_s]}" -v py="$py_s" 'BEGIN {
  g = 1e9
  printf "formats_st: file %.2f GB, %.2f GB of tensors, page cache warm, best of runs\n", fb / g, tb / g
  printf "  plain read()            %7.3f s  %6.2f GB/s\n", plain, fb / g / plain
  printf "  ours (pread)            %7.3f s  %6.2f GB/s\n", pr, tb / g / pr
  printf "  ours (mmap)             %7.3f s  %6.2f GB/s\n", mm, tb / g / mm
  printf "  python safetensors      %7.3f s  %6.2f GB/s\n", py, tb / g / py
  printf "  ratio ours(pread)/plain read: %.2fx (goal >= 0.9)\n", plain / pr
  printf "  ratio ours(mmap)/plain read:  %.2fx\n", plain / mm
  printf "  ratio ours(pread)/python:     %.2fx (goal >= 1.5)\n", py / pr
}'
