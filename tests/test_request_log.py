"""Request ids and the access log against a real waitress server (tiny-shapes model): the id is
echoed on every response, carried by every log line of its request (and only its request), one
access line per request with its fields; plain and JSON lines; LOG_FORMAT through `REST.py`."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from log_format import bind_request_id, make_handler, unbind_request_id
from rest_helpers import assert_success, two_red_circles
from settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
HEX_ID = re.compile(r"[0-9a-f]{32}")

LogLines = Callable[[], list[str]]


@pytest.fixture
def capture_logs() -> Iterator[Callable[[str], LogLines]]:
    """Factory: the service's real handler (plain or json) on the root logger at INFO, writing
    into a buffer; returns a function giving the lines written so far."""
    root = logging.getLogger()
    added: list[logging.Handler] = []
    level = root.level

    def attach(log_format: str) -> LogLines:
        buffer = io.StringIO()
        handler = make_handler(log_format, buffer)
        root.addHandler(handler)
        added.append(handler)
        root.setLevel(logging.INFO)
        return lambda: buffer.getvalue().splitlines()

    yield attach
    for handler in added:
        root.removeHandler(handler)
    root.setLevel(level)


def records(lines: LogLines) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines()]


def access_of(lines: LogLines, request_id: str) -> dict[str, Any]:
    found = [
        r for r in records(lines) if r["logger"] == "blip2.access" and r["request_id"] == request_id
    ]
    assert len(found) == 1, found
    return found[0]


def post_png(base: str, data: bytes, **kw: Any) -> requests.Response:
    headers = {"Content-Type": "image/png", **kw.pop("headers", {})}
    return requests.post(base + "/v3/analyze", data=data, headers=headers, timeout=60, **kw)


@pytest.fixture
def server(serve_app, base_settings):
    return serve_app(base_settings)


# ----------------------------------------------------------------------------- ids on responses


def test_request_id_is_echoed_on_every_response(server) -> None:
    sent = {"X-Request-ID": "client-trace-42"}
    ok = post_png(server.url, two_red_circles(), headers=sent)
    assert_success(ok)
    answers = [
        ok,
        requests.get(server.url + "/health", headers=sent, timeout=5),
        requests.get(server.url + "/metrics", headers=sent, timeout=5),
        requests.get(server.url + "/no/such/page", headers=sent, timeout=5),  # 404
        requests.delete(server.url + "/health", headers=sent, timeout=5),  # 405
        requests.get(server.url + "/v3/analyze", headers=sent, timeout=5),  # 400: no image
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 404, 405, 400]
    assert all(r.headers["X-Request-ID"] == "client-trace-42" for r in answers)


@pytest.mark.parametrize(
    "sent,kept",
    [
        (None, False),
        ("x" * 128, True),
        ("x" * 129, False),  # too long
        ("two words", False),  # spaces could forge fields of a plain log line
        ("caf\xe9", False),  # not ASCII
        ("tab\there", False),
        ("0af7651916cd43dd8448eb211c80319c", True),
        ("abc-DEF_123.~:/=+", True),
    ],
)
def test_request_id_is_kept_only_when_valid(server, sent: str | None, kept: bool) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    answered = requests.get(server.url + "/health", headers=headers, timeout=5)
    echoed = answered.headers["X-Request-ID"]
    if kept:
        assert echoed == sent
    else:
        assert HEX_ID.fullmatch(echoed), echoed


def test_each_request_gets_its_own_id(server) -> None:
    ids = {
        requests.get(server.url + "/health", timeout=5).headers["X-Request-ID"] for _ in range(5)
    }
    assert len(ids) == 5 and all(HEX_ID.fullmatch(i) for i in ids)


# ----------------------------------------------------------------------------- ids on log lines


def test_every_line_of_a_request_carries_its_id(
    serve_app, base_settings, tmp_path: Path, capture_logs
) -> None:
    """file= outside FILE_ROOTS is logged by image_input.file_read inside the request; eight
    such requests at once on eight threads: each line carries its own request's id only."""
    server = serve_app(base_settings.with_overrides(file_roots=(tmp_path,)))
    lines = capture_logs("json")
    ids = [f"parallel-{n}" for n in range(8)]

    def refused(request_id: str) -> requests.Response:
        return requests.get(
            server.url + "/analyze",
            params={"file": "/etc/hostname"},
            headers={"X-Request-ID": request_id},
            timeout=10,
        )

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(refused, ids))
    assert [r.status_code for r in answers] == [403] * 8
    logged = records(lines)
    for request_id in ids:
        mine = [r for r in logged if r["request_id"] == request_id]
        assert [r["logger"] for r in mine] == ["image_input.file_read", "blip2.access"], mine
        assert mine[0]["message"] == "file= outside FILE_ROOTS refused"
        assert mine[1]["status"] == 403

    # The binding is per thread and undone at the end: outside a request a line has no id.
    probe = logging.getLogger("blip2.test")
    token = bind_request_id("bound-here")
    probe.warning("inside")
    unbind_request_id(token)
    probe.warning("outside")
    assert [r["request_id"] for r in records(lines)[-2:]] == ["bound-here", None]


