"""Packing small files with the upload queue's real workers, against real daemons."""

from __future__ import annotations

import json
import os
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
        async with open_store(net.mediator_url, tmp_path) as store, trio.open_nursery() as inner:
            for i in range(6):
                f = meta.create(db, meta.ROOT_INO, f"f{i}".encode(), meta.FILE, 0o100644, 0, 0)
                meta.mark_dirty(db, f.ino)
                contents[f.ino] = os.urandom(3000 + 1000 * i)
                cache.path(f.ino).write_bytes(contents[f.ino])
                meta.record_release(db, f.ino, len(contents[f.ino]), time.time_ns())
            gone, short = sorted(contents)[1], sorted(contents)[4]
            cache.path(gone).unlink()
            os.truncate(cache.path(short), 10)
            queue = uploadqueue.UploadQueue(db=db, store=store, cache=cache, master_key=new_master_key(),
                                            spool_dir=tmp_path / "spool", workers=2)
            await inner.start(queue.run)
            with trio.fail_after(30):
                while meta.has_pending_uploads(db):
                    await trio.sleep(0.05)
            inner.cancel_scope.cancel()
            failed = {ino: reason for _, ino, reason in meta.failed_uploads(db)}
            assert set(failed) == {gone, short}
            assert all("cache file is gone or shorter than recorded" in str(r) for r in failed.values())
            assert [live for _, live in meta.packs(db)] == [4]
            for ino, data in contents.items():
                if ino in failed:
                    continue
                ref = meta.pack_ref(meta.get(db, ino).object)
                assert ref is not None and ref.size == len(data)
                pack_json = meta.pack_object(db, ref.pack_id)
                assert pack_json is not None
                obj = StoredObject.from_json(json.loads(pack_json))
                assert await store.read_range(obj, ref.offset, ref.size) == data
    finally:
        db.close()
