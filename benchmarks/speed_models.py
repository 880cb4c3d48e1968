"""The model that benchmarks/model_speed.py measures, the paths it captions by, and a profile of
where one image's time goes.

Split out of model_speed.py so the pieces other benchmarks reuse (`build`, `make_images`: see
batch_profile.py and blip2_speed.py, which import them through model_speed) live beside the
`Runner` that drives the three paths: stock LAVIS `generate`, and `blip2_model.Captioner.caption`
with the fast decoder in fp32 or a lower precision. The project root must be on sys.path (as
model_speed.py puts it) for the lazy imports of blip2_model and captioner.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- setup


def machine() -> dict[str, Any]:
    """Enough to compare numbers across machines (and to see a busy one)."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "loadavg_1m": round(load[0], 2),
    }


def make_images(n: int, seed: int, size: int = 480) -> list[Any]:
    """`n` distinct synthetic photos: a colour gradient with a few filled shapes."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images = []
    for _ in range(n):
        top = [rng.randrange(256) for _ in range(3)]
        bottom = [rng.randrange(256) for _ in range(3)]
        img = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(img)
        for y in range(size):
            t = y / (size - 1)
            draw.line(
                [(0, y), (size, y)],
                fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)),
            )
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randrange(size - 60), rng.randrange(size - 60)
            box = [x0, y0, x0 + rng.randint(40, size - x0), y0 + rng.randint(40, size - y0)]
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        images.append(img)
    return images


def build(seed: int, model_dir: Path) -> tuple[Any, Any]:
    """large_coco with seeded random weights and a placeholder 30522-word vocabulary."""
    import torch

    import blip2_model

    blip2_model.write_placeholder_tokenizer(model_dir / blip2_model.TOKENIZER_DIRNAME)
    spec = blip2_model.lavis_spec("blip_caption", "large_coco", model_dir)
    torch.manual_seed(seed)
    model = blip2_model.build_model(spec).eval()
    return model, spec


# --------------------------------------------------------------------------- the three paths


class Runner:
    """Captions a batch of images by one path; `length` fixes min_length = max_length.

    "Ours" is the service's own code path, `blip2_model.Captioner.caption`, so the benchmark
    measures exactly what a request runs (preprocessing included on both sides).
    """

    def __init__(self, model: Any, spec: Any, beams: int, length: int, device: str = "cpu") -> None:
        import blip2_model

        self.model = model
        self.spec = spec
        self.beams = beams
        self.length = length
        self.device = device
        self.captioner = blip2_model.Captioner(
            model, spec, device=device, precision="fp32", decode="fast"
        )

    def stock(self, images: list[Any], length: int | None = None) -> list[str]:
        """LAVIS's own BlipCaption.generate, as the reference service calls it."""
        import torch

        n = length or self.length
        pixels = self.captioner.preprocess(images).to(self.device)
        with torch.no_grad():
            return self.model.generate(
                {"image": pixels}, num_beams=self.beams, max_length=n, min_length=n
            )

    def fast(self, images: list[Any], length: int | None = None) -> list[str]:
        """Captioner.caption with the configured precision and the fast decoder."""
        import blip2_model

        n = length or self.length
        opts = blip2_model.GenerationOptions(num_beams=self.beams, max_length=n, min_length=n)
        return [caps[0] for caps in self.captioner.caption(images, opts)]

    def use_precision(self, precision: str, fp32_state: dict[str, Any] | None = None) -> None:
        """Rebuild the Captioner in `precision`. Low precision converts the weights in place: pass
        the fp32 state dict to start again from the exact fp32 weights, else do it last."""
        import torch

        import blip2_model

        if fp32_state is not None:
            self.model.to(dtype=torch.float32)
            self.model.load_state_dict(fp32_state)
        self.captioner = blip2_model.Captioner(
            self.model, self.spec, device=self.device, precision=precision, decode="fast"
        )

    def sync(self) -> None:
        """Wait for queued GPU work, so the clock measures it."""
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)


