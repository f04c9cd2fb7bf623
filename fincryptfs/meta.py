"""The client's local tree: inodes, upload and delete jobs, and version counters in one SQLite file (WAL).

Every SQL statement of the client lives here, as small functions over a ``sqlite3.Connection``; each public
function that changes something is one short transaction, because FUSE handlers call them on the event loop.

Crash ordering (what makes ``kill -9`` lose nothing that was closed):

* ``record_release`` commits the new inode state *and* the upload job in one transaction before the upload
  queue is woken; at start ``recover`` turns jobs left ``uploading`` back into ``pending``.
* ``finish_upload`` stores the object only if the inode still has the version the job was made for; otherwise
  the new object is stale and is queued for deletion.
* A superseded object is deleted only after a snapshot that no longer references it was published
  (``delete_jobs.after_version``), so a restore from the latest snapshot never points at a deleted object.
* An object about to be committed at the mediator is first recorded as a deletion that cannot run yet
  (``note_commit``, ``after_version`` = COMMITTING); the transaction that makes it a file's content
  (``finish_upload``, ``finish_pack``) removes that row. A client killed in between, or an upload that failed
  after the mediator may have committed it, leaves the row, which ``resume_uploads`` / ``abandon_commit`` turn
  into a deletion that runs at once: no object the tree never recorded stays stored (and paid for). A tree
  snapshot's note (SNAPSHOT_COMMITTING) is settled against the account's pointer instead: deleted unless the
  pointer names it (``snapshot_commits``, ``settle_snapshot_commit``).
* An object about to be placed is noted the same way first (``note_placing``, PLACING): a client killed while its
  shares stream out leaves the row, and the next start (``resume_uploads``) turns it into a deletion. Until then
  such objects stayed placed at the mediator, their shares on the nodes, until its sweep a day later: one per
  ``kill -9`` of an upload worker. An upload that fails in the process releases what it placed itself, so its
  note is simply dropped (``abandon_commit``).

Packs: small files are uploaded together as one object (a *pack*, ``fincryptfs.packs``). A packed file's
``object`` column holds a :class:`PackRef` (``{"pack", "offset", "size"}``) instead of a StoredObject; the
``packs`` table holds each pack's StoredObject and how many inodes still reference it (``live``). Every place
that drops or replaces an inode's content goes through ``_release``: a plain object is queued for deletion, a
pack reference decrements ``live``, and a pack nobody references is queued for deletion like an object (after
a snapshot without it is published). Both tables travel in the snapshot, so a restore reads packed files too.

Counters: ``meta_version`` is bumped by every change that a snapshot should carry; ``published_version`` is the
``meta_version`` of the last snapshot whose pointer the mediator stored; ``pointer_version`` is that pointer's
own version number at the mediator.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT_INO = 1
COMMITTING = 2**62  # after_version of the deletion kept for an object being committed (no snapshot reaches it)
SNAPSHOT_COMMITTING = COMMITTING + 1  # the same for a tree snapshot, settled against the account's pointer
PLACING = COMMITTING + 2  # after_version of the note kept for an object being placed and stored (``note_placing``)
NAME_MAX = 255  # bytes in one name, as on Linux file systems (the mount and put both refuse longer)
FILE, DIR, SYMLINK = "file", "dir", "symlink"
DIRTY, PENDING, STORED = "dirty", "pending", "stored"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY,
    parent INTEGER,
    name BLOB,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink')),
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    target BLOB,
    version INTEGER NOT NULL DEFAULT 0,
    object TEXT,
    state TEXT NOT NULL DEFAULT 'stored' CHECK (state IN ('dirty', 'pending', 'stored')),
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS inodes_state ON inodes (state);
CREATE INDEX IF NOT EXISTS inodes_subdirs ON inodes (parent) WHERE kind = 'dir';
-- a folder's children in inode order (``children``: readdir pages through them 1,000 at a time); without it
-- each page read and sorted the whole folder: listing a folder of 200,000 files took 7 s (0.7 s with it)
CREATE INDEX IF NOT EXISTS inodes_parent ON inodes (parent);
CREATE TABLE IF NOT EXISTS upload_jobs (
    id INTEGER PRIMARY KEY,
    ino INTEGER NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'uploading', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS upload_jobs_state ON upload_jobs (state, not_before);
-- a file's close supersedes its pending jobs: without this, each close scanned every pending job (quadratic
-- while thousands of small files wait for their pack)
CREATE INDEX IF NOT EXISTS upload_jobs_ino ON upload_jobs (ino, state);
CREATE TABLE IF NOT EXISTS delete_jobs (
    object_id TEXT PRIMARY KEY,
    after_version INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    not_before REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS packs (
    pack_id TEXT PRIMARY KEY,
    object TEXT NOT NULL,
    live INTEGER NOT NULL
);
-- the ranges of live packs holding a released file's old bytes (deleted, replaced, emptied), or bytes no file
-- ever referenced (a member changed or deleted while its pack was uploaded), kept while the pack lives: zeroed
-- in the pack's cached copy once no handle on the file is open (``zeroed`` then 1), and in every copy fetched
-- later (``stale_ranges``)
CREATE TABLE IF NOT EXISTS stale_members (
    ino INTEGER NOT NULL,
    pack_id TEXT NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    zeroed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS stale_members_pack ON stale_members (pack_id);
-- an index on json_extract(object, '$.pack') found a pack's members to copy them out; packs are read in place now
DROP INDEX IF EXISTS inodes_pack;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('meta_version', 0), ('published_version', 0), ('pointer_version', 0);
INSERT OR IGNORE INTO counters VALUES ('flush_requested', 0);
-- bytes ``fincryptfs put`` wrote into the cache of a running mount, whose evictor adds them to its count
INSERT OR IGNORE INTO counters VALUES ('cache_added', 0);
-- why the last publish of the tree failed, for flush and status (the publisher runs in another process)
CREATE TABLE IF NOT EXISTS publish_problem (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    message TEXT NOT NULL,
    blocked INTEGER NOT NULL,  -- 1: retrying cannot help until the user acts (another machine published)
    since REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Inode:
    ino: int
    parent: int | None
    name: bytes | None
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    target: bytes | None
    version: int
    object: str | None
    state: str


@dataclass(frozen=True)
class UploadJob:
    id: int
    ino: int
    version: int
    attempts: int
    size: int = 0  # the inode's size when the job was claimed (decides packing)
    created: float = 0.0


@dataclass(frozen=True)
class PackRef:
    """Where a packed file's bytes are: ``size`` bytes at ``offset`` of the pack object ``pack_id``."""

    pack_id: str
    offset: int
    size: int

    def to_json(self) -> str:
        return json.dumps({"pack": self.pack_id, "offset": self.offset, "size": self.size})


def is_packed(object_json: str | None) -> bool:
    """Whether an inode's ``object`` column names a range of a pack (``pack_ref`` without parsing it)."""
    return object_json is not None and object_json.startswith('{"pack"')


