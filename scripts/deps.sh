#!/usr/bin/env bash
# Installs what building and testing modelprep needs, and nothing twice:
# Debian packages that are missing, then a Python venv (.venv) that sees
# Debian's torch/numpy and holds the PyPI producers the tests compare with.
# Safe to run on every `make run` / `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PKGS=(build-essential pkg-config libmicrohttpd-dev libjansson-dev
  libcurl4-openssl-dev libsqlite3-dev libssl-dev libcmocka-dev
  python3 python3-venv python3-pip python3-torch python3-numpy
  clang libclang-rt-14-dev wrk)
# Extra packages a stage asks for (dashboard browser tests, prometheus checks).
if [ -f scripts/deps-extra.txt ]; then
  while read -r p; do [ -n "$p" ] && [ "${p#\#}" = "$p" ] && DEB_PKGS+=("$p"); done < scripts/deps-extra.txt
fi

missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv uses Debian's interpreter so that python3-torch is importable.
VENV=.venv
REQ=scripts/requirements.txt
stamp="$VENV/.req-$(sha256sum "$REQ" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if [ ! -f "$stamp" ]; then
  echo "deps: installing Python test producers into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  rm -f "$VENV"/.req-*
  touch "$stamp"
fi
