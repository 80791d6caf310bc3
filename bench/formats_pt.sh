#!/usr/bin/env bash
# PyTorch checkpoint read throughput, page cache warm: our reader (pt_open +
# weights_read of every tensor, views gathered into contiguous bytes) vs
# torch.load(weights_only=True, map_location="cpu") on the same >= 1 GB
# torch.save file, for the zip format and the legacy stream. Also a plain
# read() of the file as the physical reference. Goal: >= 3x torch.load.
# BENCH_GB sets the size (default 1.1), BENCH_REPS the best-of count.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
GB=${BENCH_GB:-1.1}
REPS=${BENCH_REPS:-3}
PY=${PY:-.venv/bin/python}
work=$(mktemp -d "${BENCH_DIR:-/tmp}/formats_pt.XXXXXX")
trap 'rm -rf "$work"' EXIT

make -s BUILD="$BUILD" "$BUILD/libmodelprep.a" >/dev/null
PKGS="libmicrohttpd jansson libcurl sqlite3 openssl"
cc -std=c11 -O2 -D_GNU_SOURCE -I. $(pkg-config --cflags $PKGS) bench/pt_read_bench.c \
  "$BUILD/libmodelprep.a" $(pkg-config --libs $PKGS) -lm -pthread -ldl -o "$work/pt_read_bench"

"$PY" - "$work" "$GB" <<'PYEOF'
import sys, torch
work, gb = sys.argv[1], float(sys.argv[2])
# a model-like state dict: 32 MiB matrices in f16/bf16/f32, norms, a tied
# lm_head and a transposed view (gathered by our reader)
g = torch.Generator().manual_seed(0)
sd, total, i = {}, 0, 0
while total < gb * 2**30:
    dt = (torch.float16, torch.bfloat16, torch.float32)[i % 3]
    rows = 4096 if dt != torch.float32 else 2048
    sd["layers.%d.w" % i] = torch.randn(rows, 4096, generator=g).to(dt)
    sd["layers.%d.norm" % i] = torch.ones(4096)
    total += 32 * 2**20 + 4096 * 4
    i += 1
sd["embed.weight"] = torch.randn(2048, 4096, generator=g).half()
sd["lm_head.weight"] = sd["embed.weight"]
sd["proj_t"] = sd["layers.0.w"].t()
torch.save(sd, work + "/zip.bin")
torch.save(sd, work + "/legacy.bin", _use_new_zipfile_serialization=False)
PYEOF

for kind in zip legacy; do
  f="$work/$kind.bin"
  cat "$f" >/dev/null; cat "$f" >/dev/null  # warm the page cache
  declare -A r=()
  while read -r k v; do r[$k]=$v; done < <("$work/pt_read_bench" "$f" "$REPS")
  torch_s=$("$PY" - "$f" "$REPS" <<'PYEOF'
import sys, time, torch
path, reps = sys.argv[1], int(sys.argv[2])
best = 1e9
for _ in range(reps):
    t0 = time.perf_counter()
    sd = torch.load(path, weights_only=True, map_location="cpu")
    n = sum(t.numel() * t.element_size() for t in sd.values())
    best = min(best, time.perf_counter() - t0)
    del sd
print("%.6f" % best)
PYEOF
)
  awk -v kind="$kind" -v fb="${r[file_bytes]}" -v tb="${r[tensor_bytes]}" -v nt="${r[tensors]}" \
      -v plain="${r[plain_read_s]}" -v ours="${r[pt_read_s]}" -v tl="$torch_s" 'BEGIN {
    g = 1e9
    printf "formats_pt (%s): file %.2f GB, %d tensors, %.2f GB materialized, page cache warm, best of runs\n", kind, fb / g, nt, tb / g
    printf "  plain read()                    %7.3f s  %6.2f GB/s\n", plain, fb / g / plain
    printf "  ours (pt_open + weights_read)   %7.3f s  %6.2f GB/s\n", ours, tb / g / ours
    printf "  torch.load(weights_only=True)   %7.3f s  %6.2f GB/s\n", tl, fb / g / tl
    printf "  ratio ours/torch.load: %.2fx (goal >= 3)\n", tl / ours
    printf "  ratio ours/plain read: %.2fx\n", plain / ours
  }'
done
