"""Small files packed into shared objects: one network object for many files, and back.

Each object costs a placement, n share uploads and a commit, whatever its size, so a tree of small files spent
all its time in round trips (about 20 files/s). The upload queue therefore gathers pending files of at most
``pack_threshold`` bytes into a *pack*: a staging file that concatenates their cache copies (up to
``pack_size`` bytes or ``pack_max_files`` files), stored with ``ObjectStore.put_file`` like any file. Each
member's inode then references (pack id, offset, size) (``meta.PackRef``); a member whose file changed while
the pack was uploading is simply not referenced (``meta.finish_pack`` checks versions).

Reading a packed file whose cache copy is missing fetches the *whole* pack once (packs are small) and carves
every member still referencing it into the cache, so a cold read of a folder of small files costs one network
read per pack, not per file. A pack larger than WHOLE_PACK_FETCH_MAX is read by range instead.

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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import trio

from . import meta
from .objectstore import ObjectStore, StoredObject
from .uploader import pwrite_all

WHOLE_PACK_FETCH_MAX = 64 * 2**20
_COPY_CHUNK = 2**20
PREFETCH_CONCURRENCY = 2
PREFETCH_QUEUE = 256

log = logging.getLogger(__name__)


def packs_to_prefetch(members: Iterable[tuple[int, str | None]], cached: Callable[[int], bool], limit: int
                      ) -> list[tuple[int, meta.PackRef]]:
    """(ino, ref) of one uncached member per pack, for at most ``limit`` packs, in listing order.

    ``members`` are (ino, object JSON) of a folder's stored files; only packed ones small enough to fetch whole
    count (a larger pack is read by range when a member is opened).
    """
    chosen: dict[str, tuple[int, meta.PackRef]] = {}
    for ino, object_json in members:
        if len(chosen) >= limit:
            break
        ref = meta.pack_ref(object_json)
        if ref is not None and ref.pack_id not in chosen and not cached(ino):
            chosen[ref.pack_id] = (ino, ref)
    return list(chosen.values())


def build_pack(sources: Sequence[Path], dest: Path) -> list[tuple[int, int] | None]:
    """Concatenate ``sources`` into ``dest`` (mode 0600); (offset, size) of each, None for a missing source.

    Blocking: run it in a worker thread.
    """
    placed: list[tuple[int, int] | None] = []
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        offset = 0
        for source in sources:
            try:
                src = os.open(source, os.O_RDONLY)
            except FileNotFoundError:
                placed.append(None)
                continue
            try:
                start = offset
                while chunk := os.read(src, _COPY_CHUNK):
                    pwrite_all(fd, chunk, offset)
                    offset += len(chunk)
            finally:
                os.close(src)
            placed.append((start, offset - start))
    finally:
        os.close(fd)
    return placed


def _carve(pack_file: Path, pieces: Sequence[tuple[int, int, Path]]) -> None:
    """Copy each (offset, size) of ``pack_file`` to its temporary path. Blocking: run it in a worker thread."""
    fd = os.open(pack_file, os.O_RDONLY)
    try:
        for offset, size, tmp in pieces:
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise OSError(f"pack file {pack_file.name} is shorter than its member at {offset}+{size}")
            with open(tmp, "wb") as f:
                f.write(data)
    finally:
        os.close(fd)


class PackReader:
    """Fetches packed files into the cache: one whole-pack fetch serves every member still missing."""

    def __init__(self, *, db: sqlite3.Connection, store: ObjectStore, cache_root: Path) -> None:
        self.db = db
        self.store = store
        self.cache_root = cache_root
        self._locks: dict[str, trio.Lock] = {}

    async def fetch(self, ref: meta.PackRef, dest: Path) -> None:
        """Write the packed file ``ref`` to ``dest`` (complete or not at all), carving its pack-mates too."""
        lock = self._locks.setdefault(ref.pack_id, trio.Lock())
        async with lock:
            if dest.exists():  # carved while we waited for the pack
                return
            pack_json = meta.pack_object(self.db, ref.pack_id)
            if pack_json is None:
                raise FileNotFoundError(f"pack {ref.pack_id[:16]} is not in the tree")
            pack = StoredObject.from_json(json.loads(pack_json))
            if pack.size > WHOLE_PACK_FETCH_MAX:
                await self._fetch_range(pack, ref, dest)
            else:
                await self._fetch_whole(pack, ref, dest)
        if not lock.locked() and not lock.statistics().tasks_waiting:
            self._locks.pop(ref.pack_id, None)

    async def _fetch_range(self, pack: StoredObject, ref: meta.PackRef, dest: Path) -> None:
        data = await self.store.read_range(pack, ref.offset, ref.size)
        if len(data) != ref.size:
            raise OSError(f"pack {ref.pack_id[:16]} ended before its member at {ref.offset}+{ref.size}")
        tmp = dest.with_name(f".fetch-{dest.name}")
        await trio.to_thread.run_sync(tmp.write_bytes, data)
        os.rename(tmp, dest)

    async def prefetch(self, ref: meta.PackRef, dest: Path) -> None:
        """Read ahead: like ``fetch``, but nobody asked for ``dest`` yet, so it is carved only while still wanted
        (no cache copy appeared, same content) like every other pack-mate; nothing if the pack is too large."""
        lock = self._locks.setdefault(ref.pack_id, trio.Lock())
        async with lock:
            if dest.exists():
                return
            pack_json = meta.pack_object(self.db, ref.pack_id)
            if pack_json is None:
                return
            pack = StoredObject.from_json(json.loads(pack_json))
            if pack.size <= WHOLE_PACK_FETCH_MAX:
                await self._fetch_whole(pack, ref, dest, requested=False)
        if not lock.locked() and not lock.statistics().tasks_waiting:
            self._locks.pop(ref.pack_id, None)

    async def _fetch_whole(self, pack: StoredObject, ref: meta.PackRef, dest: Path, *, requested: bool = True
                           ) -> None:
        pack_file = self.cache_root / f".fetch-pack-{ref.pack_id[:32]}"
        try:
            await self.store.fetch_to_file(pack, pack_file)
            # every member still referencing this pack and not cached, as of now (the tree may change during
            # the copy: each is checked again just before its rename, with no await in between)
            wanted = {dest: ref}
            for ino, object_json in meta.packed_files(self.db, ref.pack_id):
                path = self.cache_root / str(ino)
                if path != dest and not path.exists():
                    member = meta.pack_ref(object_json)
                    if member is not None:
                        wanted[path] = member
            pieces = [(m.offset, m.size, p.with_name(f".fetch-{p.name}")) for p, m in wanted.items()]
            try:
                await trio.to_thread.run_sync(_carve, pack_file, pieces)
                for (path, member), (_, _, tmp) in zip(wanted.items(), pieces, strict=True):
                    if (path == dest and requested) or self._still_wanted(path, member):
                        os.rename(tmp, path)
            finally:
                for _, _, tmp in pieces:
                    tmp.unlink(missing_ok=True)
        finally:
            pack_file.unlink(missing_ok=True)

    def _still_wanted(self, path: Path, member: meta.PackRef) -> bool:
        """A pack-mate is carved only if it still has exactly this content and no cache copy appeared."""
        ino = int(path.name)
        inode = meta.find(self.db, ino)
        return (inode is not None and inode.state == meta.STORED and inode.parent is not None
                and meta.pack_ref(inode.object) == member and not path.exists())


class Prefetcher:
    """Background whole-pack fetches asked for by folder listings: bounded queue, a few at a time, best effort.

    ``offer`` never blocks the FUSE handler (a full queue drops the offer); a failed read-ahead is logged and
    forgotten, as the open that really needs the file will fetch it and report any error.
    """

    def __init__(self, reader: PackReader, cache_path: Callable[[int], Path], limit: int,
                 on_fetched: Callable[[], None] = lambda: None) -> None:
        self.reader = reader
        self.cache_path = cache_path
        self.limit = limit
        self.on_fetched = on_fetched  # files were carved into the cache
        self._send, self._receive = trio.open_memory_channel[tuple[int, meta.PackRef]](PREFETCH_QUEUE)
        self._queued: set[str] = set()

    def offer(self, members: Iterable[tuple[int, str | None]]) -> None:
        if self.limit <= 0:
            return
        for ino, ref in packs_to_prefetch(members, lambda i: self.cache_path(i).exists(), self.limit):
            if ref.pack_id in self._queued:
                continue
            try:
                self._send.send_nowait((ino, ref))
            except trio.WouldBlock:
                return
            self._queued.add(ref.pack_id)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(PREFETCH_CONCURRENCY):
                nursery.start_soon(self._work)

    async def _work(self) -> None:
        async for ino, ref in self._receive:
            try:
                await self.reader.prefetch(ref, self.cache_path(ino))
                self.on_fetched()
            except Exception as exc:  # noqa: BLE001 - read-ahead is best effort; the real open reports errors
                log.info("read-ahead of pack %s… failed: %s", ref.pack_id[:16], exc)
            finally:
                self._queued.discard(ref.pack_id)
