"""``fincryptfs put``: copy local files and folders into the tree without going through FUSE.

Why: every file copied through the mount costs about eight FUSE round trips, and pyfuse3's own per-request
cost alone caps ``cp -a`` of small files near 1,500-1,900 files/s on a two-core machine (docs/client-data-path.md),
whatever the file system does. A backup of a folder of small files (what ``restic backup`` does) needs none of
that: ``put`` writes the tree database directly. Into a running mount it also writes the cache files,
leaving them as the mount's ``create``, ``write`` and ``release`` would (the same rows, jobs and cache paths,
in fewer transactions), and the mount's upload queue stores them, packing small files; otherwise it uploads
straight from the sources (below). It also works where FUSE does not (containers, servers without
``/dev/fuse``), and it is incremental: a file whose size and modification time match the tree's is skipped.

``put`` returns when everything it copied is stored (like ``fincryptfs flush``). If the tree is not mounted it
holds the mount lock (no mount can start meanwhile) and runs the upload queue and the evictor itself, in its
own process (one Python process less to start than a mount's worker), until everything is stored. If it is
mounted, the mount's worker uploads, and the running mount shows the new entries within a second (the kernel
keeps names and attributes for ``fs.ATTR_TIMEOUT``).

Not mounted, files are not copied into the cache at all: a file too large to be packed is uploaded straight
from its source, and small files are gathered into packs read straight from their sources
(``DIRECT_UPLOADS`` uploads at a time, while the walk goes on); each is recorded as stored once the mediator
has committed its object, if its source did not change meanwhile. A backup then needs no cache room, its
upload starts at once, and no cache file is created (or later evicted) per file: on this machine's
file system, creating files where thousands were just deleted cost more kernel time than the upload
(``put`` of 2,000 small files spent 1.8-2.1 s in the kernel, 0.5 s on a fresh disk). Reading them later
fetches them (a folder's packs are read ahead).

Semantics, like ``cp -a`` into an existing folder: each SOURCE becomes DEST/<its name>; folders merge into
existing folders; a file is replaced in place (same inode, next version, as an ``O_TRUNC`` open through the
mount would); symbolic links are copied as links, never followed; modes, times and (as root) owners are kept.
Sockets, FIFOs and devices are skipped with a message (the mount does not store them either), and so are
Fincrypt's own data and cache folders and any mounted backup found in the source (``own_folders``). A folder never
replaces a file nor the reverse: that entry is reported and the rest goes on. An interrupted ``put`` leaves
what it had copied (a file cut short shows a later modification time than its source, so running ``put``
again replaces it).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from . import meta, rpc
from .cache import CacheDir
from .core.errors import ConfigError, FincryptError
from .core.settings import ClientSettings
from .datadir import evictor, exclusive_mount, load_or_restore_tree, meta_path, open_store
from .lockfile import held
from .objectstore import ObjectStore
from .uploader import MembersReader
from .uploadworker import CPU_THREADS, run_queue

log = logging.getLogger(__name__)
T = TypeVar("T")

ROOM_WAIT = 0.2  # seconds between checks while the cache disk is full and uploads are pending
ROOM_PATIENCE = 600.0  # give up after this long without room
COPY_THREADS = 4  # files read at once: a cold disk answers several reads faster than one after another
COPY_BATCH = 128  # files copied together, then recorded in one transaction
SENDFILE_CHUNK = 64 * 2**20  # a large file's copy looks at the stop flag this often
WAKE_INTERVAL = 0.1  # the upload worker hears of new files this often while files are copied
PROGRESS_INTERVAL = 2.0
RELEASE_WAIT = 15.0  # seconds put (not mounted) waits for the releases its last snapshot allows (_let_releases_run)
DIRECT_UPLOADS = 2  # large files uploaded from their source at once (as many as the queue's workers)
DIRECT_QUEUE = 64  # large files the walk may find ahead of their uploads


class PutError(Exception):
    """An entry that could not be copied (the message names it); the rest of the copy goes on."""


class Stopped(Exception):
    """The user interrupted ``put``: the copy stops between files (or chunks of a large one)."""


@dataclass
class PutReport:
    files: int = 0
    bytes: int = 0
    unchanged: int = 0
    folders: int = 0
    links: int = 0
    skipped: list[str] = field(default_factory=list)  # not storable (sockets, FIFOs, devices)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.files:,} file(s) ({self.bytes / 2**20:,.1f} MiB) copied", f"{self.unchanged:,} unchanged",
                 f"{self.folders:,} folder(s)", f"{self.links:,} link(s)"]
        if self.skipped:
            parts.append(f"{len(self.skipped):,} skipped")
        if self.errors:
            parts.append(f"{len(self.errors):,} error(s)")
        return ", ".join(parts)


def tree_path(text: str) -> list[bytes]:
    """The components of a path in the tree (``/Photos/2024`` or ``Photos/2024``; ``/`` is the root)."""
    parts = [os.fsencode(p) for p in text.split("/") if p not in ("", ".")]
    for part in parts:
        if part == b"..":
            raise ConfigError(f"{text!r}: '..' is not allowed in a path in the tree")
        if len(part) > meta.NAME_MAX:
            raise ConfigError(f"{text!r}: a name is longer than {meta.NAME_MAX} bytes")
    return parts


def copy_file_to(source_fd: int, dest: Path, stop: threading.Event | None = None) -> int:
    """Copy an open file to ``dest`` (created 0600 or truncated) with ``sendfile``; bytes copied. Stops with
    Stopped between chunks of SENDFILE_CHUNK once ``stop`` is set (Ctrl-C during a large file)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while sent := os.sendfile(fd, source_fd, offset, SENDFILE_CHUNK):
            offset += sent
            if stop is not None and stop.is_set():
                raise Stopped()
        return offset
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DirectFile:
    """A file to upload straight from its source: where it goes, and the stat it was seen with."""

    source: Path
    st: os.stat_result
    parent: int
    name: bytes
    node: meta.Inode | None  # the file it replaces


