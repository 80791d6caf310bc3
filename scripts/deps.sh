#!/usr/bin/env bash
# Installs what one use of the repository needs, and nothing twice. Debian 12
# (bookworm) is the supported system.
#
#   scripts/deps.sh [run]   build and run modelprepd: compiler, pkg-config and
#                           the -dev libraries. No Python, no PyPI: this is all a
#                           GPU node that only serves needs (`make run`).
#   scripts/deps.sh test    run + what the test suites use (`make test`): the
#                           Debian packages of scripts/deps-extra.txt marked
#                           "test", then .venv (Debian's Python with its torch
#                           and numpy, plus scripts/requirements.txt from PyPI).
#   scripts/deps.sh bench   test + the "bench" packages (`make bench`).
#   scripts/deps.sh cuda    run + the "cuda" packages (scripts/gpu-check.sh).
#
# Idempotent: a package already installed is not touched, apt-get update runs
# only when something is missing, and the venv is rebuilt only when
# scripts/requirements.txt changes. Safe to run on every make. With
# DEPS_DRY_RUN=1 it only prints what the use needs.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-run}
case "$what" in
run | test | bench | cuda) ;;
*)
  echo "usage: scripts/deps.sh [run|test|bench|cuda]" >&2
  exit 2
  ;;
esac

# What building and running need: nothing else is installed for `make run`.
DEB_PKGS=(build-essential pkg-config libmicrohttpd-dev libjansson-dev
  libcurl4-openssl-dev libsqlite3-dev libssl-dev libhiredis-dev)

# scripts/deps-extra.txt: "GROUPS PACKAGE" per line, GROUPS comma-separated.
# bench takes the test packages too.
groups=",$what,"
[ "$what" = bench ] && groups=",test,bench,"
while read -r g p _; do
  [ -z "${g:-}" ] || [ "${g#\#}" != "$g" ] && continue
  case ",$g," in *",test,"* | *",bench,"* | *",cuda,"*) ;; *)
    echo "deps: bad group '$g' in scripts/deps-extra.txt" >&2
    exit 2
    ;;
  esac
  for one in ${g//,/ }; do
    case "$groups" in *",$one,"*)
      DEB_PKGS+=("$p")
      break
      ;;
    esac
  done
done <scripts/deps-extra.txt

# DEPS_DRY_RUN=1: say what this use needs and change nothing (tests/py/test_deps.py).
if [ -n "${DEPS_DRY_RUN:-}" ]; then
  echo "packages: ${DEB_PKGS[*]}"
  if [ "$what" = run ] || [ "$what" = cuda ]; then echo "venv: no"; else echo "venv: yes"; fi
  exit 0
fi

missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps ($what): installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # Packages such as prometheus (wanted for promtool only) start a daemon when
  # installed; policy-rc.d forbids that for the length of this install.
  policy=/usr/sbin/policy-rc.d
  own_policy=false
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=true
  fi
  trap 'if [ "$own_policy" = true ]; then $SUDO rm -f "$policy"; fi' EXIT
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  # ... and on a systemd host it would start at the next boot: not ours to run.
  for p in "${missing[@]}"; do
    if [ "$p" = prometheus ] && command -v systemctl >/dev/null &&
      [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  done
fi

[ "$what" = run ] || [ "$what" = cuda ] && exit 0

# The venv uses Debian's interpreter so that python3-numpy and selenium are importable.
VENV=.venv
REQ=scripts/requirements.txt
stamp="$VENV/.req-$(sha256sum "$REQ" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if [ ! -f "$stamp" ]; then
  echo "deps ($what): installing the Python test producers into $VENV (PyPI)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  rm -f "$VENV"/.req-*
  touch "$stamp"
fi
