"""A place in the batcher's queue taken at the door, before any work is done for a request.

Why: a request that will be refused must learn it before it waits for a decode slot, reads its
upload, downloads a URL or decodes pixels; and a request that was let in must never be refused
later for the queue bound. `Batcher.reserve` hands these out (see batcher.py).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol


class _Admitting(Protocol):
    """What a reservation needs from the queue that issued it."""

    def _mark_arriving(self, reservation: Reservation) -> None: ...

    def _release(self, reservation: Reservation) -> None: ...


class Reservation:
    """A place in the interactive queue, held from the door until the request is submitted
    (or released: a cache hit, a bad image). Use as a context manager; release is idempotent."""

    def __init__(self, queue: _Admitting, group: Hashable) -> None:
        self._queue = queue
        self.group = group
        self.is_arriving = False
        self.held = True

    def arriving(self) -> None:
        """The image is in hand and being prepared: a gathering batch may wait for it."""
        self._queue._mark_arriving(self)

    def release(self) -> None:
        self._queue._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
