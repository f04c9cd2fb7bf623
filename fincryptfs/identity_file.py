"""A daemon's Ed25519 identity on disk: created once (mode 0600, fsynced, atomically renamed), then reused.

Shared by storaged and mediatord so both keep their one long-lived secret the same, crash-safe way: a crash
while creating it leaves either no file or a complete one, never a torn key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .core.identity import SigningKey, decode_identity_file, encode_identity_file

log = logging.getLogger(__name__)


def load_or_create_identity(path: Path, role: str) -> SigningKey:
    """The key stored at ``path``; a new one (written 0600) if there is none yet."""
    if path.exists():
        return decode_identity_file(path.read_bytes(), source=str(path))
    key = SigningKey.generate()
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, encode_identity_file(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    log.info("created %s identity id=%s file=%s", role, key.id, path)
    return key
