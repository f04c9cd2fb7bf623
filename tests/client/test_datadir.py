"""The data folder's shared pieces on a real tree database and cache folder: the evictor."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import trio
from client_data.clientdata_support import open_store
from netfixtures import start_network

from fincryptfs import datadir, meta, packs
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


def over_full_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                    ) -> tuple[sqlite3.Connection, CacheDir, list[int]]:
    """Twelve uploaded files of 100 kB in a cache limited to ten (f0 the least recently used), and an evictor
    that looks every 50 ms from the start; the tree, the cache and the files' inode numbers."""
    monkeypatch.setattr(datadir, "EVICT_FIRST", 0.0)
    monkeypatch.setattr(datadir, "EVICT_INTERVAL", 0.05)
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", limit_bytes=10 * 100_000)
    for i in range(12):
        stored_file(db, cache, f"f{i}", 100_000)
    inos = [meta.lookup(db, meta.ROOT_INO, f"f{i}".encode()).ino for i in range(12)]
    for ino in inos:
        cache.touch(ino)
    return db, cache, inos


async def test_the_evictor_lists_in_a_thread_and_spares_what_was_opened_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount keeps answering while the cache folder is listed; a file opened during the listing, although
    it is the least recently used, stays; the others go, down to 90 % of the limit."""
    db, cache, inos = over_full_cache(tmp_path, monkeypatch)
    try:
        opened: set[int] = set()
        real_list = cache.list_entries
        ticks = 0
        listing_threads: list[bool] = []

        def slow_list() -> list[object]:
            listing_threads.append(threading.current_thread() is not threading.main_thread())
            entries = real_list()
            opened.add(inos[0])  # the user opens f0 while the listing runs
            time.sleep(0.3)
            return entries  # type: ignore[return-value]
        monkeypatch.setattr(cache, "list_entries", slow_list)

        async def tick() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.01)
                ticks += 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(datadir.evictor, db, cache, lambda: (set(opened), ()))
            nursery.start_soon(tick)
            with trio.fail_after(5):
                while used_bytes(cache.root) > 10 * 100_000:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert listing_threads and all(listing_threads)
        assert ticks >= 15  # the event loop ran on through the 0.3 s listing
        assert [ino for ino in inos if cache.has(ino)] == [inos[0], *inos[4:]]  # f1, f2, f3 went: 9 files left
    finally:
        db.close()


async def test_a_file_written_while_the_evictor_listed_is_not_evicted(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The uploaded inodes are read in the worker thread; a file written after that (not uploaded any more)
    is checked again before its cache file goes, which is then the only copy of its new bytes."""
    db, cache, inos = over_full_cache(tmp_path, monkeypatch)
    try:
        real = datadir._list_for_eviction

        def then_written(cache: CacheDir, db_path: Path) -> tuple[list[object], set[int]]:
            listed = real(cache, db_path)
            writer = meta.connect(db_path)  # the user rewrites f0 right after the thread read the tree
            try:
                meta.mark_dirty(writer, inos[0])
            finally:
                writer.close()
            return listed  # type: ignore[return-value]
        monkeypatch.setattr(datadir, "_list_for_eviction", then_written)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(datadir.evictor, db, cache, lambda: ((), ()))
            with trio.fail_after(5):
                while used_bytes(cache.root) > 10 * 100_000:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert cache.has(inos[0])  # chosen first (least recently used), kept: it is dirty now
        assert [ino for ino in inos[1:] if not cache.has(ino)] == inos[1:3]
    finally:
        db.close()


def packed_files(db: sqlite3.Connection, pack_id: str, sizes: list[int], pack_json: str | None = None) -> list[int]:
    """Files stored together as ``pack_id`` (as the upload worker leaves them; ``pack_json`` is the stored
    pack's record, a stand-in if none); their inode numbers."""
    inos = []
    for i, size in enumerate(sizes):
        f = meta.create(db, meta.ROOT_INO, b"m%d" % i, meta.FILE, 0o100644, 0, 0)
        meta.mark_dirty(db, f.ino)
        meta.record_release(db, f.ino, size, time.time_ns())
        inos.append(f.ino)
    jobs = meta.next_small_uploads(db, time.time(), max_size=1000, max_bytes=10_000, max_files=100)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    pack_json = pack_json or json.dumps({"object_id": pack_id, "size": sum(sizes)})
    assert meta.finish_pack(db, pack_id, pack_json,
                            [(job, offset, size) for job, offset, size in zip(jobs, offsets, sizes, strict=True)]
                            ) == len(sizes)
    return inos


