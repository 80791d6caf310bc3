#!/usr/bin/env bash
# Hub download throughput over loopback from our C test hub (release build of
# tests/helpers/testhub: LFS redirects to /cdn, Range, sendfile): a repo of
# 4 safetensors files (BENCH_GB total, default 2) fetched into a fresh cache
#   - by our downloader (hub_download() via tests/helpers/hub_fetch, release
#     build; parallel ranged GETs, sha256-verified, HF cache layout),
#   - by huggingface_hub.snapshot_download (.venv) into a fresh cache,
#   - by curl -L -o of the same files one after another.
# Goals: >= 2x huggingface_hub, >= 1x curl. Best of BENCH_REPS (default 2).
# Ours runs twice: as the server does (every blob fsync'ed before its rename,
# so the figure is bounded by the disk's write speed) and without the fsync,
# which is what curl and huggingface_hub do.
# BENCH_CONN / BENCH_CHUNK set our connections and chunk size.
set -euo pipefail
cd "$(dirname "$0")/.."
GB=${BENCH_GB:-2}
REPS=${BENCH_REPS:-2}
CONN=${BENCH_CONN:-8}
CHUNK=${BENCH_CHUNK:-33554432}
PY=${PY:-.venv/bin/python}
. bench/hub_bench_lib.sh
hub_bench_workdir download
hub_bench_build "$work"
total=$(hub_bench_repo "$work" "$GB")
hub_bench_start "$work"

now() { date +%s.%N; }
best_ours=999999; best_nosync=999999; best_hf=999999; best_curl=999999
min() { awk -v a="$1" -v b="$2" 'BEGIN{print (a<b)?a:b}'; }

for rep in $(seq "$REPS"); do
  # curl, one file after another (the same redirect to /cdn as the others)
  rm -rf "$work/curl"; mkdir -p "$work/curl"; sync
  t0=$(now)
  for i in 1 2 3 4; do
    f="model-0000$i-of-00004.safetensors"
    curl -sfL -o "$work/curl/$f" "$url/bench/model/resolve/main/$f"
  done
  t1=$(now)
  best_curl=$(min "$best_curl" "$(echo "$t1 - $t0" | bc -l)")
  rm -rf "$work/curl"

  # huggingface_hub, timed inside Python so interpreter start-up is not counted
  rm -rf "$work/hf"; sync
  s=$(HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_DISABLE_XET=1 \
      "$PY" - "$url" "$work/hf" <<'PYEOF'
import sys, time
from huggingface_hub import snapshot_download
t = time.perf_counter()
snapshot_download("bench/model", cache_dir=sys.argv[2], endpoint=sys.argv[1])
print(time.perf_counter() - t)
PYEOF
)
  best_hf=$(min "$best_hf" "$s")
  rm -rf "$work/hf"

  # ours
  rm -rf "$work/ours"; sync
  t0=$(now)
  "$work/hub_fetch" --endpoint "$url" --cache "$work/ours" --connections "$CONN" \
    --chunk-bytes "$CHUNK" bench/model > "$work/ours.json"
  t1=$(now)
  best_ours=$(min "$best_ours" "$(echo "$t1 - $t0" | bc -l)")
  grep -q '"commit"' "$work/ours.json" || { cat "$work/ours.json"; exit 1; }
  rm -rf "$work/ours"; sync

  # ours without the fsync of each blob: what curl and huggingface_hub do
  t0=$(now)
  "$work/hub_fetch" --endpoint "$url" --cache "$work/ours" --connections "$CONN" \
    --chunk-bytes "$CHUNK" --no-fsync bench/model > "$work/ours.json"
  t1=$(now)
  best_nosync=$(min "$best_nosync" "$(echo "$t1 - $t0" | bc -l)")
  grep -q '"commit"' "$work/ours.json" || { cat "$work/ours.json"; exit 1; }
  rm -rf "$work/ours"
done

"$PY" - "$total" "$best_ours" "$best_nosync" "$best_hf" "$best_curl" "$CONN" "$CHUNK" <<'PYEOF'
import sys
total, ours, nosync, hf, curl = int(sys.argv[1]), *map(float, sys.argv[2:6])
conn, chunk = sys.argv[6], int(sys.argv[7])
mb = lambda s: total / s / 1e6
print("download %.2f GB in 4 files over loopback (best of runs; %s connections, %d MiB chunks)"
      % (total / 1e9, conn, chunk >> 20))
print("  ours, sha256 verified, blobs fsync'ed (default): %7.3f s  %8.1f MB/s" % (ours, mb(ours)))
print("  ours, sha256 verified, no fsync (like peers):    %7.3f s  %8.1f MB/s" % (nosync, mb(nosync)))
print("  huggingface_hub snapshot_download (no fsync):    %7.3f s  %8.1f MB/s" % (hf, mb(hf)))
print("  curl -L -o, files in sequence (no fsync):        %7.3f s  %8.1f MB/s" % (curl, mb(curl)))
print("  ratio vs huggingface_hub: %.2fx default, %.2fx like-for-like (goal >= 2x)" % (hf / ours, hf / nosync))
print("  ratio vs curl:            %.2fx default, %.2fx like-for-like (goal >= 1x)" % (curl / ours, curl / nosync))
PYEOF
