"""Share files on disk: where they live, how they get there durably, and how much room is left.

Layout of each share folder::

    <share dir>/.tmp/<share id>.<grant id>.data    upload in progress (removed at start)
    <share dir>/.tmp/<share id>.<grant id>.tree    its tree, written as the bytes arrive (removed at start)
    <share dir>/ab/<share id>.data                 the share's bytes
    <share dir>/ab/<share id>.tree                 all Merkle levels (MerkleTree.to_bytes)

``ab`` is the share id's first two hex characters (256 fan-out folders). Every path is built from a ShareId that
went through ``parse_share_id`` (checked again here), so no request can name a file outside the share folders.

Crash ordering (the node issues a receipt only after all of these):
1. data written to the temp file and fsynced; tree written to a temp file (as the data arrives) and fsynced;
2. both renamed into the fan-out folder, then that folder fsynced;
3. the database row committed (see db.py).
A crash before 3 leaves files without a row: :meth:`ShareStore.clean` removes them at the next start, so a torn
or unreceipted share is never served or proven. Deletion runs the other way: row first, then files.

Everything here blocks (file I/O, fsync): callers run it in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fincryptfs.core.errors import ConfigError, PolicyError
from fincryptfs.core.ids import ShareId, parse_share_id
from fincryptfs.core.merkle import HASH_BYTES, TreeFileWriter, leaf_count, level_widths
from fincryptfs.core.settings import ShareDir
from fincryptfs.run_daemon import why_not_created

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
_IOV_MAX = 1024  # POSIX minimum is 16, Linux allows 1024; one upload flush holds far fewer chunks
WRITEBACK_BYTES = 8 * 1024 * 1024  # start the disk writing a share every this many bytes (see write_chunks)


def tree_file_size(size: int) -> int:
    return HASH_BYTES * sum(level_widths(leaf_count(size)))


def disk_bytes(size: int) -> int:
    """What a share of ``size`` bytes costs on disk (data + tree), for capacity accounting."""
    return size + tree_file_size(size)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SharePaths:
    data: Path
    tree: Path


class ShareFolder:
    """One configured share folder with its capacity; ``used`` and ``reserved`` are kept by the ShareStore."""

    def __init__(self, config: ShareDir) -> None:
        # absolute: the database names the folder of every share by this key, whatever the working directory
        self.root = Path(os.path.abspath(config.path))
        self.key = str(self.root)
        self.capacity = config.capacity_bytes
        self.used = 0
        self.reserved = 0
        self.problem: str | None = None  # why the folder cannot take shares now (disk gone, read-only), if so

    def paths(self, share_id: ShareId) -> SharePaths:
        sid = parse_share_id(share_id)
        folder = self.root / sid[:2]
        return SharePaths(folder / f"{sid}.data", folder / f"{sid}.tree")

    def temp_path(self, share_id: ShareId, grant_id: str) -> Path:
        sid = parse_share_id(share_id)
        if len(grant_id) != 32 or not all(c in "0123456789abcdef" for c in grant_id):
            raise ValueError("grant id must be 32 hex characters")
        return self.root / TMP_DIR / f"{sid}.{grant_id}.data"



@dataclass(frozen=True)
class FolderSpace:
    """One share folder's space figures at one instant (input of the pure accounting functions below)."""

    device: int  # st_dev: folders on one filesystem draw on the same free space
    capacity: int
    used: int
    reserved: int  # held for uploads in flight into this folder
    disk_free: int  # the filesystem's free bytes for unprivileged writes (f_bavail * f_frsize)


def device_rooms(folders: Sequence[FolderSpace], reserve: int) -> dict[int, int]:
    """Free space above the reserve that no upload in flight holds, once per filesystem.

    The reservations of *every* folder on a filesystem come off its free space: counting them per folder let
    two folders on one disk promise the same bytes twice and eat into the reserve.
    """
    free: dict[int, int] = {}
    held: dict[int, int] = {}
    for f in folders:
        free.setdefault(f.device, f.disk_free)
        held[f.device] = held.get(f.device, 0) + f.reserved
    return {device: max(0, free[device] - reserve - held[device]) for device in free}


