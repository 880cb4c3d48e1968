#!/usr/bin/env bash
# Build the service image with whichever engine is present (`make image`).
#
# Why a script: the base image may be unreachable (no image registry), the build may sit behind a
# TLS-intercepting proxy (its CA must be trusted while downloading, and not kept), and podman
# must build in Docker's format or it drops the HEALTHCHECK.
# Env: IMAGE (tag, default blip2-caption-service:latest), ENGINE (docker|podman), EXTRA_CA (a PEM
# bundle to trust during the build; default: the host's /usr/local/share/ca-certificates/*.crt,
# where an administrator puts such CAs), STANDIN_BASE (auto|always|never, default auto).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=scripts/image
# shellcheck source=engine.sh
. "$here/engine.sh"
image="${IMAGE:-blip2-caption-service:latest}"
base="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -1)"

loud() { printf '\n==== %s ====\n\n' "$*" >&2; }

have_base() { "$ENGINE" image inspect "$base" >/dev/null 2>&1; }
case "${STANDIN_BASE:-auto}" in
  always) loud "building a stand-in for $base from Debian packages (STANDIN_BASE=always)"
          "$here/standin_base.sh" "$base" ;;
  never)  have_base || "$ENGINE" pull "$base" ;;
  *)      if ! have_base && ! timeout 120 "$ENGINE" pull "$base"; then
            loud "NO IMAGE REGISTRY ANSWERED for $base: STANDING IT IN with Debian bookworm + python3 (debootstrap)"
            "$here/standin_base.sh" "$base"
          fi ;;
esac
standin="$("$ENGINE" image inspect --format '{{index .Config.Labels "org.blip2.stand-in"}}' "$base" 2>/dev/null || true)"
if [ -n "$standin" ] && [ "$standin" != "<no value>" ]; then
  loud "BASE $base IS A STAND-IN: $standin"
fi

args=(build -t "$image" --build-arg "BASE_IMAGE=$base")
[ "$ENGINE" = podman ] && args+=(--format docker)     # OCI format has no HEALTHCHECK

ca_bundle=""
if [ -n "${EXTRA_CA:-}" ]; then
  ca_bundle="$EXTRA_CA"
elif ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  ca_bundle="$(mktemp)"
  trap 'rm -f "$ca_bundle"' EXIT
  cat /usr/local/share/ca-certificates/*.crt >"$ca_bundle"
fi
if [ -n "$ca_bundle" ]; then
  echo "trusting extra CA certificates during the build (a build secret; not stored in the image)"
  args+=(--secret "id=extra_ca,src=$ca_bundle")
fi

echo "$ENGINE ${args[*]} ."
start=$(date +%s)
"$ENGINE" "${args[@]}" .
echo "built $image with $ENGINE in $(($(date +%s) - start)) s"
