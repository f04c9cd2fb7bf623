"""How the upload queue gathers small files into a pack, on a real tree database (nothing is uploaded here)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import trio

from fincryptfs import meta
from fincryptfs.cache import CacheDir
from fincryptfs.objectstore import ObjectStore
from fincryptfs.uploadqueue import PACK_LINGER, PACK_LINGER_MAX, UploadQueue


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = meta.connect(tmp_path / "meta.db")
    yield conn
    conn.close()


def queue_on(db: sqlite3.Connection, tmp_path: Path) -> UploadQueue:
    # the gathering tasks read the tree only: no object store is reached
    return UploadQueue(db=db, store=cast(ObjectStore, None), cache=CacheDir(tmp_path / "cache", 2**30),
                       master_key=bytes(32), spool_dir=tmp_path / "spool")


def close_small_file(db: sqlite3.Connection, name: str) -> None:
    f = meta.create(db, meta.ROOT_INO, name.encode(), meta.FILE, 0o100644, 0, 0)
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 1000, time.time_ns())


async def gather_while_files_keep_coming(db: sqlite3.Connection, queue: UploadQueue,
                                         flush_after: float | None) -> float:
    """Seconds ``_gather`` waited for its first job while a small file is closed every 50 ms."""
    close_small_file(db, "first")
    first = meta.next_upload(db, time.time())
    assert first is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue._retry_on_flush)

        async def keep_writing() -> None:
            for i in range(100):
                await trio.sleep(0.05)
                close_small_file(db, f"f{i}")
        nursery.start_soon(keep_writing)
        if flush_after is not None:
            async def flush() -> None:
                await trio.sleep(flush_after)
                meta.request_flush(Path(db.execute("PRAGMA database_list").fetchone()[2]))  # the mount's way
            nursery.start_soon(flush)
        started = time.monotonic()
        await queue._gather(first)
        waited = time.monotonic() - started
        nursery.cancel_scope.cancel()
    return waited


async def test_a_pack_waits_while_small_files_keep_arriving(db: sqlite3.Connection, tmp_path: Path) -> None:
    waited = await gather_while_files_keep_coming(db, queue_on(db, tmp_path), flush_after=None)
    assert PACK_LINGER_MAX - 0.1 <= waited < PACK_LINGER_MAX + 0.5


async def test_a_waiting_flush_sends_the_pack_at_once(db: sqlite3.Connection, tmp_path: Path) -> None:
    # a flush (or a put that has copied everything) asks for the snapshot: lingering only delays the answer
    waited = await gather_while_files_keep_coming(db, queue_on(db, tmp_path), flush_after=0.3)
    assert 0.3 <= waited < 0.3 + PACK_LINGER
