# warm_load_lib.sh - what the warm_load benches share (sourced, not run):
#   warm_bench_model DIR GB   two safetensors shards (fp16 4096x4096 blocks
#                             and f32 norms) totalling GB GiB, as a
#                             checkpoint's layers look (needs $PY)
#   warm_bench_server WORK    a release modelprepd on an ephemeral port with
#                             WORK as model root; sets srv_pid and base
#   warm_bench_workdir NAME   a fresh $BENCH_DIR/NAME.XXXXXX as $work, removed
#                             (and the server stopped) when the bench exits

warm_bench_model() {
  mkdir -p "$1"
  "$PY" - "$1" "$2" <<'PYEOF'
import sys, numpy as np
from safetensors.numpy import save_file
d, gb = sys.argv[1], float(sys.argv[2])
rng = np.random.default_rng(0)
block = rng.integers(0, 65535, 16 * 2**20, dtype=np.uint16)
i = 0
for shard in (1, 2):
    ts, total = {}, 0
    while total < gb * 2**30 / 2:
        ts["model.layers.%d.mlp.w" % i] = block.view(np.float16).reshape(4096, 4096).copy()
        ts["model.layers.%d.norm" % i] = np.ones(4096, np.float32)
        total += 32 * 2**20 + 4096 * 4
        i += 1
    save_file(ts, "%s/model-0000%d-of-00002.safetensors" % (d, shard), metadata={"format": "pt"})
PYEOF
}

warm_bench_server() {
  local work=$1
  "$BUILD/modelprepd" --listen 127.0.0.1:0 --data-dir "$work/data" --model-root "$work" \
    --devices host --no-access-log > "$work/srv.out" 2> "$work/srv.log" &
  srv_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/srv.out" 2>/dev/null && break; sleep 0.1; done
  base=$(sed -n 's/^listening on //p' "$work/srv.out")
  [ -n "$base" ] || { echo "modelprepd did not start"; cat "$work/srv.log"; return 1; }
}

warm_bench_workdir() {
  work=$(mktemp -d "${BENCH_DIR:-/tmp}/$1.XXXXXX")
  srv_pid=
  trap 'if [ -n "$srv_pid" ]; then kill "$srv_pid" 2>/dev/null; wait "$srv_pid" 2>/dev/null; fi; rm -rf "$work"' EXIT
}
