"""Loading the emoji config: a real local HTTP server plays GitHub, real files are the cache.

Each test states one failure the loader must survive at start-up (outage, timeout, a server
dripping bytes, a bad or oversized download) and checks both what is served and what is left on
disk. Conditional requests, crashes while writing the cache and refreshing while serving are in
test_emoji_loader_refresh.py.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import ROOT

from emoji_config import EmojiConfigStore
from emoji_loader_helpers import (
    A_BYTES,
    A_MWE,
    A_RESULT,
    A_TABLE,
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


def closed_port_url(path: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


# ----- fresh fetch ------------------------------------------------------------------------------


def test_fresh_fetch_serves_remote_and_fills_the_cache(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    serve_a(http_server)
    cache = tmp_path / "cache"
    store = loaded(settings_for(http_server, cache))
    assert store.map(CAPTION) == A_RESULT
    health = store.health()
    assert health["source"] == "remote"
    assert (health["mappings"], health["mwes"]) == (len(A_TABLE), 2)
    assert health["error"] is None
    assert 0 <= health["age_seconds"] < 60
    json.dumps(health)  # the HTTP layer serialises it as is
    assert (cache / "emoji_mappings.json").read_bytes() == A_BYTES
    assert (cache / "mwe.txt").read_text() == A_MWE
    meta = json.loads((cache / "emoji_mappings.json.meta.json").read_text())
    assert meta["etag"] == '"a1"' and meta["url"] == http_server.url(MAPPINGS)
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []


# ----- outage ----------------------------------------------------------------------------------


def test_outage_serves_the_cache(http_server: LocalHTTPServer, primed: Path) -> None:
    http_server.set(MAPPINGS, "upstream down", status=503)
    http_server.set(MWE, "upstream down", status=500)
    store = loaded(settings_for(http_server, primed))
    assert store.map(CAPTION) == A_RESULT
    health = store.health()
    assert health["source"] == "cache"
    assert "HTTP 503" in health["error"] and "HTTP 500" in health["error"]
    assert (primed / "emoji_mappings.json").read_bytes() == A_BYTES


def test_no_network_and_empty_cache_starts_on_the_bundled_default(tmp_path: Path) -> None:
    settings = Settings().with_overrides(
        auto_update=True,
        timeout=2.0,
        emoji_mappings_url=closed_port_url(MAPPINGS),
        mwe_url=closed_port_url(MWE),
        emoji_cache_dir=tmp_path / "empty",
    )
    store = loaded(settings)
    health = store.health()
    assert health["source"] == "bundled"
    assert health["mappings"] > 1000 and health["mwes"] > 1000
    assert health["age_seconds"] is None and health["fetched_at"] is None
    assert "ConnectionError" in health["error"]
    words = {m["word"]: m["emoji"] for m in store.map("two dogs playing with a frisbee")}
    assert words["frisbee"] == "🥏" and "dogs" in words


def test_auto_update_off_never_touches_the_network(
    http_server: LocalHTTPServer, primed: Path
) -> None:
    before = len(http_server.seen)
    store = loaded(settings_for(http_server, primed, auto_update=False))
    assert len(http_server.seen) == before
    assert store.health()["source"] == "cache"
    assert store.map(CAPTION) == A_RESULT


def test_offline_cli_starts_on_the_bundled_default(tmp_path: Path) -> None:
    """The service's own config path, from the outside: no network, no cache."""
    env = {
        **os.environ,
        "EMOJI_CACHE_DIR": str(tmp_path / "none"),
        "EMOJI_MAPPINGS_URL": closed_port_url(MAPPINGS),
        "MWE_URL": closed_port_url(MWE),
        "AUTO_UPDATE": "true",
        "TIMEOUT": "2",
    }
    done = subprocess.run(
        [sys.executable, "-m", "emoji_config"],
        input=b"a surfer riding waves\n",
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=True,
    )
    words = {m["word"]: m["emoji"] for m in json.loads(done.stdout)}
    assert words == {"surfer": "🏄", "waves": "🌊"}


# ----- time bounds ------------------------------------------------------------------------------


def test_a_hanging_server_does_not_hold_up_start_up(
    http_server: LocalHTTPServer, primed: Path
) -> None:
    http_server.set(MAPPINGS, A_BYTES, delay=5.0)
    http_server.set(MWE, A_MWE, delay=5.0)
    started = time.monotonic()
    store = loaded(settings_for(http_server, primed, timeout=0.5))
    assert time.monotonic() - started < 1.5
    assert store.health()["source"] == "cache"
    assert store.map(CAPTION) == A_RESULT


