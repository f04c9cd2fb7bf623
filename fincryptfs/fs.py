"""The FUSE filesystem: pyfuse3 operations over the local tree (``meta``) and the write-back cache (``cache``).

Rules that keep the mount responsive and crash-safe:

* No handler awaits the network, except ``open`` (and a truncate) of a file whose content is not cached: that
  one fetches the file, because there is nothing else to read.
* Writes go to the inode's cache file. The first write after a close bumps the inode's version (an upload in
  flight for the old version then turns stale). On ``flush``/``release`` of a written file the new size and
  an upload job are committed in one SQLite transaction, and only then is the queue woken.
* Inodes are SQLite row ids and stay stable across mounts. An unlinked inode keeps its row (without a name)
  while the kernel still knows it (lookup count) or a handle is open, and is purged after that.

Unsupported, on purpose: hard links (``link`` → ENOTSUP; an object has exactly one name), extended attributes
(ENOSYS, which the kernel reports as EOPNOTSUPP and then stops asking), device nodes, FIFOs and sockets
(``mknod`` → EPERM; ``mknod`` of a regular file makes an empty one).
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from . import meta
from .cache import CacheDir
from .core.errors import FincryptError
from .downloader import Progress

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 1.0
BLOCK_SIZE = 128 * 1024  # statfs block size
IO_SIZE = 1024 * 1024  # st_blksize: tools such as cp size their buffers by it, and FUSE passes 1 MiB writes whole
NAME_MAX = meta.NAME_MAX
DOT_ENTRIES = 2  # "." and "..", the first two entries readdir lists

Fetch = Callable[[str, Path, Progress | None], Awaitable[None]]  # (object JSON, destination, progress)
Spawn = Callable[[Callable[[], Awaitable[None]]], None]  # runs a task in the mount's nursery
PackFile = Callable[[meta.PackRef], Awaitable[Path | None]]  # the cached whole pack (packs.PackReader.pack_file)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass
class _Filling:
    """A file being fetched into the cache in the background. Its partial copy grows in file order, and a
    reader is served from it as soon as the bytes it asks for have arrived, instead of waiting at ``open`` for
    the whole file (a 2 GiB video starts playing after its first segments, not after 2 GiB)."""

    size: int
    partial: Path | None = None
    filled: int = 0
    failed: bool = False
    done: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # of the fetch: a rewrite drops it

    def advance(self, partial: Path, filled: int) -> None:
        self.partial, self.filled = partial, filled
        self._notify()

    def finish(self, ok: bool) -> None:
        self.done, self.failed = ok, not ok
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, end: int) -> bool:
        """Wait until the first ``end`` bytes are readable (True) or the fetch ended without them (False)."""
        while not self.done and (self.partial is None or self.filled < end):
            if self.failed:
                return False
            await self.changed.wait()
        return True


@dataclass
class _Handle:
    ino: int
    fd: int
    writable: bool
    filling: _Filling | None = None  # set while the file behind ``fd`` is still arriving
    pack: meta.PackRef | None = None  # ``fd`` is the cached copy of this pack: the file is ``size`` at ``offset``


@dataclass
class _Dirty:
    """Size and mtime of an inode being written; the tree gets them at flush/release."""

    size: int
    mtime_ns: int
    ctime_ns: int  # the last change (write, truncate, or attributes set while open): what stat shows meanwhile
    attrs: dict[str, int] = field(default_factory=dict)  # mode/uid/gid/atime_ns set while open


@dataclass
class Capacity:
    """What statfs reports: total and free bytes (from the mediator when known)."""

    total_bytes: int
    free_bytes: int


def _guarded(method: F) -> F:
    """A handler whose failures reach the caller as an errno, never as a crash of the whole mount.

    pyfuse3 ends its main loop on any exception other than FUSEError, which would unmount the user's folder
    (writes in flight would then fail with ECONNABORTED). A full disk, for the cache files or for the tree
    database, is ENOSPC; other local I/O errors keep their errno; anything else is logged with its traceback
    and answered EIO.
    """
    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            log.error("%s failed: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                log.error("%s failed: the disk holding the tree database (meta.db) is full", method.__name__)
                raise pyfuse3.FUSEError(errno.ENOSPC) from exc
            log.exception("%s failed on the tree database", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except Exception as exc:
            log.exception("%s failed unexpectedly", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc
    return cast(F, wrapper)


class FincryptOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, *, db: sqlite3.Connection, cache: CacheDir, fetch: Fetch,
                 wake: Callable[[bool], None] = lambda jobs: None,
                 read_ahead: Callable[[list[tuple[int, str | None]]], None] = lambda members: None,
                 spawn: Spawn | None = None, pack_file: PackFile | None = None) -> None:
        super().__init__()
        self.db = db
        self.cache = cache
        self.fetch = fetch
        self.spawn = spawn  # without it, opening an uncached file waits for all of it
        self.pack_file = pack_file  # without it, an uncached packed file is copied out of its pack to be read
        self._filling: dict[int, _Filling] = {}
        self.wake = wake
        self.read_ahead = read_ahead  # offered a listed folder's stored files (packs.Prefetcher.offer)
        self.capacity: Capacity | None = None
        self.file_count = 0  # files in the tree, for statfs: counted in the background (a million took 0.2 s)
        self._lookups: dict[int, int] = {}
        self._handles: dict[int, _Handle] = {}
        self._open: dict[int, int] = {}
        self._dirty: dict[int, _Dirty] = {}
        self._next_fh = 1

    def open_inodes(self) -> set[int]:
        return set(self._open)

    def open_packs(self) -> set[str]:
        """Packs whose cached copy an open file reads from (not to be evicted)."""
        return {h.pack.pack_id for h in self._handles.values() if h.pack is not None}

    # --- attributes -----------------------------------------------------------------------------------------

    def _inode(self, ino: int) -> meta.Inode:
        inode = meta.find(self.db, ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return inode

    def _attr(self, inode: meta.Inode) -> pyfuse3.EntryAttributes:
        """What the kernel sees: the tree's row with the pending changes of a file open for writing."""
        dirty = self._dirty.get(inode.ino)
        if dirty is not None and dirty.attrs:
            inode = replace(inode, **dirty.attrs)  # type: ignore[arg-type]  # only int columns (_Dirty.attrs)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode.ino
        attr.generation = 0
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = inode.mode
        if inode.parent is None and inode.ino != meta.ROOT_INO:  # unlinked, still open: no name links to it
            attr.st_nlink = 0
        elif inode.kind == meta.DIR:
            attr.st_nlink = 2 + meta.subdir_count(self.db, inode.ino)
        else:
            attr.st_nlink = 1
        attr.st_uid = inode.uid
        attr.st_gid = inode.gid
        attr.st_rdev = 0
        size, mtime_ns = inode.size, inode.mtime_ns
        if dirty is not None:
            size, mtime_ns = dirty.size, dirty.mtime_ns
        attr.st_size = size
        attr.st_blksize = IO_SIZE
        attr.st_blocks = (size + 511) // 512
        attr.st_atime_ns = inode.atime_ns
        attr.st_mtime_ns = mtime_ns
        attr.st_ctime_ns = inode.ctime_ns if dirty is None else dirty.ctime_ns
        return attr

    def _remember(self, inode: meta.Inode) -> pyfuse3.EntryAttributes:
        self._lookups[inode.ino] = self._lookups.get(inode.ino, 0) + 1
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._remember(self._inode(parent_inode))
        if name == b"..":
            inode = self._inode(parent_inode)
            return self._remember(self._inode(inode.parent if inode.parent is not None else meta.ROOT_INO))
        if len(name) > NAME_MAX:  # no such name can exist: say why (stat, unlink, open all look the name up first)
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        try:
            return self._remember(meta.lookup(self.db, parent_inode, name))
        except meta.NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self._lookups.get(ino, 0) - count
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                self._maybe_purge(ino)

    def _maybe_purge(self, ino: int) -> None:
        """Drop an unlinked inode once the kernel forgot it, no handle is open and no fetch is filling its cache
        file (that one would land after the purge, a copy of a deleted file nothing removes: the fetch's end
        purges it instead). (A packed file's bytes are zeroed in the cached copy of its pack by the evictor, once
        no handle is open: ``meta.stale_members``.)"""
        if ino in self._lookups or ino in self._open or ino in self._filling:
            return
        inode = meta.find(self.db, ino)
        if inode is not None and inode.parent is None and ino != meta.ROOT_INO:
            meta.purge(self.db, ino)
            self.cache.remove(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(self._inode(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        now = time.time_ns()
        if fields.update_size:
            if node.kind != meta.FILE:
                raise pyfuse3.FUSEError(errno.EINVAL)
            await self._truncate(node, attr.st_size)
        values: dict[str, int] = {}
        if fields.update_mode:
            values["mode"] = (node.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            values["uid"] = attr.st_uid
        if fields.update_gid:
            values["gid"] = attr.st_gid
        if fields.update_atime:
            values["atime_ns"] = meta.clamp_time_ns(attr.st_atime_ns)
        dirty = self._dirty.get(inode)
        if fields.update_mtime:
            values["mtime_ns"] = meta.clamp_time_ns(attr.st_mtime_ns)
            if dirty is not None:
                dirty.mtime_ns = values["mtime_ns"]
        if dirty is not None and inode in self._open and not fields.update_size:
            # A file being written (cp -a: fchown, fchmod, futimens before close): the changes wait in memory
            # for its close, which commits them with the size and the upload job in one transaction.
            values.pop("mtime_ns", None)  # dirty.mtime_ns carries it
            dirty.attrs.update(values)
            dirty.ctime_ns = now
            return self._attr(node)  # the row is as read above; _attr adds the pending changes
        if values or fields.update_size:
            values["ctime_ns"] = now
            node = meta.set_attrs(self.db, inode, **values)
            self.wake(False)
            return self._attr(node)
        return self._attr(node)

    async def _truncate(self, node: meta.Inode, size: int) -> None:
        if size == 0:
            path = self.cache.path(node.ino)
        else:
            path = await self._ensure_cached(node)
        dirty = self._begin_write(node)
        with open(path, "ab") as f:
            f.truncate(size)
        dirty.size = size
        dirty.mtime_ns = dirty.ctime_ns = time.time_ns()
        if node.ino not in self._open:
            self._commit_write(node.ino)

    # --- the cache and writes -------------------------------------------------------------------------------

    async def _ensure_cached(self, node: meta.Inode, progress: Progress | None = None) -> Path:
        async def fetch(dest: Path) -> None:
            if node.object is None:
                if node.state != meta.STORED:
                    log.error("the cache copy of %s is gone before it was uploaded",
                              meta.path_of(self.db, node.ino) or f"inode {node.ino}")
                    raise pyfuse3.FUSEError(errno.EIO)
                dest.touch()
                return
            try:
                await self.fetch(node.object, dest, progress)
            except (FincryptError, OSError) as exc:
                log.error("cannot fetch %s: %s", meta.path_of(self.db, node.ino) or f"inode {node.ino}", exc)
                raise pyfuse3.FUSEError(errno.EIO) from exc
        return await self.cache.ensure(node.ino, fetch)

    def _start_filling(self, node: meta.Inode) -> _Filling | None:
        """Fetch an uncached stored file in the background, unless it is cached, packed (small: fetched whole)
        or already arriving; the filling to read from, if any."""
        filling = self._filling.get(node.ino)
        if filling is not None:
            return filling
        if self.spawn is None or node.object is None or meta.is_packed(node.object) or self.cache.has(node.ino):
            return None
        filling = self._filling[node.ino] = _Filling(node.size)

        async def fill() -> None:
            ok = False
            try:
                with filling.cancel_scope:
                    await self._ensure_cached(node, filling.advance)
                    ok = True
            except pyfuse3.FUSEError:
                pass  # logged by _ensure_cached; readers past what arrived get EIO, the next open tries again
            finally:
                if self._filling.get(node.ino) is filling:  # not if dropped by a rewrite (_begin_write)
                    del self._filling[node.ino]
                filling.finish(ok)
                self._maybe_purge(node.ino)  # deleted while it arrived

        try:
            self.spawn(fill)
        except BaseException:  # e.g. the mount is shutting down: nobody must wait for a fetch that never runs
            del self._filling[node.ino]
            raise
        return filling

    def _begin_write(self, node: meta.Inode) -> _Dirty:
        if (filling := self._filling.pop(node.ino, None)) is not None:
            # Emptied while its old version arrives (O_TRUNC, truncate to 0: the other writes wait for the fetch).
            # The fetch must not land later: once the new version is uploaded and evicted, it found no cache copy
            # to spare and renamed the old version into the cache, and opens meanwhile read the old partial copy.
            filling.cancel_scope.cancel()
        dirty = self._dirty.get(node.ino)
        if dirty is None:
            meta.mark_dirty(self.db, node.ino)
            dirty = self._dirty[node.ino] = _Dirty(node.size, node.mtime_ns, node.ctime_ns)
        return dirty

    def _commit_write(self, ino: int) -> None:
        """Persist the size and record the upload job (committed before the queue hears of it).

        If that fails (a full disk, the database locked too long), the inode stays dirty in memory and in the
        tree: the next flush or release of it tries again, ``retry_commits`` does every ``mount.COMMIT_RETRY`` seconds
        once it is closed, and a restart's recovery finds it.
        """
        dirty = self._dirty.get(ino)
        if dirty is None:
            return
        meta.record_release(self.db, ino, dirty.size, dirty.mtime_ns, dirty.attrs, dirty.ctime_ns)
        del self._dirty[ino]
        self.wake(True)

    def retry_commits(self) -> int:
        """Record the closes whose commit failed (the tree database's disk full, or its lock held by another
        process for longer than the busy timeout): the writer got an error, the bytes are in the cache, and the
        inode stayed dirty here, but no later request would ask again before the next mount. Called
        periodically; returns how many were recorded now."""
        recorded = 0
        for ino in [ino for ino in self._dirty if ino not in self._open]:
            try:
                self._commit_write(ino)
            except Exception as exc:  # noqa: BLE001 - whatever it is, the mount stays up and asks again later
                log.warning("%d closed file(s) still cannot be recorded for upload, will try again: %s",
                            sum(1 for i in self._dirty if i not in self._open), exc)
                break
            recorded += 1
            self._maybe_purge(ino)
        if recorded:
            log.info("recorded %d closed file(s) for upload that could not be recorded when they were closed",
                     recorded)
        return recorded

    def _new_handle(self, ino: int, fd: int, writable: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(ino, fd, writable)
        self._open[ino] = self._open.get(ino, 0) + 1
        self.cache.touch(ino)
        return fh

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if node.kind != meta.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind == meta.DIR else errno.ELOOP)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        # O_TRUNC empties the file whatever the access mode (O_RDONLY too, as on Linux: the kernel has checked write
        # permission), and it is ours to do: the kernel passes it to open instead of truncating (atomic_o_trunc).
        truncate = bool(flags & os.O_TRUNC)
        if not writable and not truncate and (fd := self.cache.open_cached(inode)) is not None:  # most opens
            return pyfuse3.FileInfo(fh=self._new_handle(inode, fd, False))
        if truncate:
            path = self.cache.path(inode)
            dirty = self._begin_write(node)
            with open(path, "wb"):
                pass
            dirty.size = 0
            dirty.mtime_ns = dirty.ctime_ns = time.time_ns()
        elif not writable and (filling := self._start_filling(node)) is not None:
            if not await filling.wait_for(0) and not self.cache.has(inode):  # else emptied meanwhile: read that
                raise pyfuse3.FUSEError(errno.EIO)
            if not filling.done and not self.cache.has(inode):  # read from the partial copy (renamed into the
                # cache, same file, once complete)
                assert filling.partial is not None
                fd = os.open(filling.partial, os.O_RDONLY)
                fh = self._new_handle(inode, fd, False)
                self._handles[fh].filling = filling
                return pyfuse3.FileInfo(fh=fh)
            path = self.cache.path(inode)
        elif not writable and (handle := await self._open_in_pack(node)) is not None:
            if handle < 0:  # its content changed while its pack arrived: open what it is now
                return await self.open(inode, flags, ctx)
            return pyfuse3.FileInfo(fh=handle)
        else:
            path = await self._ensure_cached(node)
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        return pyfuse3.FileInfo(fh=self._new_handle(inode, fd, writable))

    async def _open_in_pack(self, node: meta.Inode) -> int | None:
        """A read-only handle on the cached copy of an uncached packed file's pack (fetched whole first if need
        be), or None: the file is not packed, or its pack is too large to fetch whole. Its own cache copy is
        known to be missing. -1: the file got other content while its pack arrived (open it again); ENOENT if
        it was deleted meanwhile. Its old range may be zeroed in the copy by then (``meta.stale_members``, zeroed
        as the copy arrives): a handle on it read the file's length in zeros."""
        ref = meta.pack_ref(node.object) if node.object is not None else None
        if ref is None or self.pack_file is None:
            return None
        fd = self.cache.open_pack(ref.pack_id)  # most opens of a packed file: its pack is cached
        if fd is None:
            try:
                path = await self.pack_file(ref)
            except (FincryptError, OSError) as exc:
                if self._content_changed(node):
                    return -1
                log.error("cannot fetch %s: %s", meta.path_of(self.db, node.ino) or f"inode {node.ino}", exc)
                raise pyfuse3.FUSEError(errno.EIO) from exc
            if self._content_changed(node):
                return -1
            if path is None:
                return None
            fd = os.open(path, os.O_RDONLY)
        if os.fstat(fd).st_size < ref.offset + ref.size:
            os.close(fd)
            os.unlink(self.cache.pack_path(ref.pack_id))  # not the pack it should be (a crash before the fetched
            # copy reached the disk?)
            log.error("the cached copy of pack %s… was short: removed; the next open fetches it again",
                      ref.pack_id[:16])
            raise pyfuse3.FUSEError(errno.EIO)
        fh = self._new_handle(node.ino, fd, False)
        self._handles[fh].pack = ref
        self.cache.touch_pack(ref.pack_id)
        return fh

    def _content_changed(self, node: meta.Inode) -> bool:
        """Whether the file ``node`` was read from has other content now; ENOENT if it was deleted."""
        now = meta.find(self.db, node.ino)
        if now is None or now.parent is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return now.object != node.object

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._create(parent_inode, name, meta.FILE, stat.S_IFREG | (mode & 0o7777), ctx, dirty=True)
        self._dirty[node.ino] = _Dirty(0, node.mtime_ns, node.ctime_ns)  # created dirty: no mark_dirty needed
        path = self.cache.path(node.ino)
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            except FileNotFoundError:  # the cache folder was removed while mounted
                if not self.cache.restore_folders():
                    raise
                log.warning("the cache folder %s was removed while mounted: made it again", self.cache.root)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:  # no file without its cache copy: a failed create used to leave an empty one behind
            del self._dirty[node.ino]
            meta.unlink(self.db, parent_inode, name)
            meta.purge(self.db, node.ino)
            raise
        fh = self._new_handle(node.ino, fd, True)
        return pyfuse3.FileInfo(fh=fh), self._remember(node)

    def _create(self, parent: int, name: bytes, kind: str, mode: int, ctx: pyfuse3.RequestContext,
                target: bytes | None = None, *, dirty: bool = False) -> meta.Inode:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        parent_node = self._inode(parent)
        if parent_node.kind != meta.DIR or (parent_node.parent is None and parent != meta.ROOT_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        gid = ctx.gid
        if parent_node.mode & stat.S_ISGID:
            # A set-group-ID folder (one a group shares): what is made in it gets the folder's group, and a folder
            # the bit too, as on Linux's own file systems (the kernel leaves this to the file system).
            gid = parent_node.gid
            if kind == meta.DIR:
                mode |= stat.S_ISGID
        try:
            node = meta.create(self.db, parent, name, kind, mode, ctx.uid, gid, target, dirty=dirty)
        except meta.Exists:
            raise pyfuse3.FUSEError(errno.EEXIST) from None
        self.wake(False)
        return node

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        if handle.pack is not None:
            if not self.cache.has(handle.ino):
                if off >= handle.pack.size:
                    return b""
                return os.pread(handle.fd, min(size, handle.pack.size - off), handle.pack.offset + off)
            self._leave_pack(handle)  # the file got a cache copy of its own (opened for writing): read that
        filling = handle.filling
        if filling is not None and not filling.done and not self.cache.has(handle.ino):
            if not await filling.wait_for(min(off + size, filling.size)) and not self.cache.has(handle.ino):
                raise pyfuse3.FUSEError(errno.EIO)  # the fetch failed before reaching these bytes
        if handle.filling is not None and self.cache.has(handle.ino):
            self._leave_partial(handle)  # arrived whole, or rewritten meanwhile (O_TRUNC): read the cache copy
        return os.pread(handle.fd, size, off)

    def _leave_partial(self, handle: _Handle) -> None:
        """Read from the file's cache copy instead of the partial copy of its fetch. Once complete, that is the
        same file renamed into place; but if the file was emptied or rewritten while it arrived (``open`` with
        O_TRUNC, a truncate to 0), the fetch is dropped and the cache copy is the newer version: a reader that went
        on reading the partial copy served the old bytes, and the kernel kept them in its page cache, so even
        later opens read the old content under the new size."""
        fd = os.open(self.cache.path(handle.ino), os.O_RDONLY)
        os.close(handle.fd)
        handle.fd, handle.filling = fd, None

    def _leave_pack(self, handle: _Handle) -> None:
        fd = os.open(self.cache.path(handle.ino), os.O_RDONLY)
        os.close(handle.fd)
        handle.fd, handle.pack = fd, None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        dirty = self._dirty.get(handle.ino)
        if dirty is None:
            dirty = self._begin_write(self._inode(handle.ino))
        if not self.cache.has_room(len(buf)):  # the last few percent stay free for the tree database
            raise pyfuse3.FUSEError(errno.ENOSPC)
        written = os.pwrite(handle.fd, buf, off)
        self.cache.added(written)
        dirty.size = max(dirty.size, off + written)
        dirty.mtime_ns = dirty.ctime_ns = time.time_ns()
        return written

    async def flush(self, fh: int) -> None:
        self._commit_write(self._handles[fh].ino)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles[fh]
        os.fsync(handle.fd)
        self._commit_write(handle.ino)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        os.close(handle.fd)
        left = self._open[handle.ino] - 1
        if left:
            self._open[handle.ino] = left
        else:
            del self._open[handle.ino]
            self._commit_write(handle.ino)
            self._maybe_purge(handle.ino)

    # --- names ----------------------------------------------------------------------------------------------

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        return self._remember(self._create(parent_inode, name, meta.DIR, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self._remember(self._create(parent_inode, name, meta.SYMLINK, stat.S_IFLNK | 0o777, ctx, target))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        if node.kind != meta.SYMLINK or node.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        """A regular file (``mknod(path, S_IFREG | mode)``, which Linux allows) is made empty, as ``create`` without
        the open. FIFOs, sockets and device nodes are not kept: EPERM, as mknod(2) says of a file system that does
        not support the type asked for (pyfuse3's default, ENOSYS, reads as a missing feature of the kernel)."""
        if stat.S_ISREG(mode):
            return self._remember(self._create(parent_inode, name, meta.FILE, stat.S_IFREG | (mode & 0o7777), ctx))
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._child(parent_inode, name)
        if node.kind == meta.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        meta.unlink(self.db, parent_inode, name)
        self._maybe_purge(node.ino)
        self.wake(node.object is not None)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._child(parent_inode, name)
        if node.kind != meta.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if meta.has_children(self.db, node.ino):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        meta.unlink(self.db, parent_inode, name)
        self._maybe_purge(node.ino)
        self.wake(False)

    def _child(self, parent: int, name: bytes) -> meta.Inode:
        try:
            return meta.lookup(self.db, parent, name)
        except meta.NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE or flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if len(name_new) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        try:
            _, replaced = meta.rename(self.db, parent_inode_old, name_old, parent_inode_new, name_new,
                                      noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))
        except meta.NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except meta.Exists:
            raise pyfuse3.FUSEError(errno.EEXIST) from None
        except IsADirectoryError:
            raise pyfuse3.FUSEError(errno.EISDIR) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except meta.DirectoryNotEmpty:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY) from None
        except meta.InvalidMove:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if replaced is not None:
            self._maybe_purge(replaced.ino)
        self.wake(replaced is not None and replaced.object is not None)

    # --- directories ----------------------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._inode(inode).kind != meta.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """"." and ".." first, as Linux's own file systems list them (``ls -a``), then the children in inode order.
        An entry's offset, where the next call resumes, is 1 after ".", 2 after ".." and a child's inode number + 2
        after the child (children come and go between calls; their numbers only grow). The kernel counts no lookup
        for "." and ".."."""
        if start_id < DOT_ENTRIES:
            folder = self._inode(fh)
            dots = [(b".", folder), (b"..", self._inode(folder.parent or meta.ROOT_INO))]
            for offset, (name, node) in enumerate(dots[start_id:], start=start_id + 1):
                if not pyfuse3.readdir_reply(token, name, self._attr(node), offset):
                    return
        after = max(start_id - DOT_ENTRIES, 0)
        while True:
            batch = meta.children(self.db, fh, after)
            if not batch:
                return
            if start_id == 0:  # a folder being listed is likely read next: fetch its packs ahead
                self.read_ahead([(c.ino, c.object) for c in batch if c.kind == meta.FILE and c.state == meta.STORED])
            for child in batch:
                assert child.name is not None
                if not pyfuse3.readdir_reply(token, child.name, self._attr(child), child.ino + DOT_ENTRIES):
                    return
                self._lookups[child.ino] = self._lookups.get(child.ino, 0) + 1
                after = child.ino

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # --- the rest -------------------------------------------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        if self.capacity is not None:
            total, free = self.capacity.total_bytes, self.capacity.free_bytes
        else:
            local = os.statvfs(self.cache.root)
            total, free = local.f_blocks * local.f_frsize, local.f_bavail * local.f_frsize
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = BLOCK_SIZE
        data.f_blocks = max(total, free) // BLOCK_SIZE
        data.f_bfree = free // BLOCK_SIZE
        data.f_bavail = free // BLOCK_SIZE
        data.f_files = self.file_count + 2**20
        data.f_ffree = 2**20
        data.f_favail = 2**20
        data.f_namemax = NAME_MAX
        return data

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)


# Every request handler FincryptOperations defines is guarded (see _guarded), including ones added later.
for _name, _handler in list(vars(FincryptOperations).items()):
    if _name in vars(pyfuse3.Operations) and inspect.iscoroutinefunction(_handler):
        setattr(FincryptOperations, _name, _guarded(_handler))
