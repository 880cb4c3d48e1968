"""Shared by the image_input tests (tests/test_image_input*.py): images encoded by Pillow, the
check of an ImageInputError's status and message, and url= fetching with the tests' defaults."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

import pytest
from PIL import Image

from image_input import ImageInputError, fetch_url

MP = 40_000_000
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_bytes(colour: tuple[int, int, int] = RED, size: tuple[int, int] = (16, 16)) -> bytes:
    return encode(Image.new("RGB", size, colour), "PNG")


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def expect_error(status: int, message: str) -> Callable[[Callable[[], object]], None]:
    def check(call: Callable[[], object]) -> None:
        with pytest.raises(ImageInputError) as info:
            call()
        assert (info.value.status, info.value.message) == (status, message)

    return check


def fetch(url: str, *, timeout: float = 2.0, max_bytes: int = 1 << 20, private: bool = True):
    return fetch_url(url, max_bytes=max_bytes, timeout=timeout, allow_private=private)


def download_error(detail: str) -> Callable[[Callable[[], object]], None]:
    return expect_error(400, f"Failed to download image: {detail}")


def trickle_body(req: BaseHTTPRequestHandler) -> None:
    req.send_response(200)
    req.send_header("Content-Length", "500000")  # under the cap: only the deadline can stop it
    req.end_headers()
    end = time.monotonic() + 6
    while time.monotonic() < end:  # one byte at a time: every single read is "fast"
        req.wfile.write(b"x")
        time.sleep(0.02)
