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

from flask import Flask

import http_api
from captioner.device import DeviceError, plan_device
from captioner.malloc_tuning import tune_malloc
from captioning.runtime import Runtime
from http_api.server import HttpServer
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
    parser.add_argument(
        "--threads", type=int, help="waitress threads (default: sized to MAX_QUEUE)"
    )
    parser.add_argument("--log-level", type=str.upper, help="DEBUG, INFO, WARNING, ERROR")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env().with_flags(
        args, host="host", port="port", threads="threads", log_level="log_level"
    )
    return settings.with_overrides(private=False) if args.host else settings


GIL_SWITCH_INTERVAL_S = 0.001


def main(argv: list[str] | None = None) -> int:
    try:
        settings = build_settings(parse_args(argv))
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    tune_malloc()
    # The inference thread runs Hugging Face's generate loop in Python, holding the GIL between
    # torch calls; every other thread (waitress's socket loop reading bodies 8 KB at a time, a
    # request thread refusing with 503, /health) waits up to the switch interval each time it
    # wants the GIL back. CPython's 5 ms made a refused request wait ~0.3 s under a burst; 1 ms
    # keeps the door and /health quick (docs/performance.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    if settings.device and settings.device.startswith("cuda"):
        try:  # an explicit GPU that cannot be used will never start: say why and stop now
            plan_device(settings.device, settings.precision)
        except DeviceError as exc:
            log.error("%s", exc)
            return 1
    runtime = Runtime(settings)
    server = HttpServer(create_app(runtime), settings)
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, server.request_drain)
    log.info("listening on http://%s:%s", server.host, server.port)
    runtime.start()
    try:
        served_all = server.serve(on_drain=runtime.begin_drain)
    finally:
        finished_all = runtime.stop(drain_timeout=server.time_left())
    log.info("stopped (%s)", "drained" if served_all and finished_all else "drain timed out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
