# hub_bench_lib.sh - what the download benches share (sourced, not run):
# building the C test hub and our fetcher from sources, making a repo of 4
# incompressible safetensors files, and starting the hub.
#   hub_bench_workdir NAME        a fresh $BENCH_DIR/NAME.XXXXXX as $work, removed
#                                 (and the hub stopped) when the bench exits
#   hub_bench_build WORK          -> WORK/testhub, WORK/hub_fetch
#   hub_bench_repo WORK GB        -> WORK/repos/bench/model, prints total bytes
#   hub_bench_start WORK [ARGS]   -> sets hub_pid and url (ARGS: testhub flags)

hub_bench_workdir() {
  work=$(mktemp -d "${BENCH_DIR:-/tmp}/$1.XXXXXX")
  hub_pid=
  trap 'if [ -n "$hub_pid" ]; then kill "$hub_pid" 2>/dev/null; fi; rm -rf "$work"' EXIT
}

hub_bench_build() {
  local work=$1 pkgs="libmicrohttpd jansson libcurl openssl" cf libs
  cf="-std=c11 -O2 -D_GNU_SOURCE -DMP_VERSION=\"bench\" -I. $(pkg-config --cflags $pkgs)"
  libs="$(pkg-config --libs $pkgs) -lm -pthread"
  # Built from sources here so the benches need nothing else of the tree.
  cc $cf tests/helpers/testhub.c util/fsutil.c util/error.c $libs -o "$work/testhub"
  cc $cf tests/helpers/hub_fetch.c loader/hub/hub_select.c loader/hub/hub_cache.c \
    loader/hub/hub_http.c loader/hub/hub_transfer.c loader/hub/hub_download.c util/fsutil.c \
    util/error.c util/timeutil.c $libs -o "$work/hub_fetch"
}

hub_bench_repo() {
  local work=$1 gb=$2 repo="$1/repos/bench/model" per_mb i
  mkdir -p "$repo"
  per_mb=$(( gb * 1024 / 4 ))
  for i in 1 2 3 4; do
    # incompressible bytes; openssl's CSPRNG is much faster than /dev/urandom
    openssl rand -out "$repo/model-0000$i-of-00004.safetensors" $(( per_mb * 1024 * 1024 ))
  done
  cat "$repo"/* > /dev/null  # the hub reads from the page cache in every run
  cat "$repo"/*.safetensors | wc -c
}

hub_bench_start() {
  local work=$1
  shift
  "$work/testhub" "$@" "$work/repos" > "$work/hub.out" 2> "$work/hub.err" &
  hub_pid=$!
  for _ in $(seq 100); do [ -s "$work/hub.out" ] && break; sleep 0.1; done
  url=$(head -1 "$work/hub.out" | sed 's/^listening on //')
  [ -n "$url" ] || { echo "testhub did not start"; cat "$work/hub.err"; return 1; }
}
