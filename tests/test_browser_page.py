"""The browser page at `GET /` (issue 8, item 3), driven in real headless Chromium.

Debian's `/usr/bin/chromium` is driven by Playwright for Python; nothing is downloaded. The page
talks to a real waitress server around the tiny-shapes model, with the emoji config served by a
real local HTTP server. Missing Chromium fails the test (it is part of `make test`; `.ci/run`
installs it).

`PAGE_SCREENSHOT=docs/images/page.png pytest tests/test_browser_page.py` refreshes the README's
screenshot; without it the screenshot goes to the test's temporary directory.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests

from chromium_browser import WAIT_MS, chromium_context
from rest_helpers import encode as encode_image
from rest_helpers import shapes_image, two_red_circles

CIRCLES = "Two red circles on a gray background"
SQUARE = "One blue square on a white background"
EMOJI = {"circles": "⭕", "red": "🔴", "gray": "🩶", "square": "🟦", "blue": "🔵"}

# Everything about each result card the test looks at, newest card first (as the page shows).
READ_CARDS_JS = """() => [...document.querySelectorAll('#results > li')].map(card => ({
  state: card.dataset.state,
  source: card.querySelector('.source').textContent,
  request: card.querySelector('.request').textContent,
  captions: [...card.querySelectorAll('.caption')].map(c => c.firstChild.textContent),
  chips: [...card.querySelectorAll('.chip')].map(c => c.textContent),
  badge: (card.querySelector('.badge.cached, .badge.fresh') || {}).textContent || null,
  meta: card.querySelector('.meta').textContent,
  error: card.querySelector('.error').hidden ? null : card.querySelector('.error').textContent,
  previewShown: !card.querySelector('.preview img').hidden,
}))"""

CARDS_SETTLED_JS = """n => {
  const cards = document.querySelectorAll('#results > li');
  return cards.length === n && [...cards].every(c => c.dataset.state !== 'pending');
}"""

DROP_FILE_JS = """([b64, name, type]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type}));
  const zone = document.getElementById('file-form');
  const init = {dataTransfer: dt, bubbles: true, cancelable: true};
  zone.dispatchEvent(new DragEvent('dragover', init));
  zone.dispatchEvent(new DragEvent('drop', init));
}"""

UNLABELLED_CONTROLS_JS = """() => [...document.querySelectorAll('input, button, select, textarea')]
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map(el => el.id || el.outerHTML)"""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium_context(tmp_path_factory.mktemp("chromium-profile"), 1024, 900) as context:
        yield context


@pytest.fixture
def page_server(serve_app, base_settings, http_server):
    """The app around the tiny model, with an emoji config that maps the shapes' words."""
    http_server.set("/emoji.json", json.dumps(EMOJI))
    http_server.set("/mwe.txt", "gray_background\nwhite_background\n")
    settings = base_settings.with_overrides(
        auto_update=True,
        emoji_mappings_url=http_server.url("/emoji.json"),
        mwe_url=http_server.url("/mwe.txt"),
    )
    server = serve_app(settings)
    return server


# ----------------------------------------------------------------------------- helpers


def png(count: int, colour: str, shape: str, background: str) -> bytes:
    return encode_image(shapes_image(count, colour, shape, background), "PNG")


def upload(page: Any, *files: tuple[str, str, bytes]) -> None:
    payloads = [{"name": n, "mimeType": t, "buffer": b} for n, t, b in files]
    page.set_input_files("#files", payloads, timeout=WAIT_MS)


def settled_cards(page: Any, count: int) -> list[dict[str, Any]]:
    """Wait until the page shows `count` finished cards; return them oldest first."""
    page.wait_for_function(CARDS_SETTLED_JS, arg=count, timeout=WAIT_MS)
    return list(reversed(page.evaluate(READ_CARDS_JS)))


class _Inputs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "input" and found.get("id"):
            self.inputs[str(found["id"])] = found


# ----------------------------------------------------------------------------- tests


