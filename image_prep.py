"""BLIP's image preprocessing: torchvision's pipeline (what stock LAVIS builds) and the same
arithmetic in Pillow and NumPy (what the service runs on its request threads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay out of import time
    import torch
    from PIL import Image

    from captioner.spec import ModelSpec


def image_transform(spec: ModelSpec) -> Callable[[Image.Image], torch.Tensor]:
    """BLIP's eval preprocessing: exact square resize (bicubic), to tensor, CLIP normalise.

    torchvision's, as stock LAVIS builds it (the reference server and training use it); the
    service prepares with :func:`prepare_pixels`, which gives the same bits without torch."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return transforms.Compose(
        [
            transforms.Resize(
                (spec.image_size, spec.image_size), interpolation=InterpolationMode.BICUBIC
            ),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def prepare_pixels(image: Image.Image, spec: ModelSpec) -> torch.Tensor:
    """:func:`image_transform` bit for bit, in Pillow and NumPy, with no torch operator.

    Why: with libgomp every thread that enters a torch parallel region (ToTensor's copy and
    Normalize on 384x384x3 floats are large enough to be split) gets an OpenMP team of its own,
    whose idle threads then spin on the cores the inference thread needs. Request threads call
    this; only the inference thread runs torch. The arithmetic is the same float32 IEEE
    division and subtraction as torchvision's, so the result is identical (tested)."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    size = (spec.image_size, spec.image_size)
    resized = rgb.resize(size, PILImage.Resampling.BICUBIC) if rgb.size != size else rgb
    pixels = np.asarray(resized, dtype=np.uint8).astype(np.float32)
    pixels /= np.float32(255)
    pixels -= np.asarray(spec.mean, dtype=np.float32)
    pixels /= np.asarray(spec.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
