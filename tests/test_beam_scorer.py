"""The list-based beam bookkeeping (captioner/beam_scorer.py) decides exactly as Hugging Face's.

Both scorers are fed the same random steps, with end-of-sentence tokens often among the
candidates so hypotheses finish and whole images are done; every output tensor, the finished
hypotheses and the final sequences must be identical.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.beam_search import BeamSearchScorer

from captioner.beam_scorer import adopt

EOS, PAD = 2, 0


def _pair(batch: int, beams: int, early: bool) -> tuple[BeamSearchScorer, BeamSearchScorer]:
    def make() -> BeamSearchScorer:
        return BeamSearchScorer(
            batch_size=batch, num_beams=beams, device="cpu", do_early_stopping=early
        )

    stock, ours = make(), adopt(make())
    assert type(ours) is not BeamSearchScorer and type(stock) is BeamSearchScorer
    return stock, ours


def _step(rng: random.Random, batch: int, beams: int, cur_len: int) -> tuple[torch.Tensor, ...]:
    width = 2 * beams
    input_ids = torch.randint(3, 50, (batch * beams, cur_len))
    scores = torch.rand(batch, width).mul(-cur_len).sort(dim=1, descending=True).values
    if rng.random() < 0.3:  # equal scores: the order of candidates must be kept
        scores[:, 1] = scores[:, 0]
    tokens = torch.randint(3, 50, (batch, width))
    for b in range(batch):
        for k in range(width):
            if rng.random() < 0.25:
                tokens[b, k] = EOS
        if sum(int(t) == EOS for t in tokens[b]) > beams:  # at most `beams` may end
            tokens[b, beams:] = torch.randint(3, 50, (beams,))
    indices = torch.randint(0, beams, (batch, width))
    return input_ids, scores, tokens, indices


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_same_decisions_as_hugging_face(seed: int, early: bool) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    batch, beams = 5, 3
    stock, ours = _pair(batch, beams, early)
    for cur_len in range(2, 14):
        args = _step(rng, batch, beams, cur_len)
        a = stock.process(*args, pad_token_id=PAD, eos_token_id=EOS)
        b = ours.process(*args, pad_token_id=PAD, eos_token_id=EOS)
        for key in ("next_beam_scores", "next_beam_tokens", "next_beam_indices"):
            assert a[key].dtype == b[key].dtype
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(stock._done, ours._done)
        for hs, ho in zip(stock._beam_hyps, ours._beam_hyps, strict=True):
            assert [s for s, _, _ in hs.beams] == [s for s, _, _ in ho.beams]
            pairs = zip(hs.beams, ho.beams, strict=True)
            assert all(torch.equal(x, y) for (_, x, _), (_, y, _) in pairs)
        if stock.is_done:
            break
    assert any(len(h) for h in stock._beam_hyps), "no hypothesis ever finished: a weak test"
    final_ids = torch.randint(3, 50, (batch * beams, cur_len + 1))
    final_scores = torch.rand(batch * beams)
    end = {"max_length": 20, "pad_token_id": PAD, "eos_token_id": EOS}
    fa = stock.finalize(final_ids, final_scores, None, None, **end)
    fb = ours.finalize(final_ids, final_scores, None, None, **end)
    assert torch.equal(fa["sequences"], fb["sequences"])
    assert torch.equal(fa["sequence_scores"], fb["sequence_scores"])


def test_too_many_ends_is_refused_like_hugging_face() -> None:
    stock, ours = _pair(1, 2, False)
    ids = torch.randint(3, 50, (2, 3))
    scores = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    tokens = torch.tensor([[EOS, EOS, EOS, EOS]])
    indices = torch.tensor([[0, 1, 0, 1]])
    for scorer in (stock, ours):
        with pytest.raises(ValueError, match="eos_token_id"):
            scorer.process(ids, scores, tokens, indices, pad_token_id=PAD, eos_token_id=EOS)


def test_other_scorers_are_left_alone() -> None:
    from transformers.generation.beam_constraints import PhrasalConstraint
    from transformers.generation.beam_search import ConstrainedBeamSearchScorer

    scorer = ConstrainedBeamSearchScorer(
        batch_size=1, num_beams=2, constraints=[PhrasalConstraint([5])], device="cpu"
    )
    assert type(adopt(scorer)) is ConstrainedBeamSearchScorer
