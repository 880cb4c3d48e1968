"""Run the real Flask app under a real waitress server on 127.0.0.1 for tests."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from flask import Flask
from waitress import create_server


class RunningServer:
    """waitress serving `app` on an ephemeral loopback port, in a background thread."""

    def __init__(self, app: Flask, **kw: Any) -> None:
        self.app = app
        self.runtime: Any = None  # set by fixtures that build the app around a runtime
        kw.setdefault("threads", 8)
        self.server = create_server(app, host="127.0.0.1", port=0, **kw)
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._run, name="waitress-test", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # close() tears the socket map down under the loop; that is how it ends.
        with contextlib.suppress(OSError, ValueError):
            self.server.run()

    def close(self) -> None:
        self.server.task_dispatcher.shutdown(timeout=5)
        for channel in list(self.server._map.values()):
            channel.close()
        self._thread.join(timeout=5)
