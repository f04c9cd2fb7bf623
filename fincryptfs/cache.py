"""The local write-back cache: one plaintext file per inode in a 0700 folder, and whole packs in ``packs/``.

Writes land here and are uploaded from here; reads are served from here. A stored file whose cache copy is
missing (evicted, or a tree restored on a new machine) is fetched *whole* from its first open with
``ObjectStore.fetch_to_file`` (to a temporary name, renamed into place when complete; readers may use the
front of that partial copy meanwhile, see ``fs._Filling``), rather than range by range: the FUSE handlers then
only ever touch local files, editors and tools that read a file several times pay the network once, and a
partial fetch is never mistaken for the file.

The size limit is soft: only files whose upload completed (state ``stored``) and that nobody has open may be
evicted, least recently used first, so the cache can exceed the limit while uploads are pending.

A small file that was stored packed (``fincryptfs.packs``) and is not cached is read straight from its pack's
cached copy, ``packs/<pack id>`` (fetched whole once, complete or absent like every cache file): reading a
folder of 2,000 small files then creates a few dozen files instead of 2,000, which the kernel spent a sixth of
a cold read's CPU on. Pack copies are evicted like files, when no open file reads from them. A member is copied
out into its own cache file only when it is opened for writing. A deleted or replaced member's bytes are zeroed in the
copy (``scrub_member``, driven by ``meta.stale_members``), and the copy of a pack no file references is
removed (``drop_dead_packs``), so old plaintext does not linger in the cache.

The disk's last few percent are not for file data (``has_room``): writes into the mount fail with ENOSPC, and
small files are not staged into a pack, while only ``reserve_for`` bytes are free, so the tree database
can still record a deletion, a rename or an upload's result when the disk is otherwise full. Without that room,
even deleting a file to make space failed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import trio

PACKS = "packs"  # the folder of whole cached packs
RESERVE_MAX = 64 * 2**20
RESERVE_FRACTION = 20  # 1/20 of the file system, at most RESERVE_MAX


def reserve_for(total_bytes: int) -> int:
    """Bytes of a file system of ``total_bytes`` kept free of file data (for the tree database and logs)."""
    return min(RESERVE_MAX, total_bytes // RESERVE_FRACTION)


def has_room(path: Path, nbytes: int) -> bool:
    """Whether ``nbytes`` more on the file system of ``path`` leave its reserve (``reserve_for``) untouched."""
    disk = os.statvfs(path)
    return disk.f_bavail * disk.f_frsize - nbytes >= reserve_for(disk.f_blocks * disk.f_frsize)


def used_bytes(root: Path) -> int:
    """Bytes of the cached files and packs under ``root`` (``fincryptfs status``; 0 if there is no cache)."""
    total = 0
    for folder in (root, root / PACKS):
        if folder.is_dir():
            total += sum(e.stat().st_size for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
    return total


class CacheDir:
    """Paths, use times and eviction of the cached files; fetching is delegated to a callable."""

    def __init__(self, root: Path, limit_bytes: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self.root = root
        self._prefix = f"{root}{os.sep}"  # str paths for the per-request checks: pathlib costs microseconds each
        self.limit_bytes = limit_bytes
        self.maybe_over_limit = True  # set when files were added; the upload queue's evictor resets it
        self.packs = root / PACKS
        self.packs.mkdir(exist_ok=True)
        self._last_used: dict[int, float] = {}
        self._pack_last_used: dict[str, float] = {}
        self._locks: dict[int, trio.Lock] = {}
        # bytes in the cache at the last scan plus every byte added since (an upper bound), None if unknown:
        # the evictor lists the folder only when this may exceed the limit, not every time the tree changes
        self._used_bound: int | None = None

    def added(self, nbytes: int) -> None:
        """``nbytes`` of file data were written into the cache (overwrites count again: a bound is enough)."""
        if self._used_bound is not None:
            self._used_bound += nbytes

    def forget_usage(self) -> None:
        """Files appeared that ``added`` did not see (a fetch, carved pack-mates): the next check lists them."""
        self._used_bound = None

    def may_exceed_limit(self) -> bool:
        return self._used_bound is None or self._used_bound > self.limit_bytes

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more of file data leave the disk's reserve untouched."""
        return has_room(self.root, nbytes)

    def path(self, ino: int) -> Path:
        return self.root / str(ino)

    def has(self, ino: int) -> bool:
        return os.path.exists(self._prefix + str(ino))

    def open_cached(self, ino: int) -> int | None:
        """A read-only descriptor on the file's cache copy, or None if it has none."""
        try:
            return os.open(self._prefix + str(ino), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def touch(self, ino: int) -> None:
        self._last_used[ino] = time.monotonic()

    def pack_path(self, pack_id: str) -> Path:
        if not pack_id or pack_id.strip("0123456789abcdef"):
            raise ValueError(f"not a pack id: {pack_id[:80]!r}")  # the tree names packs by hex ids only
        return self.packs / pack_id

    def open_pack(self, pack_id: str) -> int | None:
        """A read-only descriptor on the cached copy of a whole pack, or None if there is none."""
        try:
            return os.open(self.pack_path(pack_id), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def has_pack(self, pack_id: str) -> bool:
        return self.pack_path(pack_id).exists()

    def touch_pack(self, pack_id: str) -> None:
        self._pack_last_used[pack_id] = time.monotonic()

    def scrub_member(self, pack_id: str, offset: int, size: int) -> None:
        """Overwrite a deleted file's bytes in the cached copy of its pack with zeros: its plaintext must not
        outlive it in the cache while its pack-mates are still read from that copy."""
        try:
            fd = os.open(self.pack_path(pack_id), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            end = min(offset + size, os.fstat(fd).st_size)
            zeros = bytes(min(size, 2**20))
            while offset < end:
                offset += os.pwrite(fd, zeros[:end - offset], offset)
        finally:
            os.close(fd)

    def drop_dead_packs(self, live: Collection[str], in_use: Collection[str]) -> int:
        """Remove the cached copies of packs no file references any more (``live`` are those some file does),
        unless an open file still reads one; returns how many. Lists ``packs/`` only: a few dozen names."""
        dropped = 0
        for entry in os.scandir(self.packs):
            name = entry.name
            if not name.startswith(".") and name not in live and name not in in_use:
                os.unlink(entry.path)
                self._pack_last_used.pop(name, None)
                dropped += 1
        return dropped

    def remove(self, ino: int) -> None:
        self.path(ino).unlink(missing_ok=True)
        self._last_used.pop(ino, None)

    def remove_leftovers(self) -> None:
        """Remove the temporary files of fetches and copies a crash interrupted (they are never complete), here
        and among the packs. Called at start, before any fetch; lists names only (no ``stat`` per file)."""
        for folder in (self.root, self.packs):
            for entry in os.scandir(folder):
                if entry.name.startswith(".fetch-") or entry.name.endswith(".part"):
                    os.unlink(entry.path)

    def size(self, ino: int) -> int | None:
        """Size of the inode's cache file, None if it has none."""
        try:
            return os.stat(self.path(ino)).st_size
        except FileNotFoundError:
            return None

    def evict(self, evictable: Collection[int], in_use: Collection[int], packs_in_use: Collection[str] = ()
              ) -> int:
        """Remove least recently used evictable files and packs until the cache fits its limit; returns bytes
        freed. A pack copy is evictable whenever no open file reads from it (``packs_in_use``)."""
        entries: list[tuple[float, int | str, int]] = []
        total = 0
        now = time.time()
        for entry in os.scandir(self.root):
            if not entry.name.isdigit():
                continue
            st = entry.stat()
            total += st.st_size
            ino = int(entry.name)
            if ino in evictable and ino not in in_use:
                entries.append((self._last_used.get(ino, st.st_mtime - now), ino, st.st_size))
        for entry in os.scandir(self.packs):
            if entry.name.startswith("."):
                continue
            st = entry.stat()
            total += st.st_size
            if entry.name not in packs_in_use:
                entries.append((self._pack_last_used.get(entry.name, st.st_mtime - now), entry.name, st.st_size))
        freed = 0
        for _, key, size in sorted(entries, key=lambda e: e[0]):
            if total - freed <= self.limit_bytes:
                break
            if isinstance(key, int):
                self.remove(key)
            else:
                (self.packs / key).unlink(missing_ok=True)
                self._pack_last_used.pop(key, None)
            freed += size
        self._used_bound = total - freed
        return freed

    async def ensure(self, ino: int, fetch: Callable[[Path], Awaitable[None]]) -> Path:
        """The cache file of ``ino``, calling ``fetch(dest)`` first if it is missing (one fetch per inode)."""
        lock = self._locks.setdefault(ino, trio.Lock())
        async with lock:
            path = self.path(ino)
            if not path.exists():
                await fetch(path)
                self.maybe_over_limit = True
                self.forget_usage()
            self.touch(ino)
            return path
