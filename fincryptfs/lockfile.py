"""Per-data-folder locks (``flock`` on a file in the data folder), so that two processes never both believe
they own the same tree: one mount, one upload worker and one ``put`` at a time. The kernel drops a lock when
its holder dies, however it dies, so a crash never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .core.errors import ConfigError


@contextmanager
def held(path: Path, busy: str) -> Iterator[int]:
    """Hold an exclusive lock on ``path`` (created 0600) or raise ConfigError(``busy``) at once; yields its fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(busy) from None
        yield fd
    finally:
        os.close(fd)
