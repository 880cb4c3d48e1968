"""HTTP edge of the BLIP2 caption service: routes, input parsing and the animal-farm v3 envelope.

    python REST.py [--host H] [--port P] [--threads N] [--log-level LEVEL]

A drop-in for the animal-farm "BLIP2" service on port 7777 (see ../shared/CONTRACT.md and
docs/compatibility.md). The app is built by `create_app(settings, captioner)`; waitress serves it.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

import image_input
from batcher import DeadlineExceeded, QueueFull, WorkerStopped
from blip2_model import Captioner, GenerationOptions, GenerationOptionsError
from caption_service import READY, CaptionService, NotReady
from emoji_config import EmojiConfigStore
from result_cache import ResultCache, make_cache
from settings import Settings, SettingsError

log = logging.getLogger("blip2")

SERVICE = "blip2"
FRAMEWORK = "BLIP2 (Bootstrapping Language-Image Pre-training v2)"
RAW_TYPES = {"image/jpeg", "image/png", "image/webp", "application/octet-stream"}
SHINY_CHANCE = 1 / 2500
RETRY_AFTER_S = 1

bp = Blueprint("analyze", __name__)


class ApiError(Exception):
    """An error answered with the v3 error envelope."""

    def __init__(self, status: int, message: str, *, state: str = "error", **headers: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.state = state
        self.headers = headers


# ------------------------------------------------------------------------------- envelopes


def _elapsed() -> float:
    started = getattr(g, "started", None)
    return round(time.monotonic() - started, 3) if started is not None else 0.0


def error_response(err: ApiError) -> Response:
    body = {
        "error": {"message": err.message},
        "metadata": {"processing_time": _elapsed()},
        "predictions": [],
        "service": SERVICE,
        "status": err.state,
    }
    resp = jsonify(body)
    resp.status_code = err.status
    for name, value in err.headers.items():
        resp.headers[name.replace("_", "-")] = value
    return resp


def emoji_mappings(caption: str) -> list[dict[str, str]]:
    """The one place captions meet the emoji mapper."""
    store: EmojiConfigStore = current_app.extensions["blip2.emoji"]
    return store.map(caption)


def prediction(caption: str) -> dict[str, Any]:
    pred: dict[str, Any] = {"text": caption.strip().capitalize()}
    mappings = emoji_mappings(caption)
    if mappings:  # the reference omits the key rather than sending []
        pred["emoji_mappings"] = mappings
    if random.random() < SHINY_CHANCE:
        pred["shiny"] = True
    return pred


# ------------------------------------------------------------------------------- input


def _int_arg(name: str, low: int, high: int) -> int | None:
    raw = request.args.get(name, "").strip()
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}")
    return value


def _float_arg(name: str, low: float, high: float, *, open_low: bool = False) -> float | None:
    raw = request.args.get(name, "").strip()
    if raw == "":
        return None
    span = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number in {span}") from None
    if not (low < value <= high if open_low else low <= value <= high):
        raise ApiError(400, f"{name} must be a number in {span}")
    return value


def parse_options() -> GenerationOptions:
    """Generation options from the query string; absent means the reference behaviour."""
    defaults = GenerationOptions()
    kw: dict[str, Any] = {}
    sampling_raw = request.args.get("sampling", "").strip().lower()
    if sampling_raw not in ("", "true", "false", "1", "0"):
        raise ApiError(400, "sampling must be true or false")
    kw["use_nucleus_sampling"] = sampling_raw in ("true", "1")
    num_beams = _int_arg("num_beams", 1, GenerationOptions.MAX_BEAMS)
    max_length = _int_arg("max_length", 1, GenerationOptions.MAX_LENGTH)
    ceiling = max_length if max_length is not None else defaults.max_length
    min_length = _int_arg("min_length", 0, ceiling)
    num_captions = _int_arg("num_captions", 1, GenerationOptions.MAX_CAPTIONS)
    top_p = _float_arg("top_p", 0.0, 1.0, open_low=True)
    penalty = _float_arg("repetition_penalty", 1.0, 10.0)
    prompt = request.args.get("prompt", "")
    if num_beams is not None:
        kw["num_beams"] = num_beams
    if max_length is not None:
        kw["max_length"] = max_length
        if min_length is None:  # keep the default minimum from exceeding a shorter maximum
            min_length = min(defaults.min_length, max_length)
    if min_length is not None:
        kw["min_length"] = min_length
    if num_captions is not None:
        kw["num_captions"] = num_captions
    if top_p is not None:
        kw["top_p"] = top_p
    if penalty is not None:
        kw["repetition_penalty"] = penalty
    if prompt.strip():
        kw["prompt"] = prompt.strip()
    try:
        return GenerationOptions(**kw).validate()
    except GenerationOptionsError as exc:
        raise ApiError(400, exc.message) from None


def read_image_bytes(settings: Settings) -> tuple[bytes, str]:
    """The caller's image bytes, picked as CONTRACT.md says (raw body, multipart, query), and
    the error prefix the contract uses for that source."""
    if request.method == "POST":
        media_type = (request.mimetype or "").lower()
        if media_type in RAW_TYPES:
            data = request.get_data(cache=False)
            if not data:
                raise ApiError(400, "No image body provided")
            return data, image_input.BODY_ERROR
        if media_type == "multipart/form-data" and "file" in request.files:
            upload = request.files["file"]
            if not upload.filename:
                raise ApiError(400, "No file selected")
            if not image_input.allowed_filename(upload.filename):
                raise ApiError(400, "File type not allowed")
            return upload.read(settings.max_file_size + 1), image_input.BODY_ERROR
    url = request.args.get("url", "").strip()
    path = request.args.get("file", "").strip()
    if url and path:
        raise ApiError(400, "Cannot provide both url and file parameters")
    if url:
        data = image_input.fetch_url(
            url,
            max_bytes=settings.max_file_size,
            timeout=settings.timeout,
            allow_private=settings.allow_private_urls,
        )
        return data, image_input.URL_ERROR
    if path:
        data = image_input.read_file(
            path, max_bytes=settings.max_file_size, roots=settings.file_roots
        )
        return data, image_input.FILE_ERROR
    raise ApiError(400, "Must provide either url or file parameter, or POST a file")


# ------------------------------------------------------------------------------- routes


@bp.route("/analyze", methods=["GET", "POST"])
@bp.route("/v3/analyze", methods=["GET", "POST"])
def analyze() -> Response:
    settings: Settings = current_app.config["BLIP2_SETTINGS"]
    service: CaptionService = current_app.extensions["blip2.service"]
    try:
        service.ready()
        options = parse_options()
        data, error_prefix = read_image_bytes(settings)
        if len(data) > settings.max_file_size:
            raise image_input.too_large_error(settings.max_file_size)
        key, captions = service.lookup(data, options)
        cached = captions is not None
        if captions is None:
            image = image_input.decode_image(
                data, max_pixels=settings.max_image_pixels, error_prefix=error_prefix
            )
            captions = service.caption(image, options, key, service.deadline(g.started))
    except image_input.ImageInputError as exc:
        raise ApiError(exc.status, exc.message) from None
    except NotReady as exc:
        message = "Model is loading" if exc.status != "error" else "Model failed to load"
        raise ApiError(503, message, state=exc.status, Retry_After=str(RETRY_AFTER_S)) from None
    except QueueFull:
        raise ApiError(
            503,
            "Server busy: too many requests queued, retry shortly",
            Retry_After=str(RETRY_AFTER_S),
        ) from None
    except DeadlineExceeded:
        raise ApiError(
            503, f"Request timed out after {settings.request_timeout:g} s waiting for the model"
        ) from None
    except WorkerStopped:
        raise ApiError(503, "Service is shutting down") from None
    metadata: dict[str, Any] = {"model_info": {"framework": FRAMEWORK}}
    if cached:
        metadata["cached"] = True
    body = {
        "metadata": metadata,
        "predictions": [prediction(c) for c in captions],
        "service": SERVICE,
        "status": "success",
    }
    metadata["processing_time"] = _elapsed()
    return jsonify(body)


@bp.route("/health", methods=["GET"])
def health() -> Response:
    service: CaptionService = current_app.extensions["blip2.service"]
    store: EmojiConfigStore = current_app.extensions["blip2.emoji"]
    cache: ResultCache = current_app.extensions["blip2.cache"]
    model = service.health()
    ready = service.status == READY
    device = model.get("device") or _expected_device(current_app.config["BLIP2_SETTINGS"])
    model.setdefault("device", device)
    warnings = list(cache.warnings())
    if service.status == "error":
        warnings.insert(0, f"model failed to load: {service.reason}")
    body = {
        "dependencies": {"emoji_config": store.health(), "result_cache": cache.health()},
        "device": device,
        "endpoints": [],
        "model": model,
        "model_status": service.status,
        "schema_version": "health.v1",
        "service": SERVICE,
        "status": "healthy" if ready else service.status,
        "warnings": warnings,
    }
    resp = jsonify(body)
    resp.status_code = 200 if ready else 503
    return resp


def _expected_device(settings: Settings) -> str:
    if settings.device:
        return "cuda" if settings.device.startswith("cuda") else "cpu"
    return "cpu"


# ------------------------------------------------------------------------------- app factory


def _apply_cors(resp: Response, allowed: frozenset[str]) -> Response:
    """`*` without an Origin; the Origin echoed (with Vary) when the caller sends one."""
    origin = request.headers.get("Origin")
    resp.vary.add("Origin")
    if origin is None:
        if "*" in allowed:
            resp.headers["Access-Control-Allow-Origin"] = "*"
    elif "*" in allowed or origin in allowed:
        resp.headers["Access-Control-Allow-Origin"] = origin
    if request.method == "OPTIONS":
        resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        resp.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Content-Type"
        )
        resp.headers["Access-Control-Max-Age"] = "600"
    return resp


def create_app(
    settings: Settings,
    captioner: Captioner | None = None,
    *,
    emoji_store: EmojiConfigStore | None = None,
    cache: ResultCache | None = None,
) -> Flask:
    """Build the Flask app. With a `captioner` it is ready at once (tests); without one it
    answers 503 until `app.extensions["blip2.service"].set_ready(...)` is called."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_file_size
    app.config["BLIP2_SETTINGS"] = settings
    app.json.sort_keys = True  # type: ignore[attr-defined]
    app.json.ensure_ascii = True  # type: ignore[attr-defined]
    cache = (
        cache
        if cache is not None
        else make_cache(settings.redis_url, settings.cache_size, settings.cache_ttl)
    )
    if emoji_store is None:
        emoji_store = EmojiConfigStore(settings)
    service = CaptionService(settings, cache)
    app.extensions["blip2.service"] = service
    app.extensions["blip2.emoji"] = emoji_store
    app.extensions["blip2.cache"] = cache
    if captioner is not None:
        service.set_ready(captioner)
    app.register_blueprint(bp)
    cors_origins = frozenset(o.strip() for o in settings.cors_origins.split(",") if o.strip())

    @app.before_request
    def _start_clock() -> None:
        g.started = time.monotonic()

    @app.after_request
    def _cors(resp: Response) -> Response:
        return _apply_cors(resp, cors_origins)

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 413:
            message = image_input.too_large_error(settings.max_file_size).message
        else:
            message = exc.name
        err = ApiError(code, message)
        resp = error_response(err)
        if code == 405 and exc.get_response().headers.get("Allow"):
            resp.headers["Allow"] = exc.get_response().headers["Allow"]
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "Internal server error"))

    return app


