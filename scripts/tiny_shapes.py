"""The tiny-shapes world: images of coloured shapes and their one true caption.

Shared by the training script, the evaluation script and the tests, so every image the project
draws follows the same rules. Deterministic for a given `random.Random`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (135, 45, 175),
    "orange": (245, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (18, 18, 18),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
WORDS = sorted(
    {"a", "picture", "of", "on", "background"}
    | set(COLOURS)
    | set(BACKGROUNDS)
    | set(COUNT_WORDS.values())
    | set(SHAPES)
    | {s + "s" for s in SHAPES}
)


@dataclass(frozen=True)
class Scene:
    """What an image shows; `caption` is its exact expected caption."""

    count: int
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun} on a {self.background} background"


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        count=rng.randint(1, 3),
        colour=rng.choice(sorted(COLOURS)),
        shape=rng.choice(SHAPES),
        background=rng.choice(sorted(BACKGROUNDS)),
    )


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
    return (r, g, b)


def draw(scene: Scene, rng: random.Random, size: int | None = None) -> Image.Image:
    """Draw `scene` on a square canvas with shapes of varied size and position, not touching."""
    side = size or rng.randint(96, 192)
    img = Image.new("RGB", (side, side), _jitter(BACKGROUNDS[scene.background], rng, 10))
    pen = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < scene.count:
        placed = []
        for _ in range(200):
            r = rng.uniform(0.12, 0.19) * side
            x = rng.uniform(r + 2, side - r - 2)
            y = rng.uniform(r + 2, side - r - 2)
            if all(math.hypot(x - px, y - py) > r + pr + 4 for px, py, pr in placed):
                placed.append((x, y, r))
                if len(placed) == scene.count:
                    break
    colour = _jitter(COLOURS[scene.colour], rng, 12)
    for x, y, r in placed:
        if scene.shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif scene.shape == "square":
            h = r * 0.85
            pen.rectangle((x - h, y - h, x + h, y + h), fill=colour)
        else:
            pen.polygon(
                [(x, y - r), (x - r * 0.95, y + r * 0.8), (x + r * 0.95, y + r * 0.8)],
                fill=colour,
            )
    return img


def sample(rng: random.Random) -> tuple[Image.Image, str]:
    """One random image with its caption."""
    scene = random_scene(rng)
    return draw(scene, rng), scene.caption
