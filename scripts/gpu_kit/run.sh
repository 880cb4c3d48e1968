#!/usr/bin/env bash
# The GPU kit's one script: our GPU checks on a host whose Python stack is not ours.
#
# It runs the host's own python3 (its CUDA torch, NumPy, Pillow, pytest) with the kit's pinned
# pure-Python packages first on PYTHONPATH and the shim (docs/gpu.md, "The GPU kit"). Every
# stage has its own time limit and log, a failed stage does not stop the next, the whole run
# stays within a budget (default 465 s), and everything goes under $OUT:
#   summary.txt / summary.json   how it ran (host, mode) and each stage's result
#   NN-<stage>.log               each stage's output; doctor.json, cuda-tests.xml, captions-*.json,
#                                model_speed.json, load.json, versions.txt/json, env.txt/json
#
# usage: OUT=DIR bash run.sh [--cpu | --gpu] [--budget SECONDS] [--only STAGE,STAGE...]
#   (default) mode gpu when the host's torch sees CUDA, else cpu (said loudly)
#   --cpu     rehearsal: CUDA-only stages become short CPU runs of the same code (marked so)
#   --gpu     CUDA stages run even if the probe found no CUDA (they then fail and say why)
# Environment: KIT_PYTHON (default: the first of python3, python, python3.12 that has torch),
#   OUT (default ./gpu-kit-out-<time>), KIT_BUDGET_S (default 465).
# Exit status: 0 every stage passed; 1 a stage failed or timed out; 2 usage error; 3 no failure,
# but the time budget cut stages.
set -uo pipefail  # no -e: a failing stage must not stop the later ones

KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$KIT/src"
TOOLS="$SRC/scripts/gpu_kit"
MODE=auto
BUDGET="${KIT_BUDGET_S:-465}"
ONLY=""
RESERVE=40     # seconds kept for the versions table and the summary
MIN_STAGE=20   # a stage with less time than this left is skipped, and says so

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --gpu) MODE=gpu ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --only) ONLY=",${2:?--only needs stage names},"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "run.sh: --budget must be whole seconds" >&2; exit 2 ;; esac
START=$SECONDS  # the budget covers everything from here, finding Python and the probe included

OUT="${OUT:-$PWD/gpu-kit-out-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT" || { echo "run.sh: cannot create OUT=$OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
# The host's Python: KIT_PYTHON, else the first of python3, python, python3.12 that has torch.
PY="${KIT_PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch' >/dev/null 2>&1; then
      PY="$cand"
      break
    fi
  done
  PY="${PY:-python3}"
fi
if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c 'import sys' 2>/dev/null; then
  echo "run.sh: no Python found at '$PY' (set KIT_PYTHON to the interpreter with CUDA torch)" >&2
  exit 2
fi
PY="$(command -v "$PY")"
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac  # stages run from the kit's src/

# The kit's layers first, then the host's; caches and Hugging Face files outside the kit (it may
# be read-only) and outside $OUT (which comes back to whoever started the run).
cache="${TMPDIR:-/tmp}/gpu-kit-cache-$(id -u)"
mkdir -p "$cache"
export PYTHONPATH="$KIT/shim:$KIT/site:$KIT/stubs:$SRC${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPYCACHEPREFIX="$cache/pycache" PYTHONUNBUFFERED=1
export HF_HOME="$cache/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export USE_TF=0 USE_FLAX=0 USE_TORCH=1
export GPU_KIT="$KIT" GPU_KIT_IMPORTS_DIR="$OUT/imports"
export AUTO_UPDATE=false  # the service's emoji config: the bundled copy, no network
unset MODEL_CONFIG MODEL_DIR DEVICE PRECISION  # ours to choose per stage

STAGES="$OUT/stages.tsv"
printf 'stage\tstatus\texit\tseconds\tnote\n' >"$STAGES"
n=0
FAILED=0
CUT=0

wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
left() { echo $((BUDGET - (SECONDS - START))); }

record() {  # record STAGE STATUS EXIT SECONDS NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >>"$STAGES"
  printf '   %-12s %-8s (%ss) %s\n' "$1" "$2" "$4" "$5"
  case "$2" in failed|timeout) FAILED=1 ;; esac
}

