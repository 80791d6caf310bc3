#!/usr/bin/env bash
# warm_load to the host backend, page cache warm, a two-shard safetensors
# checkpoint of BENCH_GB (default 2) GB. First as a user measures it
# (bench/warm_load_job.py): the wall time of a warm_load job on a release
# modelprepd (submit -> succeeded, polled every 5 ms, keep_resident false)
# vs safetensors.torch.load_file + .clone() of every tensor and vs read()
# into fresh and into pre-faulted memory, interleaved, best of BENCH_REPS.
# Goals: >= 1.5x load_file+clone, >= 0.9x read() into fresh memory.
# Then the loader alone, in process: the loader
# (headers, plan, arena allocation, reader threads, free) vs a plain
# sequential read() of the same files into a pre-faulted buffer, measured in
# the same process. Goal: >= 0.9x plain read. Also prints the staged path
# (pinned ring + copies, what a GPU load does) for reference. Makes a
# checkpoint in $BENCH_DIR (default /tmp) and deletes it.
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
srv_pid=
cleanup() {
  [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

make -s BUILD="$BUILD" "$BUILD/libmodelprep.a" >/dev/null
PKGS="libmicrohttpd jansson libcurl sqlite3 openssl"
cc -std=c11 -O2 -D_GNU_SOURCE -I. $(pkg-config --cflags $PKGS) bench/warm_load_bench.c \
  "$BUILD/libmodelprep.a" $(pkg-config --libs $PKGS) -lm -pthread -ldl -o "$work/warm_load_bench"
cc -std=c11 -O2 -D_GNU_SOURCE bench/warm_load_read.c -o "$work/warm_load_read"
make -s BUILD="$BUILD" "$BUILD/modelprepd" >/dev/null

. bench/warm_load_lib.sh
warm_bench_model "$work/model" "$GB"
shards=("$work"/model/*.safetensors)
cat "${shards[@]}" >/dev/null
cat "${shards[@]}" >/dev/null

# --- the job, as a user measures it --------------------------------------------
warm_bench_server "$work"
declare -A j
while read -r k v; do j[$k]=$v; done < <("$PY" bench/warm_load_job.py "$base" "$work/model" \
  "$work/warm_load_read" "$REPS" "${shards[@]}")
kill "$srv_pid"; wait "$srv_pid" 2>/dev/null || true; srv_pid=
awk -v b="${j[job_bytes]}" -v job="${j[job_s]}" -v cl="${j[clone_s]}" -v fr="${j[fresh_s]}" \
    -v pf="${j[prefault_s]}" -v jw="${j[job_worst_s]}" -v cw="${j[clone_worst_s]}" \
    -v fw="${j[fresh_worst_s]}" -v pw="${j[prefault_worst_s]}" -v al="${j[job_alloc_s]}" \
    -v pi="${j[job_pipeline_s]}" -v to="${j[job_total_s]}" -v reps="$REPS" \
    -v j1="${j[job_first_s]}" 'BEGIN {
  g = 1e9
  printf "warm_load job: %.2f GB in 2 safetensors shards to the host device, page cache warm, best of %d (worst in brackets)\n", b / g, reps
  printf "  warm_load job wall time (submit..succeeded) %7.3f s [%.3f]  %6.2f GB/s\n", job, jw, b / g / job
  printf "    its timings: alloc_s %.3f, pipeline_s %.3f, total_s %.3f; outside total_s %.3f\n", al, pi, to, job - to
  printf "  first job of the server (no pooled arena)    %5.3f s             %6.2f GB/s\n", j1, b / g / j1
  printf "  load_file + clone (Python)                  %7.3f s [%.3f]  %6.2f GB/s\n", cl, cw, b / g / cl
  printf "  read() into fresh memory                    %7.3f s [%.3f]  %6.2f GB/s\n", fr, fw, b / g / fr
  printf "  read() into pre-faulted memory              %7.3f s [%.3f]  %6.2f GB/s\n", pf, pw, b / g / pf
  printf "  ratio job vs load_file+clone:   %.2fx (goal >= 1.5)\n", cl / job
  printf "  ratio job vs read() fresh:      %.2fx (goal >= 0.9)\n", fr / job
  printf "  ratio job vs read() pre-faulted: %.2fx\n", pf / job
  printf "  first job: %.2fx load_file+clone, %.2fx read() fresh\n", cl / j1, fr / j1
}'

# --- the loader in process -------------------------------------------------------
declare -A r
while read -r k v; do r[$k]=$v; done < <("$work/warm_load_bench" "$work/model" "$REPS" "${shards[@]}")
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
