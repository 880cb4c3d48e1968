#!/usr/bin/env python3
"""Captions and token ids of the tiny-shapes model, to compare two Python stacks exactly.

Why: the GPU kit runs our pinned transformers 4.25.1 with the Rust `tokenizers` hidden, on
another Python, torch and NumPy. "It imports" is not enough: the words must map to the same ids
and the decoder must pick the same ids. build.sh runs this in the project's own environment and
stores the result in the kit (reference/); run.sh runs it on the host and compares.

Recorded: the tokenizer's ids and tokens for a fixed set of texts (the prompt, punctuation,
accents, CJK, emoji, special tokens, every generated caption), its special-token ids and size;
for each image (the shipped samples, seeded tiny-shapes scenes, seeded noise) the captions with
the default options, with 4 beams x 2 captions and with a prompt; and the generated token ids of
both decoders (fast_decode and Hugging Face's generate). Only deterministic options: no sampling.

    caption_check.py --out FILE [--device cpu] [--precision fp32]
    caption_check.py --compare REFERENCE [--out FILE] [--device cuda --precision fp16 --report]
With --compare the exit status is 1 when anything differs, unless --report (GPU precisions
need not be identical; the share is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
for _path in (str(ROOT / "scripts"), str(ROOT)):  # blip2_model, tiny_shapes when run as a script
    if _path not in sys.path:
        sys.path.insert(0, _path)

TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"
TEXTS = (
    "a picture of ",
    "a picture of three red circles on a black background",
    "Hello, World! It's 3.14 - isn't it?",
    "Ünïcödé naïve café, déjà vu",
    "東京 and 😀 emoji",
    "[DEC] [ENC] [SEP] [PAD] [UNK]",
    "   spaces\tand\nnewlines   ",
    "",
)
SCENES = 40
NOISE = 4


def images() -> list[tuple[str, Any]]:
    """(name, image): the shipped samples, seeded scenes and seeded noise (no NumPy RNG: its
    streams may change between NumPy versions, Python's `random` does not)."""
    from PIL import Image

    import tiny_shapes

    out = [
        (p.name, Image.open(p).convert("RGB"))
        for p in sorted((TINY_YAML.parent / "samples").glob("*.png"))
    ]
    rng = random.Random(20261124)
    out += [(f"scene-{i}", tiny_shapes.sample(rng)[0]) for i in range(SCENES)]
    for i in range(NOISE):
        noise = random.Random(i).randbytes(96 * 96 * 3)
        out.append((f"noise-{i}", Image.frombytes("RGB", (96, 96), noise)))
    return out


def tokenizer_record(tok: Any, texts: list[str]) -> dict[str, Any]:
    return {
        "class": type(tok).__name__,
        "size": len(tok),
        "special": {
            "bos": tok.bos_token_id,
            "sep": tok.sep_token_id,
            "pad": tok.pad_token_id,
            "cls": tok.cls_token_id,
            "enc": tok.enc_token_id,
        },
        "ids": {t: tok(t).input_ids for t in texts},
        "tokens": {t: tok.tokenize(t) for t in texts},
    }


def generated_ids(captioner: Any, pictures: list[Any]) -> dict[str, list[list[int]]]:
    """Token ids both decoders generate with the default options (prompt included)."""
    import torch

    import blip2_model
    from captioner import fast_decode

    opts = captioner.check_options(blip2_model.GenerationOptions())
    tok = captioner.tokenizer
    pixels = captioner.preprocess(pictures).to(device=captioner.device, dtype=captioner.dtype)
    prompt = tok([captioner.spec.prompt] * len(pictures), return_tensors="pt").input_ids
    prompt[:, 0] = tok.bos_token_id
    prompt = prompt[:, :-1].to(captioner.device)
    kw = {
        "max_length": opts.max_length,
        "min_length": opts.min_length,
        "eos_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
        "repetition_penalty": opts.repetition_penalty,
        "num_beams": opts.num_beams,
        "num_return_sequences": 1,
    }
    autocast = (
        contextlib.nullcontext()
        if captioner.precision == "fp32"
        else torch.autocast(captioner.device.split(":")[0], dtype=captioner.dtype)
    )
    decoder = captioner.model.text_decoder
    with torch.inference_mode(), autocast:
        embeds = captioner.model.forward_encoder({"image": pixels})
        fast = fast_decode.generate(decoder, prompt, embeds, **kw)
        stock = blip2_model.stock_generate(decoder, prompt, embeds, **kw)
    return {"fast": fast.tolist(), "stock": stock.tolist()}


def record(device: str, precision: str) -> dict[str, Any]:
    import numpy
    import torch
    import transformers

    import blip2_model
    from settings import Settings

    settings = Settings().with_overrides(
        model_config=TINY_YAML, device=device, precision=precision, model_download=False
    )
    captioner = blip2_model.Captioner.load(settings)
    named = images()
    names, pictures = [n for n, _ in named], [p for _, p in named]
    option_sets = {
        "default": blip2_model.GenerationOptions(),
        "beams4x2": blip2_model.GenerationOptions(num_beams=4, num_captions=2),
        "prompt": blip2_model.GenerationOptions(prompt="three"),
    }
    captions = {key: captioner.caption(pictures, opts) for key, opts in option_sets.items()}
    ids = generated_ids(captioner, pictures)
    tok = captioner.tokenizer
    strip = len(captioner.spec.prompt)
    decoded = [t[strip:] for t in tok.batch_decode(ids["fast"], skip_special_tokens=True)]
    texts = list(TEXTS) + sorted({c for caps in captions.values() for cc in caps for c in cc})
    return {
        "meta": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
            "device": captioner.device,
            "precision": captioner.precision,
        },
        "images": names,
        "tokenizer": tokenizer_record(tok, texts),
        "captions": captions,
        "ids": ids,
        "ids_decode_to_captions": decoded == [c[0] for c in captions["default"]],
    }


