"""captioner/packed_linear.py: products on oneDNN-packed weights compute what `F.linear` does.

Real LAVIS modules (the ViT's `Mlp`, BERT's intermediate and LM-head transform) and the
project's tiny-shapes model in bf16; nothing is mocked. Packed products are compared bit for
bit with `F.linear`; the fused GELU (one rounding instead of two) within a bf16 rounding step.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest

import tiny_shapes
from captioner import packed_linear

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"


@pytest.fixture(scope="module")
def torch() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine's 2 cores are shared: see test_fast_decode.py
    yield torch
    torch.set_num_threads(before)


def _linear(torch: Any, inputs: int, outputs: int, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Linear(inputs, outputs).to(torch.bfloat16).eval()


def test_available_only_for_bf16_on_cpu(torch: Any) -> None:
    # This project's torch is built with oneDNN: packed bf16 products exist on every CI CPU.
    assert packed_linear.available(torch.bfloat16, "cpu")
    assert not packed_linear.available(torch.float32, "cpu")
    assert not packed_linear.available(torch.float16, "cpu")
    assert not packed_linear.available(torch.bfloat16, "cuda:0")


@pytest.mark.parametrize("shape", [(24, 96), (3, 5, 96), (7, 96)])
def test_packed_product_is_bit_identical_to_linear(torch: Any, shape: tuple[int, ...]) -> None:
    lin = _linear(torch, 96, 160)
    x = torch.randn(*shape).to(torch.bfloat16)
    with torch.inference_mode():
        want = lin(x)
        assert packed_linear.pack_model(lin) == 1
        got = lin(x)
        # a non-contiguous input (a slice of a wider tensor) gives the same numbers too
        xt = torch.cat([x, x], dim=-1)[..., :96]
        assert not xt.is_contiguous()
        got_t = lin(xt)
    assert "_packed_weight" in lin.__dict__
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(got_t, want)


def test_fp32_input_under_autocast_matches_autocast_linear(torch: Any) -> None:
    """Under bf16 autocast F.linear casts an fp32 input (a layer norm's output) to bf16; so
    does the packed product."""
    lin = _linear(torch, 64, 64, seed=1)
    x = torch.randn(10, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = lin(x)
        packed_linear.pack_model(lin)
        got = lin(x)
    assert torch.equal(got, want)


def test_grad_and_training_run_the_original(torch: Any) -> None:
    """Packed products carry no autograd: with grad on (or in training) the module's own
    forward runs and gradients flow."""
    lin = _linear(torch, 32, 16, seed=2)
    packed_linear.pack_model(lin)
    x = torch.randn(4, 32).to(torch.bfloat16)
    out = lin(x)
    assert out.requires_grad
    out.float().sum().backward()
    assert lin.weight.grad is not None
    lin.train()
    with torch.no_grad():
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_changed_weights_are_packed_again(torch: Any) -> None:
    """A reload (load_state_dict copies in place), an in-place edit or a cast after packing:
    the next call computes with the weights the module has now, never the packed copy."""
    lin = _linear(torch, 48, 48, seed=4)
    x = torch.randn(5, 48).to(torch.bfloat16)
    packed_linear.pack_model(lin)
    other = _linear(torch, 48, 48, seed=5).state_dict()
    with torch.inference_mode():
        lin(x)
    lin.load_state_dict(other)
    with torch.inference_mode():
        assert torch.equal(lin(x), torch.nn.functional.linear(x, other["weight"], other["bias"]))
    with torch.no_grad():
        lin.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    lin.float()
    with torch.inference_mode():
        assert lin(x.float()).dtype == torch.float32  # the module's own fp32 forward
        assert torch.equal(
            lin(x.float()), torch.nn.functional.linear(x.float(), lin.weight, lin.bias)
        )


def test_fp32_modules_are_left_alone(torch: Any) -> None:
    lin = torch.nn.Linear(8, 8).eval()
    assert packed_linear.pack_model(lin) == 0
    assert "forward" not in lin.__dict__


def _lavis_blocks(torch: Any) -> dict[str, Any]:
    """One of each GELU container, as LAVIS builds them, in bf16."""
    from lavis.models.med import BertIntermediate, BertPredictionHeadTransform
    from lavis.models.vit import Mlp
    from transformers import BertConfig

    torch.manual_seed(3)
    config = BertConfig(hidden_size=64, intermediate_size=256, hidden_act="gelu")
    return {
        "Mlp": Mlp(64, 256).to(torch.bfloat16).eval(),
        "BertIntermediate": BertIntermediate(config).to(torch.bfloat16).eval(),
        "BertPredictionHeadTransform": BertPredictionHeadTransform(config)
        .to(torch.bfloat16)
        .eval(),
    }


@pytest.mark.parametrize("kind", sorted(packed_linear._GELU_CONTAINERS))
def test_gelu_is_fused_into_the_product(torch: Any, kind: str) -> None:
    block = _lavis_blocks(torch)[kind]
    x = torch.randn(2, 9, 64).to(torch.bfloat16)
    with torch.inference_mode():
        want = block(x).float()
        packed_linear.pack_model(block)
        got = block(x).float()
    assert "_packed_gelu" in block.__dict__
    assert got.shape == want.shape
    # GELU of the fp32 sum rounded once, against GELU of the rounded sum rounded again: the
    # two differ by at most a bf16 rounding step of the result (plus what fc2/LN carry on).
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2**-6 * scale
    assert not torch.equal(got, torch.zeros_like(got))


def test_approximate_gelu_is_not_fused(torch: Any) -> None:
    from lavis.models.vit import Mlp

    mlp = Mlp(32, 64, act_layer=lambda: torch.nn.GELU(approximate="tanh"))
    mlp = mlp.to(torch.bfloat16).eval()
    assert packed_linear.pack_model(mlp) == 2  # both linears packed ...
    assert "_packed_gelu" not in mlp.__dict__  # ... but a tanh GELU is not oneDNN's exact one


def test_pack_is_idempotent_and_unpack_restores(torch: Any) -> None:
    blocks = torch.nn.ModuleList(_lavis_blocks(torch).values())
    keys = list(blocks.state_dict())
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.inference_mode():
        before = [b(x) for b in blocks]
        assert packed_linear.pack_model(blocks) == 4
        assert packed_linear.pack_model(blocks) == 4
        assert list(blocks.state_dict()) == keys  # the module tree is unchanged
        packed_linear.unpack_model(blocks)
        after = [b(x) for b in blocks]
    for module in blocks.modules():
        assert not {"forward", "_packed_weight", "_packed_gelu"} & set(module.__dict__)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_choose_times_both_and_logs(torch: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="captioner.packed_linear"):
        chosen = packed_linear.choose(torch.bfloat16, [(24, 64, 256), (24, 256, 64)], rounds=1)
    assert isinstance(chosen, bool)
    line = next(r.getMessage() for r in caplog.records if "linear layers" in r.getMessage())
    assert ("packed" if chosen else "plain") in line.split("(")[0]
    assert "plain" in line and "ms" in line
    assert packed_linear.choose(torch.float32, [(24, 64, 64)]) is False


@pytest.fixture(scope="module")
def tiny_bf16(torch: Any) -> Any:
    from blip2_model import Captioner
    from settings import Settings

    return Captioner.load(
        Settings().with_overrides(model_config=TINY_YAML, device="cpu", precision="bf16")
    )


def test_tiny_model_in_bf16_captions_correctly_packed(torch: Any, tiny_bf16: Any) -> None:
    """The tiny model captions its shapes as well packed as plain, in bf16, and the choice made
    at start-up is applied to every linear layer or to none."""
    linears = [m for m in tiny_bf16.model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(("_packed_weight" in m.__dict__) == tiny_bf16.packed for m in linears)
    rng = random.Random(17)
    pairs = [tiny_shapes.sample(rng) for _ in range(64)]
    images, truth = [p[0] for p in pairs], [p[1] for p in pairs]
    packed_linear.pack_model(tiny_bf16.model)
    try:
        packed = [c[0] for c in tiny_bf16.caption(images)]
    finally:
        packed_linear.unpack_model(tiny_bf16.model)
        if tiny_bf16.packed:
            packed_linear.pack_model(tiny_bf16.model)
    accuracy = sum(g == t for g, t in zip(packed, truth, strict=True)) / len(truth)
    assert accuracy >= 0.95, accuracy
