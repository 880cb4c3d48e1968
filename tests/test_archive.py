"""bulk.archive: real malicious zips are refused quickly, in little memory; good entries come out.

Every archive here is a real zip: built by `zipfile`, by the `zip` command, or byte by byte with
`struct` and `zlib` the way an attacker would (a deflate bomb, headers that lie about sizes, an end
record that lies about the entry count). Memory is measured with tracemalloc around the call.
"""

from __future__ import annotations

import io
import shutil
import stat
import struct
import subprocess
import time
import tracemalloc
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bulk.archive import ArchiveError, ArchiveLimits, ArchiveTooLarge, SafeZip, read_zip

LIMITS = ArchiveLimits()
MiB = 1 << 20


def image_bytes(fmt: str = "PNG", colour: str = "red", size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def make_zip(
    entries: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names; we want them
        with zipfile.ZipFile(buf, "w", compression=method) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


@dataclass
class Raw:
    """One entry for `raw_zip`: already-compressed bytes and whatever headers we choose."""

    name: str
    payload: bytes
    method: int
    crc: int
    file_size: int
    flags: int = 0
    external_attr: int = 0


def raw_zip(entries: list[Raw]) -> bytes:
    """A zip written byte by byte (local headers, central directory, end record)."""
    out = io.BytesIO()
    central = io.BytesIO()
    for e in entries:
        offset, name = out.tell(), e.name.encode()
        # version 2.0, flags, method, time, date, CRC, sizes and name length: in both headers
        common = (20, 0, e.flags, e.method, 0, 0x21, e.crc, len(e.payload), e.file_size, len(name))
        out.write(struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", *common, 0) + name + e.payload)
        # made by Unix (3); extra, comment, disk, internal attributes; external attributes
        pack = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, *common, 0, 0, 0, 0,
                           e.external_attr, offset)  # fmt: skip
        central.write(pack + name)
    start, directory = out.tell(), central.getvalue()
    count = len(entries)
    out.write(directory)
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), start, 0))
    return out.getvalue()


def deflate_zeros(total: int, head: bytes = b"") -> tuple[bytes, int]:
    """A raw deflate stream of `head` + zeros up to `total` bytes, and its CRC (streamed)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\0" * MiB
    parts, crc = [compressor.compress(head)], zlib.crc32(head)
    left = total - len(head)
    while left > 0:
        piece = chunk[: min(left, MiB)]
        parts.append(compressor.compress(piece))
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    parts.append(compressor.flush())
    return b"".join(parts), crc


def measured(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """(result or raised exception, seconds, peak bytes allocated during the call)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result: Any = fn()
    except ArchiveError as exc:
        result = exc
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, elapsed, peak


def refused(data: bytes, limits: ArchiveLimits = LIMITS) -> ArchiveError:
    with pytest.raises(ArchiveError) as caught:
        read_zip(data, limits)
    return caught.value


# -- good archives ----------------------------------------------------------------------------


def test_images_come_out_in_archive_order_and_non_images_are_item_errors() -> None:
    png, jpeg, gif = image_bytes("PNG"), image_bytes("JPEG", "blue"), image_bytes("GIF", "green")
    webp, bmp, tiff = image_bytes("WEBP"), image_bytes("BMP"), image_bytes("TIFF")
    data = make_zip(
        [
            ("photos/", b""),
            ("photos/b.png", png),
            ("notes.txt", b"hello, not an image"),
            ("photos/a.jpg", jpeg),
            ("__MACOSX/photos/._b.png", b"\x00\x05\x16\x07 apple double"),
            ("photos/.DS_Store", b"Bud1 finder data"),
            ("c.gif", gif),
            ("d.webp", webp),
            ("e.bmp", bmp),
            ("f.tif", tiff),
            ("fake.png", b"<html>not really a png</html>"),
            ("empty.png", b""),
        ]
    )
    items = read_zip(data, LIMITS)
    assert [i.name for i in items] == [
        "photos/b.png", "notes.txt", "photos/a.jpg", "c.gif", "d.webp", "e.bmp", "f.tif",
        "fake.png", "empty.png",
    ]  # fmt: skip
    assert [i.index for i in items] == list(range(9))
    by_name = {i.name: i for i in items}
    for name, raw in [
        ("photos/b.png", png), ("photos/a.jpg", jpeg), ("c.gif", gif), ("d.webp", webp),
        ("e.bmp", bmp), ("f.tif", tiff),
    ]:  # fmt: skip
        assert by_name[name].ok and by_name[name].data == raw
    assert by_name["notes.txt"].error is not None and "not an image" in by_name["notes.txt"].error
    assert by_name["fake.png"].error is not None and "not an image" in by_name["fake.png"].error
    assert by_name["empty.png"].error == "empty file"
    for bad in ("notes.txt", "fake.png", "empty.png"):
        assert by_name[bad].data is None


