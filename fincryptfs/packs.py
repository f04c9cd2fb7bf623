"""Small files packed into shared objects: one network object for many files, and back.

Each object costs a placement, n share uploads and a commit, whatever its size, so a tree of small files spent
all its time in round trips (about 20 files/s). The upload queue therefore gathers pending files of at most
``pack_threshold`` bytes into a *pack*: one object whose plaintext is the concatenation of their cache copies
(up to ``pack_size`` bytes or ``pack_max_files`` files), read straight from those files as it is encoded
(``ObjectStore.put_members``; packs used to be staged in a spool file first, which cost a copy of every byte,
50-70 ms per 16 MiB pack on the worker's critical path, and temporary disk space a full disk did not have).
Each member's inode then references (pack id, offset, size) (``meta.PackRef``); a member whose file changed
while the pack was uploading is simply not referenced (``meta.finish_pack`` checks versions), nor is one whose
cache file was gone or short when read (``MembersReader.damaged``).

Reading a packed file whose cache copy is missing fetches the *whole* pack once (packs are small) into the
cache's ``packs/`` folder, and the file is read from there (``fs``: a handle on the pack copy, at the member's
offset), so a cold read of a folder of small files costs one network read and one local file per pack, not per
file. The ranges of members released since (``meta.stale_ranges``) are zeroed in the fetched copy before it
is renamed into place (and so are the ranges of members that changed while the pack was uploaded, never
referenced: ``meta.finish_pack``): a deleted or replaced file's plaintext never comes back into the cache. A
member is copied out of the pack into its own cache file only when opened for writing. A pack larger than
WHOLE_PACK_FETCH_MAX is read by range instead.

Listing a folder reads ahead (``Prefetcher``, ``FINCRYPT_PREFETCH_PACKS``): the packs of its files that are not
cached are fetched in the background, a few at a time, so reading a folder of small files (cp -r, tar, find
-exec) overlaps the network with the FUSE round trips instead of stopping at every new pack.

Trade-off: a pack stays in the network until its last member is overwritten or deleted (its dead bytes are
still stored and paid for); nothing repacks yet.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from . import meta
from .cache import zero_range
from .objectstore import ObjectStore, StoredObject

WHOLE_PACK_FETCH_MAX = 64 * 2**20
PREFETCH_CONCURRENCY = 2
PREFETCH_QUEUE = 256

log = logging.getLogger(__name__)


def packs_to_prefetch(members: Iterable[tuple[int, str | None]], cached: Callable[[int, meta.PackRef], bool],
                      limit: int) -> list[meta.PackRef]:
    """The packs of ``members`` worth reading ahead, at most ``limit``, in listing order.

    ``members`` are (ino, object JSON) of a folder's stored files; a pack is judged by its first member listed
    (``cached(ino, ref)``: that file or its whole pack is local), so a folder costs one check per pack.
    """
    seen: set[str] = set()
    chosen: list[meta.PackRef] = []
    for ino, object_json in members:
        if len(chosen) >= limit:
            break
        if object_json is None or '"pack"' not in object_json:  # cheaper than parsing every file's JSON
            continue
        ref = meta.pack_ref(object_json)
        if ref is None or ref.pack_id in seen:
            continue
        seen.add(ref.pack_id)
        if not cached(ino, ref):
            chosen.append(ref)
    return chosen


def _copy_member(pack_file: Path, offset: int, size: int, dest: Path) -> None:
    """Copy ``size`` bytes at ``offset`` of ``pack_file`` to ``dest`` (``_place``). Blocking: run it in a worker
    thread."""
    with open(pack_file, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"cached pack {pack_file.name[:16]}… is shorter than its member at {offset}+{size}")
    _place(data, dest)


def _place(data: bytes, dest: Path) -> None:
    """Write ``data`` as ``dest`` (via a temporary name: complete or absent), unless ``dest`` exists: a cache
    copy that appeared while the pack arrived is a newer version (an ``O_TRUNC`` open or a truncate to 0 does
    not wait for the fetch), often the only copy of a closed file not uploaded yet; renamed over, it was lost
    and its upload stored the old bytes. (A link, not a rename, so the check and the move are one step.)"""
    tmp = dest.with_name(f".fetch-{dest.name}")
    with open(tmp, "wb") as out:
        out.write(data)
    try:
        os.link(tmp, dest)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _zero_ranges(path: Path, ranges: Iterable[tuple[int, int]]) -> None:
    """Zero the released members' ranges in a pack copy just fetched (blocking: run it in a worker thread)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for offset, size in ranges:
            zero_range(fd, offset, size)
    finally:
        os.close(fd)


