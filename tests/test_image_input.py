"""image_input: decoding real images and reading real files.

Images are encoded by Pillow here in every format and mode the service accepts (and some bombs it
must refuse before decoding); files are real files, FIFOs, devices and symlinks in a temporary
directory, with and without FILE_ROOTS. Fetching url= is in test_image_input_url.py (plain HTTP,
the address policy) and test_image_input_https.py (certificates).
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from image_input import (
    FILE_ERROR,
    URL_ERROR,
    ImageInputError,
    allowed_filename,
    decode_image,
    read_file,
)
from image_input_helpers import BLUE, MP, RED, WHITE, close_to, encode, expect_error, png_bytes

# ------------------------------------------------------------------------------------------
# decode_image


@pytest.mark.parametrize(
    ("fmt", "tol"),
    [("JPEG", 6), ("PNG", 0), ("BMP", 0), ("WEBP", 6), ("TIFF", 0), ("GIF", 0)],
)
def test_decodes_each_format_to_rgb(fmt: str, tol: int) -> None:
    colour = (200, 40, 30) if fmt != "GIF" else RED
    data = encode(Image.new("RGB", (24, 12), colour), fmt)
    img = decode_image(data, max_pixels=MP)
    assert img.mode == "RGB"
    assert img.size == (24, 12)
    assert close_to(img.getpixel((5, 5)), colour, tol)


def test_format_is_decided_by_bytes_not_by_any_name() -> None:
    # The orchestrator labels everything image/jpeg "image.jpg"; PNG/WEBP bytes must still work.
    for fmt in ("PNG", "WEBP"):
        assert decode_image(encode(Image.new("RGB", (4, 4), BLUE), fmt), max_pixels=MP).size == (
            4,
            4,
        )


def test_animated_gif_uses_frame_zero() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    img = decode_image(data, max_pixels=MP)
    assert img.getpixel((8, 8)) == RED


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=MP)
    assert img.size == (20, 40)
    assert close_to(img.getpixel((10, 5)), RED)  # the left edge is now the top
    assert close_to(img.getpixel((10, 35)), BLUE)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data, max_pixels=MP)
    assert img.mode == "RGB" and close_to(img.getpixel((8, 8)), RED)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    data = encode(Image.new("I;16", (8, 8), 40000), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    img = decode_image(data, max_pixels=MP)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (156, 156, 156)  # 40000/257, not 255


def test_rgba_png_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    img = decode_image(encode(rgba, "PNG"), max_pixels=MP)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE  # fully transparent black -> white, not black
    assert img.getpixel((1, 0)) == RED
    assert close_to(img.getpixel((2, 0)), (127, 127, 127), 1)


def test_palette_png_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] + list(BLUE) + [0] * (254 * 3))
    pal.putpixel((1, 1), 1)
    data = encode(pal, "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    img = decode_image(data, max_pixels=MP)
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((1, 1)) == BLUE


def test_gif_with_transparent_index() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] + list(RED) + [0] * (254 * 3))
    pal.putpixel((2, 2), 1)
    img = decode_image(encode(pal, "GIF", transparency=0), max_pixels=MP)
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((2, 2)) == RED


@pytest.mark.parametrize(
    ("mode", "value", "fmt", "expected"),
    [
        ("L", 77, "PNG", (77, 77, 77)),
        ("LA", (77, 0), "PNG", WHITE),
        ("LA", (77, 255), "PNG", (77, 77, 77)),
        ("1", 1, "PNG", WHITE),
        ("1", 0, "BMP", (0, 0, 0)),
        ("I", 65535, "TIFF", WHITE),
        ("F", 0.5, "TIFF", (127, 127, 127)),
    ],
)
def test_greyscale_modes(
    mode: str, value: object, fmt: str, expected: tuple[int, int, int]
) -> None:
    data = encode(Image.new(mode, (4, 4), value), fmt)  # type: ignore[arg-type]
    img = decode_image(data, max_pixels=MP)
    assert img.mode == "RGB" and close_to(img.getpixel((1, 1)), expected, 1)


def test_truncated_jpeg_is_400() -> None:
    noisy = Image.effect_noise((64, 64), 80).convert("RGB")
    data = encode(noisy, "JPEG")
    expect_error(400, "Invalid image: truncated or corrupt image data")(
        lambda: decode_image(data[: len(data) // 2], max_pixels=MP)
    )


def test_zero_bytes_is_400() -> None:
    expect_error(400, "Invalid image: empty image data")(lambda: decode_image(b"", max_pixels=MP))


def test_text_is_not_an_image_whatever_the_prefix() -> None:
    text = b"this is not a jpeg, whatever the filename says\n" * 10
    expect_error(400, "Invalid image: not a supported image format")(
        lambda: decode_image(text, max_pixels=MP)
    )
    expect_error(400, "Failed to load image: not a supported image format")(
        lambda: decode_image(text, max_pixels=MP, error_prefix=FILE_ERROR)
    )
    expect_error(400, "Failed to download image: not a supported image format")(
        lambda: decode_image(text, max_pixels=MP, error_prefix=URL_ERROR)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A tiny but well-formed PNG that declares a huge canvas (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding() -> None:
    data = png_header_only(8000, 6000)  # 48 MP: over our 40 MP, under Pillow's own fence
    assert len(data) < 200
    started = time.monotonic()
    expect_error(400, "Image too large: 8000\u00d76000 pixels exceeds the limit of 40000000")(
        lambda: decode_image(data, max_pixels=MP)
    )
    assert time.monotonic() - started < 0.5  # no 144 MB allocation, no inflating


def test_huge_declared_canvas_refused() -> None:
    with pytest.raises(ImageInputError) as info:
        decode_image(png_header_only(20000, 20000), max_pixels=MP)
    assert info.value.status == 400 and info.value.message.startswith("Image too large: ")


def test_pixel_limit_is_the_one_passed_in() -> None:
    data = png_bytes(size=(100, 50))
    expect_error(400, "Image too large: 100\u00d750 pixels exceeds the limit of 4999")(
        lambda: decode_image(data, max_pixels=4999)
    )
    assert decode_image(data, max_pixels=5000).size == (100, 50)


def test_allowed_filename() -> None:
    assert allowed_filename("image.jpg") and allowed_filename("a.b.JPEG")
    assert allowed_filename("x.webp") and allowed_filename(".png")
    assert not allowed_filename("image") and not allowed_filename("image.jpg.exe")
    assert not allowed_filename("photo.tiff")


# ------------------------------------------------------------------------------------------
# file=


def read(path: str | Path, *, max_bytes: int = 1 << 20, roots=None) -> bytes:
    return read_file(str(path), max_bytes=max_bytes, roots=roots)


def test_file_regular(tmp_path: Path) -> None:
    data = png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    assert read(tmp_path / "a.png") == data


def test_file_missing(tmp_path: Path) -> None:
    sent = str(tmp_path / "nope" / ".." / "missing.jpg")
    expect_error(400, f"File not found: {sent}")(lambda: read(sent))


def test_file_directory_refused(tmp_path: Path) -> None:
    expect_error(400, "Failed to load image: not a regular file")(lambda: read(tmp_path))


def test_file_device_refused() -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    expect_error(400, "Failed to load image: not a regular file")(lambda: read("/dev/zero"))


def test_file_fifo_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: result.append(_catch(lambda: read(fifo))))
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock it before failing, so the test run itself cannot hang
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO hung")
    assert isinstance(result[0], ImageInputError)
    assert result[0].message == "Failed to load image: not a regular file"


def _catch(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - handed back to the test
        return exc
    return AssertionError("no error")


def test_file_over_cap_is_413(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(b"\0" * 2001)
    expect_error(413, "Image too large: limit is 2000 bytes")(
        lambda: read(tmp_path / "big.png", max_bytes=2000)
    )
    assert len(read(tmp_path / "big.png", max_bytes=2001)) == 2001


def test_file_empty_reads_and_then_fails_to_decode(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = read(tmp_path / "empty.jpg")
    expect_error(400, "Failed to load image: empty image data")(
        lambda: decode_image(data, max_pixels=MP, error_prefix=FILE_ERROR)
    )


@pytest.fixture
def rooted(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root with an image inside, and a secret outside it."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes(BLUE))
    return root, tmp_path / "secret.png"


def test_file_roots_allow_inside(rooted: tuple[Path, Path]) -> None:
    root, _ = rooted
    assert read(root / "cat.png", roots=(root,)) == png_bytes()
    assert read(f"{root}/sub/../cat.png", roots=(root,)) == png_bytes()
    expect_error(400, f"File not found: {root}/dog.png")(
        lambda: read(f"{root}/dog.png", roots=(root,))
    )


def test_file_roots_refuse_dotdot_escape(rooted: tuple[Path, Path]) -> None:
    root, _ = rooted
    sent = f"{root}/../secret.png"
    expect_error(403, f"Access denied: {sent}")(lambda: read(sent, roots=(root,)))
    # Outside the roots, existence is not revealed either.
    sent = f"{root}/../does-not-exist.png"
    expect_error(403, f"Access denied: {sent}")(lambda: read(sent, roots=(root,)))


def test_file_roots_refuse_symlink_pointing_outside(rooted: tuple[Path, Path]) -> None:
    root, secret = rooted
    (root / "link.png").symlink_to(secret)
    sent = str(root / "link.png")
    expect_error(403, f"Access denied: {sent}")(lambda: read(sent, roots=(root,)))
    # Without roots the reference behaviour applies: any readable path.
    assert read(sent) == png_bytes(BLUE)


def test_file_roots_allow_symlink_inside(rooted: tuple[Path, Path]) -> None:
    root, _ = rooted
    (root / "alias.png").symlink_to(root / "cat.png")
    assert read(root / "alias.png", roots=(root,)) == png_bytes()


def test_file_roots_through_symlinked_root(rooted: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = rooted
    via = tmp_path / "via"
    via.symlink_to(root, target_is_directory=True)
    assert read(via / "cat.png", roots=(root,)) == png_bytes()
