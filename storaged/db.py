"""The node's SQLite database (WAL): which shares it holds, which grants it has used, which mediators it trusts.

A share exists for the node exactly when its row exists: the row is written only after the share's files were
fsynced and renamed into place, and removed before they are unlinked (see docs/storaged.md, crash ordering).
The grant is marked used in the same transaction that records the share, so a grant can never store twice.

Two connections: ``writer`` is used from worker threads (commits fsync, which must not stall the event loop)
under a lock; ``reader`` only from the event loop thread. WAL lets the reader see committed rows meanwhile.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fincryptfs.core.errors import ConfigError, ReplayError
from fincryptfs.core.ids import ShareId

from .earnings import Earnings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shares (
    share_id TEXT PRIMARY KEY,
    mediator_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    dir TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    stored_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'ok'
);
CREATE TABLE IF NOT EXISTS used_grants (
    grant_id TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mediators (
    mediator_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    url TEXT NOT NULL,
    announced_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS earnings (
    mediator_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    earned_msat INTEGER NOT NULL,
    pending_msat INTEGER NOT NULL,
    paid_msat INTEGER NOT NULL,
    payout_threshold_msat INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
"""

STATE_OK = "ok"
STATE_CORRUPT = "corrupt"
STATE_MISSING = "missing"


@dataclass(frozen=True)
class ShareRecord:
    share_id: ShareId
    mediator_id: str
    account_id: str
    size: int
    root: bytes
    dir: str
    grant_id: str
    stored_at: int
    state: str


@dataclass(frozen=True)
class TrustedMediator:
    mediator_id: str
    public_key: str
    url: str


_COLUMNS = "share_id, mediator_id, account_id, size, root, dir, grant_id, stored_at, state"


def _record(row: tuple) -> ShareRecord:  # type: ignore[type-arg]
    return ShareRecord(ShareId(row[0]), row[1], row[2], row[3], bytes(row[4]), row[5], row[6], row[7], row[8])


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a receipt promises durability: commits must reach the disk
    return conn