def test_page_and_assets_are_served_uncached_and_self_contained(page_server) -> None:
    base = page_server.url
    page = requests.get(base + "/", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "no-cache" in page.headers["Cache-Control"]
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.text
    # Relative URLs only (works behind a proxy under a prefix) and nothing from elsewhere.
    assert not re.search(r'(src|href|action)="(/|https?:|//)', html), "absolute URL in page"
    assert 'src="page/static/app.js"' in html and 'href="page/static/style.css"' in html
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        asset = requests.get(f"{base}/page/static/{name}", timeout=10)
        assert asset.status_code == 200 and kind in asset.headers["Content-Type"]
        assert "no-cache" in asset.headers["Cache-Control"] and asset.headers.get("ETag")
        again = requests.get(
            f"{base}/page/static/{name}",
            headers={"If-None-Match": asset.headers["ETag"]},
            timeout=10,
        )
        assert again.status_code == 304
        assert not re.search(r"(@import|url\(|fetch\(|src=)\s*['\"]?(https?:)?//", asset.text)
    missing = requests.get(base + "/page/static/nope.js", timeout=10)
    assert missing.status_code == 404


def test_option_limits_on_the_page_are_the_services(page_server) -> None:
    """The page's input ranges are exactly what /v3/analyze accepts, at both ends."""
    parser = _Inputs()
    parser.feed(requests.get(page_server.url + "/", timeout=10).text)
    fields = parser.inputs
    image = {"file": ("shapes.png", two_red_circles(), "image/png")}

    def status(**params: Any) -> requests.Response:
        return requests.post(
            page_server.url + "/v3/analyze", params=params, files=image, timeout=30
        )

    def bound(name: str, attr: str) -> float:
        return float(str(fields[name][attr]))

    def num(value: float) -> str:
        return f"{value:g}"

    lows = {n: num(bound(n, "min")) for n in ("num_beams", "num_captions", "max_length")}
    lows |= {n: num(bound(n, "min")) for n in ("min_length", "repetition_penalty", "top_p")}
    assert status(**lows, sampling="true").status_code == 200
    highs = {n: num(bound(n, "max")) for n in ("num_beams", "num_captions", "max_length")}
    highs |= {"repetition_penalty": num(bound("repetition_penalty", "max")), "min_length": "0"}
    assert status(**highs).status_code == 200
    assert status(top_p=num(bound("top_p", "max")), sampling="true").status_code == 200
    for name in ("num_beams", "num_captions", "max_length", "repetition_penalty", "top_p"):
        step = bound(name, "step")
        for value in (bound(name, "min") - step, bound(name, "max") + step):
            resp = status(**{name: num(value)})
            assert resp.status_code == 400, (name, value)
            assert resp.json()["error"]["message"].startswith(name), resp.text
    resp = status(min_length="-1")
    assert resp.status_code == 400 and "min_length" in resp.json()["error"]["message"]
    limit = int(str(fields["prompt"]["maxlength"]))
    resp = status(prompt="a" * (limit + 1))
    assert resp.status_code == 400 and "prompt" in resp.json()["error"]["message"]
    assert status(prompt="a" * limit, max_length="75").status_code == 200


def test_page_captions_in_chromium(browser, page_server, http_server, tmp_path: Path) -> None:
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on(
        "console",
        lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    page.goto(page_server.url + "/", timeout=WAIT_MS)
    page.wait_for_selector("html[data-ready=true]", timeout=WAIT_MS)
    page.wait_for_function(
        "() => document.getElementById('model-status').dataset.state === 'ready'", timeout=WAIT_MS
    )
    assert page.inner_text("#model-status") == "Model loaded · tiny-shapes (blip_caption, fp32)"
    assert page.evaluate(UNLABELLED_CONTROLS_JS) == []

    # Two images picked at once: each gets its own card, captioned one after the other.
    circles = two_red_circles()
    upload(
        page,
        ("two-red-circles.png", "image/png", circles),
        ("blue-square.png", "image/png", png(1, "blue", "square", "white")),
    )
    first, second = settled_cards(page, 2)
    assert first["source"] == "two-red-circles.png" and first["state"] == "done", first
    assert first["captions"] == [CIRCLES]
    assert first["chips"] == ["🔴red", "⭕circles"]
    assert first["badge"] == "computed" and first["previewShown"]
    assert re.match(r"\d+\.\d{3} s on the server, \d+\.\d{3} s round trip", first["meta"])
    assert first["request"] == "POST v3/analyze"
    assert (second["captions"], second["chips"]) == ([SQUARE], ["🔵blue", "🟦square"])

    # A URL, typed and submitted with the keyboard: the same bytes come from the result cache.
    http_server.set("/circles.png", circles, headers={"Content-Type": "image/png"})
    image_url = http_server.url("/circles.png")
    page.focus("#url")
    page.keyboard.type(image_url)
    page.keyboard.press("Enter")
    by_url = settled_cards(page, 3)[-1]
    assert by_url["request"].startswith("GET v3/analyze?url=http")
    assert (by_url["captions"], by_url["badge"]) == ([CIRCLES], "from cache")

    # A dropped image.
    square_b64 = base64.b64encode(png(1, "blue", "square", "white")).decode()
    page.evaluate(DROP_FILE_JS, [square_b64, "dropped.png", "image/png"])
    dropped = settled_cards(page, 4)[-1]
    assert (dropped["source"], dropped["captions"]) == ("dropped.png", [SQUARE])

    # The options panel changes the request: two captions from three beams.
    page.click("#options summary")
    page.fill("#num_captions", "2")
    with page.expect_request(lambda r: "v3/analyze" in r.url, timeout=WAIT_MS) as sent:
        upload(page, ("two-red-circles.png", "image/png", circles))
    assert "num_captions=2" in sent.value.url and "num_beams" not in sent.value.url
    two = settled_cards(page, 5)[-1]
    assert two["state"] == "done" and len(two["captions"]) == 2, two
    assert two["captions"][0] == CIRCLES and two["captions"][1] != CIRCLES
    shot = Path(os.environ.get("PAGE_SCREENSHOT") or tmp_path / "page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True, timeout=WAIT_MS)
    assert shot.stat().st_size > 10_000

    # Readable errors: the service's message for a bad option and for a text file.
    page.fill("#num_captions", "5")
    upload(page, ("two-red-circles.png", "image/png", circles))
    bad_option = settled_cards(page, 6)[-1]
    assert bad_option["state"] == "error"
    assert bad_option["error"] == (
        "Error 400: num_captions must be at most num_beams (3) without sampling"
    )
    page.click("#options-form button[type=reset]")
    page.click("#options summary")
    upload(page, ("notes.txt", "text/plain", b"not an image\n"))
    text_file = settled_cards(page, 7)[-1]
    assert text_file["state"] == "error" and not text_file["previewShown"]
    assert text_file["error"] == "Error 400: File type not allowed"

    # Narrow screens: nothing wider than the viewport.
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    assert problems == []
    page.close()
