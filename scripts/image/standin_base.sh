#!/usr/bin/env bash
# Stand in for the Dockerfile's base image when no image registry can be reached.
#
# Why: python:3.11-slim is Debian 12 (bookworm) plus Python 3.11 as /usr/local/bin/python. The
# same thing built from Debian's packages lets the real Dockerfile build and run unchanged on a
# host that reaches package registries but no image registry. It is tagged with the base's own
# name and labelled, so every build that uses it says so.
#   scripts/image/standin_base.sh NAME      e.g. python:3.11-slim
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=engine.sh
. "$here/engine.sh"
name="$1"
# A short name means Docker Hub's library; name it fully so local lookups find it for certain.
case "$name" in */*) ;; *) name="docker.io/library/$name" ;; esac
root="${STANDIN_ROOT:-/var/tmp/blip2-standin-root}"

"$here/../setup/debian_root.sh" "$root" python3,python3-venv,ca-certificates
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root/etc/resolv.conf"
tar -C "$root" -c . | "$ENGINE" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --change 'LABEL org.blip2.stand-in="debootstrap bookworm minbase + python3 (not the real base)"' \
  - "$name" >/dev/null
rm -rf "$root"
echo "stand-in base tagged as $name"
