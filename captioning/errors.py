"""Every error a caller can cause or meet, defined once, with the one table that maps them to HTTP.

Rooms raise these domain exceptions and never think about HTTP; the HTTP edge registers one
handler that looks the class up in :data:`HTTP_TABLE` (the way Hugging Face TGI keeps one
error→status table). Messages go to clients unchanged, so they say what was wrong with the input
and never carry internals. Lifecycle words (``loading``, ``error``, ``draining``) are a `state`;
HTTP codes are a `status`.
"""

from __future__ import annotations

RETRY_AFTER_SECONDS = 1
JOBS_RETRY_AFTER_SECONDS = 30  # a full job queue frees up as jobs finish, not in a second


class ServiceError(Exception):
    """Base of every error answered with the v3 error envelope; `message` is client-safe."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    @property
    def status(self) -> int:
        """The HTTP status this error is answered with (from :data:`HTTP_TABLE`)."""
        return http_status(self)


class InvalidRequest(ServiceError):
    """The request itself is malformed: missing input, conflicting parameters."""


class InvalidOption(InvalidRequest):
    """A generation option is out of range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ImageInputError(ServiceError):
    """Caller input could not be turned into an image (bad bytes, URL or path)."""


class AccessDenied(ImageInputError):
    """A `file=` path outside FILE_ROOTS."""


class TooLarge(ImageInputError):
    """More bytes than MAX_FILE_SIZE (upload, download or file)."""


class LimitExceeded(InvalidRequest):
    """More items or bytes in one batch or job request than allowed (MAX_BATCH_ITEMS, ...)."""


class TooManyJobs(ServiceError):
    """As many jobs as allowed (MAX_JOBS) are queued or running; retry when one finishes."""


class InsufficientStorage(ServiceError):
    """Job storage is full (JOBS_DISK_QUOTA, free disk space or the job store's item bound)."""


class NotFound(ServiceError):
    """A resource (for example a job) that does not exist."""


class NotReady(ServiceError):
    """The model is still loading or failed to load; `state` says which."""

    def __init__(self, state: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.reason = reason


class Overloaded(ServiceError):
    """A bounded queue is full; the caller should retry shortly."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its result was ready."""


class ShuttingDown(ServiceError):
    """The service is draining or stopped and takes no new work."""


#: domain error → (HTTP status, extra headers). Looked up along the class's MRO.
HTTP_TABLE: dict[type[ServiceError], tuple[int, dict[str, str]]] = {
    InvalidRequest: (400, {}),
    ImageInputError: (400, {}),
    AccessDenied: (403, {}),
    NotFound: (404, {}),
    TooLarge: (413, {}),
    LimitExceeded: (413, {}),
    TooManyJobs: (429, {"Retry-After": str(JOBS_RETRY_AFTER_SECONDS)}),
    InsufficientStorage: (507, {}),
    NotReady: (503, {"Retry-After": str(RETRY_AFTER_SECONDS)}),
    Overloaded: (503, {"Retry-After": str(RETRY_AFTER_SECONDS)}),
    DeadlineExceeded: (503, {}),
    ShuttingDown: (503, {"Retry-After": str(RETRY_AFTER_SECONDS)}),
    ServiceError: (500, {}),
}


def http_mapping(exc: ServiceError) -> tuple[int, dict[str, str]]:
    """The (status, headers) of the most specific class of `exc` in the table."""
    for cls in type(exc).__mro__:
        if cls in HTTP_TABLE:
            return HTTP_TABLE[cls]  # type: ignore[index]
    return 500, {}


def http_status(exc: ServiceError) -> int:
    return http_mapping(exc)[0]


def too_large(max_bytes: int) -> TooLarge:
    """The one 413 used for every source (url, file, upload, batch), so clients see one message."""
    return TooLarge(f"Image too large: limit is {max_bytes} bytes")
