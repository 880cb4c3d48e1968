"""The OpenAPI 3.1 document of the HTTP API, assembled from the parts that serve the routes.

Integrators should learn the API from the service itself (`GET /openapi.json`, Swagger UI at
`GET /docs`), and the document must never disagree with the code. So nothing in it is a second
hand-kept list: query options (type, range, default, help) come from the OptionSpec rows the
request parser uses (`captioning.options.OPTIONS` and `TAGS`); error statuses, their meanings
and `Retry-After` come from `captioning.errors.HTTP_TABLE`, which the error handler uses; raw
body media types and upload extensions come from the request parser's own constants; limits
come from the app's settings.

How routes contribute (routes added later describe themselves beside their code):

    # in http_api/batch.py, next to `bp = Blueprint(...)`
    def openapi_part(settings: Settings) -> openapi.ApiPart:
        return openapi.ApiPart(
            paths={"/v3/batch": {"post": {..., "responses": {
                "200": openapi.json_response("Batch result", "BatchResult"),
                **openapi.error_responses(InvalidRequest, TooLarge, Overloaded)}}}},
            schemas={"BatchResult": {...}},
        )

A module whose paths do not depend on settings may instead define `OPENAPI_PATHS` (path items)
and `OPENAPI_SCHEMAS` (component schemas). Every blueprint registered on the app whose module
defines either is collected, in registration order; routes registered on the app itself call
:func:`add_part`. The parts for
`analyze`, `health` and `page` live in :data:`BUILTIN_PARTS` below until their modules define
their own. tests/test_openapi.py fails for any URL rule no part documents. The document is built
on first use and cached per app.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from captioning.errors import (
    HTTP_TABLE,
    AccessDenied,
    DeadlineExceeded,
    ImageInputError,
    InvalidRequest,
    NotReady,
    Overloaded,
    ServiceError,
    ShuttingDown,
    TooLarge,
    too_large,
)
from captioning.options import OPTIONS, TAGS, OptionSpec
from http_api.envelope import FRAMEWORK, SERVICE
from http_api.request_image import RAW_TYPES
from image_input.sources import ALLOWED_EXTENSIONS

if TYPE_CHECKING:
    from flask import Flask

    from settings import Settings

OPENAPI_VERSION = "3.1.0"
API_VERSION = "3"
HOOK = "openapi_part"
STATIC_PATHS, STATIC_SCHEMAS = "OPENAPI_PATHS", "OPENAPI_SCHEMAS"
EXTENSION = "blip2.openapi"
_EXTRA_PARTS = "blip2.openapi.parts"
_BUILD_LOCK = threading.Lock()

JSON = "application/json"
HTML = "text/html"
_JSON_TYPES: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass(frozen=True)
class ApiPart:
    """What one module adds: path items (OpenAPI 3.1 form) and component schemas."""

    paths: dict[str, dict[str, Any]]
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: list[dict[str, str]] = field(default_factory=list)


PartFactory = Callable[["Settings"], ApiPart]


# -- helpers for parts ---------------------------------------------------------------------


def ref(schema: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema}"}


def json_response(
    description: str,
    schema: str,
    *,
    examples: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A response whose body is the named component schema, with named examples."""
    media: dict[str, Any] = {"schema": ref(schema)}
    if examples:
        media["examples"] = {name: {"value": value} for name, value in examples.items()}
    response: dict[str, Any] = {"description": description, "content": {JSON: media}}
    if headers:
        response["headers"] = headers
    return response


def html_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {HTML: {"schema": {"type": "string"}}}}


def error_responses(*errors: type[ServiceError]) -> dict[str, dict[str, Any]]:
    """The error responses an operation can give, grouped by the status HTTP_TABLE maps each
    domain error to (with `Retry-After` where the table sends it); 500 is always included."""
    by_status: dict[int, list[type[ServiceError]]] = {}
    for cls in errors:
        by_status.setdefault(_status_of(cls), []).append(cls)
    responses: dict[str, dict[str, Any]] = {}
    for status in sorted(by_status):
        classes = by_status[status]
        lines = [f"- `{cls.__name__}`: {_doc(cls)}" for cls in classes]
        retry = [cls.__name__ for cls in classes if "Retry-After" in _headers_of(cls)]
        headers = {}
        if retry:
            lines.append(f"\n`Retry-After` (seconds) comes with: {', '.join(retry)}.")
            headers["Retry-After"] = {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 0},
            }
        responses[str(status)] = json_response(
            "\n".join(lines),
            "ErrorEnvelope",
            examples={"error": _error_example(status, classes[0])},
            headers=headers or None,
        )
    responses["500"] = json_response(
        "A failure of ours: logged with its stack; the message carries no internals.",
        "ErrorEnvelope",
        examples={"error": error_envelope("Internal server error")},
    )
    return responses


