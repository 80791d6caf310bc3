#!/usr/bin/env bash
# warm_load throughput on the host backend, page cache warm: the loader
# (headers, plan, arena allocation, reader threads, free) vs a plain
# sequential read() of the same file into a pre-faulted buffer, measured in
# the same process. Goal: >= 0.9x plain read. Also prints the staged path
# (pinned ring + copies, what a GPU load does) for reference. Makes a
# >= 2 GB safetensors file in $BENCH_DIR (default /tmp) and deletes it.
# warm_load uses the server's memfd arenas; "private arena" is the same
# into an anonymous THP arena (gpu_set_host_exportable(set, false)).
# BENCH_GB sets the size, BENCH_REPS the best-of count.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
GB=${BENCH_GB:-2}
REPS=${BENCH_REPS:-5}
PY=${PY:-.venv/bin/python}
work=$(mktemp -d "${BENCH_DIR:-/tmp}/warm_load.XXXXXX")
trap 'rm -rf "$work"' EXIT

make -s BUILD="$BUILD" "$BUILD/libmodelprep.a" >/dev/null
PKGS="libmicrohttpd jansson libcurl sqlite3 openssl"
cc -std=c11 -O2 -D_GNU_SOURCE -I. $(pkg-config --cflags $PKGS) bench/warm_load_bench.c \
  "$BUILD/libmodelprep.a" $(pkg-config --libs $PKGS) -lm -pthread -ldl -o "$work/warm_load_bench"

mkdir -p "$work/model"
f="$work/model/model.safetensors"
"$PY" - "$f" "$GB" <<'PYEOF'
import sys, numpy as np
from safetensors.numpy import save_file
path, gb = sys.argv[1], float(sys.argv[2])
rng = np.random.default_rng(0)
block = rng.integers(0, 65535, 16 * 2**20, dtype=np.uint16)
ts, total, i = {}, 0, 0
while total < gb * 2**30:
    ts["model.layers.%d.mlp.w" % i] = block.view(np.float16).reshape(4096, 4096).copy()
    ts["model.layers.%d.norm" % i] = np.ones(4096, np.float32)
    total += 32 * 2**20 + 4096 * 4
    i += 1
save_file(ts, path, metadata={"format": "pt"})
PYEOF
cat "$f" >/dev/null
cat "$f" >/dev/null

declare -A r
while read -r k v; do r[$k]=$v; done < <("$work/warm_load_bench" "$work/model" "$f" "$REPS")
awk -v fb="${r[file_bytes]}" -v tb="${r[tensor_bytes]}" -v plain="${r[plain_read_s]}" \
    -v fr="${r[plain_fresh_s]}" -v ld="${r[load_s]}" -v lw="${r[load_worst_s]}" -v pw="${r[plain_worst_s]}" -v xw="${r[private_worst_s]}" -v ex="${r[load_private_s]}" -v sg="${r[load_staged_s]}" -v rd="${r[readers]}" -v al="${r[alloc_s]}" 'BEGIN {
  g = 1e9
  printf "warm_load: %.2f GB of tensors (file %.2f GB) to one host device, page cache warm, best of runs\n", tb / g, fb / g
  printf "  plain read()              %7.3f s  %6.2f GB/s\n", plain, fb / g / plain
  printf "  plain read(), fresh buffer %5.3f s  %6.2f GB/s\n", fr, fb / g / fr
  printf "  warm_load (%d readers)     %7.3f s  %6.2f GB/s  (arena allocation %.3f s of it)\n", rd, ld, tb / g / ld, al
  printf "  warm_load, private arena  %7.3f s  %6.2f GB/s  (anonymous THP, not exportable)\n", ex, tb / g / ex
  printf "  warm_load, staged ring    %7.3f s  %6.2f GB/s\n", sg, tb / g / sg
  printf "  ratio warm_load/plain read: %.2fx (goal >= 0.9)\n", (tb / ld) / (fb / plain)
  printf "  spread over runs: plain read %.3f..%.3f s, warm_load %.3f..%.3f s, private %.3f..%.3f s\n", plain, pw, ld, lw, ex, xw
  printf "  ratio warm_load/plain read into a fresh buffer: %.2fx\n", (tb / ld) / (fb / fr)
  printf "  ratio private arena/plain read: %.2fx\n", (tb / ex) / (fb / plain)
  printf "  ratio staged/plain read:    %.2fx\n", (tb / sg) / (fb / plain)
}'
