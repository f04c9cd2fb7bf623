"""Crediting audit passes: each node in order, and one node's unaffordable pass never stalls the others."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core.settings import MediatorSettings
from mediatord import billing
from mediatord.db import MediatorDB
from mediatord.ledger import FEES, WORLD_DEPOSITS, Posting, after_fee, client_account, node_account, storage_cost
from mediatord.policies import pricing_scheme

PRICE = 100  # msat per GiB-hour, fixed
PERIOD = 3600.0
NODES = ("a" * 64, "b" * 64, "c" * 64)
GIB = 1 << 30


def mediator_settings(tmp: Path) -> MediatorSettings:
    return MediatorSettings.from_env({"MEDIATORD_DATA_DIR": str(tmp), "MEDIATORD_PRICING": f"fixed:{PRICE}",
                                      "MEDIATORD_AUDIT_PERIOD": str(PERIOD)}, home=tmp)


@contextmanager
def ledger_with_fees(pot: int) -> Iterator[MediatorDB]:
    """A fresh database whose mediator account holds ``pot`` msat of client money."""
    db = MediatorDB(":memory:")
    try:
        fill(db, pot, "0")
        yield db
    finally:
        db.close()


def fill(db: MediatorDB, amount: int, tag: str) -> None:
    client = client_account("c" * 64)
    with db.transaction():
        db.post([Posting(f"deposit:t:{tag}", "deposit", WORLD_DEPOSITS, client, amount, 0),
                 Posting(f"charge:{tag}:c", "charge", client, FEES, amount, 0)])


def net_credit(bytes_proven: int, covered_ms: int, fee_bps: int) -> int:
    return after_fee(storage_cost(bytes_proven * PRICE, covered_ms), fee_bps)


def test_an_unaffordable_pass_holds_back_only_its_own_nodes_later_passes(tmp_path: Path) -> None:
    config = mediator_settings(tmp_path)
    pricing = pricing_scheme(config.pricing)
    one_gib_hour = net_credit(GIB, int(PERIOD * 1000), config.fee_bps)  # 90 msat at a 10 % fee
    a, b, _ = NODES
    with ledger_with_fees(10 * one_gib_hour) as db:
        with db.transaction():
            db.record_pass(1, a, 1, 1000 * GIB, 1000.0)  # far more than the mediator's account holds
            db.record_pass(1, b, 1, GIB, 1000.0)
            db.record_pass(2, a, 1, GIB, 1000.0 + PERIOD)  # affordable, but behind a's first pass
            db.record_pass(2, b, 1, GIB, 1000.0 + PERIOD)
        report = billing.credit_passes(db, pricing, config, 5000.0)
        assert (report.credited, report.deferred) == (2, 2)
        assert [r for r, _ in db.credited_rounds(b)] == [1, 2]
        assert db.balance(node_account(b)) == 2 * one_gib_hour
        assert db.credited_rounds(a) == []  # its second pass waits behind its first: credits go in order
        assert report.available == db.balance(FEES) == 8 * one_gib_hour

        fill(db, 1000 * one_gib_hour, "1")  # charges refill the account: a is credited, in order
        report = billing.credit_passes(db, pricing, config, 9000.0)
        assert (report.credited, report.deferred) == (2, 0)
        assert db.credited_rounds(a) == [(1, 1000 * one_gib_hour), (2, one_gib_hour)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NODES), st.integers(0, 64 * GIB)), max_size=30),
       st.integers(1, 20_000))
def test_credits_are_per_node_prefixes_and_none_left_waiting_could_be_paid(
        passes: list[tuple[str, int]], pot: int) -> None:
    """Whatever the passes and the pot: each node's credited passes are its oldest ones, the pot never goes
    below zero, and a node left waiting could not be paid its next pass even from what is left."""
    config = mediator_settings(Path("/nonexistent"))
    pricing = pricing_scheme(config.pricing)
    with ledger_with_fees(pot) as db:
        order: dict[str, list[tuple[int, int, float]]] = {n: [] for n in NODES}
        with db.transaction():
            for round_id, (node_id, size) in enumerate(passes, start=1):
                at = 1000.0 + round_id * 60
                if db.record_pass(round_id, node_id, 1, size, at):
                    order[node_id].append((round_id, size, at))
        billing.credit_passes(db, pricing, config, 10**6)
        left = db.balance(FEES)
        assert left >= 0
        for node_id, mine in order.items():
            credited = [r for r, _ in db.credited_rounds(node_id)]
            assert credited == [r for r, _, _ in mine[:len(credited)]]
            if len(credited) < len(mine):
                _round, size, at = mine[len(credited)]
                covered = int(PERIOD * 1000) if not credited else min(int(PERIOD * 1000),
                                                                       int((at - mine[len(credited) - 1][2]) * 1000))
                assert net_credit(size, covered, config.fee_bps) > left
