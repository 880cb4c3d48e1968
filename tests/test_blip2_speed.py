"""benchmarks/blip2_speed.py's pieces: the id comparison, and one tiny BLIP-2 cell end to end
(stock LAVIS generate and our fast path give identical ids in fp32, times are reported)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import blip2_speed  # noqa: E402


def test_agreement_counts_rows_and_the_prefix_before_the_first_difference() -> None:
    import torch

    a = torch.tensor([[2, 9, 5, 6, 7], [2, 9, 5, 6, 7]])
    b = torch.tensor([[2, 9, 5, 6, 7], [2, 9, 5, 8, 7]])
    got = blip2_speed.agreement(a, b, start=2)
    assert got == {"identical": False, "rows_identical": "1/2", "prefix_agreement": 0.667}
    assert blip2_speed.agreement(a, a, start=2)["identical"] is True


def test_settings_fix_the_number_of_new_tokens() -> None:
    class Tok:
        def __call__(self, text: str):
            return type("T", (), {"input_ids": [2] + [0] * len(text.split())})()

    model = type("M", (), {"opt_tokenizer": Tok()})()
    exact = blip2_speed.Settings(beams=5, tokens=8, prompt="a photo of")
    assert exact.kwargs(model) == {
        "num_beams": 5,
        "max_length": 8,
        "min_length": 12,
        "repetition_penalty": 1.0,
    }
    free = blip2_speed.Settings(3, 30, "a photo of", 10)
    assert free.kwargs(model)["min_length"] == 10


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_cell_stock_and_ours_identical(batch: int) -> None:
    import random

    import tiny_shapes
    from captioner.blip2_captioner import Blip2Captioner
    from captioner.blip2_spec import read_model_yaml, yaml_blip2_spec

    yaml = blip2_speed.TINY_YAML
    cap = Blip2Captioner.load(yaml_blip2_spec(yaml, read_model_yaml(yaml)))
    rng = random.Random(3)
    pixels = cap.preprocess([tiny_shapes.sample(rng)[0] for _ in range(3)])
    batches = [pixels[i : i + batch] for i in range(0, 3, batch)]
    s = blip2_speed.Settings(3, 30, cap.spec.prompt, 10)
    row = blip2_speed.compare(cap.model, batches, s, repeats=2, label="tiny fp32")
    assert row["identical"] and row["captions_identical"] and row["rows_identical"] == "3/3"
    assert row["batch"] == batch and row["images"] == 3
    assert row["stock_s"] > 0 and row["ours_s"] > 0 and row["speedup"] > 0