def pack_ref(object_json: str | None) -> PackRef | None:
    """The PackRef in an inode's ``object`` column, or None for a plain object (or no content)."""
    if object_json is None or '"pack"' not in object_json:
        return None
    value = json.loads(object_json)
    if "pack" not in value:
        return None
    return PackRef(str(value["pack"]), int(value["offset"]), int(value["size"]))


def live_packs(db: sqlite3.Connection) -> set[str]:
    """The packs some file still references."""
    return {row[0] for row in db.execute("SELECT pack_id FROM packs")}


def content_object_id(object_json: str) -> str:
    """The network object holding this content: the object itself, or the pack it is in."""
    ref = pack_ref(object_json)
    return ref.pack_id if ref is not None else str(json.loads(object_json)["object_id"])


@dataclass(frozen=True)
class DeleteJob:
    object_id: str
    attempts: int


class NotFound(LookupError):
    """No inode with that name or number."""


class Exists(LookupError):
    """The name is taken in that directory."""


_COLS = "ino, parent, name, kind, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, target, version, object, state"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if new) the tree at ``path``, with the root directory present."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(_SCHEMA)
    _migrate(db)
    if find(db, ROOT_INO) is None:
        now = time.time_ns()
        with _tx(db):
            db.execute(f"INSERT INTO inodes ({_COLS}) VALUES (?, NULL, NULL, 'dir', ?, 0, 0, 0, ?, ?, ?, NULL, 0, "
                       "NULL, 'stored')", (ROOT_INO, 0o40755, now, now, now))
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Columns added to tables that ``_SCHEMA`` creates only when they are missing."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(stale_members)")}
    if "zeroed" not in columns:  # the first form of the table, without the per-copy mark
        db.execute("ALTER TABLE stale_members ADD COLUMN zeroed INTEGER NOT NULL DEFAULT 0")


def connect_readonly(path: Path, *, threads: bool = False) -> sqlite3.Connection:
    """A reader for ``status`` and ``flush`` while a mount writes (WAL lets both run); ``threads``: usable from
    any thread (one at a time)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=not threads)
    db.execute("PRAGMA busy_timeout=5000")
    return db


class _tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one short write transaction, or a part of the ``batch``
    already open on this connection (which then commits or rolls back the whole)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.joined = False

    def __enter__(self) -> sqlite3.Connection:
        self.joined = self.db.in_transaction
        if not self.joined:
            self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.joined:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def batch(db: sqlite3.Connection) -> _tx:
    """One write transaction around many changes (``fincryptfs put``: a commit per file cost a fifth of its
    time). Keep it short: it holds the tree's write lock, which the mount and the upload worker wait for."""
    return _tx(db)


def _bump(db: sqlite3.Connection) -> int:
    """The next ``meta_version`` (one statement: it runs in every change of the tree, twice per file copied in)."""
    return int(db.execute("UPDATE counters SET value = value + 1 WHERE name = 'meta_version' RETURNING value"
                          ).fetchone()[0])


def add_cache_bytes(db: sqlite3.Connection, nbytes: int) -> None:
    """Tell a running mount's evictor that another process (``put``) wrote ``nbytes`` into the cache."""
    with _tx(db):
        db.execute("UPDATE counters SET value = value + ? WHERE name = 'cache_added'", (nbytes,))