def timed(fn: Callable[[Any], list[str]], batches: list[Any]) -> tuple[float, list[str]]:
    """Seconds per image over all batches, and the captions in order."""
    captions: list[str] = []
    images = 0
    start = time.perf_counter()
    for batch in batches:
        captions += fn(batch)
        images += len(batch)
    return (time.perf_counter() - start) / images, captions


# --------------------------------------------------------------------------- profile


@contextlib.contextmanager
def profiled() -> Iterator[Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield prof


def label_totals(prof: Any, *labels: str) -> dict[str, tuple[float, int]]:
    """(total seconds, calls) of each record_function label in a profile."""
    found = {label: (0.0, 0) for label in labels}
    for event in prof.key_averages():
        if event.key in found:
            found[event.key] = (event.cpu_time_total / 1e6, event.count)
    return found


def run_profile(runner: Runner, pixels: Any, bf16_ok: bool) -> None:
    """Where one image's time goes: encoder vs decoder, and inside the decoder."""
    import torch

    import blip2_model
    from captioner import fast_decode

    model, tok = runner.model, runner.model.tokenizer
    tokens = runner.length
    print(f"\nProfile (1 image, {runner.beams} beams, {tokens} tokens incl. prompt)")

    ids = tok([runner.spec.prompt], return_tensors="pt").input_ids
    ids[:, 0] = tok.bos_token_id
    ids = ids[:, :-1]
    steps = tokens - ids.shape[1]
    kw = {
        "max_length": tokens,
        "min_length": tokens,
        "eos_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
        "repetition_penalty": 1.0,
        "num_beams": runner.beams,
        "num_return_sequences": 1,
    }
    image_tokens = None

    # Stock: encoder, then LAVIS decoding; inside it, the per-step image K/V projections.
    with torch.no_grad():
        start = time.perf_counter()
        embeds = model.forward_encoder({"image": pixels})
        enc = time.perf_counter() - start
        image_tokens = embeds.shape[1]
        with profiled() as prof:
            start = time.perf_counter()
            blip2_model.stock_generate(model.text_decoder, ids, embeds, **kw)
            dec = time.perf_counter() - start
    kv = sum(
        e.cpu_time_total / 1e6
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == "aten::linear"
        and e.input_shapes
        and len(e.input_shapes[0]) == 3
        and e.input_shapes[0][1] == image_tokens
    )
    print(
        f"  stock      encoder {enc:6.2f} s | decoder {dec:6.2f} s = {steps + 1} forward passes "
        f"x {dec / (steps + 1) * 1e3:6.0f} ms; image K/V re-projection {kv:6.2f} s "
        f"({kv / dec:.0%} of decoder, under the profiler)"
    )

    # Fast: encoder, image K/V once, decoder steps, and Hugging Face's search loop around them.
    modes = [("fast fp32", False)] + ([("fast bf16", True)] if bf16_ok else [])
    for name, bf16 in modes:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            start = time.perf_counter()
            embeds = model.forward_encoder({"image": pixels})
            enc = time.perf_counter() - start
            with profiled() as prof:
                start = time.perf_counter()
                fast_decode.generate(model.text_decoder, ids, embeds, **kw)
                dec = time.perf_counter() - start
        got = label_totals(prof, fast_decode.PROFILE_CROSS_KV, fast_decode.PROFILE_STEP)
        kv_s, _ = got[fast_decode.PROFILE_CROSS_KV]
        step_s, step_n = got[fast_decode.PROFILE_STEP]
        loop = max(dec - kv_s - step_s, 0.0)
        print(
            f"  {name:10} encoder {enc:6.2f} s | decoder {dec:6.2f} s = image K/V {kv_s:5.2f} s"
            f" + {step_n} steps x {step_s / max(step_n, 1) * 1e3:5.0f} ms"
            f" + search loop {loop:5.2f} s"
        )
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6)
        print("    top ops in the decoder:")
        print("\n".join("    " + line for line in table.splitlines()))
