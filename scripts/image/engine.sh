# Sourced by the image scripts: pick the container engine and make it work on this host.
#
# Docker when its daemon answers; otherwise podman. For podman a private containers.conf is
# used (CONTAINERS_CONF, the machine's own file is left alone): runc when it is installed (crun
# fails on hybrid cgroup hosts) and no default ulimits (setting RLIMIT_NOFILE is refused in some
# sandboxes). ENGINE=docker|podman forces one.
if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
  else
    echo "error: no container engine: install Docker, or podman (apt-get install podman runc)" >&2
    exit 1
  fi
fi
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  conf_dir="${TMPDIR:-/tmp}/blip2-podman-$(id -u)"
  mkdir -p "$conf_dir"
  {
    echo "[containers]"
    echo "default_ulimits = []"
    if command -v runc >/dev/null 2>&1; then
      echo "[engine]"
      echo 'runtime = "runc"'
    fi
  } >"$conf_dir/containers.conf"
  export CONTAINERS_CONF="$conf_dir/containers.conf"
fi
export ENGINE