def test_an_image_with_a_misleading_name_is_judged_by_its_content() -> None:
    png = image_bytes()
    items = read_zip(make_zip([("scan.dat", png)]), LIMITS)
    assert items[0].ok and items[0].data == png


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_every_stdlib_compression_method_reads(method: int) -> None:
    png = image_bytes()
    assert read_zip(make_zip([("a.png", png)], method), LIMITS)[0].data == png


def test_path_and_open_file_sources(tmp_path: Path) -> None:
    png = image_bytes()
    path = tmp_path / "in.zip"
    path.write_bytes(make_zip([("a.png", png)]))
    assert read_zip(path, LIMITS)[0].data == png
    assert read_zip(str(path), LIMITS)[0].data == png
    with path.open("rb") as handle:
        assert read_zip(handle, LIMITS)[0].data == png
        assert not handle.closed  # a caller's file stays the caller's to close


def test_safezip_streams_one_entry_at_a_time() -> None:
    pngs = [image_bytes(colour=c) for c in ("red", "green", "blue")]
    with SafeZip(make_zip([(f"{i}.png", p) for i, p in enumerate(pngs)]), LIMITS) as archive:
        assert len(archive) == 3 and archive.names == ["0.png", "1.png", "2.png"]
        stream = archive.items()
        assert next(stream).data == pngs[0]
        assert [item.data for item in stream] == pngs[1:]


def test_one_corrupt_entry_does_not_fail_the_others() -> None:
    png = image_bytes()
    data = bytearray(make_zip([("a.png", png), ("b.png", png), ("c.png", png)], zipfile.ZIP_STORED))
    second = data.find(png, data.find(png) + 1)
    data[second + len(png) // 2] ^= 0xFF  # a byte inside b.png: its CRC no longer matches
    items = read_zip(bytes(data), LIMITS)
    assert [i.ok for i in items] == [True, False, True]
    assert items[1].error == "corrupt or unreadable entry"


def test_an_entry_over_the_per_entry_limit_is_an_item_error() -> None:
    small, big = image_bytes(size=8), image_bytes("BMP", size=200)  # BMP: 120 kB, uncompressed
    data = make_zip([("big.bmp", big), ("small.png", small)])
    items = read_zip(data, ArchiveLimits(max_entry_bytes=50_000))
    assert items[0].error == "larger than 50000 bytes" and items[0].data is None
    assert items[1].data == small


def test_an_unreadable_compression_method_is_an_item_error() -> None:
    png = image_bytes()
    crc = zlib.crc32(png)
    data = raw_zip([Raw("d64.png", png, 9, crc, len(png)), Raw("ok.png", png, 0, crc, len(png))])
    items = read_zip(data, LIMITS)  # 9 is Deflate64, which zipfile cannot read
    assert items[0].error == "unsupported compression method" and items[1].data == png


def test_a_small_very_compressible_image_is_not_taken_for_a_bomb() -> None:
    bmp = image_bytes("BMP", "white", size=400)  # 480 kB of one colour: deflates ~500 times
    data = make_zip([("white.bmp", bmp)])
    assert len(bmp) / len(data) > 100
    assert read_zip(data, LIMITS)[0].data == bmp


# -- whole-archive refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../evil.png", "traversal"),
        ("photos/../../evil.png", "traversal"),
        ("/etc/evil.png", "absolute"),
        ("C:/Windows/evil.png", "absolute"),
        ("c:evil.png", "absolute"),
        ("photos\\..\\evil.png", "backslash"),
        ("evil\x01.png", "control"),
        ("x" * 1100 + ".png", "longer"),
    ],
)
def test_unsafe_names_refuse_the_whole_archive(name: str, words: str) -> None:
    data = make_zip([("good.png", image_bytes()), (zipfile.ZipInfo(name), image_bytes())])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist()[1] == name  # the archive really carries the hostile name
    error = refused(data)
    assert type(error) is ArchiveError and words in error.message
    assert "Traceback" not in error.message and "zipfile" not in error.message


