#!/usr/bin/env python3
"""How fast captioning is: stock LAVIS decoding vs fast_decode (fp32 and bf16), per image.

Builds the full-size blip_caption/large_coco architecture (ViT-L encoder, 12-layer BERT decoder)
with seeded random weights and a made-up vocabulary of bert-base-uncased's size, so it needs no
download, and captions the same generated images by each path:

- stock: LAVIS's own `model.generate(samples, num_beams=3, ...)` under torch.no_grad, the
  reference service's path;
- ours fp32: `blip2_model.Captioner.caption` with the fast decoder (the service's code path);
- ours bf16: the same Captioner with PRECISION=bf16 (weights converted to bf16 once, autocast,
  fused ViT attention), run last because it converts the model in place.

Caption length is fixed (min_length = max_length) so every side does the same work, and fp32
captions must be string-identical to stock. `--profile` adds a breakdown of where the time goes
(encoder, image K/V, decoder steps, search loop). Prints a readable report; the last line is
JSON: {"stock_s", "fast_fp32_s", "fast_bf16_s", "speedup_fp32", "speedup_bf16",
"identical_fp32", ...} in seconds per image.

Usage: `python benchmarks/model_speed.py [--images N] [--threads N] [--seed N] [--profile]
[--batch] [--omp-passive]`; on a busy shared CPU prefer `--threads 1` or `--omp-passive`.

On a GPU: `python benchmarks/model_speed.py --device cuda` sweeps batch sizes 1, 8 and 32 by
fp32, fp16 and bf16 (`--batches`, `--precisions`), with stock LAVIS (fp32) measured at each batch
size in the same run, and prints images/s with the speedup over stock at the same batch size and
over stock one image per call (the reference service's way); each precision starts again from
the exact fp32 weights, an out-of-memory cell shows as OOM. `--sweep` runs the same on the CPU.
The last line is JSON: {"device", "gpu", "rows": [{"path", "precision", "batch", "images_per_s",
"speedup_same_batch", "speedup_vs_stock_batch1", "identical_to_stock"}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The model, the three paths and the profile (also imported from here by batch_profile.py and
# blip2_speed.py: `from model_speed import build, make_images`).
from speed_models import Runner, build, machine, make_images, run_profile, timed  # noqa: E402

log = logging.getLogger("model_speed")


# --------------------------------------------------------------------------- sweep (GPU)


@dataclass
class Cell:
    """One measurement of the sweep: a path at a precision and batch size."""

    path: str  # "stock" (LAVIS generate) or "ours" (Captioner.caption)
    precision: str
    batch: int
    images_per_s: float | None  # None: out of memory
    captions: list[str] = field(default_factory=list)


def precision_problem(precision: str, device: str) -> str | None:
    """Why `precision` cannot run on `device` (the sweep skips it), or None."""
    import torch

    from captioner import device as model_device

    if precision != "bf16":
        return None
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return f"bf16 needs compute capability 8.0+, this GPU is {major}.{minor}"
        return None
    return None if model_device.cpu_supports_bf16() else "this CPU has no bf16 support"


def measure(
    fn: Callable[..., list[str]], runner: Runner, images: list[Any], batch: int
) -> tuple[float | None, list[str]]:
    """(images per second, captions) of `fn` over `images` in batches; (None, []) on OOM."""
    import torch

    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    try:
        fn(chunks[0], length=7)  # warm-up: kernel selection, allocator, lazy init
        runner.sync()
        start = time.perf_counter()
        captions: list[str] = []
        for chunk in chunks:
            captions += fn(chunk)
        runner.sync()
    except torch.cuda.OutOfMemoryError:
        if runner.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return None, []
    return len(images) / (time.perf_counter() - start), captions


def sweep_cells(
    runner: Runner, images: list[Any], batches: list[int], precisions: list[str]
) -> list[Cell]:
    """Stock fp32 at every batch size, then ours at every precision and batch size; each
    precision starts again from the exact fp32 weights."""
    fp32_state = {k: v.detach().to("cpu", copy=True) for k, v in runner.model.state_dict().items()}
    cells = []
    for batch in batches:
        cells.append(Cell("stock", "fp32", batch, *measure(runner.stock, runner, images, batch)))
    for precision in precisions:
        problem = precision_problem(precision, runner.device)
        if problem:
            print(f"{precision}: skipped ({problem})")
            continue
        runner.use_precision(precision, fp32_state)
        for batch in batches:
            cells.append(
                Cell("ours", precision, batch, *measure(runner.fast, runner, images, batch))
            )
    return cells


def sweep_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """Images/s with speedups over stock at the same batch and over stock one image per call."""
    stock = {c.batch: c for c in cells if c.path == "stock"}
    base = stock.get(1) or next(iter(stock.values()))
    rows = []
    for cell in cells:
        ref = stock.get(cell.batch)
        rate = cell.images_per_s
        same = ref.images_per_s if ref else None
        identical = (
            sum(a == b for a, b in zip(cell.captions, ref.captions, strict=False))
            if ref and ref.captions and cell.captions
            else None
        )
        rows.append(
            {
                "path": cell.path,
                "precision": cell.precision,
                "batch": cell.batch,
                "images_per_s": round(rate, 3) if rate else None,
                "speedup_same_batch": round(rate / same, 2) if rate and same else None,
                "speedup_vs_stock_batch1": (
                    round(rate / base.images_per_s, 2) if rate and base.images_per_s else None
                ),
                "identical_to_stock": (
                    f"{identical}/{len(cell.captions)}" if identical is not None else None
                ),
            }
        )
    return rows


def print_sweep(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'path':6} {'precision':9} {'batch':>5} {'images/s':>9} {'vs stock':>9} "
        f"{'vs stock b1':>11}  captions = stock"
    )
    for r in rows:
        rate = f"{r['images_per_s']:9.2f}" if r["images_per_s"] else f"{'OOM':>9}"
        same = f"{r['speedup_same_batch']:8.1f}x" if r["speedup_same_batch"] else f"{'-':>9}"
        b1 = (
            f"{r['speedup_vs_stock_batch1']:10.1f}x"
            if r["speedup_vs_stock_batch1"]
            else f"{'-':>11}"
        )
        print(
            f"{r['path']:6} {r['precision']:9} {r['batch']:>5} {rate} {same} {b1}  "
            f"{r['identical_to_stock'] or '-'}"
        )


def run_sweep(args: argparse.Namespace) -> int:
    """Batch sizes x precisions on one device, stock LAVIS measured in the same run."""
    import torch

    from captioner import device as model_device
    from captioner import fast_decode, packed_linear

    try:
        plan = model_device.plan_device(args.device, "fp32", report=False)
    except model_device.DeviceError as exc:
        print(f"cannot run on {args.device}: {exc}", file=sys.stderr)
        return 1
    device = plan.device
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    print(f"Device: {device}" + (f" ({gpu})" if gpu else "") + f"; {plan.reason}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    count = args.images or 2 * max(batches)
    with tempfile.TemporaryDirectory(prefix="model_speed-") as tmp:
        model, spec = build(args.seed, Path(tmp))
    images = make_images(count, args.seed)
    print(
        f"Work: {count} images ({spec.image_size}px), {args.beams} beams, {args.length} tokens, "
        f"batches {batches}, precisions {precisions}"
    )
    runner = Runner(model, spec, args.beams, args.length, device=device)
    rows = sweep_rows(sweep_cells(runner, images, batches, precisions))
    fast_decode.restore_model(model)
    packed_linear.unpack_model(model)
    print_sweep(rows)
    print(
        "(fp32 captions equal stock's on the CPU; on a GPU, kernels chosen per batch shape may "
        "round differently, and random weights make near-ties, so fp32 may differ there too)"
    )
    summary = {
        "device": device,
        "gpu": gpu,
        "torch": torch.__version__,
        "images": count,
        "beams": args.beams,
        "length": args.length,
        "rows": rows,
    }
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--images", type=int, help="generated images (default 2; with --sweep 2 x largest batch)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="batch sizes x precisions, stock in the same run, images/s (implied by a CUDA device)",
    )
    parser.add_argument("--batches", default="1,8,32", help="batch sizes of the sweep")
    parser.add_argument("--precisions", default="fp32,fp16,bf16", help="precisions of the sweep")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="weights and images seed")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--length", type=int, default=20, help="min_length = max_length")
    parser.add_argument("--batch", action="store_true", help="all images in one call per path")
    parser.add_argument("--profile", action="store_true", help="also show where the time goes")
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE: on a busy shared CPU, idle OpenMP threads sleep instead "
        "of spinning, so each small op no longer waits for a descheduled peer",
    )
    args = parser.parse_args(argv)
    if args.omp_passive:
        if "torch" in sys.modules:
            raise SystemExit("--omp-passive must be set before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    import blip2_model
    from captioner import device as model_device
    from captioner import fast_decode, packed_linear

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"{info['threads']} threads (OMP_WAIT_POLICY {info['omp_wait_policy']}), "
        f"load average {info['loadavg_1m']}"
    )
    busy = info["loadavg_1m"] >= max(1.0, 0.5 * (info["cores"] or 1))
    if busy and info["threads"] > 1 and info["omp_wait_policy"] == "default":
        print(
            "warning: the CPU is busy; with several OpenMP threads each small op can stall on a "
            "descheduled thread, which hits the fast path hardest. Consider --threads 1 or "
            "--omp-passive."
        )
    if args.sweep or args.device != "cpu":
        return run_sweep(args)
    args.images = args.images or 2
    bf16_ok = model_device.cpu_supports_bf16()

    with tempfile.TemporaryDirectory(prefix="model_speed-") as tmp:
        start = time.perf_counter()
        model, spec = build(args.seed, Path(tmp))
        print(
            f"Model: {spec.name}, random weights (seed {args.seed}), "
            f"{blip2_model.count_parameters(model) / 1e6:.0f}M parameters, "
            f"vocab {len(model.tokenizer)}, built in {time.perf_counter() - start:.0f} s"
        )
    images = make_images(args.images, args.seed)
    batches = [images] if args.batch else [images[i : i + 1] for i in range(len(images))]
    runner = Runner(model, spec, args.beams, args.length)
    print(
        f"Work: {args.images} images ({spec.image_size}px), {args.beams} beams, "
        f"{args.length} tokens, {'one batch' if args.batch else 'one image per call'}\n"
    )

    # Stock first; a short warm-up run per path. Then ours in fp32 (the default), then bf16,
    # which converts the weights in place, so it comes last.
    runner.stock(batches[0], length=7)
    stock_s, stock_caps = timed(runner.stock, batches)
    runner.fast(batches[0], length=7)
    fp32_s, fp32_caps = timed(runner.fast, batches)
    if args.profile:
        pixels = runner.captioner.preprocess(batches[0][:1])
        run_profile(runner, pixels, bf16_ok)
    bf16_s, bf16_caps = None, None
    if bf16_ok:
        runner.use_precision("bf16")
        runner.fast(batches[0], length=7)
        bf16_s, bf16_caps = timed(runner.fast, batches)
    fast_decode.restore_model(model)
    packed_linear.unpack_model(model)

    identical = fp32_caps == stock_caps
    bf16_same = sum(a == b for a, b in zip(bf16_caps or [], stock_caps, strict=False))
    print(f"\n{'path':12} {'s/image':>9} {'speedup':>8}  captions vs stock")
    print(f"{'stock':12} {stock_s:9.2f} {1.0:7.1f}x  (reference)")
    print(
        f"{'fast fp32':12} {fp32_s:9.2f} {stock_s / fp32_s:7.1f}x  "
        f"{'identical' if identical else 'DIFFERENT'} ({len(stock_caps)} captions)"
    )
    if bf16_s is not None:
        print(
            f"{'fast bf16':12} {bf16_s:9.2f} {stock_s / bf16_s:7.1f}x  "
            f"{bf16_same}/{len(stock_caps)} identical (bf16 need not be)"
        )
    else:
        print(f"{'fast bf16':12} {'n/a':>9}  (CPU has no bf16 support)")
    if not identical:
        for a, b in zip(stock_caps, fp32_caps, strict=True):
            print(f"  stock: {a!r}\n  fast:  {b!r}")
    for i, caption in enumerate(stock_caps):
        print(f"image {i} stock caption (random weights): {caption[:70]!r}")
    info_after = machine()
    print(f"load average after: {info_after['loadavg_1m']}")

    result = {
        "stock_s": round(stock_s, 3),
        "fast_fp32_s": round(fp32_s, 3),
        "fast_bf16_s": round(bf16_s, 3) if bf16_s is not None else None,
        "speedup_fp32": round(stock_s / fp32_s, 2),
        "speedup_bf16": round(stock_s / bf16_s, 2) if bf16_s is not None else None,
        "identical_fp32": identical,
        "bf16_identical_captions": f"{bf16_same}/{len(stock_caps)}" if bf16_caps else None,
        "images": args.images,
        "threads": info["threads"],
        "cpu": info["cpu"],
    }
    print(json.dumps(result))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
