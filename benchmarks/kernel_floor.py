"""The fastest this machine's kernels could caption one large_coco image: a floor, not a target.

    python benchmarks/kernel_floor.py [--precision bf16] [--batch 8] [--steps 26] [--stock-rps R]

Times, one op at a time and best of `--repeats`, every kind of operation a batch of `--batch`
images goes through in the service's fast path: the ViT-L encoder's four linear layers, its
attention as three matrix-product steps (q K^T, softmax, P V; one image at a time, contiguous,
the best this machine runs them) and as PyTorch's fused kernel, its norms, GELU and residual
adds; the decoder's image keys and values; and `--steps` decoder steps' linear layers and LM
head over `batch x 3` beam rows, with distinct weights per layer (as in the model: they do not
stay in the cache). The sum, with nothing for beam search, the decoder's attention, Python,
HTTP or image decoding, is the floor of per-image time with these kernels. With `--stock-rps`
(the reference server's req/s measured in the same sitting) it prints the speed-up that floor
would give: a target above it needs faster kernels than this machine has, not a setting.

Shapes are large_coco's (ViT-L/16 at 384 px: 577 tokens, width 1024, MLP 4096, 16 heads, 24
blocks; BERT-base decoder: width 768, 3072, 12 layers, 30524-token vocabulary). `--steps` 26
is what the default options (max_length 30, 4 prompt tokens) give with random weights, whose
beams never stop early. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: lazy initialisation, first-touch of outputs
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


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
        layer = layer.to(dtype)
        per_block[f"linear {name}"] = best_of(lambda layer=layer, inp=inp: layer(inp), repeats)
    d = WIDTH // HEADS
    q, k, v = (torch.randn(1, HEADS, TOKENS, d).to(dtype) for _ in range(3))
    scale = d**-0.5
    scores = torch.matmul(q[0] * scale, k[0].transpose(-1, -2))
    probs = torch.softmax(scores, -1)
    one_image = {
        "attention q K^T": lambda: torch.matmul(q[0] * scale, k[0].transpose(-1, -2)),
        "attention softmax": lambda: torch.softmax(scores, -1),
        "attention P V": lambda: torch.matmul(probs, v[0]),
    }
    for name, fn in one_image.items():
        per_block[name] = batch * best_of(fn, repeats)
    qb, kb, vb = (torch.randn(batch, HEADS, TOKENS, d).to(dtype) for _ in range(3))
    fused = best_of(lambda: cpu_attention.attend(cpu_attention.FUSED, qb, kb, vb), repeats)
    matmul = best_of(lambda: cpu_attention.attend(cpu_attention.MATMUL, qb, kb, vb), repeats)
    norm = nn.LayerNorm(WIDTH).to(dtype)
    per_block["layer norms (2)"] = 2 * best_of(lambda: norm(x), repeats)
    per_block["GELU"] = best_of(lambda: nn.functional.gelu(hidden), repeats)
    per_block["residual adds (2)"] = 2 * best_of(lambda: x + x, repeats)
    out = {name: t * BLOCKS / batch for name, t in per_block.items()}
    out["(attention as one fused call)"] = fused * BLOCKS / batch
    out["(attention as service's matrix products)"] = matmul * BLOCKS / batch
    return out


def decoder_ops(torch: Any, dtype: Any, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Seconds per image: the image K/V projections, and `steps` steps' linear layers."""
    nn = torch.nn
    embeds = torch.randn(batch * TOKENS, WIDTH).to(dtype)
    kv = nn.Linear(WIDTH, DEC_WIDTH).to(dtype)
    kv_s = 2 * DEC_LAYERS * best_of(lambda: kv(embeds), repeats)
    rows = torch.randn(batch * BEAMS, DEC_WIDTH).to(dtype)
    wide = torch.randn(batch * BEAMS, DEC_MLP).to(dtype)
    # per layer: self q, k, v, out; cross q, out; MLP in and out. Distinct weights, as in the model.
    shapes = [(DEC_WIDTH, DEC_WIDTH)] * 6 + [(DEC_WIDTH, DEC_MLP), (DEC_MLP, DEC_WIDTH)]
    weights = [[nn.Linear(i, o).to(dtype) for i, o in shapes] for _ in range(DEC_LAYERS)] + [
        [nn.Linear(DEC_WIDTH, DEC_WIDTH).to(dtype), nn.Linear(DEC_WIDTH, VOCAB).to(dtype)]
    ]

    def step() -> None:
        for layer in weights:
            for lin in layer:
                lin(wide if lin.in_features == DEC_MLP else rows)

    step_s = best_of(step, repeats)
    return {
        "decoder image K/V": kv_s / batch,
        f"decoder {steps} steps' linear layers and LM head": step_s * steps / batch,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stock-rps", type=float, help="the reference server's req/s, same run")
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
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