def error_envelope(message: str, status: str = "error") -> dict[str, Any]:
    return {
        "error": {"message": message},
        "metadata": {"processing_time": 0.0},
        "predictions": [],
        "service": SERVICE,
        "status": status,
    }


def option_parameters() -> list[dict[str, Any]]:
    """The generation options and the `tags` flag as query parameters, straight from their
    OptionSpec rows."""
    return [option_parameter(spec) for spec in (*OPTIONS, TAGS)]


def option_parameter(spec: OptionSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": _JSON_TYPES[spec.kind], "default": spec.default}
    if spec.minimum is not None:
        schema["exclusiveMinimum" if spec.exclusive_minimum else "minimum"] = spec.minimum
    if spec.maximum is not None:
        schema["maximum"] = spec.maximum
    if spec.max_chars is not None:
        schema["maxLength"] = spec.max_chars
    accepted = " (`true`/`1` or `false`/`0`)" if spec.kind is bool else ""
    return {
        "name": spec.name,
        "in": "query",
        "required": False,
        "allowEmptyValue": True,  # an empty value counts as absent
        "description": f"{spec.help}{accepted}. Out of range: 400 `{spec.message()}`.",
        "schema": schema,
    }


def _mapping(cls: type[ServiceError]) -> tuple[int, dict[str, str]]:
    """HTTP_TABLE's (status, headers) for an error class, looked up along its MRO as the
    error handler does for instances."""
    for base in cls.__mro__:
        if base in HTTP_TABLE:
            return HTTP_TABLE[base]  # type: ignore[index]
    return 500, {}


def _status_of(cls: type[ServiceError]) -> int:
    return _mapping(cls)[0]


def _headers_of(cls: type[ServiceError]) -> dict[str, str]:
    return _mapping(cls)[1]


def _doc(cls: type[ServiceError]) -> str:
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0]


_EXAMPLE_MESSAGES: dict[type[ServiceError], tuple[str, str]] = {
    InvalidRequest: ("Must provide either url or file parameter, or POST a file", "error"),
    AccessDenied: ("Access denied: /etc/passwd", "error"),
    TooLarge: (too_large(32 * 1024 * 1024).message, "error"),
    NotReady: ("Model is loading", "loading"),
}


def _error_example(status: int, cls: type[ServiceError]) -> dict[str, Any]:
    for known, (message, state) in _EXAMPLE_MESSAGES.items():
        if issubclass(cls, known):
            return error_envelope(message, state)
    return error_envelope(f"{cls.__name__} ({status})")


# -- the shared component schemas ------------------------------------------------------------

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
    "model": {"device": "cpu", "status": "loaded", "name": "blip_caption/large_coco"},
    "model_status": "loaded",
    "schema_version": "health.v1",
    "service": SERVICE,
    "status": "healthy",
    "warnings": [],
}

_STR = {"type": "string"}
_SECONDS = {"type": "number", "minimum": 0, "description": "seconds, rounded to 3 decimals"}
_DEVICE = {"type": "string", "pattern": "^(cpu|cuda(:[0-9]+)?|mps)$"}


