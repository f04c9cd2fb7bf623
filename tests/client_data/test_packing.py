"""Packing small files with the upload queue's real workers, against real daemons."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
import trio
from clientdata_support import open_store
from netfixtures import start_network

from fincryptfs import meta, uploadqueue
from fincryptfs.cache import CacheDir
from fincryptfs.core.crypto import new_master_key
from fincryptfs.objectstore import StoredObject
from fincryptfs.packs import PackReader


def _add_file(db: sqlite3.Connection, cache: CacheDir, name: bytes, data: bytes) -> int:
    """A closed file of ``data`` with its upload job, as the mount leaves one."""
    f = meta.create(db, meta.ROOT_INO, name, meta.FILE, 0o100644, 0, 0)
    meta.mark_dirty(db, f.ino)
    cache.path(f.ino).write_bytes(data)
    meta.record_release(db, f.ino, len(data), time.time_ns())
    return f.ino


async def _until_uploaded(db: sqlite3.Connection) -> None:
    with trio.fail_after(30):
        while meta.has_pending_uploads(db):
            await trio.sleep(0.05)


async def test_a_burst_of_small_files_goes_as_one_pack_whatever_the_workers(
        tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    # both workers wake at the first file; the second used to claim the next file and gather a pack of its
    # own, so a burst of ten files left as a pack of nine and a pack of one (an object each)
    monkeypatch.setattr(uploadqueue, "PACK_LINGER", 1.0)  # a slow machine's pauses must not end the burst
    monkeypatch.setattr(uploadqueue, "PACK_LINGER_MAX", 3.0)
    net = await start_network(tmp_path, nursery, nodes=6)
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", 2**30)
    try:
        async with open_store(net.mediator_url, tmp_path) as store, trio.open_nursery() as inner:
            queue = uploadqueue.UploadQueue(db=db, store=store, cache=cache, master_key=new_master_key(),
                                spool_dir=tmp_path / "spool", workers=2)
            await inner.start(queue.run)
            for i in range(10):
                f = meta.create(db, meta.ROOT_INO, f"f{i}".encode(), meta.FILE, 0o100644, 0, 0)
                meta.mark_dirty(db, f.ino)
                cache.path(f.ino).write_bytes(os.urandom(1000 + i))
                meta.record_release(db, f.ino, 1000 + i, time.time_ns())
                queue.wake()
                await trio.sleep(0.02)
            with trio.fail_after(30):
                while meta.has_pending_uploads(db):
                    await trio.sleep(0.05)
            inner.cancel_scope.cancel()
        assert [live for _, live in meta.packs(db)] == [10]
    finally:
        db.close()


async def test_a_pack_skips_members_whose_cache_file_vanished_or_shrank(tmp_path: Path, nursery: trio.Nursery
                                                                         ) -> None:
    """Packs are read straight from the members' cache files: one deleted or cut short behind the tree's back
    (not through the mount, so its job is still current) is not referenced and its upload fails in words; the
    other members are stored at their own ranges and read back from the network byte for byte."""
    net = await start_network(tmp_path, nursery, nodes=6)
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", 2**30)
    contents = {}
    try:
        async with open_store(net.mediator_url, tmp_path) as store:
            async with trio.open_nursery() as inner:  # closed before the reads below: its cancel would stop them
                for i in range(6):
                    contents[_add_file(db, cache, f"f{i}".encode(), os.urandom(3000 + 1000 * i))] = b""
                for ino in contents:
                    contents[ino] = cache.path(ino).read_bytes()
                gone, short = sorted(contents)[1], sorted(contents)[4]
                cache.path(gone).unlink()
                os.truncate(cache.path(short), 10)
                queue = uploadqueue.UploadQueue(db=db, store=store, cache=cache, master_key=new_master_key(),
                                                spool_dir=tmp_path / "spool", workers=2)
                await inner.start(queue.run)
                await _until_uploaded(db)
                inner.cancel_scope.cancel()
            failed = {ino: reason for _, ino, reason in meta.failed_uploads(db)}
            assert set(failed) == {gone, short}
            assert all("cache file is gone or shorter than recorded" in str(r) for r in failed.values())
            assert [live for _, live in meta.packs(db)] == [4]
            read_back = 0
            for ino, data in contents.items():
                if ino in failed:
                    continue
                ref = meta.pack_ref(meta.get(db, ino).object)
                assert ref is not None and ref.size == len(data)
                pack_json = meta.pack_object(db, ref.pack_id)
                assert pack_json is not None
                obj = StoredObject.from_json(json.loads(pack_json))
                assert await store.read_range(obj, ref.offset, ref.size) == data
                read_back += 1
            assert read_back == 4
            # what was read of the short one (its first 10 bytes) is zeroed in a copy of the pack
            assert ref is not None
            copy = await PackReader(db=db, store=store, pack_path=cache.pack_path).pack_file(ref)
            assert copy is not None
            stale = meta.stale_ranges(db, ref.pack_id)
            assert sorted(size for _, size in stale) == sorted([len(contents[gone]), len(contents[short])])
            assert all(copy.read_bytes()[offset:offset + size] == bytes(size) for offset, size in stale)
    finally:
        db.close()


async def test_a_member_deleted_while_its_pack_uploads_never_comes_back_into_the_cache(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """A file deleted while the pack holding it is on its way is not referenced, but its bytes are in the pack:
    they must be zeroed in every copy of the pack fetched later, as those of a member deleted afterwards are
    (they came back, in plaintext, into the cache of whoever read one of its pack-mates)."""
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", 2**30)
    secret = b"SECRET-OF-A-DELETED-FILE-" * 200
    try:
        async with open_store(net.mediator_url, tmp_path) as store:
            async with trio.open_nursery() as inner:
                kept = [_add_file(db, cache, f"k{i}".encode(), os.urandom(4000 + i)) for i in range(3)]
                doomed = _add_file(db, cache, b"doomed", secret)
                net.hold()
                queue = uploadqueue.UploadQueue(db=db, store=store, cache=cache, master_key=new_master_key(),
                                                spool_dir=tmp_path / "spool", workers=1)
                await inner.start(queue.run)
                with trio.fail_after(20):  # every member claimed: the pack is on its way
                    while sum(state == "uploading" for _, _, state, _, _ in meta.pending_uploads(db)) < 4:
                        await trio.sleep(0.01)
                meta.unlink(db, meta.ROOT_INO, b"doomed")  # its cache file stays until the kernel forgets it
                net.release()
                await _until_uploaded(db)
                inner.cancel_scope.cancel()
            assert meta.get(db, doomed).object is None
            refs = {ino: meta.pack_ref(meta.get(db, ino).object) for ino in kept}
            first = refs[kept[0]]
            assert first is not None and {ref.pack_id if ref else None for ref in refs.values()} == {first.pack_id}
            assert [live for _, live in meta.packs(db)] == [3]
            pack_json = meta.pack_object(db, first.pack_id)
            assert pack_json is not None  # the deleted file's bytes are in the pack object:
            assert StoredObject.from_json(json.loads(pack_json)).size >= len(secret) + sum(4000 + i for i in range(3))
            copy = await PackReader(db=db, store=store, pack_path=cache.pack_path).pack_file(first)
            assert copy is not None
            data = copy.read_bytes()
            assert secret[:25] not in data  # but not in its copy
            for ino, ref in refs.items():
                assert ref is not None
                assert data[ref.offset:ref.offset + ref.size] == cache.path(ino).read_bytes()
    finally:
        db.close()


async def test_a_pack_whose_last_member_goes_while_it_is_fetched_leaves_no_copy(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """The cache copy of a pack no file references holds nothing but deleted files' plaintext. A pack fetched
    while its last member was deleted used to be renamed into the cache all the same, after the sweep of dead
    copies had looked, and stayed there until the tree changed again."""
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", 2**30)
    try:
        async with open_store(net.mediator_url, tmp_path) as store:
            async with trio.open_nursery() as inner:
                inos = [_add_file(db, cache, f"f{i}".encode(), os.urandom(20_000 + i)) for i in range(3)]
                queue = uploadqueue.UploadQueue(db=db, store=store, cache=cache, master_key=new_master_key(),
                                                spool_dir=tmp_path / "spool", workers=1)
                await inner.start(queue.run)
                await _until_uploaded(db)
                inner.cancel_scope.cancel()
            ref = meta.pack_ref(meta.get(db, inos[0]).object)
            assert ref is not None
            for ino in inos:
                cache.remove(ino)
            reader = PackReader(db=db, store=store, pack_path=cache.pack_path)
            outcome: list[object] = []

            async def fetch() -> None:
                try:
                    outcome.append(await reader.pack_file(ref))
                except FileNotFoundError as exc:
                    outcome.append(exc)
            net.hold()
            async with trio.open_nursery() as inner:
                inner.start_soon(fetch)
                await trio.sleep(0.3)  # the fetch waits on the nodes
                for i in range(3):
                    meta.unlink(db, meta.ROOT_INO, f"f{i}".encode())
                assert meta.live_packs(db) == set()
                cache.drop_dead_packs(meta.live_packs(db), ())  # the evictor's sweep after the change
                net.release()
            assert len(outcome) == 1 and isinstance(outcome[0], FileNotFoundError)
            assert not cache.pack_path(ref.pack_id).exists()
            assert [p.name for p in cache.packs.iterdir()] == []
    finally:
        db.close()