# stage NAME LIMIT_S NOTE [--json FILE] CMD...: runs CMD in the kit's source folder, under its
# own limit (capped by what is left of the budget), output to its log; timeout kills the whole
# process group (servers started by a benchmark included). --json: the log's last JSON line
# (the benchmarks' summary) is also written to $OUT/FILE.
stage() {
  local name=$1 limit=$2 note=$3 json=""
  shift 3
  if [ "${1:-}" = --json ]; then
    json=$2
    shift 2
  fi
  n=$((n + 1))
  if ! wanted "$name"; then
    record "$name" skipped - 0 "not selected (--only)"
    return 0
  fi
  local avail=$(($(left) - RESERVE))
  if [ "$avail" -lt "$MIN_STAGE" ]; then
    record "$name" skipped - 0 "time budget spent"
    CUT=$((CUT + 1))
    return 0
  fi
  [ "$limit" -gt "$avail" ] && limit=$avail
  local log
  log="$OUT/$(printf '%02d' "$n")-$name.log"
  echo "== $name: up to ${limit}s, log $(basename "$log")"
  local t0=$SECONDS rc
  (cd "$SRC" && timeout --kill-after=15 "$limit" "$@") >"$log" 2>&1
  rc=$?
  [ -z "$json" ] || grep '^{' "$log" | tail -n 1 >"$OUT/$json"
  local took=$((SECONDS - t0)) status=passed
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
    note="stopped after ${limit}s; $note"
  elif [ "$rc" -ne 0 ]; then
    status=failed
    note="exit $rc; $note; last line: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)"
  fi
  record "$name" "$status" "$rc" "$took" "$note"
  return 0
}

echo "GPU kit run: kit $KIT, output $OUT, budget ${BUDGET}s"
echo "python: $PY"

# ---- how this host runs it: Python, architecture, the NVIDIA stack, and whether torch sees CUDA
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
  echo "cpus: $(getconf _NPROCESSORS_ONLN 2>/dev/null || echo ?)"
  echo "user: $(id -un 2>/dev/null || id -u), kit: $KIT ($(sed -n 's/.*"git_commit": "\([0-9a-f]\{12\}\).*/commit \1/p' "$KIT/manifest.json" 2>/dev/null)$(grep -q '"git_dirty": true' "$KIT/manifest.json" 2>/dev/null && echo ', with uncommitted changes'))"
  container=none
  [ -f /.dockerenv ] && container=docker
  [ -f /run/.containerenv ] && container=podman
  [ -n "${KUBERNETES_SERVICE_HOST:-}" ] && container="$container, kubernetes"
  echo "container: $container"
  echo "NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES-unset} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"
  echo "driver: $(head -n 1 /proc/driver/nvidia/version 2>/dev/null || echo 'no /proc/driver/nvidia/version')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv \
      2>&1 || echo "nvidia-smi failed"
  else
    echo "nvidia-smi: not on PATH"
  fi
} >"$OUT/host.txt" 2>&1
cuda_probe="$(cd "$SRC" && timeout 120 "$PY" -c '
import torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available {ok}" +
      (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if ok else ""))
' 2>&1 | tail -n 1)"
echo "probe: $cuda_probe" | tee -a "$OUT/host.txt"
if [[ "$cuda_probe" != torch* ]]; then
  echo "!! $PY cannot import torch: the kit needs the host's own torch (set KIT_PYTHON)" \
    | tee -a "$OUT/host.txt"
fi
if [ "$MODE" = auto ]; then
  if [[ "$cuda_probe" == *"cuda available True"* ]]; then MODE=gpu; else MODE=cpu; fi
  if [ "$MODE" = cpu ]; then
    echo "!! NO USABLE CUDA: running in cpu mode; CUDA stages become CPU smoke runs. This is NOT"
    echo "!! a GPU result. (Force the CUDA stages with --gpu to see how they fail.)"
  fi
fi
echo "mode: $MODE" | tee -a "$OUT/host.txt"

# ---- the stages (most important first: the budget may cut the last)
stage env 120 "kit vs host versions, imports" \
  "$PY" "$TOOLS/kit_env.py" --out "$OUT"
stage doctor 90 "python blip2_model.py doctor (exit 0: the configured device works)" \
  "$PY" blip2_model.py doctor
if wanted doctor; then
  (cd "$SRC" && timeout 90 "$PY" blip2_model.py doctor --json) >"$OUT/doctor.json" \
    2>"$OUT/doctor-json.log"
fi
stage captions 150 "tiny-shapes CPU fp32 vs the project environment: captions and token ids" \
  "$PY" "$TOOLS/caption_check.py" --compare "$KIT/reference/captions-cpu-fp32.json" \
  --out "$OUT/captions-cpu-fp32.json"