class NodeDatabase:
    """Small typed queries; every write is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._writer = _connect(path)
            self._writer.executescript(_SCHEMA)
            self._reader = _connect(path)
        except sqlite3.DatabaseError as exc:  # garbage, a torn copy, a file of something else
            raise ConfigError(f"the node's database {path} cannot be read ({exc}): restore it from a backup. "
                              "Without it the node does not know the shares it holds") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        self._reader.close()
        with self._lock:
            self._writer.close()

    # --- writes (call from a worker thread: they fsync) ---

    def add_share(self, record: ShareRecord, grant_expires_at: int) -> None:
        """Record a stored share and burn its grant atomically; ReplayError if the grant was used."""
        with self._lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                try:
                    self._writer.execute("INSERT INTO used_grants (grant_id, expires_at) VALUES (?, ?)",
                                         (record.grant_id, grant_expires_at))
                except sqlite3.IntegrityError as exc:
                    raise ReplayError("this upload grant was already used") from exc
                self._writer.execute(
                    f"INSERT INTO shares ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.share_id, record.mediator_id, record.account_id, record.size, record.root,
                     record.dir, record.grant_id, record.stored_at, record.state))
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    def remove_share(self, share_id: ShareId) -> None:
        with self._lock:
            self._writer.execute("DELETE FROM shares WHERE share_id = ?", (share_id,))

    def set_state(self, share_id: ShareId, state: str) -> None:
        with self._lock:
            self._writer.execute("UPDATE shares SET state = ? WHERE share_id = ?", (state, share_id))

    def rename_dir(self, old: str, new: str) -> None:
        """Record the shares of share folder ``old`` under the name ``new`` (its absolute path)."""
        with self._lock:
            self._writer.execute("UPDATE shares SET dir = ? WHERE dir = ?", (new, old))

    def set_node_id(self, node_id: str) -> None:
        """Record whose shares this database lists (once; see :meth:`node_id`)."""
        with self._lock:
            self._writer.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('node_id', ?)", (node_id,))

    def prune_grants(self, now: int) -> int:
        """Forget used grants that have expired: an expired grant is refused anyway."""
        with self._lock:
            return self._writer.execute("DELETE FROM used_grants WHERE expires_at < ?", (now,)).rowcount

    def trust_mediator(self, mediator: TrustedMediator, now: int) -> None:
        with self._lock:
            self._writer.execute(
                "INSERT INTO mediators (mediator_id, public_key, url, announced_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (mediator_id) DO UPDATE SET public_key = excluded.public_key, url = excluded.url, "
                "announced_at = excluded.announced_at",
                (mediator.mediator_id, mediator.public_key, mediator.url, now))

    def set_earnings(self, earnings: Earnings) -> None:
        """The latest earnings a mediator reported (one row per mediator)."""
        with self._lock:
            self._writer.execute("INSERT OR REPLACE INTO earnings VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (earnings.mediator_id, earnings.url, earnings.earned_msat, earnings.pending_msat,
                                  earnings.paid_msat, earnings.payout_threshold_msat, earnings.updated_at))

    # --- reads (event loop thread, or a thread that holds no other reference) ---

    def node_id(self) -> str | None:
        """The node whose shares this database lists; None for a database no node has started with yet (or one
        written by a version that did not record it)."""
        row = self._reader.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
        return None if row is None else str(row[0])

    def earnings(self) -> list[Earnings]:
        return [Earnings(*row) for row in self._reader.execute(
            "SELECT mediator_id, url, earned_msat, pending_msat, paid_msat, payout_threshold_msat, updated_at"
            " FROM earnings ORDER BY mediator_id")]

    def grant_used(self, grant_id: str) -> bool:
        return self._reader.execute("SELECT 1 FROM used_grants WHERE grant_id = ?", (grant_id,)).fetchone() \
            is not None

    def get_share(self, share_id: ShareId) -> ShareRecord | None:
        row = self._reader.execute(f"SELECT {_COLUMNS} FROM shares WHERE share_id = ?", (share_id,)).fetchone()
        return None if row is None else _record(row)

    def get_shares(self, share_ids: Iterable[ShareId]) -> dict[ShareId, ShareRecord]:
        ids = list(share_ids)
        found: dict[ShareId, ShareRecord] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._reader.execute(f"SELECT {_COLUMNS} FROM shares WHERE share_id IN ({marks})", chunk):
                record = _record(row)
                found[record.share_id] = record
        return found

    def iter_shares(self) -> Iterator[ShareRecord]:
        """All shares, in id order, fetched in pages so a long scan never holds a read transaction open."""
        after = ""
        while True:
            rows = self._reader.execute(f"SELECT {_COLUMNS} FROM shares WHERE share_id > ? ORDER BY share_id "
                                        "LIMIT 1000", (after,)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            after = rows[-1][0]

    def totals(self) -> tuple[int, int]:
        count, total = self._reader.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM shares").fetchone()
        return int(count), int(total)

    def shares_by_state(self) -> dict[str, int]:
        """How many shares are in each state (ok, missing, corrupt)."""
        return {state: int(n) for state, n in
                self._reader.execute("SELECT state, COUNT(*) FROM shares GROUP BY state")}

    def shares_by_dir(self) -> dict[str, int]:
        """How many shares the node has recorded in each share folder."""
        return {d: int(n) for d, n in self._reader.execute("SELECT dir, COUNT(*) FROM shares GROUP BY dir")}

    def bytes_by_dir(self) -> dict[str, int]:
        return {d: int(s) for d, s in self._reader.execute("SELECT dir, SUM(size) FROM shares GROUP BY dir")}

    def trusted_mediators(self) -> list[TrustedMediator]:
        """Every mediator the node has announced to, the least recently announced first."""
        return [TrustedMediator(*row) for row in
                self._reader.execute("SELECT mediator_id, public_key, url FROM mediators "
                                     "ORDER BY announced_at, mediator_id")]
