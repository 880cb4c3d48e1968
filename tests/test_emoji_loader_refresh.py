"""The emoji config after start-up: conditional requests, crash-safe cache writes, and refreshing
while requests are served.

A real local HTTP server plays GitHub (honouring If-None-Match / If-Modified-Since), real files
are the cache, a real child process is killed with SIGKILL half way through a cache write, and
real reader threads map captions while the config is swapped underneath them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import ROOT

from emoji_config import EmojiConfigStore
from emoji_config.cache import remove_stale_temporaries, write_atomic
from emoji_loader_helpers import (
    A_BYTES,
    A_MWE,
    A_RESULT,
    CAPTION,
    MAPPINGS,
    MWE,
    loaded,
    serve_a,
    settings_for,
)
from emoji_loader_helpers import _nltk_imported as _nltk_imported  # a fixture, imported for pytest
from emoji_loader_helpers import primed as primed  # a fixture, imported for pytest
from local_http import LocalHTTPServer
from settings import Settings

# ----- conditional requests --------------------------------------------------------------------


def conditional(body: bytes, etag: str | None, last_modified: str | None):
    """A handler that honours If-None-Match / If-Modified-Since like GitHub does."""

    def respond(req: BaseHTTPRequestHandler) -> None:
        fresh = (etag and req.headers.get("If-None-Match") == etag) or (
            last_modified and req.headers.get("If-Modified-Since") == last_modified
        )
        req.send_response(304 if fresh else 200)
        if etag:
            req.send_header("ETag", etag)
        if last_modified:
            req.send_header("Last-Modified", last_modified)
        req.send_header("Content-Length", "0" if fresh else str(len(body)))
        req.end_headers()
        if not fresh:
            req.wfile.write(body)

    return respond


def test_not_modified_reuses_the_cache(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    stamp = "Wed, 21 Oct 2015 07:28:00 GMT"
    http_server.handle(MAPPINGS, conditional(A_BYTES, '"a1"', None))
    http_server.handle(MWE, conditional(A_MWE.encode(), None, stamp))
    cache = tmp_path / "cache"
    first = loaded(settings_for(http_server, cache))
    fetched_at = first.health()["fetched_at"]
    data_mtime = (cache / "emoji_mappings.json").stat().st_mtime_ns

    http_server.seen.clear()
    second = loaded(settings_for(http_server, cache))
    sent = {s.path: s.headers for s in http_server.seen}
    assert sent[MAPPINGS]["If-None-Match"] == '"a1"'
    assert sent[MWE]["If-Modified-Since"] == stamp
    health = second.health()
    assert health["source"] == "remote"  # confirmed current by the server
    assert health["fetched_at"] == fetched_at  # ... but not downloaded again
    meta = json.loads((cache / "emoji_mappings.json.meta.json").read_text())
    assert meta["checked_at"] > meta["fetched_at"]
    assert second.map(CAPTION) == A_RESULT
    assert (cache / "emoji_mappings.json").stat().st_mtime_ns == data_mtime
    # A third start-up without network still knows when the data was last confirmed.
    third = loaded(settings_for(http_server, cache, auto_update=False))
    assert third.health()["checked_at"] == health["checked_at"]


def test_validators_are_not_sent_to_a_different_url(
    http_server: LocalHTTPServer, primed: Path
) -> None:
    http_server.set("/elsewhere.json", A_BYTES)
    http_server.seen.clear()
    loaded(settings_for(http_server, primed, emoji_mappings_url=http_server.url("/elsewhere.json")))
    sent = {s.path: s.headers for s in http_server.seen}
    assert "If-None-Match" not in sent["/elsewhere.json"]


def test_a_hand_placed_cache_and_a_file_url_work(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "emoji_mappings.json").write_bytes(A_BYTES)
    (own / "mwe.txt").write_text(A_MWE)
    offline = Settings().with_overrides(auto_update=False, emoji_cache_dir=own)
    assert loaded(offline).map(CAPTION) == A_RESULT
    assert loaded(offline).health()["source"] == "cache"
    by_url = Settings().with_overrides(
        auto_update=True,
        emoji_mappings_url=(own / "emoji_mappings.json").as_uri(),
        mwe_url=(own / "mwe.txt").as_uri(),
        emoji_cache_dir=tmp_path / "cache",
    )
    store = loaded(by_url)
    assert store.health()["source"] == "remote"
    assert store.map(CAPTION) == A_RESULT


def test_an_unwritable_cache_is_not_fatal(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    serve_a(http_server)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    store = loaded(settings_for(http_server, blocker))
    assert store.health()["source"] == "remote"
    assert store.map(CAPTION) == A_RESULT


# ----- crash while writing the cache -----------------------------------------------------------


def test_an_error_half_way_through_a_cache_write_leaves_the_old_cache(primed: Path) -> None:
    class Crash(Exception):
        pass

    def crash(written: int) -> None:
        raise Crash(written)

    with pytest.raises(Crash):
        write_atomic(
            primed / "emoji_mappings.json", b'{"cat": "x"}' * 100, chunk_size=8, on_chunk=crash
        )
    assert (primed / "emoji_mappings.json").read_bytes() == A_BYTES
    assert [p for p in primed.iterdir() if p.name.endswith(".tmp")] == []
    store = loaded(Settings().with_overrides(auto_update=False, emoji_cache_dir=primed))
    assert store.health()["source"] == "cache"
    assert store.health()["files"]["emoji_mappings.json"]["etag"] == '"a1"'
    assert store.map(CAPTION) == A_RESULT


CRASHING_WRITER = """
import sys, time
from pathlib import Path
from emoji_config.cache import write_atomic

