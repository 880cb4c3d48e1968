#!/usr/bin/env bash
# Build gpu-kit/: everything a GPU host with its own Python stack needs to run our GPU checks.
#
# Why: a lent GPU machine has Python 3.12 with its own torch and transformers 5, no package
# registry, and room for 64 MiB. Our pinned pure-Python packages travel unpacked beside stubs, a
# sitecustomize shim, the project source, reference captions made here, and run.sh (docs/gpu.md).
# `make gpu-kit` runs this after `make sync`; the kit is rebuilt from scratch every time.
#   GPU_KIT_DIR   where to write the kit (default: gpu-kit/ in the repository, ignored by git)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/scripts/gpu_kit"
KIT="${GPU_KIT_DIR:-$ROOT/gpu-kit}"
PY="$ROOT/.venv/bin/python"
UV="$ROOT/scripts/setup/uv.sh"
TARGET_PY="3.12"  # the GPU image's Python; the wheels are pure Python, so the tag only picks files

die() { echo "gpu-kit: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no $PY: run 'make sync' first"
cd "$ROOT"
git rev-parse --is-inside-work-tree >/dev/null 2>&1 \
  || die "needs a git checkout: the source copy is the files git tracks (plus untracked, not ignored)"

# A stale kit must never be mistaken for this one: build into a fresh folder, then swap.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/gpu-kit.XXXXXX")"  # outside the tree: never copied into src/
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/site" "$tmp/fallback" "$tmp/reference"

echo "gpu-kit: unpacking the pinned wheels (versions from requirements.installed.txt)"
for layer in site fallback; do
  mapfile -t pins < <("$PY" "$HERE/kit_build.py" pins "$layer")
  [ "${#pins[@]}" -gt 0 ] || die "no pins for layer $layer"
  # --no-deps: packages.txt lists every distribution the kit carries, nothing else comes along.
  # A package without a wheel (fairscale) is built from its sdist here, into a wheel, by uv.
  "$UV" pip install --quiet --python "$PY" --target "$tmp/$layer" --no-deps --no-compile \
    --python-version "$TARGET_PY" --python-platform x86_64-manylinux_2_28 "${pins[@]}"
  rm -rf "${tmp:?}/$layer/bin"  # console scripts point at this machine's interpreter
done

echo "gpu-kit: shim, stubs, runner"
cp -R "$HERE/shim" "$tmp/shim"
cp -R "$HERE/stubs" "$tmp/stubs"
install -m 0755 "$HERE/run.sh" "$tmp/run.sh"
cp "$HERE/packages.txt" "$HERE/image_versions.txt" "$tmp/"

echo "gpu-kit: project source (tracked and untracked-but-not-ignored files)"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' path; do
      [ -f "$path" ] && printf '%s\0' "$path"
    done \
  | tar --null -T - -cf - | (mkdir -p "$tmp/src" && tar -xf - -C "$tmp/src")

echo "gpu-kit: reference captions and token ids, from this project environment (CPU, fp32)"
"$PY" "$HERE/caption_check.py" --out "$tmp/reference/captions-cpu-fp32.json" >/dev/null

"$PY" "$HERE/kit_build.py" finish "$tmp"

rm -rf "$KIT"
mv "$tmp" "$KIT"
trap - EXIT
echo "gpu-kit: ready in $KIT  (run it with: OUT=/some/dir bash $KIT/run.sh)"
