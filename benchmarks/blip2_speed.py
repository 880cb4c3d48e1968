#!/usr/bin/env python3
"""BLIP-2 OPT captioning: stock LAVIS `Blip2OPT.generate` vs our fast path, same run, same images.

- stock: `captioner.blip2_decode.stock_generate` = LAVIS's own `model.generate(samples, ...)`
  (it repeats the 32 query embeddings per beam and runs the language model's
  [queries + prompt] pass once per beam), also returning the token ids it made;
- ours: `query_embeds` + `opt_generate` + `decode_texts`, what `Blip2Captioner` runs with
  decode="fast" (the ViT, Q-Former and prefix pass once per image, their K/V cache repeated).

Both are timed from the same preprocessed pixels under `torch.inference_mode()` (preprocessing
and the empty-caption retry are outside the clock); both paths get the same options. The tiny
model uses the service's defaults (max_length 30, min_length 10: captions end by themselves);
full-size captions have a fixed length (min_length = prompt tokens + max_length, so exactly
max_length new tokens).

Two models:

- tiny: models/tiny-blip2/ (trained, fp32), tiny-shapes images, batch 1 and batch 8, each
  beam count of `--tiny-beams`; best of `--repeats` (stock and ours alternate which goes first);
- full: caption_coco_opt2.7b's architecture (EVA ViT-g, Q-Former, OPT-2.7b, 3.7 B parameters)
  from `captioner.blip2_random` with seeded random bf16 weights (no download), generated 364 px
  images, batch 1 then `--full-batch`, best of `--full-repeats` (2); then, if `--fp32` and
  enough memory is available, the same weights cast to fp32 (exact: bf16 -> fp32 loses
  nothing) for the identity check, one image, one timed run. Its model folder is made under
  /var/tmp (`--tmp-dir`) and deleted afterwards.

Random tied weights make OPT copy its last token forever (every image then reads
"w44542 w44542 …", a useless identity check), so the full-size cells penalise repetition
(`--full-repetition-penalty`, 1.5): captions then differ per image and each choice is among
near-ties (top logits ~0.03 apart), where any difference in arithmetic would show.

Token ids must be identical in fp32; in bf16 the report gives the agreement (rows identical, and
the share of caption positions before the first difference). Prints the machine and settings
first; the last line is JSON with every row.

Usage: `flock -x /tmp/cpu.lock python benchmarks/blip2_speed.py [--skip-full] [--fp32]
[--full-beams 5] [--full-tokens 8] [--full-batch 4] [--tiny-beams 3,5] [--threads N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "scripts", ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import bench_support  # noqa: E402

TINY_YAML = ROOT / "models" / "tiny-blip2" / "model.yaml"
FP32_MARGIN_GB = 3.0  # kept free beyond the fp32 cast's own growth (7.5 GB for 2.7b)


# --------------------------------------------------------------------------- machine


def mem_gb() -> dict[str, float]:
    """MemTotal and MemAvailable from /proc/meminfo, in GB (empty where unreadable)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = round(int(rest.split()[0]) / 1e6, 1)
    return out


def machine_info() -> dict[str, Any]:
    """bench_support's machine, plus the bf16 flags that decide CPU bf16 speed, memory, torch."""
    import torch

    info = bench_support.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["amx_bf16"] = "amx_bf16" in flags
    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    info.update(mem_gb())
    return info


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# --------------------------------------------------------------------------- the two paths


@dataclass
class Settings:
    beams: int
    tokens: int  # max_length: new tokens
    prompt: str
    min_length: int | None = None  # None: prompt tokens + `tokens`, i.e. exactly `tokens` new
    repetition_penalty: float = 1.0

    def kwargs(self, model: Any) -> dict[str, Any]:
        prompt_len = len(model.opt_tokenizer(self.prompt).input_ids)  # BOS included
        exact = prompt_len + self.tokens
        return {
            "num_beams": self.beams,
            "max_length": self.tokens,
            "min_length": exact if self.min_length is None else self.min_length,
            "repetition_penalty": self.repetition_penalty,
        }

    def describe(self) -> str:
        if self.min_length is None:
            text = f"{self.beams} beams, exactly {self.tokens} new tokens"
        else:
            text = f"{self.beams} beams, max_length {self.tokens}, min_length {self.min_length}"
        penalty = self.repetition_penalty
        return text + (f", repetition_penalty {penalty}" if penalty != 1.0 else "")


