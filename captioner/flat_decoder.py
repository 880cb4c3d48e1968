"""The BLIP caption decoder's step as plain tensor calls: LAVIS's arithmetic, no module dispatch.

One step of LAVIS's BERT decoder (`BertLMHeadModel`) walks ~60 `nn.Module` calls: per layer the
attention, output, intermediate and feed-forward containers, their Linear, LayerNorm and Dropout
modules, and an `nn.Softmax` built anew for every call. Where the arithmetic is small (the tiny
model; any model's short steps) that dispatch is a good part of decoding: a batch of 8 tiny-model
captions decoded in 40.5-49.5 ms through the modules against 35.1-38.8 ms flat (the Intel Xeon of
docs/performance.md, one thread).

`FlatDecoder.build` reads each layer's weights once per `generate` call into tuples; `step` then
issues the ATen calls the modules would (`F.embedding`, `F.linear`, `F.layer_norm`,
`torch.matmul`, `softmax`, the activation), on the same shapes and layouts, in the same order, so
fp32 logits and the key/value cache stay bit-identical to stock (tests/test_fast_decode.py
compares them bit for bit). Dropout is left out: fast decoding runs in eval mode only, where it
is the identity. The cross-attention context comes from the caller (fast_decode's per-image K/V).

Only a plain LAVIS decoder is flattened: every module in eval mode, without hooks or a `forward`
of its own (packed bf16 linear layers, see packed_linear.py); plain torch Linear, LayerNorm and
Embedding (no subclasses, no embedding max-norm); absolute position embeddings; no feed-forward
chunking. `build` returns None otherwise, and fast_decode runs the modules themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from captioner.plain import Linear, Norm, plain_modules
from captioner.plain import linear_args as _linear
from captioner.plain import norm_args as _norm

if TYPE_CHECKING:
    import torch

__all__ = ["FlatDecoder", "merge_heads"]

#: (query heads (N, h, L, d), layer index) -> the cross-attention context (N, h, L, d)
CrossContext = Callable[[Any, int], Any]


@dataclass(frozen=True)
class _Layer:
    """One `BertLayer`'s weights: self-attention, cross-attention, feed-forward."""

    query: Linear
    key: Linear
    value: Linear
    heads: int
    head_dim: int
    width: int  # all_head_size
    self_out: Linear
    self_norm: Norm
    cross_query: Linear
    cross_heads: int  # its own: LAVIS's pruned_heads prune the self-attention only
    cross_dim: int
    cross_width: int
    cross_out: Linear
    cross_norm: Norm
    up: Linear
    act: Callable[[Any], Any]
    down: Linear
    out_norm: Norm


