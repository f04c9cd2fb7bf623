"""Logging set-up shared by every command and daemon.

httpx logs each request at INFO: at a pack fetch or an upload per second that flooded the mount's and the
daemons' logs (and cost a few percent of a cold read's CPU) while saying nothing our own messages do not say
better, since failures are reported by the code that made the request. It is kept at WARNING.
"""

from __future__ import annotations

import logging
import sys

QUIET_LIBRARIES = ("httpx", "httpcore", "hpack")


def configure(level: int | str, *, tag: str = "") -> None:
    """Root logging to stderr at ``level``; ``tag`` marks lines from a helper process (e.g. "[worker]")."""
    logging.basicConfig(level=level, stream=sys.stderr, format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