def compare(got: dict[str, Any], ref: dict[str, Any]) -> tuple[list[str], bool]:
    """Lines of a comparison and whether everything is identical."""
    lines = []
    same_all = got["images"] == ref["images"]
    if not same_all:
        lines.append("DIFFERENT image sets (the check itself changed?)")
    for key in sorted(ref["captions"]):
        a, b = got["captions"].get(key, []), ref["captions"][key]
        same = sum(x == y for x, y in zip(a, b, strict=False))
        same_all &= same == len(b) == len(a)
        lines.append(f"captions {key:9} {same}/{len(b)} identical")
    for key in sorted(ref["ids"]):
        a, b = got["ids"].get(key, []), ref["ids"][key]
        same = sum(x == y for x, y in zip(a, b, strict=False))
        same_all &= same == len(b) == len(a)
        lines.append(f"token ids {key:8} {same}/{len(b)} generated sequences identical")
    gt, rt = got["tokenizer"], ref["tokenizer"]
    texts = [t for t in rt["ids"] if t in gt["ids"]]
    same = sum(gt["ids"][t] == rt["ids"][t] and gt["tokens"][t] == rt["tokens"][t] for t in texts)
    meta_same = all(gt[k] == rt[k] for k in ("class", "size", "special"))
    same_all &= same == len(rt["ids"]) and meta_same
    lines.append(
        f"tokenizer {gt['class']} (reference {rt['class']}): {same}/{len(rt['ids'])} texts give "
        f"identical ids and tokens; size and special ids {'identical' if meta_same else 'DIFFER'}"
    )
    lines.append(f"generated ids decode to the captions: {got['ids_decode_to_captions']}")
    same_all &= bool(got["ids_decode_to_captions"])
    return lines, same_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, help="write the record here (JSON)")
    parser.add_argument("--compare", type=Path, help="reference record to compare with")
    parser.add_argument("--report", action="store_true", help="differences do not fail")
    args = parser.parse_args(argv)
    got = record(args.device, args.precision)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(got, ensure_ascii=False, indent=1), encoding="utf-8")
    meta = got["meta"]
    print(
        f"tiny-shapes on {meta['device']} {meta['precision']}: python {meta['python']}, torch "
        f"{meta['torch']}, transformers {meta['transformers']}, numpy {meta['numpy']}; "
        f"{len(got['images'])} images"
    )
    if not args.compare:
        return 0
    ref = json.loads(args.compare.read_text(encoding="utf-8"))
    rm = ref["meta"]
    print(
        f"reference: python {rm['python']}, torch {rm['torch']}, transformers "
        f"{rm['transformers']}, numpy {rm['numpy']}, {rm['device']} {rm['precision']}"
    )
    lines, identical = compare(got, ref)
    print("\n".join("  " + line for line in lines))
    print("IDENTICAL to the reference" if identical else "DIFFERENT from the reference")
    return 0 if identical or args.report else 1


if __name__ == "__main__":
    sys.exit(main())
