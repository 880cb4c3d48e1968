"""How a view finds the runtime its app was built around (Flask's `extensions` slot)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:
    from captioning.runtime import Runtime

EXTENSION = "blip2.runtime"


def attach(app: Flask, runtime: Runtime) -> None:
    app.extensions[EXTENSION] = runtime


def runtime_of(app: Flask) -> Runtime:
    return app.extensions[EXTENSION]


def current_runtime() -> Runtime:
    return runtime_of(current_app)
