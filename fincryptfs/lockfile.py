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

MOUNT_LOCK = "mount.lock"  # held by a mount, or by ``fincryptfs put`` while nothing is mounted
UPLOAD_LOCK = "upload.lock"  # held by whoever runs the upload queue: a mount's upload worker, or ``put``


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


def holder(path: Path) -> int | None:
    """The PID of the process holding ``path``'s lock, or None: read from the kernel's list of locks
    (``/proc/locks``), without taking the lock, which even for a moment could turn away the process starting to
    take it."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2646404 0 EOF" ("->" marks a waiter, which holds nothing)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
            return int(fields[4])
    return None


def uploads_stalled(data_dir: Path) -> str | None:
    """Why nothing is uploading the data folder's pending files right now, in words, or None if something is."""
    if holder(data_dir / UPLOAD_LOCK) is not None:
        return None
    if holder(data_dir / MOUNT_LOCK) is not None:
        return (f"the mount's upload worker is not running just now; the mount restarts it by itself (if this "
                f"lasts, see {data_dir / 'mount.log'})")
    return "nothing is uploading: this data folder is not mounted (fincryptfs mount DIR, or fincryptfs put)"
