"""Billing at its edges: a changed billing period, objects deleted mid-period, deposits that cannot be credited
or vanish, the deposit address two processes derive at once, and payouts that must spend only credited money."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.settings import MediatorSettings
from mediatord import billing
from mediatord.db import MediatorDB
from mediatord.escrow import EscrowError, random_test_address
from mediatord.ledger import (
    FEES,
    MAX_AMOUNT,
    MSAT_PER_SAT,
    WORLD_DEPOSITS,
    Posting,
    client_account,
    node_account,
    storage_cost,
)
from mediatord.payments import Payments, payments_pass
from mediatord.policies import pricing_scheme
from mediatord.policies.pricing import FixedPrice

HOUR = 3600.0
T0 = 1_700_000_000.0 // HOUR * HOUR  # a period boundary
PRICE = 10**6
A, B = "a" * 64, "b" * 64
LAYOUT = ObjectLayout(1 << 20, 1 << 20, 1, 2)
BYTES = LAYOUT.share_size * LAYOUT.n


@pytest.fixture
def db() -> Iterator[MediatorDB]:
    database = MediatorDB(":memory:")
    try:
        yield database
    finally:
        database.close()


def store(db: MediatorDB, object_id: str, account: str, at: float) -> None:
    with db.transaction():
        db.insert_object(object_id, account, LAYOUT, at)
        db.set_object_state(object_id, "committed")


def deposit(db: MediatorDB, account: str, amount: int, tag: str = "0") -> None:
    with db.transaction():
        db.post([Posting(f"deposit:{tag}:{account}", "deposit", WORLD_DEPOSITS, client_account(account), amount,
                         0.0)])


def charged(db: MediatorDB, account: str) -> int:
    return sum(p.amount for _s, p in db.postings(client_account(account), 10_000) if p.kind == "charge")


def cost(seconds: float) -> int:
    return storage_cost(BYTES * PRICE, int(seconds * 1000))


def test_a_changed_billing_period_neither_bills_time_twice_nor_stops_billing(db: MediatorDB) -> None:
    """MEDIATORD_BILLING_PERIOD changed between restarts: the next period starts where the last billed one
    ended. Period numbers of the old length read as numbers of the new one billed decades twice (shorter
    period) or nothing for decades (longer period)."""
    pricing = FixedPrice(PRICE)
    store(db, "1" * 64, A, T0 - 2 * HOUR)
    deposit(db, A, 10**15)
    billing.bill_due_periods(db, pricing, HOUR, T0 + 1)  # [T0 - 1 h, T0)
    assert charged(db, A) == cost(HOUR)

    report = billing.bill_due_periods(db, pricing, 60, T0 + 150)  # shorter: [T0, T0 + 120)
    assert report is not None and (report.start, report.end) == (T0, T0 + 120)
    assert charged(db, A) == cost(HOUR) + cost(120)

    assert billing.bill_due_periods(db, pricing, HOUR, T0 + 200) is None  # longer: nothing new is complete
    report = billing.bill_due_periods(db, pricing, HOUR, T0 + HOUR + 5)  # [T0 + 120, T0 + 1 h)
    assert report is not None and (report.start, report.end) == (T0 + 120, T0 + HOUR)
    assert charged(db, A) == cost(HOUR) + cost(120) + cost(HOUR - 120)
    assert billing.bill_due_periods(db, pricing, HOUR, T0 + HOUR + 6) is None


def test_an_object_deleted_mid_period_is_charged_for_the_time_it_was_stored_and_only_once(db: MediatorDB) -> None:
    pricing = FixedPrice(PRICE)
    deposit(db, A, 10**15)
    billing.bill_due_periods(db, pricing, HOUR, T0 + 1)  # nothing stored yet: the period is billed, empty
    store(db, "1" * 64, A, T0 + 600)
    store(db, "2" * 64, A, T0 + 600)
    db.delete_object("1" * 64, T0 + 1800)  # stored 20 minutes of this period
    billing.bill_due_periods(db, pricing, HOUR, T0 + HOUR + 1)
    assert charged(db, A) == storage_cost(BYTES * PRICE, 1200 * 1000 + 3000 * 1000)
    db.delete_object("2" * 64, T0 + HOUR + 900)  # the next period: 15 minutes of the other one
    billing.bill_due_periods(db, pricing, HOUR, T0 + 2 * HOUR + 1)
    billing.bill_due_periods(db, pricing, HOUR, T0 + 3 * HOUR + 1)
    assert charged(db, A) == storage_cost(BYTES * PRICE, 4200 * 1000) + cost(900)
    assert billing.burn_rates(db, PRICE) == {}  # deleted objects burn nothing


def test_objects_deleted_while_the_mediator_was_down_are_billed_for_the_missed_time(db: MediatorDB) -> None:
    pricing = FixedPrice(PRICE)
    deposit(db, A, 10**15)
    store(db, "1" * 64, A, T0 - 5 * HOUR)
    billing.bill_due_periods(db, pricing, HOUR, T0 + 1)
    db.delete_object("1" * 64, T0 + 5 * HOUR)  # down for a day; deleted after five hours of it
    billing.bill_due_periods(db, pricing, HOUR, T0 + 24 * HOUR)
    assert charged(db, A) == cost(HOUR) + cost(5 * HOUR)


def test_a_deposit_that_cannot_be_credited_does_not_stop_the_others(db: MediatorDB) -> None:
    """The deposit pass runs first in every payments pass: one output that cannot be credited (a balance past
    every bitcoin there is) failed the whole pass, every pass, so nothing was billed, credited or paid again."""
    with db.transaction():
        db.set_deposit_address(A, "addr-a")
        db.set_deposit_address(B, "addr-b")
    deposit(db, A, MAX_AMOUNT - 1)
    seen = [billing.SeenOutput("t1", 0, "addr-a", 5, 3), billing.SeenOutput("t2", 0, "addr-b", 7, 3)]
    assert billing.record_deposits(db, seen, 3, T0) == 7 * MSAT_PER_SAT
    assert db.balance(client_account(B)) == 7 * MSAT_PER_SAT
    assert db.deposit("t1", 0) is not None and db.deposit("t1", 0)[3] is None  # type: ignore[index]


def test_a_pending_deposit_that_left_the_wallet_is_no_longer_pending(db: MediatorDB) -> None:
    """Reorged away or double-spent before its confirmations: it is no longer shown as pending, and if it comes
    back it is credited once."""
    with db.transaction():
        db.set_deposit_address(A, "addr-a")
    billing.record_deposits(db, [billing.SeenOutput("t1", 0, "addr-a", 5_000, 1)], 3, T0)
    assert [d[2] for d in db.deposits_of(A) if d[4] is None] == [5_000]
    billing.record_deposits(db, [], 3, T0 + 60)
    assert [d for d in db.deposits_of(A) if d[4] is None] == []
    seen = [billing.SeenOutput("t1", 0, "addr-a", 5_000, 3)]
    assert billing.record_deposits(db, seen, 3, T0 + 120) == 5_000 * MSAT_PER_SAT
    assert billing.record_deposits(db, seen, 3, T0 + 180) == 0
    assert db.balance(client_account(A)) == 5_000 * MSAT_PER_SAT


def test_the_first_deposit_address_recorded_for_an_account_stays(db: MediatorDB) -> None:
    """The daemon and `mediatord fund-test-account` derive an address at once: the one recorded second replaced
    the first, which may already have been shown and paid: deposits to it were never credited."""
    with db.transaction():
        assert db.set_deposit_address(A, "first") == "first"
        assert db.set_deposit_address(A, "second") == "first"
    assert db.account_billing(A)[0] == "first"
    assert db.deposit_addresses() == {"first": A}


@contextmanager
def wallet(tmp_path: Path) -> Iterator[tuple[MediatorDB, Payments, str]]:
    """A mediator's database and its real wallet on the offline test network, and account A's deposit address."""
    settings = MediatorSettings.from_env({"MEDIATORD_DATA_DIR": str(tmp_path)}, home=tmp_path)
    db = MediatorDB(tmp_path / "m.sqlite3")
    payments = Payments(settings, db, pricing_scheme(settings.pricing))
    try:
        yield db, payments, payments.deposit_address_sync(A)
    finally:
        payments.close()
        db.close()


def credit(db: MediatorDB, payments: Payments, address: str, sat: int) -> str:
    """Pay ``sat`` to ``address`` (3 confirmations) and credit it, as a payments pass would; its txid."""
    txid: str = payments.wallet_sync(lambda e: e.fund_test_address(address, sat, 3))
    with db.transaction():
        db.upsert_deposit(txid, 0, A, address, sat, 3, T0)
    billing.credit_deposit(db, txid, 0, T0)
    return txid


def test_payouts_spend_only_credited_deposits_and_change(tmp_path: Path) -> None:
    """An output not credited yet (too few confirmations when the pass scanned, or paid to an address no
    account owns) is not the mediator's to spend: spent by a payout, it would never be seen, so never
    credited."""
    with wallet(tmp_path) as (db, payments, address):
        credit(db, payments, address, 50_000)
        late = payments.wallet_sync(lambda e: e.fund_test_address(address, 500_000, 3))  # after the scan
        dest = random_test_address(tmp_path)

        def pay(sat: int) -> object:
            return payments.wallet_sync(lambda e: e.sign_payout([(dest, sat)], 1_000, 3, db.credited_outpoints()))
        with pytest.raises(EscrowError, match="49000|50000"):
            pay(100_000)  # the late deposit is not touched
        signed = pay(40_000)
        assert signed.inputs == 1  # type: ignore[attr-defined]
        payments.wallet_sync(lambda e: e.broadcast(signed.raw_tx))  # type: ignore[attr-defined]
        assert {i.txid for i in payments.wallet_sync(lambda e: e.incoming())} == {late}
        change = payments.wallet_sync(lambda e: e.spendable_sat(3, db.credited_outpoints()))
        assert change == 50_000 - 40_000 - 1_000  # the change is spendable, the late deposit is not



def audit(db: MediatorDB, round_id: int, node_id: str, result: str, at: float, size: int = 1 << 30) -> None:
    with db.transaction():
        db.start_round(round_id, node_id, b"n", at)
        db.finish_round(round_id, node_id, result, "", at)
        if result == "passed":
            db.record_pass(round_id, node_id, 1, size, at)


def test_a_pass_right_after_a_failed_round_is_paid_only_since_that_round(db: MediatorDB, tmp_path: Path) -> None:
    """Credits cover the time since the node's previous credited pass, at most an audit period. A round it
    failed (or did not answer) in between ends what it is paid for: an out-of-turn audit minutes after a failed
    round (the mediator schedules one when a node reports losses or a client reports a share) paid the failed
    hour in full."""
    settings = MediatorSettings.from_env({"MEDIATORD_DATA_DIR": str(tmp_path), "MEDIATORD_PRICING": "fixed:1000",
                                          "MEDIATORD_AUDIT_PERIOD": "3600"}, home=tmp_path)
    pricing = pricing_scheme(settings.pricing)
    node = "1" * 64
    db.upsert_node(node_id=node, public_key=b"k", url="http://127.0.0.1:1", price=None, capacity=1 << 40,
                   free=1 << 40, operator="", payout_address=None, now=T0 - 600)
    deposit(db, A, 10**12)
    with db.transaction():
        db.post([Posting("charge:x:a", "charge", client_account(A), "mediator:fees", 10**12, 0.0)])

    def credited() -> list[int]:
        return [amount for _r, amount in db.credited_rounds(node)]

    def paid(seconds: float) -> int:
        return billing.after_fee(storage_cost((1 << 30) * 1000, int(seconds * 1000)), settings.fee_bps)

    audit(db, 1, node, "passed", T0)
    audit(db, 2, node, "failed", T0 + HOUR)
    audit(db, 3, node, "passed", T0 + HOUR + 60)  # out of turn, a minute after the failed round
    audit(db, 4, node, "passed", T0 + 2 * HOUR)
    audit(db, 5, node, "unreachable", T0 + 3 * HOUR)
    audit(db, 6, node, "passed", T0 + 4 * HOUR)  # the next periodic round: an hour since the missed one
    billing.credit_passes(db, pricing, settings, T0 + 5 * HOUR)
    assert credited() == [paid(HOUR), paid(60), paid(HOUR - 60), paid(HOUR)]


def test_a_payout_pays_the_planned_network_fee_not_a_folded_change(tmp_path: Path) -> None:
    """bitcoinlib adds change of at most the network's dust amount (1,000 sat) to the fee: the wallet lost it to
    miners while the ledger debited only the planned fee, so the wallet fell behind what the ledger owes. One
    more input makes the change worth keeping."""
    with wallet(tmp_path) as (db, payments, address):
        def fund(sat: int) -> tuple[str, int]:
            return payments.wallet_sync(lambda e: e.fund_test_address(address, sat, 3)), 0
        credited = {fund(100_000), fund(50_000)}
        dest = random_test_address(tmp_path)
        signed = payments.wallet_sync(lambda e: e.sign_payout([(dest, 98_500)], 1_000, 3, credited))
        assert (signed.fee_sat, signed.inputs) == (1_000, 2)


def test_a_payout_the_network_already_has_is_sent_not_stuck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the broadcast, before the batch was recorded as sent: a real network refuses the same
    transaction again ("already known"), and the batch stayed unsent, every later payout behind it. A refusal
    is checked against the network. (The main chain's answers are what cannot exist here: they are faked.)"""
    from bitcoinlib.services.services import Service
    from bitcoinlib.wallets import WalletTransaction

    with wallet(tmp_path) as (db, payments, address):
        credit(db, payments, address, 50_000)
        signed = payments.wallet_sync(lambda e: e.sign_payout([(random_test_address(tmp_path), 40_000)], 1_000, 3,
                                                              db.credited_outpoints()))

        def refused(self: WalletTransaction, broadcast: bool = True) -> None:
            self.error = "Cannot send transaction. {'blockstream': 'txn-already-known'}"
        monkeypatch.setattr(WalletTransaction, "send", refused)
        known: set[str] = set()
        monkeypatch.setattr(Service, "gettransaction", lambda self, txid: txid in known)
        with pytest.raises(EscrowError, match="refused the payout transaction: .*txn-already-known"):
            payments.wallet_sync(lambda e: e.broadcast(signed.raw_tx))  # type: ignore[attr-defined]
        known.add(signed.txid)  # type: ignore[attr-defined]
        sent = payments.wallet_sync(lambda e: e.broadcast(signed.raw_tx))  # type: ignore[attr-defined]
        assert sent == signed.txid  # type: ignore[attr-defined]


