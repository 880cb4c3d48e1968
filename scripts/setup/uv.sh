#!/usr/bin/env bash
# Run uv (or print its path), bootstrapping a private copy when none is on PATH.
#
# Why: `python3 -m pip install uv` is refused by the system Python of Debian 12 and Ubuntu
# 23.04+ (PEP 668, externally managed). A uv already on PATH is used as it is; otherwise uv is
# installed into a private virtual environment in the user's cache (never the system Python),
# once per uv version, and reused by every clone.
#   scripts/setup/uv.sh            -> prints the uv command on stdout (progress on stderr)
#   scripts/setup/uv.sh ARGS...    -> runs uv ARGS... (what the Makefile does)
set -euo pipefail

found() {
  if [ "$#" -gt 1 ]; then exec "$@"; fi
  echo "$1"
  exit 0
}

UV_VERSION="${UV_VERSION:-0.13.9}"
if command -v uv >/dev/null 2>&1; then
  found "$(command -v uv)" "$@"
fi

cache="${XDG_CACHE_HOME:-${HOME:-}/.cache}"
[ -n "${HOME:-}" ] || cache="$(cd "$(dirname "$0")/../.." && pwd)/.cache"
home="${UV_HOME:-$cache/blip2-caption-service/uv-$UV_VERSION}"
uv="$home/bin/uv"
if [ -x "$uv" ]; then
  found "$uv" "$@"
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found. Install Python 3.11 with venv (Debian/Ubuntu: apt-get install python3 python3-venv)." >&2
  exit 1
fi
echo "bootstrapping uv $UV_VERSION into $home (a private venv; the system Python is untouched)" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ! "$python" -m venv "$work/venv" >&2; then
  echo "error: '$python -m venv' failed. Install the venv module (Debian/Ubuntu: apt-get install python3-venv), or put uv on PATH." >&2
  exit 1
fi
# pip ignores SSL_CERT_FILE; hand it the same bundle (a TLS-intercepting proxy's CA, say).
if [ -n "${SSL_CERT_FILE:-}" ] && [ -z "${PIP_CERT:-}" ]; then export PIP_CERT="$SSL_CERT_FILE"; fi
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2
# uv is one static binary: keep just it, put in place atomically (parallel makes are safe).
mkdir -p "$home/bin"
cp "$work/venv/bin/uv" "$home/bin/uv.$$"
mv -f "$home/bin/uv.$$" "$uv"
"$uv" --version >&2
rm -rf "$work"
found "$uv" "$@"
