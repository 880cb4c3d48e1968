"""POST /v3/batch end to end: real waitress, real HTTP client, the tiny-shapes model.

Several images per request (multipart parts, JSON urls/files, a zip uploaded or fetched), one
result per input in order, per-item errors that never fail the others, the request's bounds, and
zip archives refused whole when they are unsafe.
"""

from __future__ import annotations

import io
import random
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests

from rest_helpers import encode
from tiny_shapes import draw, random_scene

TIMEOUT = 60


def images(n: int, seed: int = 11) -> list[bytes]:
    """`n` different tiny-shapes scenes as PNG bytes."""
    rng = random.Random(seed)
    return [encode(draw(random_scene(rng), rng, size=128), "PNG") for _ in range(n)]


def post_files(base: str, parts: list[tuple[str, bytes]], **params: Any) -> requests.Response:
    files = [("file", (name, data, "image/png")) for name, data in parts]
    return requests.post(base + "/v3/batch", files=files, params=params, timeout=TIMEOUT)


def analyze(base: str, data: bytes, **params: Any) -> str:
    return analyze_predictions(base, data, **params)[0]["text"]


def analyze_predictions(base: str, data: bytes, **params: Any) -> list[dict[str, Any]]:
    resp = requests.post(
        base + "/v3/analyze",
        files={"file": ("x.png", data, "image/png")},
        params=params,
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200, resp.text
    return unshiny(resp.json()["predictions"])


def unshiny(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predictions without the 1-in-2,500 `shiny` easter egg."""
    return [{k: v for k, v in p.items() if k != "shiny"} for p in predictions]


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buf.getvalue()


def error_message(resp: requests.Response) -> str:
    body = resp.json()
    assert body["status"] == "error" and body["predictions"] == []
    return body["error"]["message"]


@pytest.fixture
def settings(base_settings, tmp_path: Path):
    return base_settings.with_overrides(cache_size=0, jobs_dir=tmp_path / "jobs")


def test_sixteen_images_in_order_as_one_or_two_model_batches(serve_app, settings) -> None:
    server = serve_app(settings)
    data = images(16)
    batcher = server.runtime.model.batcher
    before = (batcher.batches_run, batcher.items_run)
    resp = post_files(server.url, [(f"img{i:02d}.png", d) for i, d in enumerate(data)])
    assert resp.status_code == 200, resp.text
    batches = batcher.batches_run - before[0]
    assert batcher.items_run - before[1] == 16
    assert batches <= 2, f"16 images ran as {batches} model batches"
    body = resp.json()
    assert body["status"] == "success" and body["service"] == "blip2"
    assert body["metadata"]["counts"] == {"total": 16, "success": 16, "error": 0}
    results = body["results"]
    assert [r["index"] for r in results] == list(range(16))
    assert [r["source"] for r in results] == [f"img{i:02d}.png" for i in range(16)]
    assert all(r["status"] == "success" for r in results)
    # Exactly the captions each image gets alone (cache off: the model runs each time).
    singles = [analyze_predictions(server.url, d) for d in data]
    assert [unshiny(r["predictions"]) for r in results] == singles
    assert len({p[0]["text"] for p in singles}) > 4  # different scenes, different captions


def test_three_broken_among_thirteen_good(serve_app, settings) -> None:
    server = serve_app(settings)
    good = images(13, seed=5)
    truncated = good[0][: len(good[0]) // 2]
    parts = [(f"good{i}.png", d) for i, d in enumerate(good)]
    broken = {
        2: ("garbage.png", b"this is not an image at all"),
        7: ("truncated.png", truncated),
        15: ("notes.txt", b"hello"),
    }
    for index in sorted(broken):
        parts.insert(index, broken[index])
    resp = post_files(server.url, parts, tags="true")
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 16
    assert resp.json()["metadata"]["counts"] == {"total": 16, "success": 13, "error": 3}
    for result in results:
        if result["index"] in broken:
            assert result["status"] == "error" and "predictions" not in result
            assert result["source"] == broken[result["index"]][0]
        else:
            assert result["status"] == "success" and result["predictions"][0]["text"]
            assert result["predictions"][0]["tags"]  # tags=true reaches every item
    messages = {r["index"]: r["error"] for r in results if r["status"] == "error"}
    assert messages[2] == "Invalid image: not a supported image format"
    assert messages[7].startswith("Invalid image")
    assert messages[15] == "File type not allowed"


def test_json_urls_and_files_in_order(serve_app, settings, http_server, tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    data = images(4, seed=3)
    (root / "a.png").write_bytes(data[2])
    (root / "b.png").write_bytes(data[3])
    http_server.set("/0.png", data[0], headers={"Content-Type": "image/png"})
    http_server.set("/1.png", data[1], headers={"Content-Type": "image/png"})
    server = serve_app(settings.with_overrides(file_roots=(root.resolve(),)))
    urls = [http_server.url("/0.png"), http_server.url("/missing.png"), http_server.url("/1.png")]
    files = [str(root / "a.png"), "/etc/passwd", str(root / "b.png")]
    resp = requests.post(
        server.url + "/v3/batch",
        json={"urls": urls, "files": files, "num_beams": 2},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["source"] for r in results] == urls + files
    assert [r["status"] for r in results] == ["success", "error", "success"] * 2
    assert results[1]["error"] == "Failed to download image: HTTP 404"
    assert results[4]["error"].startswith("Access denied")
    alone = [analyze(server.url, d, num_beams=2) for d in data]
    texts = [r["predictions"][0]["text"] for r in results if r["status"] == "success"]
    assert texts == alone


def test_zip_upload_and_zip_url(serve_app, settings, http_server) -> None:
    server = serve_app(settings)
    data = images(3, seed=9)
    archive = make_zip(
        [("photos/", b""), ("photos/a.png", data[0]), ("readme.txt", b"not an image")]
        + [("b.png", data[1]), ("__MACOSX/._b.png", b"junk"), ("c.png", data[2])]
    )
    uploaded = requests.post(
        server.url + "/v3/batch",
        files={"file": ("shots.zip", archive, "application/zip")},
        timeout=TIMEOUT,
    )
    raw = requests.post(
        server.url + "/v3/batch",
        data=archive,
        headers={"Content-Type": "application/zip"},
        timeout=TIMEOUT,
    )
    http_server.set("/shots.zip", archive, headers={"Content-Type": "application/zip"})
    fetched = requests.post(
        server.url + "/v3/batch", params={"url": http_server.url("/shots.zip")}, timeout=TIMEOUT
    )
    alone = [analyze(server.url, d) for d in data]
    for resp, name in ((uploaded, "shots.zip"), (raw, "archive.zip"), (fetched, None)):
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        prefix = name or http_server.url("/shots.zip")
        assert [r["source"] for r in results] == [
            f"{prefix}: photos/a.png",
            f"{prefix}: readme.txt",
            f"{prefix}: b.png",
            f"{prefix}: c.png",
        ]
        assert results[1]["status"] == "error"
        assert results[1]["error"] == "not an image (JPEG, PNG, GIF, BMP, WEBP or TIFF)"
        texts = [r["predictions"][0]["text"] for r in results if r["status"] == "success"]
        assert texts == alone


def _symlink() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("entries", "status", "fragment"),
    [
        ([("../evil.png", b"x")], 400, "path traversal"),
        ([("a/../../evil.png", b"x")], 400, "path traversal"),
        ([("/etc/evil.png", b"x")], 400, "absolute paths"),
        ([(_symlink(), b"/etc/passwd")], 400, "symbolic links"),
        ([("inner.zip", b"PK\x05\x06" + b"\0" * 18)], 400, "archives inside archives"),
        ([("inner.png", make_zip([("a.png", b"x")]))], 400, "archives inside archives"),
        ([("bomb.bmp", b"\0" * (4 << 20))], 413, "compression bomb"),
        ([(f"{i}.png", b"x") for i in range(200)], 413, "entries"),
        ([(f"{i}.png", b"x") for i in range(40)], 413, "at most 32"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "nested-zip-name",
         "nested-zip-content", "ratio-bomb", "entry-bomb", "too-many-files"],
)  # fmt: skip
def test_unsafe_zips_are_refused_whole(
    serve_app, settings, entries: list[Any], status: int, fragment: str
) -> None:
    server = serve_app(settings)
    batcher = server.runtime.model.batcher
    before = batcher.items_run
    good = images(1)[0]
    resp = requests.post(
        server.url + "/v3/batch",
        files={"file": ("a.zip", make_zip([("ok.png", good), *entries]), "application/zip")},
        timeout=TIMEOUT,
    )
    assert resp.status_code == status, resp.text
    message = error_message(resp)
    assert message.startswith("zip archive refused") or "too many images" in message
    assert fragment in message
    assert batcher.items_run == before  # nothing was captioned, not even the good entry


def test_bounds_and_bad_requests(serve_app, settings) -> None:
    server = serve_app(settings.with_overrides(max_batch_items=4, max_batch_bytes=200_000))
    one = images(1)[0]
    too_many = post_files(server.url, [(f"{i}.png", one) for i in range(5)])
    assert too_many.status_code == 413
    assert error_message(too_many) == "too many images: at most 4 per request, got 5"
    urls = requests.post(server.url + "/v3/batch", json={"urls": ["http://x/a.png"] * 5}, timeout=9)
    assert urls.status_code == 413
    big = post_files(server.url, [("big.png", b"\x89PNG" + b"\0" * 1_300_000)])
    assert big.status_code == 413
    assert error_message(big) == "the request is larger than 200000 bytes (MAX_BATCH_BYTES)"
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "no images"),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "JSON body"),
        ({"json": ["a"]}, "JSON body must be an object"),
        (  # deeper than the JSON decoder's recursion: a 400, not a 500
            {
                "data": b"[" * 100_000 + b"]" * 100_000,
                "headers": {"Content-Type": "application/json"},
            },
            "JSON body must be an object",
        ),
        ({"files": {"file": ("e.zip", make_zip([]), "application/zip")}}, "it has no files"),
        ({"json": {"urls": "http://x/a.png"}}, "`urls` must be a list"),
        ({"json": {"files": [1, 2]}}, "`files` must be a list"),
        ({"json": {"urls": ["http://x/a.png"], "num_beams": "3"}}, "num_beams must be"),
        ({"json": {"urls": ["http://x/a.png"], "tags": "yes"}}, "tags must be true or false"),
        ({"json": {"urls": ["http://x/a.png"], "prompt": {"a": 1}}}, "prompt must be text of"),
        ({"json": {"urls": ["http://x/a.png"]}, "params": {"num_beams": "99"}}, "num_beams"),
        ({"data": b"text", "headers": {"Content-Type": "text/plain"}}, "send multipart"),
    ]
    for kwargs, fragment in cases:
        resp = requests.post(server.url + "/v3/batch", timeout=TIMEOUT, **kwargs)
        assert resp.status_code == 400, (kwargs, resp.text)
        assert fragment in error_message(resp), (kwargs, resp.text)
    mixed = requests.post(
        server.url + "/v3/batch",
        files={"file": ("a.zip", make_zip([("a.png", one)]), "application/zip")},
        params={"url": "http://127.0.0.1:9/a.zip"},
        timeout=TIMEOUT,
    )
    assert mixed.status_code == 400
    assert error_message(mixed) == "a zip archive must be the only input of a request"
    beside = requests.post(  # a zip among other uploads is refused, not one "bad" item
        server.url + "/v3/batch",
        files=[
            ("file", ("a.zip", make_zip([("a.png", one)]), "application/zip")),
            ("file", ("b.png", one, "image/png")),
        ],
        timeout=TIMEOUT,
    )
    assert beside.status_code == 400
    assert error_message(beside) == "a zip archive must be the only input of a request"
    assert requests.get(server.url + "/v3/batch", timeout=TIMEOUT).status_code == 405
