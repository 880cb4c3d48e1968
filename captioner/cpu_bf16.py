"""Whether PRECISION=bf16 pays on this CPU: its matrix products timed against fp32's.

Why: a CPU that can run bf16 (AVX-512 BF16 or AMX, oneDNN's check) is not always faster in it.
Without AMX some parts do bf16 dot products at half their fp32 rate: on an Intel Xeon (family 6
model 207, a Firecracker guest that does not expose AMX) `benchmarks/cpu_peak.c` measured 150-168
GFLOP/s bf16 against 337 fp32, and the full-size model served 3.17 s per image in bf16 against
2.52 in fp32 (docs/performance.md). There bf16 gives up identical captions and gets slower. AMD
Zen 4/5 and AMX parts run bf16 products 2x or more faster. CPU flags cannot tell these apart;
a timing can: one ViT-L MLP product (577 x 1024 x 4096, what dominates the encoder) per
precision, best of a few, about 0.1 s, on the thread that will run the model.

The service logs the advice at start-up (`family.load_captioner`) and `blip2_model.py doctor`
prints it; neither refuses bf16, which stays the operator's choice.
"""

from __future__ import annotations

from collections.abc import Callable

from captioner.timing import best_times

#: (rows, inputs, outputs): one image's tokens through ViT-L's fc1, the encoder's largest product.
SHAPE = (577, 1024, 4096)
#: bf16 below this fraction of fp32's product rate is worth a word.
MIN_SPEEDUP = 1.0


def bf16_speedup(rounds: int = 3) -> float:
    """bf16 product rate over fp32's on this CPU, with torch's current thread count. The bf16
    side is the faster of `F.linear` and oneDNN's packed product where that exists (what the
    service runs, see packed_linear.py)."""
    import torch
    import torch.nn.functional as F

    from captioner import packed_linear

    rows, inputs, outputs = SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inputs, generator=gen)
    weight = torch.randn(outputs, inputs, generator=gen) * inputs**-0.5
    bias = torch.zeros(outputs)
    xb, wb, bb = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    runs: dict[str, Callable[[], object]] = {
        "fp32": lambda: F.linear(x, weight, bias),
        "bf16": lambda: F.linear(xb, wb, bb),
    }
    if packed_linear.available(torch.bfloat16):
        packed = packed_linear._pack(wb)
        runs["bf16 packed"] = lambda: packed_linear._product(xb, packed, bb, "none")
    best = best_times(runs, rounds)
    return best["fp32"] / min(best["bf16"], best.get("bf16 packed", float("inf")))


def advice(speedup: float) -> str | None:
    """What to tell the operator for a measured `bf16_speedup`; None when bf16 pays."""
    if speedup >= MIN_SPEEDUP:
        return None
    return (
        f"bf16 matrix products run at {speedup:.2f}x the speed of fp32 on this CPU (bf16 "
        "dot products without AMX, or AMX not exposed to this machine): PRECISION=fp32 "
        "serves faster here, and its captions are identical to the reference"
    )


def check(device: str, precision: str, measure: Callable[[], float] = bf16_speedup) -> str | None:
    """The advice for this device and precision: only bf16 on a CPU is timed."""
    if precision != "bf16" or not device.startswith("cpu"):
        return None
    return advice(measure())
