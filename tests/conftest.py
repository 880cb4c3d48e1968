"""Shared fixtures: real local servers and paths. Heavy ones are session-scoped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from local_http import LocalHTTPServer

ROOT = Path(__file__).resolve().parent.parent

SHARED = ROOT.parent / "shared"
REFERENCE_CONFIG = SHARED / "reference-config"
TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"


@pytest.fixture(scope="session")
def tiny_captioner():
    """The project's tiny-shapes model, loaded once per test session (LAVIS import is slow)."""
    from blip2_model import Captioner
    from settings import Settings

    return Captioner.load(Settings().with_overrides(model_config=TINY_YAML, device="cpu"))


@pytest.fixture
def base_settings(tmp_path: Path):
    """Settings for an app around the tiny model: no network for emoji config, private cache."""
    from settings import Settings

    return Settings().with_overrides(
        model_config=TINY_YAML,
        device="cpu",
        auto_update=False,
        emoji_cache_dir=tmp_path / "emoji-cache",
        jobs_dir=tmp_path / "jobs",
    )


@pytest.fixture
def serve_app(tiny_captioner):
    """Factory: a real waitress server around `create_app(Runtime(settings, captioner=...))`,
    started and ready; closed (server, then runtime) after the test."""
    from captioning.runtime import Runtime
    from http_api.server import waitress_options
    from REST import create_app
    from servers import RunningServer

    running: list[tuple[RunningServer, Runtime]] = []

    def start(settings, captioner=tiny_captioner, **kw):
        runtime = Runtime(settings, captioner=captioner, **kw).start(wait=True)
        server = RunningServer(create_app(runtime), **waitress_options(settings))
        server.runtime = runtime
        running.append((server, runtime))
        return server

    yield start
    for server, runtime in running:
        server.close()
        runtime.stop()


@pytest.fixture
def http_server() -> Iterator[LocalHTTPServer]:
    """A real HTTP server on 127.0.0.1 for one test."""
    server = LocalHTTPServer()
    yield server
    server.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[str]:
    """A real redis-server for one test; its URL."""
    from redis_process import RedisProcess

    server = RedisProcess(tmp_path)
    yield server.url
    server.close()


def far() -> float:
    """A deadline no batcher test reaches."""
    return time.monotonic() + 30


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., object]]:
    """Start Batchers around a test's run_batch; every one is stopped afterwards."""
    from captioning.batcher import Batcher

    made: list[Batcher] = []

    def make(run: Callable[..., object], **kw: object) -> Batcher:
        batcher: Batcher = Batcher(run, **kw).start()  # type: ignore[arg-type]
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.stop()