@dataclass(frozen=True)
class FlatDecoder:
    """A LAVIS `BertLMHeadModel`'s weights, laid out for `step`. Holds references, not copies."""

    words: Any
    padding_idx: int | None
    positions: Any
    position_ids: Any
    embed_norm: Norm
    layers: tuple[_Layer, ...]
    transform: Linear
    transform_act: Callable[[Any], Any]
    transform_norm: Norm
    vocab: Linear

    @classmethod
    def build(cls, decoder: Any) -> FlatDecoder | None:
        """The flat form of `decoder` (a LAVIS `XBertLMHeadDecoder`), or None when it is not a
        plain LAVIS decoder in eval mode (then its modules must run: see the module docstring)."""
        if not _plain(decoder):
            return None
        bert = decoder.bert
        emb = bert.embeddings
        layers = []
        for layer in bert.encoder.layer:
            own, cross = layer.attention, layer.crossattention
            layers.append(
                _Layer(
                    query=_linear(own.self.query),
                    key=_linear(own.self.key),
                    value=_linear(own.self.value),
                    heads=int(own.self.num_attention_heads),
                    head_dim=int(own.self.attention_head_size),
                    width=int(own.self.all_head_size),
                    self_out=_linear(own.output.dense),
                    self_norm=_norm(own.output.LayerNorm),
                    cross_query=_linear(cross.self.query),
                    cross_heads=int(cross.self.num_attention_heads),
                    cross_dim=int(cross.self.attention_head_size),
                    cross_width=int(cross.self.all_head_size),
                    cross_out=_linear(cross.output.dense),
                    cross_norm=_norm(cross.output.LayerNorm),
                    up=_linear(layer.intermediate.dense),
                    act=_activation(layer.intermediate.intermediate_act_fn),
                    down=_linear(layer.output.dense),
                    out_norm=_norm(layer.output.LayerNorm),
                )
            )
        head = decoder.cls.predictions
        return cls(
            words=emb.word_embeddings.weight,
            padding_idx=emb.word_embeddings.padding_idx,
            positions=emb.position_embeddings.weight,
            position_ids=emb.position_ids,
            embed_norm=_norm(emb.LayerNorm),
            layers=tuple(layers),
            transform=_linear(head.transform.dense),
            transform_act=_activation(head.transform.transform_act_fn),
            transform_norm=_norm(head.transform.LayerNorm),
            vocab=_linear(head.decoder),
        )

    def step(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
        past_len: int,
        cross: CrossContext,
    ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
        """Logits and the new self-attention cache for `input_ids` (N, L) after `past_len`
        cached tokens; `mask` is the additive (N, 1, L|1, past_len + L) attention mask."""
        import torch
        import torch.nn.functional as F

        length = input_ids.shape[1]
        # BertEmbeddings: words + absolute positions, LayerNorm (dropout: identity in eval)
        hidden = F.embedding(input_ids, self.words, self.padding_idx)
        hidden += F.embedding(self.position_ids[:, past_len : past_len + length], self.positions)
        hidden = F.layer_norm(hidden, *self.embed_norm)
        presents = []
        for index, layer in enumerate(self.layers):
            heads, dim = layer.heads, layer.head_dim
            # BertSelfAttention with its key/value cache, then BertSelfOutput
            query = _split(F.linear(hidden, *layer.query), heads, dim)
            key = _split(F.linear(hidden, *layer.key), heads, dim)
            value = _split(F.linear(hidden, *layer.value), heads, dim)
            if past is not None:
                key = torch.cat([past[index][0], key], dim=2)
                value = torch.cat([past[index][1], value], dim=2)
            presents.append((key, value))
            scores = torch.matmul(query, key.transpose(-1, -2))
            scores = scores / math.sqrt(dim)
            scores = scores + mask
            context = merge_heads(torch.matmul(scores.softmax(dim=-1), value), layer.width)
            attended = F.linear(context, *layer.self_out) + hidden
            attended = F.layer_norm(attended, *layer.self_norm)
            # cross-attention on the image (the caller's K/V), then its BertSelfOutput
            query = F.linear(attended, *layer.cross_query)
            context = cross(_split(query, layer.cross_heads, layer.cross_dim), index)
            context = merge_heads(context, layer.cross_width)
            crossed = F.linear(context, *layer.cross_out) + attended
            crossed = F.layer_norm(crossed, *layer.cross_norm)
            # BertIntermediate + BertOutput
            inner = layer.act(F.linear(crossed, *layer.up))
            hidden = F.layer_norm(F.linear(inner, *layer.down) + crossed, *layer.out_norm)
        # BertOnlyMLMHead: transform (dense, activation, LayerNorm), then the vocabulary
        hidden = F.layer_norm(
            self.transform_act(F.linear(hidden, *self.transform)), *self.transform_norm
        )
        return F.linear(hidden, *self.vocab), tuple(presents)


def _split(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """`BertSelfAttention.transpose_for_scores`: (N, L, h*d) -> (N, h, L, d) view."""
    return x.view(x.size()[:-1] + (heads, dim)).permute(0, 2, 1, 3)


def merge_heads(context: torch.Tensor, width: int) -> torch.Tensor:
    """(N, h, L, d) -> (N, L, h*d), contiguous, as `BertSelfAttention` returns it."""
    context = context.permute(0, 2, 1, 3).contiguous()
    return context.view(context.size()[:-2] + (width,))


def _activation(fn: Any) -> Callable[[Any], Any]:
    """The activation's own function where it is a thin module over one (Hugging Face's
    `GELUActivation` calls `F.gelu`); else the callable itself (the same arithmetic)."""
    inner = getattr(fn, "act", None)
    if type(fn).__name__ == "GELUActivation" and callable(inner):
        return inner  # type: ignore[no-any-return]
    return fn  # type: ignore[no-any-return]


def _leaves() -> tuple[type, ...]:
    import torch

    return (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)


def _plain(decoder: Any) -> bool:
    """A stock LAVIS BLIP decoder in eval mode (plain.plain_modules: unhooked, unpatched, plain
    torch Linear, LayerNorm and Embedding) with absolute positions and no feed-forward chunking."""
    bert = getattr(decoder, "bert", None)
    if bert is None or getattr(decoder, "cls", None) is None:
        return False
    if not plain_modules(decoder, _leaves()):
        return False
    emb = bert.embeddings
    if getattr(emb, "position_embedding_type", "absolute") != "absolute":
        return False
    if emb.word_embeddings.max_norm is not None or emb.position_embeddings.max_norm is not None:
        return False
    for layer in bert.encoder.layer:
        if layer.chunk_size_feed_forward or getattr(layer, "crossattention", None) is None:
            return False
        for attn in (layer.attention.self, layer.crossattention.self):
            if getattr(attn, "position_embedding_type", "absolute") != "absolute":
                return False
    return True