# ----------------------------------------------------------------------------- the access line


def test_access_line_fields(server, capture_logs) -> None:
    lines = capture_logs("json")
    data = two_red_circles()
    miss = post_png(server.url, data, headers={"X-Request-ID": "first"})
    hit = post_png(server.url, data, headers={"X-Request-ID": "second"})
    health = requests.get(
        server.url + "/health",
        params={"token": "hunter2"},  # query strings may carry secrets: never logged
        headers={"X-Request-ID": "third"},
        timeout=5,
    )
    first, second, third = (access_of(lines, i) for i in ("first", "second", "third"))
    for line, resp in ((first, miss), (second, hit), (third, health)):
        assert line["level"] == "INFO"
        assert line["bytes"] == len(resp.content)
        assert line["status"] == resp.status_code == 200
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
        assert line["time"].endswith("+00:00")
    assert (first["method"], first["path"], first["cached"]) == ("POST", "/v3/analyze", False)
    assert (second["method"], second["path"], second["cached"]) == ("POST", "/v3/analyze", True)
    assert (third["method"], third["path"], third["cached"]) == ("GET", "/health", None)
    assert first["duration_ms"] > second["duration_ms"]  # the model ran only for the first
    assert "hunter2" not in "\n".join(lines())
    for line, tail in ((first, "false"), (second, "true"), (third, "-")):
        said = f"{line['method']} {line['path']} 200 {line['duration_ms']}ms {line['bytes']}B"
        assert line["message"] == f"{said} cached={tail}"


def test_plain_lines_one_per_record(server, capture_logs) -> None:
    lines = capture_logs("plain")
    requests.get(server.url + "/health", headers={"X-Request-ID": "plain-1"}, timeout=5)
    odd = requests.get(server.url + "/odd%0Aline%20%E2%9C%93", timeout=5)  # newline in the path
    assert odd.status_code == 404
    out = lines()
    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO blip2\.access \[plain-1\]: "
        r"GET /health 200 [\d.]+ms \d+B cached=-"
    )
    assert any(re.fullmatch(pattern, line) for line in out), out
    odd_lines = [line for line in out if "odd" in line]
    assert len(odd_lines) == 1, out  # the newline did not split the line
    odd_id = odd.headers["X-Request-ID"]
    odd_pattern = rf".* \[{odd_id}\]: GET /odd%0Aline%20%E2%9C%93 404 [\d.]+ms \d+B cached=-"
    assert re.fullmatch(odd_pattern, odd_lines[0]), odd_lines


# ----------------------------------------------------------------------------- LOG_FORMAT


def test_log_format_setting() -> None:
    assert Settings.from_mapping({}).log_format == "plain"
    assert Settings.from_mapping({"LOG_FORMAT": " JSON "}).log_format == "json"
    with pytest.raises(SettingsError, match="LOG_FORMAT"):
        Settings.from_mapping({"LOG_FORMAT": "xml"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_with_log_format_json_writes_only_json_lines(tmp_path: Path) -> None:
    """`LOG_FORMAT=json python REST.py`: start-up, model load, requests and shutdown all come out
    as JSON objects, one per line; the access line has the client's request id."""
    port = _free_port()
    log_path = tmp_path / "service.log"
    env = {
        **os.environ,
        "AUTO_UPDATE": "false",
        "MODEL_CONFIG": "models/tiny-shapes/model.yaml",
        "PRIVATE": "true",
        "EMOJI_CACHE_DIR": str(tmp_path / "emoji"),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "REST.py", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_healthy(base, proc)
            resp = post_png(base, two_red_circles(), headers={"X-Request-ID": "cli-json-1"})
            assert_success(resp)
            assert resp.headers["X-Request-ID"] == "cli-json-1"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    text = log_path.read_text()
    entries = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    assert len(entries) >= 4, text
    for entry in entries:
        assert {"time", "level", "logger", "message", "request_id"} <= set(entry), entry
    access = [
        e for e in entries if e["logger"] == "blip2.access" and e["request_id"] == "cli-json-1"
    ]
    assert len(access) == 1, text
    assert access[0]["path"] == "/v3/analyze" and access[0]["status"] == 200
    assert access[0]["cached"] is False
    assert any(e["logger"] == "blip2" and "listening" in e["message"] for e in entries), text


def _wait_healthy(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the service exited during start-up"
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    pytest.fail("service did not become healthy")


def test_cli_rejects_an_unknown_log_format() -> None:
    env = {**os.environ, "LOG_FORMAT": "xml"}
    done = subprocess.run(
        [sys.executable, "REST.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "LOG_FORMAT must be plain or json" in done.stderr