class PackReader:
    """Fetches whole packs into the cache (one fetch per pack, however many members ask at once), and copies a
    member out of its pack when it needs a cache file of its own."""

    def __init__(self, *, db: sqlite3.Connection, store: ObjectStore, pack_path: Callable[[str], Path]) -> None:
        self.db = db
        self.store = store
        self.pack_path = pack_path
        self._locks: dict[str, trio.Lock] = {}

    async def pack_file(self, ref: meta.PackRef) -> Path | None:
        """The cached copy of ``ref``'s whole pack, fetched first if missing; None if the pack is too large to
        fetch whole (read by range instead). FileNotFoundError if the tree no longer has the pack."""
        path = self.pack_path(ref.pack_id)
        if path.exists():
            return path
        lock = self._locks.setdefault(ref.pack_id, trio.Lock())
        try:
            async with lock:
                if path.exists():  # fetched while we waited
                    return path
                pack_json = meta.pack_object(self.db, ref.pack_id)
                if pack_json is None:
                    raise FileNotFoundError(f"pack {ref.pack_id[:16]} is not in the tree")
                pack = StoredObject.from_json(json.loads(pack_json))
                if pack.size > WHOLE_PACK_FETCH_MAX:
                    return None
                part = path.with_name(f".fetch-{path.name}")  # complete, and without released members, or absent
                await self.store.fetch_to_file(pack, part)
                stale = meta.stale_ranges(self.db, ref.pack_id)
                if stale:
                    await trio.to_thread.run_sync(_zero_ranges, part, stale)
                os.rename(part, path)
                if meta.pack_object(self.db, ref.pack_id) is None:
                    # its last member went while it arrived: the evictor's sweep of dead copies may have looked
                    # already, and this copy (nothing but deleted files) would stay until the tree changed again
                    path.unlink(missing_ok=True)
                    raise FileNotFoundError(f"pack {ref.pack_id[:16]} is not in the tree")
                # members released while the ranges were zeroed: the evictor found no copy to scrub then
                late = set(meta.stale_ranges(self.db, ref.pack_id)) - set(stale)
                if late:
                    await trio.to_thread.run_sync(_zero_ranges, path, sorted(late))
                return path
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(ref.pack_id, None)

    async def fetch(self, ref: meta.PackRef, dest: Path) -> None:
        """Write the packed file ``ref`` to ``dest`` (complete or not at all, never over a ``dest`` written
        meanwhile): from its cached pack, fetched whole first if need be, or by range from the network for a
        pack too large to fetch whole."""
        pack_file = await self.pack_file(ref)
        if pack_file is not None:
            await trio.to_thread.run_sync(_copy_member, pack_file, ref.offset, ref.size, dest)
            return
        pack_json = meta.pack_object(self.db, ref.pack_id)
        if pack_json is None:
            raise FileNotFoundError(f"pack {ref.pack_id[:16]} is not in the tree")
        data = await self.store.read_range(StoredObject.from_json(json.loads(pack_json)), ref.offset, ref.size)
        if len(data) != ref.size:
            raise OSError(f"pack {ref.pack_id[:16]} ended before its member at {ref.offset}+{ref.size}")
        await trio.to_thread.run_sync(_place, data, dest)


class Prefetcher:
    """Background whole-pack fetches asked for by folder listings: bounded queue, a few at a time, best effort.

    ``offer`` never blocks the FUSE handler (a full queue drops the offer); a failed read-ahead is logged and
    forgotten, as the open that really needs the file will fetch it and report any error.
    """

    def __init__(self, reader: PackReader, cached: Callable[[int, meta.PackRef], bool], limit: int,
                 on_fetched: Callable[[], None] = lambda: None) -> None:
        self.reader = reader
        self.cached = cached  # (ino, ref): that file, or its whole pack, is in the cache
        self.limit = limit
        self.on_fetched = on_fetched  # a pack was added to the cache
        self._send, self._receive = trio.open_memory_channel[meta.PackRef](PREFETCH_QUEUE)
        self._queued: set[str] = set()

    def offer(self, members: Iterable[tuple[int, str | None]]) -> None:
        if self.limit <= 0:
            return
        for ref in packs_to_prefetch(members, self.cached, self.limit):
            if ref.pack_id in self._queued:
                continue
            try:
                self._send.send_nowait(ref)
            except trio.WouldBlock:
                return
            self._queued.add(ref.pack_id)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(PREFETCH_CONCURRENCY):
                nursery.start_soon(self._work)

    async def _work(self) -> None:
        async for ref in self._receive:
            try:
                await self.reader.pack_file(ref)
                self.on_fetched()
            except Exception as exc:  # noqa: BLE001 - read-ahead is best effort; the real open reports errors
                log.info("read-ahead of pack %s… failed: %s", ref.pack_id[:16], exc)
            finally:
                self._queued.discard(ref.pack_id)