class Importer:
    """Copies local entries into the tree and the cache. Blocking: run it in a worker thread.

    A folder's files are copied COPY_BATCH at a time: their contents by COPY_THREADS threads at once (reading
    many files from a cold disk is mostly waiting), each to a temporary file in the cache; then one transaction
    creates the new files' inodes, renames their contents into place and queues their uploads. A crash before
    that commit leaves only temporary files (removed at the next start) and cache files named after inode
    numbers never committed (a later ``create`` of that number truncates its file first). A file that exists
    already is replaced as the mount replaces it: marked dirty (committed), content renamed over its cache
    copy, then queued; a crash in between queues whichever complete content the cache holds.

    ``mounted``: a running mount may know the tree's inodes, so a replaced symbolic link's old inode is left
    for the mount to purge (as after an ``unlink`` through it) instead of being purged here.
    """

    def __init__(self, db: sqlite3.Connection, cache: CacheDir, *, mounted: bool,
                 uploads_pending: Callable[[], bool], on_progress: Callable[[PutReport], None] = lambda r: None,
                 exclude: Collection[tuple[int, int]] = (), direct: Callable[[DirectFile], None] | None = None,
                 direct_min: int = 0, direct_small: Callable[[DirectFile], None] | None = None) -> None:
        self.db = db
        self.direct = direct  # given a file larger than ``direct_min`` instead of copying it (not mounted)
        self.direct_min = direct_min
        self.direct_small = direct_small  # given a smaller, non-empty one (to be packed from its source)
        self.direct_end: Callable[[], None] | None = None  # called once the walk is over
        self.exclude = exclude  # (st_dev, st_ino) of folders never copied (``own_folders``)
        self.cache = cache
        self.mounted = mounted
        self.uploads_pending = uploads_pending
        self.on_progress = on_progress
        self.report = PutReport()
        self.keep_owner = os.geteuid() == 0
        self.stop = threading.Event()  # set from another thread: the copy ends with Stopped
        self._last_progress = time.monotonic()
        self._pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="put-copy")

    def close(self) -> None:
        self._pool.shutdown()

    # --- entry points ---------------------------------------------------------------------------------------

    def folder(self, parts: list[bytes]) -> int:
        """The inode of the tree folder ``parts``, created (like ``mkdir -p``) where missing."""
        ino = meta.ROOT_INO
        for i, part in enumerate(parts):
            try:
                node = meta.lookup(self.db, ino, part)
            except meta.NotFound:
                node = meta.create(self.db, ino, part, meta.DIR, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
            if node.kind != meta.DIR:
                shown = "/" + b"/".join(parts[:i + 1]).decode(errors="replace")
                raise ConfigError(f"{shown} in the tree is a {node.kind}, not a folder")
            ino = node.ino
        return ino

    def put(self, source: Path, parent: int) -> None:
        """Copy ``source`` (file, folder or link) to ``parent``/its name; problems land in the report."""
        name = os.fsencode(source.name)
        if not name or name in (b".", b".."):
            raise ConfigError(f"{source}: name the folder itself (e.g. {source.resolve().name or 'a folder'})")
        self._entry(source, parent, name)

    # --- the walk -------------------------------------------------------------------------------------------

    def _entry(self, source: Path, parent: int, name: bytes) -> None:
        if self.stop.is_set():
            raise Stopped()
        try:
            st = os.lstat(source)
            if stat.S_ISREG(st.st_mode):
                self._files([(source, st, name)], parent)
            elif len(name) > meta.NAME_MAX:
                raise PutError(f"{source}: the name is longer than {meta.NAME_MAX} bytes")
            elif stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in self.exclude:
                self.report.skipped.append(f"{source}: Fincrypt's own folder (its data, its cache or a mounted "
                                           "backup): not copied into the backup")
            elif stat.S_ISDIR(st.st_mode):
                self._folder(source, st, parent, name)
            elif stat.S_ISLNK(st.st_mode):
                self._link(source, parent, name)
            else:
                self.report.skipped.append(f"{source}: not a file, folder or link (sockets, FIFOs and devices "
                                           "are not stored)")
        except PutError as exc:
            self.report.errors.append(str(exc))
        except OSError as exc:
            self._failed(source, exc)

    def _failed(self, source: Path, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            raise exc  # the disk holding the cache or the tree is full: nothing further can succeed
        self.report.errors.append(f"{source}: {exc.strerror or exc}")

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            self.on_progress(self.report)

    def owner(self, st: os.stat_result) -> tuple[int, int]:
        return (st.st_uid, st.st_gid) if self.keep_owner else (os.getuid(), os.getgid())

    def _existing(self, parent: int, name: bytes) -> meta.Inode | None:
        try:
            return meta.lookup(self.db, parent, name)
        except meta.NotFound:
            return None

    def _folder(self, source: Path, st: os.stat_result, parent: int, name: bytes) -> None:
        node = self._existing(parent, name)
        uid, gid = self.owner(st)
        if node is None:
            node = meta.create(self.db, parent, name, meta.DIR, stat.S_IFDIR | stat.S_IMODE(st.st_mode), uid, gid)
            self.report.folders += 1
        elif node.kind != meta.DIR:
            raise PutError(f"{source}: the tree has a {node.kind} by that name, not a folder; remove it first")
        with os.scandir(source) as entries:
            children = sorted(entries, key=lambda e: e.name)
        files: list[tuple[Path, os.stat_result, bytes]] = []
        for child in children:
            path = Path(child.path)
            try:
                child_st = child.stat(follow_symlinks=False)
            except OSError as exc:
                self._failed(path, exc)
                continue
            if stat.S_ISREG(child_st.st_mode):
                files.append((path, child_st, os.fsencode(child.name)))
            else:
                self._entry(path, node.ino, os.fsencode(child.name))
        self._files(files, node.ino)
        # last, as cp -a does: adding the children changed the folder's times
        meta.set_attrs(self.db, node.ino, mode=stat.S_IFDIR | stat.S_IMODE(st.st_mode), uid=uid, gid=gid,
                       atime_ns=_atime(st), mtime_ns=_mtime(st))

    def _files(self, files: list[tuple[Path, os.stat_result, bytes]], parent: int) -> None:
        """Copy files COPY_BATCH at a time; the next batch is read while the last one is recorded."""
        previous: _Batch | None = None
        try:
            for start in range(0, len(files), COPY_BATCH):
                if self.stop.is_set():
                    raise Stopped()
                batch = self._start_batch(files[start:start + COPY_BATCH], parent)
                if previous is not None:
                    self._finish_batch(previous, parent)
                previous = batch
            if previous is not None:
                self._finish_batch(previous, parent)
                previous = None
        finally:
            if previous is not None:  # an error stopped the copy: nothing of the batch in flight is kept
                wait(previous.copies)
                _remove_temps(previous.temps)

    def _start_batch(self, files: list[tuple[Path, os.stat_result, bytes]], parent: int) -> _Batch:
        existing = meta.child_map(self.db, parent)
        todo: list[tuple[Path, os.stat_result, bytes, meta.Inode | None]] = []
        for source, st, name in files:
            node = existing.get(name)
            uid, gid = self.owner(st)
            mode = stat.S_IFREG | stat.S_IMODE(st.st_mode)
            if len(name) > meta.NAME_MAX:
                self.report.errors.append(f"{source}: the name is longer than {meta.NAME_MAX} bytes")
            elif node is not None and node.kind != meta.FILE:
                self.report.errors.append(f"{source}: the tree has a {node.kind} by that name, not a file; "
                                          "remove it first")
            elif (node is not None and node.state != meta.DIRTY and node.size == st.st_size
                  and node.mtime_ns == _mtime(st)):
                self.report.unchanged += 1
                if (node.mode, node.uid, node.gid) != (mode, uid, gid):
                    meta.set_attrs(self.db, node.ino, mode=mode, uid=uid, gid=gid)
            elif self.direct is not None and st.st_size > self.direct_min:
                self.direct(DirectFile(source, st, parent, name, node))
            elif self.direct_small is not None and st.st_size:
                self.direct_small(DirectFile(source, st, parent, name, node))
            else:
                todo.append((source, st, name, node))
        if todo:
            self._wait_for_room(sum(st.st_size for _, st, _, _ in todo), todo[0][0])
        temps = [self.cache.root / f".put-{os.urandom(8).hex()}.part" for _ in todo]
        copies = [self._pool.submit(_copy_or_error, source, tmp, self.stop)
                  for (source, *_), tmp in zip(todo, temps, strict=True)]
        return _Batch(todo, temps, copies)

    def _finish_batch(self, batch: _Batch, parent: int) -> None:
        before = self.report.bytes
        try:
            results = [future.result() for future in batch.copies]
            if self.stop.is_set():
                raise Stopped()  # some copies may have stopped half way: record none of this batch
            full = next((r for r in results if isinstance(r, OSError) and r.errno == errno.ENOSPC), None)
            if full is not None:
                raise full
            new: list[tuple[Path, Path, meta.NewFile]] = []
            replaced: list[tuple[Path, meta.Inode, os.stat_result, Path, int]] = []
            for (source, st, name, node), tmp, result in zip(batch.todo, batch.temps, results, strict=True):
                if isinstance(result, Stopped):
                    raise result
                if isinstance(result, OSError):
                    self._failed(source, result)
                elif node is not None:
                    replaced.append((source, node, st, tmp, result))
                else:
                    uid, gid = self.owner(st)
                    new.append((source, tmp, meta.NewFile(name, stat.S_IFREG | stat.S_IMODE(st.st_mode), uid, gid,
                                                          result, _atime(st), _mtime(st))))
            if new:
                self._add_new(parent, new)
            for source, node, st, tmp, size in replaced:
                now = meta.find(self.db, node.ino)
                if now is not None and now.state == meta.DIRTY:  # being written through the mount right now
                    self.report.errors.append(f"{source}: is being written through the mount; "
                                              "not replaced (its writer's bytes would be lost): run put again "
                                              "once it is closed")
                    continue
                meta.mark_dirty(self.db, node.ino)  # an upload of the old version in flight turns stale
                os.rename(tmp, self.cache.path(node.ino))
                uid, gid = self.owner(st)
                meta.record_release(self.db, node.ino, size, _mtime(st),
                                    {"mode": stat.S_IFREG | stat.S_IMODE(st.st_mode), "uid": uid, "gid": gid,
                                     "atime_ns": _atime(st)})
                self._counted(size)
        finally:
            _remove_temps(batch.temps)
            if self.mounted and self.report.bytes > before:  # the mount's evictor counts them too
                meta.add_cache_bytes(self.db, self.report.bytes - before)
        self._progress()

    def _add_new(self, parent: int, new: list[tuple[Path, Path, meta.NewFile]]) -> None:
        """One transaction: inode numbers, contents renamed into place, rows and upload jobs."""
        with meta.batch(self.db):
            inos = meta.allocate_inos(self.db, len(new))
            for ino, (_, tmp, _) in zip(inos, new, strict=True):
                os.rename(tmp, self.cache.path(ino))
            added = meta.add_files(self.db, parent, [(ino, f) for ino, (_, _, f) in zip(inos, new, strict=True)])
        for ino, (source, _, f), ok in zip(inos, new, added, strict=True):
            if ok:
                self._counted(f.size)
            else:  # created through the mount meanwhile
                self.cache.remove(ino)
                self.report.errors.append(f"{source}: a file by that name appeared in the tree meanwhile; run "
                                          "put again to replace it")

    def _counted(self, size: int) -> None:
        self.cache.added(size)
        self.report.files += 1
        self.report.bytes += size

    def _link(self, source: Path, parent: int, name: bytes) -> None:
        st = os.lstat(source)
        target = os.fsencode(os.readlink(source))
        node = self._existing(parent, name)
        if node is not None:
            if node.kind == meta.DIR:
                raise PutError(f"{source}: the tree has a folder by that name, not a link; remove it first")
            if node.kind == meta.SYMLINK and node.target == target:
                self.report.unchanged += 1
                return
            old = meta.unlink(self.db, parent, name)
            if not self.mounted:
                meta.purge(self.db, old.ino)
                self.cache.remove(old.ino)
        uid, gid = self.owner(st)
        link = meta.create(self.db, parent, name, meta.SYMLINK, stat.S_IFLNK | 0o777, uid, gid, target)
        meta.set_attrs(self.db, link.ino, atime_ns=_atime(st), mtime_ns=_mtime(st))
        self.report.links += 1

    def _wait_for_room(self, size: int, source: Path) -> None:
        """Copying faster than uploading must not fill the disk: wait while uploads can still free room."""
        deadline = time.monotonic() + ROOM_PATIENCE
        while not self.cache.has_room(size):
            self.cache.maybe_over_limit = True  # the evictor looks again
            if not self.uploads_pending() or time.monotonic() > deadline:
                raise OSError(errno.ENOSPC, f"no room in the cache folder {self.cache.root} for {source} and "
                              f"the files copied with it ({size / 2**20:,.1f} MiB), and no upload can free any: "
                              "free some space or set FINCRYPT_CACHE_DIR to a larger disk")
            time.sleep(ROOM_WAIT)


@dataclass
class _Batch:
    """Files being copied to temporary files in the cache (``Importer._start_batch``)."""

    todo: list[tuple[Path, os.stat_result, bytes, meta.Inode | None]]
    temps: list[Path]
    copies: list[Future[int | OSError | Stopped]]


class DirectUploads:
    """Files uploaded straight from their source while the walk goes on (``put`` when not mounted).

    The walk's thread hands files over: a large one alone (``offer``), small ones gathered into packs of up to
    ``pack_size`` bytes or ``pack_max_files`` files (``offer_small``, ``end_of_walk`` for the last pack).
    DIRECT_UPLOADS tasks upload them (a pack as one object read from its members' sources:
    ``uploader.MembersReader``) and record each file as stored in one transaction per object, if its source
    still has the size and modification time the walk saw. The object's id is noted before the mediator
    commits it (``meta.note_commit``), so an upload cut short by a crash leaves a deletion, not an object
    nobody knows of; the files are then simply stored again by the next ``put``.
    """

    def __init__(self, store: ObjectStore, db: sqlite3.Connection, cache: CacheDir,
                 owner: Callable[[os.stat_result], tuple[int, int]], *, pack_size: int = 16 * 2**20,
                 pack_max_files: int = 1000) -> None:
        self.store, self.db, self.cache, self.owner = store, db, cache, owner
        self.pack_size, self.pack_max_files = pack_size, pack_max_files
        self.files = 0
        self.bytes = 0
        self.errors: list[str] = []
        self.in_flight: dict[Path, tuple[int, int]] = {}  # source -> (bytes encoded, size): progress lines
        self._send, self._receive = trio.open_memory_channel[DirectFile | list[DirectFile]](DIRECT_QUEUE)
        self._token = trio.lowlevel.current_trio_token()
        self._pack: list[DirectFile] = []  # the walk's thread only
        self._pack_bytes = 0

    def offer(self, item: DirectFile | list[DirectFile]) -> None:
        """From the walk's thread: queue a file or a pack (waits while DIRECT_QUEUE wait). Stopped once the
        uploads were stopped (Ctrl-C): the walk stops too, as between any two files."""
        try:
            trio.from_thread.run(self._send.send, item, trio_token=self._token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError, trio.Cancelled):
            raise Stopped() from None

    def offer_small(self, item: DirectFile) -> None:
        """From the walk's thread: add a small file to the pack being gathered; queue the pack once full."""
        if self._pack and self._pack_bytes + item.st.st_size > self.pack_size:
            self.end_of_walk()
        self._pack.append(item)
        self._pack_bytes += item.st.st_size
        if len(self._pack) >= self.pack_max_files:
            self.end_of_walk()

    def end_of_walk(self) -> None:
        """From the walk's thread: queue the pack being gathered, if any."""
        if self._pack:
            pack, self._pack, self._pack_bytes = self._pack, [], 0
            self.offer(pack)

    def close(self) -> None:
        """The walk is over: the uploaders end once the queued files are stored."""
        self._send.close()

    async def run(self) -> None:
        async with self._receive, trio.open_nursery() as nursery:
            async with trio.open_nursery() as uploaders:
                for _ in range(DIRECT_UPLOADS):
                    uploaders.start_soon(self._uploader, self._receive.clone())
                nursery.start_soon(self._report_progress)
            nursery.cancel_scope.cancel()

    async def _report_progress(self) -> None:
        """A line every PROGRESS_INTERVAL while large files upload (one can take minutes)."""
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            for source, (done, size) in list(self.in_flight.items()):
                print(f"put: storing {source}: {done / 2**20:,.1f} of {size / 2**20:,.1f} MiB", file=sys.stderr)

    async def _uploader(self, files: trio.MemoryReceiveChannel[DirectFile | list[DirectFile]]) -> None:
        async with files:
            async for item in files:
                if isinstance(item, list):
                    self.errors.extend(await self._store_pack(item))
                    continue
                error = await self._store(item)
                if error is not None:
                    self.errors.append(f"{item.source}: {error}")

    async def _store_pack(self, items: list[DirectFile]) -> list[str]:
        """Upload ``items`` as one pack and record those unchanged since the walk saw them; the errors."""
        reader = MembersReader([(item.source, item.st.st_size) for item in items])
        with _commit_notes(self.db) as (note_placing, note_commit):
            try:
                stored = await self.store.put_members(reader, before_place=note_placing, before_commit=note_commit)
                now = await trio.to_thread.run_sync(lambda: [_stat_or_none(item.source) for item in items])
            except (FincryptError, OSError) as exc:
                return [f"{item.source}: not stored: {exc}" for item in items]
            errors: list[str] = []
            members: list[tuple[DirectFile, meta.StoredMember]] = []
            dropped: list[tuple[int, int]] = []
            for index, (item, st) in enumerate(zip(items, now, strict=True)):
                offset, size = reader.placement(index)
                if index in reader.damaged or not _unchanged(item.st, st):
                    errors.append(f"{item.source}: {CHANGED}")
                    dropped.append((offset, size))
                    continue
                members.append((item, meta.StoredMember(item.parent, item.node, self._new_file(item), offset, size)))
            recorded = meta.add_stored_pack(self.db, stored.object_id, json.dumps(stored.to_json()),
                                            [m for _, m in members], dropped)
            for (item, m), ok in zip(members, recorded, strict=True):
                if ok:
                    self._recorded(item, m.size)
                else:
                    errors.append(f"{item.source}: {TREE_CHANGED}")
            return errors

    async def _store(self, item: DirectFile) -> str | None:
        """Upload and record one file; what went wrong, in words, or None."""
        def progress(done: int) -> None:
            self.in_flight[item.source] = (done, item.st.st_size)
        with _commit_notes(self.db) as (note_placing, note_commit):
            try:
                stored = await self.store.put_file(item.source, progress=progress, before_place=note_placing,
                                                   before_commit=note_commit)
                now = os.lstat(item.source)
            except (FincryptError, OSError) as exc:
                return f"not stored: {exc}"
            finally:
                self.in_flight.pop(item.source, None)
            if stored.size != item.st.st_size or not _unchanged(item.st, now):
                return CHANGED
            f = self._new_file(item)
            object_json = json.dumps(stored.to_json())
            if item.node is None:
                ino = meta.allocate_inos(self.db, 1)[0]
                recorded = meta.add_stored_file(self.db, item.parent, ino, f, stored.object_id, object_json)
            else:
                recorded = meta.replace_with_stored(self.db, item.node.ino, f, stored.object_id, object_json)
            if not recorded:
                return TREE_CHANGED
            self._recorded(item, stored.size)
            return None

    def _new_file(self, item: DirectFile) -> meta.NewFile:
        uid, gid = self.owner(item.st)
        return meta.NewFile(item.name, stat.S_IFREG | stat.S_IMODE(item.st.st_mode), uid, gid, item.st.st_size,
                            _atime(item.st), _mtime(item.st))

    def _recorded(self, item: DirectFile, size: int) -> None:
        if item.node is not None:
            self.cache.remove(item.node.ino)  # the old content's copy
        self.files += 1
        self.bytes += size


CHANGED = "changed while it was being stored; run put again to store the new version"
TREE_CHANGED = "the tree changed there meanwhile (that name was taken or removed); run put again"


@contextmanager
def _commit_notes(db: sqlite3.Connection) -> Iterator[tuple[Callable[[str], None], Callable[[str], None]]]:
    """A ``before_place`` and a ``before_commit`` that note each object before the mediator places and commits it
    (``meta.note_placing``, ``meta.note_commit``); the notes still there at the end (the object was not
    recorded) are abandoned: a committed object is deleted."""
    noted: list[str] = []

    def placing(object_id: str) -> None:
        meta.note_placing(db, object_id)
        noted.append(object_id)

    def commit(object_id: str) -> None:
        meta.note_commit(db, object_id)
    try:
        yield placing, commit
    finally:  # a recorded object's note is gone already: abandoning it does nothing
        for object_id in noted:
            meta.abandon_commit(db, object_id)


def _atime(st: os.stat_result) -> int:
    return meta.clamp_time_ns(st.st_atime_ns)


def _mtime(st: os.stat_result) -> int:
    """A source's mtime as the tree holds it (a file of year 2300, which ext4 can hold, stopped the whole put)."""
    return meta.clamp_time_ns(st.st_mtime_ns)


def _unchanged(seen: os.stat_result, now: os.stat_result | None) -> bool:
    return now is not None and (now.st_size, now.st_mtime_ns) == (seen.st_size, seen.st_mtime_ns)


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _remove_temps(temps: list[Path]) -> None:
    for tmp in temps:
        if os.path.lexists(tmp):  # not renamed into the cache: a failed copy or record
            tmp.unlink()


def _copy_or_error(source: Path, dest: Path, stop: threading.Event) -> int | OSError | Stopped:
    """``copy_file_to`` from ``source`` (never through a link), the error instead of raising it."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return copy_file_to(fd, dest, stop)
        finally:
            os.close(fd)
    except (OSError, Stopped) as exc:
        return exc


def print_progress(report: PutReport, direct: DirectUploads | None = None) -> None:
    stored = "" if direct is None else f"; {direct.files:,} file(s) ({direct.bytes / 2**20:,.1f} MiB) stored"
    print(f"put: {report.summary()}{stored} so far", file=sys.stderr)


async def wake_while(wake: Callable[[bool], None], done: trio.Event) -> None:
    """Tell the upload worker about new files every WAKE_INTERVAL while the copy runs."""
    while not done.is_set():
        wake(True)
        with trio.move_on_after(WAKE_INTERVAL):
            await done.wait()
    wake(True)


def _one_put(data_dir: Path) -> AbstractContextManager[int]:
    """One ``put`` at a time per data folder (then a held mount lock means a mount, not another put)."""
    return held(data_dir / "put.lock", f"another fincryptfs put is copying into {data_dir}; wait for it to finish")


def own_folders(folders: Iterable[Path], mounts: str) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the folders ``put`` never copies: ``folders`` (the data and cache folders: a copy of
    the cache would store every file twice) and every mounted Fincrypt backup listed in ``mounts`` (the text of
    /proc/self/mounts: copying a home folder that holds the mount would fetch the whole backup and store it
    inside itself)."""
    paths = list(folders)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "fincryptfs" and fields[2].startswith("fuse"):
            paths.append(Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])))
    found = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:  # not there, or another user's mount
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def _mounts() -> str:
    try:
        return Path("/proc/self/mounts").read_text()
    except OSError:
        return ""


