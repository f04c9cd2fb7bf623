"""The mediator's state in one SQLite file (WAL): nodes, accounts, objects, shares, grants, audits, pointers.

Only this module speaks SQL. Every method is one short transaction, so the event loop never waits long on
the database; callers pass ``now`` (Unix seconds) so that time stays a parameter, not a hidden global.

Audit records are the billing seam: ``audit_passes`` holds one row per passed (round, node) with the shares and
bytes proven, keyed by (round_id, node_id) and written with INSERT OR IGNORE, so recording a pass twice (a
retry, a restart) never credits a node twice.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.messages import layout_from_json, layout_to_json

from .ledger import WORLD, LedgerError, Posting, Totals, apply_postings, check_invariant, totals

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, url TEXT NOT NULL, price INTEGER,
    capacity INTEGER NOT NULL, free INTEGER NOT NULL, operator TEXT NOT NULL DEFAULT '',
    payout_address TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'online', reputation REAL NOT NULL DEFAULT 0.5,
    passed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0, unreachable_rounds INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS accounts (
    account_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    object_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, layout TEXT NOT NULL, state TEXT NOT NULL,
    created_at REAL NOT NULL, stored_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS objects_by_account ON objects(account_id);
CREATE TABLE IF NOT EXISTS shares (
    share_id TEXT PRIMARY KEY, object_id TEXT NOT NULL, idx INTEGER NOT NULL, node_id TEXT NOT NULL,
    root BLOB NOT NULL, size INTEGER NOT NULL, state TEXT NOT NULL, updated_at REAL NOT NULL, price INTEGER,
    UNIQUE (object_id, idx)
);
CREATE INDEX IF NOT EXISTS shares_by_node ON shares(node_id, state);
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY, share_id TEXT NOT NULL, node_id TEXT NOT NULL, account_id TEXT NOT NULL,
    size INTEGER NOT NULL, root BLOB NOT NULL, expires_at REAL NOT NULL, used INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS grants_by_node ON grants(node_id, used, expires_at);
CREATE INDEX IF NOT EXISTS grants_by_share ON grants(share_id);
CREATE INDEX IF NOT EXISTS grants_unused ON grants(used, expires_at);
CREATE INDEX IF NOT EXISTS objects_by_state ON objects(state, created_at);
CREATE TABLE IF NOT EXISTS audit_rounds (
    round_id INTEGER NOT NULL, node_id TEXT NOT NULL, nonce BLOB NOT NULL, started_at REAL NOT NULL,
    finished_at REAL, result TEXT NOT NULL DEFAULT 'pending', detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (round_id, node_id)
);
-- a node's rounds that did not pass, by time: a credit covers no time before the last of them
CREATE INDEX IF NOT EXISTS rounds_not_passed ON audit_rounds(node_id, finished_at)
    WHERE result IN ('failed','unreachable');
CREATE TABLE IF NOT EXISTS audit_passes (
    round_id INTEGER NOT NULL, node_id TEXT NOT NULL, shares_proven INTEGER NOT NULL,
    bytes_proven INTEGER NOT NULL, passed_at REAL NOT NULL, priced_bytes TEXT, PRIMARY KEY (round_id, node_id)
);
CREATE TABLE IF NOT EXISTS pointers (
    account_id TEXT PRIMARY KEY, version INTEGER NOT NULL, envelope TEXT NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    share_id TEXT NOT NULL, node_id TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL, PRIMARY KEY (share_id, node_id)
);
CREATE TABLE IF NOT EXISTS repairs (
    repair_id INTEGER PRIMARY KEY AUTOINCREMENT, object_id TEXT NOT NULL, started_at REAL NOT NULL,
    result TEXT NOT NULL, shares_rebuilt INTEGER NOT NULL DEFAULT 0, detail TEXT NOT NULL DEFAULT ''
);
"""

BILLING_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_postings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, source TEXT NOT NULL,
    dest TEXT NOT NULL, amount INTEGER NOT NULL, at REAL NOT NULL, memo TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS postings_by_source ON ledger_postings(source, seq);
