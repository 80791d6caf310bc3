#!/usr/bin/env bash
# warm_load with quantize (fp8, nf4) to the host device, page cache warm: a
# bf16 checkpoint of BENCH_QGB (default 0.5) GiB of 4096x4096 weights in two
# shards. The job's wall time (bench/warm_load_quantize.py) vs the Python a
# user would write for the same bytes (load_file + torch's FP8 recipe;
# load_file + bitsandbytes' quantize_4bit on CPU), and vs the same load
# without quantize, interleaved, best of BENCH_REPS (default 3).
# Goals: >= 1.0x the Python peers (same CPUs, same bytes out).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
GB=${BENCH_QGB:-0.5}
REPS=${BENCH_REPS:-3}
PY=${PY:-.venv/bin/python}
. bench/warm_load_lib.sh
warm_bench_workdir warm_load_quantize
make -s BUILD="$BUILD" "$BUILD/modelprepd" >/dev/null

mkdir -p "$work/model"
"$PY" - "$work/model" "$GB" <<'PYEOF'
import sys, torch
from safetensors.torch import save_file
d, gb = sys.argv[1], float(sys.argv[2])
g = torch.Generator().manual_seed(0)
n = max(2, int(gb * 2**30 / (32 * 2**20)))
for shard in (1, 2):
    ts = {"model.layers.%d.mlp.up_proj.weight" % i:
          (torch.randn(4096, 4096, generator=g) * 0.02).to(torch.bfloat16)
          for i in range((shard - 1) * n // 2, shard * n // 2)}
    save_file(ts, "%s/model-0000%d-of-00002.safetensors" % (d, shard), metadata={"format": "pt"})
PYEOF
shards=("$work"/model/*.safetensors)
cat "${shards[@]}" >/dev/null

warm_bench_server "$work"
declare -A j
while read -r k v; do j[$k]=$v; done < <(PYTHONPATH=bench "$PY" bench/warm_load_quantize.py \
  "$base" "$work/model" "$REPS" "${shards[@]}")
awk -v b="${j[bytes_before]}" -v f="${j[job_fp8_s]}" -v n="${j[job_nf4_s]}" \
    -v p="${j[job_plain_s]}" -v pf="${j[py_fp8_s]}" -v pn="${j[py_nf4_s]}" \
    -v pk="${j[peak_host_fp8]}" -v rd="${j[readers]}" -v reps="$REPS" 'BEGIN {
  g = 1e9
  printf "warm_load quantize: %.2f GB of bf16 weights in 2 shards to the host device, page cache warm, best of %d\n", b / g, reps
  printf "  warm_load quantize=fp8          %7.3f s  %6.2f GB/s in (%d readers, peak host %.0f MB)\n", f, b / g / f, rd, pk / 1e6
  printf "  load_file + torch FP8 recipe    %7.3f s  %6.2f GB/s\n", pf, b / g / pf
  printf "  warm_load quantize=nf4          %7.3f s  %6.2f GB/s in\n", n, b / g / n
  printf "  load_file + bnb quantize_4bit   %7.3f s  %6.2f GB/s\n", pn, b / g / pn
  printf "  warm_load without quantize      %7.3f s  %6.2f GB/s\n", p, b / g / p
  printf "  ratio fp8 job vs torch recipe:   %.2fx (goal >= 1.0)\n", pf / f
  printf "  ratio nf4 job vs bitsandbytes:   %.2fx (goal >= 1.0)\n", pn / n
  printf "  quantizing costs: fp8 %.2fx, nf4 %.2fx the plain load time\n", f / p, n / p
}'
