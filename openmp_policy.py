"""The OpenMP wait policy, chosen by the service before torch (and libgomp) load.

Why: torch's CPU kernels run in libgomp parallel regions. Between regions, libgomp's default
policy keeps each team's idle threads spinning for up to ~300,000 iterations before they sleep.
On a machine whose cores are shared (a busy neighbour process, the HTTP threads decoding the next
images) a spinning thread takes the core from the very teammate it waits for, and every region
ends late: measured here, up to 17x fewer requests per second. With ``PASSIVE`` idle threads
sleep at once; the wake-up costs a few microseconds per region, which the measurements in
docs/performance.md show is lost in the noise on this model.

libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded (on ``import torch``), so the choice is
written to the process environment before anything imports torch. An operator's own
``OMP_WAIT_POLICY`` (read into Settings like every variable) wins.
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


def apply_openmp_policy(settings: Settings) -> bool:
    """Set OMP_WAIT_POLICY for libgomp; True when it will take effect (torch not loaded yet).

    The only place the service writes to its environment: the variable is libgomp's interface,
    read by the library itself when it loads."""
    policy = settings.omp_wait_policy.upper()
    if "torch" in sys.modules:
        log.debug("torch already loaded; OMP_WAIT_POLICY=%s cannot take effect now", policy)
        return os.environ.get("OMP_WAIT_POLICY", "").upper() == policy
    os.environ["OMP_WAIT_POLICY"] = policy
    return True
