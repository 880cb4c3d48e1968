"""The fastest this machine's kernels could caption one large_coco image: a floor, not a target.

    python benchmarks/kernel_floor.py [--precision bf16] [--batch 8] [--steps 26] [--stock-rps R]
                                      [--roofline [--target T]]

Times, one op at a time and best of `--repeats`, every kind of operation a batch of `--batch`
images goes through in the service's fast path: the ViT-L encoder's patch embedding, its four
linear layers (GELU with fc1), its attention (the fastest of: three matrix-product steps, q K^T,
softmax, P V, one image at a time, contiguous; PyTorch's fused kernel; the service's matrix
products), its norms and residual adds; the decoder's image keys and values; and `--steps`
decoder steps over `batch x 3` beam rows: linear layers and LM head, cross-attention against
each image's keys and values, self-attention against the steps' cache (at its mean length),
layer norms, and the beam search's choice over the vocabulary (log-softmax, top-k), with
distinct weights and keys/values per layer (as in the model: they do not stay in the cache).
Every product is the faster of `F.linear` and the packed oneDNN product of
captioner/packed_linear.py (GELU fused), every decoder attention the fastest of the service's
two kernels (captioner/cpu_attention.py) and its three steps alone, named in brackets. The sum,
with nothing for Python, copies, HTTP or image decoding, is the floor of per-image time with
these kernels. With `--stock-rps` (the reference server's req/s measured in the same sitting) it
prints the speed-up that floor would give: a target above it needs faster kernels than this
machine has, not a setting.

`--roofline` adds the floor under any kernel at all: it builds `cpu_peak.c` with the system's C
compiler (skipped, with the reason, where there is none) for the cores' in-register peak, times a
512 MB copy for the memory bandwidth, and prices the model's matrix arithmetic (linear layers,
attention products, image K/V, decoder steps: FLOPs counted from the shapes) at that peak, the
decoder steps at their weight and image-K/V traffic where that takes longer; softmax, norms and
GELU count nothing. With `--stock-rps` and `--target T` it prints the share of that peak a T-fold
speed-up would need the whole service to run at.

Shapes are large_coco's (ViT-L/16 at 384 px: 577 tokens, width 1024, MLP 4096, 16 heads, 24
blocks; BERT-base decoder: width 768, 3072, 12 layers, 30524-token vocabulary). `--steps` 26
is what the default options (max_length 30, 4 prompt tokens) give with random weights, whose
beams never stop early. The last line is JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_support import describe, machine  # noqa: E402

TOKENS, WIDTH, MLP, HEADS, BLOCKS = 577, 1024, 4096, 16, 24
DEC_WIDTH, DEC_MLP, DEC_LAYERS, VOCAB, BEAMS = 768, 3072, 12, 30524, 3
DEC_HEADS, PROMPT, PATCH, IMAGE = 12, 4, 16, 384  # decoder heads, "a picture of " tokens
BARE = "q K^T, softmax, P V"  # attention as its three steps alone, no scale (foldable into q)
PEAK_SOURCE = Path(__file__).resolve().parent / "cpu_peak.c"


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: lazy initialisation, first-touch of outputs
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def fastest_linear(torch: Any, layer: Any, inp: Any, post: str, repeats: int) -> tuple[str, float]:
    """The faster of `F.linear` and the service's packed oneDNN product (captioner/
    packed_linear.py, where it exists for this dtype), `post` "gelu" included: separate after
    the plain product, fused into the packed one. Returns (kernel, seconds)."""
    from captioner import packed_linear

    act = torch.nn.functional.gelu if post == "gelu" else (lambda t: t)
    times = {"plain": best_of(lambda: act(layer(inp)), repeats)}
    if packed_linear.available(layer.weight.dtype):
        packed = packed_linear._pack(layer.weight)
        times["packed"] = best_of(
            lambda: packed_linear._product(inp, packed, layer.bias, post), repeats
        )
    kernel = min(times, key=times.__getitem__)
    return kernel, times[kernel]


def encoder_ops(torch: Any, dtype: Any, batch: int, repeats: int) -> dict[str, float]:
    """Seconds per image for each op kind of the 24 ViT blocks."""
    from captioner import cpu_attention

    nn = torch.nn
    rows = batch * TOKENS
    x = torch.randn(rows, WIDTH).to(dtype)
    hidden = torch.randn(rows, MLP).to(dtype)
    layers = {
        "qkv": (nn.Linear(WIDTH, 3 * WIDTH), x),
        "proj": (nn.Linear(WIDTH, WIDTH), x),
        "fc1": (nn.Linear(WIDTH, MLP), x),
        "fc2": (nn.Linear(MLP, WIDTH), hidden),
    }
    per_block: dict[str, float] = {}
    for name, (layer, inp) in layers.items():
        post = "gelu" if name == "fc1" else "none"
        label = "linear fc1 + GELU" if post == "gelu" else f"linear {name}"
        kernel, seconds = fastest_linear(torch, layer.to(dtype), inp, post, repeats)
        per_block[f"{label} ({kernel})"] = seconds
    d = WIDTH // HEADS
    q, k, v = (torch.randn(1, HEADS, TOKENS, d).to(dtype) for _ in range(3))
    scale = d**-0.5
    scores = torch.matmul(q[0] * scale, k[0].transpose(-1, -2))
    probs = torch.softmax(scores, -1)
    one_image = {
        "q K^T": lambda: torch.matmul(q[0] * scale, k[0].transpose(-1, -2)),
        "softmax": lambda: torch.softmax(scores, -1),
        "P V": lambda: torch.matmul(probs, v[0]),
    }
    steps = {name: batch * best_of(fn, repeats) for name, fn in one_image.items()}
    qb, kb, vb = (torch.randn(batch, HEADS, TOKENS, d).to(dtype) for _ in range(3))
    # The floor takes the fastest way to the whole attention.
    ways = {
        "its three steps, one image at a time": sum(steps.values()),
        "one fused call": best_of(
            lambda: cpu_attention.attend(cpu_attention.FUSED, qb, kb, vb), repeats
        ),
        "the service's matrix products": best_of(
            lambda: cpu_attention.attend(cpu_attention.MATMUL, qb, kb, vb), repeats
        ),
    }
    way = min(ways, key=ways.__getitem__)
    per_block[f"attention ({way})"] = ways[way]
    norm = nn.LayerNorm(WIDTH).to(dtype)
    per_block["layer norms (2)"] = 2 * best_of(lambda: norm(x), repeats)
    per_block["residual adds (2)"] = 2 * best_of(lambda: x + x, repeats)
    pixels = torch.randn(batch, 3, IMAGE, IMAGE).to(dtype)
    patches = nn.Conv2d(3, WIDTH, PATCH, PATCH).to(dtype)
    out = {"patch embedding": best_of(lambda: patches(pixels), repeats) / batch}
    out |= {name: t * BLOCKS / batch for name, t in per_block.items()}
    out |= {f"(attention {name})": t * BLOCKS / batch for name, t in steps.items()}
    out |= {f"(attention as {name})": t * BLOCKS / batch for name, t in ways.items() if name != way}
    return out


def decoder_ops(torch: Any, dtype: Any, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Seconds per image: the image K/V projections, and `steps` steps' linear layers."""
    from captioner import packed_linear

    nn = torch.nn
    embeds = torch.randn(batch * TOKENS, WIDTH).to(dtype)
    kv = nn.Linear(WIDTH, DEC_WIDTH).to(dtype)
    kv_kernel, kv_s = fastest_linear(torch, kv, embeds, "none", repeats)
    kv_s *= 2 * DEC_LAYERS
    rows = torch.randn(batch * BEAMS, DEC_WIDTH).to(dtype)
    wide = torch.randn(batch * BEAMS, DEC_MLP).to(dtype)
    # per layer: self q, k, v, out; cross q, out; MLP in and out. Distinct weights, as in the model.
    shapes = [(DEC_WIDTH, DEC_WIDTH)] * 6 + [(DEC_WIDTH, DEC_MLP), (DEC_MLP, DEC_WIDTH)]
    weights = [[nn.Linear(i, o).to(dtype) for i, o in shapes] for _ in range(DEC_LAYERS)] + [
        [nn.Linear(DEC_WIDTH, DEC_WIDTH).to(dtype), nn.Linear(DEC_WIDTH, VOCAB).to(dtype)]
    ]

    def step(product: Callable[[Any, Any], Any]) -> None:
        for layer in weights:
            for lin in layer:
                product(lin, wide if lin.in_features == DEC_MLP else rows)

    steps_s = {"plain": best_of(lambda: step(lambda lin, inp: lin(inp)), repeats)}
    if packed_linear.available(dtype):
        packed = {id(lin): packed_linear._pack(lin.weight) for layer in weights for lin in layer}

        def packed_product(lin: Any, inp: Any) -> Any:
            return packed_linear._product(inp, packed[id(lin)], lin.bias, "none")

        steps_s["packed"] = best_of(lambda: step(packed_product), repeats)
    kernel = min(steps_s, key=steps_s.__getitem__)
    return {
        f"decoder image K/V ({kv_kernel})": kv_s / batch,
        f"decoder {steps} steps' linear layers and LM head ({kernel})": steps_s[kernel]
        * steps
        / batch,
    }