CREATE INDEX IF NOT EXISTS postings_by_dest ON ledger_postings(dest, seq);
CREATE TABLE IF NOT EXISTS ledger_balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS billing_periods (
    period_id INTEGER PRIMARY KEY, start REAL NOT NULL, end REAL NOT NULL, billed_at REAL NOT NULL,
    accounts INTEGER NOT NULL, charged INTEGER NOT NULL, unpaid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS billing_tombstones (
    tombstone_id INTEGER PRIMARY KEY AUTOINCREMENT, account_id TEXT NOT NULL, stored_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL, deleted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_credits (
    round_id INTEGER NOT NULL, node_id TEXT NOT NULL, passed_at REAL NOT NULL, amount INTEGER NOT NULL,
    PRIMARY KEY (round_id, node_id)
);
CREATE INDEX IF NOT EXISTS audit_credits_by_node ON audit_credits(node_id, passed_at);
CREATE TABLE IF NOT EXISTS account_billing (
    account_id TEXT PRIMARY KEY, deposit_address TEXT UNIQUE, out_since REAL, warned_at REAL
);
CREATE TABLE IF NOT EXISTS deposits (
    txid TEXT NOT NULL, vout INTEGER NOT NULL, account_id TEXT NOT NULL, address TEXT NOT NULL,
    amount_sat INTEGER NOT NULL, confirmations INTEGER NOT NULL, seen_at REAL NOT NULL, credited_at REAL,
    PRIMARY KEY (txid, vout)
);
CREATE TABLE IF NOT EXISTS payout_batches (
    batch_id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT NOT NULL, created_at REAL NOT NULL,
    fee_sat INTEGER NOT NULL, raw_tx TEXT, txid TEXT, sent_at REAL, detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS payout_outputs (
    batch_id INTEGER NOT NULL, node_id TEXT NOT NULL, address TEXT NOT NULL, debited INTEGER NOT NULL,
    value_sat INTEGER NOT NULL, PRIMARY KEY (batch_id, node_id)
);
"""

PASS_COLUMNS = "round_id, node_id, shares_proven, bytes_proven, passed_at"
# share states: placed (granted, not yet committed) → stored (receipt verified) → proven / lost
HEALTHY_SHARE_STATES = ("stored", "proven")
# the root of a share placed before its client knew it (streamed while encoding), until its commit names it
UNKNOWN_ROOT = b""


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    public_key: bytes
    url: str
    price: int | None
    capacity: int
    free: int
    operator: str
    payout_address: str | None
    first_seen: float
    last_seen: float
    state: str
    reputation: float
    passed: int
    failed: int
    consecutive_failures: int
    unreachable_rounds: int = 0  # consecutive audit rounds it did not answer


@dataclass(frozen=True)
class ShareRow:
    share_id: str
    object_id: str
    idx: int
    node_id: str
    root: bytes
    size: int
    state: str
    price: int | None = None  # msat per GiB-hour the node was to be paid when the share was placed on it


@dataclass(frozen=True)
class ObjectRow:
    object_id: str
    account_id: str
    layout: ObjectLayout
    state: str
    created_at: float


@dataclass(frozen=True)
class GrantRow:
    grant_id: str
    share_id: str
    node_id: str
    account_id: str
    size: int
    root: bytes
    expires_at: float
    used: bool


def _stored_bytes(layout: ObjectLayout) -> int:
    """What an object occupies on the network: all n shares."""
    return layout.share_size * layout.n


class MediatorDB:
    """One connection, used from the event loop thread only (each call is a short transaction)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(SCHEMA)
        self._conn.executescript(BILLING_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added after a database was created (CREATE TABLE IF NOT EXISTS leaves old tables as they are)."""
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(nodes)")}
        if "unreachable_rounds" not in columns:
            self._conn.execute("ALTER TABLE nodes ADD COLUMN unreachable_rounds INTEGER NOT NULL DEFAULT 0")
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(objects)")}
        # the node's price when a share was placed on it, and a pass's proven bytes by that price (NULL: unknown,
        # credited at the node's price of the day, as before these columns existed)
        if "price" not in {r[1] for r in self._conn.execute("PRAGMA table_info(shares)")}:
            self._conn.execute("ALTER TABLE shares ADD COLUMN price INTEGER")
        if "priced_bytes" not in {r[1] for r in self._conn.execute("PRAGMA table_info(audit_passes)")}:
            self._conn.execute("ALTER TABLE audit_passes ADD COLUMN priced_bytes TEXT")
        if "stored_bytes" not in columns:  # objects recorded before it get it from their layout, parsed once each
            with self.transaction() as conn:
                conn.execute("ALTER TABLE objects ADD COLUMN stored_bytes INTEGER")
                layouts = [r[0] for r in conn.execute("SELECT DISTINCT layout FROM objects")]
                conn.executemany("UPDATE objects SET stored_bytes=? WHERE layout=?",
                                 [(_stored_bytes(layout_from_json(json.loads(text))), text) for text in layouts])

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    # --- the mediator this database belongs to -----------------------------------------------------------

    def mediator_id(self) -> str | None:
        """The mediator whose identity key wrote this database; None before its first start (or for a database
        written by a version that did not record it)."""
        value = self._one("SELECT value FROM meta WHERE key='mediator_id'")
        return None if value is None else str(value)

    def set_mediator_id(self, mediator_id: str) -> None:
        self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('mediator_id', ?)", (mediator_id,))

    def holds_state(self) -> bool:
        """Whether nodes, accounts, objects or postings are recorded: what a mediator under another key could not
        go on with (nodes hold shares under grants signed by the key that wrote them)."""
        return any(self._one(f"SELECT EXISTS (SELECT 1 FROM {table})")
                   for table in ("nodes", "accounts", "objects", "ledger_postings"))

    # --- nodes ----------------------------------------------------------------------------------------------

    def upsert_node(self, *, node_id: str, public_key: bytes, url: str, price: int | None, capacity: int,
                    free: int, operator: str, payout_address: str | None, now: float,
                    unresponsive_after: int = 3) -> None:
        """Record an announcement; a disqualified node stays disqualified, an offline one comes back online.

        A node that did not answer ``unresponsive_after`` audit rounds in a row stays (or becomes) unresponsive
        whatever it announces: only an answered audit brings it back (see :mod:`mediatord.audit`)."""
        self._conn.execute(
            "INSERT INTO nodes (node_id, public_key, url, price, capacity, free, operator, payout_address,"
            " first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(node_id) DO UPDATE SET"
            " url=excluded.url, price=excluded.price, capacity=excluded.capacity, free=excluded.free,"
            " operator=excluded.operator, payout_address=excluded.payout_address, last_seen=excluded.last_seen,"
            " state=CASE WHEN state='disqualified' THEN state WHEN unreachable_rounds >= ? THEN 'unresponsive'"
            " ELSE 'online' END",
            (node_id, public_key, url, price, capacity, free, operator, payout_address, now, now,
             unresponsive_after))

    def touch_node(self, node_id: str, now: float) -> None:
        """The node answered an audit: it is seen, and online again if it was offline or unresponsive."""
        self._conn.execute("UPDATE nodes SET last_seen=?, unreachable_rounds=0, state=CASE WHEN state IN"
                           " ('offline','unresponsive') THEN 'online' ELSE state END WHERE node_id=?", (now, node_id))

    def node(self, node_id: str) -> NodeRow | None:
        row = self._conn.execute("SELECT * FROM nodes WHERE node_id=?", (node_id,)).fetchone()
        return None if row is None else NodeRow(*row)

    def nodes(self, state: str | None = None) -> list[NodeRow]:
        if state is None:
            rows = self._conn.execute("SELECT * FROM nodes ORDER BY node_id").fetchall()
        else:
            rows = self._conn.execute("SELECT * FROM nodes WHERE state=? ORDER BY node_id", (state,)).fetchall()
        return [NodeRow(*r) for r in rows]

    def mark_offline(self, cutoff: float) -> list[str]:
        """Nodes online (or unresponsive) but unseen since ``cutoff`` become offline; returns their ids.

        Their count of unreachable rounds starts again: they were away, which the offline state covers (their
        shares stop counting either way), and back they are welcome with their next announcement."""
        ids = [r[0] for r in self._conn.execute(
            "SELECT node_id FROM nodes WHERE state IN ('online','unresponsive') AND last_seen < ?", (cutoff,))]
        if ids:
            self._conn.executemany("UPDATE nodes SET state='offline', unreachable_rounds=0 WHERE node_id=?",
                                   [(i,) for i in ids])
        return ids

    def record_node_outcome(self, node_id: str, *, passed: bool, counts_toward_disqualification: bool,
                            reputation: float, disqualify: bool, unreachable_rounds: int = 0,
                            unresponsive: bool = False) -> None:
        """One round's verdict; ``unresponsive`` turns an online node unresponsive (its shares stop counting)."""
        if passed:
            self._conn.execute("UPDATE nodes SET passed=passed+1, consecutive_failures=0, unreachable_rounds=0,"
                               " reputation=? WHERE node_id=?", (reputation, node_id))
            return
        self._conn.execute(
            "UPDATE nodes SET failed=failed+1, consecutive_failures=consecutive_failures+?, reputation=?,"
            " unreachable_rounds=?, state=CASE WHEN ? THEN 'disqualified'"
            " WHEN ? AND state='online' THEN 'unresponsive' ELSE state END WHERE node_id=?",
            (1 if counts_toward_disqualification else 0, reputation, unreachable_rounds, 1 if disqualify else 0,
             1 if unresponsive else 0, node_id))

    def pending_grant_bytes(self, now: float) -> dict[str, int]:
        rows = self._conn.execute("SELECT node_id, SUM(size) FROM grants WHERE used=0 AND expires_at>?"
                                  " GROUP BY node_id", (now,))
        return {r[0]: r[1] for r in rows}

    # --- accounts and objects -------------------------------------------------------------------------------

    def ensure_account(self, account_id: str, public_key: bytes, now: float) -> None:
        self._conn.execute("INSERT OR IGNORE INTO accounts VALUES (?,?,?)", (account_id, public_key, now))

    def object(self, object_id: str) -> ObjectRow | None:
        row = self._conn.execute("SELECT object_id, account_id, layout, state, created_at FROM objects"
                                 " WHERE object_id=?", (object_id,)).fetchone()
        if row is None:
            return None
        return ObjectRow(row[0], row[1], layout_from_json(json.loads(row[2])), row[3], row[4])

    def insert_object(self, object_id: str, account_id: str, layout: ObjectLayout, now: float) -> None:
        self._conn.execute("INSERT INTO objects (object_id, account_id, layout, state, created_at, stored_bytes)"
                           " VALUES (?,?,?,?,?,?)",
                           (object_id, account_id, json.dumps(layout_to_json(layout)), "pending", now,
                            _stored_bytes(layout)))

    def set_object_state(self, object_id: str, state: str) -> None:
        self._conn.execute("UPDATE objects SET state=? WHERE object_id=?", (state, object_id))

    def objects_of(self, account_id: str) -> list[ObjectRow]:
        rows = self._conn.execute("SELECT object_id, account_id, layout, state, created_at FROM objects"
                                  " WHERE account_id=?", (account_id,)).fetchall()
        return [ObjectRow(r[0], r[1], layout_from_json(json.loads(r[2])), r[3], r[4]) for r in rows]

    def account_bytes(self, account_id: str, *, committed_only: bool) -> int:
        """Bytes of all n shares of one account's objects (committed ones, or all), summed by SQL over that
        account's rows only (index ``objects_by_account``): an account's requests cost no more as others store."""
        sql = "SELECT COALESCE(SUM(stored_bytes), 0) FROM objects WHERE account_id=?"
        return int(self._one(sql + (" AND state!='pending'" if committed_only else ""), (account_id,)))

    def account_object_health(self, account_id: str) -> list[tuple[str, int, int, int, int]]:
        """(object state, k, n, healthy shares on online nodes, objects) of one account's objects, grouped: one
        query, however many objects it has."""
        return [(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in self._conn.execute(
            "SELECT state, k, n, healthy, COUNT(*) FROM (SELECT o.state AS state, json_extract(o.layout, '$.k') AS k,"
            " json_extract(o.layout, '$.n') AS n, (SELECT COUNT(*) FROM shares s JOIN nodes d ON"
            " d.node_id=s.node_id WHERE s.object_id=o.object_id AND s.state IN ('stored','proven') AND"
            " d.state='online') AS healthy FROM objects o WHERE o.account_id=?) GROUP BY state, k, n, healthy",
            (account_id,))]

    def committed_object_ids(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT object_id FROM objects WHERE state!='pending'")]

    def objects_needing_attention(self) -> list[str]:
        """Committed objects with fewer than n healthy shares, or marked irreparable (one query for all)."""
        return [r[0] for r in self._conn.execute(
            "SELECT o.object_id FROM objects o WHERE o.state!='pending' AND (o.state='irreparable' OR"
            " (SELECT COUNT(*) FROM shares s JOIN nodes n ON n.node_id=s.node_id WHERE s.object_id=o.object_id"
            " AND s.state IN ('stored','proven') AND n.state='online') < json_extract(o.layout, '$.n')"
            " OR EXISTS (SELECT 1 FROM shares s JOIN nodes n ON n.node_id=s.node_id"
            " WHERE s.object_id=o.object_id AND n.state='disqualified'))")]

    def delete_object(self, object_id: str, now: float) -> list[ShareRow]:
        """Forget an object; its shares move to the release queue. Returns the released shares.

        A committed object leaves a billing tombstone: the billing period it is deleted in (or, after downtime,
        the periods not billed yet) still charges the time it was stored."""
        with self.transaction() as conn:
            shares = self.shares_of(object_id)
            conn.execute("INSERT INTO billing_tombstones (account_id, stored_bytes, created_at, deleted_at)"
                         " SELECT account_id, stored_bytes, created_at, ? FROM objects WHERE object_id=? AND"
                         " state!='pending'", (now, object_id))
            conn.executemany("INSERT OR IGNORE INTO releases VALUES (?,?,0,?)",
                             [(s.share_id, s.node_id, now) for s in shares])
            conn.execute("DELETE FROM shares WHERE object_id=?", (object_id,))
            conn.executemany("DELETE FROM grants WHERE share_id=?", [(s.share_id,) for s in shares])
            conn.execute("DELETE FROM objects WHERE object_id=?", (object_id,))
        return shares

    # --- shares and grants ----------------------------------------------------------------------------------

    def shares_of(self, object_id: str) -> list[ShareRow]:
        rows = self._conn.execute("SELECT share_id, object_id, idx, node_id, root, size, state, price FROM shares"
                                  " WHERE object_id=? ORDER BY idx", (object_id,)).fetchall()
        return [ShareRow(*r) for r in rows]

    def share(self, share_id: str) -> ShareRow | None:
        row = self._conn.execute("SELECT share_id, object_id, idx, node_id, root, size, state, price FROM shares"
                                 " WHERE share_id=?", (share_id,)).fetchone()
        return None if row is None else ShareRow(*row)

    def put_share(self, share: ShareRow, now: float) -> None:
        """Insert or update a share. Its price is kept while it stays on its node (a commit names none), and
        unknown (NULL) if it moves without one."""
        self._conn.execute(
            "INSERT INTO shares (share_id, object_id, idx, node_id, root, size, state, updated_at, price)"
            " VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(share_id) DO UPDATE SET"
            " price=CASE WHEN excluded.price IS NOT NULL THEN excluded.price WHEN excluded.node_id=shares.node_id"
            " THEN shares.price END,"
            " node_id=excluded.node_id, state=excluded.state, updated_at=excluded.updated_at,"
            " root=CASE WHEN shares.root=x'' THEN excluded.root ELSE shares.root END",  # known once, then fixed
            (share.share_id, share.object_id, share.idx, share.node_id, share.root, share.size, share.state, now,
             share.price))

    def set_share_states(self, share_ids: Sequence[str], state: str, now: float, node_id: str | None = None
                         ) -> None:
        """``node_id``: only where the share is still recorded on that node (a verdict on one node's copy)."""
        if node_id is None:
            self._conn.executemany("UPDATE shares SET state=?, updated_at=? WHERE share_id=?",
                                   [(state, now, s) for s in share_ids])
        else:
            self._conn.executemany("UPDATE shares SET state=?, updated_at=? WHERE share_id=? AND node_id=?",
                                   [(state, now, s, node_id) for s in share_ids])

    def audit_node_ids(self) -> list[str]:
        """The nodes a round challenges: online ones holding committed shares (stored or proven), and every
        unresponsive one (an answered round is what brings it back, even once its shares were moved away)."""
        return [r[0] for r in self._conn.execute(
            "SELECT n.node_id FROM nodes n WHERE n.state='unresponsive' OR (n.state='online' AND EXISTS (SELECT 1"
            " FROM shares s WHERE s.node_id=n.node_id AND s.state IN ('stored','proven'))) ORDER BY n.node_id")]

    def audit_shares(self, node_id: str) -> list[ShareRow]:
        rows = self._conn.execute(
            "SELECT share_id, object_id, idx, node_id, root, size, state, price FROM shares WHERE node_id=? AND"
            " state IN ('stored','proven')", (node_id,)).fetchall()
        return [ShareRow(*r) for r in rows]

    def share_ids_on(self, node_id: str) -> set[str]:
        """Every share recorded on this node, whatever its state."""
        return {r[0] for r in self._conn.execute("SELECT share_id FROM shares WHERE node_id=?", (node_id,))}

    def insert_grant(self, grant: GrantRow) -> None:
        self._conn.execute("INSERT INTO grants VALUES (?,?,?,?,?,?,?,?)",
                           (grant.grant_id, grant.share_id, grant.node_id, grant.account_id, grant.size,
                            grant.root, grant.expires_at, int(grant.used)))

    def grant(self, grant_id: str) -> GrantRow | None:
        row = self._conn.execute("SELECT * FROM grants WHERE grant_id=?", (grant_id,)).fetchone()
        if row is None:
            return None
        return GrantRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]))

    def sweep_stale_uploads(self, before: float, now: float) -> tuple[int, int]:
        """Uploads abandoned before ``before``: grants that expired then unused, for a share not committed on
        that node (the client died, or re-placed that share), are dropped and their (share, node) queued for
        release, since the bytes may have landed; objects still ``pending`` since then are forgotten with
        their ``placed`` share rows.
        Returns (grants, objects) swept."""
        with self.transaction() as conn:
            stale = conn.execute(
                "SELECT grant_id, share_id, node_id FROM grants g WHERE used=0 AND expires_at<? AND NOT EXISTS"
                " (SELECT 1 FROM shares s WHERE s.share_id=g.share_id AND s.node_id=g.node_id AND"
                " s.state!='placed')", (before,)).fetchall()
            conn.executemany("INSERT OR IGNORE INTO releases VALUES (?,?,0,?)", [(s, n, now) for _, s, n in stale])
            conn.executemany("DELETE FROM grants WHERE grant_id=?", [(g,) for g, _, _ in stale])
            conn.execute("DELETE FROM shares WHERE object_id IN (SELECT object_id FROM objects WHERE"
                         " state='pending' AND created_at<?)", (before,))
            objects = conn.execute("DELETE FROM objects WHERE state='pending' AND created_at<?", (before,)).rowcount
        return len(stale), objects

    def mark_grants_used(self, grant_ids: Sequence[str]) -> None:
        self._conn.executemany("UPDATE grants SET used=1 WHERE grant_id=?", [(g,) for g in grant_ids])

    # --- audits ---------------------------------------------------------------------------------------------

    def last_round_started(self) -> float | None:
        """When the latest audit round began (by the primary key: no scan of the rounds table), None before any."""
        value = self._one("SELECT MIN(started_at) FROM audit_rounds WHERE round_id=(SELECT MAX(round_id) FROM "
                          "audit_rounds)")
        return None if value is None else float(value)

    def next_round_id(self) -> int:
        value = self._one("SELECT MAX(round_id) FROM audit_rounds")
        return 1 if value is None else int(value) + 1

    def start_round(self, round_id: int, node_id: str, nonce: bytes, now: float) -> None:
        self._conn.execute("INSERT OR IGNORE INTO audit_rounds (round_id, node_id, nonce, started_at)"
                           " VALUES (?,?,?,?)", (round_id, node_id, nonce, now))

    def finish_round(self, round_id: int, node_id: str, result: str, detail: str, now: float) -> None:
        self._conn.execute("UPDATE audit_rounds SET result=?, detail=?, finished_at=? WHERE round_id=? AND"
                           " node_id=?", (result, detail[:500], now, round_id, node_id))

    def record_pass(self, round_id: int, node_id: str, shares_proven: int, bytes_proven: int, now: float,
                    priced: Mapping[int, int] | None = None) -> bool:
        """Idempotent: returns False if this (round, node) pass was already recorded. ``priced``: proven bytes
        by the price at which their shares were placed (bytes of shares of unknown price are left out)."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO audit_passes (round_id, node_id, shares_proven, bytes_proven, passed_at,"
            " priced_bytes) VALUES (?,?,?,?,?,?)",
            (round_id, node_id, shares_proven, bytes_proven, now,
             None if priced is None else json.dumps(sorted(priced.items()))))
        return cur.rowcount == 1

    def audit_passes(self, node_id: str | None = None) -> list[tuple[int, str, int, int, float]]:
        if node_id is None:
            return list(self._conn.execute(f"SELECT {PASS_COLUMNS} FROM audit_passes ORDER BY round_id, node_id"))
        return list(self._conn.execute(f"SELECT {PASS_COLUMNS} FROM audit_passes WHERE node_id=? ORDER BY round_id",
                                       (node_id,)))

    def round_results(self, node_id: str) -> list[tuple[int, str, str]]:
        return list(self._conn.execute("SELECT round_id, result, detail FROM audit_rounds WHERE node_id=?"
                                       " ORDER BY round_id", (node_id,)))

    # --- pointers -------------------------------------------------------------------------------------------

    def pointer(self, account_id: str) -> tuple[int, str] | None:
        row = self._conn.execute("SELECT version, envelope FROM pointers WHERE account_id=?",
                                 (account_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def put_pointer(self, account_id: str, public_key: bytes, version: int, envelope: str, now: float
                    ) -> int | None:
        """Compare-and-set: store iff version == current + 1; returns None on success, else the current one.
        The account is recorded with the pointer, in the same transaction: a refused write leaves none."""
        with self.transaction() as conn:
            current = self._one("SELECT version FROM pointers WHERE account_id=?", (account_id,)) or 0
            if version != current + 1:
                return int(current)
            self.ensure_account(account_id, public_key, now)
            conn.execute("INSERT OR REPLACE INTO pointers VALUES (?,?,?,?)", (account_id, version, envelope, now))
        return None

    # --- releases and repairs -------------------------------------------------------------------------------

    def due_releases(self, now: float, limit: int = 100) -> list[tuple[str, str, int]]:
        return list(self._conn.execute("SELECT share_id, node_id, attempts FROM releases WHERE next_try<=?"
                                       " ORDER BY next_try LIMIT ?", (now, limit)))

    def queue_release(self, share_id: str, node_id: str, now: float) -> None:
        self._conn.execute("INSERT OR IGNORE INTO releases VALUES (?,?,0,?)", (share_id, node_id, now))

    def releasing_nodes(self, share_ids: Sequence[str]) -> set[str]:
        """Nodes with a release of one of these shares still queued: they may still hold that copy."""
        found: set[str] = set()
        for start in range(0, len(share_ids), 500):
            chunk = list(share_ids[start:start + 500])
            found.update(r[0] for r in self._conn.execute(
                f"SELECT node_id FROM releases WHERE share_id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def release_done(self, share_id: str, node_id: str) -> None:
        self._conn.execute("DELETE FROM releases WHERE share_id=? AND node_id=?", (share_id, node_id))

    def release_retry(self, share_id: str, node_id: str, next_try: float) -> None:
        self._conn.execute("UPDATE releases SET attempts=attempts+1, next_try=? WHERE share_id=? AND node_id=?",
                           (next_try, share_id, node_id))

    def record_repair(self, object_id: str, result: str, rebuilt: int, detail: str, now: float) -> None:
        self._conn.execute("INSERT INTO repairs (object_id, started_at, result, shares_rebuilt, detail)"
                           " VALUES (?,?,?,?,?)", (object_id, now, result, rebuilt, detail[:500]))

    def repairs(self) -> list[tuple[str, str, int, str]]:
        return list(self._conn.execute("SELECT object_id, result, shares_rebuilt, detail FROM repairs"
                                       " ORDER BY repair_id"))

    # --- ledger, billing and escrow (see mediatord/ledger.py for the rules) ------------------------------

    def post(self, postings: Sequence[Posting], *, skip_existing: bool = False) -> list[Posting]:
        """Apply postings inside the caller's transaction; returns those applied.

        A posting whose key is already in the ledger is skipped (``skip_existing``: retries of billing) or
        refused with LedgerError (deposits, requests). The invariant is checked after the batch; a failure
        raises and the caller's transaction rolls back, so the ledger is unchanged.
        """
        if not self._conn.in_transaction:
            raise RuntimeError("MediatorDB.post must run inside db.transaction()")
        keys = [p.key for p in postings]
        existing: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            existing.update(r[0] for r in self._conn.execute(
                f"SELECT key FROM ledger_postings WHERE key IN ({','.join('?' * len(chunk))})", chunk))
        if existing and not skip_existing:
            raise LedgerError(f"{sorted(existing)[0]} was already recorded: refusing to apply it twice")
        todo = [p for p in postings if p.key not in existing]
        accounts = sorted({a for p in todo for a in (p.source, p.dest)})
        new = apply_postings(self.balances(accounts), todo)
        self._conn.executemany("INSERT INTO ledger_postings (key, kind, source, dest, amount, at, memo)"
                               " VALUES (?,?,?,?,?,?,?)",
                               [(p.key, p.kind, p.source, p.dest, p.amount, p.at, p.memo) for p in todo])
        self._conn.executemany("INSERT INTO ledger_balances VALUES (?,?) ON CONFLICT(account) DO UPDATE SET"
                               " balance=excluded.balance", list(new.items()))
        if todo:
            self.ledger_totals(check=True)
        return todo

    def balances(self, accounts: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for start in range(0, len(accounts), 500):
            chunk = list(accounts[start:start + 500])
            found.update(self._conn.execute(
                f"SELECT account, balance FROM ledger_balances WHERE account IN ({','.join('?' * len(chunk))})",
                chunk).fetchall())
        return found

    def balance(self, account: str) -> int:
        return int(self._one("SELECT balance FROM ledger_balances WHERE account=?", (account,)) or 0)

    def all_balances(self, prefix: str = "") -> list[tuple[str, int]]:
        return list(self._conn.execute("SELECT account, balance FROM ledger_balances WHERE account LIKE ?"
                                       " ORDER BY account", (prefix + "%",)))

    def ledger_totals(self, *, check: bool = False) -> Totals:
        """The invariant's totals, summed by SQL per account class; ``check`` raises if they do not balance."""
        rows = self._conn.execute(
            "SELECT CASE WHEN account LIKE 'client:%' THEN 'client:x' WHEN account LIKE 'node:%' THEN 'node:x'"
            " ELSE account END AS cls, SUM(balance), MIN(balance) FROM ledger_balances GROUP BY cls").fetchall()
        pairs = [(r[0], int(r[1])) for r in rows]
        if check:
            for cls, _total, lowest in rows:
                if cls not in WORLD and lowest < 0:
                    raise AssertionError(f"ledger invariant broken: a {cls.split(':')[0]} balance is negative")
            return check_invariant(pairs)
        return totals(pairs)

    def postings(self, account: str | None = None, limit: int = 100, before_seq: int | None = None
                 ) -> list[tuple[int, Posting]]:
        """History, newest first: all postings, or those touching ``account``."""
        where: list[str] = []
        args: list[object] = []
        if account is not None:
            where.append("(source=? OR dest=?)")
            args += [account, account]
        if before_seq is not None:
            where.append("seq<?")
            args.append(before_seq)
        sql = "SELECT seq, key, kind, source, dest, amount, at, memo FROM ledger_postings"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._conn.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [(r[0], Posting(*r[1:])) for r in rows]

    def posting_sums(self, account: str) -> dict[str, int]:
        """Total msat per posting kind into and out of one account (earned, paid, charged...)."""
        sums: dict[str, int] = {}
        for kind, side, total in self._conn.execute(
                "SELECT kind, 'in', SUM(amount) FROM ledger_postings WHERE dest=? GROUP BY kind UNION ALL"
                " SELECT kind, 'out', SUM(amount) FROM ledger_postings WHERE source=? GROUP BY kind",
                (account, account)):
            sums[f"{kind}_{side}"] = int(total)
        return sums

    # billing periods and audit credits

    def last_billed_period(self) -> int | None:
        value = self._one("SELECT MAX(period_id) FROM billing_periods")
        return None if value is None else int(value)

    def last_billed(self) -> tuple[int, float] | None:
        """(period id, end) of the last billed period: the next one starts at that end."""
        row = self._conn.execute("SELECT period_id, end FROM billing_periods ORDER BY period_id DESC LIMIT 1"
                                 ).fetchone()
        return None if row is None else (int(row[0]), float(row[1]))

    def record_billing_period(self, period_id: int, start: float, end: float, now: float, accounts: int,
                              charged: int, unpaid: int) -> None:
        self._conn.execute("INSERT INTO billing_periods VALUES (?,?,?,?,?,?,?)",
                           (period_id, start, end, now, accounts, charged, unpaid))

    def storage_by_account(self) -> list[tuple[str, int, float]]:
        """(account, bytes of all n shares, created_at) of every committed object, ordered by account."""
        return [(r[0], int(r[1]), float(r[2])) for r in self._conn.execute(
            "SELECT account_id, stored_bytes, created_at FROM objects WHERE state!='pending' ORDER BY account_id")]

    def billable_storage(self, since: float) -> list[tuple[str, int, float, float | None]]:
        """(account, bytes of all n shares, created_at, deleted_at) of every committed object (deleted_at None)
        and of every committed object deleted after ``since`` (its billing tombstone)."""
        return [(r[0], int(r[1]), float(r[2]), None if r[3] is None else float(r[3])) for r in self._conn.execute(
            "SELECT account_id, stored_bytes, created_at, NULL FROM objects WHERE state!='pending' UNION ALL"
            " SELECT account_id, stored_bytes, created_at, deleted_at FROM billing_tombstones WHERE deleted_at>?",
            (since,))]

    def purge_tombstones(self, until: float) -> None:
        """Tombstones of objects deleted by ``until``, the end of a billed period: their time is billed."""
        self._conn.execute("DELETE FROM billing_tombstones WHERE deleted_at<=?", (until,))

    def uncredited_passes(self, limit: int, after: tuple[float, int, str] | None = None
                          ) -> list[tuple[int, str, int, float, dict[int, int], float | None]]:
        """(round, node, bytes proven, passed at, bytes by placement price, when the node last failed or missed
        a round before this pass, or None) of passes not yet credited, oldest first; ``after``: only those past
        this (passed at, round, node), to page on beyond passes left waiting."""
        if after is None:
            after = (float("-inf"), 0, "")
        return [(r[0], r[1], r[2], r[3], {int(p): int(b) for p, b in json.loads(r[4] or "[]")}, r[5])
                for r in self._conn.execute(
            "SELECT p.round_id, p.node_id, p.bytes_proven, p.passed_at, p.priced_bytes, (SELECT MAX(r.finished_at)"
            " FROM audit_rounds r WHERE r.node_id=p.node_id AND r.result IN ('failed','unreachable') AND"
            " r.finished_at<p.passed_at) FROM audit_passes p"
            " LEFT JOIN audit_credits c"
            " ON c.round_id=p.round_id AND c.node_id=p.node_id WHERE c.round_id IS NULL"
            " AND (p.passed_at, p.round_id, p.node_id) > (?, ?, ?)"
            " ORDER BY p.passed_at, p.round_id, p.node_id LIMIT ?", (*after, limit))]

    def last_credited_pass(self, node_ids: Sequence[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        for start in range(0, len(node_ids), 500):
            chunk = list(node_ids[start:start + 500])
            found.update(self._conn.execute(
                f"SELECT node_id, MAX(passed_at) FROM audit_credits WHERE node_id IN ({','.join('?' * len(chunk))})"
                " GROUP BY node_id", chunk).fetchall())
        return found

    def record_credits(self, rows: Sequence[tuple[int, str, float, int]]) -> None:
        self._conn.executemany("INSERT INTO audit_credits VALUES (?,?,?,?)", rows)

    def credited_rounds(self, node_id: str) -> list[tuple[int, int]]:
        return list(self._conn.execute("SELECT round_id, amount FROM audit_credits WHERE node_id=? ORDER BY"
                                       " round_id", (node_id,)))

    # accounts: deposit addresses, running out of money

    def account_billing(self, account_id: str) -> tuple[str | None, float | None, float | None]:
        row = self._conn.execute("SELECT deposit_address, out_since, warned_at FROM account_billing WHERE"
                                 " account_id=?", (account_id,)).fetchone()
        return (None, None, None) if row is None else (row[0], row[1], row[2])

    def has_account(self, account_id: str) -> bool:
        return self._one("SELECT 1 FROM accounts WHERE account_id=?", (account_id,)) is not None

    def set_deposit_address(self, account_id: str, address: str) -> str:
        """Record ``address`` unless the account has one already (the daemon and ``fund-test-account`` may
        derive one each at once: the first recorded stays, it may have been shown and paid); returns the
        account's address."""
        self._conn.execute("INSERT INTO account_billing (account_id, deposit_address) VALUES (?,?) ON"
                           " CONFLICT(account_id) DO UPDATE SET deposit_address="
                           "COALESCE(account_billing.deposit_address, excluded.deposit_address)",
                           (account_id, address))
        return str(self._one("SELECT deposit_address FROM account_billing WHERE account_id=?", (account_id,)))

    def deposit_addresses(self) -> dict[str, str]:
        """address → account id."""
        return dict(self._conn.execute("SELECT deposit_address, account_id FROM account_billing"
                                       " WHERE deposit_address IS NOT NULL"))

    def set_out_since(self, account_id: str, when: float | None) -> None:
        self._conn.execute("INSERT INTO account_billing (account_id, out_since) VALUES (?,?) ON"
                           " CONFLICT(account_id) DO UPDATE SET out_since=excluded.out_since", (account_id, when))

    def set_warned_at(self, account_id: str, when: float | None) -> None:
        self._conn.execute("INSERT INTO account_billing (account_id, warned_at) VALUES (?,?) ON"
                           " CONFLICT(account_id) DO UPDATE SET warned_at=excluded.warned_at", (account_id, when))

    def accounts_out_of_funds(self) -> dict[str, float]:
        return dict(self._conn.execute("SELECT account_id, out_since FROM account_billing WHERE out_since"
                                       " IS NOT NULL"))

    def warned_accounts(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT account_id FROM account_billing WHERE warned_at IS NOT"
                                                 " NULL")}

    # deposits

    def deposit(self, txid: str, vout: int) -> tuple[str, int, int, float | None] | None:
        row = self._conn.execute("SELECT account_id, amount_sat, confirmations, credited_at FROM deposits"
                                 " WHERE txid=? AND vout=?", (txid, vout)).fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def upsert_deposit(self, txid: str, vout: int, account_id: str, address: str, amount_sat: int,
                       confirmations: int, now: float) -> None:
        self._conn.execute("INSERT INTO deposits VALUES (?,?,?,?,?,?,?,NULL) ON CONFLICT(txid, vout) DO UPDATE"
                           " SET confirmations=excluded.confirmations",
                           (txid, vout, account_id, address, amount_sat, confirmations, now))

    def forget_pending_deposits(self, keep: set[tuple[str, int]]) -> int:
        """Drop uncredited deposits not in ``keep`` (the outputs the wallet still sees): reorged away or
        double-spent, they are no longer pending; one that comes back is recorded again. Returns rows dropped."""
        gone = [(t, v) for t, v in self._conn.execute("SELECT txid, vout FROM deposits WHERE credited_at IS NULL")
                if (t, v) not in keep]
        self._conn.executemany("DELETE FROM deposits WHERE txid=? AND vout=? AND credited_at IS NULL", gone)
        return len(gone)

    def credited_outpoints(self) -> set[tuple[str, int]]:
        """(txid, vout) of every credited deposit: the only deposits a payout may spend."""
        return {(r[0], int(r[1])) for r in self._conn.execute("SELECT txid, vout FROM deposits WHERE credited_at IS"
                                                               " NOT NULL")}

    def mark_deposit_credited(self, txid: str, vout: int, now: float) -> None:
        self._conn.execute("UPDATE deposits SET credited_at=? WHERE txid=? AND vout=?", (now, txid, vout))

    def deposits_of(self, account_id: str) -> list[tuple[str, int, int, int, float | None]]:
        return list(self._conn.execute("SELECT txid, vout, amount_sat, confirmations, credited_at FROM deposits"
                                       " WHERE account_id=? ORDER BY seen_at", (account_id,)))

    # payouts

    def open_payout_batches(self) -> list[tuple[int, str, int, str | None]]:
        """(batch, state, fee, raw tx) of batches not yet sent or failed: what a restart must finish."""
        return list(self._conn.execute("SELECT batch_id, state, fee_sat, raw_tx FROM payout_batches WHERE state"
                                       " IN ('prepared','signed') ORDER BY batch_id"))

    def insert_payout_batch(self, now: float, fee_sat: int, outputs: Sequence[tuple[str, str, int, int]]) -> int:
        cur = self._conn.execute("INSERT INTO payout_batches (state, created_at, fee_sat) VALUES"
                                 " ('prepared',?,?)", (now, fee_sat))
        batch_id = int(cur.lastrowid or 0)
        self._conn.executemany("INSERT INTO payout_outputs VALUES (?,?,?,?,?)",
                               [(batch_id, *o) for o in outputs])
        return batch_id

    def payout_outputs(self, batch_id: int) -> list[tuple[str, str, int, int]]:
        """(node, address, msat debited, sat sent) of one batch."""
        return list(self._conn.execute("SELECT node_id, address, debited, value_sat FROM payout_outputs WHERE"
                                       " batch_id=? ORDER BY node_id", (batch_id,)))

    def set_payout_state(self, batch_id: int, state: str, *, raw_tx: str | None = None, txid: str | None = None,
                         now: float | None = None, detail: str = "") -> None:
        self._conn.execute("UPDATE payout_batches SET state=?, raw_tx=COALESCE(?, raw_tx), txid=COALESCE(?, txid),"
                           " sent_at=COALESCE(?, sent_at), detail=? WHERE batch_id=?",
                           (state, raw_tx, txid, now, detail[:500], batch_id))

    def payout_batches(self, limit: int = 100) -> list[tuple[int, str, float, int, str | None, float | None, str]]:
        return list(self._conn.execute("SELECT batch_id, state, created_at, fee_sat, txid, sent_at, detail FROM"
                                       " payout_batches ORDER BY batch_id DESC LIMIT ?", (limit,)))

    # --- metrics --------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        one = self._one
        return {
            "nodes_online": one("SELECT COUNT(*) FROM nodes WHERE state='online'"),
            "nodes_offline": one("SELECT COUNT(*) FROM nodes WHERE state='offline'"),
            "nodes_unresponsive": one("SELECT COUNT(*) FROM nodes WHERE state='unresponsive'"),
            "nodes_disqualified": one("SELECT COUNT(*) FROM nodes WHERE state='disqualified'"),
            "objects": one("SELECT COUNT(*) FROM objects WHERE state!='pending'"),
            "objects_irreparable": one("SELECT COUNT(*) FROM objects WHERE state='irreparable'"),
            "shares_healthy": one("SELECT COUNT(*) FROM shares s JOIN nodes n ON n.node_id=s.node_id"
                                  " WHERE s.state IN ('stored','proven') AND n.state='online'"),
            "shares_lost": one("SELECT COUNT(*) FROM shares WHERE state='lost'"),
            "audits_passed": one("SELECT COUNT(*) FROM audit_rounds WHERE result='passed'"),
            "audits_failed": one("SELECT COUNT(*) FROM audit_rounds WHERE result IN ('failed','unreachable')"),
            "repairs_done": one("SELECT COUNT(*) FROM repairs WHERE result='repaired'"),
            "repairs_failed": one("SELECT COUNT(*) FROM repairs WHERE result NOT IN ('repaired')"),
            "releases_pending": one("SELECT COUNT(*) FROM releases"),
        }
