"""Billing stays arithmetic a database can hold: one account's absurd bill never stops everyone's billing."""

from __future__ import annotations

from fincryptfs.core.layout import MAX_PADDED_SIZE, ObjectLayout
from mediatord import billing
from mediatord.db import MediatorDB
from mediatord.ledger import MAX_AMOUNT, WORLD_DEPOSITS, Posting, client_account, storage_cost
from mediatord.policies.pricing import FixedPrice

HOUR = 3600.0
HUGE, SMALL = "a" * 64, "b" * 64


def test_a_bill_beyond_every_bitcoin_is_capped_and_the_other_accounts_are_still_charged() -> None:
    """A node may ask up to 10^15 msat per GiB-hour and an account may hold 2^62 bytes: their product over an hour
    is far past 64 bits. The period's totals overflowed SQLite's integers, so every billing pass failed, for every
    account, for as long as that object stayed."""
    db = MediatorDB(":memory:")
    try:
        with db.transaction():
            db.insert_object("1" * 64, HUGE, ObjectLayout(MAX_PADDED_SIZE, 1 << 20, 1, 256), 0.0)
            db.insert_object("2" * 64, SMALL, ObjectLayout(1 << 20, 1 << 20, 1, 2), 0.0)
            db.set_object_state("1" * 64, "committed")
            db.set_object_state("2" * 64, "committed")
            db.post([Posting("deposit:t:0", "deposit", WORLD_DEPOSITS, client_account(SMALL), 10**18, 0.0)])
        report = billing.bill_due_periods(db, FixedPrice(10**15), HOUR, 2 * HOUR + 1)
        assert report is not None and report.accounts == 2 and report.ran_out == (HUGE,)
        small_cost = storage_cost(db.account_bytes(SMALL, committed_only=True) * 10**15, int(HOUR * 1000))
        assert report.charged == small_cost and db.balance(client_account(SMALL)) == 10**18 - small_cost
        assert report.unpaid == MAX_AMOUNT  # the huge account's bill, capped at every bitcoin there will be
    finally:
        db.close()
