"""An object the mediator committed but the client never recorded is deleted, not stored (and paid for) for ever.

Real daemons: the upload commits at the mediator, then the client "dies" before the tree records the object
(the transaction after the commit never runs). The next upload worker's start turns the note taken before the
commit into a deletion, and the queue's deleter releases the object at the mediator.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from clientdata_support import open_store
from netfixtures import start_network

from fincryptfs import meta
from fincryptfs.cache import CacheDir
from fincryptfs.objectstore import ObjectStore
from fincryptfs.rpc import PeerError
from fincryptfs.uploadqueue import UploadQueue


def queue_for(db: sqlite3.Connection, store: ObjectStore, tmp_path: Path) -> UploadQueue:
    return UploadQueue(db=db, store=store, cache=CacheDir(tmp_path / "cache", 2**30), master_key=bytes(32),
                       spool_dir=tmp_path / "spool")


async def run_deletions(queue: UploadQueue) -> None:
    """The queue's deleter, until no deletion is left."""
    async with trio.open_nursery() as inner:
        inner.start_soon(queue._deleter)
        with trio.fail_after(20):
            while meta.pending_deletes(queue.db):
                await trio.sleep(0.1)
        inner.cancel_scope.cancel()


@asynccontextmanager
async def tree_and_store(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[tuple[sqlite3.Connection,
                                                                                     ObjectStore]]:
    """A client's tree database and object store on a fresh network of six nodes."""
    net = await start_network(tmp_path, nursery, nodes=6)
    db = meta.connect(tmp_path / "meta.db")
    try:
        async with open_store(net.mediator_url, tmp_path) as store:
            yield db, store
    finally:
        db.close()


async def test_an_object_committed_before_a_crash_is_released_at_the_next_start(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    async with tree_and_store(tmp_path, nursery) as (db, store):
        src = tmp_path / "file"
        src.write_bytes(os.urandom(200_000))
        obj = await store.put_file(src, before_commit=lambda object_id: meta.note_commit(db, object_id))
        assert (await store.health(obj.object_id))["total"] == 6  # committed and stored
        # ... and the client is killed here: the tree never records the object

        meta.resume_uploads(db)  # the next upload worker's start
        assert meta.pending_deletes(db) == 1
        await run_deletions(queue_for(db, store, tmp_path))
        with pytest.raises(PeerError) as gone:
            await store.health(obj.object_id)
        assert gone.value.status == 404



async def test_an_object_placed_before_a_crash_is_released_at_the_next_start(
        tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload worker killed while its shares stream out releases nothing: the object stayed placed at the
    mediator, its shares on the nodes, until the mediator's sweep a day later (one per kill -9 of the worker,
    found on a devnet). The note taken before the place request turns into a deletion at the next start."""
    from fincryptfs import uploader
    from fincryptfs.core.messages import PlaceRequest

    async def killed(*args: object, **kwargs: object) -> None:  # a dead process releases nothing
        pass
    monkeypatch.setattr(uploader, "_release_quietly", killed)
    async with tree_and_store(tmp_path, nursery) as (db, store):
        src = tmp_path / "file"
        src.write_bytes(os.urandom(200_000))
        placed: list[str] = []
        place = store.mediator.place

        with trio.CancelScope() as death:
            async def place_then_die(request: PlaceRequest) -> object:
                await place(request)
                placed.append(request.object_id)
                death.cancel()  # the process dies here, its shares on their way
                await trio.sleep_forever()
            monkeypatch.setattr(store.mediator, "place", place_then_die)
            await store.put_file(src, before_place=lambda object_id: meta.note_placing(db, object_id),
                                 before_commit=lambda object_id: meta.note_commit(db, object_id))
        monkeypatch.undo()
        assert death.cancelled_caught
        assert (await store.health(placed[0]))["state"] != "committed"  # the mediator holds it, placed
        assert meta.pending_deletes(db) == 0  # the note waits for the next start

        meta.resume_uploads(db)  # the next upload worker's start
        assert meta.pending_deletes(db) == 1
        await run_deletions(queue_for(db, store, tmp_path))
        with pytest.raises(PeerError) as gone:
            await store.health(placed[0])
        assert gone.value.status == 404

async def test_snapshots_noted_before_a_crash_are_kept_if_the_pointer_names_them(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    from fincryptfs.manifest import current_pointer, publish_snapshot

    async with tree_and_store(tmp_path, nursery) as (db, store):
        snap = tmp_path / "snapshot.db"
        snap.write_bytes(os.urandom(50_000))
        master = bytes(32)

        def note(object_id: str) -> None:
            meta.note_commit(db, object_id, snapshot=True)
        # killed after the pointer update, before the note was settled: the pointer names it
        assert await publish_snapshot(store, master, snap, 0, before_commit=note) == 1
        named = meta.snapshot_commits(db)
        # killed after the commit, before the pointer update: nobody will ever read this one
        orphan = await store.put_file(snap, before_commit=note)
        assert len(named) == 1 and meta.snapshot_commits(db) == [*named, orphan.object_id]
        meta.resume_uploads(db)  # file uploads' notes only: snapshots are settled against the pointer
        assert meta.pending_deletes(db) == 0

        queue = queue_for(db, store, tmp_path)
        await queue._settle_snapshots()
        assert meta.snapshot_commits(db) == [] and meta.pending_deletes(db) == 1
        await run_deletions(queue)
        with pytest.raises(PeerError) as gone:
            await store.health(orphan.object_id)
        assert gone.value.status == 404
        pointer = await current_pointer(store)
        assert pointer is not None and pointer.object_id == named[0]
        assert (await store.health(named[0]))["total"] == 6


async def test_an_object_whose_placement_lands_after_its_release_is_released_anyway(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """An upload cancelled while its place request is in flight releases the object at once; the mediator may
    handle that release before the place request (two connections). The release asks again meanwhile."""
    from fincryptfs.core.messages import PlaceRequest, ShareSpec
    from fincryptfs.uploader import PlaceState, Source, _release_quietly

    async with tree_and_store(tmp_path, nursery) as (_, store):
        src = tmp_path / "file"
        src.write_bytes(os.urandom(100_000))
        source = Source.open(src, segment_size=store.segment_size, k=store.k, n=store.n)
        try:
            with trio.fail_after(1):  # never placed: nothing to release, no request made
                await _release_quietly(store, source.object_id, PlaceState(), timeout=30)
            request = PlaceRequest(source.object_id, source.layout, tuple(
                ShareSpec(i, source.share_ids[i], source.layout.share_size, None) for i in range(store.n)))
            async with trio.open_nursery() as inner:
                inner.start_soon(_release_quietly, store, source.object_id, PlaceState(unanswered=True), 10)
                await trio.sleep(0.5)  # the release was answered "no such object" by now
                await store.mediator.place(request)  # ... and the place request lands only now
            with pytest.raises(PeerError) as gone:
                await store.health(source.object_id)
            assert gone.value.status == 404
        finally:
            source.close()


async def test_put_records_a_large_file_only_if_its_source_did_not_change(tmp_path: Path,
                                                                          nursery: trio.Nursery) -> None:
    """``put``'s uploads straight from the source: a file changed or removed after the walk saw it is reported
    in words and not recorded, and its object (committed anyway) is deleted."""
    from fincryptfs.put import DirectFile, DirectUploads

    async with tree_and_store(tmp_path, nursery) as (db, store):
        direct = DirectUploads(store, db, CacheDir(tmp_path / "cache", 2**30), lambda st: (0, 0))
        src = tmp_path / "big"
        src.write_bytes(os.urandom(300_000))
        seen = os.lstat(src)
        src.write_bytes(os.urandom(300_001))  # changed after the walk saw it
        error = await direct._store(DirectFile(src, seen, meta.ROOT_INO, b"big", None))
        assert error is not None and "changed while it was being stored; run put again" in error
        assert list(meta.files(db)) == [] and meta.pending_deletes(db) == 1  # the object it stored goes
        await run_deletions(queue_for(db, store, tmp_path))

        gone = tmp_path / "gone"
        error = await direct._store(DirectFile(gone, seen, meta.ROOT_INO, b"gone", None))
        assert error is not None and error.startswith("not stored:") and "No such file" in error

        same = os.lstat(src)
        assert await direct._store(DirectFile(src, same, meta.ROOT_INO, b"big", None)) is None
        [recorded] = list(meta.files(db))
        assert (recorded.state, recorded.size, direct.files) == (meta.STORED, 300_001, 1)
        assert meta.pending_deletes(db) == 0


async def test_put_records_packed_files_only_if_their_sources_did_not_change(tmp_path: Path,
                                                                             nursery: trio.Nursery) -> None:
    """Small files packed straight from their sources: one changed or removed after the walk saw it is
    reported and not recorded, the others are, at their own ranges of the pack; a pack none of whose files
    could be recorded is deleted."""
    import json

    from fincryptfs.objectstore import StoredObject
    from fincryptfs.put import DirectFile, DirectUploads

    async with tree_and_store(tmp_path, nursery) as (db, store):
        direct = DirectUploads(store, db, CacheDir(tmp_path / "cache", 2**30), lambda st: (0, 0))
        contents = {f"f{i}": os.urandom(1000 + 500 * i) for i in range(4)}
        items = []
        for name, data in contents.items():
            (tmp_path / name).write_bytes(data)
            items.append(DirectFile(tmp_path / name, os.lstat(tmp_path / name), meta.ROOT_INO, name.encode(), None))
        (tmp_path / "f1").write_bytes(os.urandom(1500))  # changed after the walk saw it (same size)
        os.utime(tmp_path / "f1", ns=(1, 1))
        (tmp_path / "f2").unlink()  # removed
        errors = await direct._store_pack(items)
        assert len(errors) == 2 and all("changed while it was being stored; run put again" in e for e in errors)
        assert {e.split(":")[0] for e in errors} == {str(tmp_path / "f1"), str(tmp_path / "f2")}
        recorded = {f.name: f for f in meta.files(db)}
        assert set(recorded) == {b"f0", b"f3"} and direct.files == 2
        assert meta.packs(db)[0][1] == 2 and meta.pending_deletes(db) == 0
        for name in ("f0", "f3"):
            ref = meta.pack_ref(recorded[name.encode()].object)
            assert ref is not None and recorded[name.encode()].state == meta.STORED
            pack_json = meta.pack_object(db, ref.pack_id)
            assert pack_json is not None
            obj = StoredObject.from_json(json.loads(pack_json))
            assert await store.read_range(obj, ref.offset, ref.size) == contents[name]

        (tmp_path / "f0").write_bytes(b"new")
        errors = await direct._store_pack([DirectFile(tmp_path / "f0", os.lstat(tmp_path / "f3"), meta.ROOT_INO,
                                                      b"f5", None)])
        assert len(errors) == 1 and meta.pending_deletes(db) == 1  # nothing recorded: the pack goes
        await run_deletions(queue_for(db, store, tmp_path))
