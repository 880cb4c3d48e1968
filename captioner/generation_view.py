"""The common shape of a model as Hugging Face `generate()` sees it, for our fast decoders.

Both fast paths (BLIP v1's cached cross-attention in fast_decode.py, BLIP-2's prefilled OPT in
blip2_decode.py) hand `generate()` a thin view over LAVIS's own modules rather than a copy of
them: it holds no weights, says which input is the main one, where it runs, and counts the
steps it was asked for. Built on first use, so importing a decoder module stays cheap.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def generation_view() -> type:
    """The base class (a `GenerationMixin`) of every view; a subclass supplies `forward`,
    `prepare_inputs_for_generation` and `_reorder_cache`."""
    from transformers.generation import GenerationMixin

    class GenerationView(GenerationMixin):
        main_input_name = "input_ids"

        def __init__(self, module: Any) -> None:
            self.module = module  # the LAVIS module whose weights every step uses
            self.config = module.config
            self.steps = 0

        @property
        def device(self) -> Any:
            return self.module.device

        def __call__(self, **kwargs: Any) -> Any:
            return self.forward(**kwargs)

        def beam_search(self, input_ids: Any, beam_scorer: Any, **kwargs: Any) -> Any:
            """Hugging Face's beam search, its per-step bookkeeping on Python numbers."""
            from captioner.beam_scorer import adopt

            return super().beam_search(input_ids, adopt(beam_scorer), **kwargs)

    return GenerationView
