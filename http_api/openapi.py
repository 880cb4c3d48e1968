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
:func:`add_part`. tests/test_openapi.py fails for any URL rule no part documents. The document
is built on first use and cached per app.
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
    InvalidRequest,
    NotReady,
    ServiceError,
    TooLarge,
    too_large,
)
from captioning.options import OPTIONS, TAGS, OptionSpec
from http_api.openapi_schemas import HEALTH_EXAMPLE as HEALTH_EXAMPLE  # re-exported, like
from http_api.openapi_schemas import STR as STR  # the helpers below, for the route modules
from http_api.openapi_schemas import SUCCESS_EXAMPLE as SUCCESS_EXAMPLE
from http_api.openapi_schemas import core_schemas, error_envelope, ref

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
    """Every registered blueprint's part (its module's hook), then the parts added to the app
    itself."""
    factories: list[PartFactory] = []
    for blueprint in app.blueprints.values():
        factory = module_part(sys.modules.get(blueprint.import_name))
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
    model = model_label(settings)  # reads the model's YAML: once per document
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "BLIP2 caption service",
            "version": API_VERSION,
            "description": f"{_INFO} Model: `{model}`.",
            "x-model": model,
        },
        "tags": tags,
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas},
    }


def model_label(settings: Settings) -> str:
    """The configured model's name (`blip2_opt/caption_coco_opt2.7b`, `tiny-blip2`), read from
    the settings and the model's YAML only: nothing is loaded or downloaded."""
    from captioner.files import configured_name

    return configured_name(settings)


_INFO = (
    "Image captioning (Salesforce LAVIS BLIP or BLIP-2, COCO) with emoji mappings, answered in the "
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
