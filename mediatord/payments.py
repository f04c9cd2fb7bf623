"""Payments at the edge: the escrow wallet on its own thread, and the periodic payments pass.

:class:`Payments` owns the mediator's :class:`~mediatord.escrow.Escrow`, opened on first use (importing bitcoinlib
and opening the wallet takes a moment, and most requests never need it) on one dedicated thread that every wallet
call then uses (bitcoinlib's SQLite session is bound to the thread that opened it). :func:`payments_pass` is one
pass of the money loop, which tests call directly with explicit times: deposits → due billing periods → credits
for passed audits → low-balance warnings (log and webhook) → payouts (open batches first: sign, record, broadcast).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio

from fincryptfs.core.settings import MediatorSettings

from . import billing
from .db import MediatorDB
from .escrow import Escrow, EscrowError, payout_vbytes
from .policies import PricingScheme

log = logging.getLogger(__name__)
T = TypeVar("T")


WALLET_LOCK_FILE = "wallet.lock"


class Payments:
    """The escrow wallet of one mediator, opened lazily on its own thread and used only from there (its SQLite
    session is bound to the thread that opened it).

    Every wallet call holds an exclusive ``flock`` on ``wallet.lock`` in the data dir: the daemon and a CLI
    (``mediatord fund-test-account``) may use the same wallet at once, and bitcoinlib is not safe across
    processes (two that create the wallet together make two wallets of one name, or fail; two deriving a key
    together derive the same index)."""

    def __init__(self, settings: MediatorSettings, db: MediatorDB, pricing: PricingScheme) -> None:
        self.settings = settings
        self.db = db
        self.pricing = pricing
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="escrow")
        self._escrow: Escrow | None = None
        self.unpayable: set[str] = set()  # nodes owed a payout they cannot receive, already warned of
        self.wallet_short: int | None = None  # sat the payouts due need and the wallet lacks, already warned of

    def _open(self) -> Escrow:
        if self._escrow is None:
            self._escrow = Escrow(self.settings.data_dir, self.settings.bitcoin_network)
        return self._escrow

    def _locked(self, fn: Callable[[Escrow], T]) -> T:
        """On the wallet's thread: ``fn(escrow)`` under the cross-process wallet lock."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.settings.data_dir / WALLET_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fn(self._open())
        finally:
            os.close(fd)  # releases the lock

    def wallet_sync(self, fn: Callable[[Escrow], T]) -> T:
        """Run ``fn(escrow)`` on the wallet's thread and wait (blocking: CLIs, tests, worker threads)."""
        return self._thread.submit(self._locked, fn).result()  # after close(): RuntimeError

    async def wallet(self, fn: Callable[[Escrow], T]) -> T:
        future = self._thread.submit(self._locked, fn)
        return await trio.to_thread.run_sync(future.result)

    def close(self) -> None:
        """Close the wallet on its thread; idempotent."""
        if self._escrow is not None:
            escrow = self._escrow
            self._thread.submit(escrow.close).result()
            self._escrow = None
        self._thread.shutdown(wait=True)

    async def deposit_address(self, account_id: str) -> str:
        address, _out, _warned = self.db.account_billing(account_id)
        if address is not None:
            return address
        fresh = await self.wallet(lambda e: e.new_deposit_address(account_id))
        # another request, or `mediatord fund-test-account` in another process, may have recorded one meanwhile:
        # the first recorded stays
        return self.db.set_deposit_address(account_id, fresh)

    def deposit_address_sync(self, account_id: str) -> str:
        address, _out, _warned = self.db.account_billing(account_id)
        if address is None:
            fresh = self.wallet_sync(lambda e: e.new_deposit_address(account_id))
            address = self.db.set_deposit_address(account_id, fresh)
        return address

    def account_fields(self, account_id: str, address: str | None, now: float) -> dict[str, object]:
        state = billing.account_standing(self.db, self.pricing, self.settings, account_id, now)
        pending = sum(d[2] for d in self.db.deposits_of(account_id) if d[4] is None)
        return {"deposit_address": address, "network": self.settings.bitcoin_network,
                "pending_deposits_sat": pending, "deposit_confirmations": self.settings.deposit_confirmations,
                "low_balance_warning_seconds": int(self.settings.low_balance_warning),
                "grace_period_seconds": int(self.settings.grace_period), **state.to_json()}


@dataclass(frozen=True)
class PassReport:
    deposited: int
    period: billing.PeriodReport | None
    credits: billing.CreditReport
    warned: tuple[str, ...]
    batches_sent: tuple[int, ...]


async def scan_deposits(payments: Payments, now: float) -> int:
    seen = await payments.wallet(lambda e: e.incoming())
    return billing.record_deposits(payments.db, [billing.SeenOutput(i.txid, i.vout, i.address, i.amount_sat,
                                                                    i.confirmations) for i in seen],
                                   payments.settings.deposit_confirmations, now)


