"""The OpenMP wait policy, chosen by the service before torch (and libgomp) load.

Why: torch's CPU kernels run in libgomp parallel regions. Between regions, libgomp's default
policy keeps each team's idle threads spinning for up to ~300,000 iterations (a few ms) before
they sleep. On a machine whose cores are shared (a busy neighbour process, the HTTP threads
decoding the next images) a spinning thread takes the core from the very teammate it waits for,
and every region ends late: measured here, up to 17x fewer requests per second. With ``PASSIVE``
idle threads sleep instead.

Sleeping at once is too eager, though: a decoder step is a chain of short regions a few tens of
microseconds apart, and a thread that sleeps after each one must be woken (a futex call) for the
next. So with ``PASSIVE`` the service also sets ``GOMP_SPINCOUNT`` to 10,000 rounds (about 0.1 ms,
libgomp's own estimate is 100,000 rounds per ms): long enough to bridge the gap between the
regions of one step, short enough that the core is given back almost at once when the work stops.
Measured (docs/performance.md): a bf16 decoder step 68.5 -> 56.9 ms, served bf16 faster idle and
no slower with a busy neighbour.

libgomp reads both variables once, when it is loaded (on ``import torch``), so the choice is
written to the process environment before anything imports torch. An operator's own
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (read into Settings like every variable) wins; with
``OMP_WAIT_POLICY=active`` and no ``GOMP_SPINCOUNT`` libgomp keeps its own spin count.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)

WAIT_POLICIES = ("passive", "active")
PASSIVE_SPIN_COUNT = 10_000  # rounds an idle passive thread spins before it sleeps (~0.1 ms)


def openmp_environment(settings: Settings) -> dict[str, str]:
    """The libgomp variables the service chooses for these settings."""
    policy = settings.omp_wait_policy.upper()
    env = {"OMP_WAIT_POLICY": policy}
    spin = settings.omp_spin_count
    if spin is None and policy == "PASSIVE":
        spin = PASSIVE_SPIN_COUNT
    if spin is not None:
        env["GOMP_SPINCOUNT"] = str(spin)
    return env


def apply_openmp_policy(settings: Settings) -> None:
    """Set OMP_WAIT_POLICY (and GOMP_SPINCOUNT) for libgomp, which reads them once, when torch
    loads it; once torch is loaded this only logs that the choice comes too late.

    The only place the service writes to its environment: the variables are libgomp's
    interface, read by the library itself when it loads."""
    env = openmp_environment(settings)
    if "torch" in sys.modules:
        log.debug("torch already loaded; %s cannot take effect now", env)
        return
    os.environ.update(env)
