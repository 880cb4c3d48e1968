"""The OpenAPI document's shared component schemas and examples: the v3 envelopes and health.v1.

Kept apart from the assembly (openapi.py) so the builder stays short; route modules refer to
these by name (`openapi.ref("SuccessEnvelope")`).
"""

from __future__ import annotations

from typing import Any

from http_api.envelope import FRAMEWORK, SERVICE


def ref(schema: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema}"}


def error_envelope(message: str, status: str = "error") -> dict[str, Any]:
    return {
        "error": {"message": message},
        "metadata": {"processing_time": 0.0},
        "predictions": [],
        "service": SERVICE,
        "status": status,
    }


SUCCESS_EXAMPLE: dict[str, Any] = {
    "metadata": {"model_info": {"framework": FRAMEWORK}, "processing_time": 0.166},
    "predictions": [
        {
            "emoji_mappings": [
                {"emoji": "\U0001f9d1", "word": "man"},
                {"emoji": "\U0001f3bd", "word": "military_uniform"},
            ],
            "text": "A man in a military uniform handing flowers to a little girl",
        }
    ],
    "service": SERVICE,
    "status": "success",
}

HEALTH_EXAMPLE: dict[str, Any] = {
    "dependencies": {
        "emoji_config": {"source": "cache", "mappings": 3606, "mwes": 1088},
        "result_cache": {"backend": "memory", "entries": 0, "max_entries": 1024},
    },
    "device": "cpu",
    "endpoints": [],
    "model": {
        "device": "cpu",
        "status": "loaded",
        "name": "blip_caption/large_coco",
        "arch": "blip_caption",
        "precision": "fp32",
        "decode": "fast",
        "parameters": 446_290_492,
    },
    "model_status": "loaded",
    "schema_version": "health.v1",
    "service": SERVICE,
    "status": "healthy",
    "warnings": [],
}

STR = {"type": "string"}
SECONDS = {"type": "number", "minimum": 0, "description": "seconds, rounded to 3 decimals"}
DEVICE = {"type": "string", "pattern": "^(cpu|cuda(:[0-9]+)?|mps)$"}


def core_schemas() -> dict[str, dict[str, Any]]:
    """The v3 envelopes and health.v1 (CONTRACT.md); extra keys only where the contract allows."""
    return {
        "EmojiMapping": {
            "type": "object",
            "required": ["emoji", "word"],
            "properties": {"emoji": STR, "word": STR},
            "additionalProperties": False,
        },
        "Prediction": {
            "type": "object",
            "required": ["text"],
            "properties": {
                "text": {**STR, "description": "the caption through str.capitalize()"},
                "emoji_mappings": {
                    "type": "array",
                    "minItems": 1,
                    "items": ref("EmojiMapping"),
                    "description": "one per distinct mapped word, in caption order; the key is "
                    "absent when nothing maps",
                },
                "shiny": {"const": True, "description": "present with probability 1/2500"},
                "tags": {
                    "type": "array",
                    "items": STR,
                    "uniqueItems": True,
                    "description": "content words and known phrases, in caption order; only "
                    "with `tags=true`",
                },
            },
            "additionalProperties": False,
        },
        "SuccessEnvelope": {
            "type": "object",
            "required": ["metadata", "predictions", "service", "status"],
            "properties": {
                "metadata": {
                    "type": "object",
                    "required": ["model_info", "processing_time"],
                    "properties": {
                        "model_info": {
                            "type": "object",
                            "required": ["framework"],
                            "properties": {"framework": {"const": FRAMEWORK}},
                        },
                        "processing_time": SECONDS,
                        "cached": {
                            "const": True,
                            "description": "present when the captions came from the cache",
                        },
                    },
                },
                "predictions": {
                    "type": "array",
                    "minItems": 1,
                    "items": ref("Prediction"),
                    "description": "one per caption (`num_captions`)",
                },
                "service": {"const": SERVICE},
                "status": {"const": "success"},
            },
            "additionalProperties": False,
            "examples": [SUCCESS_EXAMPLE],
        },
        "ErrorEnvelope": {
            "type": "object",
            "required": ["error", "metadata", "predictions", "service", "status"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {**STR, "minLength": 1}},
                    "additionalProperties": False,
                },
                "metadata": {
                    "type": "object",
                    "required": ["processing_time"],
                    "properties": {"processing_time": SECONDS},
                },
                "predictions": {"type": "array", "maxItems": 0},
                "service": {"const": SERVICE},
                "status": {
                    "enum": ["error", "loading"],
                    "description": "`loading` while the model loads, else `error`",
                },
            },
            "additionalProperties": False,
            "examples": [error_envelope("Cannot provide both url and file parameters")],
        },
        "Health": _health_schema(),
    }


def _health_schema() -> dict[str, Any]:
    model_states = ["loading", "loaded", "error"]
    return {
        "type": "object",
        "description": "health.v1: 200 only when ready to caption (CONTRACT.md).",
        "required": [
            "dependencies",
            "device",
            "endpoints",
            "model",
            "model_status",
            "schema_version",
            "service",
            "status",
            "warnings",
        ],
        "properties": {
            "dependencies": {
                "type": "object",
                "properties": {
                    "emoji_config": {
                        "type": "object",
                        "required": ["source"],
                        "properties": {
                            "source": {"enum": ["remote", "cache", "bundled", None]},
                        },
                    },
                    "result_cache": {
                        "type": "object",
                        "required": ["backend"],
                        "properties": {"backend": {"enum": ["none", "memory", "redis"]}},
                    },
                },
                "additionalProperties": {"type": "object"},
            },
            "device": DEVICE,
            "endpoints": {"type": "array"},
            "model": {
                "type": "object",
                "required": ["device", "status"],
                "properties": {
                    "device": DEVICE,
                    "status": {"enum": model_states},
                    "name": STR,
                    "arch": {"enum": ["blip_caption", "blip2_opt", "blip2_t5"]},
                    "precision": {"enum": ["fp32", "bf16", "fp16"]},
                    "decode": {"enum": ["fast", "stock"]},
                    "parameters": {"type": "integer", "minimum": 0},
                    "queue_depth": {"type": "integer", "minimum": 0},
                    "max_queue": {"type": "integer", "minimum": 0},
                    "max_batch_size": {"type": "integer", "minimum": 1},
                    "batches_run": {"type": "integer", "minimum": 0},
                    "images_run": {"type": "integer", "minimum": 0},
                },
            },
            "model_status": {"enum": model_states},
            "schema_version": {"const": "health.v1"},
            "service": {"const": SERVICE},
            "status": {"enum": ["healthy", "loading", "error", "draining"]},
            "warnings": {"type": "array", "items": STR},
        },
        "additionalProperties": False,
        "examples": [HEALTH_EXAMPLE],
    }
