"""An account's standing and summary: aggregate queries over that account's rows only, equal to a per-object count."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core.identity import SigningKey
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.messages import layout_to_json
from fincryptfs.core.settings import MediatorSettings
from mediatord import billing
from mediatord.db import MediatorDB, ShareRow
from mediatord.service import MediatorService, object_health

KEYS = tuple(SigningKey.generate() for _ in range(3))
ACCOUNTS = tuple(k.id for k in KEYS)
NODES = tuple(str(i) * 64 for i in range(4))
NODE_STATES = ("online", "offline", "unresponsive", "disqualified")
SHARE_STATES = ("placed", "stored", "proven", "lost")
LAYOUTS = (ObjectLayout(100_000, 8192, 2, 4), ObjectLayout(1, 4096, 1, 2), ObjectLayout(3_000_000, 65536, 3, 6))
SETTINGS = MediatorSettings.from_env({"MEDIATORD_PRICING": "fixed:100"}, home=Path("/nonexistent"))

objects = st.lists(st.tuples(st.sampled_from(ACCOUNTS), st.sampled_from(LAYOUTS),
                             st.sampled_from(("pending", "committed", "irreparable")),
                             st.lists(st.tuples(st.sampled_from(NODES), st.sampled_from(SHARE_STATES)), max_size=6)),
                   max_size=12)


@contextmanager
def service() -> Iterator[MediatorService]:
    svc = MediatorService(SETTINGS, SigningKey.generate(), MediatorDB(":memory:"))
    try:
        yield svc
    finally:
        svc.db.close()


def fill(db: MediatorDB, node_states: tuple[str, ...], rows: list[tuple[str, ObjectLayout, str,
                                                                            list[tuple[str, str]]]]) -> None:
    for node_id, state in zip(NODES, node_states, strict=True):
        db.upsert_node(node_id=node_id, public_key=b"k", url="http://10.0.0.1:1", price=100, capacity=1, free=1,
                       operator="", payout_address=None, now=0.0)
        db._conn.execute("UPDATE nodes SET state=? WHERE node_id=?", (state, node_id))
    with db.transaction():
        for number, (account_id, layout, state, shares) in enumerate(rows):
            object_id = f"{number:064x}"
            db.insert_object(object_id, account_id, layout, float(number))
            db.set_object_state(object_id, state)
            for idx, (node_id, share_state) in enumerate(shares[:layout.n]):
                db.put_share(ShareRow(f"{number:032x}{idx:032x}", object_id, idx, node_id, b"r", 1, share_state),
                             0.0)


def per_object_summary(svc: MediatorService, account_id: str) -> dict[str, object]:
    """The summary counted object by object, as the mediator did before it used aggregate queries."""
    objects = svc.db.objects_of(account_id)
    online = svc.online_node_ids()
    by_state: dict[str, int] = {}
    for obj in objects:
        state = object_health(obj, svc.db.shares_of(obj.object_id), online).state
        by_state[state] = by_state.get(state, 0) + 1
    return {"account_id": account_id, "objects": len(objects),
            "bytes_stored": sum(o.layout.share_size * o.layout.n for o in objects if o.state != "pending"),
            "objects_by_state": by_state}


@settings(max_examples=60, deadline=None)
@given(st.tuples(*(st.sampled_from(NODE_STATES) for _ in NODES)), objects)
def test_aggregates_equal_the_per_object_count(node_states: tuple[str, ...], rows: list) -> None:  # type: ignore[type-arg]
    with service() as svc:
        fill(svc.db, node_states, rows)
        for key in KEYS:
            account_id = key.id
            objects = svc.db.objects_of(account_id)
            committed = sum(o.layout.share_size * o.layout.n for o in objects if o.state != "pending")
            assert svc.db.account_bytes(account_id, committed_only=True) == committed
            assert svc.db.account_bytes(account_id, committed_only=False) == sum(
                o.layout.share_size * o.layout.n for o in objects)
            assert svc.account(SigningKey.generate().public)["objects"] == 0
            assert svc.account(key.public) == per_object_summary(svc, account_id)
            standing = billing.account_standing(svc.db, svc.pricing, svc.settings, account_id, 0.0)
            assert standing.burn_rate == committed * 100 // billing.GIB


def test_an_accounts_queries_use_its_index_and_do_not_grow_with_other_accounts_objects() -> None:
    with service() as svc:
        db = svc.db
        for committed_only in (True, False):
            sql = "SELECT COALESCE(SUM(stored_bytes), 0) FROM objects WHERE account_id=?" + (
                " AND state!='pending'" if committed_only else "")
            plan = " ".join(r[-1] for r in db._conn.execute("EXPLAIN QUERY PLAN " + sql, ("x",)))
            assert "objects_by_account" in plan, plan
        account = SigningKey.generate().public

        def work() -> int:
            """SQLite virtual machine steps (in thousands) of GET /v1/account's database work."""
            steps = [0]

            def count() -> int:
                steps[0] += 1
                return 0
            db._conn.set_progress_handler(count, 1000)
            try:
                billing.account_standing(db, svc.pricing, svc.settings, account.id, 0.0)
                svc.account(account)
                svc._admit_client(account, 0)
            finally:
                db._conn.set_progress_handler(None, 1000)
            return steps[0]

        before = work()
        layout = json.dumps(layout_to_json(LAYOUTS[0]))
        with db.transaction() as conn:
            conn.executemany("INSERT INTO objects VALUES (?,?,?,?,?,?)",
                             ((f"{i:064x}", "d" * 64, layout, "committed", 0.0, LAYOUTS[0].share_size * 4)
                              for i in range(20_000)))
        assert work() <= before + 5  # a scan of 20,000 rows would be far more


def test_a_database_from_before_stored_bytes_opens_with_them_filled(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE objects (object_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, layout TEXT NOT NULL,"
                     " state TEXT NOT NULL, created_at REAL NOT NULL)")
        conn.executemany("INSERT INTO objects VALUES (?,?,?,?,?)",
                         [(f"{i:064x}", ACCOUNTS[i % 2], json.dumps(layout_to_json(LAYOUTS[i % 3])), "committed", 0.0)
                          for i in range(6)])
    conn.close()
    db = MediatorDB(path)
    try:
        for account_id in ACCOUNTS[:2]:
            expected = sum(o.layout.share_size * o.layout.n for o in db.objects_of(account_id))
            assert expected > 0 and db.account_bytes(account_id, committed_only=True) == expected
    finally:
        db.close()


def test_audit_round_ids_are_never_handed_out_twice() -> None:
    """A periodic round and an out-of-turn audit asking for an id before either has challenged a node (the
    database's maximum not moved yet) got the same id, and then shared one row, nonce and pass per node."""
    with service() as svc:
        assert [svc.new_round_id(), svc.new_round_id()] == [1, 2]
        svc.db.start_round(7, "a" * 64, b"n" * 16, 0.0)  # rounds recorded before this process started
        assert [svc.new_round_id(), svc.new_round_id()] == [8, 9]