def counter(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _row(row: tuple | None) -> Inode | None:
    return None if row is None else Inode(*row)


# --- reading the tree ---------------------------------------------------------------------------------------


def find(db: sqlite3.Connection, ino: int) -> Inode | None:
    return _row(db.execute(f"SELECT {_COLS} FROM inodes WHERE ino = ?", (ino,)).fetchone())


def get(db: sqlite3.Connection, ino: int) -> Inode:
    inode = find(db, ino)
    if inode is None:
        raise NotFound(ino)
    return inode


def lookup(db: sqlite3.Connection, parent: int, name: bytes) -> Inode:
    inode = _row(db.execute(f"SELECT {_COLS} FROM inodes WHERE parent = ? AND name = ?", (parent, name)).fetchone())
    if inode is None:
        raise NotFound(name)
    return inode


def children(db: sqlite3.Connection, parent: int, after_ino: int = 0) -> list[Inode]:
    rows = db.execute(f"SELECT {_COLS} FROM inodes WHERE parent = ? AND ino > ? ORDER BY ino LIMIT 1000",
                      (parent, after_ino)).fetchall()
    return [Inode(*r) for r in rows]


def has_children(db: sqlite3.Connection, ino: int) -> bool:
    return db.execute("SELECT 1 FROM inodes WHERE parent = ? LIMIT 1", (ino,)).fetchone() is not None


def subdir_count(db: sqlite3.Connection, ino: int) -> int:
    return int(db.execute("SELECT count(*) FROM inodes WHERE parent = ? AND kind = 'dir'", (ino,)).fetchone()[0])


def path_of(db: sqlite3.Connection, ino: int) -> str | None:
    """The path of ``ino`` below the mount point ("/a/b"), or None for an unlinked inode (many at once:
    ``PathNamer``)."""
    inode = find(db, ino)
    return None if inode is None else PathNamer(db).of(inode)


class PathNamer:
    """Paths of many inodes (``fincryptfs status`` lists every file): one query per folder, remembered, where
    ``path_of`` reads every ancestor for every file (8 s for a million files in a thousand folders)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._folders: dict[int, str | None] = {ROOT_INO: ""}

    def of(self, inode: Inode) -> str | None:
        """The path of ``inode`` ("/a/b"), or None if it or a folder above it is unlinked."""
        if inode.ino == ROOT_INO:
            return "/"
        if inode.parent is None or inode.name is None:
            return None
        folder = self._folder(inode.parent)
        return None if folder is None else f"{folder}/{inode.name.decode('utf-8', 'surrogateescape')}"

    def _folder(self, ino: int) -> str | None:
        chain: list[tuple[int, bytes]] = []  # folders not named yet, from ``ino`` up
        while ino not in self._folders:
            row = self.db.execute("SELECT parent, name FROM inodes WHERE ino = ?", (ino,)).fetchone()
            if row is None or row[0] is None:
                self._folders[ino] = None
                break
            chain.append((ino, row[1]))
            ino = row[0]
        path = self._folders[ino]
        for folder, name in reversed(chain):
            path = None if path is None else f"{path}/{name.decode('utf-8', 'surrogateescape')}"
            self._folders[folder] = path
        return path


def files(db: sqlite3.Connection) -> Iterator[Inode]:
    for row in db.execute(f"SELECT {_COLS} FROM inodes WHERE kind = 'file' AND parent IS NOT NULL ORDER BY ino"):
        yield Inode(*row)


# --- changing the tree --------------------------------------------------------------------------------------


def create(db: sqlite3.Connection, parent: int, name: bytes, kind: str, mode: int, uid: int, gid: int,
           target: bytes | None = None, *, dirty: bool = False) -> Inode:
    """A new, empty inode; an empty file needs no object, so it starts out ``stored``.

    ``dirty``: a file created to be written at once (``create(2)``) starts as version 1, ``dirty``, as if
    ``mark_dirty`` had run in the same transaction (one transaction less per new file).
    """
    now = time.time_ns()
    size = len(target) if target is not None else 0
    version, state = (1, DIRTY) if dirty else (0, STORED)
    try:
        with _tx(db):
            row = db.execute(
                f"INSERT INTO inodes (ino, parent, name, kind, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, "
                f"target, version, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_COLS}",
                (_next_ino(db), parent, name, kind, mode, uid, gid, size, now, now, now, target, version, state)
            ).fetchone()
            db.execute("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino = ?", (now, now, parent))
            _bump(db)
    except sqlite3.IntegrityError as exc:
        raise Exists(name) from exc
    return Inode(*row)


@dataclass(frozen=True)
class NewFile:
    """A file ``add_files`` creates already written and closed (``fincryptfs put``)."""

    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int


def allocate_inos(db: sqlite3.Connection, count: int) -> list[int]:
    """``count`` fresh inode numbers (see ``_next_ino``), for ``add_files`` in the same transaction."""
    with _tx(db):
        first = _next_ino(db)
        if count > 1:
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'last_ino'", (count - 1,))
    return list(range(first, first + count))


def add_files(db: sqlite3.Connection, parent: int, files: Sequence[tuple[int, NewFile]]) -> list[bool]:
    """Insert closed files (ino from ``allocate_inos``, content already in the cache) with their upload jobs,
    as ``create`` + ``record_release`` would, in a few statements per file instead of a dozen. A name taken
    meanwhile is not inserted (False at its place)."""
    now = time.time_ns()
    added: list[bool] = []
    with _tx(db):
        for ino, f in files:
            try:
                db.execute(f"INSERT INTO inodes ({_COLS}) VALUES (?, ?, ?, 'file', ?, ?, ?, ?, ?, ?, ?, NULL, 1, "
                           "NULL, ?)", (ino, parent, f.name, f.mode, f.uid, f.gid, f.size, f.atime_ns, f.mtime_ns,
                                        f.mtime_ns, PENDING if f.size else STORED))
            except sqlite3.IntegrityError:
                added.append(False)
                continue
            if f.size:
                db.execute("INSERT INTO upload_jobs (ino, version, state, created) VALUES (?, 1, 'pending', ?)",
                           (ino, time.time()))
            added.append(True)
        if any(added):
            db.execute("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino = ?", (now, now, parent))
            _bump(db)
    return added


def _insert_stored(db: sqlite3.Connection, parent: int, ino: int, f: NewFile, object_json: str) -> bool:
    """Insert a file whose content is already stored; False if the name is taken."""
    try:
        db.execute(f"INSERT INTO inodes ({_COLS}) VALUES (?, ?, ?, 'file', ?, ?, ?, ?, ?, ?, ?, NULL, 1, ?, ?)",
                   (ino, parent, f.name, f.mode, f.uid, f.gid, f.size, f.atime_ns, f.mtime_ns, f.mtime_ns,
                    object_json, STORED))
    except sqlite3.IntegrityError:
        return False
    return True


def _replace_stored(db: sqlite3.Connection, ino: int, f: NewFile, object_json: str) -> tuple[bool, str | None]:
    """Make stored content (and ``f``'s attributes) the next version of the file ``ino``: an upload of the old
    version still queued is dropped. (False, None) if the file is gone or is no file; else (True, the object
    JSON it had, to release)."""
    row = db.execute("SELECT parent, kind, object FROM inodes WHERE ino = ?", (ino,)).fetchone()
    if row is None or row[0] is None or row[1] != FILE:
        return False, None
    db.execute("UPDATE upload_jobs SET state = 'done', last_error = 'superseded' WHERE ino = ? AND state = 'pending'",
               (ino,))
    db.execute("UPDATE inodes SET mode = ?, uid = ?, gid = ?, size = ?, atime_ns = ?, mtime_ns = ?, ctime_ns = ?, "
               "object = ?, state = ?, version = version + 1 WHERE ino = ?",
               (f.mode, f.uid, f.gid, f.size, f.atime_ns, f.mtime_ns, time.time_ns(), object_json, STORED, ino))
    return True, row[2]


def add_stored_file(db: sqlite3.Connection, parent: int, ino: int, f: NewFile, object_id: str, object_json: str
                    ) -> bool:
    """Insert a closed file whose content is already stored as ``object_id`` (``fincryptfs put`` uploads
    large files straight from their source, without a cache copy) and drop the object's commit note. False if
    the name was taken meanwhile (the note stays: ``abandon_commit`` it). The folder's times are left alone:
    put gives it its source's once its walk is over, which may be before this upload is recorded."""
    with _tx(db):
        if not _insert_stored(db, parent, ino, f, object_json):
            return False
        _committed(db, object_id)
        _bump(db)
    return True


def replace_with_stored(db: sqlite3.Connection, ino: int, f: NewFile, object_id: str, object_json: str) -> bool:
    """Make the stored object ``object_id`` the content (and ``f`` the attributes) of the existing file ``ino``
    (``put`` replacing a file with a large one): a new version, so an upload of the old one in flight turns
    stale; the old content is released. False if the file is gone or is no file any more."""
    with _tx(db):
        replaced, old = _replace_stored(db, ino, f, object_json)
        if not replaced:
            return False
        _committed(db, object_id)
        meta_version = _bump(db)
        if old is not None:
            _release(db, ino, old, meta_version)
    return True


@dataclass(frozen=True)
class StoredMember:
    """A file ``put`` stored in a pack straight from its source: where it goes (``node``: the file it
    replaces, or None for a new one named ``f.name`` in ``parent``) and its range of the pack."""

    parent: int
    node: Inode | None
    f: NewFile
    offset: int
    size: int


def add_stored_pack(db: sqlite3.Connection, pack_id: str, pack_json: str, members: Sequence[StoredMember],
                    dropped: Sequence[tuple[int, int]] = ()) -> list[bool]:
    """Record files whose contents ``put`` stored together as the pack ``pack_id``, in one transaction (as
    ``finish_pack`` does for the upload queue's packs, ``add_stored_file``/``replace_with_stored`` for one
    file), and drop the pack's commit note. Per member, whether it was recorded: a new name taken meanwhile, or
    a replaced file gone, is not. A pack no member references is queued for deletion. The ranges no file
    references (those not recorded, and ``dropped``: (offset, size) of sources that changed while stored) are
    zeroed in every copy of the pack fetched later (``finish_pack``)."""
    recorded: list[bool] = []
    with _tx(db):
        _committed(db, pack_id)
        released: list[tuple[int, str]] = []
        unreferenced = [(0, offset, size) for offset, size in dropped]
        for m in members:
            ref = PackRef(pack_id, m.offset, m.size).to_json()
            if m.node is None:
                recorded.append(_insert_stored(db, m.parent, _next_ino(db), m.f, ref))
            else:
                replaced, old = _replace_stored(db, m.node.ino, m.f, ref)
                recorded.append(replaced)
                if old is not None:
                    released.append((m.node.ino, old))
            if not recorded[-1]:
                unreferenced.append((0 if m.node is None else m.node.ino, m.offset, m.size))
        live = sum(recorded)
        if not live:
            _queue_delete(db, pack_id, 0)
            return recorded
        db.execute("INSERT INTO packs (pack_id, object, live) VALUES (?, ?, ?)", (pack_id, pack_json, live))
        _note_unreferenced(db, pack_id, unreferenced)
        meta_version = _bump(db)
        for ino, old in released:
            _release(db, ino, old, meta_version)
    return recorded


def child_map(db: sqlite3.Connection, parent: int) -> dict[bytes, Inode]:
    """Every entry of a folder by name (one query instead of a lookup per name)."""
    return {row[2]: Inode(*row) for row in db.execute(f"SELECT {_COLS} FROM inodes WHERE parent = ?", (parent,))}


def _next_ino(db: sqlite3.Connection) -> int:
    """A number no inode ever had. SQLite hands out max(ino) + 1, which reuses the number of the newest inode
    once it is purged; then an upload still in flight for the deleted file (same ino, and versions restart at
    1) could be taken for the new file's and stored as its content. Numbers come from a counter instead."""
    row = db.execute("UPDATE counters SET value = value + 1 WHERE name = 'last_ino' RETURNING value").fetchone()
    if row is not None:
        return int(row[0])
    highest = db.execute("SELECT max(m) FROM (SELECT max(ino) AS m FROM inodes UNION ALL "
                         "SELECT max(ino) FROM upload_jobs)").fetchone()[0]  # a tree from before the counter
    ino = max(int(highest or 0), ROOT_INO) + 1
    db.execute("INSERT INTO counters VALUES ('last_ino', ?)", (ino,))
    return ino


def clamp_time_ns(ns: int) -> int:
    """A time as the tree can hold it: SQLite integers are signed 64 bits, so nanoseconds end in year 2262. A
    clock gone wrong sets times far beyond (or before); the kernel clamps them to what ext4 holds the same way."""
    return min(max(ns, -2**63), 2**63 - 1)


_SETTABLE = frozenset({"mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "size"})


def _check_settable(values: dict[str, int]) -> None:
    if not values.keys() <= _SETTABLE:
        raise ValueError(f"not settable: {sorted(values.keys() - _SETTABLE)}")


def set_attrs(db: sqlite3.Connection, ino: int, **values: int) -> Inode:
    """Change mode/uid/gid/atime_ns/mtime_ns/ctime_ns (names checked against the columns)."""
    _check_settable(values)
    if values:
        with _tx(db):
            assignments = ", ".join(f"{k} = ?" for k in values)
            db.execute(f"UPDATE inodes SET {assignments} WHERE ino = ?", (*values.values(), ino))
            _bump(db)
    return get(db, ino)


def mark_dirty(db: sqlite3.Connection, ino: int) -> int:
    """A content change starts: bump the version (so an upload in flight turns stale). Returns the new version."""
    with _tx(db):
        row = db.execute("UPDATE inodes SET version = version + 1, state = 'dirty' WHERE ino = ? RETURNING version",
                         (ino,)).fetchone()
    if row is None:
        raise NotFound(ino)
    return int(row[0])


def record_release(db: sqlite3.Connection, ino: int, size: int, mtime_ns: int,
                   attrs: dict[str, int] | None = None, ctime_ns: int | None = None) -> int | None:
    """A written file was closed: its size and times, and an upload job for its version, in one transaction.

    ``attrs``: mode/uid/gid/atime_ns changes made while the file was open (``fs`` keeps them in memory until
    the close, saving a transaction per ``chmod``/``chown``/``utimes`` of a file being written). ``ctime_ns``:
    when the file last changed (now if not given); never ``mtime_ns``, which ``cp -a`` sets to the source's.

    Older pending jobs of the inode are superseded (``done``). An empty file needs no object: it becomes
    ``stored`` at once, and the object of its previous version is queued for deletion. Returns the job id, or
    None when no upload is needed (empty or unlinked file).
    """
    ctime_ns = time.time_ns() if ctime_ns is None else ctime_ns
    with _tx(db):
        row = db.execute("SELECT version, parent, object FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None:
            return None
        version, parent, old_object = row
        db.execute("UPDATE upload_jobs SET state = 'done', last_error = 'superseded' WHERE ino = ? AND "
                   "state = 'pending'", (ino,))
        if parent is None:
            return None
        if attrs:
            _check_settable(attrs)
            db.execute(f"UPDATE inodes SET {', '.join(f'{k} = ?' for k in attrs)} WHERE ino = ?",
                       (*attrs.values(), ino))
        if size == 0:
            db.execute("UPDATE inodes SET size = 0, mtime_ns = ?, ctime_ns = ?, state = 'stored', object = NULL "
                       "WHERE ino = ?", (mtime_ns, ctime_ns, ino))
            meta_version = _bump(db)
            if old_object is not None:
                _release(db, ino, old_object, meta_version)
            return None
        db.execute("UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ?, state = 'pending' WHERE ino = ?",
                   (size, mtime_ns, ctime_ns, ino))
        cur = db.execute("INSERT INTO upload_jobs (ino, version, state, created) VALUES (?, ?, 'pending', ?)",
                         (ino, version, time.time()))
        _bump(db)
        return cur.lastrowid


def unlink(db: sqlite3.Connection, parent: int, name: bytes) -> Inode:
    """Detach a name; the inode lives on (parent NULL) until ``purge`` once nothing has it open.

    Its object is queued for deletion at once: no later snapshot can reference it.
    """
    with _tx(db):
        inode = _row(db.execute(f"SELECT {_COLS} FROM inodes WHERE parent = ? AND name = ?",
                                (parent, name)).fetchone())
        if inode is None:
            raise NotFound(name)
        _detach(db, inode)
    return inode


def _detach(db: sqlite3.Connection, inode: Inode) -> None:
    now = time.time_ns()
    db.execute("UPDATE inodes SET parent = NULL, name = NULL, object = NULL, ctime_ns = ? WHERE ino = ?",
               (now, inode.ino))
    db.execute("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino = ?", (now, now, inode.parent))
    db.execute("UPDATE upload_jobs SET state = 'done', last_error = 'unlinked' WHERE ino = ? AND state = 'pending'",
               (inode.ino,))
    meta_version = _bump(db)
    if inode.object is not None:
        _release(db, inode.ino, inode.object, meta_version)


def purge(db: sqlite3.Connection, ino: int) -> None:
    """Forget an unlinked inode for good (no name, no lookups, no open handles)."""
    with _tx(db):
        db.execute("DELETE FROM inodes WHERE ino = ? AND parent IS NULL AND ino != ?", (ino, ROOT_INO))


def rename(db: sqlite3.Connection, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
           *, noreplace: bool = False) -> tuple[Inode, Inode | None]:
    """Move a name, replacing a file or an empty directory at the target. Returns (moved, replaced).

    Raises Exists for a taken target with ``noreplace``, IsADirectoryError / NotADirectoryError for a kind
    mismatch, and OSError(ENOTEMPTY) via ``DirectoryNotEmpty`` for a non-empty target directory.
    """
    with _tx(db):
        moved = _row(db.execute(f"SELECT {_COLS} FROM inodes WHERE parent = ? AND name = ?",
                                (old_parent, old_name)).fetchone())
        if moved is None:
            raise NotFound(old_name)
        target = _row(db.execute(f"SELECT {_COLS} FROM inodes WHERE parent = ? AND name = ?",
                                 (new_parent, new_name)).fetchone())
        if target is not None and target.ino == moved.ino:
            return moved, None
        if moved.kind == DIR and _is_ancestor(db, moved.ino, new_parent):
            raise InvalidMove(new_name)
        if target is not None:
            if noreplace:
                raise Exists(new_name)
            if target.kind == DIR and moved.kind != DIR:
                raise IsADirectoryError(new_name)
            if target.kind != DIR and moved.kind == DIR:
                raise NotADirectoryError(new_name)
            if target.kind == DIR and db.execute("SELECT 1 FROM inodes WHERE parent = ? LIMIT 1",
                                                 (target.ino,)).fetchone():
                raise DirectoryNotEmpty(new_name)
            _detach(db, target)
        now = time.time_ns()
        db.execute("UPDATE inodes SET parent = ?, name = ?, ctime_ns = ? WHERE ino = ?",
                   (new_parent, new_name, now, moved.ino))
        db.execute("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino IN (?, ?)",
                   (now, now, old_parent, new_parent))
        _bump(db)
    return moved, target


class DirectoryNotEmpty(OSError):
    pass


class InvalidMove(OSError):
    """A directory cannot move below itself."""


def _is_ancestor(db: sqlite3.Connection, ancestor: int, ino: int) -> bool:
    while True:
        if ino == ancestor:
            return True
        if ino == ROOT_INO:
            return False
        row = db.execute("SELECT parent FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None or row[0] is None:
            return False
        ino = row[0]


# --- upload and delete jobs ---------------------------------------------------------------------------------


def recover(db: sqlite3.Connection, cache_size: Callable[[int], int | None]) -> list[int]:
    """At mount: resume interrupted uploads; queue files written but never closed; drop unlinked inodes, and
    return them: their cache files (a file deleted while open when the client died) are the caller's to remove.

    ``cache_size(ino)`` is the size of the inode's cache file, None if it has none (a file that was open for
    writing when the client died has whatever reached the cache, and its size in the tree may lag). Asked only
    for such files: listing the whole cache made every start cost one ``stat`` per cached file.
    """
    with _tx(db):
        before = db.total_changes
        db.execute("UPDATE upload_jobs SET state = 'pending' WHERE state = 'uploading'")
        for ino, version, old in db.execute("SELECT ino, version, object FROM inodes WHERE state = 'dirty'"
                                            ).fetchall():
            size = cache_size(ino)
            if size == 0:  # created or truncated, nothing written: empty needs no object
                db.execute("UPDATE inodes SET state = 'stored', size = 0, object = NULL WHERE ino = ?", (ino,))
                if old is not None:
                    _release(db, ino, old, counter(db, "meta_version") + 1)
            elif size is not None:
                db.execute("UPDATE inodes SET state = 'pending', size = ? WHERE ino = ?", (size, ino))
                db.execute("UPDATE upload_jobs SET state = 'done', last_error = 'superseded' WHERE ino = ? AND "
                           "state = 'pending'", (ino,))
                db.execute("INSERT INTO upload_jobs (ino, version, state, created) VALUES (?, ?, 'pending', ?)",
                           (ino, version, time.time()))
            else:
                db.execute("UPDATE inodes SET state = 'stored' WHERE ino = ?", (ino,))
        unlinked = [r[0] for r in db.execute("DELETE FROM inodes WHERE parent IS NULL AND ino != ? RETURNING ino",
                                             (ROOT_INO,)).fetchall()]
        db.execute("UPDATE upload_jobs SET state = 'done', last_error = 'unlinked' WHERE state = 'pending' AND "
                   "ino NOT IN (SELECT ino FROM inodes)")
        if db.total_changes != before:
            _bump(db)
        db.execute("DELETE FROM upload_jobs WHERE state = 'done' AND created < ?", (time.time() - 86400,))
    return unlinked


def resume_uploads(db: sqlite3.Connection) -> None:
    """At the upload worker's start: jobs a previous worker left ``uploading`` (it died) are pending again, and
    the objects it was placing or committing when it died are deleted (``note_placing``, ``note_commit``).

    Only the worker that holds the data folder's upload lock may call this: a live worker's claims are its own.
    """
    with _tx(db):
        db.execute("UPDATE upload_jobs SET state = 'pending' WHERE state = 'uploading'")
        db.execute("UPDATE delete_jobs SET after_version = 0 WHERE after_version IN (?, ?)", (COMMITTING, PLACING))


def next_upload(db: sqlite3.Connection, now: float) -> UploadJob | None:
    """Claim the oldest runnable pending job (state → uploading)."""
    with _tx(db):
        row = db.execute("SELECT j.id, j.ino, j.version, j.attempts, coalesce(i.size, 0), j.created FROM "
                         "upload_jobs j LEFT JOIN inodes i ON i.ino = j.ino WHERE j.state = 'pending' AND "
                         "j.not_before <= ? ORDER BY j.id LIMIT 1", (now,)).fetchone()
        if row is None:
            return None
        db.execute("UPDATE upload_jobs SET state = 'uploading', attempts = attempts + 1 WHERE id = ?", (row[0],))
    return UploadJob(row[0], row[1], row[2], row[3] + 1, row[4], row[5])


def unclaim(db: sqlite3.Connection, job: UploadJob) -> None:
    """Give a claimed job back, as if it had never been claimed (another worker is gathering a pack for it)."""
    with _tx(db):
        db.execute("UPDATE upload_jobs SET state = 'pending', attempts = attempts - 1 WHERE id = ? AND "
                   "state = 'uploading'", (job.id,))


def next_small_uploads(db: sqlite3.Connection, now: float, *, max_size: int, max_bytes: int, max_files: int
                       ) -> list[UploadJob]:
    """Claim runnable pending jobs of files of at most ``max_size`` bytes, oldest first, until ``max_files``
    jobs or ``max_bytes`` bytes (at least one job if any fits): the members of one pack."""
    jobs: list[UploadJob] = []
    total = 0
    with _tx(db):
        rows = db.execute("SELECT j.id, j.ino, j.version, j.attempts, i.size, j.created FROM upload_jobs j JOIN "
                          "inodes i ON i.ino = j.ino WHERE j.state = 'pending' AND j.not_before <= ? AND "
                          "i.size <= ? ORDER BY j.id LIMIT ?", (now, max_size, max_files)).fetchall()
        for row in rows:
            if jobs and total + row[4] > max_bytes:
                break
            total += row[4]
            jobs.append(UploadJob(row[0], row[1], row[2], row[3] + 1, row[4], row[5]))
        db.executemany("UPDATE upload_jobs SET state = 'uploading', attempts = attempts + 1 WHERE id = ?",
                       [(job.id,) for job in jobs])
    return jobs


def small_pending(db: sqlite3.Connection, now: float, max_size: int) -> tuple[int, float]:
    """(bytes, creation time of the newest job) of the runnable pending jobs of files of at most ``max_size``
    bytes: whether a pack would be full, and whether files are still arriving."""
    row = db.execute("SELECT coalesce(sum(i.size), 0), coalesce(max(j.created), 0) FROM upload_jobs j JOIN inodes i "
                     "ON i.ino = j.ino WHERE j.state = 'pending' AND j.not_before <= ? AND i.size <= ?",
                     (now, max_size)).fetchone()
    return int(row[0]), float(row[1])


def retry_now(db: sqlite3.Connection) -> int:
    """Make every backed-off upload and delete job runnable at once (a flush was asked for); returns how many."""
    with _tx(db):
        a = db.execute("UPDATE upload_jobs SET not_before = 0 WHERE state = 'pending' AND not_before > 0").rowcount
        b = db.execute("UPDATE delete_jobs SET not_before = 0 WHERE not_before > 0").rowcount
    return a + b


def next_wakeup(db: sqlite3.Connection) -> float | None:
    """When the earliest backed-off job (upload or delete) becomes runnable, if any."""
    a = db.execute("SELECT min(not_before) FROM upload_jobs WHERE state = 'pending'").fetchone()[0]
    b = db.execute("SELECT min(not_before) FROM delete_jobs WHERE after_version <= (SELECT value FROM counters "
                   "WHERE name = 'published_version')").fetchone()[0]
    times = [t for t in (a, b) if t is not None]
    return min(times) if times else None


def job_current(db: sqlite3.Connection, job: UploadJob) -> bool:
    """Is the job's version still the inode's, and the inode still named? (Stale jobs need no upload.)"""
    row = db.execute("SELECT version, parent, state FROM inodes WHERE ino = ?", (job.ino,)).fetchone()
    return row is not None and row[0] == job.version and row[1] is not None and row[2] == PENDING


def finish_upload(db: sqlite3.Connection, job: UploadJob, object_id: str, object_json: str) -> bool:
    """Store the object if the inode still has the job's version; otherwise queue the stale object's deletion.

    Returns True if the object became the inode's content.
    """
    with _tx(db):
        _committed(db, object_id)
        db.execute("UPDATE upload_jobs SET state = 'done', last_error = NULL WHERE id = ?", (job.id,))
        row = db.execute("SELECT version, parent, state, object FROM inodes WHERE ino = ?", (job.ino,)).fetchone()
        if row is None or row[0] != job.version or row[1] is None or row[2] != PENDING:
            _queue_delete(db, object_id, 0)
            return False
        db.execute("UPDATE inodes SET object = ?, state = 'stored' WHERE ino = ?", (object_json, job.ino))
        meta_version = _bump(db)
        if row[3] is not None:
            _release(db, job.ino, row[3], meta_version)
        return True


def finish_pack(db: sqlite3.Connection, pack_id: str, pack_json: str,
                members: list[tuple[UploadJob, int, int]], damaged: Sequence[tuple[int, int, int]] = ()) -> int:
    """Make the uploaded pack the content of every member (job, offset, size) whose inode still has the job's
    version; the others are stale and simply not referenced. Returns how many members became current (a pack
    with none is queued for deletion at once).

    The ranges no file references (stale members, and the ``damaged`` ones: (ino, offset, size) of members
    whose cache file was gone or cut short) still hold what was read, say a file deleted while the pack was on
    its way: they are noted as released (``stale_members``), so every copy of the pack fetched later has them
    zeroed, as it has those of members released afterwards."""
    with _tx(db):
        _committed(db, pack_id)
        live = 0
        released: list[tuple[int, str]] = []
        unreferenced = list(damaged)
        for job, offset, size in members:
            db.execute("UPDATE upload_jobs SET state = 'done', last_error = NULL WHERE id = ?", (job.id,))
            row = db.execute("SELECT version, parent, state, object FROM inodes WHERE ino = ?", (job.ino,)).fetchone()
            if row is None or row[0] != job.version or row[1] is None or row[2] != PENDING:
                unreferenced.append((job.ino, offset, size))
                continue
            db.execute("UPDATE inodes SET object = ?, state = 'stored' WHERE ino = ?",
                       (PackRef(pack_id, offset, size).to_json(), job.ino))
            live += 1
            if row[3] is not None:
                released.append((job.ino, row[3]))
        if not live:
            _queue_delete(db, pack_id, 0)
            return 0
        db.execute("INSERT INTO packs (pack_id, object, live) VALUES (?, ?, ?)", (pack_id, pack_json, live))
        _note_unreferenced(db, pack_id, unreferenced)
        meta_version = _bump(db)
        for ino, old in released:
            _release(db, ino, old, meta_version)
        return live


def _note_unreferenced(db: sqlite3.Connection, pack_id: str, ranges: Sequence[tuple[int, int, int]]) -> None:
    """(ino, offset, size) of a new pack that no file references: zeroed in every copy fetched (``stale_ranges``).
    Marked zeroed: the pack was just stored, so no cached copy of it exists to scrub."""
    db.executemany("INSERT INTO stale_members (ino, pack_id, offset, size, zeroed) VALUES (?, ?, ?, ?, 1)",
                   [(ino, pack_id, offset, size) for ino, offset, size in ranges if size])


def drop_upload(db: sqlite3.Connection, job: UploadJob, reason: str) -> None:
    with _tx(db):
        db.execute("UPDATE upload_jobs SET state = 'done', last_error = ? WHERE id = ?", (reason, job.id))


def fail_upload(db: sqlite3.Connection, job: UploadJob, error: str, retry_at: float | None) -> None:
    """Record a failed attempt; ``retry_at`` None means it can never succeed (state failed)."""
    with _tx(db):
        if retry_at is None:
            db.execute("UPDATE upload_jobs SET state = 'failed', last_error = ? WHERE id = ?", (error, job.id))
        else:
            db.execute("UPDATE upload_jobs SET state = 'pending', last_error = ?, not_before = ? WHERE id = ?",
                       (error, retry_at, job.id))


def _release(db: sqlite3.Connection, ino: int, object_json: str, after_version: int) -> None:
    """Inode ``ino`` no longer references this content: delete its object, or drop one reference to its pack
    (and delete the pack once no inode references it), after a snapshot at ``after_version`` is published. A
    pack member's range is noted for zeroing in the pack's cached copy (``stale_members``)."""
    ref = pack_ref(object_json)
    if ref is None:
        _queue_delete(db, json.loads(object_json)["object_id"], after_version)
        return
    db.execute("UPDATE packs SET live = live - 1 WHERE pack_id = ?", (ref.pack_id,))
    row = db.execute("SELECT live FROM packs WHERE pack_id = ?", (ref.pack_id,)).fetchone()
    if row is not None and row[0] <= 0:
        db.execute("DELETE FROM packs WHERE pack_id = ?", (ref.pack_id,))
        db.execute("DELETE FROM stale_members WHERE pack_id = ?", (ref.pack_id,))  # its copy goes whole
        _queue_delete(db, ref.pack_id, after_version)
    else:
        db.execute("INSERT INTO stale_members (ino, pack_id, offset, size) VALUES (?, ?, ?, ?)",
                   (ino, ref.pack_id, ref.offset, ref.size))


def note_placing(db: sqlite3.Connection, object_id: str) -> None:
    """The object is about to be placed and its shares sent: keep a deletion of it that runs only if the process
    dies before the upload ends (``resume_uploads``); ``note_commit`` takes it over, ``abandon_commit`` drops
    it (the upload released what it placed itself)."""
    with _tx(db):
        _queue_delete(db, object_id, PLACING)


def note_commit(db: sqlite3.Connection, object_id: str, *, snapshot: bool = False) -> None:
    """The object is about to be committed at the mediator: keep a deletion of it that cannot run until
    ``abandon_commit`` or ``resume_uploads`` releases it, or ``finish_upload``/``finish_pack`` drops it (a
    ``snapshot``: until ``settle_snapshot_commit``)."""
    with _tx(db):
        db.execute("DELETE FROM delete_jobs WHERE object_id = ? AND after_version = ?", (object_id, PLACING))
        _queue_delete(db, object_id, SNAPSHOT_COMMITTING if snapshot else COMMITTING)


def snapshot_commits(db: sqlite3.Connection) -> list[str]:
    """Snapshot objects noted before their commit and not settled yet (a publish that failed or was killed)."""
    return [row[0] for row in db.execute("SELECT object_id FROM delete_jobs WHERE after_version = ?",
                                         (SNAPSHOT_COMMITTING,))]


def settle_snapshot_commit(db: sqlite3.Connection, object_id: str, *, named: bool) -> None:
    """The account's pointer names the noted snapshot (``named``: it is the published tree, keep it) or not
    (nobody will ever read it: delete it)."""
    with _tx(db):
        if named:
            db.execute("DELETE FROM delete_jobs WHERE object_id = ? AND after_version = ?",
                       (object_id, SNAPSHOT_COMMITTING))
        else:
            db.execute("UPDATE delete_jobs SET after_version = 0 WHERE object_id = ? AND after_version = ?",
                       (object_id, SNAPSHOT_COMMITTING))


def queue_delete(db: sqlite3.Connection, object_id: str) -> None:
    """Delete an object nothing in the tree references (e.g. the snapshot a newer one replaced), retried until
    it is done."""
    with _tx(db):
        _queue_delete(db, object_id, 0)


def abandon_commit(db: sqlite3.Connection, object_id: str) -> None:
    """The upload of ``object_id`` failed or was stopped after ``note_commit``: the mediator may have committed
    it anyway (say, its answer was lost), and nothing references it, so delete it (a 404 ends the job). Before
    that (``note_placing``) the upload released what it placed itself: the note goes."""
    with _tx(db):
        db.execute("UPDATE delete_jobs SET after_version = 0 WHERE object_id = ? AND after_version = ?",
                   (object_id, COMMITTING))
        db.execute("DELETE FROM delete_jobs WHERE object_id = ? AND after_version = ?", (object_id, PLACING))


def _committed(db: sqlite3.Connection, object_id: str) -> None:
    db.execute("DELETE FROM delete_jobs WHERE object_id = ? AND after_version IN (?, ?)",
               (object_id, COMMITTING, PLACING))


def _queue_delete(db: sqlite3.Connection, object_id: str, after_version: int) -> None:
    db.execute("INSERT OR IGNORE INTO delete_jobs (object_id, after_version) VALUES (?, ?)",
               (object_id, after_version))


def next_delete(db: sqlite3.Connection, now: float) -> DeleteJob | None:
    """A deletion that no published snapshot needs any more (after_version <= published_version)."""
    row = db.execute("SELECT object_id, attempts FROM delete_jobs WHERE not_before <= ? AND after_version <= "
                     "(SELECT value FROM counters WHERE name = 'published_version') ORDER BY rowid LIMIT 1",
                     (now,)).fetchone()
    return None if row is None else DeleteJob(row[0], row[1])


def finish_delete(db: sqlite3.Connection, object_id: str) -> None:
    with _tx(db):
        db.execute("DELETE FROM delete_jobs WHERE object_id = ?", (object_id,))


def fail_delete(db: sqlite3.Connection, object_id: str, error: str, retry_at: float) -> None:
    with _tx(db):
        db.execute("UPDATE delete_jobs SET attempts = attempts + 1, last_error = ?, not_before = ? WHERE "
                   "object_id = ?", (error, retry_at, object_id))


def request_flush(path: Path) -> None:
    """``fincryptfs flush`` asks the mount's publisher to publish as soon as no upload is pending (no debounce).

    A separate short-lived writer: the request is one counter bump the publisher polls for.
    """
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("INSERT OR IGNORE INTO counters VALUES ('flush_requested', 0)")
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'flush_requested'")
    finally:
        db.close()


def set_published(db: sqlite3.Connection, meta_version: int, pointer_version: int) -> None:
    with _tx(db):
        db.execute("UPDATE counters SET value = max(value, ?) WHERE name = 'published_version'", (meta_version,))
        db.execute("UPDATE counters SET value = ? WHERE name = 'pointer_version'", (pointer_version,))


# --- snapshots and status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishProblem:
    message: str
    blocked: bool  # nothing will be published until the user acts
    since: float


def set_publish_problem(db: sqlite3.Connection, message: str, *, blocked: bool) -> None:
    with _tx(db):
        db.execute("INSERT INTO publish_problem VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                   "message = excluded.message, blocked = excluded.blocked", (message, int(blocked), time.time()))


def clear_publish_problem(db: sqlite3.Connection) -> None:
    with _tx(db):
        db.execute("DELETE FROM publish_problem")


def publish_problem(db: sqlite3.Connection) -> PublishProblem | None:
    """Why the tree's last publish failed, if it did (None once one succeeds)."""
    try:
        row = db.execute("SELECT message, blocked, since FROM publish_problem").fetchone()
    except sqlite3.OperationalError:  # a read-only look at a tree not opened since the table was added
        return None
    return None if row is None else PublishProblem(str(row[0]), bool(row[1]), float(row[2]))


def pointer_seen(db: sqlite3.Connection, version: int) -> None:
    """The account's pointer is at ``version`` and names this client's own snapshot (a publish whose pointer
    update landed but whose answer, or our record of it, was lost): publish on top of it."""
    with _tx(db):
        db.execute("UPDATE counters SET value = max(value, ?) WHERE name = 'pointer_version'", (version,))


def snapshot_to(db: sqlite3.Connection, dest: Path) -> int:
    """A consistent copy of the tree at ``dest`` for publishing; returns the meta_version it holds.

    The copy carries only what a restore needs: names, attributes and the objects already stored. Jobs are
    dropped (their cache files exist only here), and a file whose newest version is not uploaded yet appears
    with the version that is (or empty if none is). The released ranges of live packs are kept, marked zeroed
    (the machine that restores has no copy yet): every copy it fetches is zeroed there, as here. Dropped, they
    left the bytes of deleted and replaced files in the restored machine's cached copies of their packs.
    """
    dest.unlink(missing_ok=True)
    out = sqlite3.connect(dest, isolation_level=None)
    try:
        db.backup(out)
        out.execute("BEGIN")
        version = counter(out, "meta_version")
        out.execute("DELETE FROM upload_jobs")
        out.execute("DELETE FROM delete_jobs")
        out.execute("UPDATE stale_members SET zeroed = 1")
        out.execute("DELETE FROM publish_problem")
        out.execute("DELETE FROM inodes WHERE parent IS NULL AND ino != ?", (ROOT_INO,))
        for ino, obj in out.execute("SELECT ino, object FROM inodes WHERE state != 'stored'").fetchall():
            size = json.loads(obj)["size"] if obj else 0
            out.execute("UPDATE inodes SET state = 'stored', size = ? WHERE ino = ?", (size, ino))
        out.execute("UPDATE counters SET value = ? WHERE name = 'published_version'", (version,))
        out.execute("COMMIT")
        out.execute("PRAGMA journal_mode=DELETE")
        out.execute("VACUUM")
    finally:
        out.close()
    return version


def snapshot_file(path: Path, dest: Path) -> int:
    """``snapshot_to`` through a connection of its own to the tree at ``path`` (for a worker thread: a
    million-file tree takes 2 s to copy, which the upload worker's event loop should not wait out)."""
    reader = connect_readonly(path)
    try:
        return snapshot_to(reader, dest)
    finally:
        reader.close()


def adopt_snapshot(path: Path, pointer_version: int) -> None:
    """Make a fetched snapshot the local tree: everything in it counts as published."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.executescript(_SCHEMA)
        db.execute("UPDATE counters SET value = (SELECT value FROM counters WHERE name = 'meta_version') "
                   "WHERE name = 'published_version'")
        db.execute("UPDATE counters SET value = ? WHERE name = 'pointer_version'", (pointer_version,))
    finally:
        db.close()


def pending_uploads(db: sqlite3.Connection) -> list[tuple[int, int, str, int, str | None]]:
    """(job id, ino, state, attempts, last_error) of every unfinished upload."""
    return [tuple(r) for r in db.execute(
        "SELECT id, ino, state, attempts, last_error FROM upload_jobs WHERE state IN ('pending', 'uploading') "
        "ORDER BY id").fetchall()]


def pack_object(db: sqlite3.Connection, pack_id: str) -> str | None:
    """The StoredObject JSON of a live pack."""
    row = db.execute("SELECT object FROM packs WHERE pack_id = ?", (pack_id,)).fetchone()
    return None if row is None else str(row[0])


def packs(db: sqlite3.Connection) -> list[tuple[str, int]]:
    """(pack id, live member count) of every pack."""
    return [(r[0], r[1]) for r in db.execute("SELECT pack_id, live FROM packs ORDER BY rowid")]


def has_pending_uploads(db: sqlite3.Connection) -> bool:
    row = db.execute("SELECT 1 FROM upload_jobs WHERE state IN ('pending', 'uploading') LIMIT 1").fetchone()
    return row is not None


def failed_uploads(db: sqlite3.Connection) -> list[tuple[int, int, str | None]]:
    return [tuple(r) for r in db.execute(
        "SELECT j.id, j.ino, j.last_error FROM upload_jobs j JOIN inodes i ON i.ino = j.ino WHERE j.state = "
        "'failed' AND i.parent IS NOT NULL AND i.version = j.version AND i.state = 'pending' ORDER BY j.id"
    ).fetchall()]


def stale_members(db: sqlite3.Connection) -> list[tuple[int, int, PackRef]]:
    """(row id, ino, range) of the released members of live packs not zeroed in the cache yet (``_release``)."""
    return [(rowid, ino, PackRef(pack_id, offset, size)) for rowid, ino, pack_id, offset, size in db.execute(
        "SELECT rowid, ino, pack_id, offset, size FROM stale_members WHERE zeroed = 0 ORDER BY rowid")]


def mark_stale_zeroed(db: sqlite3.Connection, rowids: Sequence[int]) -> None:
    """These ranges are zeroed in their pack's cached copy, or it had none (a copy fetched later is zeroed as it
    arrives: ``stale_ranges``)."""
    with _tx(db):
        db.executemany("UPDATE stale_members SET zeroed = 1 WHERE rowid = ?", [(r,) for r in rowids])


def stale_ranges(db: sqlite3.Connection, pack_id: str) -> list[tuple[int, int]]:
    """(offset, size) of every released member of ``pack_id``: to be zeroed in a copy of it just fetched."""
    return [(r[0], r[1]) for r in db.execute("SELECT offset, size FROM stale_members WHERE pack_id = ?",
                                             (pack_id,))]


def pending_deletes(db: sqlite3.Connection) -> int:
    """Objects waiting to be released (not counting those of uploads being committed right now)."""
    return int(db.execute("SELECT count(*) FROM delete_jobs WHERE after_version < ?", (COMMITTING,)).fetchone()[0])


def dirty_count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM inodes WHERE state = 'dirty' AND parent IS NOT NULL").fetchone()[0])


def stored_inos(db: sqlite3.Connection) -> set[int]:
    """Inodes whose cache file may be evicted (the content is safely in the network)."""
    return {r[0] for r in db.execute("SELECT ino FROM inodes WHERE state = 'stored' AND object IS NOT NULL")}


def stored_among(db: sqlite3.Connection, inos: Sequence[int]) -> set[int]:
    """Those of ``inos`` that are ``stored_inos`` now (a few hundred eviction candidates, checked at once)."""
    found: set[int] = set()
    for start in range(0, len(inos), 500):
        chunk = inos[start:start + 500]
        found.update(r[0] for r in db.execute(
            f"SELECT ino FROM inodes WHERE state = 'stored' AND object IS NOT NULL AND ino IN "
            f"({', '.join('?' * len(chunk))})", chunk))
    return found


def totals(db: sqlite3.Connection) -> dict[str, int]:
    row = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM inodes WHERE kind = 'file' AND parent IS NOT "
                     "NULL").fetchone()
    return {"files": int(row[0]), "bytes": int(row[1])}
