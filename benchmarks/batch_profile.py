"""Where a batch of 8 goes on the CPU: encoder, decoder steps, search loop, allocations, copies.

    python benchmarks/batch_profile.py [--batch 8] [--length 20] [--precision fp32] [--rounds 2]

Builds full-size blip_caption/large_coco with seeded random weights (as model_speed.py does) in
the service's own process set-up (malloc tuning of REST.py, the service's OpenMP wait policy
chosen before torch loads), then, interleaved over `--rounds` so drift hits every line alike:

- the encoder alone: one `forward_encoder` call for the whole batch, one per image, and the
  service's `Captioner.encode` (on a CPU in fp32: flat_encoder.py);
- the decoder alone on those embeddings (`fast_decode.generate`, 3 beams, fixed length), split
  by the profiler into image K/V, decoder steps and Hugging Face's search loop around them;
- the service's call, `Captioner.caption_prepared` on the batch (what the inference worker runs),

and prints per-image seconds, the floor (encoder alone + the decoder's share) and how far the
service's call is above it (target: within 10 %), the encoder's arithmetic against this
machine's best matrix-product rate in the same precision (how far any encoder could go), plus
the top CPU ops of one profiled batch.
fp32 captions of the service's call must equal stock LAVIS `generate` on the same batch. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_support import describe, machine  # noqa: E402

TARGET = 1.10


def encoder_flops(vit: Any) -> float:
    """Floating-point operations of one image through the ViT (2 per multiply-add): per block
    the qkv, projection and MLP matrix products plus the two attention products."""
    tokens = int(vit.patch_embed.num_patches) + 1
    width = int(vit.embed_dim)
    hidden = int(vit.blocks[0].mlp.fc1.out_features)
    per_block = tokens * width * (3 * width + width + 2 * hidden) + 2 * tokens * tokens * width
    return 2.0 * len(vit.blocks) * per_block


def gemm_rate(torch: Any, vit: Any, batch: int, dtype: Any, repeats: int = 5) -> float:
    """FLOP/s of this machine's best matrix product for the encoder: each of the ViT block's
    four linear layers over the whole batch's tokens in `dtype`, written into a preallocated
    output (a fresh 20-40 MB output would be mapped and faulted in on every call, which is the
    allocator's cost, not the arithmetic's), best of `repeats` after a warm-up. On the AMD EPYC
    of docs/performance.md this is the cores' peak: ~420 GFLOP/s bf16, ~200 fp32. In bf16 the
    packed oneDNN product (captioner/packed_linear.py) is timed too, and the faster one counts."""
    from captioner import packed_linear

    tokens = (int(vit.patch_embed.num_patches) + 1) * batch
    block = vit.blocks[0]
    best = 0.0
    with torch.inference_mode():
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            x = torch.randn(tokens, layer.in_features).to(dtype)
            w = torch.randn(layer.out_features, layer.in_features).to(dtype)
            b = torch.randn(layer.out_features).to(dtype)
            out = torch.empty(tokens, layer.out_features, dtype=dtype)
            flops = 2.0 * tokens * layer.in_features * layer.out_features
            runs = [functools.partial(torch.addmm, b, x, w.t(), out=out)]
            if packed_linear.available(dtype):  # what the service runs where it is faster
                packed = packed_linear._pack(w)
                runs.append(functools.partial(packed_linear._product, x, packed, b, "none"))
            for run in runs:
                for i in range(repeats + 1):
                    started = time.perf_counter()
                    run()
                    if i:
                        best = max(best, flops / (time.perf_counter() - started))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=20, help="min_length = max_length")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock caption check")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="glibc's malloc defaults")
    args = parser.parse_args(argv)

    from captioner.malloc_tuning import tune_malloc
    from openmp_policy import apply_openmp_policy
    from settings import Settings

    apply_openmp_policy(Settings.from_env(dotenv_path=None))  # as the service does
    tuned = False if args.no_malloc_tuning else tune_malloc()
    import torch
    from model_speed import build, make_images

    import blip2_model
    from captioner import fast_decode

    print(describe(machine()) + f", torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="batch_profile-") as tmp:
        model, spec = build(args.seed, Path(tmp))
    captioner = blip2_model.Captioner(model, spec, precision=args.precision, decode="fast")
    images = make_images(args.batch, args.seed)
    prepared = [captioner.prepare(img) for img in images]
    opts = blip2_model.GenerationOptions(
        num_beams=3, max_length=args.length, min_length=args.length
    )
    tok = model.tokenizer
    kw = {
        "max_length": args.length,
        "min_length": args.length,
        "eos_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
        "repetition_penalty": 1.0,
        "num_beams": 3,
        "num_return_sequences": 1,
    }
    pixels = torch.stack(prepared).to(captioner.dtype)
    ids = captioner._prompt_ids(captioner._prompt_text(opts), args.batch)
    print(
        f"model: large_coco random weights, {args.precision}, batch {args.batch}, 3 beams, "
        f"{args.length} tokens; malloc tuning {'on' if tuned else 'off'}"
    )

    def autocast() -> Any:
        return captioner._autocast()

    def encoder_batch() -> Any:
        with torch.inference_mode(), autocast():
            return model.forward_encoder({"image": pixels})

    def encoder_single() -> None:
        with torch.inference_mode(), autocast():
            for i in range(args.batch):
                model.forward_encoder({"image": pixels[i : i + 1]})

    def encoder_service() -> None:
        with torch.inference_mode(), autocast():
            captioner.encode(pixels)

    embeds = encoder_batch()  # warm-up, and the decoder's input

    def decoder() -> None:
        with torch.inference_mode(), autocast():
            fast_decode.generate(model.text_decoder, ids, embeds, **kw)

    def service() -> list[list[str]]:
        return captioner.caption_prepared(prepared, opts)

    captioner.caption_prepared(prepared[:1], opts)  # warm-up
    lines = {"encoder, whole batch": encoder_batch, "encoder, one image per call": encoder_single}
    lines |= {"encoder, the service's (encode)": encoder_service}
    lines |= {"decoder (fast_decode.generate)": decoder, "service call (caption_prepared)": service}
    times: dict[str, list[float]] = {name: [] for name in lines}
    for _ in range(args.rounds):
        for name, fn in lines.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) / args.batch)
    per_image = {name: statistics.median(v) for name, v in times.items()}

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decoder()
    found = {e.key: (e.cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    kv_s, _ = found.get(fast_decode.PROFILE_CROSS_KV, (0.0, 0))
    step_s, steps = found.get(fast_decode.PROFILE_STEP, (0.0, 0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as whole:
        service()

    encoder = min(v for k, v in per_image.items() if k.startswith("encoder"))
    floor = encoder + per_image["decoder (fast_decode.generate)"]
    ours = per_image["service call (caption_prepared)"]
    print(f"\n{'per image (median of ' + str(args.rounds) + ')':36} {'seconds':>8}")
    for name, value in per_image.items():
        print(f"{name:36} {value:8.3f}")
    decode_total = per_image["decoder (fast_decode.generate)"] * args.batch
    print(
        f"decoder split (one profiled batch): image K/V {kv_s:.2f} s + {steps} steps x "
        f"{step_s / max(steps, 1) * 1e3:.0f} ms + search loop "
        f"{max(decode_total - kv_s - step_s, 0.0):.2f} s (unprofiled total {decode_total:.2f} s)"
    )
    ratio = ours / floor
    print(
        f"floor = encoder alone {encoder:.3f} + decoder share "
        f"{per_image['decoder (fast_decode.generate)']:.3f} = {floor:.3f} s/image; service call "
        f"{ours:.3f} s/image = {ratio:.3f}x the floor (target <= {TARGET:g})"
    )
    flops = encoder_flops(model.visual_encoder)
    rate = gemm_rate(torch, model.visual_encoder, args.batch, captioner.dtype)
    ceiling = flops / rate
    print(
        f"encoder work {flops / 1e9:.0f} GFLOP per image; this machine's best {args.precision} "
        f"matrix product (the ViT's linear layers, whole batch) runs {rate / 1e9:.0f} GFLOP/s, "
        f"so the encoder needs at least {ceiling:.3f} s/image; measured {encoder:.3f} "
        f"({ceiling / encoder:.0%} of that rate)"
    )
    print("top ops of one service call (self CPU):")
    table = whole.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print("\n".join("  " + line for line in table.splitlines()))

    identical = None
    if args.precision == "fp32" and not args.no_stock:
        ours_caps = [c[0] for c in service()]
        with torch.no_grad():
            stock = model.generate(
                {"image": pixels}, num_beams=3, max_length=args.length, min_length=args.length
            )
        identical = ours_caps == stock
        print(f"captions identical to stock LAVIS generate: {identical}")
    print(
        json.dumps(
            {
                "batch": args.batch,
                "precision": args.precision,
                **{k: round(v, 4) for k, v in per_image.items()},
                "floor_s": round(floor, 4),
                "encoder_gflop": round(flops / 1e9, 1),
                "gemm_gflops": round(rate / 1e9, 1),
                "encoder_at_gemm_rate_s": round(ceiling, 4),
                "ratio_to_floor": round(ratio, 3),
                "decoder_kv_s": round(kv_s, 3),
                "decoder_steps": steps,
                "decoder_step_ms": round(step_s / max(steps, 1) * 1e3, 1),
                "identical_fp32": identical,
            }
        )
    )
    return 0 if ratio <= TARGET and identical is not False else 1


if __name__ == "__main__":
    sys.exit(main())
