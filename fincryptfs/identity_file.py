"""A daemon's Ed25519 identity on disk: created once (mode 0600, fsynced, atomically renamed), then reused.

Shared by storaged and mediatord so both keep their one long-lived secret the same, crash-safe way: a crash
while creating it leaves either no file or a complete one, never a torn key.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .core.identity import SigningKey, decode_identity_file, encode_identity_file
from .secretfile import write_secret_file

log = logging.getLogger(__name__)


def load_or_create_identity(path: Path, role: str) -> SigningKey:
    """The key stored at ``path``; a new one (written 0600) if there is none yet."""
    if path.exists():
        return decode_identity_file(path.read_bytes(), source=str(path))
    key = SigningKey.generate()
    write_secret_file(path, encode_identity_file(key))
    log.info("created %s identity id=%s file=%s", role, key.id, path)
    return key
