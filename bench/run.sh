#!/usr/bin/env bash
# make bench: every bench/<area>.sh in turn. Each prints its own figures as
# ratios against a peer or a physical limit measured in the same run.
# BENCH_ONLY=api,formats_st runs a subset. Benchmarks are never part of make test.
set -uo pipefail
cd "$(dirname "$0")/.."
export BUILD=${BUILD:-build}
export BENCH_DIR=${BENCH_DIR:-/tmp/modelprep-bench}
mkdir -p "$BENCH_DIR"
rc=0
for b in bench/*.sh; do
  name=$(basename "$b" .sh)
  [ "$name" = run ] && continue
  case "$name" in *_gpu) continue ;; *_lib) continue ;; esac # GPU benches: scripts/gpu-check.sh; *_lib: sourced
  if [ -n "${BENCH_ONLY:-}" ] && [[ ",$BENCH_ONLY," != *",$name,"* ]]; then continue; fi
  echo "=== bench: $name"
  bash "$b" || { echo "bench $name failed"; rc=1; }
done
exit $rc
