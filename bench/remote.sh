#!/usr/bin/env bash
# Remote stores over loopback (bench/remote_bench.py does the work):
#   - download of a BENCH_REMOTE_MB (default 1024) MiB, 4-object prefix from
#     moto's standalone S3 server: our download job (release build, ranged
#     GETs on BENCH_CONN connections, sha256 + fsync included) vs boto3
#     download_file of the 4 objects one after another, and vs boto3's
#     TransferManager fetching them in parallel (what `aws s3 cp --recursive`
#     does). Goals: >= 2x the sequential, >= 1x the parallel.
#   - publish of the same size of safetensors to redis-server in SGLang's
#     layout (tp 1, checkpoint names) vs a Python script doing what SGLang's
#     RemoteModelLoader.save_model does with redis-py. Goal: >= 2x.
# Each figure is the best of BENCH_REPS (default 2) runs, printed as ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "${BUILD:-build}/modelprepd" ] || make -s all
command -v redis-server >/dev/null || { echo "remote: redis-server missing (scripts/deps.sh)"; exit 1; }
exec "$PY" bench/remote_bench.py
