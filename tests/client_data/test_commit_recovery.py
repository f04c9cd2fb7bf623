"""An object the mediator committed but the client never recorded is deleted, not stored (and paid for) for ever.

Real daemons: the upload commits at the mediator, then the client "dies" before the tree records the object
(the transaction after the commit never runs). The next upload worker's start turns the note taken before the
commit into a deletion, and the queue's deleter releases the object at the mediator.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from clientdata_support import open_store
from netfixtures import start_network

from fincryptfs import meta
from fincryptfs.cache import CacheDir
from fincryptfs.rpc import PeerError
from fincryptfs.uploadqueue import UploadQueue


async def test_an_object_committed_before_a_crash_is_released_at_the_next_start(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    db = meta.connect(tmp_path / "meta.db")
    try:
        async with open_store(net.mediator_url, tmp_path) as store:
            src = tmp_path / "file"
            src.write_bytes(os.urandom(200_000))
            obj = await store.put_file(src, before_commit=lambda object_id: meta.note_commit(db, object_id))
            assert (await store.health(obj.object_id))["total"] == 6  # committed and stored
            # ... and the client is killed here: the tree never records the object

            meta.resume_uploads(db)  # the next upload worker's start
            assert meta.pending_deletes(db) == 1
            queue = UploadQueue(db=db, store=store, cache=CacheDir(tmp_path / "cache", 2**30),
                                master_key=bytes(32), spool_dir=tmp_path / "spool")
            async with trio.open_nursery() as inner:
                inner.start_soon(queue._deleter)
                with trio.fail_after(20):
                    while meta.pending_deletes(db):
                        await trio.sleep(0.1)
                inner.cancel_scope.cancel()
            with pytest.raises(PeerError) as gone:
                await store.health(obj.object_id)
            assert gone.value.status == 404
    finally:
        db.close()