def folder_rooms(folders: Sequence[FolderSpace], reserve: int) -> list[int]:
    """What a new share may take in each folder: the lower of its capacity left and its filesystem's room."""
    rooms = device_rooms(folders, reserve)
    return [max(0, min(f.capacity - f.used - f.reserved, rooms[f.device])) for f in folders]


def total_room(folders: Sequence[FolderSpace], reserve: int) -> int:
    """Bytes the node can still accept in all: per filesystem, the lower of its room and the capacity left
    in its folders (a filesystem's free space is counted once, however many folders it holds)."""
    rooms = device_rooms(folders, reserve)
    by_capacity: dict[int, int] = {}
    for f in folders:
        by_capacity[f.device] = by_capacity.get(f.device, 0) + max(0, f.capacity - f.used - f.reserved)
    return sum(min(room, by_capacity[device]) for device, room in rooms.items())


class ShareWriter:
    """An upload in progress: bytes go to a temp file, their tree to another (TreeFileWriter: memory stays bounded
    whatever the share size); nothing is visible until commit."""

    def __init__(self, folder: ShareFolder, share_id: ShareId, grant_id: str) -> None:
        self.folder = folder
        self.share_id = parse_share_id(share_id)
        self.temp = folder.temp_path(share_id, grant_id)
        self.tree_temp = self.temp.with_suffix(".tree")
        self._fd: int | None = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._tree_fd: int | None = None
        try:
            tree_fd = os.open(self.tree_temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except BaseException:
            self.abort()
            raise
        self._tree_fd = tree_fd
        self._builder = TreeFileWriter(lambda offset, length: read_exact(tree_fd, length, offset),
                                       lambda offset, data: _pwrite_all(tree_fd, data, offset))
        self._written_back = 0  # bytes before this offset were handed to the disk (writeback started)

    @property
    def size(self) -> int:
        return self._builder.size

    def write_chunks(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """Append the chunks with one ``writev`` and hash them as received (no copy to coalesce them first)."""
        assert self._fd is not None
        views = [memoryview(chunk) for chunk in chunks if len(chunk)]
        while views:
            written = os.writev(self._fd, views[:_IOV_MAX])
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if written:
                views[0] = views[0][written:]
        for chunk in chunks:
            self._builder.update(chunk)
        self._start_writeback()

    def _start_writeback(self) -> None:
        """Have the kernel start writing what was received so far, without waiting for it.

        Otherwise every byte of a share is still dirty in the page cache when ``commit`` fsyncs it, and the
        receipt waits for the whole share to reach the disk while the CPU idles (measured: that fsync took
        0.12-0.15 s for an 85 MiB share, 0.01-0.02 s with this). ``POSIX_FADV_DONTNEED`` starts asynchronous
        writeback of the range (and drops pages already clean: a stored share is read again only by audits and
        fetches, so it need not crowd the cache).
        """
        assert self._fd is not None
        size = self._builder.size
        if size - self._written_back >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self._written_back, size - self._written_back, os.POSIX_FADV_DONTNEED)
            self._written_back = size

    def finish(self) -> bytes:
        """Complete the tree file (levels above the leaves, read back from it in bounded chunks); the root."""
        return self._builder.finish()

    def commit(self) -> SharePaths:
        """Make the share durable and visible under its final name (steps 1 and 2 of the crash ordering)."""
        assert self._fd is not None and self._tree_fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        paths = self.folder.paths(self.share_id)
        try:
            os.fsync(self._tree_fd)
        finally:
            os.close(self._tree_fd)
            self._tree_fd = None
        parent = paths.data.parent
        if not parent.is_dir():
            parent.mkdir(exist_ok=True)
            _fsync_dir(self.folder.root)
        os.replace(self.tree_temp, paths.tree)
        os.replace(self.temp, paths.data)
        _fsync_dir(parent)
        return paths

    def abort(self) -> None:
        for fd in (self._fd, self._tree_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._tree_fd = None
        for path in (self.temp, self.tree_temp):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


class ShareStore:
    """All share folders: placement of new shares, space accounting, removal and start-up cleanup."""

    def __init__(self, dirs: tuple[ShareDir, ...], reserve_bytes: int, shares_by_dir: Mapping[str, int], *,
                 data_dir: Path | None = None) -> None:
        """Open the share folders; ``shares_by_dir`` (from the database) tells a new folder, created here, from
        one that held shares and has gone (ConfigError: the node must not start). Nested folders are refused, and
        so is a share folder holding the node's ``data_dir``.

        A folder recorded as a relative or unnormalised path (as older versions stored it) is found by its
        absolute path: ``by_key`` knows it under both names, and :attr:`aliases` lists them."""
        self.folders = [ShareFolder(d) for d in dirs]
        _refuse_overlaps(self.folders)
        if data_dir is not None:
            _refuse_data_dir_inside(self.folders, data_dir)
        self.by_key = {f.key: f for f in self.folders}
        self.aliases: dict[str, str] = {}  # folder name as recorded in the database → its key
        for recorded in shares_by_dir:
            folder = self.by_key.get(os.path.abspath(recorded))
            if recorded not in self.by_key and folder is not None:
                self.aliases[recorded] = folder.key
        self.by_key.update({recorded: self.by_key[key] for recorded, key in self.aliases.items()})
        self.reserve = reserve_bytes
        for folder in self.folders:
            _open_folder(folder, sum(n for recorded, n in shares_by_dir.items()
                                     if self.by_key.get(recorded) is folder))

    def space(self) -> list[FolderSpace]:
        """Every folder's figures now. A folder that cannot take shares (see :meth:`_look_at`) has no room, on a
        device of its own: the node goes on with the others, and uses it again once it is back."""
        disk_free: dict[int, int] = {}
        spaces = []
        for index, f in enumerate(self.folders):
            found = self._look_at(f)
            if found is None:
                spaces.append(FolderSpace(-1 - index, f.capacity, f.used, f.reserved, 0))
                continue
            device, free = found
            disk_free.setdefault(device, free)
            spaces.append(FolderSpace(device, f.capacity, f.used, f.reserved, disk_free[device]))
        return spaces

    def _look_at(self, folder: ShareFolder) -> tuple[int, int] | None:
        """The device and free bytes of a folder that can take shares now; None (logged once, with what to do)
        for one that cannot: gone or without its ``.tmp`` (a disk unmounted under a running node leaves its empty
        mount point: shares written there would land on the wrong disk), or read-only. Its problem is kept in
        :attr:`ShareFolder.problem` for ``/health`` and ``storaged status``."""
        tmp = folder.root / TMP_DIR
        found: tuple[int, int] | None = None
        problem: str | None = None
        try:
            device = os.stat(tmp).st_dev
            stats = os.statvfs(tmp)
        except OSError as exc:
            problem = ("it is not there (is its disk mounted?)" if exc.errno in (errno.ENOENT, errno.ENOTDIR)
                       else f"it cannot be read ({exc.strerror})")
        else:
            if stats.f_flag & os.ST_RDONLY:
                problem = "its filesystem is read-only (a failing disk is often remounted read-only)"
            elif not os.access(tmp, os.W_OK | os.X_OK):
                problem = "this node may not write to it (check its owner and permissions)"
            else:
                found = (device, stats.f_bavail * stats.f_frsize)
        if problem != folder.problem:
            if problem is not None:
                log.error("share folder %s cannot be used: %s. No new shares go there, and its shares are reported "
                          "missing when they cannot be read; fix it and the node uses the folder again by itself",
                          folder.root, problem)
            else:
                log.warning("share folder %s can be used again", folder.root)
            folder.problem = problem
        return found

    def problems(self) -> list[str]:
        """What is wrong with the share folders as last seen, in words an operator can act on."""
        return [f"share folder {f.root}: {f.problem}" for f in self.folders if f.problem is not None]

    def free_bytes(self) -> int:
        return total_room(self.space(), self.reserve)

    def capacity_bytes(self) -> int:
        return sum(f.capacity for f in self.folders)

    def reserve_space(self, size: int) -> ShareFolder:
        """Pick the folder with the most room for a share and hold its space (PolicyError 507 if none has)."""
        need = disk_bytes(size)
        spaces = self.space()
        rooms = folder_rooms(spaces, self.reserve)
        room, best = max(zip(rooms, self.folders, strict=True), key=lambda pair: pair[0])
        if room < need:
            raise PolicyError(f"this node has no room for a share of {size} bytes (free: "
                              f"{total_room(spaces, self.reserve)} bytes after its reserve)", status=507)
        best.reserved += need
        return best

    def release_reservation(self, folder: ShareFolder, size: int, *, stored: bool) -> None:
        need = disk_bytes(size)
        folder.reserved -= need
        if stored:
            folder.used += need

    def account_existing(self, folder_key: str, size: int) -> None:
        folder = self.by_key.get(folder_key)
        if folder is not None:
            folder.used += disk_bytes(size)

    def paths(self, folder_key: str, share_id: ShareId) -> SharePaths | None:
        folder = self.by_key.get(folder_key)
        return None if folder is None else folder.paths(share_id)

    def remove(self, folder_key: str, share_id: ShareId, size: int) -> None:
        """Unlink a share's files (after its row is gone) and give its space back."""
        folder = self.by_key.get(folder_key)
        if folder is None:
            return
        paths = folder.paths(share_id)
        folder.used = max(0, folder.used - disk_bytes(size))  # its row is gone: whatever the unlinks do
        for path in (paths.data, paths.tree):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def clean(self, known: Container[str]) -> int:
        """Start-up cleanup: drop temp files and any share file whose id has no database row. Returns count."""
        removed = 0
        for folder in self.folders:
            try:
                removed += _clean_folder(folder, known)
            except OSError as exc:  # a read-only or failing disk: serve what can be served, try again next start
                log.error("could not clean up share folder %s (%s): its leftovers stay until the next start",
                          folder.root, exc)
        if removed:
            log.info("cleanup removed=%d (temp files and files without a database row)", removed)
        return removed

    def count_share_files(self) -> dict[Path, int]:
        """How many share data files each folder's two-character subfolders hold (folders that cannot be read
        count none)."""
        counts: dict[Path, int] = {}
        for folder in self.folders:
            counts[folder.root] = 0
            try:
                for sub in os.scandir(folder.root):
                    if sub.is_dir(follow_symlinks=False) and len(sub.name) == 2 and sub.name != TMP_DIR:
                        counts[folder.root] += sum(1 for e in os.scandir(sub.path) if e.name.endswith(".data"))
            except OSError:
                pass
        return counts

    def check_files(self, folder_key: str, share_id: ShareId, size: int) -> bool:
        """Whether both files of a share exist with the sizes its row promises."""
        paths = self.paths(folder_key, share_id)
        if paths is None:
            return False
        try:
            return paths.data.stat().st_size == size and paths.tree.stat().st_size == tree_file_size(size)
        except OSError:
            return False


def _refuse_overlaps(folders: Sequence[ShareFolder]) -> None:
    """ConfigError if two share folders are one (through a symlink, say) or one lies inside another.

    The start-up cleanup of a folder deletes whatever its two-character subfolders hold that has no database
    row, and ``.tmp/`` whole: an inner share folder there (``/srv/a/ab``) would lose its shares, and any inner
    folder would have its space counted twice.
    """
    real = [(f, Path(os.path.realpath(f.root))) for f in folders]
    for i, (outer, outer_real) in enumerate(real):
        for inner, inner_real in real[i + 1:]:
            if outer_real == inner_real:
                raise ConfigError(f"share folders {outer.root} and {inner.root} are the same folder "
                                  f"({outer_real}): list it once in STORAGED_SHARE_DIRS")
            for a, a_real, b, b_real in ((outer, outer_real, inner, inner_real),
                                         (inner, inner_real, outer, outer_real)):
                if b_real.is_relative_to(a_real):
                    raise ConfigError(f"share folder {b.root} is inside share folder {a.root}: the cleanup of "
                                      f"{a.root} at start could delete its shares. Give each share folder in "
                                      "STORAGED_SHARE_DIRS its own place, none inside another")


def _refuse_data_dir_inside(folders: Sequence[ShareFolder], data_dir: Path) -> None:
    """ConfigError if the node's data folder lies inside a share folder.

    The start-up cleanup deletes every file of a share folder's ``.tmp`` and two-character subfolders that is
    not a share: a data folder there (``/srv/fincrypt/db``) lost the node's identity and database at the first
    start. The data folder may be a share folder itself (its own files are not in those subfolders), or hold one
    (the default, ``$STORAGED_DATA_DIR/shares``).
    """
    data_real = Path(os.path.realpath(data_dir))
    for folder in folders:
        root_real = Path(os.path.realpath(folder.root))
        if data_real != root_real and data_real.is_relative_to(root_real):
            raise ConfigError(f"STORAGED_DATA_DIR {data_dir} is inside share folder {folder.root}: the cleanup of "
                              "a share folder at start could delete the node's identity and database. Put the "
                              "data folder beside the share folders (or make it one of them), and list in "
                              "STORAGED_SHARE_DIRS no folder that holds it")


def _open_folder(folder: ShareFolder, shares: int) -> None:
    """Create a new share folder; refuse one that should hold ``shares`` shares but is absent or empty.

    Every folder the node has used has a ``.tmp`` folder. Without it, the folder is not the one the shares were
    stored in: typically its disk is not mounted (yet), and the mount point is an empty folder of the root
    filesystem. Creating it there would store new shares on the wrong disk and mark every share of the real one
    missing, so the node refuses to start instead.
    """
    if (folder.root / TMP_DIR).is_dir():
        return
    if shares:
        found = "is empty" if folder.root.is_dir() else "does not exist"
        raise ConfigError(
            f"share folder {folder.root} holds {shares} shares according to the node's database but {found}: "
            "mount its disk (or restore the folder) and start the node again. To give those shares up for good, "
            "remove the folder from STORAGED_SHARE_DIRS: the mediators will then repair them on other nodes.")
    try:
        (folder.root / TMP_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise ConfigError(f"share folder {folder.root} cannot be created ({why_not_created(exc)}): fix its path "
                          "in STORAGED_SHARE_DIRS or its permissions") from exc
    log.info("share folder created path=%s", folder.root)


def _clean_folder(folder: ShareFolder, known: Container[str]) -> int:
    """Remove one folder's temp files and share files without a row; returns how many."""
    removed = 0
    for entry in os.scandir(folder.root / TMP_DIR):
        _remove(Path(entry.path))
        removed += 1
    for sub in os.scandir(folder.root):
        if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2 or sub.name == TMP_DIR:
            continue
        for entry in os.scandir(sub.path):
            stem, _, suffix = entry.name.partition(".")
            if stem in known and suffix in ("data", "tree"):
                continue
            _remove(Path(entry.path))
            removed += 1
    return removed


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    """pwrite all of ``data`` (a regular file's pwrite may still write less, e.g. when the disk fills up)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def read_exact(fd: int, length: int, offset: int) -> bytes:
    """pread that fails loudly on a short read (a truncated share file is corruption, not EOF)."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"short read: {len(data)} of {length} bytes at {offset}")
    return data

