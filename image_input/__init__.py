"""Caller input (raw bytes, a URL or a server-side path) turned into bytes and an RGB image, safely.

Rooms: sources.py (what the caller sent), url_fetch.py + vetted_socket.py + address_policy.py
(SSRF-safe `url=`), file_read.py (`file=`), decode.py (bytes → RGB). Every failure is an
`ImageInputError` (captioning/errors.py) whose message goes to the client unchanged, so messages
never carry more than the caller sent plus a short fixed reason.
"""

from captioning.errors import AccessDenied, ImageInputError, TooLarge, too_large
from image_input.address_policy import is_address_allowed
from image_input.decode import BODY_ERROR, FILE_ERROR, URL_ERROR, decode_image
from image_input.file_read import read_file
from image_input.sources import ImageReader, ImageSource, allowed_filename
from image_input.url_fetch import UrlFetcher, fetch_url
from image_input.vetted_socket import resolve_allowed

__all__ = [
    "BODY_ERROR",
    "FILE_ERROR",
    "URL_ERROR",
    "AccessDenied",
    "ImageInputError",
    "ImageReader",
    "ImageSource",
    "TooLarge",
    "UrlFetcher",
    "allowed_filename",
    "decode_image",
    "fetch_url",
    "is_address_allowed",
    "read_file",
    "resolve_allowed",
    "too_large",
]
