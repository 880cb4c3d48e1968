"""A loaded BLIP v1 model (`blip_caption`: large_coco, or a local one such as tiny-shapes).

Generation options really reach LAVIS's decoder here (stock LAVIS drops some): a conditional
prompt after the model's own "a picture of ", the caller's repetition penalty when sampling, and
several distinct beam captions. The fast decoder (captioner/fast_decode.py) computes each
image's cross-attention keys and values once instead of once per step and beam.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from captioner.base import PROMPT_MEMO, CaptionerBase
from captioner.flat_encoder import FlatViT, SplitPlanner
from captioner.spec import ModelSpec
from captioner.token_text import batch_text
from captioning.errors import InvalidOption
from captioning.options import GenerationOptions

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Image tokens one ViT call takes on a CPU where the attention maps are materialised (fp32, or
#: the stock decoder: LAVIS's own attention). Measured (docs/performance.md, batch profile): ViT-L
#: at 384 px (577 tokens per image) ran 3.77 s per image as one call for a batch of 8 and 3.21 s
#: one image per call, on 2 AVX-512 cores: the attention maps (16 x 577 x 577 floats per image
#: and layer) are mapped fresh and zeroed page by page on every call. The fast path's bf16/fp16
#: attention (fused, or one image's maps at a time: cpu_attention.py) has no batch-wide maps,
#: and there the whole batch wins (bf16: 1.47 s per image as one call, 1.91 s one per call).
#: Small models keep whole batches (tiny-shapes: 37 tokens per image), and a GPU always takes
#: the whole batch. Where the ViT is a plain LAVIS one (every model the service builds), `encode`
#: runs flat_encoder.FlatViT instead: its linear layers take two ViT-L images per call and its
#: attention one, so this budget is for the modules' path only.
CPU_ENCODER_TOKENS = 1024

#: Images in the decoder's cross-attention timing (cpu_attention.choose): the default
#: MAX_BATCH_SIZE, the batch the service runs under load.
DECODER_CHOICE_BATCH = 8


class BlipCaptioner(CaptionerBase):
    """A loaded BLIP v1 model that captions a list of images in one batch.

    Not thread-safe: one inference worker owns it (see batcher.py).
    """

    arch = "blip_caption"

    def __init__(
        self,
        model: Any,
        spec: ModelSpec,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        decode: str = "fast",
    ) -> None:
        super().__init__(model, spec, device=device, precision=precision, decode=decode)
        self.tokenizer = model.tokenizer
        # Every request checks its options against the prompt's tokens, on the request thread
        # and again in the batch: tokenizing it each time was 40 % of a cached request's CPU.
        self._prompt_row = functools.lru_cache(maxsize=PROMPT_MEMO)(self._tokenize_prompt)
        #: The ViT's attention maps are materialised on a CPU (fp32, or the stock decoder).
        self.maps_on_cpu = self.device.startswith("cpu") and not (
            decode == "fast" and precision != "fp32"  # fast_decode.optimize_model: no maps
        )
        self.encoder_chunk = self._encoder_chunk()
        #: What the flat ViT may put in one call here (bit-identical to one image per call).
        self._vit_planner = SplitPlanner()
        #: The model's `forward_encoder` is LAVIS's (the flat ViT stands in for what it calls).
        self._lavis_encoder = getattr(
            getattr(type(model), "forward_encoder", None), "__module__", ""
        ).startswith("lavis.")
        #: The attention kernels of low-precision runs, chosen for this machine (cpu_attention).
        self.attention = self._choose_attention()
        #: Linear layers on oneDNN-packed weights (bf16 on a CPU where that is faster).
        self.packed = self._choose_packing()
        if decode == "fast":
            from captioner import fast_decode

            # faster ViT attention in bf16/fp16; fp32 untouched
            fast_decode.optimize_model(self.model, attention=self.attention["encoder"])
        if self.packed:
            from captioner import packed_linear

            packed_linear.pack_model(self.model)

    @classmethod
    def load(
        cls, spec: ModelSpec, *, device: str = "cpu", precision: str = "fp32", decode: str = "fast"
    ) -> BlipCaptioner:
        """Assemble the model, read its checkpoint strictly, cast it to `precision` on `device`."""
        from captioner.blip_build import build_model, load_checkpoint

        started = time.monotonic()
        model = build_model(spec)
        if spec.checkpoint is not None:
            load_checkpoint(model, spec.checkpoint)
        captioner = cls(model, spec, device=device, precision=precision, decode=decode)
        log.info(
            "loaded %s (%.1fM parameters) on %s in %s in %.1fs",
            spec.name,
            captioner.parameters / 1e6,
            device,
            precision,
            time.monotonic() - started,
        )
        return captioner

    def _encoder_chunk(self) -> int:
        """Images per ViT module call: all of them on a GPU or with fused attention, a token
        budget's worth on a CPU where the attention maps are materialised (CPU_ENCODER_TOKENS;
        there `encode` runs the flat ViT instead where it can)."""
        if not self.maps_on_cpu:
            return 1 << 30
        patches = getattr(getattr(self.model.visual_encoder, "patch_embed", None), "num_patches", 0)
        return max(1, CPU_ENCODER_TOKENS // (int(patches) + 1))

    def _choose_attention(self) -> dict[str, str]:
        """Time the fused kernel against matrix products on this model's own attention shapes
        (a ViT block's self-attention, a decoder layer's cross-attention for the default beams),
        once, on the thread that loads and will run the model. Fused on a GPU, in fp32 and with
        the stock decoder (which runs LAVIS's own attention)."""
        from captioner import cpu_attention

        if self.decode != "fast":
            return {"encoder": cpu_attention.FUSED, "decoder": cpu_attention.FUSED}
        vit = self.model.visual_encoder
        heads = int(vit.blocks[0].attn.num_heads)
        tokens = int(vit.patch_embed.num_patches) + 1
        cross = self.model.text_decoder.bert.encoder.layer[0].crossattention.self
        choose = functools.partial(cpu_attention.choose, self.dtype, device=self.device)
        return {
            "encoder": choose(heads, tokens, tokens, int(vit.embed_dim) // heads, batch=2),
            # a full batch's worth: at 1-2 images the call overhead decides, not the kernel
            "decoder": choose(
                int(cross.num_attention_heads),
                GenerationOptions().num_beams,
                tokens,
                int(cross.attention_head_size),
                batch=DECODER_CHOICE_BATCH,
            ),
        }

    def _choose_packing(self) -> bool:
        """Time packed oneDNN products against `F.linear` on this model's own shapes (one
        image through the ViT's MLP, a full batch of beam rows through the decoder's), once, on
        the loading thread. Only the fast decoder in bf16 on a CPU (packed_linear.available)."""
        from captioner import packed_linear

        if self.decode != "fast" or not packed_linear.available(self.dtype, self.device):
            return False
        vit = self.model.visual_encoder
        tokens = int(vit.patch_embed.num_patches) + 1
        mlp = vit.blocks[0].mlp.fc1
        dense = self.model.text_decoder.bert.encoder.layer[0].intermediate.dense
        rows = DECODER_CHOICE_BATCH * GenerationOptions().num_beams
        return packed_linear.choose(
            self.dtype,
            [
                (tokens, int(mlp.in_features), int(mlp.out_features)),
                (rows, int(dense.in_features), int(dense.out_features)),
                (rows, int(dense.out_features), int(dense.in_features)),
            ],
            device=self.device,
        )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ViT's image embeddings. Where its attention maps are materialised on a CPU, the
        flat ViT (flat_encoder.py: several images per linear layer where that is bit-identical
        here, one per map); else the modules, `encoder_chunk` images per call. Each image's
        embedding does not depend on the others in its call."""
        if self.maps_on_cpu and self._lavis_encoder:
            flat = FlatViT.build(self.model.visual_encoder)
            split = self._vit_planner.plan(flat, len(pixels)) if flat is not None else None
            if flat is not None and split is not None:
                return flat.forward(pixels, split)
        step = self.encoder_chunk
        if len(pixels) <= step:
            return self.model.forward_encoder({"image": pixels})
        parts = [
            self.model.forward_encoder({"image": pixels[i : i + step]})
            for i in range(0, len(pixels), step)
        ]
        return self._torch.cat(parts)

    # -- identity ----------------------------------------------------------------------------

    def stamp_identity(self) -> str:
        """Part of the result-cache key: which weights, precision and decoder made a caption."""
        ckpt = self.spec.checkpoint
        stamp = ""
        if ckpt is not None and ckpt.is_file():
            st = ckpt.stat()
            stamp = f"{st.st_size}:{int(st.st_mtime)}"
        # fp32 captions are identical whichever decoder runs; low precision ones may differ.
        decoder = "" if self.precision == "fp32" else f"|{self.decode}"
        return f"{self.spec.name}|{stamp}|{self.precision}{decoder}"

    # -- inference ---------------------------------------------------------------------------

    def check_options(self, options: GenerationOptions) -> GenerationOptions:
        """Validate options, including what depends on this model's tokenizer: the decoder
        prompt (the model's own "a picture of " plus `prompt`) must leave room for at least
        one generated token within max_length (beam search fails otherwise)."""
        opts = options.validate()
        used = len(self._prompt_row(self._prompt_text(opts)))
        if used >= opts.max_length:
            raise InvalidOption(
                "max_length",
                f"max_length must be more than the {used} tokens of the decoder prompt "
                f"(the model's {self.spec.prompt.strip()!r} plus prompt)",
            )
        return opts

    def _prompt_text(self, opts: GenerationOptions) -> str:
        extra = opts.prompt.strip()
        return self.spec.prompt + extra + (" " if extra else "")

    def _tokenize_prompt(self, prompt_text: str) -> tuple[int, ...]:
        """[DEC] + prompt words (LAVIS drops the final [SEP]); memoized as `_prompt_row`."""
        ids = self.tokenizer(prompt_text).input_ids
        return (self.tokenizer.bos_token_id, *ids[1:-1])

    def _prompt_ids(self, prompt_text: str, batch: int) -> torch.Tensor:
        """Token ids of the decoder prompt, one row per image of the batch."""
        row = self._prompt_row(prompt_text)
        return self._torch.tensor([row] * batch, dtype=self._torch.long, device=self.device)

    def caption_prepared(
        self, prepared: Sequence[torch.Tensor], options: GenerationOptions | None = None
    ) -> list[list[str]]:
        """`caption` for images already through :meth:`prepare` (what the batcher queues)."""
        opts = self.check_options(options or GenerationOptions())
        if not prepared:
            return []
        pixels = self._torch.stack(list(prepared)).to(device=self.device, dtype=self.dtype)
        with self._torch.inference_mode(), self._autocast():
            embeds = self.encode(pixels)
            texts = self._decode(embeds, opts)
        n = opts.num_captions
        return [texts[i * n : (i + 1) * n] for i in range(len(prepared))]

    def _decode(self, embeds: torch.Tensor, opts: GenerationOptions) -> list[str]:
        prompt_text = self._prompt_text(opts)
        sampling = opts.use_nucleus_sampling
        if sampling and self.decode != "fast":
            # Independent samples: one row per caption (LAVIS repeats the image the same way);
            # the fast decoder gives the same ids from one row with num_return_sequences.
            embeds = embeds.repeat_interleave(opts.num_captions, 0)
        prompt_ids = self._prompt_ids(prompt_text, embeds.size(0))
        kwargs = {
            "max_length": opts.max_length,
            "min_length": opts.min_length,
            "eos_token_id": self.tokenizer.sep_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
            "repetition_penalty": opts.repetition_penalty,
        }
        if sampling:
            per_row = opts.num_captions if self.decode == "fast" else 1
            kwargs.update(do_sample=True, top_p=opts.top_p, num_return_sequences=per_row)
        else:
            kwargs.update(num_beams=opts.num_beams, num_return_sequences=opts.num_captions)
        out = self._generate(prompt_ids, embeds, **kwargs)
        decoded = batch_text(self.tokenizer, out)
        strip = len(self.spec.prompt)
        return [text[strip:] for text in decoded]

    def _generate(self, prompt_ids: torch.Tensor, embeds: torch.Tensor, **kw: Any) -> torch.Tensor:
        """Run the decoder: our cached-cross-attention path, or stock Hugging Face generate."""
        if self.decode == "fast":
            from captioner import fast_decode

            return fast_decode.generate(
                self.model.text_decoder,
                prompt_ids,
                embeds,
                attention=self.attention["decoder"],
                **kw,
            )
        from captioner.blip_build import stock_generate

        return stock_generate(self.model.text_decoder, prompt_ids, embeds, **kw)