def _check_sources(sources: Sequence[Path]) -> None:
    for source in sources:
        if not os.path.lexists(source):
            raise ConfigError(f"{source}: no such file or folder")


async def run_put(settings: ClientSettings, sources: Sequence[Path], dest: str, *, load_key: Callable[[], bytes],
                  wait: Callable[[sqlite3.Connection, threading.Event], bool]) -> tuple[PutReport, bool]:
    """Copy ``sources`` into the tree folder ``dest`` and wait until they are stored (``wait``, given a
    read-only connection to the tree and the stop flag, returns whether everything was). Returns (report,
    stored). Ctrl-C stops the copy between files and the wait at its next look (KeyboardInterrupt)."""
    _check_sources(sources)
    parts = tree_path(dest)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    (settings.data_dir / "spool").mkdir(exist_ok=True)
    db_path = meta_path(settings)
    failure: BaseException | None = None
    stored = False
    async with AsyncExitStack() as stack:
        stack.enter_context(_one_put(settings.data_dir))
        try:
            stack.enter_context(exclusive_mount(settings.data_dir))
            mounted = False
        except ConfigError:
            mounted = True  # the mount's upload worker stores what we copy
        if not mounted:
            master_key = load_key()
            if not db_path.exists():  # the account's first use on this machine: its tree may be at the mediator
                async with rpc.new_client() as http:
                    await load_or_restore_tree(open_store(settings, master_key, http, trio.CapacityLimiter(1)),
                                               master_key, db_path, settings.cache_dir)
        db = meta.connect(db_path)
        stack.callback(db.close)
        reader = meta.connect_readonly(db_path, threads=True)
        stack.callback(reader.close)
        cache = CacheDir(settings.cache_dir, settings.cache_limit_bytes)
        if not mounted:
            cache.remove_leftovers()
            for ino in meta.recover(db, cache.size):
                cache.remove(ino)
        importer = Importer(db, cache, mounted=mounted, uploads_pending=lambda: meta.has_pending_uploads(reader),
                            on_progress=print_progress,
                            exclude=own_folders([settings.data_dir, settings.cache_dir], _mounts()))

        def copy_all() -> None:
            try:
                parent = importer.folder(parts)
                for source in sources:
                    importer.put(source, parent)
                if importer.direct_end is not None:
                    importer.direct_end()  # the last pack
            finally:
                importer.close()

        async with trio.open_nursery() as nursery:  # nothing in here raises: errors leave through ``failure``
            copied = trio.Event()
            try:
                if not mounted:  # the upload queue in this process: no second Python to start
                    queue = await nursery.start(run_queue, settings, master_key, meta.counter(db, "flush_requested"))
                    evictions = meta.connect_readonly(db_path)  # the evictor's own: the other two are in threads
                    stack.callback(evictions.close)
                    nursery.start_soon(evictor, evictions, cache, lambda: ((), ()))
                    nursery.start_soon(wake_while, queue.wake, copied)
                    http = await stack.enter_async_context(rpc.new_client())
                    direct_db = meta.connect(db_path)
                    stack.callback(direct_db.close)
                    direct = DirectUploads(open_store(settings, master_key, http, trio.CapacityLimiter(CPU_THREADS)),
                                           direct_db, cache, importer.owner, pack_size=settings.pack_size,
                                           pack_max_files=settings.pack_max_files)
                    importer.direct, importer.direct_min = direct.offer, settings.pack_threshold
                    importer.direct_small = direct.offer_small if settings.pack_threshold else None
                    importer.direct_end = direct.end_of_walk
                    importer.on_progress = lambda report: print_progress(report, direct)
                    await _walk_with(direct, copy_all, importer)
                else:
                    await _stoppable(copy_all, importer.stop)
            except (OSError, FincryptError, KeyboardInterrupt) as exc:
                failure = exc
            finally:
                copied.set()
            if failure is None:
                meta.request_flush(db_path)
                if not mounted:
                    queue.look_for_flush()
                try:
                    stored = await _stoppable(lambda: wait(reader, importer.stop), importer.stop)
                except KeyboardInterrupt as exc:
                    failure = exc
                if stored and not mounted:
                    await _let_releases_run(reader)
            nursery.cancel_scope.cancel()  # the worker and the evictor
    if failure is not None:
        raise failure
    return importer.report, stored


