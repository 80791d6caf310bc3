#!/usr/bin/env bash
# API throughput: wrk with 64 connections against GET /v1/jobs?limit=50 and
# POST /v1/jobs (verify jobs on a tiny directory), on the release build.
# Goal on 2 cores: >= 10,000 GET/s, submit p99 <= 5 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
D=$(mktemp -d "${BENCH_DIR:-/tmp}/api.XXXXXX")
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$D"' EXIT
mkdir -p "$D/models/tiny"
echo '{"model_type":"llama"}' > "$D/models/tiny/config.json"
head -c 4096 /dev/urandom > "$D/models/tiny/w.bin"
"$BUILD/modelprepd" --listen 127.0.0.1:0 --data-dir "$D/data" --model-root "$D/models" \
  --no-access-log > "$D/out" 2> "$D/log" &
PID=$!
for _ in $(seq 100); do grep -q listening "$D/out" 2>/dev/null && break; sleep 0.1; done
BASE=$(sed -n 's/^listening on //p' "$D/out")
# Seed 200 jobs so a page of 50 is full.
for i in $(seq 200); do
  curl -s -o /dev/null -X POST "$BASE/v1/jobs" -H 'Content-Type: application/json' \
    -d "{\"type\":\"verify\",\"model\":\"$D/models/tiny\"}"
done
sleep 2
cat > "$D/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"type":"verify","model":"$D/models/tiny"}'
done = function(summary, latency, requests)
  io.write(string.format("p99_ms %.3f\n", latency:percentile(99) / 1000))
end
LUA
cat > "$D/get.lua" <<LUA
done = function(summary, latency, requests)
  io.write(string.format("p99_ms %.3f\n", latency:percentile(99) / 1000))
end
LUA
echo "--- GET /v1/jobs?limit=50 (64 connections, 10 s)"
wrk -t2 -c64 -d10s -s "$D/get.lua" "$BASE/v1/jobs?limit=50" | tee "$D/get.txt"
echo "--- POST /v1/jobs (64 connections, 10 s)"
wrk -t2 -c64 -d10s -s "$D/post.lua" "$BASE/v1/jobs" | tee "$D/post.txt"
# The same below saturation: a closed loop of 64 connections on 2 cores that
# also run every submitted job measures queueing, not the submit path.
echo "--- POST /v1/jobs (4 connections, 10 s)"
wrk -t2 -c4 -d10s -s "$D/post.lua" "$BASE/v1/jobs" | tee "$D/post4.txt"
get_rps=$(awk '/Requests\/sec/ {print $2}' "$D/get.txt")
post_rps=$(awk '/Requests\/sec/ {print $2}' "$D/post.txt")
post_p99=$(awk '/p99_ms/ {print $2}' "$D/post.txt")
echo "RESULT api: GET /v1/jobs?limit=50 ${get_rps} req/s (goal 10000, ratio $(awk -v a="$get_rps" 'BEGIN{printf "%.2f", a/10000}'))"
echo "RESULT api: POST /v1/jobs ${post_rps} req/s, p99 ${post_p99} ms (goal <= 5 ms)"
echo "RESULT api: POST /v1/jobs at 4 connections $(awk '/Requests\/sec/ {print $2}' "$D/post4.txt") req/s, p99 $(awk '/p99_ms/ {print $2}' "$D/post4.txt") ms"
