"""glibc malloc settings for a server that decodes large images on many threads.

By default glibc gives each thread its own heap arena (up to 8 per core) and raises its mmap
threshold after every large free, so the 100+ MB buffers of decoded images end up on heaps that
are never returned to the system: measured here, 24 concurrent 36-megapixel uploads grew the
peak by 4 GB although only two were decoded at a time. Two arenas and a fixed mmap threshold
(large buffers mapped and unmapped on free) keep the peak near what is really in use.

The threshold is 32 MiB (glibc's largest), not lower: every buffer above it is a fresh mmap whose
pages the kernel faults in and zeroes on first touch. The model's activations (ViT-L at 384 px:
9-21 MB per image per op) are freed and allocated again thousands of times per batch; at a 1 MiB
threshold a batch of 8 took ~1.4 M page faults per 6 encoder layers and ~20 % of its CPU time in
the kernel (benchmarks/batch_profile.py, docs/performance.md). Decoded photos worth worrying about
(36 MP = 108 MB) are still above it; a trim threshold of twice it keeps the heap from being
returned and faulted back between batches. No effect, and no error, on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 64 << 20


def tune_malloc() -> bool:
    """Apply the settings (call early, before worker threads start); True when applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = (
        bool(mallopt(M_ARENA_MAX, ARENAS))
        and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    )
    log.debug("malloc tuning %s", "applied" if ok else "not supported")
    return ok
