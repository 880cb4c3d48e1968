"""Full-size BLIP-2 architectures from configs alone, for tests and benchmarks without weights.

The real files are 7-16 GB and cannot be fetched everywhere; the architecture can. This writes
a model folder whose configs are those of the named zoo model (the language model's config as
the hub has it, bert-base-uncased's config for the Q-Former) and whose tokenizers are small
stand-ins, then `randomize_meta` gives the weights random values: enough to prove the LAVIS
assembly, the checkpoint key check and the decoding at full size, and to time them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captioner.blip2_spec import BERT_DIRNAME, Blip2Spec, lavis_blip2_spec

#: The hub's config.json of each language model (the fields that shape the network).
LM_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-2.7b": {
        "model_type": "opt",
        "hidden_size": 2560,
        "word_embed_proj_dim": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "ffn_dim": 10240,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    },
    "facebook/opt-6.7b": {
        "model_type": "opt",
        "hidden_size": 4096,
        "word_embed_proj_dim": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "ffn_dim": 16384,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    },
    "google/flan-t5-xl": {
        "model_type": "t5",
        "d_model": 2048,
        "d_ff": 5120,
        "d_kv": 64,
        "num_heads": 32,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    },
}

#: bert-base-uncased's config.json (what LAVIS's init_Qformer starts from).
BERT_BASE_CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}


def random_model_dir(model_name: str, model_type: str, directory: Path) -> Blip2Spec:
    """A MODEL_DIR for `model_name`/`model_type` holding configs and stand-in tokenizers only:
    the spec it returns builds the full-size architecture, with no weights to load."""
    from captioner.blip_build import write_placeholder_tokenizer
    from captioner.opt_bpe import write_opt_tokenizer

    spec = lavis_blip2_spec(model_name, model_type, directory)
    bert = directory / BERT_DIRNAME
    write_placeholder_tokenizer(bert)
    (bert / "config.json").write_text(json.dumps(BERT_BASE_CONFIG), encoding="utf-8")
    spec.lm_dir.mkdir(parents=True, exist_ok=True)
    config = LM_CONFIGS[spec.lm_hub_id]
    (spec.lm_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if config["model_type"] == "opt":
        write_opt_tokenizer(spec.lm_dir, ["a", "photo", "of"], size=config["vocab_size"])
    else:
        write_t5_tokenizer(spec.lm_dir, ["a", "photo", "of"])
    spec.checkpoint = None
    return spec


def write_t5_tokenizer(directory: Path, words: list[str]) -> int:
    """A stand-in T5 (SentencePiece Unigram) tokenizer.json for `words` plus single letters;
    returns its vocabulary size. T5's ids: <pad> 0, </s> 1, <unk> 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in sorted(set(words))]
    pieces += [(c, -5.0) for c in letters] + [("\u2581" + c, -4.0) for c in letters]
    unique = list(dict(pieces).items())
    tokenizer = Tokenizer(models.Unigram(unique, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", add_prefix_space=True)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", add_prefix_space=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 0,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return len(unique)
