"""captioner/cpu_attention.py: the matrix-product attention computes what the fused kernel does,
block by block, and the start-up choice keeps fused where it must (GPU, fp32)."""

from __future__ import annotations

import logging

import pytest

from captioner import cpu_attention


def qkv(batch: int, heads: int, queries: int, keys: int, dim: int, dtype: object) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(batch * 1000 + queries)
    q = torch.randn(batch, heads, queries, dim, generator=gen)
    k = torch.randn(batch, heads, keys, dim, generator=gen)
    v = torch.randn(batch, heads, keys, dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize(
    "shape",
    [
        (3, 12, 3, 577, 64),  # the decoder's beam rows: the whole batch in one product
        (3, 16, 577, 577, 64),  # ViT-L: 5.3M scores per image, one image per product
        (1, 4, 1, 7, 8),
    ],
)
def test_matmul_attention_matches_the_reference(shape: tuple) -> None:
    import torch
    import torch.nn.functional as F

    q, k, v = qkv(*shape, torch.float32)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    # fp32: the same function to rounding
    got32 = cpu_attention.matmul_attention(q, k, v)
    assert got32.dtype == torch.float32 and got32.shape == q.shape
    assert (got32.double() - exact).abs().max() < 1e-5
    # bf16: no further from exact than the fused kernel's bf16, within bf16 rounding
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    with torch.inference_mode():
        fused = cpu_attention.attend(cpu_attention.FUSED, qb, kb, vb)
        ours = cpu_attention.attend(cpu_attention.MATMUL, qb, kb, vb)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    err_fused = (fused.double() - exact).abs().max().item()
    err_ours = (ours.double() - exact).abs().max().item()
    assert err_ours <= 4 * err_fused + 1e-2, (err_ours, err_fused)


def test_matmul_attention_blocks_do_not_mix_batch_items() -> None:
    """Items computed in separate blocks give what each gives alone (and an explicit scale)."""
    import torch

    q, k, v = qkv(3, 16, 577, 577, 64, torch.bfloat16)
    assert cpu_attention.SCORE_BLOCK < 16 * 577 * 577 * 2  # so the 3 items span blocks
    whole = cpu_attention.matmul_attention(q, k, v, scale=0.1)
    for i in range(3):
        alone = cpu_attention.matmul_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], 0.1)
        assert torch.equal(whole[i : i + 1], alone)


def test_autocast_does_not_widen_the_scores() -> None:
    """Under bf16 autocast the result stays bf16 and equals the run without autocast."""
    import torch

    q, k, v = qkv(2, 4, 9, 9, 8, torch.bfloat16)
    plain = cpu_attention.matmul_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = cpu_attention.matmul_attention(q, k, v)
    assert under.dtype == torch.bfloat16 and torch.equal(under, plain)


def test_choice_is_fused_for_fp32_and_gpus(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    with caplog.at_level(logging.INFO, logger="captioner.cpu_attention"):
        assert cpu_attention.choose(torch.float32, 16, 577, 577, 64) == cpu_attention.FUSED
        assert (
            cpu_attention.choose(torch.bfloat16, 16, 577, 577, 64, device="cuda:0")
            == cpu_attention.FUSED
        )
    assert not caplog.records  # nothing was timed


def test_choice_times_both_on_a_cpu(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    with caplog.at_level(logging.INFO, logger="captioner.cpu_attention"):
        kind = cpu_attention.choose(torch.bfloat16, 12, 3, 577, 64, batch=8)
    assert kind in cpu_attention.KINDS
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith(f"attention 3x577 tokens, 12 heads, bfloat16: {kind} (fused ")
    assert "matrix products" in message
