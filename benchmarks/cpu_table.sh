#!/usr/bin/env bash
# Every CPU serving number of docs/performance.md ("CPU serving at its limit") in one run on one
# machine: run it alone (e.g. `flock -x /tmp/cpu.lock bash benchmarks/cpu_table.sh OUTDIR`).
# Variants: "default" is the environment as shipped (thread variables stripped); "gomp" is
# libgomp's own default (spin 300,000 rounds, then sleep: what the service did before it chose
# a policy itself); "threads1" is TORCH_THREADS=1; "passive2" is every core, passive; "spin0" is
# passive threads that sleep at once (GOMP_SPINCOUNT=0, what shipped before the short spin).
# Each step's output goes to OUTDIR/<step>.txt.
set -u
out=${1:?usage: cpu_table.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
GOMP="gomp=OMP_WAIT_POLICY=active,GOMP_SPINCOUNT=300000"
TWO="passive2=TORCH_THREADS=2,OMP_WAIT_POLICY=passive"
ONE="threads1=TORCH_THREADS=1"
SPIN0="spin0=GOMP_SPINCOUNT=0"
# STEPS="a b": run only those steps (by name), e.g. to add a missing line to a table.
step() { name=$1; shift; [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $name "* ]] || return 0; echo "== $name $(date -u +%H:%M:%S)"; "$py" "$@" >"$out/$name.txt" 2>&1; tail -n 2 "$out/$name.txt"; }
step load-tiny-idle benchmarks/load.py --model tiny --duration 20 --ours-env default= --ours-env "$GOMP" --ours-env "$ONE" --ours-env "$TWO"
step load-large-fp32-idle benchmarks/load.py --large-dir "$out/large-random" --model large-random --duration ${LARGE_S:-120} --skip-cache --ours-env default= --ours-env "$GOMP" --ours-env "$SPIN0"
step load-large-bf16-idle benchmarks/load.py --large-dir "$out/large-random" --model large-random --precision bf16 --duration ${BF16_S:-60} --skip-cache --skip-baseline --ours-env default= --ours-env "$GOMP" --ours-env "$SPIN0"
# 64 client threads in one Python process are their own bottleneck (--control measures that floor
# against a server that only writes a canned 503); spread over 8 processes, as callers are.
step admission benchmarks/admission.py --rounds 3 --processes 8 --control
step fairness-idle benchmarks/fairness.py --job-images 800 --requests 80 --variant default= --variant "$GOMP" --variant "$ONE"
step fairness-busy benchmarks/fairness.py --job-images 800 --requests 80 --neighbour --variant default= --variant "$GOMP" --variant "$ONE"
step load-tiny-busy benchmarks/load.py --model tiny --duration 20 --neighbour --skip-cache --skip-baseline --ours-env default= --ours-env "$GOMP" --ours-env "$ONE" --ours-env "$TWO"
# One 20 s window per server cannot resolve 5 % for the tiny model (a window now and then runs
# 15 % below its twin: the host's steal time, load.py's "steal %"): default and threads1 alternate.
AB="--ours-env default1= --ours-env threads1a=TORCH_THREADS=1 --ours-env default2= --ours-env threads1b=TORCH_THREADS=1 --ours-env default3= --ours-env threads1c=TORCH_THREADS=1"
step load-tiny-idle-abab benchmarks/load.py --model tiny --duration 30 --skip-cache --skip-baseline $AB --ours-env default4= --ours-env threads1d=TORCH_THREADS=1
step load-tiny-busy-abab benchmarks/load.py --model tiny --duration 30 --neighbour --skip-cache --skip-baseline $AB
step load-large-fp32-busy benchmarks/load.py --large-dir "$out/large-random" --model large-random --duration ${LARGE_BUSY_S:-120} --neighbour --skip-cache --skip-baseline --ours-env default= --ours-env "$ONE" --ours-env "$SPIN0"
# A neighbour that arrives after start-up (the servers start on a quiet machine and choose every
# core): the per-batch thread count must follow it down to one thread.
step load-large-fp32-late benchmarks/load.py --large-dir "$out/large-random" --model large-random --duration ${LARGE_BUSY_S:-120} --neighbour --neighbour-when window --skip-cache --skip-baseline --ours-env default= --ours-env "$ONE" --ours-env "$TWO"
step load-large-bf16-busy benchmarks/load.py --large-dir "$out/large-random" --model large-random --precision bf16 --duration ${BF16_S:-60} --neighbour --skip-cache --skip-baseline --ours-env default= --ours-env "$ONE" --ours-env "$SPIN0"
step batch-profile-fp32 benchmarks/batch_profile.py --rounds 2
step batch-profile-bf16 benchmarks/batch_profile.py --precision bf16 --rounds 2
# The fastest kernel per operation, summed: the floor under bf16 per-image time on this machine,
# and under it the roofline (the arithmetic at the cores' in-register peak). With the stock step's
# req/s (STOCK_RPS, else read from the fp32 step) it prints the highest speed-up each allows and what 12x would need.
stock_rps() { tail -n 1 "$out/load-large-fp32-idle.txt" 2>/dev/null | "$py" -c 'import json, sys; print(json.load(sys.stdin).get("baseline_rps") or "")' 2>/dev/null; }
STOCK_RPS=${STOCK_RPS:-$(stock_rps)}
step kernel-floor-bf16 benchmarks/kernel_floor.py --roofline --target 12 ${STOCK_RPS:+--stock-rps $STOCK_RPS}
echo "== done $(date -u +%H:%M:%S)"
