"""Caption decoding with the image's cross-attention keys/values computed once per image.

Stock LAVIS decoding (`XBertLMHeadDecoder.generate`) feeds the image embeddings to every decoder
step, so each of the 12 cross-attention layers re-projects all 577 image tokens into keys and
values, for every beam, at every step: for ViT-L that is ~95% of the decoding work, and none of
it changes between steps. Here those projections are made once per image (not per beam, not per
step) and reused. Everything else is the stock computation:

- the decoding loop is Hugging Face's own `generate()` (greedy, beam search, nucleus sampling,
  logits processors, beam finalisation, random-number use), driven by a thin `GenerationMixin`
  view of the LAVIS decoder, so search semantics cannot drift from stock;
- each step makes the calls of LAVIS's modules (self-attention with its key/value cache, the
  cross-attention's projections, feed-forward, LM head) on tensors of stock's shapes, flattened
  (flat_decoder.py) or through the modules, so fp32 logits are bit-identical to stock;
- the only rearranged arithmetic, q @ K^T and probs @ V against the per-image K/V, is issued as
  the same batched-matmul kernel calls, on the same memory layouts, that stock's `torch.matmul`
  makes on its per-beam copies (see `CrossAttentionCache`).

In bf16/fp16 (autocast, or low-precision weights) bit-identity is not a goal: there the cross-
attention of all of an image's beams is one attention call (fused, or matrix products where the
machine runs those faster: see cpu_attention.py), and autocast
casts each weight once per call rather than once per step (see `_autocast_weight_cache`).

Nothing in LAVIS is patched: the stock path stays stock in the same process.

`optimize_model` additionally gives the ViT encoder the faster attention (cpu_attention.py) when
running in bf16/fp16; fp32 encoder maths is untouched. `restore_model` undoes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from captioner import cpu_attention
from captioner.flat_decoder import FlatDecoder, merge_heads
from captioner.generation_view import generation_view

if TYPE_CHECKING:  # heavy imports stay out of import time
    import torch

log = logging.getLogger(__name__)

__all__ = ["CrossAttentionCache", "generate", "optimize_model", "restore_model"]

# Profiler labels (see benchmarks/model_speed.py --profile).
PROFILE_CROSS_KV = "fast_decode.cross_kv"
PROFILE_STEP = "fast_decode.step"


# --------------------------------------------------------------------------- cross-attention K/V


class CrossAttentionCache:
    """Every decoder layer's cross-attention keys and values for a batch of images.

    Built once per image with each layer's own `key`/`value` projections. Decoder row `r` (a beam
    or a sample) belongs to image `r // group`, `group` being rows per image; beam reordering
    never moves a row to another image, so the cache never moves either.

    Layouts mirror what stock's `torch.matmul` hands to its batched kernel, which decides the
    summation order: with a single decoder row stock uses the permuted (1, h, T, d) views as is;
    with more it copies K^T to contiguous (rows*h, d, T) and V to (rows*h, T, d). `pack` makes
    those contiguous copies once per image instead of once per beam per step. The low-precision
    path instead wants contiguous (B, h, T, d) for fused attention (`contiguous_heads`).
    """

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        self.keys = list(keys)  # (B, h, T, d) permuted views; (B*h, d, T) K^T once packed
        self.values = list(values)  # (B, h, T, d) permuted views; (B*h, T, d) once packed
        self.batch = int(self.keys[0].shape[0]) if self.keys else 0
        self.layout = "views"  # or "packed" (exact path, > 1 row) or "heads" (fused path)

    @classmethod
    def build(cls, decoder: Any, embeds: torch.Tensor) -> CrossAttentionCache:
        """Project `embeds` (B, T, W) into each layer's K and V: the ops and layout of stock."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in decoder.bert.encoder.layer:
            cross = getattr(layer, "crossattention", None)
            if cross is None:
                raise ValueError("decoder layer has no cross-attention: not a BLIP caption decoder")
            attn = cross.self
            keys.append(attn.transpose_for_scores(attn.key(embeds)))
            values.append(attn.transpose_for_scores(attn.value(embeds)))
        return cls(keys, values)

    def pack(self) -> None:
        """Lay K^T and V out contiguously per (image, head), as stock's matmul copies them."""
        if self.layout == "packed":
            return
        if self.layout != "views":
            raise RuntimeError(f"cache already laid out as {self.layout!r}")
        for i, (key, value) in enumerate(zip(self.keys, self.values, strict=True)):
            images, heads, tokens, head_dim = key.shape
            key_t = key.transpose(-1, -2).reshape(images * heads, head_dim, tokens)
            self.keys[i] = key_t.contiguous()
            self.values[i] = value.reshape(images * heads, tokens, head_dim).contiguous()
        self.layout = "packed"

    def contiguous_heads(self) -> None:
        """Make K and V contiguous (B, h, T, d) for fused attention (else it copies per call)."""
        if self.layout == "heads":
            return
        if self.layout != "views":
            raise RuntimeError(f"cache already laid out as {self.layout!r}")
        self.keys = [k.contiguous() for k in self.keys]
        self.values = [v.contiguous() for v in self.values]
        self.layout = "heads"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