async def test_released_members_are_zeroed_in_the_pack_copy_once_nothing_has_them_open(tmp_path: Path) -> None:
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", limit_bytes=2**20)
    try:
        pack = "ab" * 32
        a, b, c = packed_files(db, pack, [100, 200, 300])
        content = os.urandom(600)
        cache.pack_path(pack).write_bytes(content)
        meta.unlink(db, meta.ROOT_INO, b"m0")
        meta.mark_dirty(db, b)
        meta.record_release(db, b, 0, time.time_ns())  # emptied
        assert await datadir.scrub_stale_members(db, cache, open_inos={a}) == 1  # a is still read by someone
        assert cache.pack_path(pack).read_bytes() == content[:100] + bytes(200) + content[300:]
        assert [ino for _, ino, _ in meta.stale_members(db)] == [a]
        assert await datadir.scrub_stale_members(db, cache, open_inos=set()) == 1
        assert cache.pack_path(pack).read_bytes() == bytes(300) + content[300:]  # c's bytes untouched
        assert meta.stale_members(db) == []
        cache.pack_path(pack).unlink()  # evicted: a copy fetched later is zeroed as it arrives (packs.py)
        assert meta.stale_ranges(db, pack) == [(0, 100), (100, 200)]
        meta.unlink(db, meta.ROOT_INO, b"m2")  # the pack dies with its last member, and its notes with it
        assert await datadir.scrub_stale_members(db, cache, open_inos=set()) == 0
        assert meta.stale_members(db) == [] and meta.stale_ranges(db, pack) == []
    finally:
        db.close()


async def test_the_evictor_outlives_a_tree_locked_by_another_process(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Its pass fails while another process holds the tree's write lock past the busy timeout (it runs in the
    mount's nursery: an exception would unmount the folder); the next pass after the lock is gone does it."""
    monkeypatch.setattr(datadir, "EVICT_INTERVAL", 0.05)
    db = meta.connect(tmp_path / "meta.db")
    db.execute("PRAGMA busy_timeout=100")
    cache = CacheDir(tmp_path / "cache", limit_bytes=2**20)
    holder = sqlite3.connect(tmp_path / "meta.db", isolation_level=None)
    try:
        pack = "cd" * 32
        packed_files(db, pack, [100, 100])
        cache.pack_path(pack).write_bytes(b"x" * 200)
        meta.unlink(db, meta.ROOT_INO, b"m0")  # to be zeroed: a write to the tree
        holder.execute("BEGIN IMMEDIATE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(datadir.evictor, db, cache, lambda: ((), ()))
            with trio.fail_after(5):
                while "cache upkeep failed" not in caplog.text:
                    await trio.sleep(0.05)
            holder.execute("ROLLBACK")
            with trio.fail_after(5):
                while cache.pack_path(pack).read_bytes() != bytes(100) + b"x" * 100:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        holder.close()
        db.close()


def test_a_cache_without_a_tree_is_set_aside_whole_and_an_empty_one_is_left(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache", 1 << 20)  # a fresh cache: an empty folder of packs
    assert datadir.set_aside_stale_cache(cache.root) is None and cache.root.is_dir()
    assert datadir.set_aside_stale_cache(tmp_path / "none") is None
    cache.path(7).write_bytes(b"never uploaded")
    aside = datadir.set_aside_stale_cache(cache.root)
    assert aside is not None and aside.parent == tmp_path and aside.name.startswith("cache.previous-")
    assert (aside / "7").read_bytes() == b"never uploaded" and not cache.root.exists()


async def test_a_member_released_while_its_pack_arrives_is_zeroed_in_the_copy(tmp_path: Path, nursery: trio.Nursery,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A file deleted while the copy of its pack is being fetched and zeroed: the evictor's scrub finds no copy
    yet and counts the note done, so the fetch itself must zero it once the copy is in place."""
    net = await start_network(tmp_path, nursery, nodes=6)
    content = os.urandom(600)
    (tmp_path / "pack").write_bytes(content)
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", limit_bytes=2**20)
    try:
        async with open_store(net.mediator_url, tmp_path) as store:
            stored = await store.put_file(tmp_path / "pack")
            pack = stored.object_id
            packed_files(db, pack, [100, 200, 300], pack_json=json.dumps(stored.to_json()))
            meta.unlink(db, meta.ROOT_INO, b"m0")  # released before the fetch: zeroed as the copy arrives
            real_stale_ranges = meta.stale_ranges

            def released_meanwhile(conn: sqlite3.Connection, pack_id: str) -> list[tuple[int, int]]:
                ranges = real_stale_ranges(conn, pack_id)
                if ranges == [(0, 100)]:  # the fetch's first look: m1 goes now, and the scrub finds no copy
                    meta.unlink(db, meta.ROOT_INO, b"m1")
                    meta.mark_stale_zeroed(db, [rowid for rowid, _, _ in meta.stale_members(db)])
                return ranges
            monkeypatch.setattr(meta, "stale_ranges", released_meanwhile)
            reader = packs.PackReader(db=db, store=store, pack_path=cache.pack_path)
            path = await reader.pack_file(meta.PackRef(pack, 300, 300))
            assert path is not None and path.read_bytes() == bytes(300) + content[300:]
    finally:
        db.close()
