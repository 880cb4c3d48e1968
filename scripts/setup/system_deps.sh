#!/usr/bin/env bash
# Make sure the real programs a step needs are installed, or stop with one clear message.
#
# Why: the tests drive real servers (redis-server, haproxy), a real browser (chromium), real
# zip and a C compiler (gcc: a stand-in libnvidia-ml for the GPU diagnosis), and the
# image checks a real container engine. A fresh machine has none of them. As root with apt-get
# they are installed here (one `apt-get update` only when something is missing); otherwise this
# prints the packages and the command that installs them and exits 1, before any test runs.
#   scripts/setup/system_deps.sh test     what `make test` needs
#   scripts/setup/system_deps.sh image    what `make test-image` needs (a container engine)
#   scripts/setup/system_deps.sh fresh    what `make test-fresh` needs (debootstrap, chroot)
set -euo pipefail

# SYSTEM_ROOT: where the file checks look (tests point it at an empty folder).
sysroot="${SYSTEM_ROOT:-}"
have() { command -v "$1" >/dev/null 2>&1 || [ -x "$sysroot/usr/sbin/$1" ] || [ -x "$sysroot/sbin/$1" ]; }

missing=()
need_cmd() { have "$1" || missing+=("$2"); }
need_file() { [ -e "$sysroot$1" ] || missing+=("$2"); }

case "${1:-test}" in
  test)
    need_cmd redis-server redis-server            # result cache and job store on Redis
    need_cmd haproxy haproxy                      # deploy config and the scale tests
    need_file /usr/bin/chromium chromium          # the browser page and Swagger UI tests
    need_file /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf fonts-noto-color-emoji
    need_cmd zip zip                              # zip archives the batch tests upload
    need_cmd cc gcc                               # builds the NVML-ABI test library
    need_file /usr/include/string.h libc6-dev
    ;;
  image)
    if ! have docker || ! docker info >/dev/null 2>&1; then
      need_cmd podman podman                      # no Docker engine: podman builds and runs
      need_cmd runc runc                          # crun fails on hybrid cgroups
      need_cmd debootstrap debootstrap            # stand-in base when no registry answers
    fi
    ;;
  fresh)
    need_cmd debootstrap debootstrap
    need_cmd git git
    ;;
  *)
    echo "usage: $0 test|image|fresh" >&2
    exit 2
    ;;
esac

[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && have apt-get && [ "${SYSTEM_DEPS_INSTALL:-true}" = true ]; then
  echo "installing with apt-get: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi

{
  echo "error: missing system packages: ${missing[*]}"
  echo "install them, then run make again:"
  if have apt-get; then
    echo "    sudo apt-get install -y --no-install-recommends ${missing[*]}"
  else
    echo "    (Debian/Ubuntu package names) apt-get install ${missing[*]}"
  fi
} >&2
exit 1