# --------------------------------------------------------------------------- decoder view

_LM_CLASS: type | None = None


def _lm_class() -> type:
    """The GenerationMixin view class, built on first use so importing this module is cheap."""
    global _LM_CLASS
    if _LM_CLASS is None:
        _LM_CLASS = _make_lm_class()
    return _LM_CLASS


def _make_lm_class() -> type:
    import torch
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
    from transformers.pytorch_utils import apply_chunking_to_forward

    class CachedCrossAttentionLM(generation_view()):  # type: ignore[misc]
        """The LAVIS decoder as Hugging Face `generate()` sees it, reading image K/V from a cache.

        Holds no weights: every module call goes to the wrapped decoder's own submodules.
        """

        def __init__(
            self, decoder: Any, cache: CrossAttentionCache, attention: str = cpu_attention.FUSED
        ) -> None:
            super().__init__(decoder)
            self.decoder = decoder
            self.cache = cache
            self.attention = attention  # low precision only: see cpu_attention.choose
            self.flat = FlatDecoder.build(decoder)  # None: run the decoder's own modules

        def prepare_inputs_for_generation(
            self,
            input_ids: torch.Tensor,
            past: Any = None,
            attention_mask: torch.Tensor | None = None,
            **model_kwargs: Any,
        ) -> dict[str, Any]:
            """`BertLMHeadModel.prepare_inputs_for_generation` minus the image inputs."""
            if attention_mask is None:
                attention_mask = input_ids.new_ones(input_ids.shape)
            if past is not None:
                input_ids = input_ids[:, -1:]
            return {"input_ids": input_ids, "attention_mask": attention_mask, "past": past}

        def _reorder_cache(self, past: Any, beam_idx: torch.Tensor) -> Any:
            """Reorder the self-attention cache after a beam step, as LAVIS does."""
            return tuple(tuple(t.index_select(0, beam_idx) for t in layer) for layer in past)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            past: Any = None,
            output_attentions: bool | None = False,
            output_hidden_states: bool | None = False,
            return_dict: bool | None = True,
            use_cache: bool | None = None,
        ) -> Any:
            """One decoder step: `BertLMHeadModel.forward` with cached image K/V."""
            if output_attentions or output_hidden_states:
                raise NotImplementedError("fast decoding returns no attentions or hidden states")
            with torch.profiler.record_function(PROFILE_STEP):
                logits, presents = self._step(input_ids, attention_mask, past)
            self.steps += 1
            return CausalLMOutputWithCrossAttentions(logits=logits, past_key_values=presents)

        def _step(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: Any
        ) -> tuple[torch.Tensor, tuple[Any, ...]]:
            bert = self.decoder.bert
            rows, length = input_ids.shape
            images = self.cache.batch
            if images == 0 or rows % images:
                raise ValueError(f"{rows} decoder rows do not split evenly over {images} images")
            group = rows // images
            past_len = past[0][0].shape[2] if past is not None else 0
            if attention_mask is None:
                attention_mask = torch.ones((rows, length + past_len), device=input_ids.device)
            if length == 1:  # one new token sees every earlier one: LAVIS's mask minus its ~10 ops
                dtype = bert.embeddings.word_embeddings.weight.dtype  # what `bert.dtype` finds
                mask = (1.0 - attention_mask[:, None, None, :].to(dtype=dtype)) * -10000.0
            else:  # LAVIS BertModel's own mask builder: causal + padding, in the model's dtype.
                mask = bert.get_extended_attention_mask(
                    attention_mask, input_ids.shape, input_ids.device, True
                )
            cross = functools.partial(self._context, group=group, mask_dtype=mask.dtype)
            if self.flat is not None:
                return self.flat.step(input_ids, mask, past, past_len, cross)
            hidden = bert.embeddings(input_ids=input_ids, past_key_values_length=past_len)
            presents = []
            for i, layer in enumerate(bert.encoder.layer):
                self_out = layer.attention(
                    hidden, mask, None, past_key_value=past[i] if past is not None else None
                )
                presents.append(self_out[-1])
                attn = layer.crossattention.self
                query = attn.transpose_for_scores(attn.query(self_out[0]))  # (N, h, L, d)
                context = merge_heads(cross(query, i), attn.all_head_size)
                attn_out = layer.crossattention.output(context, self_out[0])
                feed, chunk = layer.feed_forward_chunk, layer.chunk_size_feed_forward
                hidden = (  # LAVIS's chunk size is 0 (one chunk): skip the per-call signature check
                    apply_chunking_to_forward(feed, chunk, layer.seq_len_dim, attn_out)
                    if chunk
                    else feed(attn_out)
                )
            return self.decoder.cls(hidden), tuple(presents)

        def _context(
            self, query: torch.Tensor, index: int, *, group: int, mask_dtype: Any
        ) -> torch.Tensor:
            """Layer `index`'s cross-attention context (N, h, L, d) for its query heads, each
            image's `group` rows against the image's one cached K/V."""
            if query.dtype in (torch.float16, torch.bfloat16):
                return self._fused_context(query, index, group)
            return self._exact_context(query, index, group, mask_dtype)

        def _exact_context(
            self, query: torch.Tensor, index: int, group: int, mask_dtype: Any
        ) -> torch.Tensor:
            """softmax(q K^T / sqrt(d)) V with stock's kernels and layouts: bit-identical.

            Stock adds the all-ones image mask as -0.0: a no-op, except that it promotes
            the scores to the mask's dtype. The promotion is kept; the add and the dropout
            (eval mode: the identity) are not.
            """
            cache = self.cache
            rows, heads, length, head_dim = query.shape
            images = cache.batch
            if rows == 1:
                # Stock's matmul uses the permuted views as they are; so do we.
                scores = torch.matmul(query, cache.keys[index].transpose(-1, -2))
            else:
                cache.pack()
                per_slot = query.reshape(images, group, heads, length, head_dim)
                # One bmm per beam slot over (image, head): every (L, d) @ (d, T) product is
                # the kernel call stock makes on its per-beam copy of K, minus the copy.
                scores = torch.stack(
                    [
                        torch.bmm(
                            per_slot[:, g].reshape(images * heads, length, head_dim),
                            cache.keys[index],
                        ).view(images, heads, length, -1)
                        for g in range(group)
                    ],
                    dim=1,
                ).view(rows, heads, length, -1)
            scores = scores / math.sqrt(head_dim)
            if scores.dtype != mask_dtype:
                scores = scores.to(mask_dtype)
            probs = scores.softmax(dim=-1)
            if rows == 1:
                return torch.matmul(probs, cache.values[index])
            per_slot = probs.view(images, group, heads, length, -1)
            return torch.stack(
                [
                    torch.bmm(
                        per_slot[:, g].reshape(images * heads, length, -1), cache.values[index]
                    ).view(images, heads, length, head_dim)
                    for g in range(group)
                ],
                dim=1,
            ).view(rows, heads, length, head_dim)

        def _fused_context(self, query: torch.Tensor, index: int, group: int) -> torch.Tensor:
            """Low precision (autocast bf16/fp16): one attention call per layer (fused, or
            matrix products where those are faster: cpu_attention.choose).

            All rows of an image attend together, (B, h, G*L, d) against (B, h, T, d); the
            image mask is all ones, so no mask. Not bit-identical to stock (neither is stock
            bf16 to itself across batch shapes); fp32 never comes here.
            """
            cache = self.cache
            rows, heads, length, head_dim = query.shape
            images = cache.batch
            cache.contiguous_heads()
            keys, values = cache.keys[index], cache.values[index]  # (B, h, T, d)
            q = query.reshape(images, group, heads, length, head_dim).transpose(1, 2)
            q = q.reshape(images, heads, group * length, head_dim)
            if keys.dtype != q.dtype:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            out = cpu_attention.attend(self.attention, q, keys, values)
            out = out.view(images, heads, group, length, head_dim).transpose(1, 2)
            return out.reshape(rows, heads, length, head_dim)

    return CachedCrossAttentionLM