def close_app(app: Flask) -> None:
    """Stop the worker and background threads an app owns."""
    app.extensions["blip2.service"].close()
    app.extensions["blip2.emoji"].close()


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="BLIP2 caption service (animal-farm v3 API)")
    parser.add_argument("--host", help="bind address (default 0.0.0.0, or 127.0.0.1 if PRIVATE)")
    parser.add_argument("--port", type=int, help="port (default PORT or 7777)")
    parser.add_argument("--threads", type=int, help="waitress worker threads (default 8)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    changes: dict[str, Any] = {}
    if args.host:
        changes.update(host=args.host, private=False)
    if args.port is not None:
        changes["port"] = args.port
    if args.threads is not None:
        changes["threads"] = args.threads
    if args.log_level:
        changes["log_level"] = args.log_level.upper()
    return settings.with_overrides(**changes)


def serve(app: Flask, settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    from waitress import create_server

    server = create_server(
        app,
        host=settings.bind_host,
        port=settings.port,
        threads=settings.threads,
        ident=SERVICE,
        # Flask answers 413 with the envelope first; this only stops abusive bodies early.
        max_request_body_size=settings.max_file_size * 2 + (1 << 20),
        channel_timeout=120,
    )
    log.info("listening on http://%s:%s", settings.bind_host, server.effective_port)
    if on_ready is not None:
        on_ready()
    server.run()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = build_settings(parse_args(argv))
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, settings.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    store = EmojiConfigStore(settings)
    app = create_app(settings, emoji_store=store)
    service: CaptionService = app.extensions["blip2.service"]

    def load() -> Captioner:
        store.load()  # bounded by TIMEOUT; falls back to cache or the bundled config
        store.start_refresh()
        return Captioner.load(settings)

    def start_loading() -> None:
        service.load_in_background(load)

    try:
        serve(app, settings, on_ready=start_loading)
    except KeyboardInterrupt:
        pass
    finally:
        close_app(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