def core_schemas() -> dict[str, dict[str, Any]]:
    """The v3 envelopes and health.v1 (CONTRACT.md); extra keys only where the contract allows."""
    return {
        "EmojiMapping": {
            "type": "object",
            "required": ["emoji", "word"],
            "properties": {"emoji": _STR, "word": _STR},
            "additionalProperties": False,
        },
        "Prediction": {
            "type": "object",
            "required": ["text"],
            "properties": {
                "text": {**_STR, "description": "the caption through str.capitalize()"},
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
                    "items": _STR,
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
                        "processing_time": _SECONDS,
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
                    "properties": {"message": {**_STR, "minLength": 1}},
                    "additionalProperties": False,
                },
                "metadata": {
                    "type": "object",
                    "required": ["processing_time"],
                    "properties": {"processing_time": _SECONDS},
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
            "device": _DEVICE,
            "endpoints": {"type": "array"},
            "model": {
                "type": "object",
                "required": ["device", "status"],
                "properties": {
                    "device": _DEVICE,
                    "status": {"enum": model_states},
                    "name": _STR,
                    "precision": _STR,
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
            "warnings": {"type": "array", "items": _STR},
        },
        "additionalProperties": False,
        "examples": [HEALTH_EXAMPLE],
    }


# -- the built-in parts: analyze, health, page ----------------------------------------------

ANALYZE_ERRORS: tuple[type[ServiceError], ...] = (
    InvalidRequest,
    ImageInputError,
    AccessDenied,
    TooLarge,
    NotReady,
    Overloaded,
    DeadlineExceeded,
    ShuttingDown,
)


def analyze_part(settings: Settings) -> ApiPart:
    get_op = _analyze_operation(settings, "get")
    post_op = _analyze_operation(settings, "post")
    post_op["requestBody"] = _image_body(settings)
    paths = {}
    for path, alias in (("/analyze", False), ("/v3/analyze", True)):
        paths[path] = {
            method: {**op, "operationId": f"{method}_{'v3_' if alias else ''}analyze"}
            for method, op in (("get", get_op), ("post", post_op))
        }
    return ApiPart(
        paths=paths,
        tags=[{"name": "analyze", "description": "caption one image (the v3 envelope)"}],
    )


def _analyze_operation(settings: Settings, method: str) -> dict[str, Any]:
    limit = settings.max_file_size
    how = (
        "a raw image body, a multipart `file` part, or the `url`/`file` query (first match wins)"
        if method == "post"
        else "the `url` or `file` query parameter"
    )
    roots = (
        "only under the configured FILE_ROOTS (403 outside)"
        if settings.file_roots
        else "any path the server can read"
    )
    return {
        "tags": ["analyze"],
        "summary": "Caption one image" + (" (upload)" if method == "post" else ""),
        "description": (
            f"Captions the image given by {how}, maps the caption's words to emojis and "
            f"answers with the v3 envelope. Images over {limit} bytes get 413. Absent options "
            "mean the reference's decoding; a `max_length` below the default `min_length` "
            "lowers that default with it. An empty query value counts as absent. `/analyze` and "
            "`/v3/analyze` are identical. "
            f"`file` reads {roots}."
        ),
        "parameters": [
            {
                "name": "url",
                "in": "query",
                "required": False,
                "allowEmptyValue": True,
                "description": (
                    "http(s) URL of an image, e.g. `https://example.com/cat.jpg`, downloaded "
                    f"within TIMEOUT ({settings.timeout:g} s); any failure is 400 "
                    "`Failed to download image: …`. Not with `file`."
                ),
                "schema": _STR,
            },
            {
                "name": "file",
                "in": "query",
                "required": False,
                "allowEmptyValue": True,
                "description": (
                    "path of an image on the server, e.g. `/data/images/cat.jpg`. Not with `url`."
                ),
                "schema": _STR,
            },
            *option_parameters(),
        ],
        "responses": {
            "200": json_response(
                "The caption(s), one prediction each",
                "SuccessEnvelope",
                examples={"caption": SUCCESS_EXAMPLE},
            ),
            **error_responses(*ANALYZE_ERRORS),
        },
    }


def _image_body(settings: Settings) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
    extensions = ", ".join(sorted(ALLOWED_EXTENSIONS))
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        **binary,
                        "description": (
                            f"the image; the filename's extension must be one of {extensions} "
                            "(400 `File type not allowed`), the bytes decide the real format"
                        ),
                    }
                },
            }
        }
    }
    for media_type in sorted(RAW_TYPES):
        content[media_type] = {"schema": {**binary, "contentMediaType": media_type}}
    return {
        "required": False,
        "description": (
            f"The image, at most {settings.max_file_size} bytes: a multipart part named `file`, "
            "or the raw bytes with one of these media types (the bytes decide the format: "
            "JPEG, PNG, GIF, BMP, WEBP, TIFF). An empty raw body is 400. Without either, the "
            "`url`/`file` query is read."
        ),
        "content": content,
    }


