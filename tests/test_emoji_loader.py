"""Loading the emoji config: a real local HTTP server plays GitHub, real files are the cache.

Each test states one failure the loader must survive (outage, timeout, bad download, crash while
writing the cache) and checks both what is served and what is left on disk.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import ROOT

from emoji_config import EmojiConfigStore, EmojiMapper
from emoji_config.cache import remove_stale_temporaries, write_atomic
from local_http import LocalHTTPServer
from settings import Settings

MAPPINGS = "/config/emoji_mappings.json"
MWE = "/config/mwe.txt"

# Config "A": what the fake GitHub serves first.
A_TABLE = {"dog": "🐶", "fire_engine": "🚒", "young_boy": "", "boy": "👦", "toothbrush": "🪥"}
A_MWE = "fire_engine\nyoung_boy\n"
A_BYTES = json.dumps(A_TABLE, ensure_ascii=False).encode()
CAPTION = "a young boy and two dogs near a fire engine"
A_RESULT = [{"emoji": "🐶", "word": "dogs"}, {"emoji": "🚒", "word": "fire_engine"}]


@pytest.fixture(autouse=True, scope="module")
def _nltk_imported() -> None:
    """Import NLTK once up front so timing assertions measure the loader, not the import."""
    EmojiMapper({}, [])


def settings_for(server: LocalHTTPServer, cache: Path, **changes: object) -> Settings:
    base = Settings().with_overrides(
        auto_update=True,
        timeout=3.0,
        emoji_mappings_url=server.url(MAPPINGS),
        mwe_url=server.url(MWE),
        emoji_cache_dir=cache,
        emoji_refresh_seconds=0.0,
    )
    return base.with_overrides(**changes)


def loaded(settings: Settings) -> EmojiConfigStore:
    store = EmojiConfigStore(settings)
    store.load()
    return store


def serve_a(server: LocalHTTPServer) -> None:
    server.set(MAPPINGS, A_BYTES, headers={"ETag": '"a1"', "Content-Type": "application/json"})
    server.set(MWE, A_MWE, headers={"Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT"})


@pytest.fixture
def primed(http_server: LocalHTTPServer, tmp_path: Path) -> Path:
    """A cache directory holding config A, written by a successful start-up."""
    cache = tmp_path / "cache"
    serve_a(http_server)
    loaded(settings_for(http_server, cache))
    assert (cache / "emoji_mappings.json").read_bytes() == A_BYTES
    return cache


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