def stall(written):
    print("half written", flush=True)
    time.sleep(60)

write_atomic(Path(sys.argv[1]), b'{"cat": "x", ' * 50_000 + b'"z": "y"}', on_chunk=stall)
"""


def test_a_process_killed_mid_write_leaves_the_old_cache(primed: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(primed / "emoji_mappings.json")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"half written\n"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=10)
    leftovers = [p for p in primed.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # it died mid-write
    assert (primed / "emoji_mappings.json").read_bytes() == A_BYTES
    store = loaded(Settings().with_overrides(auto_update=False, emoji_cache_dir=primed))
    assert store.health()["source"] == "cache"
    assert store.map(CAPTION) == A_RESULT
    remove_stale_temporaries(primed, older_than=0)
    assert not leftovers[0].exists()


# ----- refresh while serving -------------------------------------------------------------------

# Two configs whose every mix gives a distinct result for "red fox", so a half-swapped config
# (table of one, phrases of the other) would be visible.
RED_FOX = "a red fox"
A2 = ({"red_fox": "🦊", "red": "🟥", "fox": "🐕"}, "red_fox\n")
B2 = ({"red_fox": "🍎", "red": "🔴", "fox": "🦊"}, "big_cat\n")
A2_RESULT = [{"emoji": "🦊", "word": "red_fox"}]
B2_RESULT = [{"emoji": "🔴", "word": "red"}, {"emoji": "🦊", "word": "fox"}]


def flipping(server: LocalHTTPServer) -> dict[str, int]:
    """Serve A2, then B2, then A2…: each table request flips the version, phrases follow it."""
    state = {"version": 1, "table_requests": 0}

    def body(req: BaseHTTPRequestHandler, data: bytes, etag: str) -> None:
        if req.headers.get("If-None-Match") == etag:
            req.send_response(304)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        req.send_response(200)
        req.send_header("ETag", etag)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def table(req: BaseHTTPRequestHandler) -> None:
        state["table_requests"] += 1
        state["version"] = 1 - state["version"]
        config = (A2, B2)[state["version"]]
        body(req, json.dumps(config[0]).encode(), f'"t{state["version"]}"')

    def phrases(req: BaseHTTPRequestHandler) -> None:
        config = (A2, B2)[state["version"]]
        body(req, config[1].encode(), f'"p{state["version"]}"')

    server.handle(MAPPINGS, table)
    server.handle(MWE, phrases)
    return state


def test_refresh_swaps_whole_configs_under_concurrent_requests(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    state = flipping(http_server)
    store = loaded(settings_for(http_server, tmp_path / "c", emoji_refresh_seconds=0.03))
    assert store.map(RED_FOX) == A2_RESULT
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                result = store.map(RED_FOX)
            except BaseException as exc:  # any exception in a reader is a failure
                failures.append(exc)
                return
            seen.append(
                "A" if result == A2_RESULT else "B" if result == B2_RESULT else repr(result)
            )
            time.sleep(0.0005)  # like request threads: busy, but not hogging the GIL

    readers = [threading.Thread(target=reader) for _ in range(4)]
    store.start_refresh()
    for thread in readers:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in readers:
        thread.join(timeout=5)
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 1.0
    assert not failures
    assert set(seen) == {"A", "B"}, set(seen) - {"A", "B"}
    assert state["table_requests"] >= 4  # it really refreshed, several times
    # Once closed, the thread is gone and no more requests are made.
    assert "emoji-config-refresh" not in {t.name for t in threading.enumerate()}
    count = state["table_requests"]
    time.sleep(0.2)
    assert state["table_requests"] == count


def test_refresh_with_nothing_new_keeps_the_same_mapper(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    http_server.handle(MAPPINGS, conditional(A_BYTES, '"a1"', None))
    http_server.handle(MWE, conditional(A_MWE.encode(), '"m1"', None))
    store = loaded(settings_for(http_server, tmp_path / "c"))
    mapper = store.mapper
    assert store.refresh() is False
    assert store.mapper is mapper
    assert store.health()["error"] is None


@pytest.mark.parametrize(
    "changes",
    [{"emoji_refresh_seconds": 0.0}, {"auto_update": False, "emoji_refresh_seconds": 0.01}],
)
def test_start_refresh_is_a_no_op_when_off(
    http_server: LocalHTTPServer, primed: Path, changes: dict
) -> None:
    store = loaded(settings_for(http_server, primed, **changes))
    before = len(http_server.seen)
    store.start_refresh()
    time.sleep(0.15)
    assert len(http_server.seen) == before
    store.close()


def test_map_before_load_is_a_clear_error(tmp_path: Path) -> None:
    store = EmojiConfigStore(Settings().with_overrides(emoji_cache_dir=tmp_path))
    assert store.health()["source"] is None
    with pytest.raises(RuntimeError, match="load"):
        store.map("a dog")
