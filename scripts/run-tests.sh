#!/usr/bin/env bash
# Runs the suites of `make test`: the layering check (scripts/check_layers.py),
# cmocka unit tests, cmocka+libcurl
# integration tests against the real (sanitized) modelprepd, the fuzz smoke
# runs, and the pytest suite that cross-checks against the real producers
# (torch, safetensors, gguf, huggingface_hub). Prints one closing line.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
export MODELPREP_BUILD="$PWD/$BUILD"
export MODELPREPD="$PWD/$BUILD/asan/modelprepd"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export CMOCKA_MESSAGE_OUTPUT=STDOUT
what=${1:-all}
pass=0; fail=0; failed=()

run_bin() {
  local b=$1
  echo "== $b"
  if "$b"; then pass=$((pass+1)); else fail=$((fail+1)); failed+=("$b"); fi
}

if [ "$what" = all ] || [ "$what" = layers ]; then
  # The dependency rules of ARCHITECTURE.md: includes and module cycles.
  echo "== layers"
  if python3 scripts/check_layers.py; then pass=$((pass+1)); else fail=$((fail+1)); failed+=("layers"); fi
fi
if [ "$what" = all ] || [ "$what" = unit ]; then
  for b in "$BUILD"/asan/tests/unit/test_*; do [ -x "$b" ] && run_bin "$b"; done
fi
if [ "$what" = all ] || [ "$what" = integration ]; then
  for b in "$BUILD"/asan/tests/integration/test_*; do [ -x "$b" ] && run_bin "$b"; done
fi
if [ "$what" = all ] || [ "$what" = fuzz ]; then
  if [ -x scripts/fuzz.sh ] || [ -f scripts/fuzz.sh ]; then
    echo "== fuzz smoke"
    if bash scripts/fuzz.sh smoke; then pass=$((pass+1)); else fail=$((fail+1)); failed+=("fuzz smoke"); fi
  fi
fi
if [ "$what" = all ] || [ "$what" = py ]; then
  if ls tests/py/test_*.py >/dev/null 2>&1; then
    echo "== pytest"
    # Sanitized binaries under a Python parent: ASan must not see Python's leaks.
    if .venv/bin/python -m pytest -q -p no:cacheprovider tests/py; then pass=$((pass+1)); else fail=$((fail+1)); failed+=("pytest"); fi
  fi
fi
echo
[ ${#failed[@]} -gt 0 ] && printf 'FAILED: %s\n' "${failed[@]}"
echo "suites: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
