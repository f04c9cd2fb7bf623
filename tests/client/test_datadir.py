"""The data folder's shared pieces on a real tree database and cache folder: the evictor."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from fincryptfs import datadir, meta
from fincryptfs.cache import CacheDir, used_bytes


def stored_file(db: sqlite3.Connection, cache: CacheDir, name: str, size: int) -> None:
    """A file written, uploaded and recorded as stored, the way any client process leaves it."""
    f = meta.create(db, meta.ROOT_INO, name.encode(), meta.FILE, 0o100644, 0, 0)
    cache.path(f.ino).write_bytes(os.urandom(size))
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, size, time.time_ns())
    job = meta.next_upload(db, time.time())
    assert job is not None and job.ino == f.ino
    object_id = os.urandom(32).hex()
    assert meta.finish_upload(db, job, object_id, json.dumps({"object_id": object_id, "size": size}))


async def test_the_evictor_counts_what_put_wrote_into_a_mounted_cache(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datadir, "EVICT_FIRST", 0.0)
    monkeypatch.setattr(datadir, "EVICT_INTERVAL", 0.05)
    mount_db = meta.connect(tmp_path / "meta.db")
    put_db = meta.connect(tmp_path / "meta.db")  # put's own connection, as from another process
    cache = CacheDir(tmp_path / "cache", limit_bytes=2**20)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(datadir.evictor, mount_db, cache, lambda: ((), ()))
            await trio.sleep(0.3)  # its first look: an empty cache, so it stops listing the folder
            assert not cache.may_exceed_limit()
            for i in range(3):
                stored_file(put_db, CacheDir(tmp_path / "cache", 2**20), f"f{i}", 600 * 1024)
            meta.add_cache_bytes(put_db, 3 * 600 * 1024)
            with trio.fail_after(5):
                while used_bytes(cache.root) > 2**20:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        mount_db.close()
        put_db.close()
