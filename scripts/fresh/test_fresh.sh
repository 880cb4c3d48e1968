#!/usr/bin/env bash
# `make test-fresh`: the README's two commands on a bare Debian 12 machine, as a new user runs them.
#
# Why: this machine and CI's keep what earlier sessions installed, so a green `make test` here
# says nothing about a new user's machine. This builds a bare bookworm root (minbase + python3,
# python3-venv, make, git, ca-certificates) from Debian's registry, clones the committed repo
# into it (with ../shared beside it, as CI has), and inside it with chroot runs `make test`, then
# `make demo` and one caption. Nothing else is installed first: the project's own set-up must do
# it all. Needs root (debootstrap, chroot, mounts).
# Env: FRESH_ROOT (default /var/tmp/blip2-fresh-root), KEEP_ROOT=1 keeps it afterwards,
# EXTRA_CA_DIR (CAs the bare machine trusts, default the host's /usr/local/share/ca-certificates:
# a machine behind the same TLS-intercepting gateway would trust them too).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
root="${FRESH_ROOT:-/var/tmp/blip2-fresh-root}"
export EXTRA_CA_DIR="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
start=$(date +%s)
stamp() { echo "[test-fresh +$(($(date +%s) - start)) s] $*"; }

"$repo/scripts/setup/system_deps.sh" fresh
cleanup() {
  for m in dev/shm dev/pts dev sys proc; do
    mountpoint -q "$root/$m" && umount -l "$root/$m" || true
  done
  if [ "${KEEP_ROOT:-0}" != 1 ]; then rm -rf "$root" "$root.debootstrap.log"; fi
}
trap cleanup EXIT

stamp "building the bare root"
"$repo/scripts/setup/debian_root.sh" "$root" python3,python3-venv,make,git,ca-certificates

stamp "cloning $(git -C "$repo" rev-parse --short HEAD) (committed work only) into the root"
git clone --quiet --no-local "$repo" "$root/root/work/main"
if [ -d "$repo/../shared" ]; then cp -r "$repo/../shared" "$root/root/work/shared"; fi

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount -t devpts devpts "$root/dev/pts" -o newinstance,ptmxmode=0666 || true
mount -t tmpfs -o size=2g tmpfs "$root/dev/shm"

# A clean environment: only what a login shell on such a machine would have (plus the CA
# bundle variable, as this host sets it for its gateway).
inside() {
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb CI="${CI:-}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    /bin/bash -c "$1"
}

stamp "inside: python3 $(inside 'python3 --version'); no uv, redis, haproxy or chromium yet:"
inside 'for c in uv redis-server haproxy chromium; do command -v $c || echo "  $c: absent"; done'

stamp "inside: make test"
inside 'cd /root/work/main && make test'
stamp "make test passed"

stamp "inside: make demo, then one caption"
inside 'cd /root/work/main && (make demo PORT=7790 >/tmp/demo.log 2>&1 &) && python3 - <<PY
import json, sys, time, urllib.request
base = "http://127.0.0.1:7790"
for _ in range(600):
    try:
        if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
            break
    except Exception:
        time.sleep(1)
else:
    sys.exit("demo never became healthy:\n" + open("/tmp/demo.log").read()[-3000:])
path = "/root/work/main/models/tiny-shapes/samples/two-red-circles.png"
body = json.load(urllib.request.urlopen(base + "/analyze?file=" + path, timeout=60))
print(json.dumps(body))
text = body["predictions"][0]["text"]
assert body["status"] == "success" and "red circles" in text, body
print("caption:", text)
PY'
# Stop the demo: the processes whose root is the bare root (no procps inside minbase).
for pid in $(pgrep -f "REST.py --port 7790" || true); do
  [ "$(readlink "/proc/$pid/root")" = "$root" ] && kill -TERM "$pid" || true
done
sleep 3
stamp "PASSED: make test, make demo and a caption on a bare Debian 12 root"