def test_the_local_copy_serves_while_the_download_is_under_way(
    http_server: LocalHTTPServer, primed: Path
) -> None:
    newer = {**A_TABLE, "dog": "🐕"}
    http_server.set(MAPPINGS, json.dumps(newer), delay=1.0)
    store = EmojiConfigStore(settings_for(http_server, primed, timeout=5.0))
    loading = threading.Thread(target=store.load)
    loading.start()
    deadline = time.monotonic() + 0.8
    while store.health()["source"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.health()["source"] == "cache"
    assert store.map(CAPTION) == A_RESULT
    loading.join(timeout=10)
    assert store.health()["source"] == "remote"
    assert store.map(CAPTION)[0] == {"emoji": "🐕", "word": "dogs"}


def test_a_server_dripping_bytes_is_cut_off_at_the_deadline(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    def drip(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Length", str(len(A_BYTES)))
        req.end_headers()
        for byte in A_BYTES:
            req.wfile.write(bytes([byte]))
            req.wfile.flush()
            time.sleep(0.05)

    http_server.handle(MAPPINGS, drip)
    http_server.set(MWE, A_MWE)
    started = time.monotonic()
    store = loaded(settings_for(http_server, tmp_path / "c", timeout=0.6))
    assert time.monotonic() - started < 1.6
    assert store.health()["source"] == "bundled"  # mappings never arrived, no cache
    deadline = time.monotonic() + 2
    while store.health()["error"] is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "timed out" in store.health()["error"]
    assert not (tmp_path / "c" / "emoji_mappings.json").exists()


def test_gzip_and_chunked_downloads(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    """GitHub answers with gzip; proxies may answer chunked. Both must arrive intact."""

    def chunked(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        for line in A_MWE.encode().splitlines(keepends=True):
            req.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        req.wfile.write(b"0\r\n\r\n")

    http_server.set(MAPPINGS, gzip.compress(A_BYTES), headers={"Content-Encoding": "gzip"})
    http_server.handle(MWE, chunked)
    cache = tmp_path / "cache"
    store = loaded(settings_for(http_server, cache))
    assert store.health()["source"] == "remote"
    assert store.map(CAPTION) == A_RESULT
    assert (cache / "emoji_mappings.json").read_bytes() == A_BYTES  # stored decoded
    assert (cache / "mwe.txt").read_text() == A_MWE


# ----- bad downloads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"dog": "\xf0\x9f\x90', "not UTF-8"),
        (b'{"dog": "x",', "invalid JSON"),
        (b'["dog"]', "expected a JSON object"),
        (b"{}", "no entries"),
        (b'{"dog": 1}', "not a string"),
        (b'{"dog": null}', "not a string"),
        (b"<html><body>Rate limited</body></html>", "invalid JSON"),
    ],
)
def test_a_malformed_table_keeps_the_cached_one(
    http_server: LocalHTTPServer, primed: Path, body: bytes, reason: str
) -> None:
    http_server.set(MAPPINGS, body, headers={"ETag": '"bad"'})
    store = loaded(settings_for(http_server, primed))
    assert store.map(CAPTION) == A_RESULT
    health = store.health()
    assert reason in health["error"]
    assert health["files"]["emoji_mappings.json"]["source"] == "cache"
    assert health["files"]["mwe.txt"]["source"] == "remote"
    assert (primed / "emoji_mappings.json").read_bytes() == A_BYTES
    assert json.loads((primed / "emoji_mappings.json.meta.json").read_text())["etag"] == '"a1"'


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty file"),
        (b"\n \n\t\n", "empty file"),
        (b"<!DOCTYPE html>\n<html>\n", "contains '<'"),
        (b"fire_engine\n\x00\x00\x00\n", "contains '\\x00'"),
        (b"x" * 300 + b"\n", "longer than"),
    ],
)
def test_a_bad_phrase_list_keeps_the_cached_one(
    http_server: LocalHTTPServer, primed: Path, body: bytes, reason: str
) -> None:
    http_server.set(MWE, body)
    store = loaded(settings_for(http_server, primed))
    assert store.map(CAPTION) == A_RESULT  # "young boy" is still swallowed, fire_engine merged
    assert reason in store.health()["error"]
    assert (primed / "mwe.txt").read_text() == A_MWE


def test_an_empty_phrase_list_without_cache_falls_back_to_the_bundled_pair(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    serve_a(http_server)
    http_server.set(MWE, b"")
    cache = tmp_path / "cache"
    store = loaded(settings_for(http_server, cache))
    assert store.health()["source"] == "bundled"
    # The good table was still cached: once a phrase list arrives, both are used.
    assert (cache / "emoji_mappings.json").read_bytes() == A_BYTES
    assert not (cache / "mwe.txt").exists()
    serve_a(http_server)
    assert store.refresh() is True
    assert store.health()["source"] == "remote"
    assert store.map(CAPTION) == A_RESULT


def test_oversized_downloads_are_refused(http_server: LocalHTTPServer, primed: Path) -> None:
    def huge_declared(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Length", str(10**9))
        req.end_headers()

    def huge_undeclared(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Connection", "close")
        req.end_headers()
        chunk = b"fire_engine\n" * 100_000
        for _ in range(20):  # 24 MB, over the 16 MiB limit for mwe.txt
            req.wfile.write(chunk)
        req.close_connection = True

    http_server.handle(MAPPINGS, huge_declared)
    http_server.handle(MWE, huge_undeclared)
    store = loaded(settings_for(http_server, primed))
    error = store.health()["error"]
    assert "Content-Length 1000000000 exceeds" in error and "body exceeds" in error
    assert store.map(CAPTION) == A_RESULT


def test_a_truncated_download_is_refused(http_server: LocalHTTPServer, primed: Path) -> None:
    def truncated(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Length", str(len(A_BYTES) + 50))
        req.send_header("Connection", "close")
        req.end_headers()
        req.wfile.write(A_BYTES[:-5])
        req.close_connection = True

    http_server.handle(MAPPINGS, truncated)
    store = loaded(settings_for(http_server, primed))
    assert store.health()["files"]["emoji_mappings.json"]["source"] == "cache"
    assert store.health()["error"]
    assert (primed / "emoji_mappings.json").read_bytes() == A_BYTES