if [ "$MODE" = gpu ]; then
  stage cuda-tests 240 "pytest -m cuda tests/test_cuda.py (CUDA_TESTS_REQUIRED: no skipping)" \
    env CUDA_TESTS_REQUIRED=1 "$PY" -m pytest -p no:cacheprovider -m cuda tests/test_cuda.py -v -rs \
    --junitxml="$OUT/cuda-tests.xml"
  stage model-speed 200 "model_speed.py --device cuda --sweep (large_coco, random weights)" \
    --json model_speed.json "$PY" benchmarks/model_speed.py --device cuda --sweep
  stage load 240 "load.py: served REST.py on CUDA fp16 vs the reference-style server" \
    --json load.json "$PY" benchmarks/load.py --model large-random --device cuda \
    --precision fp16 --duration 15 --clients 8
  stage captions-gpu 90 "tiny-shapes CUDA fp16 vs CPU fp32 reference (share, need not be equal)" \
    "$PY" "$TOOLS/caption_check.py" --compare "$KIT/reference/captions-cpu-fp32.json" \
    --device cuda --precision fp16 --report --out "$OUT/captions-cuda-fp16.json"
else
  stage cuda-tests 120 "no CUDA: only collected and skipped with the diagnosed reason" \
    "$PY" -m pytest -p no:cacheprovider -m cuda tests/test_cuda.py -rs \
    --junitxml="$OUT/cuda-tests.xml"
  stage model-speed 300 "CPU smoke of the GPU sweep (1 image, batch 1, fp32, 6 tokens)" \
    --json model_speed.json "$PY" benchmarks/model_speed.py --sweep --images 1 --batches 1 \
    --precisions fp32 --length 6 --beams 1
  stage load 200 "CPU smoke: served REST.py (tiny model) vs the reference-style server" \
    --json load.json "$PY" benchmarks/load.py --model tiny --duration 5 --clients 2 --images 4
fi
# On a GPU host these get what the budget leaves; a CPU rehearsal on a shared 2-core machine
# needs about 270 s for them.
tiny_limit=300
[ "$MODE" = gpu ] || tiny_limit=600
stage tiny-tests "$tiny_limit" "pytest tests/test_model.py tests/test_fast_decode*.py (tiny model, CPU)" \
  "$PY" -m pytest -p no:cacheprovider tests/test_model.py tests/test_fast_decode.py \
  tests/test_fast_decode_models.py -q -rs --junitxml="$OUT/tiny-tests.xml"

# ---- what every process imported, with versions and where from (kit or host); then the summary
RESERVE=0
MIN_STAGE=5
stage versions 30 "every imported package: version, kit or host" \
  "$PY" "$TOOLS/kit_versions.py" "$OUT/imports" --out "$OUT"

total=$((SECONDS - START))
overall=passed
[ "$CUT" -eq 0 ] || overall="INCOMPLETE ($CUT stages cut by the time budget)"
[ "$FAILED" -eq 0 ] || overall=FAILED
{
  echo "GPU kit run $(date -u +%Y-%m-%dT%H:%M:%SZ): $overall in ${total}s (budget ${BUDGET}s)"
  echo "mode: $MODE$([ "$MODE" = cpu ] && echo ' (no CUDA stage ran on a GPU: not a GPU result)')"
  cat "$OUT/host.txt"
  echo
  column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
  [ -f "$OUT/versions-differ.txt" ] && { echo; cat "$OUT/versions-differ.txt"; }
} >"$OUT/summary.txt"
GPU_KIT_IMPORTS_DIR="" "$PY" - "$STAGES" "$OUT/summary.json" "$MODE" "$overall" "$total" "$cuda_probe" <<'EOF' || true
import csv, json, sys
stages, out, mode, overall, total, probe = sys.argv[1:7]
with open(stages, encoding="utf-8") as fh:
    rows = list(csv.DictReader(fh, delimiter="\t"))
summary = {"mode": mode, "overall": overall, "seconds": int(total), "cuda_probe": probe,
           "stages": rows}
with open(out, "w", encoding="utf-8") as fh:
    json.dump(summary, fh, indent=1)
EOF
echo
cat "$OUT/summary.txt"
[ "$FAILED" -eq 0 ] || exit 1
[ "$CUT" -eq 0 ] || exit 3