def stock(model: Any, pixels: Any, s: Settings) -> tuple[list[str], Any]:
    from captioner.blip2_decode import stock_generate

    return stock_generate(model, {"image": pixels, "prompt": s.prompt}, **s.kwargs(model))


def fast(model: Any, pixels: Any, s: Settings) -> tuple[list[str], Any]:
    """What Blip2Captioner._generate runs with decode="fast"."""
    from captioner.blip2_decode import decode_texts, opt_generate, query_embeds

    ids = opt_generate(model, query_embeds(model, pixels), s.prompt, **s.kwargs(model))
    prompt_len = model.opt_tokenizer(s.prompt, return_tensors="pt").input_ids.shape[1]
    return decode_texts(model, ids, prompt_len), ids


PATHS = {"stock": stock, "ours": fast}


def agreement(a: Any, b: Any, start: int) -> dict[str, Any]:
    """Rows of token ids `a` and `b` compared from position `start` (the first new token):
    rows identical, and the share of new-token positions before each row's first difference."""
    rows_a, rows_b = a.tolist(), b.tolist()
    same_rows, prefix = 0, 0.0
    for ra, rb in zip(rows_a, rows_b, strict=True):
        na, nb = ra[start:], rb[start:]
        same_rows += na == nb
        length = max(len(na), len(nb), 1)
        k = next((i for i, (x, y) in enumerate(zip(na, nb, strict=False)) if x != y), None)
        prefix += (min(len(na), len(nb)) if k is None else k) / length
    return {
        "identical": a.shape == b.shape and bool((a == b).all()),
        "rows_identical": f"{same_rows}/{len(rows_a)}",
        "prefix_agreement": round(prefix / max(len(rows_a), 1), 3),
    }


def compare(
    model: Any, batches: list[Any], s: Settings, repeats: int, label: str
) -> dict[str, Any]:
    """Seconds per image by each path (best of `repeats` over all batches), the ids compared."""
    import torch

    images = sum(int(b.shape[0]) for b in batches)
    best = {name: float("inf") for name in PATHS}
    ids: dict[str, list[Any]] = {name: [] for name in PATHS}
    texts: dict[str, list[str]] = {name: [] for name in PATHS}
    with torch.inference_mode():
        for r in range(repeats):
            order = list(PATHS) if r % 2 == 0 else list(PATHS)[::-1]
            for name in order:
                got_ids, got_texts = [], []
                start = time.perf_counter()
                for pixels in batches:
                    t, i = PATHS[name](model, pixels, s)
                    got_texts += t
                    got_ids.append(i)
                best[name] = min(best[name], (time.perf_counter() - start) / images)
                if r == 0:
                    ids[name], texts[name] = got_ids, got_texts
    prompt_len = model.opt_tokenizer(s.prompt, return_tensors="pt").input_ids.shape[1]
    agree = agreement(torch.cat(ids["stock"]), torch.cat(ids["ours"]), prompt_len)
    row = {
        "model": label,
        "batch": int(batches[0].shape[0]),
        "beams": s.beams,
        "max_length": s.tokens,
        "min_length": s.kwargs(model)["min_length"],
        "images": images,
        "stock_s": round(best["stock"], 4),
        "ours_s": round(best["ours"], 4),
        "speedup": round(best["stock"] / best["ours"], 2),
        "captions_identical": texts["stock"] == texts["ours"],
        **agree,
        "example": texts["ours"][0][:60],
        "distinct_captions": len(set(texts["ours"])),
    }
    print(
        f"  {label:13} batch {row['batch']} {s.describe()}: "
        f"stock {row['stock_s']:8.3f} s/img  ours {row['ours_s']:8.3f} s/img  "
        f"x{row['speedup']:.2f}  ids {'identical' if agree['identical'] else 'DIFFER'} "
        f"(rows {agree['rows_identical']}, prefix {agree['prefix_agreement']})",
        flush=True,
    )
    return row


def encoder_time(model: Any, pixels: Any) -> float:
    """Seconds per image for the part both paths share once per image (ViT, Q-Former)."""
    import torch

    from captioner.blip2_decode import query_embeds

    with torch.inference_mode():
        start = time.perf_counter()
        query_embeds(model, pixels)
        return (time.perf_counter() - start) / int(pixels.shape[0])