def _autocast_weight_cache(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Let autocast cast each decoder weight once per call instead of once per step.

    Autocast keeps its low-precision weight copies only outside inference mode; inside it (the
    service's mode) every step re-casts all ~140M decoder weights, which costs more than the
    step itself. Nothing here needs grad, so no_grad is an exact stand-in that does cache.
    """
    import torch

    if not (torch.is_autocast_enabled(device_type) and torch.is_inference_mode_enabled()):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


# --------------------------------------------------------------------------- public API


def generate(
    decoder: Any,
    prompt_ids: torch.Tensor,
    embeds: torch.Tensor,
    *,
    attention: str = cpu_attention.FUSED,
    **kw: Any,
) -> Any:
    """Drop-in for `blip2_model.stock_generate`: same arguments, same token ids.

    `decoder` is the LAVIS `XBertLMHeadDecoder` (eval mode), `prompt_ids` (B, P) and `embeds`
    (B, T, W) one row per image, never repeated per beam. `kw` goes to Hugging Face `generate()`
    unchanged (max_length, min_length, eos/pad ids, repetition_penalty, and either num_beams +
    num_return_sequences or do_sample + top_p). Returns B * num_return_sequences rows.

    `attention` is the cross-attention kernel of low-precision runs (cpu_attention.choose).

    Unlike stock, sampling n captions per image does not need the embeddings repeated: passing
    each image once with num_return_sequences=n gives the same ids as stock on n-fold repeated
    embeddings with num_return_sequences=1, for 1/n of the image K/V work.
    """
    import torch

    if any(module.training for module in decoder.modules()):
        raise ValueError("fast decoding needs the decoder in eval mode (dropout off)")
    if prompt_ids.shape[0] != embeds.shape[0]:
        raise ValueError(
            f"prompt_ids has {prompt_ids.shape[0]} rows but embeds has {embeds.shape[0]} images"
        )
    device_type = prompt_ids.device.type
    with _autocast_weight_cache(device_type):
        with torch.profiler.record_function(PROFILE_CROSS_KV):
            if torch.is_autocast_enabled(device_type) and embeds.is_floating_point():
                # Autocast would cast the embeddings again for each of the 2 x 12 projections.
                embeds = embeds.to(torch.get_autocast_dtype(device_type))
            cache = CrossAttentionCache.build(decoder, embeds)
        lm = _lm_class()(decoder, cache, attention)
        out = lm.generate(input_ids=prompt_ids, **kw)
    log.debug(
        "decoded %d images in %d steps; image K/V cache %.1f MB",
        cache.batch,
        lm.steps,
        cache.nbytes() / 1e6,
    )
    return out


# --------------------------------------------------------------------------- encoder


def optimize_model(model: Any, attention: str = cpu_attention.FUSED) -> int:
    """Give the ViT encoder faster attention for bf16/fp16 (autocast) runs.

    LAVIS's `vit.Attention` computes softmax(QK^T)V by hand for the whole batch at once,
    materialising a (batch, heads, 577, 577) matrix per layer. Under autocast or with
    low-precision inputs the patched blocks call `attention` instead: fused
    `F.scaled_dot_product_attention`, or matrix products a cache-sized block at a time,
    whichever `cpu_attention.choose` found faster here (both faster than LAVIS's, and no less
    accurate); in fp32 they run the original code, so fp32 captions stay bit-identical to stock.
    Per instance only (no class is touched), idempotent, undone by `restore_model`; the module
    tree and state_dict are unchanged. Returns how many attention blocks are patched.
    """
    count = 0
    for attn in _vit_attentions(model):
        if "_fast_decode_patched" not in attn.__dict__:
            # LAVIS's checkpoint_wrapper (last ViT blocks) already sets an instance `forward`.
            attn._fast_decode_saved_forward = attn.__dict__.get("forward")
            attn._fast_decode_patched = True
            attn.forward = types.MethodType(_vit_attention_forward, attn)
        attn._fast_decode_attention = attention
        count += 1
    log.info("fast_decode: %s attention on %d ViT blocks for low-precision runs", attention, count)
    return count


def restore_model(model: Any) -> None:
    """Undo `optimize_model`: the encoder's attention blocks run LAVIS's code again."""
    for attn in _vit_attentions(model):
        if "_fast_decode_patched" not in attn.__dict__:
            continue
        saved = attn.__dict__.pop("_fast_decode_saved_forward", None)
        del attn.__dict__["_fast_decode_patched"]
        attn.__dict__.pop("_fast_decode_attention", None)
        if saved is None:
            attn.__dict__.pop("forward", None)
        else:
            attn.forward = saved


def _vit_attentions(model: Any) -> list[Any]:
    vit = getattr(model, "visual_encoder", model)
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise ValueError("model has no ViT blocks (expected model.visual_encoder.blocks)")
    return [blk.attn for blk in blocks]


def _vit_attention_forward(self: Any, x: torch.Tensor, register_hook: bool = False) -> Any:
    """`lavis.models.vit.Attention.forward` with fused attention when running low-precision."""
    import torch
    import torch.nn.functional as F

    low_precision = x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(
        x.device.type
    )
    if register_hook or not low_precision:
        saved = self.__dict__.get("_fast_decode_saved_forward")
        if saved is not None:
            return saved(x, register_hook=register_hook)
        return type(self).forward(self, x, register_hook=register_hook)
    batch, tokens, channels = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if self.training and self.attn_drop.p:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p, scale=self.scale)
    else:
        kind = self.__dict__.get("_fast_decode_attention", cpu_attention.FUSED)
        out = cpu_attention.attend(kind, q, k, v, self.scale)
    out = out.transpose(1, 2).reshape(batch, tokens, channels)
    return self.proj_drop(self.proj(out))