def test_a_symlink_entry_refuses_the_archive() -> None:
    link = zipfile.ZipInfo("cat.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    error = refused(make_zip([("dog.png", image_bytes()), (link, b"/etc/passwd")]))
    assert "symbolic link" in error.message and "cat.png" in error.message


def test_a_symlink_made_by_the_zip_command_is_refused(tmp_path: Path) -> None:
    if shutil.which("zip") is None:
        pytest.fail("the zip command is not installed (make test installs it)")
    (tmp_path / "real.png").write_bytes(image_bytes())
    (tmp_path / "link.png").symlink_to("/etc/passwd")
    subprocess.run(
        ["zip", "-q", "--symlinks", "out.zip", "real.png", "link.png"], cwd=tmp_path, check=True
    )
    assert "symbolic link" in refused((tmp_path / "out.zip").read_bytes()).message


@pytest.mark.parametrize("inner_name", ["inner.zip", "photos.tar.gz", "more.7z", "x.RAR"])
def test_nested_archives_by_name_are_refused(inner_name: str) -> None:
    error = refused(make_zip([("a.png", image_bytes()), (inner_name, b"whatever")]))
    assert "archives inside archives" in error.message


def tar_bytes() -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a.png")
        png = image_bytes()
        info.size = len(png)
        tar.addfile(info, io.BytesIO(png))
    return buf.getvalue()


@pytest.mark.parametrize(
    "inner",
    [
        pytest.param(lambda: make_zip([("a.png", image_bytes())]), id="zip"),
        pytest.param(lambda: make_zip([]), id="empty-zip"),
        pytest.param(lambda: __import__("gzip").compress(image_bytes()), id="gzip"),
        pytest.param(lambda: __import__("bz2").compress(image_bytes()), id="bzip2"),
        pytest.param(lambda: __import__("lzma").compress(image_bytes()), id="xz"),
        pytest.param(tar_bytes, id="tar"),
        pytest.param(lambda: b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(40), id="7z"),
        pytest.param(lambda: b"Rar!\x1a\x07\x01\x00" + bytes(40), id="rar"),
    ],
)
def test_nested_archives_disguised_as_images_are_refused_by_content(
    inner: Callable[[], bytes],
) -> None:
    error = refused(make_zip([("a.png", image_bytes()), ("holiday.jpg", inner())]))
    assert "archives inside archives" in error.message and "holiday.jpg" in error.message


def test_nested_archive_is_refused_before_any_entry_is_read_out() -> None:
    data = make_zip([("a.png", image_bytes()), ("z.png", make_zip([("b.png", image_bytes())]))])
    with pytest.raises(ArchiveError):
        SafeZip(data, LIMITS)  # refused at construction: no item was ever yielded


def test_encrypted_entries_refuse_the_archive() -> None:
    png = image_bytes()
    crc = zlib.crc32(png)
    data = raw_zip([Raw("a.png", png, 0, crc, len(png)), Raw("b.png", png, 0, crc, len(png), 1)])
    assert "encrypted" in refused(data).message


def test_a_password_protected_zip_made_by_the_zip_command_is_refused(tmp_path: Path) -> None:
    if shutil.which("zip") is None:
        pytest.fail("the zip command is not installed (make test installs it)")
    (tmp_path / "a.png").write_bytes(image_bytes())
    subprocess.run(["zip", "-q", "-P", "secret", "out.zip", "a.png"], cwd=tmp_path, check=True)
    assert "encrypted" in refused((tmp_path / "out.zip").read_bytes()).message


@pytest.mark.parametrize(("first", "second"), [("a.png", "a.png"), ("x/a.png", "x/./a.png")])
def test_duplicate_names_refuse_the_archive(first: str, second: str) -> None:
    error = refused(make_zip([(first, image_bytes()), (zipfile.ZipInfo(second), image_bytes())]))
    assert "twice" in error.message


@pytest.mark.parametrize(
    "data",
    [b"", b"not a zip at all", b"PK\x03\x04" + bytes(100), make_zip([("a.png", b"x" * 100)])[:-30]],
    ids=["empty", "text", "local-header-only", "truncated"],
)
def test_garbage_is_not_a_zip(data: bytes) -> None:
    error = refused(data)
    assert type(error) is ArchiveError and "zip archive" in error.message


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    assert "could not be opened" in refused(tmp_path / "missing.zip").message  # type: ignore[arg-type]


# -- bombs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb_stream() -> tuple[bytes, int]:
    """256 MiB behind a PNG signature, deflated by zlib to about 260 kB."""
    return deflate_zeros(256 * MiB, head=b"\x89PNG\r\n\x1a\n")


def test_a_deflate_bomb_is_refused_quickly_without_inflating(bomb_stream) -> None:
    payload, crc = bomb_stream
    data = raw_zip(
        [
            Raw("ok.png", image_bytes(), 0, zlib.crc32(image_bytes()), len(image_bytes())),
            Raw("bomb.png", payload, 8, crc, 256 * MiB),
        ]
    )
    assert len(data) < 300_000
    result, seconds, peak = measured(lambda: read_zip(data, LIMITS))
    assert isinstance(result, ArchiveTooLarge)
    assert "compression bomb" in result.message and "bomb.png" in result.message
    assert seconds < 1.0 and peak < 2 * MiB


def test_a_bomb_whose_header_lies_about_its_size_is_cut_at_the_claimed_size(bomb_stream) -> None:
    payload, _ = bomb_stream
    claimed = 4000  # small enough to pass every declared-size check
    head = zlib.decompressobj(-15).decompress(payload, claimed)
    data = raw_zip([Raw("liar.png", payload, 8, zlib.crc32(head), claimed)])
    result, seconds, peak = measured(lambda: read_zip(data, LIMITS))
    assert not isinstance(result, ArchiveError)
    assert result[0].data == head  # never one byte beyond the claim
    assert seconds < 1.0 and peak < 2 * MiB


def test_a_bomb_under_a_lying_header_with_a_wrong_crc_is_an_item_error(bomb_stream) -> None:
    payload, crc = bomb_stream
    data = raw_zip([Raw("liar.png", payload, 8, crc, 30 * MiB)])  # claims 30 MiB, ratio ~120
    result, seconds, peak = measured(lambda: read_zip(data, ArchiveLimits(max_ratio=200)))
    assert not isinstance(result, ArchiveError)
    assert result[0].error == "corrupt or unreadable entry"  # the CRC of the 30 MiB is wrong
    assert seconds < 2.0 and peak < 48 * MiB  # at most the claimed 30 MiB held, never 256 MiB


def test_total_uncompressed_size_is_bounded_before_reading() -> None:
    bmp = image_bytes("BMP", size=120)  # 43 kB each
    data = make_zip([(f"{i}.bmp", bmp) for i in range(5)], zipfile.ZIP_STORED)
    result, _, _ = measured(lambda: read_zip(data, ArchiveLimits(max_total_bytes=150_000)))
    assert isinstance(result, ArchiveTooLarge) and "150000 bytes" in result.message
    assert len(read_zip(data, ArchiveLimits(max_total_bytes=250_000))) == 5


def ten_thousand_entries(content: bytes) -> bytes:
    return make_zip([(f"{i:05}.png", content) for i in range(10_000)], zipfile.ZIP_STORED)


@pytest.fixture(scope="module")
def many_tiny_texts() -> bytes:
    return ten_thousand_entries(b"x")


def test_too_many_entries_are_refused_from_the_end_record(many_tiny_texts: bytes) -> None:
    result, seconds, peak = measured(
        lambda: read_zip(many_tiny_texts, ArchiveLimits(max_entries=1000))
    )
    assert isinstance(result, ArchiveTooLarge)
    assert result.message == "the archive has 10000 entries; at most 1000"
    assert seconds < 0.5 and peak < 256 * 1024  # the 10,000 entries were never parsed


def test_an_end_record_that_understates_the_entry_count_is_caught(many_tiny_texts: bytes) -> None:
    data = bytearray(many_tiny_texts)
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<2H", data, end + 8, 5, 5)  # "5 entries" over a 10,000-entry directory
    lying = bytes(data)
    with zipfile.ZipFile(io.BytesIO(lying)) as zf:
        assert len(zf.infolist()) == 10_000  # zipfile itself would parse them all
    result, seconds, peak = measured(lambda: read_zip(lying, ArchiveLimits(max_entries=100)))
    assert isinstance(result, ArchiveTooLarge)
    assert seconds < 0.5 and peak < 256 * 1024


def test_ten_thousand_tiny_entries_within_limits_become_item_errors_quickly(
    many_tiny_texts: bytes,
) -> None:
    result, seconds, peak = measured(lambda: read_zip(many_tiny_texts, LIMITS))
    assert len(result) == 10_000 and not any(item.ok for item in result)
    assert seconds < 10 and peak < 64 * MiB


def test_ten_thousand_tiny_images_all_come_out() -> None:
    png = image_bytes(size=1)
    result, seconds, _ = measured(lambda: read_zip(ten_thousand_entries(png), LIMITS))
    assert len(result) == 10_000 and all(item.data == png for item in result)
    assert [item.index for item in result] == list(range(10_000))
    assert seconds < 15