def warm(model: Any, pixels: Any, s: Settings, paths: tuple[str, ...] = tuple(PATHS)) -> None:
    """One short call per path (one beam, one token), so first-call set-up (oneDNN kernels,
    lazy imports) is not timed."""
    import torch

    short = Settings(beams=1, tokens=1, prompt=s.prompt)
    with torch.inference_mode():
        for name in paths:
            PATHS[name](model, pixels[:1], short)


# --------------------------------------------------------------------------- the models


def run_tiny(args: argparse.Namespace) -> list[dict[str, Any]]:
    import tiny_shapes
    from captioner.blip2_captioner import Blip2Captioner
    from captioner.blip2_spec import read_model_yaml, yaml_blip2_spec

    cap = Blip2Captioner.load(yaml_blip2_spec(TINY_YAML, read_model_yaml(TINY_YAML)))
    rng = random.Random(args.seed)
    images = [tiny_shapes.sample(rng)[0] for _ in range(args.tiny_images)]
    pixels = cap.preprocess(images)
    print(
        f"tiny BLIP-2 ({TINY_YAML.relative_to(ROOT)}): fp32, {args.tiny_images} tiny-shapes "
        f"images ({cap.spec.image_size} px, seed {args.seed}), prompt {cap.spec.prompt!r}, "
        f"best of {args.repeats}",
        flush=True,
    )
    rows = []
    for beams in args.tiny_beams:
        s = Settings(beams, args.tiny_max_length, cap.spec.prompt, args.tiny_min_length)
        warm(cap.model, pixels, s)
        for batch in (1, 8):
            batches = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
            rows.append(compare(cap.model, batches, s, args.repeats, "tiny fp32"))
    return rows


def run_full(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from model_speed import make_images

    from captioner.blip2_build import build_blip2, count_parameters, randomize_meta
    from captioner.blip2_captioner import Blip2Captioner
    from captioner.blip2_random import random_model_dir

    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="blip2_speed-", dir=args.tmp_dir))
    try:
        started = time.perf_counter()
        torch.manual_seed(args.seed)
        spec = random_model_dir("blip2_opt", "caption_coco_opt2.7b", tmp)
        model = build_blip2(spec).to(torch.bfloat16)
        randomize_meta(model, torch.bfloat16, seed=args.seed)
        cap = Blip2Captioner(model, spec, precision="bf16")
        print(
            f"\nfull-size {spec.name}: random weights (seed {args.seed}), "
            f"{count_parameters(model) / 1e9:.3f} B parameters, bf16, built in "
            f"{time.perf_counter() - started:.0f} s, peak RSS {peak_rss_gb():.1f} GB",
            flush=True,
        )
        n = max(2, args.full_batch)
        images = make_images(n, args.seed, size=spec.image_size)
        pixels = cap.preprocess(images).to(torch.bfloat16)
        s = Settings(
            args.full_beams, args.full_tokens, spec.prompt, None, args.full_repetition_penalty
        )
        print(
            f"  {n} generated images ({spec.image_size} px), prompt {s.prompt!r}, "
            f"{s.describe()}, best of {args.full_repeats} per cell (bf16)",
            flush=True,
        )
        warm(cap.model, pixels, s, paths=("ours",))  # the encoder is shared; stock needs none
        enc = encoder_time(cap.model, pixels[:1])
        print(f"  shared ViT-g + Q-Former, bf16: {enc:.2f} s/image", flush=True)
        singles = [pixels[i : i + 1] for i in range(2)]
        rows.append(compare(cap.model, singles, s, args.full_repeats, "opt2.7b bf16"))
        rows[-1]["encoder_s"] = round(enc, 3)
        if args.full_batch > 1:
            batch = [pixels[: args.full_batch]]
            rows.append(compare(cap.model, batch, s, args.full_repeats, "opt2.7b bf16"))
        if args.fp32:
            rows += run_full_fp32(args, cap, pixels, s)
        del cap, model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def run_full_fp32(args: argparse.Namespace, cap: Any, pixels: Any, s: Settings) -> list[Any]:
    """The same weights in fp32 (bf16 -> fp32 is exact), one image: ids must be identical."""
    import torch

    from captioner.blip2_build import count_parameters

    # The cast converts tensor by tensor (each bf16 one freed once its fp32 copy exists): it
    # needs 2 more bytes per parameter than this process holds now, plus a margin.
    needed = round(count_parameters(cap.model) * 2 / 1e9 + FP32_MARGIN_GB, 1)
    available = mem_gb().get("MemAvailable", 0.0)
    if available < needed:
        print(f"  fp32 full-size skipped: {available} GB available, {needed} GB needed")
        return [{"model": "opt2.7b fp32", "skipped": f"{available} GB free < {needed} GB"}]
    started = time.perf_counter()
    cap.model.to(torch.float32)
    print(
        f"  cast to fp32 in {time.perf_counter() - started:.0f} s "
        f"(peak RSS {peak_rss_gb():.1f} GB; MemAvailable was {available} GB)",
        flush=True,
    )
    fp32 = Settings(s.beams, args.fp32_tokens, s.prompt, None, s.repetition_penalty)
    x = pixels[:1].float()
    warm(cap.model, x, fp32, paths=("ours",))
    row = compare(cap.model, [x], fp32, 1, "opt2.7b fp32")
    row["peak_rss_gb"] = round(peak_rss_gb(), 1)
    return [row]


