"""Hugging Face's beam-search bookkeeping with Python numbers instead of 0-d tensors.

`BeamSearchScorer.process` runs once per decoder step. For each image it walks the best
2 x beams candidates as 0-d tensors (`.item()` on each) and writes the survivors into three
tensors one element at a time: over a hundred tiny torch calls per step at batch 8. With the
tiny model that was a tenth of the model thread's time (py-spy, docs/performance.md). Here the
candidates are read with one `tolist()` each and the survivors written with one `torch.tensor`
each. Same decisions in the same order, same float32 scores (a float32 read into a Python float
and written back is exact), so the captions are identical (tests/test_fast_decode.py).

Only the plain scorer without `beam_indices` (what the fast decoders ask for) is switched;
anything else keeps Hugging Face's own `process`.
"""

from __future__ import annotations

import functools
from typing import Any


def adopt(scorer: Any) -> Any:
    """`scorer`, switched to the list-based `process` when it is a plain BeamSearchScorer."""
    from transformers.generation.beam_search import BeamSearchScorer

    if type(scorer) is BeamSearchScorer:
        scorer.__class__ = _list_scorer()
    return scorer


@functools.cache
def _list_scorer() -> type:
    from collections import UserDict

    import torch
    from transformers.generation.beam_search import BeamSearchScorer

    class ListBeamSearchScorer(BeamSearchScorer):  # type: ignore[misc]
        def process(
            self,
            input_ids: torch.Tensor,
            next_scores: torch.Tensor,
            next_tokens: torch.Tensor,
            next_indices: torch.Tensor,
            pad_token_id: int | None = None,
            eos_token_id: int | None = None,
            beam_indices: Any = None,
        ) -> Any:
            group = self.group_size
            batch_size = len(self._beam_hyps)
            if beam_indices is not None or batch_size != input_ids.shape[0] // group:
                return super().process(  # its own checks and messages
                    input_ids, next_scores, next_tokens, next_indices,
                    pad_token_id, eos_token_id, beam_indices,
                )  # fmt: skip
            cur_len = input_ids.shape[-1]
            scores, tokens = next_scores.tolist(), next_tokens.tolist()
            indices, best = next_indices.tolist(), next_scores.max(dim=1).values.tolist()
            done = self._done.tolist()
            out_scores: list[list[float]] = []
            out_tokens: list[list[int]] = []
            out_indices: list[list[int]] = []
            for batch_idx, beam_hyp in enumerate(self._beam_hyps):
                if done[batch_idx]:
                    if self.num_beams < len(beam_hyp):
                        raise ValueError(f"Batch can only be done after {self.num_beams} beams")
                    if eos_token_id is None or pad_token_id is None:
                        raise ValueError("A finished batch needs eos_token_id and pad_token_id")
                    out_scores.append([0.0] * group)
                    out_tokens.append([pad_token_id] * group)
                    out_indices.append([0] * group)
                    continue
                row_scores: list[float] = []
                row_tokens: list[int] = []
                row_indices: list[int] = []
                for rank, (token, score, index) in enumerate(
                    zip(tokens[batch_idx], scores[batch_idx], indices[batch_idx], strict=True)
                ):
                    batch_beam_idx = batch_idx * group + index
                    if eos_token_id is not None and token == eos_token_id:
                        if rank >= group:  # not among the top `group`: not a hypothesis
                            continue
                        beam_hyp.add(input_ids[batch_beam_idx].clone(), score, beam_indices=None)
                    else:
                        row_scores.append(score)
                        row_tokens.append(token)
                        row_indices.append(batch_beam_idx)
                    if len(row_scores) == group:
                        break
                if len(row_scores) < group:
                    raise ValueError(
                        f"At most {group} tokens in {tokens[batch_idx]} can be equal to "
                        f"`eos_token_id: {eos_token_id}`."
                    )
                out_scores.append(row_scores)
                out_tokens.append(row_tokens)
                out_indices.append(row_indices)
                done[batch_idx] = bool(beam_hyp.is_done(best[batch_idx], cur_len))
            self._done = torch.tensor(done, dtype=torch.bool, device=self._done.device)
            device = input_ids.device
            return UserDict(
                {
                    "next_beam_scores": torch.tensor(
                        out_scores, dtype=next_scores.dtype, device=device
                    ).view(-1),
                    "next_beam_tokens": torch.tensor(
                        out_tokens, dtype=next_tokens.dtype, device=device
                    ).view(-1),
                    "next_beam_indices": torch.tensor(
                        out_indices, dtype=next_indices.dtype, device=device
                    ).view(-1),
                }
            )

    return ListBeamSearchScorer