async def finish_payouts(payments: Payments, now: float) -> list[int]:
    """Sign and broadcast every open batch: prepared → signed (raw tx recorded) → sent."""
    db, settings = payments.db, payments.settings
    sent = []
    for batch_id, state, fee_sat, raw_tx in db.open_payout_batches():
        if state == "prepared":
            outputs = [(address, value) for _n, address, _d, value in db.payout_outputs(batch_id)]
            credited = db.credited_outpoints()
            try:
                signed = await payments.wallet(
                    lambda e: e.sign_payout(outputs, fee_sat, settings.deposit_confirmations,  # noqa: B023
                                            credited))  # noqa: B023
            except EscrowError as exc:
                billing.fail_payout(db, batch_id, str(exc), now)
                continue
            raw_tx = signed.raw_tx
            if signed.fee_sat != fee_sat:  # the wallet had no further input to keep a dust change with
                log.warning("payout batch %d pays %d sat network fee, %d planned: the wallet's change of %d sat was "
                            "too small to keep", batch_id, signed.fee_sat, fee_sat, signed.fee_sat - fee_sat)
            db.set_payout_state(batch_id, "signed", raw_tx=raw_tx, txid=signed.txid)
        try:
            assert raw_tx is not None
            tx = raw_tx
            txid = await payments.wallet(lambda e: e.broadcast(tx))  # noqa: B023
        except EscrowError as exc:
            log.warning("payout batch %d not broadcast yet (will retry the same transaction): %s", batch_id, exc)
            continue
        db.set_payout_state(batch_id, "sent", txid=str(txid), now=now)
        log.info("payout batch %d sent: txid %s", batch_id, txid)
        sent.append(batch_id)
    return sent


async def send_webhook(client: httpx.AsyncClient, url: str, account_id: str, state: billing.AccountStanding
                       ) -> None:
    try:
        with trio.fail_after(30):  # timeouts are per read: a receiver answering a byte at a time held the pass
            await client.post(url, json={"event": "low_balance", "account_id": account_id, **state.to_json()},
                              timeout=10)
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        log.warning("low-balance webhook %s failed: %s", url, exc or "no answer within 30 s")


async def payments_pass(payments: Payments, client: httpx.AsyncClient | None, now: float) -> PassReport:
    db, settings, pricing = payments.db, payments.settings, payments.pricing
    deposited = await scan_deposits(payments, now)
    period = billing.bill_due_periods(db, pricing, settings.billing_period, now)
    for account_id in period.ran_out if period else ():
        await payments.deposit_address(account_id)  # so that the 402 and the warning can say where to pay
    credits = billing.credit_passes(db, pricing, settings, now)
    warned = billing.low_balance_warnings(db, pricing, settings, now)
    if client is not None and settings.low_balance_webhook:
        for account_id, state in warned:
            await send_webhook(client, settings.low_balance_webhook, account_id, state)
    sent = await finish_payouts(payments, now)  # batches left open by a crash go first
    if not sent and not db.open_payout_batches():
        escrow = await payments.wallet(lambda e: e)  # check_address only parses: safe off the wallet's thread
        credited = db.credited_outpoints()
        available = await payments.wallet(lambda e: e.spendable_sat(settings.deposit_confirmations, credited))
        try:
            prepared = billing.prepare_payout(db, settings, escrow.check_address, payout_vbytes, now,
                                              payments.unpayable, available)
        except billing.WalletShortError as exc:
            if payments.wallet_short != exc.need_sat:  # once, and again when what is due changes
                log.warning("payouts wait: %s", exc)
            payments.wallet_short = exc.need_sat
        else:
            payments.wallet_short = None
            if prepared is not None:
                sent = await finish_payouts(payments, now)
    return PassReport(deposited, period, credits, tuple(a for a, _ in warned), tuple(sent))


async def payments_loop(payments: Payments, client: httpx.AsyncClient) -> None:
    """Every deposit-scan interval (at most every billing period): one payments pass."""
    interval = min(payments.settings.deposit_scan_interval, payments.settings.billing_period)
    waiting = False
    while True:
        await trio.sleep(interval)
        try:
            report = await payments_pass(payments, client, time.time())
        except EscrowError as exc:
            log.warning("payments pass: %s", exc)
            continue
        except Exception:  # one bad pass must not stop payments until a restart; Cancelled is no Exception
            log.exception("payments pass failed; the mediator goes on and retries at the next pass")
            continue
        if note := billing.credit_wait_note(waiting, report.credits):
            log.info("%s", note)
        waiting = report.credits.deferred > 0
