"""The captioning model's front door: `Captioner` and the `python blip2_model.py` command.

The model room is the `captioner/` package (model families, fast decoding, spec, files, device
plan, memory and doctor; docs/architecture.md). This module is the entry the design card names:

- `Captioner.load(settings)` loads whichever model the settings name: BLIP v1 `blip_caption`
  (default `large_coco`, or a local one such as models/tiny-shapes) or BLIP-2 `blip2_opt` /
  `blip2_t5` (or a local one such as models/tiny-blip2), on the planned device and precision;
- `Captioner(model, spec, ...)` wraps an already built BLIP v1 model (tests, tools);
- ``python blip2_model.py doctor | download | caption IMAGE...`` is the command line.

Run ``python blip2_model.py download`` to fetch the configured model's files for an air-gapped
deploy; later starts touch no network.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.base import DECODERS, CaptionModel
from captioner.blip_build import (
    build_model,
    count_parameters,
    import_lavis,
    load_checkpoint,
    load_tokenizer,
    stock_generate,
    write_placeholder_tokenizer,
)
from captioner.blip_captioner import BlipCaptioner
from captioner.spec import (
    TOKENIZER_DIRNAME,
    ModelError,
    ModelFilesMissing,
    ModelSpec,
    lavis_spec,
    yaml_spec,
)
from captioning.options import GenerationOptions
from image_prep import image_transform, prepare_pixels

if TYPE_CHECKING:
    from captioner.device import DevicePlan
    from settings import Settings

log = logging.getLogger(__name__)

# The model's vocabulary, re-exported so callers need one import for "the model".
__all__ = [
    "DECODERS",
    "TOKENIZER_DIRNAME",
    "CaptionModel",
    "Captioner",
    "GenerationOptions",
    "ModelError",
    "ModelFilesMissing",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "image_transform",
    "import_lavis",
    "lavis_spec",
    "load_checkpoint",
    "load_tokenizer",
    "prepare_pixels",
    "stock_generate",
    "write_placeholder_tokenizer",
    "yaml_spec",
]


class Captioner(BlipCaptioner):
    """BLIP v1's captioner, and the loader of every family (`load`).

    Not thread-safe: one inference worker owns a loaded model (see captioning/batcher.py).
    """

    @classmethod
    def load(  # type: ignore[override]
        cls, settings: Settings, plan: DevicePlan | None = None
    ) -> CaptionModel:
        """Load the configured model (MODEL_CONFIG, else MODEL_NAME/MODEL_TYPE from MODEL_DIR)
        on the planned device; the plan comes first, so an unusable DEVICE fails before
        loading, and a model that cannot fit is refused before its weights are read."""
        from captioner.family import load_captioner

        return load_captioner(settings, plan)


# --------------------------------------------------------------------------- CLI


def _cli(argv: Sequence[str] | None = None) -> int:
    from captioner.files import add_download_parser, cli_download
    from settings import Settings

    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["doctor"]:  # its own flags (--device, --precision, --json)
        from captioner import doctor as model_doctor

        return model_doctor.main(args_in[1:])
    parser = argparse.ArgumentParser(prog="blip2_model.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_download_parser(sub)
    sub.add_parser("doctor", help="what this machine can run the model on, and why")
    cap = sub.add_parser("caption", help="caption image files with the configured model")
    cap.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(args_in)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    if args.command == "download":
        return cli_download(args, settings)

    from PIL import Image

    captioner = Captioner.load(settings)
    images = [Image.open(p).convert("RGB") for p in args.images]
    for path, caps in zip(args.images, captioner.caption(images), strict=True):
        print(json.dumps({"file": str(path), "caption": caps[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
