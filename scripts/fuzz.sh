#!/usr/bin/env bash
# libFuzzer targets for the weight-file readers.
#
#   fuzz.sh build     build $BUILD/fuzz/fuzz_<reader> for every tests/fuzz/fuzz_*.c
#   fuzz.sh smoke     build, then run each target FUZZ_SECONDS (default 10, less
#                     when there are more than 6 targets) seconds
#                     from its seed corpus (tests/fuzz/corpus/<reader>/, copied);
#                     called by `make test`
#   fuzz.sh run NAME [libFuzzer args...]   run one target for as long as you like
#
# All core sources (util store loader gpu handlers server, minus server/main.c)
# are compiled once with clang -fsanitize=fuzzer-no-link,address,undefined into
# $BUILD/fuzz/libmodelprep-fuzz.a; a target links only what it uses. Objects
# are rebuilt when their source or any header is newer. Crashes are written
# to $BUILD/fuzz/crashes/.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
OUT=$BUILD/fuzz
CC=${FUZZ_CC:-clang}
# ~10 s per target, but the whole smoke stays near a minute as targets are added
ntargets=$(ls tests/fuzz/fuzz_*.c 2>/dev/null | wc -l)
each=10
[ "$ntargets" -gt 6 ] && each=$((60 / ntargets))
[ "$each" -lt 4 ] && each=4
SECONDS_EACH=${FUZZ_SECONDS:-$each}
JOBS=${FUZZ_JOBS:-2}
mode=${1:-build}

if ! command -v "$CC" >/dev/null 2>&1; then
  echo "fuzz: $CC not found (apt-get install clang)" >&2
  exit 1
fi

PKGS="libmicrohttpd jansson libcurl sqlite3 openssl hiredis"
PKG_CFLAGS=$(pkg-config --cflags $PKGS 2>/dev/null || true)
PKG_LIBS=$(pkg-config --libs $PKGS 2>/dev/null || echo "-ljansson -lcurl -lsqlite3 -lssl -lcrypto -lmicrohttpd -lhiredis")
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
CFLAGS="-std=c11 -D_GNU_SOURCE -DMP_VERSION=\"fuzz\" -DMP_GIT=\"fuzz\" -I. $PKG_CFLAGS -pthread -g -O1 $SAN"

build() {
  mkdir -p "$OUT/obj" "$OUT/gen" "$OUT/crashes"
  local srcs=() s
  while IFS= read -r s; do
    [ "$s" != server/main.c ] && srcs+=("$s")
  done < <(find util store loader gpu handlers server -name '*.c' | sort)
  # generated assets, as the Makefile does, so handler objects link
  if [ -f scripts/embed.sh ]; then
    local assets=(web/* openapi/openapi.yaml) a=()
    for s in "${assets[@]}"; do [ -f "$s" ] && a+=("$s"); done
    local gen="$OUT/gen/assets.c" stale=0
    [ -f "$gen" ] || stale=1
    for s in "${a[@]}"; do [ "$s" -nt "$gen" ] && stale=1; done
    [ $stale = 1 ] && bash scripts/embed.sh "$gen" "${a[@]}"
    srcs+=("$gen")
  fi
  # newest header anywhere: an object older than it is rebuilt
  local newest_h
  newest_h=$(find util store loader gpu handlers server -name '*.h' -printf '%T@ %p\n' 2>/dev/null |
    sort -n | tail -1 | cut -d' ' -f2-)
  local todo=() objs=() o
  for s in "${srcs[@]}"; do
    o="$OUT/obj/${s#"$OUT/"}"; o="${o%.c}.o"
    objs+=("$o")
    if [ ! -f "$o" ] || [ "$s" -nt "$o" ] || { [ -n "$newest_h" ] && [ "$newest_h" -nt "$o" ]; }; then
      todo+=("$s")
    fi
  done
  if [ ${#todo[@]} -gt 0 ]; then
    echo "fuzz: compiling ${#todo[@]} core sources with $CC"
    export CC CFLAGS OUT
    printf '%s\n' "${todo[@]}" | xargs -P "$JOBS" -I{} bash -c '
      s={}; o="$OUT/obj/${s#"$OUT/"}"; o="${o%.c}.o"; mkdir -p "$(dirname "$o")"
      $CC $CFLAGS -fsanitize=fuzzer-no-link -c "$s" -o "$o" || { echo "fuzz: failed: $s" >&2; exit 255; }'
    rm -f "$OUT/libmodelprep-fuzz.a"
  fi
  if [ ! -f "$OUT/libmodelprep-fuzz.a" ]; then
    ar rcs "$OUT/libmodelprep-fuzz.a" "${objs[@]}"
  fi
  local t name
  for t in tests/fuzz/fuzz_*.c; do
    [ -e "$t" ] || continue
    name=$(basename "$t" .c)
    if [ ! -x "$OUT/$name" ] || [ "$t" -nt "$OUT/$name" ] || [ "$OUT/libmodelprep-fuzz.a" -nt "$OUT/$name" ]; then
      $CC $CFLAGS -fsanitize=fuzzer "$t" "$OUT/libmodelprep-fuzz.a" $PKG_LIBS -lm -ldl -o "$OUT/$name"
    fi
  done
}

run_one() {
  local name=$1; shift
  local reader=${name#fuzz_}
  local corpus
  corpus=$(mktemp -d "${TMPDIR:-/tmp}/fuzz_$reader.XXXXXX")
  [ -d "tests/fuzz/corpus/$reader" ] && cp -r "tests/fuzz/corpus/$reader/." "$corpus/"
  local dict=()
  [ -f "tests/fuzz/$reader.dict" ] && dict=(-dict="tests/fuzz/$reader.dict")
  local rc=0
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1} \
    "$OUT/$name" -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$OUT/crashes/$name-" \
    "${dict[@]}" "$@" "$corpus" || rc=$?
  rm -rf "$corpus"
  return $rc
}

case "$mode" in
  build)
    build
    ls "$OUT"/fuzz_* 2>/dev/null | sed 's/^/fuzz: built /'
    ;;
  smoke)
    build
    failed=()
    for t in tests/fuzz/fuzz_*.c; do
      [ -e "$t" ] || continue
      name=$(basename "$t" .c)
      echo "fuzz: $name for ${SECONDS_EACH}s"
      if ! run_one "$name" -max_total_time="$SECONDS_EACH" -print_final_stats=0 >"$OUT/$name.log" 2>&1; then
        tail -40 "$OUT/$name.log" >&2
        failed+=("$name")
      else
        grep -E '^#[0-9]+.*DONE|Done [0-9]+ runs' "$OUT/$name.log" | tail -1 | sed "s/^/fuzz: $name: /" || true
      fi
    done
    if [ ${#failed[@]} -gt 0 ]; then
      echo "fuzz smoke: FAILED: ${failed[*]} (inputs in $OUT/crashes/)" >&2
      exit 1
    fi
    echo "fuzz smoke: ok"
    ;;
  run)
    [ $# -ge 2 ] || { echo "usage: fuzz.sh run fuzz_<reader> [libFuzzer args]" >&2; exit 2; }
    build
    name=$2; shift 2
    run_one "$name" "$@"
    ;;
  *)
    echo "usage: fuzz.sh build|smoke|run NAME [args]" >&2
    exit 2
    ;;
esac