# --------------------------------------------------------------------------- main


def print_table(rows: list[dict[str, Any]]) -> None:
    head = "model | batch | beams | max/min length | stock s/image | ours s/image | speed-up | ids"
    print(f"\n| {head} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | — | — | — | skipped: {r['skipped']} | | | |")
            continue
        ids = "identical" if r["identical"] else f"rows {r['rows_identical']} identical"
        print(
            f"| {r['model']} | {r['batch']} | {r['beams']} | {r['max_length']}/{r['min_length']} "
            f"| {r['stock_s']:.3f} "
            f"| {r['ours_s']:.3f} | **{r['speedup']:.2f}×** | {ids} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="images and random weights")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="tiny: best of N")
    parser.add_argument("--tiny-images", type=int, default=16)
    parser.add_argument("--tiny-beams", default="3,5", help="comma-separated beam counts")
    parser.add_argument("--tiny-max-length", type=int, default=30, help="the service's default")
    parser.add_argument("--tiny-min-length", type=int, default=10, help="the service's default")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--full-beams", type=int, default=5)
    parser.add_argument("--full-repeats", type=int, default=2, help="bf16 cells: best of N")
    parser.add_argument("--full-tokens", type=int, default=8)
    parser.add_argument("--full-batch", type=int, default=4, help="second cell; 1 to skip it")
    parser.add_argument("--fp32", action="store_true", help="full-size fp32 identity check")
    parser.add_argument(
        "--full-repetition-penalty",
        type=float,
        default=1.5,
        help="random tied weights copy the last token forever (every image: 'w44542 w44542 …') "
        "unless repeating is penalised; 1.5 makes captions differ per image and the choices "
        "near-ties, a sharper identity check",
    )
    parser.add_argument("--fp32-tokens", type=int, default=6)
    parser.add_argument("--tmp-dir", default="/var/tmp", help="where the full-size folder goes")
    args = parser.parse_args(argv)
    args.tiny_beams = [int(b) for b in args.tiny_beams.split(",") if b]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from captioner.malloc_tuning import tune_malloc

    tuned = tune_malloc()  # as REST.py does: large buffers mapped, so freed memory goes back
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    bf16 = ", ".join(k for k in ("avx512_bf16", "amx_bf16") if info[k]) or "no bf16 instructions"
    print(bench_support.describe(info))
    print(
        f"  {bf16}; memory {info.get('MemTotal')} GB, available {info.get('MemAvailable')} GB; "
        f"torch {info['torch']}, {info['threads']} threads, OMP_WAIT_POLICY "
        f"{os.environ.get('OMP_WAIT_POLICY', 'default')}, malloc tuned {tuned}; "
        f"{platform.platform()}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    if not args.skip_tiny:
        rows += run_tiny(args)
    if not args.skip_full:
        rows += run_full(args)
    print_table(rows)
    ok = all(r.get("identical", True) for r in rows if "fp32" in r["model"])
    print(f"fp32 ids identical: {ok}; load average after: {os.getloadavg()[0]:.2f}")
    print(json.dumps({"machine": info, "rows": rows, "fp32_identical": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
