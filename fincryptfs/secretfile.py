"""Writing a file that holds a secret (the account's key file, a daemon's identity): readable by its owner
only from the first byte, complete or absent after a crash, and durable once written."""

from __future__ import annotations

import os
from pathlib import Path


def write_secret_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file created afresh with mode 0600 (a leftover from a
    crash is removed, not reused: opening it would keep whatever mode it had), fsynced, renamed into place, and
    the folder fsynced so that the rename survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
