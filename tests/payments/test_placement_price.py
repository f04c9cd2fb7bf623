"""A node is credited, for each share, at the lower of its price today and its price when the share was placed:
raising its ask after it was given shares earns the new ask only on shares placed at it. Real mediatord and
storaged daemons on 127.0.0.1."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st
from mediator_net import make_object, start_mediator, start_node, stop_node, upload, wait_online

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from mediatord import billing, upkeep
from mediatord.db import MediatorDB
from mediatord.ledger import (
    FEES,
    WORLD_DEPOSITS,
    Posting,
    after_fee,
    client_account,
    credited_byte_price,
    node_account,
    storage_cost,
)

PRICE = 100  # msat per GiB-hour: the fixed price, and every node's ask at first
RAISED = 10**6
HOUR_MS = 3_600_000


@given(st.integers(0, 10**6), st.dictionaries(st.integers(0, 10**6), st.integers(0, 10**4), max_size=5),
       st.integers(0, 10**6))
def test_each_share_is_credited_at_the_lower_of_todays_and_its_placement_price(
        unknown: int, priced: dict[int, int], price: int) -> None:
    total = unknown + sum(priced.values())
    per_share = [min(price, placed) * size for placed, size in priced.items()] + [price * unknown]
    assert credited_byte_price(total, priced, price) == sum(per_share) <= total * price
    assert credited_byte_price(total, {}, price) == total * price  # passes recorded before prices were


async def test_a_raised_ask_is_paid_only_on_shares_placed_at_it(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, rpc.new_client() as client:
        mediator = await start_mediator(nursery, tmp_path / "m", MEDIATORD_PRICING=f"fixed:{PRICE}",
                                        MEDIATORD_AUDIT_PERIOD="3600", MEDIATORD_FEE_BPS="1000")
        service, db = mediator.service, mediator.service.db
        nodes = [await start_node(nursery, tmp_path, mediator.url, i, STORAGED_PRICE=str(PRICE)) for i in range(4)]
        await wait_online(mediator, 4)
        key = SigningKey.generate()
        before, after = make_object(k=2, n=4), make_object(k=2, n=4, padded_size=9 * 8192)
        await upload(client, mediator.url, key, before)

        raiser = nodes[0]  # "fixed:100" pays a node its ask if higher: now 10,000 times the price
        await stop_node(raiser)
        nodes[0] = await start_node(nursery, tmp_path, mediator.url, 0, port=int(raiser.url.rsplit(":", 1)[1]),
                                    STORAGED_PRICE=str(RAISED))
        with trio.fail_after(10):
            while (row := db.node(raiser.node_id)) is None or row.price != RAISED:
                await trio.sleep(0.05)
        await wait_online(mediator, 4)
        await upload(client, mediator.url, key, after)  # four shares, four nodes: one is placed at the new ask

        with db.transaction():  # the mediator's account holds plenty of client money
            db.post([Posting("deposit:t:0", "deposit", WORLD_DEPOSITS, client_account(key.id), 10**15, 0),
                     Posting("charge:0:t", "charge", client_account(key.id), FEES, 10**15, 0)])
        outcomes = await upkeep.audit_round(service, client, time.time())
        assert {o.result for o in outcomes.values()} == {"passed"}
        billing.credit_passes(db, service.pricing, service.settings, time.time())

        old, new = before.layout.share_size, after.layout.share_size
        assert db.balance(node_account(raiser.node_id)) == after_fee(
            storage_cost(old * PRICE + new * RAISED, HOUR_MS), 1000)
        for node in nodes[1:]:
            assert db.balance(node_account(node.node_id)) == after_fee(
                storage_cost((old + new) * PRICE, HOUR_MS), 1000)
        nursery.cancel_scope.cancel()


def test_shares_and_passes_of_an_older_database_are_credited_at_the_price_of_the_day(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE shares (share_id TEXT PRIMARY KEY, object_id TEXT NOT NULL, idx INTEGER NOT NULL,"
                     " node_id TEXT NOT NULL, root BLOB NOT NULL, size INTEGER NOT NULL, state TEXT NOT NULL,"
                     " updated_at REAL NOT NULL, UNIQUE (object_id, idx))")
        conn.execute("INSERT INTO shares VALUES ('s', 'o', 0, 'n', x'01', 10, 'stored', 0)")
        conn.execute("CREATE TABLE audit_passes (round_id INTEGER NOT NULL, node_id TEXT NOT NULL, shares_proven"
                     " INTEGER NOT NULL, bytes_proven INTEGER NOT NULL, passed_at REAL NOT NULL,"
                     " PRIMARY KEY (round_id, node_id))")
        conn.execute("INSERT INTO audit_passes VALUES (1, 'n', 1, 10, 5.0)")
    conn.close()
    db = MediatorDB(path)
    try:
        share = db.share("s")
        assert share is not None and share.price is None
        assert db.uncredited_passes(10) == [(1, "n", 10, 5.0, {}, None)]
        with db.transaction():
            db.record_pass(2, "n", 1, 10, 6.0, {PRICE: 10})
        assert db.uncredited_passes(10)[1] == (2, "n", 10, 6.0, {PRICE: 10}, None)
        assert json.loads(db._conn.execute("SELECT priced_bytes FROM audit_passes WHERE round_id=2").fetchone()[0]) \
            == [[PRICE, 10]]
    finally:
        db.close()
