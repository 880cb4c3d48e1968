"""BLIP-2 OPT caption decoding: query tokens and the prompt prefix computed once per image.

Stock LAVIS `Blip2OPT.generate` repeats the image's 32 query embeddings once per beam (or per
sample) and runs the language model over [queries + prompt] for every row: with 5 beams the whole
2.7B-parameter prefix pass is done 5 times over identical rows. Here the ViT, the Q-Former and
that prefix pass run once per image; their key/value cache is then repeated per row, and the
rest is Hugging Face's own `generate()` loop (beam search, sampling, logits processors, the K/V
cache, beam reordering) over LAVIS's own `OPTForCausalLM`, so search semantics cannot drift.

`opt_generate` takes the same arguments as stock and returns the same token ids: the first
step's logits are the prefix pass's last-position logits, rows repeated exactly as Hugging Face
expands them (`repeat_interleave`); every later step is the stock step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from captioner.generation_view import generation_view
from captioner.token_text import batch_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_VIEW_CLASS: list[type] = []  # built on first use, so importing this module stays cheap


def query_embeds(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The image's query tokens in the language model's width: stock generate's first half."""
    import torch

    image_embeds = model.ln_vision(model.visual_encoder(pixels))
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=pixels.device)
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_output = model.Qformer.bert(
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    return model.opt_proj(query_output.last_hidden_state)


def _view_class() -> type:
    if not _VIEW_CLASS:
        _VIEW_CLASS.append(_make_view_class())
    return _VIEW_CLASS[0]


def _make_view_class() -> type:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class PrefilledOPT(generation_view()):  # type: ignore[misc]
        """LAVIS's OPTForCausalLM as `generate()` sees it, its first step already computed."""

        def __init__(self, lm: Any, logits: torch.Tensor, past: Any, group: int) -> None:
            super().__init__(lm)
            self.lm = lm
            self.first = (logits, past)
            self.group = group

        def prepare_inputs_for_generation(
            self,
            input_ids: torch.Tensor,
            past: Any = None,
            attention_mask: torch.Tensor | None = None,
            use_cache: bool | None = None,
            **kwargs: Any,
        ) -> dict[str, Any]:
            """LAVIS `OPTForCausalLM.prepare_inputs_for_generation` without query_embeds."""
            if past:
                input_ids = input_ids[:, -1:]
            return {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "past_key_values": past,
                "use_cache": use_cache,
            }

        def _reorder_cache(self, past: Any, beam_idx: torch.Tensor) -> Any:
            return self.lm._reorder_cache(past, beam_idx)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            past_key_values: Any = None,
            use_cache: bool | None = None,
            return_dict: bool | None = True,
            output_attentions: bool | None = False,
            output_hidden_states: bool | None = False,
        ) -> Any:
            self.steps += 1
            if past_key_values is None:
                logits, past = self.first
                self.first = (None, None)  # the prefix is not needed twice; free it
                if logits is None:
                    raise RuntimeError("the prefilled first step was asked for twice")
                rows = input_ids.shape[0]
                if logits.shape[0] * self.group != rows:
                    raise ValueError(f"{rows} rows do not expand {logits.shape[0]} images")
                logits = logits.repeat_interleave(self.group, dim=0)
                past = tuple(
                    tuple(t.repeat_interleave(self.group, dim=0) for t in layer) for layer in past
                )
                return CausalLMOutputWithPast(logits=logits, past_key_values=past)
            return self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=True,
                return_dict=True,
            )

    return PrefilledOPT


def prompt_tokens(model: Any, prompt: str, batch: int, device: Any) -> Any:
    """1.0.2's one prompt string for the whole batch, tokenized as stock does."""
    return model.opt_tokenizer([prompt] * batch, return_tensors="pt").to(device)


def opt_generate(
    model: Any,
    inputs_opt: torch.Tensor,
    prompt: str,
    *,
    use_nucleus_sampling: bool = False,
    num_beams: int = 5,
    max_length: int = 30,
    min_length: int = 1,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    num_captions: int = 1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token ids (prompt included) of `Blip2OPT.generate` for query embeddings `inputs_opt`
    (B, Q, H), one row per image; B * num_captions rows come back, image by image.

    Same option meanings as stock: max_length counts new tokens (max_new_tokens), min_length
    counts the prompt's tokens too (BOS included) but not the query tokens."""
    import torch

    batch = inputs_opt.shape[0]
    tokens = prompt_tokens(model, prompt, batch, inputs_opt.device)
    atts_opt = torch.ones(inputs_opt.size()[:-1], dtype=torch.long, device=inputs_opt.device)
    attention_mask = torch.cat([atts_opt, tokens.attention_mask], dim=1)
    lm = model.opt_model
    prefix = lm(
        input_ids=tokens.input_ids,
        query_embeds=inputs_opt,
        attention_mask=attention_mask,
        use_cache=True,
        return_dict=True,
    )
    if use_nucleus_sampling:
        group, num_beams = num_captions, 1
    else:
        group = num_beams
    view = _view_class()(lm, prefix.logits[:, -1:, :], prefix.past_key_values, group)
    del prefix
    out = view.generate(
        input_ids=tokens.input_ids,
        attention_mask=attention_mask,
        do_sample=use_nucleus_sampling,
        top_p=top_p,
        temperature=temperature,
        num_beams=num_beams,
        max_new_tokens=max_length,
        min_length=min_length,
        eos_token_id=model.eos_token_id,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
        num_return_sequences=num_captions,
    )
    log.debug("decoded %d images in %d steps", batch, view.steps)
    return out


def stock_generate(model: Any, samples: dict[str, Any], **kw: Any) -> tuple[list[str], Any]:
    """LAVIS's own `Blip2OPT.generate(samples, **kw)`, also returning the token ids it made.

    The language model's `generate` is wrapped for this one call by a pass-through that keeps its
    output; nothing else is touched. For comparisons and benchmarks, not for serving."""
    lm = model.opt_model
    kept: list[Any] = []
    inner = lm.generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        kept.append(out)
        return out

    lm.generate = recording
    try:
        texts = model.generate(samples, **kw)
    finally:
        del lm.generate
    return texts, kept[0]


def decode_texts(model: Any, ids: torch.Tensor, prompt_length: int) -> list[str]:
    """Stock's post-processing: drop the prompt, decode without special tokens, strip."""
    texts = batch_text(model.opt_tokenizer, ids[:, prompt_length:])
    return [t.strip() for t in texts]
