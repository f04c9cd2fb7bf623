"""How the upload queue gathers small files into a pack, on a real tree database (nothing is uploaded here)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import trio

from fincryptfs import meta, uploadqueue
from fincryptfs.cache import CacheDir
from fincryptfs.objectstore import ObjectStore
from fincryptfs.uploadqueue import PACK_LINGER_MAX, UploadQueue


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


async def gather_while_files_keep_coming(db: sqlite3.Connection, queue: UploadQueue, flush_after: float | None
                                         ) -> float:
    """Seconds ``_gather`` waited for its first job while a small file is closed every 50 ms (until a flush
    is asked for ``flush_after`` seconds in)."""
    close_small_file(db, "first")
    first = meta.next_upload(db, time.time())
    assert first is not None
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue._retry_on_flush)

        async def keep_writing() -> None:
            for i in range(100):
                await trio.sleep(0.05)
                if flush_after is not None and time.monotonic() - started >= flush_after - 0.02:
                    return
                close_small_file(db, f"f{i}")
        nursery.start_soon(keep_writing)
        if flush_after is not None:
            async def flush() -> None:
                await trio.sleep(flush_after)
                meta.request_flush(Path(db.execute("PRAGMA database_list").fetchone()[2]))
                queue.look_for_flush()  # as put does; the mount's queue polls for it every FLUSH_POLL
            nursery.start_soon(flush)
        await queue._gather(first)
        waited = time.monotonic() - started
        nursery.cancel_scope.cancel()
    return waited


@pytest.fixture(autouse=True)
def patient_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files every 50 ms count as still arriving even if a loaded machine pauses this test for 0.4 s."""
    monkeypatch.setattr(uploadqueue, "PACK_LINGER", 0.5)


async def test_a_pack_waits_while_small_files_keep_arriving(db: sqlite3.Connection, tmp_path: Path) -> None:
    waited = await gather_while_files_keep_coming(db, queue_on(db, tmp_path), flush_after=None)
    assert PACK_LINGER_MAX - 0.1 <= waited < PACK_LINGER_MAX + 0.5


async def test_a_flush_asked_once_writing_stopped_sends_the_pack_at_once(
        db: sqlite3.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a flush (or a put that has copied everything) asks for the snapshot: lingering only delays the answer
    monkeypatch.setattr(uploadqueue, "PACK_LINGER", 1.0)  # without the flush: 1 s after the last file
    waited = await gather_while_files_keep_coming(db, queue_on(db, tmp_path), flush_after=0.3)
    assert 0.3 <= waited < 0.8


async def test_files_written_after_a_flush_are_gathered_as_usual(db: sqlite3.Connection, tmp_path: Path) -> None:
    # a flush asked while a copy goes on: packs gathered after it still wait for the files that keep coming
    queue = queue_on(db, tmp_path)
    meta.request_flush(tmp_path / "meta.db")
    queue.look_for_flush()
    waited = await gather_while_files_keep_coming(db, queue, flush_after=None)
    assert PACK_LINGER_MAX - 0.1 <= waited < PACK_LINGER_MAX + 0.5


async def test_a_pack_that_fills_up_goes_at_once(db: sqlite3.Connection, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # new files wake the gathering worker: it used to look only every PACK_LINGER, so a full pack waited
    monkeypatch.setattr(uploadqueue, "PACK_LINGER", 1.0)
    queue = UploadQueue(db=db, store=cast(ObjectStore, None), cache=CacheDir(tmp_path / "cache", 2**30),
                        master_key=bytes(32), spool_dir=tmp_path / "spool", pack_size=5000)
    close_small_file(db, "first")
    first = meta.next_upload(db, time.time())
    assert first is not None
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        async def keep_writing() -> None:
            for i in range(40):  # the pack is full at the fourth of these (five files of 1,000 bytes)
                await trio.sleep(0.05)
                close_small_file(db, f"f{i}")
                queue.wake()  # as the mount's pipe (or put) does for every file closed
        nursery.start_soon(keep_writing)
        await queue._gather(first)
        waited = time.monotonic() - started
        nursery.cancel_scope.cancel()
    assert 0.18 <= waited < 0.6, waited
    assert meta.small_pending(db, time.time(), 2**20)[0] + first.size >= 5000


def test_publishes_are_spaced_by_what_the_last_one_cost() -> None:
    assert uploadqueue.publish_spacing(0.0) == 0.0
    assert uploadqueue.publish_spacing(0.05) < 2.0  # a small tree: within the usual debounce
    assert uploadqueue.publish_spacing(4.0) == pytest.approx(76.0)  # a million files: 5 % of the time at most


async def test_a_quiet_tree_waits_for_the_spacing_unless_a_flush_asks(db: sqlite3.Connection,
                                                                       tmp_path: Path) -> None:
    queue = UploadQueue(db=db, store=cast(ObjectStore, None), cache=CacheDir(tmp_path / "cache", 2**30),
                        master_key=bytes(32), spool_dir=tmp_path / "spool", publish_delay=0.05)
    started = trio.current_time()
    await queue._wait_until_quiet(not_before=started + 0.5)
    assert trio.current_time() - started >= 0.5  # the tree was quiet long before
    started = trio.current_time()
    await queue._wait_until_quiet(not_before=started - 1)
    assert trio.current_time() - started < 0.3  # no spacing left: the debounce alone
    meta.request_flush(tmp_path / "meta.db")
    queue.look_for_flush()
    started = trio.current_time()
    await queue._wait_until_quiet(not_before=started + 60)
    assert trio.current_time() - started < 0.3  # a flush does not wait for the spacing