def decoder_step_ops(
    torch: Any, dtype: Any, batch: int, steps: int, repeats: int
) -> dict[str, float]:
    """Seconds per image: `steps` steps' attention, norms and beam choice (not their products).

    Cross-attention: each image's 3 beam rows against its own 577 keys and values, every layer
    its own (B, 12, 577, 64) pair (170 MB for 8 images: read from memory at every step, as in
    the model). Self-attention: each row against the cache at its mean length over the steps.
    """
    from captioner import cpu_attention

    nn = torch.nn
    d = DEC_WIDTH // DEC_HEADS

    def attend_all(kind: str, q: Any, kvs: list[tuple[Any, Any]]) -> None:
        for k, v in kvs:
            if kind == BARE:
                torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), -1), v)
            else:
                cpu_attention.attend(kind, q, k, v)

    def fastest(q: Any, kvs: list[tuple[Any, Any]]) -> tuple[str, float]:
        times = {
            kind: best_of(functools.partial(attend_all, kind, q, kvs), repeats)
            for kind in (*cpu_attention.KINDS, BARE)
        }
        kind = min(times, key=times.__getitem__)
        return kind, times[kind]

    def pairs(rows: int, length: int) -> list[tuple[Any, Any]]:
        shape = (rows, DEC_HEADS, length, d)
        return [
            (torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)) for _ in range(DEC_LAYERS)
        ]

    rows = batch * BEAMS
    cross_kind, cross_s = fastest(
        torch.randn(batch, DEC_HEADS, BEAMS, d).to(dtype), pairs(batch, TOKENS)
    )
    mean_cache = PROMPT + (steps + 1) // 2
    self_kind, self_s = fastest(
        torch.randn(rows, DEC_HEADS, 1, d).to(dtype), pairs(rows, mean_cache)
    )
    x = torch.randn(rows, DEC_WIDTH).to(dtype)
    norm = nn.LayerNorm(DEC_WIDTH).to(dtype)
    norms_s = (3 * DEC_LAYERS + 2) * best_of(lambda: norm(x), repeats)  # + embeddings, LM head
    logits = torch.randn(rows, VOCAB).to(dtype)

    def choose() -> Any:
        scores = torch.log_softmax(logits.float(), dim=-1).view(batch, BEAMS * VOCAB)
        return torch.topk(scores, 2 * BEAMS, dim=1)

    choice_s = best_of(choose, repeats)
    return {
        f"decoder {steps} steps' cross-attention ({cross_kind})": cross_s * steps / batch,
        f"decoder {steps} steps' self-attention ({self_kind})": self_s * steps / batch,
        f"decoder {steps} steps' layer norms": norms_s * steps / batch,
        f"decoder {steps} steps' beam choice (log-softmax, top-k)": choice_s * steps / batch,
    }


