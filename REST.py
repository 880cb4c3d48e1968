"""BLIP2 caption service: a drop-in for the animal-farm "BLIP2" service on port 7777.

    python REST.py [--host H] [--port P] [--threads N] [--log-level LEVEL]

Flags → settings → runtime → app → server. The app is built by `create_app(runtime)`; the HTTP
edge lives in http_api/, the captioning pipeline in captioning/, the model in blip2_model.py
(see docs/architecture.md and ../shared/CONTRACT.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable

from flask import Flask

import http_api
from captioning.runtime import Runtime
from http_api.envelope import SERVICE
from log_format import setup_logging
from settings import Settings, SettingsError

log = logging.getLogger("blip2")


def create_app(runtime: Runtime) -> Flask:
    """The Flask app around a runtime (started or not: until its model is ready, it answers
    503 `loading`)."""
    app = Flask(__name__)
    http_api.init_app(app, runtime)
    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="BLIP2 caption service (animal-farm v3 API)")
    parser.add_argument("--host", help="bind address (default 0.0.0.0, or 127.0.0.1 if PRIVATE)")
    parser.add_argument("--port", type=int, help="port (default PORT or 7777)")
    parser.add_argument("--threads", type=int, help="waitress worker threads (default 8)")
    parser.add_argument("--log-level", type=str.upper, help="DEBUG, INFO, WARNING, ERROR")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env().with_flags(
        args, host="host", port="port", threads="threads", log_level="log_level"
    )
    return settings.with_overrides(private=False) if args.host else settings


def serve(app: Flask, settings: Settings, on_listening: Callable[[], None] | None = None) -> None:
    """Serve with waitress until SIGTERM/SIGINT."""
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
    if on_listening is not None:
        on_listening()
    server.run()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = build_settings(parse_args(argv))
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    runtime = Runtime(settings)
    app = create_app(runtime)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve(app, settings, on_listening=runtime.start)
    except KeyboardInterrupt:
        pass
    finally:
        runtime.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
