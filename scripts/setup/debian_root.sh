#!/usr/bin/env bash
# Build a bare Debian 12 (bookworm) root in a folder, from Debian's registry, with debootstrap.
#
# Why: the machines the project is developed on keep what earlier sessions installed, so the
# only honest proof of "nothing installed by hand first" is a root that starts from minbase.
# The same root, with Python as /usr/local/bin/python, stands in for python:3.11-slim when no
# image registry answers (python:3.11-slim is itself built on bookworm).
#   scripts/setup/debian_root.sh ROOT PACKAGE,PACKAGE,...
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBOOTSTRAP_CACHE (a folder of
# .debs shared between runs), EXTRA_CA_DIR (CA certificates to trust inside, e.g. a TLS-
# intercepting gateway's; default none).
set -euo pipefail
root="$1"
packages="$2"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache="${DEBOOTSTRAP_CACHE:-/var/cache/blip2-debootstrap}"

if [ "$(id -u)" -ne 0 ]; then
  echo "error: debootstrap needs root" >&2
  exit 1
fi
mkdir -p "$cache"
rm -rf "$root"
mkdir -p "$root"
echo "debootstrap bookworm (minbase + $packages) into $root"
start=$(date +%s)
debootstrap --variant=minbase --include="$packages" --cache-dir="$cache" \
  bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
  tail -20 "$root.debootstrap.log" >&2
  exit 1
}
echo "debootstrap took $(($(date +%s) - start)) s"

if [ -n "${EXTRA_CA_DIR:-}" ] && ls "$EXTRA_CA_DIR"/*.crt >/dev/null 2>&1; then
  echo "trusting the CA certificates of $EXTRA_CA_DIR inside the root"
  cp "$EXTRA_CA_DIR"/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
# Name resolution inside the root, as a real machine has it (debootstrap writes neither file).
cp /etc/resolv.conf "$root/etc/resolv.conf"
[ -s "$root/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
  >"$root/etc/hosts"
