#!/usr/bin/env bash
# warm_load with a cold page cache: a two-shard safetensors checkpoint of
# BENCH_GB (default 2) GB loaded to the host device by a warm_load job with
# direct_io (O_DIRECT reads, submit -> succeeded, polled every 5 ms) vs
# `dd if=SHARD of=/dev/null iflag=direct bs=16M` of the same files, one
# after another, in the same run, interleaved, best of BENCH_REPS. Goal:
# >= 0.9x dd. Also the same job without direct_io after the page cache was
# dropped (buffered reads with read-ahead), for reference.
# Dropping the page cache needs root (`echo 3 > /proc/sys/vm/drop_caches`);
# without it the buffered figure is skipped and O_DIRECT (which bypasses
# the cache) is the only cold measure.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
GB=${BENCH_GB:-2}
REPS=${BENCH_REPS:-3}
PY=${PY:-.venv/bin/python}
. bench/warm_load_lib.sh
warm_bench_workdir warm_load_cold
make -s BUILD="$BUILD" "$BUILD/modelprepd" >/dev/null

warm_bench_model "$work/model" "$GB"
shards=("$work"/model/*.safetensors)
sync

can_drop=0
if [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then can_drop=1; fi
drop() { if [ "$can_drop" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }

warm_bench_server "$work"

# One job; prints its wall time (and the result's timings to $work/last.json).
job() {
  "$PY" - "$base" "$work/model" "$1" "$work/last.json" <<'PYEOF'
import http.client, json, sys, time, urllib.parse
base, model, dio, out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
u = urllib.parse.urlsplit(base)
c = http.client.HTTPConnection(u.hostname, u.port)
body = json.dumps({"type": "warm_load", "model": model,
                   "params": {"keep_resident": False, "direct_io": dio}})
t0 = time.perf_counter()
c.request("POST", "/v1/jobs", body, {"Content-Type": "application/json"})
doc = json.loads(c.getresponse().read())
while doc["state"] not in ("succeeded", "failed", "cancelled"):
    time.sleep(0.005)
    c.request("GET", "/v1/jobs/" + doc["id"])
    doc = json.loads(c.getresponse().read())
t = time.perf_counter() - t0
if doc["state"] != "succeeded":
    sys.exit("job %s: %s" % (doc["state"], doc.get("error")))
json.dump(doc["result"], open(out, "w"))
print("%.6f" % t)
PYEOF
}
ddall() {
  local t0 t1
  t0=$(date +%s.%N)
  for f in "${shards[@]}"; do dd if="$f" of=/dev/null iflag=direct bs=16M status=none; done
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}
min() { awk -v a="$1" -v b="$2" 'BEGIN{print (a<b)?a:b}'; }
max() { awk -v a="$1" -v b="$2" 'BEGIN{print (a>b)?a:b}'; }

job 1 >/dev/null # the server's first load: the arena pool is warm from here on
best_dd=1e9; best_dio=1e9; best_buf=1e9; worst_dd=0; worst_dio=0; worst_buf=0
for rep in $(seq "$REPS"); do
  for k in 0 1 2; do
    case $(( (rep + k) % 3 )) in
    0) drop; t=$(ddall); best_dd=$(min "$best_dd" "$t"); worst_dd=$(max "$worst_dd" "$t") ;;
    1) drop; t=$(job 1); best_dio=$(min "$best_dio" "$t"); worst_dio=$(max "$worst_dio" "$t")
       [ "$t" = "$best_dio" ] && cp "$work/last.json" "$work/best_dio.json" ;;
    2) [ "$can_drop" = 1 ] || continue
       drop; t=$(job 0); best_buf=$(min "$best_buf" "$t"); worst_buf=$(max "$worst_buf" "$t") ;;
    esac
  done
done
bytes=$(cat "${shards[@]}" | wc -c)
"$PY" - "$bytes" "$best_dd" "$worst_dd" "$best_dio" "$worst_dio" "$best_buf" "$worst_buf" \
  "$can_drop" "$REPS" "$work/best_dio.json" <<'PYEOF'
import json, sys
b = int(sys.argv[1]); dd, ddw, dio, diow, buf, bufw = map(float, sys.argv[2:8])
can_drop, reps = sys.argv[8] == "1", int(sys.argv[9])
tm = json.load(open(sys.argv[10])).get("timings", {})
g = 1e9
print("warm_load cold: %.2f GB in 2 safetensors shards to the host device, %s, best of %d "
      "(worst in brackets)" % (b / g, "page cache dropped before each run" if can_drop
                               else "O_DIRECT only (cannot drop the page cache)", reps))
print("  dd iflag=direct bs=16M, shard after shard  %7.3f s [%.3f]  %6.2f GB/s" % (dd, ddw, b / g / dd))
print("  warm_load job, direct_io                   %7.3f s [%.3f]  %6.2f GB/s" % (dio, diow, b / g / dio))
print("    its timings: read_s %.3f (summed over readers), pipeline_s %.3f, total_s %.3f"
      % (tm.get("read_s", -1), tm.get("pipeline_s", -1), tm.get("total_s", -1)))
if can_drop:
    print("  warm_load job, buffered reads, cold cache  %7.3f s [%.3f]  %6.2f GB/s" % (buf, bufw, b / g / buf))
print("  ratio direct_io job vs dd: %.2fx (goal >= 0.9)" % (dd / dio))
if can_drop:
    print("  ratio buffered job vs dd:  %.2fx" % (dd / buf))
PYEOF
