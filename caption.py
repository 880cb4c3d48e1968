"""`python caption.py PATH|GLOB|URL|@LIST... [--out captions.jsonl]`: the folder CLI.

Captions images in this process (or on Ray with ``--ray``) and writes JSON Lines; a rerun
resumes. All of it lives in bulk/cli.py; this file is the entry point people type. SIGTERM is
handled like Ctrl-C: the output is closed whole and the summary printed (exit status 130).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from bulk.cli import main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main(sys.argv[1:], os.environ))
