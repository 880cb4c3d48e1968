"""The BLIP-2 family (captioner/): LAVIS's own Blip2OPT assembled from local files, on the
trained tiny BLIP-2 (models/tiny-blip2/) for behaviour, and at full OPT-2.7b size with random
weights for the assembly and the checkpoint key check.

Stock LAVIS `Blip2OPT.generate` is the reference: in fp32 our decoding must give its token ids.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

import tiny_shapes
from captioner.spec import ModelError
from captioning.errors import InvalidOption
from captioning.options import GenerationOptions

ROOT = Path(__file__).resolve().parent.parent
TINY_BLIP2 = ROOT / "models" / "tiny-blip2" / "model.yaml"


def tiny_spec(path: Path = TINY_BLIP2):
    from captioner.blip2_spec import read_model_yaml, yaml_blip2_spec

    return yaml_blip2_spec(path, read_model_yaml(path))


def fresh_samples(n: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(seed)
    pairs = [tiny_shapes.sample(rng) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture(scope="module")
def blip2():
    """The tiny BLIP-2, loaded once for this module from its YAML (fp32, fast decoding)."""
    from captioner.blip2_captioner import Blip2Captioner

    return Blip2Captioner.load(tiny_spec())


# --------------------------------------------------------------------------- behaviour


def test_loads_from_yaml_and_captions_fresh_images(blip2) -> None:
    assert blip2.spec.arch == "blip2_opt"
    assert type(blip2.model).__mro__[1].__name__ == "Blip2OPT"  # LAVIS's own class
    assert next(blip2.model.opt_model.parameters()).dtype.is_floating_point
    assert str(next(blip2.model.opt_model.parameters()).dtype) == "torch.float32"  # fp16 file
    images, truth = fresh_samples(100, seed=991)
    got: list[str] = []
    for i in range(0, len(images), 50):
        got += [c[0] for c in blip2.caption(images[i : i + 50])]
    accuracy = sum(g == t for g, t in zip(got, truth, strict=True)) / len(truth)
    assert accuracy >= 0.95, accuracy


def test_batch_equals_single(blip2) -> None:
    images, _ = fresh_samples(6, seed=5)
    alone = [blip2.caption([img])[0] for img in images]
    assert blip2.caption(images) == alone
    opts = GenerationOptions(num_beams=4, num_captions=2, max_length=20, min_length=1)
    alone = [blip2.caption([img], opts)[0] for img in images[:3]]
    both = blip2.caption(images[:3], opts)
    assert both == alone
    assert all(len(caps) == 2 and caps[0] != caps[1] for caps in both)


OPTION_SETS = [
    {"num_beams": 3, "max_length": 30, "min_length": 10},  # the service's defaults
    {"num_beams": 1, "max_length": 20, "min_length": 1},
    {"num_beams": 5, "max_length": 4, "min_length": 1},  # cut short: max_length = new tokens
    {"num_beams": 4, "max_length": 20, "min_length": 1, "num_captions": 3},
    {"num_beams": 3, "max_length": 20, "min_length": 14, "repetition_penalty": 1.8},
]


@pytest.mark.parametrize("kw", OPTION_SETS)
def test_fast_decoding_equals_stock_lavis_generate_fp32(blip2, kw) -> None:
    import torch

    from captioner.blip2_decode import decode_texts, opt_generate, query_embeds, stock_generate

    images, _ = fresh_samples(3, seed=77)
    pixels = blip2.preprocess(images)
    prompt = blip2.spec.prompt
    with torch.inference_mode():
        texts, ids = stock_generate(blip2.model, {"image": pixels, "prompt": prompt}, **kw)
        ours = opt_generate(blip2.model, query_embeds(blip2.model, pixels), prompt, **kw)
    assert ours.shape == ids.shape and torch.equal(ours, ids)
    prompt_len = blip2.model.opt_tokenizer(prompt, return_tensors="pt").input_ids.shape[1]
    assert decode_texts(blip2.model, ours, prompt_len) == texts
    assert len(texts) == 3 * kw.get("num_captions", 1)


def test_sampling_equals_stock_with_the_same_seed(blip2) -> None:
    import torch

    from captioner.blip2_decode import opt_generate, query_embeds, stock_generate

    images, _ = fresh_samples(2, seed=8)
    pixels = blip2.preprocess(images)
    kw = {"use_nucleus_sampling": True, "num_captions": 3, "max_length": 12, "top_p": 0.95}
    with torch.inference_mode():
        torch.manual_seed(11)
        _, ids = stock_generate(blip2.model, {"image": pixels, "prompt": "a photo of"}, **kw)
        torch.manual_seed(11)
        ours = opt_generate(blip2.model, query_embeds(blip2.model, pixels), "a photo of", **kw)
    assert ids.shape[0] == 6 and torch.equal(ours, ids)


def test_fast_and_stock_decoders_caption_alike(blip2) -> None:
    from captioner.blip2_captioner import Blip2Captioner

    images, _ = fresh_samples(4, seed=21)
    stock = Blip2Captioner(blip2.model, blip2.spec, decode="stock")
    opts = GenerationOptions(num_beams=3, num_captions=2, min_length=1)
    assert stock.caption(images, opts) == blip2.caption(images, opts)


# --------------------------------------------------------------------------- options


def test_max_length_counts_new_tokens_min_length_counts_the_prompt(blip2) -> None:
    images, truth = fresh_samples(4, seed=31)
    short = blip2.caption(images, GenerationOptions(max_length=5, min_length=0, num_beams=1))
    assert [c[0] for c in short] == [" ".join(t.split()[:5]) for t in truth]
    # "</s>a photo of" is 4 tokens: min_length=14 asks for 10 new ones (captions have 7).
    longer = blip2.caption(images, GenerationOptions(max_length=20, min_length=14))
    assert all(len(c[0].split()) >= 10 for c in longer), longer


def test_prompt_continues_the_models_prompt(blip2) -> None:
    images, truth = fresh_samples(6, seed=41)
    got = blip2.caption(images, GenerationOptions(prompt="three", min_length=1))
    assert all(c[0].startswith("three ") for c in got)
    # The rest still describes the image (colour, shape and background are the model's).
    assert sum(c[0].split()[1:] == t.split()[1:] for c, t in zip(got, truth, strict=True)) >= 4


def test_empty_caption_is_decoded_again(blip2) -> None:
    import torch

    from captioner.blip2_decode import stock_generate

    images, truth = fresh_samples(1, seed=3)
    full = f"{blip2.spec.prompt} {truth[0]}"
    with torch.inference_mode():
        texts, _ = stock_generate(
            blip2.model,
            {"image": blip2.preprocess(images), "prompt": full},
            num_beams=1,
        )
    assert texts == [""]  # stock: the model ends at once, the caption is empty
    got = blip2.caption(images, GenerationOptions(prompt=truth[0], min_length=1, num_beams=1))
    assert got[0][0].startswith(truth[0] + " ") and len(got[0][0]) > len(truth[0]) + 1


def test_option_validation_for_this_model(blip2) -> None:
    with pytest.raises(InvalidOption) as err:
        blip2.check_options(GenerationOptions(num_beams=2, num_captions=3))
    assert err.value.param == "num_captions"
    blip2.check_options(GenerationOptions(num_beams=1, num_captions=3, use_nucleus_sampling=True))
    # min_length counts the 4 prompt tokens: 5 new tokens reach at most 9.
    blip2.check_options(GenerationOptions(max_length=5, min_length=5))  # within reach
    positions = blip2.language_model.config.max_position_embeddings
    long_prompt = " ".join(["red"] * (positions - 8))
    with pytest.raises(InvalidOption) as err:
        blip2.check_options(GenerationOptions(prompt=long_prompt[:200], max_length=75))
    assert err.value.param == "max_length" and str(positions) in str(err.value)


# --------------------------------------------------------------------------- files and keys


def copy_model(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-blip2"
    shutil.copytree(TINY_BLIP2.parent, folder)
    return folder


def test_checkpoint_key_check_names_a_missing_caption_weight(tmp_path: Path) -> None:
    import torch

    from captioner.blip2_captioner import load_blip2

    folder = copy_model(tmp_path)
    ckpt = torch.load(folder / "checkpoint.pth", weights_only=True)
    del ckpt["model"]["opt_proj.weight"]
    torch.save(ckpt, folder / "checkpoint.pth")
    with pytest.raises(ModelError, match=r"opt_proj\.weight") as err:
        load_blip2(tiny_spec(folder / "model.yaml"))
    assert "caption checkpoint" in str(err.value)


def test_checkpoint_key_check_names_a_missing_language_model_weight(tmp_path: Path) -> None:
    import torch

    from captioner.blip2_captioner import load_blip2

    folder = copy_model(tmp_path)
    lm = torch.load(folder / "opt" / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in lm  # tied to the embeddings, as in facebook/opt-*
    del lm["decoder.layers.1.fc2.weight"]
    torch.save(lm, folder / "opt" / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"opt_model\.model\.decoder\.layers\.1\.fc2\.weight"):
        load_blip2(tiny_spec(folder / "model.yaml"))


def test_language_model_files_are_fp16_and_cast_on_load(blip2) -> None:
    import torch

    lm = torch.load(TINY_BLIP2.parent / "opt" / "pytorch_model.bin", weights_only=True)
    weight = lm["decoder.layers.0.fc1.weight"]
    assert weight.dtype == torch.float16
    loaded = blip2.model.opt_model.model.decoder.layers[0].fc1.weight
    assert loaded.dtype == torch.float32 and torch.equal(loaded, weight.float())


def test_yaml_arch_and_zoo_specs(tmp_path: Path) -> None:
    from captioner.blip2_spec import lavis_blip2_spec, read_model_yaml, yaml_blip2_spec, zoo_files

    raw = read_model_yaml(TINY_BLIP2)
    with pytest.raises(ModelError, match="arch"):
        yaml_blip2_spec(TINY_BLIP2, {**raw, "arch": "blip_caption"})
    spec = lavis_blip2_spec("blip2_opt", "caption_coco_opt2.7b", tmp_path)
    assert (spec.image_size, spec.prompt, spec.lm_hub_id) == (
        364,
        "a photo of",
        "facebook/opt-2.7b",
    )
    assert spec.checkpoint == tmp_path / "blip2_caption_opt2.7b.pth"
    urls = [u for u, _, _ in zoo_files(spec, tmp_path)]
    assert any(u.endswith("facebook/opt-2.7b/resolve/main/pytorch_model.bin") for u in urls)
    t5 = lavis_blip2_spec("blip2_t5", "caption_coco_flant5xl", tmp_path)
    assert t5.lm_dir == tmp_path / "google" / "flan-t5-xl"
    with pytest.raises(ModelError, match="caption_coco_opt6.7b"):
        lavis_blip2_spec("blip2_opt", "caption_coco_opt13b", tmp_path)
    with pytest.raises(ModelError):
        lavis_blip2_spec("blip2_opt", "caption_coco_flant5xl", tmp_path)


def test_bf16_on_cpu_still_captions(tmp_path: Path) -> None:
    from captioner.blip2_captioner import Blip2Captioner

    captioner = Blip2Captioner.load(tiny_spec(), precision="bf16")
    assert str(next(captioner.model.opt_model.parameters()).dtype) == "torch.bfloat16"
    images, truth = fresh_samples(30, seed=55)
    got = [c[0] for c in captioner.caption(images)]
    assert sum(g == t for g, t in zip(got, truth, strict=True)) >= 27, got


def test_blip2_t5_assembles_checks_keys_and_captions(tmp_path: Path) -> None:
    """Blip2T5 (LAVIS's class) from local files: a tiny FlanT5-shaped model, random weights."""
    import json

    import torch

    from blip2_model import write_placeholder_tokenizer
    from captioner.blip2_build import build_blip2, check_keys, randomize_meta
    from captioner.blip2_captioner import Blip2Captioner
    from captioner.blip2_random import write_t5_tokenizer
    from captioner.blip2_spec import Blip2Spec

    lm_dir = tmp_path / "t5"
    vocab = write_t5_tokenizer(lm_dir, ["a", "photo", "of", "red", "circle"])
    t5 = {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4}
    t5 |= {"num_layers": 2, "num_decoder_layers": 2, "vocab_size": vocab}
    t5 |= {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    t5 |= {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
    (lm_dir / "config.json").write_text(json.dumps(t5), encoding="utf-8")
    spec = Blip2Spec(
        name="tiny-t5",
        arch="blip2_t5",
        image_size=32,
        bert_dir=write_placeholder_tokenizer(tmp_path / "bert", vocab_size=64),
        lm_dir=lm_dir,
        checkpoint=None,
        num_query_token=4,
        cross_attention_freq=1,
        vit={"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
        qformer={"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1},
    )
    spec.qformer |= {"num_attention_heads": 2, "intermediate_size": 64}
    model = build_blip2(spec)
    assert type(model).__mro__[1].__name__ == "Blip2T5"
    not_lm = {k for k in model.state_dict() if not k.startswith("t5_model.")}
    with pytest.raises(ModelError, match=r"language-model weights are missing.*t5_model\."):
        check_keys(model, not_lm, spec, [])
    torch.manual_seed(0)
    randomize_meta(model, torch.float32)
    check_keys(model, set(model.state_dict()), spec, [])
    captioner = Blip2Captioner(model, spec)
    assert captioner.decode == "stock"  # HF already encodes each image once for T5
    opts = GenerationOptions(num_beams=2, num_captions=2, max_length=5, min_length=1)
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    got = captioner.caption([image, image], opts)
    assert len(got) == 2 and got[0] == got[1] and len(got[0]) == 2
    low = Blip2Captioner(model, spec, precision="bf16")  # Blip2T5 casts to fp32 inside
    assert len(low.caption([image], opts)[0]) == 2


# --------------------------------------------------------------------------- full size


def test_full_size_opt27b_assembly_and_key_check(tmp_path: Path) -> None:
    """caption_coco_opt2.7b's architecture from LAVIS's config, random bf16 weights, on CPU."""
    import resource

    import torch

    from captioner.blip2_build import build_blip2, check_keys, randomize_meta
    from captioner.blip2_captioner import Blip2Captioner
    from captioner.blip2_random import random_model_dir

    started = time.monotonic()
    spec = random_model_dir("blip2_opt", "caption_coco_opt2.7b", tmp_path)
    model = build_blip2(spec)
    lm_keys = {k for k in model.state_dict() if k.startswith("opt_model.")}
    caption_keys = set(model.state_dict()) - lm_keys
    # Everything but the language model "from the caption checkpoint": the LM is reported.
    with pytest.raises(ModelError, match=r"opt_model\.model\.decoder\.embed_tokens\.weight"):
        check_keys(model, caption_keys, spec, [])
    model = model.to(torch.bfloat16)
    assert randomize_meta(model, torch.bfloat16) == len(lm_keys) - 1  # lm_head is tied
    check_keys(model, set(model.state_dict()), spec, [])
    with pytest.raises(ModelError, match=r"Qformer\.bert\.encoder\.layer\.10\.crossattention"):
        partial = {k for k in model.state_dict() if "layer.10.crossattention" not in k}
        check_keys(model, partial, spec, [])
    parts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("visual_encoder", "Qformer", "opt_model")
    }
    assert 0.98e9 < parts["visual_encoder"] < 1.0e9  # EVA ViT-g
    assert 2.6e9 < parts["opt_model"] < 2.7e9  # OPT-2.7b
    captioner = Blip2Captioner(model, spec, precision="bf16")
    image = Image.new("RGB", (364, 364), (90, 140, 200))
    got = captioner.caption([image], GenerationOptions(num_beams=1, max_length=5, min_length=1))
    assert len(got) == 1 and len(got[0]) == 1
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"full-size OPT-2.7b: {parts}, {time.monotonic() - started:.0f}s, peak {peak_gb:.1f}GB")