def matrix_work(batch: int, steps: int, elem_bytes: int) -> dict[str, float]:
    """FLOPs per image of each matrix-product part, and the decoder steps' bytes per image."""
    d = WIDTH // HEADS
    dec_weights = DEC_LAYERS * (6 * DEC_WIDTH**2 + 2 * DEC_WIDTH * DEC_MLP)
    dec_weights += DEC_WIDTH**2 + DEC_WIDTH * VOCAB  # LM head transform and vocabulary
    image_kv = DEC_LAYERS * 2 * TOKENS * DEC_WIDTH  # one image's keys and values, all layers
    return {
        "ViT linear layers": 2.0 * BLOCKS * TOKENS * (4 * WIDTH**2 + 2 * WIDTH * MLP),
        "ViT attention products": 2.0 * BLOCKS * HEADS * 2 * TOKENS**2 * d,
        "decoder image K/V": 2.0 * 2 * DEC_LAYERS * TOKENS * WIDTH * DEC_WIDTH,
        "decoder steps": 2.0 * steps * BEAMS * dec_weights,
        # every step reads all decoder weights once per batch, and each image's K/V once
        "decoder steps, bytes": steps * (dec_weights * elem_bytes / batch + image_kv * elem_bytes),
    }


def cpu_peak() -> dict[str, float] | str:
    """GFLOP/s per kind from cpu_peak.c, or why it could not run."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (cc) on this machine"
    with tempfile.TemporaryDirectory(prefix="cpu_peak-") as tmp:
        exe = Path(tmp) / "cpu_peak"
        build = [compiler, "-O2", "-fopenmp", str(PEAK_SOURCE), "-o", str(exe)]
        built = subprocess.run(build, capture_output=True, text=True, timeout=120)
        if built.returncode:
            return f"{' '.join(build)} failed: {built.stderr.strip()[-300:]}"
        ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    peaks = {}
    for line in ran.stdout.splitlines():
        kind, gflops, _threads = line.split()
        peaks[kind] = float(gflops) * 1e9
    return peaks or f"cpu_peak printed nothing (exit {ran.returncode})"


def copy_bandwidth(torch: Any, repeats: int) -> float:
    """Bytes per second read and written by a 512 MB tensor copy (DRAM, not cache)."""
    src = torch.ones(128 << 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_of(lambda: dst.copy_(src), repeats)


def roofline(torch: Any, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print and record the floor under any kernel: the arithmetic at the in-register peak."""
    peaks = cpu_peak()
    if isinstance(peaks, str) or args.precision not in peaks:
        why = peaks if isinstance(peaks, str) else f"this CPU has no {args.precision} unit"
        print(f"roofline skipped: {why}")
        result["roofline"] = {"skipped": why}
        return
    peak = peaks[args.precision]
    bandwidth = copy_bandwidth(torch, args.repeats)
    work = matrix_work(args.batch, args.steps, 2 if args.precision == "bf16" else 4)
    moved = work.pop("decoder steps, bytes")
    seconds = {name: flops / peak for name, flops in work.items()}
    seconds["decoder steps"] = max(seconds["decoder steps"], moved / bandwidth)
    floor = sum(seconds.values())
    print(
        f"\nroofline: {args.precision} in-register peak {peak / 1e9:.0f} GFLOP/s (cpu_peak.c), "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    for name, flops in work.items():
        print(f"{name:50} {seconds[name]:8.3f}   ({flops / 1e9:.1f} GFLOP)")
    print(f"{'decoder steps, memory traffic':50} {moved / bandwidth:8.3f}   ({moved / 1e9:.2f} GB)")
    print(f"{'roofline floor (nothing for softmax, norms, GELU)':50} {floor:8.3f}")
    kernel_share = floor / result["floor_s"]  # the existing kernels' floor, priced the same way
    result["roofline"] = {
        "peak_gflops": round(peak / 1e9, 1),
        "bandwidth_gbs": round(bandwidth / 1e9, 1),
        "floor_s": round(floor, 4),
        "kernel_floor_share_of_peak": round(kernel_share, 3),
    }
    print(f"the kernel floor above runs the arithmetic at {kernel_share:.0%} of peak")
    if args.stock_rps:
        stock_s = 1.0 / args.stock_rps
        print(f"at the roofline: at most {stock_s / floor:.2f}x stock")
        result["roofline"]["max_speedup_vs_stock"] = round(stock_s / floor, 2)
        if args.target:
            share = floor / (stock_s / args.target)
            print(
                f"{args.target:g}x stock = {stock_s / args.target:.3f} s per image end to end: "
                f"the whole service at {share:.0%} of the in-register peak"
            )
            result["roofline"]["target_share_of_peak"] = round(share, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--stock-rps", type=float, help="the reference server's req/s, same run")
    parser.add_argument("--roofline", action="store_true", help="add the in-register floor")
    parser.add_argument("--target", type=float, help="with --roofline: a speed-up to price")
    args = parser.parse_args(argv)

    from openmp_policy import apply_openmp_policy
    from settings import Settings

    apply_openmp_policy(Settings.from_env(dotenv_path=None))  # as the service does
    import torch

    from captioner.malloc_tuning import tune_malloc

    tune_malloc()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(describe(machine()) + f", torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.precision}, batch {args.batch}, {BEAMS} beams, {args.steps} decoder steps")
    with torch.inference_mode():
        ops = encoder_ops(torch, dtype, args.batch, args.repeats)
        ops |= decoder_ops(torch, dtype, args.batch, args.steps, args.repeats)
        ops |= decoder_step_ops(torch, dtype, args.batch, args.steps, args.repeats)
    floor = sum(t for name, t in ops.items() if not name.startswith("("))
    print(f"\n{'op (all blocks / steps)':50} {'s/image':>8}")
    for name, seconds in ops.items():
        print(f"{name:50} {seconds:8.3f}")
    print(f"{'floor: the sum (outside parentheses)':50} {floor:8.3f}")
    result: dict[str, Any] = {
        "precision": args.precision,
        "batch": args.batch,
        "steps": args.steps,
        "ops_s": {k: round(v, 4) for k, v in ops.items()},
        "floor_s": round(floor, 4),
    }
    if args.stock_rps:
        ceiling = 1.0 / args.stock_rps / floor
        print(
            f"stock {args.stock_rps:g} req/s = {1 / args.stock_rps:.2f} s per image: these kernels "
            f"alone allow at most {ceiling:.2f}x"
        )
        result["max_speedup_vs_stock"] = round(ceiling, 2)
    if args.roofline:
        roofline(torch, args, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