async def _let_releases_run(reader: sqlite3.Connection) -> None:
    """Give this process's queue up to RELEASE_WAIT to release what the published snapshot no longer names
    (replaced or deleted files' objects, the previous snapshot): without a mount, nothing else would until the
    next ``put`` or mount, and the account pays for them meanwhile. Ctrl-C ends the wait; what is left is
    said, and released by the next run."""
    try:
        with trio.move_on_after(RELEASE_WAIT):
            while meta.pending_deletes(reader):
                await trio.sleep(0.05)
    except KeyboardInterrupt:
        pass
    left = meta.pending_deletes(reader)
    if left:
        print(f"put: {left} object(s) the backup no longer uses are not released yet (the mediator did not "
              f"answer in time); the next mount or put releases them", file=sys.stderr)


async def _walk_with(direct: DirectUploads, copy_all: Callable[[], None], importer: Importer) -> None:
    """Run the walk while ``direct`` uploads the large files it finds; return once both are done. Their
    results join the walk's report."""
    walk_error: BaseException | None = None
    async with trio.open_nursery() as uploads:
        uploads.start_soon(direct.run)
        try:
            await _stoppable(copy_all, importer.stop)
        except (OSError, FincryptError, KeyboardInterrupt) as exc:
            walk_error = exc
            uploads.cancel_scope.cancel()
        finally:
            direct.close()
    importer.report.files += direct.files
    importer.report.bytes += direct.bytes
    importer.report.errors.extend(direct.errors)
    if walk_error is not None:
        raise walk_error


async def _stoppable(fn: Callable[[], T], stop: threading.Event) -> T:
    """``fn()`` in a worker thread that Ctrl-C can interrupt: ``stop`` is set, and the thread is waited for
    (it ends within a file, a SENDFILE_CHUNK or a poll), so nothing still uses the tree once it is closed."""
    finished = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def run() -> T:
        try:
            return fn()
        finally:
            token.run_sync_soon(finished.set)
    try:
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except BaseException:
        stop.set()
        with trio.CancelScope(shield=True):
            await finished.wait()
        raise
