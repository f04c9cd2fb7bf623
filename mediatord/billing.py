"""Billing: hourly charges, node credits from audit passes, deposits, low balances, batched payouts.

The money rules (docs/payments.md) as passes over the database; amounts are computed by the pure
:mod:`mediatord.ledger` and every write is one transaction, so a kill -9 at any point leaves either all or none
of a step:

* **charges**: each billing period ``[start, end)`` (aligned to multiples of ``billing_period``; periods missed
  while the mediator was down are billed together) charges every account Σ over its committed objects of
  bytes (all n shares) × the scheme's client price × the time the object existed in the period. The period's
  row in ``billing_periods`` is written in the same transaction, so a period is billed exactly once.
  An account that cannot pay pays what it has; it is *out of funds* from then on (``out_since``) until a deposit.
* **credits**: each passed (round, node) in ``audit_passes`` is credited once (``audit_credits`` row and the
  posting keyed ``credit:ROUND:NODE`` in one transaction): bytes proven × the node's price under the scheme (for
  an asking node, each share at the lower of its ask today and the one it was placed at; a float node at
  today's bid) ×
  the time since the node's previous credited pass (at most one audit period: an extra, out-of-turn audit
  earns nothing extra), minus the mediator's fee (``fee_bps``). Credits are paid from the mediator's account;
  a pass it cannot cover waits until charges refill it, and that node's later passes wait behind it (in
  order), while other nodes' passes are still credited.
* **deposits**: outputs to a deposit address are recorded when seen and credited once they have
  ``deposit_confirmations`` confirmations, keyed by (txid, vout).
* **payouts**: nodes whose balance reaches ``payout_threshold`` (and whose payout address is valid) are paid in
  one transaction with one output each; the network fee is shared equally by the outputs. States:
  prepared (postings made) → signed (raw tx recorded) → sent; a restart finishes open batches with the same
  transaction. A batch that cannot be signed (wallet short of funds) is failed and its postings reversed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fincryptfs.core.errors import FincryptError, PolicyError
from fincryptfs.core.settings import MediatorSettings

from . import registry
from .db import MediatorDB
from .ledger import (
    FEES,
    MAX_AMOUNT,
    MSAT_PER_SAT,
    WORLD_DEPOSITS,
    WORLD_PAYOUTS,
    LedgerError,
    Posting,
    after_fee,
    client_account,
    credited_byte_price,
    node_account,
    storage_cost,
)
from .policies import PricingScheme

log = logging.getLogger(__name__)
CREDIT_BATCH = 1000  # passes credited per transaction
DUST_SAT = 546  # an output below this is not relayed by Bitcoin nodes
GIB = 1 << 30


@dataclass(frozen=True)
class PeriodReport:
    period_id: int
    start: float
    end: float
    accounts: int
    charged: int
    unpaid: int
    ran_out: tuple[str, ...]


@dataclass(frozen=True)
class CreditReport:
    credited: int  # passes
    amount: int  # msat
    deferred: int  # passes left for lack of funds in the mediator's account
    available: int = 0  # msat in the mediator's account when passes were left waiting


def credit_wait_note(was_waiting: bool, credits: CreditReport) -> str | None:
    """What the payments loop logs about passes waiting for credit: once when they start waiting and once when
    they are paid, not at every pass. Waiting is routine (the first credits of a fresh mediator, and any pass
    proven before the charge for its hour was taken, wait for that charge), so the note is informational."""
    if credits.deferred and not was_waiting:
        return (f"{credits.deferred} audit pass(es) wait for credit: the mediator's account ({credits.available} "
                "msat) cannot cover them yet; they are credited, in order, once the next charges refill it")
    if was_waiting and not credits.deferred:
        return "audit passes that waited for credit are credited"
    return None


# --- charges ------------------------------------------------------------------------------------------------


def client_price(db: MediatorDB, pricing: PricingScheme) -> int:
    return pricing.client_price(registry.market_view(db.nodes()))


def bill_due_periods(db: MediatorDB, pricing: PricingScheme, period: float, now: float) -> PeriodReport | None:
    """Charge every account for the complete periods not billed yet (one transaction); None if none is due.

    The span billed starts where the last billed period ended (the first ever: one period before the current
    one) and ends at the last period boundary: a changed ``period`` bills no time twice and leaves none out.
    Objects deleted in the span are charged for their time in it (their billing tombstones)."""
    current = int(now // period)
    end = current * period
    last = db.last_billed()
    start = (current - 1) * period if last is None else last[1]
    if end <= start:
        return None
    # ids only grow, so that each period's charge keys are new even when the period length changed
    period_id = current - 1 if last is None else max(current - 1, last[0] + 1)
    price = client_price(db, pricing)
    charged = unpaid = 0
    ran_out: list[str] = []
    with db.transaction():
        owed: dict[str, int] = defaultdict(int)  # Σ bytes × price × ms, per account
        for account_id, size, created_at, deleted_at in db.billable_storage(start):
            until = end if deleted_at is None else min(end, deleted_at)
            duration_ms = int((until - max(start, created_at)) * 1000)
            if duration_ms > 0:
                owed[account_id] += size * price * duration_ms
        accounts = [client_account(a) for a in owed]
        balances = db.balances(accounts)
        out = db.accounts_out_of_funds()
        postings = []
        for account_id, weighted in owed.items():
            # at most every bitcoin there will be: a huge ask times a huge object is past what SQLite holds
            cost = min(storage_cost(weighted, 1), MAX_AMOUNT)
            balance = balances.get(client_account(account_id), 0)
            paid = min(cost, balance)
            if paid > 0:
                postings.append(Posting(f"charge:{period_id}:{account_id}", "charge", client_account(account_id),
                                        FEES, paid, now, f"storage {start:.0f}..{end:.0f}"))
            charged = min(charged + paid, MAX_AMOUNT)  # period totals, for the record: capped likewise
            unpaid = min(unpaid + cost - paid, MAX_AMOUNT)
            if cost > balance and account_id not in out:
                db.set_out_since(account_id, now)
                ran_out.append(account_id)
        db.post(postings)
        db.record_billing_period(period_id, start, end, now, len(owed), charged, unpaid)
        db.purge_tombstones(end)
    for account_id in ran_out:
        log.warning("account %s ran out of funds: grace period starts, uploads refused after it", account_id[:16])
    return PeriodReport(period_id, start, end, len(owed), charged, unpaid, tuple(ran_out))


# --- credits ------------------------------------------------------------------------------------------------


def credit_passes(db: MediatorDB, pricing: PricingScheme, settings: MediatorSettings, now: float) -> CreditReport:
    """Credit every passed audit round not credited yet, oldest first, a batch per transaction.

    A pass the mediator's account cannot cover waits, and so do that node's later passes (each node is credited
    in order: a credit covers the time since the node's previous credited pass); other nodes' passes are still
    credited. One node's credit too large for the account (a huge ask, a long backlog) must not stall them all."""
    market = registry.market_view(db.nodes())
    audit_ms = int(settings.audit_period * 1000)
    credited = amount = deferred = available = 0
    waiting: set[str] = set()  # nodes with a pass left waiting in this call
    after: tuple[float, int, str] | None = None
    while True:
        passes = db.uncredited_passes(CREDIT_BATCH, after)
        if not passes:
            return CreditReport(credited, amount, deferred, available if deferred else 0)
        after = (passes[-1][3], passes[-1][0], passes[-1][1])
        node_ids = sorted({p[1] for p in passes})
        nodes = {n: db.node(n) for n in node_ids}
        with db.transaction():
            last = db.last_credited_pass(node_ids)
            available = db.balance(FEES)
            postings, rows = [], []
            for round_id, node_id, bytes_proven, passed_at, priced, failed_at in passes:
                if node_id in waiting:
                    deferred += 1  # behind its own earlier pass
                    continue
                # since the node's previous credited pass or the last round it failed or missed, whichever is
                # later: a failed round's time is not paid, even when an out-of-turn audit passes right after it
                since = max((t for t in (last.get(node_id), failed_at) if t is not None), default=None)
                covered = audit_ms if since is None else max(0, min(audit_ms, int((passed_at - since) * 1000)))
                row = nodes[node_id]
                price = pricing.node_price(row.price if row else None, market)
                # an asking node is held to the ask its shares were placed at (it cannot raise it on them); a
                # float node takes the bid of the day, which the mediator sets and clients are charged by
                byte_price = credited_byte_price(bytes_proven, priced, price) if row and row.price is not None \
                    else bytes_proven * price
                net = after_fee(storage_cost(byte_price, covered), settings.fee_bps)
                if net > available:
                    waiting.add(node_id)  # waits, in order, for charges to refill the mediator's account
                    deferred += 1
                    continue
                available -= net
                last[node_id] = passed_at
                rows.append((round_id, node_id, passed_at, net))
                if net > 0:
                    postings.append(Posting(f"credit:{round_id}:{node_id}", "credit", FEES, node_account(node_id),
                                            net, now, f"audit round {round_id}: {bytes_proven} bytes proven"))
            db.post(postings)
            db.record_credits(rows)
        credited += len(rows)
        amount += sum(r[3] for r in rows)


# --- accounts: balance, burn rate, warnings, refusal --------------------------------------------------------


@dataclass(frozen=True)
class AccountStanding:
    balance: int  # msat
    burn_rate: int  # msat per hour at today's price
    time_left: float | None  # seconds; None when nothing is stored
    low: bool
    out_since: float | None
    grace_ends_at: float | None
    uploads_refused: bool

    def to_json(self) -> dict[str, Any]:
        return {"balance_msat": self.balance, "burn_rate_msat_per_hour": self.burn_rate,
                "time_left_seconds": None if self.time_left is None else int(self.time_left),
                "low_balance": self.low, "out_of_funds_since": _int_or_none(self.out_since),
                "grace_ends_at": _int_or_none(self.grace_ends_at), "uploads_refused": self.uploads_refused}


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def burn_rates(db: MediatorDB, price: int) -> dict[str, int]:
    rates: dict[str, int] = defaultdict(int)
    for account_id, size, _created in db.storage_by_account():
        rates[account_id] += size
    return {a: size * price // GIB for a, size in rates.items()}


def standing(balance: int, burn_rate: int, out_since: float | None, settings: MediatorSettings,
             now: float) -> AccountStanding:
    time_left = None if burn_rate <= 0 else balance * 3600 / burn_rate
    low = time_left is not None and time_left < settings.low_balance_warning
    grace_end = None if out_since is None else out_since + settings.grace_period
    return AccountStanding(balance, burn_rate, time_left, low, out_since, grace_end,
                           grace_end is not None and now >= grace_end)


def account_standing(db: MediatorDB, pricing: PricingScheme, settings: MediatorSettings, account_id: str,
                     now: float) -> AccountStanding:
    price = client_price(db, pricing)
    size = db.account_bytes(account_id, committed_only=True)
    _address, out_since, _warned = db.account_billing(account_id)
    return standing(db.balance(client_account(account_id)), size * price // GIB, out_since, settings, now)


def refuse_uploads_after_grace(db: MediatorDB, settings: MediatorSettings, account_id: str, now: float) -> None:
    """402 once an account has been out of funds for longer than the grace period (stored data stays)."""
    address, out_since, _warned = db.account_billing(account_id)
    if out_since is not None and now >= out_since + settings.grace_period:
        raise PolicyError(f"prepaid balance exhausted: deposit to {address or 'your deposit address (GET /v1/account)'}"
                          f" (this account ran out of funds {int(now - out_since)} s ago and its grace period of "
                          f"{int(settings.grace_period)} s is over: new uploads are refused until a deposit is "
                          "credited; stored data is kept)", status=402)


def low_balance_warnings(db: MediatorDB, pricing: PricingScheme, settings: MediatorSettings, now: float
                         ) -> list[tuple[str, AccountStanding]]:
    """Accounts newly below the warning time (logged once, until they recover); returns them for the webhook."""
    rates = burn_rates(db, client_price(db, pricing))
    warned = db.warned_accounts()
    out = db.accounts_out_of_funds()
    balances = db.balances([client_account(a) for a in rates])
    new = []
    with db.transaction():
        for account_id, rate in rates.items():
            state = standing(balances.get(client_account(account_id), 0), rate, out.get(account_id), settings, now)
            if state.low and account_id not in warned:
                db.set_warned_at(account_id, now)
                new.append((account_id, state))
            elif not state.low and account_id in warned:
                db.set_warned_at(account_id, None)
    for account_id, state in new:
        log.warning("account %s: balance %d msat covers %s s at %d msat/h (warning below %d s)", account_id[:16],
                    state.balance, _int_or_none(state.time_left), state.burn_rate, int(settings.low_balance_warning))
    return new


# --- deposits -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeenOutput:
    txid: str
    vout: int
    address: str
    amount_sat: int
    confirmations: int


def credit_deposit(db: MediatorDB, txid: str, vout: int, now: float) -> int:
    """Credit one recorded, confirmed deposit (one transaction); LedgerError if already credited."""
    found = db.deposit(txid, vout)
    if found is None:
        raise LedgerError(f"no deposit {txid[:16]}…:{vout} has been seen")
    account_id, amount_sat, _confirmations, credited_at = found
    if credited_at is not None:
        raise LedgerError(f"deposit {txid[:16]}…:{vout} was already credited: refusing to credit it twice")
    amount = amount_sat * MSAT_PER_SAT
    with db.transaction():
        db.post([Posting(f"deposit:{txid}:{vout}", "deposit", WORLD_DEPOSITS, client_account(account_id), amount,
                         now, f"{amount_sat} sat")])
        db.mark_deposit_credited(txid, vout, now)
        db.set_out_since(account_id, None)
    log.info("deposit of %d sat credited to account %s", amount_sat, account_id[:16])
    return amount


def record_deposits(db: MediatorDB, seen: Sequence[SeenOutput], confirmations: int, now: float) -> int:
    """Record outputs paid to deposit addresses and credit those confirmed; returns msat credited.

    ``seen`` is every unspent output of the deposit addresses (payouts spend credited deposits only), so a
    pending deposit missing from it was reorged away or double-spent: it is dropped, and recorded again if it
    comes back. A deposit that cannot be credited is logged and left pending; the others are credited."""
    owners = db.deposit_addresses()
    total = 0
    with db.transaction():
        db.forget_pending_deposits({(out.txid, out.vout) for out in seen})
    for out in seen:
        account_id = owners.get(out.address)
        if account_id is None or out.amount_sat <= 0:
            continue
        known = db.deposit(out.txid, out.vout)
        if known is not None and known[3] is not None:
            continue
        db.upsert_deposit(out.txid, out.vout, account_id, out.address, out.amount_sat, out.confirmations, now)
        if out.confirmations >= confirmations:
            try:
                total += credit_deposit(db, out.txid, out.vout, now)
            except LedgerError as exc:
                log.warning("deposit %s…:%d of %d sat to account %s cannot be credited: %s", out.txid[:16], out.vout,
                            out.amount_sat, account_id[:16], exc)
    return total


# --- payouts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PayoutPlan:
    outputs: tuple[tuple[str, str, int, int], ...]  # node, address, msat debited, sat sent
    fee_sat: int


def plan_payouts(balances: Sequence[tuple[str, str, int]], threshold_sat: int, fee_rate: int,
                 vbytes: Callable[[int, int], int], inputs_guess: int = 2) -> PayoutPlan | None:
    """Pure: who is paid how much. ``balances`` are (node, valid address, msat); nodes at or above the threshold
    are paid their whole sats, less an equal share of the network fee (rounded up)."""
    due = sorted((n, a, b) for n, a, b in balances if b >= threshold_sat * MSAT_PER_SAT)
    if not due:
        return None
    fee = fee_rate * vbytes(inputs_guess, len(due))
    share = -(-fee // len(due))
    outputs = []
    for node_id, address, balance in due:
        sats = balance // MSAT_PER_SAT
        if sats - share >= DUST_SAT:
            outputs.append((node_id, address, sats * MSAT_PER_SAT, sats - share))
    if not outputs:
        return None
    return PayoutPlan(tuple(outputs), share * len(outputs))


class WalletShortError(FincryptError):
    """The payouts due need more than the wallet can spend: no batch is recorded (a batch that cannot be
    signed is failed and reversed, and the next pass, a minute later, prepared the same again: two ledger
    postings per node a minute, for as long as the wallet stayed short)."""

    def __init__(self, need_sat: int, available_sat: int) -> None:
        super().__init__(f"the payouts due need {need_sat} sat (network fee included) and the wallet can spend "
                         f"{available_sat} sat: they wait until deposits or change cover them")
        self.need_sat, self.available_sat = need_sat, available_sat


def prepare_payout(db: MediatorDB, settings: MediatorSettings, check_address: Callable[[str], str],
                   vbytes: Callable[[int, int], int], now: float, unpayable: set[str] | None = None,
                   available_sat: int | None = None) -> int | None:
    """Record a batch and debit its nodes (one transaction); None if nothing is due or a batch is still open.

    A node owed the threshold that cannot be paid (no payout address, or one not on this network) is warned
    about once while it stays so: ``unpayable`` (kept by the caller across passes) holds the nodes warned of.
    ``available_sat``: what the wallet can spend; WalletShortError, with nothing recorded, if the batch needs
    more.
    """
    if db.open_payout_batches():
        return None
    candidates = []
    warned = unpayable if unpayable is not None else set()
    for account, balance in db.all_balances("node:"):
        if balance < settings.payout_threshold_sat * MSAT_PER_SAT:
            continue
        node_id = account.split(":", 1)[1]
        row = db.node(node_id)
        address = row.payout_address if row else None
        try:
            if address is None:
                raise PolicyError("no payout address announced (STORAGED_PAYOUT_ADDRESS)")
            candidates.append((node_id, check_address(address), balance))
        except PolicyError as exc:
            if node_id not in warned:
                log.warning("node %s is owed %d msat but cannot be paid: %s", node_id[:16], balance, exc)
            warned.add(node_id)
        else:
            warned.discard(node_id)
    plan = plan_payouts(candidates, settings.payout_threshold_sat, settings.payout_fee_rate, vbytes)
    if plan is None:
        return None
    need = plan.fee_sat + sum(sent for *_, sent in plan.outputs)
    if available_sat is not None and need > available_sat:
        raise WalletShortError(need, available_sat)
    with db.transaction():
        batch_id = db.insert_payout_batch(now, plan.fee_sat, plan.outputs)
        db.post([Posting(f"payout:{batch_id}:{node_id}", "payout", node_account(node_id), WORLD_PAYOUTS, debited,
                         now, f"batch {batch_id}: {sent} sat to {address}")
                 for node_id, address, debited, sent in plan.outputs])
    return batch_id


def fail_payout(db: MediatorDB, batch_id: int, reason: str, now: float) -> None:
    """A prepared (never signed, so never broadcast) batch gives its money back to the nodes."""
    with db.transaction():
        db.post([Posting(f"payout_reversal:{batch_id}:{node_id}", "payout_reversal", WORLD_PAYOUTS,
                         node_account(node_id), debited, now, f"batch {batch_id} failed: {reason[:100]}")
                 for node_id, _address, debited, _sent in db.payout_outputs(batch_id)])
        db.set_payout_state(batch_id, "failed", detail=reason)
    log.warning("payout batch %d failed, nodes re-credited: %s", batch_id, reason)


def node_earnings(db: MediatorDB, settings: MediatorSettings, node_id: str) -> dict[str, int]:
    """What a node has earned, is owed (pending) and has been paid, in msat."""
    sums = db.posting_sums(node_account(node_id))
    paid = sums.get("payout_out", 0) - sums.get("payout_reversal_in", 0)
    return {"earned_msat": sums.get("credit_in", 0), "pending_msat": db.balance(node_account(node_id)),
            "paid_msat": paid, "payout_threshold_msat": settings.payout_threshold_sat * MSAT_PER_SAT}

