"""Caption a folder written by `train_tiny_shapes.py --sample` with the tiny BLIP-2; score it.

    python scripts/train_tiny_shapes.py --sample 200 --seed 991 --out /tmp/fresh
    python scripts/eval_tiny_blip2.py [--model models/tiny-blip2/model.yaml] /tmp/fresh

The BLIP-2 twin of eval_tiny_shapes.py (which loads through blip2_model.Captioner, v1 only until
the family is wired in). Prints each wrong caption, then as its last line `accuracy: 0.97`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def evaluate(model_yaml: Path, folder: Path, batch_size: int = 32, decode: str = "fast") -> float:
    from PIL import Image

    from captioner.blip2_captioner import Blip2Captioner
    from captioner.blip2_spec import read_model_yaml, yaml_blip2_spec

    rows = [
        json.loads(line)
        for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if not rows:
        raise SystemExit(f"no captions in {folder / 'captions.jsonl'}")
    spec = yaml_blip2_spec(model_yaml, read_model_yaml(model_yaml))
    captioner = Blip2Captioner.load(spec, decode=decode)
    right = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = [Image.open(folder / row["file"]).convert("RGB") for row in chunk]
        for row, caps in zip(chunk, captioner.caption(images), strict=True):
            if caps[0].strip() == row["caption"]:
                right += 1
            else:
                print(f"{row['file']}: got {caps[0]!r}, expected {row['caption']!r}")
    return right / len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-blip2" / "model.yaml")
    parser.add_argument("--decode", choices=("fast", "stock"), default="fast")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    accuracy = evaluate(args.model, args.folder, decode=args.decode)
    print(f"accuracy: {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
