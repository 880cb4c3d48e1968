"""`python caption.py PATH|GLOB|URL|@LIST... [--out captions.jsonl]`: the folder CLI.

Captions images in this process (or on Ray with ``--ray``) and writes JSON Lines; a rerun
resumes. All of it lives in bulk/cli.py; this file is the entry point people type.
"""

from __future__ import annotations

import os
import sys

from bulk.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