def health_part(settings: Settings) -> ApiPart:
    loading = {
        **HEALTH_EXAMPLE,
        "model": {"device": "cpu", "status": "loading"},
        "model_status": "loading",
        "status": "loading",
    }
    op = {
        "tags": ["operations"],
        "operationId": "health",
        "summary": "Readiness (health.v1)",
        "description": (
            "200 only when the model is loaded and the service takes work; 503 while it loads "
            "(`loading`), after a failed load (`error`, the reason in `warnings`) and while "
            "draining for shutdown (`draining`)."
        ),
        "responses": {
            "200": json_response("Ready", "Health", examples={"healthy": HEALTH_EXAMPLE}),
            "503": json_response("Not ready", "Health", examples={"loading": loading}),
        },
    }
    return ApiPart(
        paths={"/health": {"get": op}},
        tags=[{"name": "operations", "description": "health, documentation"}],
    )


def page_part(settings: Settings) -> ApiPart:
    op = {
        "tags": ["operations"],
        "operationId": "page",
        "summary": "Browser test page",
        "description": "Upload, drop or paste an image and see its captions (HTML).",
        "responses": {"200": html_response("The page")},
    }
    return ApiPart(paths={"/": {"get": op}})


BUILTIN_PARTS: dict[str, PartFactory] = {
    "analyze": analyze_part,
    "health": health_part,
    "page": page_part,
}


# -- assembly ----------------------------------------------------------------------------------


def add_part(app: Flask, factory: PartFactory) -> None:
    """Contribute the paths of routes registered on the app itself (not on a blueprint)."""
    app.extensions.setdefault(_EXTRA_PARTS, []).append(factory)


def document(app: Flask, settings: Settings) -> dict[str, Any]:
    """The app's OpenAPI document, built once (all blueprints are registered by then)."""
    cached = app.extensions.get(EXTENSION)
    if cached is None:
        with _BUILD_LOCK:
            cached = app.extensions.get(EXTENSION)
            if cached is None:
                cached = build(collect_parts(app), settings)
                app.extensions[EXTENSION] = cached
    return cached


def collect_parts(app: Flask) -> list[PartFactory]:
    """Every registered blueprint's part (its module's hook, or a built-in part), then the
    parts added to the app itself."""
    factories: list[PartFactory] = []
    for name, blueprint in app.blueprints.items():
        factory = module_part(sys.modules.get(blueprint.import_name)) or BUILTIN_PARTS.get(name)
        if factory is not None:
            factories.append(factory)
    return factories + list(app.extensions.get(_EXTRA_PARTS, []))


def module_part(module: Any) -> PartFactory | None:
    """A module's contribution: `openapi_part(settings) -> ApiPart`, or the static form
    `OPENAPI_PATHS` (path items) with optional `OPENAPI_SCHEMAS` (component schemas)."""
    factory = getattr(module, HOOK, None)
    if factory is not None:
        return factory
    paths = getattr(module, STATIC_PATHS, None)
    if paths is None:
        return None
    schemas = getattr(module, STATIC_SCHEMAS, {})
    return lambda _settings: ApiPart(paths=paths, schemas=schemas)


def build(factories: Iterable[PartFactory], settings: Settings) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas = core_schemas()
    tags: list[dict[str, str]] = []
    for factory in factories:
        part = factory(settings)
        _merge_paths(paths, part.paths)
        _merge_unique(schemas, part.schemas, "schema")
        tags.extend(t for t in part.tags if t["name"] not in {x["name"] for x in tags})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "BLIP2 caption service",
            "version": API_VERSION,
            "description": _INFO,
        },
        "tags": tags,
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas},
    }


_INFO = (
    "Image captioning (Salesforce LAVIS BLIP, COCO) with emoji mappings, answered in the "
    "animal-farm v3 JSON envelope (see CONTRACT.md). Every error is the JSON error envelope: "
    "unknown routes get 404 and wrong methods 405 (with `Allow`). Every route also answers "
    "`OPTIONS` (CORS preflight), and `HEAD` where it answers `GET`."
)


def _merge_paths(paths: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> None:
    for path, item in new.items():
        _merge_unique(paths.setdefault(path, {}), item, f"operation on {path}:")


def _merge_unique(into: dict[str, Any], new: dict[str, Any], what: str) -> None:
    for key, value in new.items():
        if key in into and into[key] != value:
            raise ValueError(f"OpenAPI {what} {key!r} is defined twice")
        into[key] = value
