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
from dataclasses import dataclass
from pathlib import Path

import trio

PACKS = "packs"  # the folder of whole cached packs
LOW_WATER = 0.9  # an eviction frees the cache down to this share of its limit
RESERVE_MAX = 64 * 2**20
RESERVE_FRACTION = 20  # 1/20 of the file system, at most RESERVE_MAX


@dataclass(frozen=True)
class CachedEntry:
    """A cached file (``key``: its inode number) or whole pack (``key``: its id) as listed."""

    key: int | str
    size: int
    mtime: float


def reserve_for(total_bytes: int) -> int:
    """Bytes of a file system of ``total_bytes`` kept free of file data (for the tree database and logs)."""
    return min(RESERVE_MAX, total_bytes // RESERVE_FRACTION)


def has_room(path: Path, nbytes: int) -> bool:
    """Whether ``nbytes`` more on the file system of ``path`` leave its reserve (``reserve_for``) untouched."""
    disk = os.statvfs(path)
    return disk.f_bavail * disk.f_frsize - nbytes >= reserve_for(disk.f_blocks * disk.f_frsize)


def zero_range(fd: int, offset: int, size: int) -> None:
    """Overwrite ``size`` bytes at ``offset`` of the open file ``fd`` with zeros (up to its end)."""
    end = min(offset + size, os.fstat(fd).st_size)
    zeros = bytes(min(size, 2**20))
    while offset < end:
        offset += os.pwrite(fd, zeros[:end - offset], offset)


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
        self._added_total = 0  # every byte ``added`` ever counted, and how often usage was forgotten: a listing
        self._forgotten = 0  # in another thread compares them before and after (``usage_mark``)

    def added(self, nbytes: int) -> None:
        """``nbytes`` of file data were written into the cache (overwrites count again: a bound is enough)."""
        self._added_total += nbytes
        if self._used_bound is not None:
            self._used_bound += nbytes

    def forget_usage(self) -> None:
        """Files appeared that ``added`` did not see (a fetch, carved pack-mates): the next check lists them."""
        self._used_bound = None
        self._forgotten += 1

    def may_exceed_limit(self) -> bool:
        return self._used_bound is None or self._used_bound > self.limit_bytes

    def restore_folders(self) -> bool:
        """Make the cache folder (0700) and ``packs/`` again if they were removed while mounted (a user clearing
        ``~/.cache``); True if they were missing. Without this, every create, fetch and eviction failed until
        the next mount."""
        if os.path.isdir(self.packs):
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.packs.mkdir(exist_ok=True)
        self._last_used.clear()
        self._pack_last_used.clear()
        self.forget_usage()
        return True

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

    def scrub_member(self, pack_id: str, offset: int, size: int) -> bool:
        """Overwrite a released file's bytes in the cached copy of its pack with zeros: its plaintext must not
        outlive it in the cache while its pack-mates are still read from that copy. False if there is no copy."""
        try:
            fd = os.open(self.pack_path(pack_id), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            zero_range(fd, offset, size)
        finally:
            os.close(fd)
        return True

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

    def usage_mark(self) -> tuple[int, int]:
        """Taken before a listing that runs while files are written (``finish_eviction`` accounts for them)."""
        return self._added_total, self._forgotten

    def list_entries(self) -> list[CachedEntry]:
        """Every cached file and whole pack, with its size and mtime. Only file system calls, no shared state:
        the evictor runs this in a worker thread (100,000 cached files took the mount's event loop half a
        second to list and ``stat``, during which every file operation waited)."""
        entries: list[CachedEntry] = []
        for entry in os.scandir(self.root):
            if entry.name.isdigit():
                st = entry.stat()
                entries.append(CachedEntry(int(entry.name), st.st_size, st.st_mtime))
        for entry in os.scandir(self.packs):
            if not entry.name.startswith("."):
                st = entry.stat()
                entries.append(CachedEntry(entry.name, st.st_size, st.st_mtime))
        return entries

    def choose_victims(self, entries: Collection[CachedEntry], evictable: Collection[int], in_use: Collection[int],
                       packs_in_use: Collection[str] = ()) -> list[CachedEntry]:
        """Least recently used first, the evictable files (uploaded, not open) and packs (no open file reads
        from them) to remove until the cache is down to ``LOW_WATER`` of its limit; none while it is within
        the limit. Going below the limit leaves room for the next writes: evicting down to the limit exactly
        made every later write overshoot it and the whole cache be listed again two seconds later."""
        total = sum(e.size for e in entries)
        if total <= self.limit_bytes:
            return []
        now = time.time()
        candidates: list[tuple[float, CachedEntry]] = []
        for e in entries:
            if isinstance(e.key, int):
                if e.key in evictable and e.key not in in_use:
                    candidates.append((self._last_used.get(e.key, e.mtime - now), e))
            elif e.key not in packs_in_use:
                candidates.append((self._pack_last_used.get(e.key, e.mtime - now), e))
        target = int(self.limit_bytes * LOW_WATER)
        victims: list[CachedEntry] = []
        for _, e in sorted(candidates, key=lambda c: c[0]):
            if total <= target:
                break
            victims.append(e)
            total -= e.size
        return victims

    def finish_eviction(self, entries: Collection[CachedEntry], victims: Collection[CachedEntry],
                        mark: tuple[int, int]) -> int:
        """Remove ``victims`` (chosen just now, on the caller's thread, from ``entries`` listed since ``mark``)
        and keep the bound on the cache's size; returns the bytes freed."""
        freed = 0
        for e in victims:
            if isinstance(e.key, int):
                self.remove(e.key)
            else:
                (self.packs / e.key).unlink(missing_ok=True)
                self._pack_last_used.pop(e.key, None)
            freed += e.size
        added, forgotten = mark
        if forgotten != self._forgotten:  # files appeared that neither the listing nor ``added`` may have seen
            self._used_bound = None
        else:
            self._used_bound = sum(e.size for e in entries) - freed + self._added_total - added
        return freed

    async def ensure(self, ino: int, fetch: Callable[[Path], Awaitable[None]]) -> Path:
        """The cache file of ``ino``, calling ``fetch(dest)`` first if it is missing (one fetch per inode)."""
        lock = self._locks.setdefault(ino, trio.Lock())
        try:
            async with lock:
                path = self.path(ino)
                if not path.exists():
                    await fetch(path)
                    self.maybe_over_limit = True
                    self.forget_usage()
                self.touch(ino)
                return path
        finally:  # a lock per file being fetched, not one kept for every file ever opened for writing
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(ino, None)
