"""How large a request body may be, per route, decided before the body is read.

Why: waitress reads a whole request body (into a temporary file above 512 KiB) before any WSGI
code runs, and its own cap (`max_request_body_size`) must admit the largest body any route
takes: a job's uploads, MAX_JOB_BYTES (1 GiB by default). A 300 MB upload to `/analyze`, whose
limit is MAX_FILE_SIZE, was spooled to disk whole and only then answered 413. The door
(http_api/door.py) asks :meth:`BodyLimits.refusal` when the headers are complete (the
Content-Length) and again as a chunked body grows, and answers the view's own 413 at once.

The limits are the views' own: every route reads at most MAX_FILE_SIZE (Flask's
MAX_CONTENT_LENGTH), except the bulk uploads (`POST /v3/batch`, `POST /v3/jobs`), which take
their MAX_BATCH_BYTES / MAX_JOB_BYTES plus room for the multipart framing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from captioning.errors import LimitExceeded, ServiceError, too_large

if TYPE_CHECKING:
    from settings import Settings

FORM_OVERHEAD = 1 << 20  # multipart boundaries and headers on top of the images' bytes


def request_too_large(max_bytes: int, setting: str) -> LimitExceeded:
    """The 413 of a bulk request over its byte limit (view and door alike)."""
    return LimitExceeded(f"the request is larger than {max_bytes} bytes ({setting})")


@dataclass(frozen=True)
class BodyLimits:
    """The largest body of each route, in bytes."""

    default: int  # MAX_FILE_SIZE: an image, and the cap of every other route
    bulk: dict[str, tuple[int, str]] = field(default_factory=dict)  # POST path → (bytes, name)

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(
            default=settings.max_file_size,
            bulk={
                "/v3/batch": (settings.max_batch_bytes, "MAX_BATCH_BYTES"),
                "/v3/jobs": (settings.max_job_bytes, "MAX_JOB_BYTES"),
            },
        )

    def refusal(self, method: str, path: str, length: int) -> ServiceError | None:
        """The 413 for a body of `length` bytes to `method path`, or None when it may come."""
        if method == "POST" and path in self.bulk:
            max_bytes, setting = self.bulk[path]
            if length > max_bytes + FORM_OVERHEAD:
                return request_too_large(max_bytes, setting)
            return None
        return too_large(self.default) if length > self.default else None