async def test_a_short_wallet_leaves_payouts_waiting_without_a_failed_batch_each_pass(tmp_path: Path) -> None:
    """Nodes are owed more than the wallet can spend (deposits not yet confirmed, say): each pass, a minute
    apart, recorded a batch, failed to sign it and reversed it, two ledger postings per node every minute for as
    long as it lasted. Now the payout waits, no batch recorded, until the wallet covers it."""
    with wallet(tmp_path) as (db, payments, address):
        node = "1" * 64
        db.upsert_node(node_id=node, public_key=b"k", url="http://127.0.0.1:1", price=None, capacity=1 << 40,
                       free=1 << 40, operator="", payout_address=random_test_address(tmp_path), now=T0)
        owed = 200_000 * MSAT_PER_SAT
        deposit(db, A, owed)
        with db.transaction():
            db.post([Posting("charge:x:a", "charge", client_account(A), FEES, owed, T0),
                     Posting("credit:x:1", "credit", FEES, node_account(node), owed, T0)])
        payments.wallet_sync(lambda e: e.fund_test_address(address, 50_000, 3))
        postings = len(db.postings(node_account(node), 10_000))
        for minute in range(3):
            assert (await payments_pass(payments, None, T0 + 60 * minute)).batches_sent == ()
        assert db.payout_batches() == [] and len(db.postings(node_account(node), 10_000)) == postings
        assert db.balance(node_account(node)) == owed

        payments.wallet_sync(lambda e: e.fund_test_address(address, 500_000, 3))
        assert len((await payments_pass(payments, None, T0 + 180)).batches_sent) == 1
        assert db.balance(node_account(node)) == 0
