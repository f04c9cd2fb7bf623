"""The mediator's double-entry ledger as pure logic: postings, balances, the invariant. No I/O.

Every movement of money is one :class:`Posting` that takes ``amount`` msat (integer millisatoshi, never a
float) from a ``source`` account and gives it to a ``dest`` account. Accounts are text:

* ``client:<account id>``: a client's prepaid balance;
* ``node:<node id>``: what the mediator owes a storage node (credited, not yet paid out);
* ``mediator:fees``: the mediator's own money: every hourly charge lands here and every node credit leaves
  from here, so it holds the mediator's fee (its cut of each credit, plus charges for storage nobody proved);
* ``world:deposits``, ``world:payouts``, ``world:refunds``: the outside world. Money enters only from
  ``world:deposits`` and leaves only to ``world:payouts`` / ``world:refunds``; these three are the only
  accounts allowed below zero (``world:deposits`` is minus the total ever deposited).

Which kind may move money from where to where is data (:data:`FLOWS`); anything else is refused. Because
each posting moves money between two accounts, the sum of all balances is always zero, which is the
invariant the issue states in its operator form::

    deposits == client_balances + node_balances + fees + payouts + refunds

Idempotency: every posting carries a ``key`` naming what it is for (``deposit:TXID:VOUT``,
``credit:ROUND:NODE``, ``charge:PERIOD:ACCOUNT``, ``payout:BATCH:NODE``); the database refuses a second posting
with the same key, so a retry or a restart after a crash never moves money twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fincryptfs.core.errors import PolicyError

MSAT_PER_SAT = 1000
# 21 million BTC in msat: no legitimate amount or balance can exceed it, and it fits a signed 64-bit column.
MAX_AMOUNT = 21_000_000 * 100_000_000 * MSAT_PER_SAT
GIB = 1 << 30
MS_PER_HOUR = 3_600_000

FEES = "mediator:fees"
WORLD_DEPOSITS = "world:deposits"
WORLD_PAYOUTS = "world:payouts"
WORLD_REFUNDS = "world:refunds"
WORLD = (WORLD_DEPOSITS, WORLD_PAYOUTS, WORLD_REFUNDS)

# kind → (source prefix, destination prefix); a prefix ending in ':' means "any account of that class"
FLOWS: Mapping[str, tuple[str, str]] = {
    "deposit": (WORLD_DEPOSITS, "client:"),
    "charge": ("client:", FEES),
    "credit": (FEES, "node:"),
    "payout": ("node:", WORLD_PAYOUTS),
    "payout_reversal": (WORLD_PAYOUTS, "node:"),  # a payout batch that could not be sent gives the money back
    "refund": ("client:", WORLD_REFUNDS),
}
ZERO_ALLOWED = frozenset({"charge", "credit"})  # a tiny object can owe 0 msat for an hour; still recorded once


class LedgerError(PolicyError):
    """A posting was refused (bad amount, wrong accounts, overdraft, replay); the ledger is unchanged."""

    status = 422


@dataclass(frozen=True)
class Posting:
    key: str
    kind: str
    source: str
    dest: str
    amount: int
    at: float
    memo: str = ""


@dataclass(frozen=True)
class Totals:
    """The six totals of the invariant, in msat."""

    deposits: int
    client_balances: int
    node_balances: int
    fees: int
    payouts: int
    refunds: int

    @property
    def holds(self) -> bool:
        return self.deposits == (self.client_balances + self.node_balances + self.fees + self.payouts
                                 + self.refunds)

    def to_json(self) -> dict[str, int]:
        return {"deposits": self.deposits, "client_balances": self.client_balances,
                "node_balances": self.node_balances, "fees": self.fees, "payouts": self.payouts,
                "refunds": self.refunds}


def client_account(account_id: str) -> str:
    return f"client:{account_id}"


def node_account(node_id: str) -> str:
    return f"node:{node_id}"


def check_amount(amount: object, *, allow_zero: bool = False) -> int:
    """An amount in msat: an int (not a bool, not a float) in 0..MAX_AMOUNT (1.. unless ``allow_zero``)."""
    if type(amount) is not int:
        raise LedgerError(f"amounts are integers in msat, got {type(amount).__name__} {amount!r:.40}")
    low = 0 if allow_zero else 1
    if not low <= amount <= MAX_AMOUNT:
        raise LedgerError(f"amount {amount} msat is outside {low}..{MAX_AMOUNT} (negative, zero or overflowing)")
    return amount


def _matches(account: str, pattern: str) -> bool:
    if pattern.endswith(":"):
        return account.startswith(pattern) and len(account) > len(pattern)
    return account == pattern


def check_posting(p: Posting) -> None:
    """Refuse a posting whose kind, accounts or amount are not allowed."""
    flow = FLOWS.get(p.kind)
    if flow is None:
        raise LedgerError(f"unknown posting kind {p.kind!r}; known: {', '.join(sorted(FLOWS))}")
    if not (_matches(p.source, flow[0]) and _matches(p.dest, flow[1])):
        raise LedgerError(f"a {p.kind} moves money from {flow[0]}… to {flow[1]}…, not from {p.source} to {p.dest}")
    if not p.key or len(p.key) > 200:
        raise LedgerError("every posting needs an idempotency key of 1..200 characters")
    check_amount(p.amount, allow_zero=p.kind in ZERO_ALLOWED)


def apply_postings(balances: Mapping[str, int], postings: Sequence[Posting]) -> dict[str, int]:
    """New balances of every account the postings touch; raises LedgerError (nothing applied) if any posting is
    invalid, a key repeats within the batch, or a non-world account would go below zero or above MAX_AMOUNT."""
    seen: set[str] = set()
    new: dict[str, int] = {}
    for p in postings:
        check_posting(p)
        if p.key in seen:
            raise LedgerError(f"posting {p.key} appears twice in one batch")
        seen.add(p.key)
        new[p.source] = new.get(p.source, balances.get(p.source, 0)) - p.amount
        new[p.dest] = new.get(p.dest, balances.get(p.dest, 0)) + p.amount
        for account in (p.source, p.dest):
            if account in WORLD:
                continue
            if new[account] < 0:
                raise LedgerError(f"{p.kind} {p.key} would overdraw {account}: balance "
                                  f"{new[account] + p.amount} msat, needs {p.amount} msat")
            if new[account] > MAX_AMOUNT:
                raise LedgerError(f"{p.kind} {p.key} would push {account} above {MAX_AMOUNT} msat")
    return new


def totals(balances: Iterable[tuple[str, int]]) -> Totals:
    """The invariant's totals from (account, balance) pairs."""
    deposits = clients = nodes = fees = payouts = refunds = 0
    for account, balance in balances:
        if account == WORLD_DEPOSITS:
            deposits = -balance
        elif account == WORLD_PAYOUTS:
            payouts = balance
        elif account == WORLD_REFUNDS:
            refunds = balance
        elif account == FEES:
            fees = balance
        elif account.startswith("client:"):
            clients += balance
        elif account.startswith("node:"):
            nodes += balance
        else:
            raise LedgerError(f"unknown ledger account {account!r}")
    return Totals(deposits, clients, nodes, fees, payouts, refunds)


def check_invariant(balances: Iterable[tuple[str, int]]) -> Totals:
    """The totals, after checking that they balance and that no client, node or fee balance is negative."""
    pairs = list(balances)
    for account, balance in pairs:
        if account not in WORLD and balance < 0:
            raise AssertionError(f"ledger invariant broken: {account} is negative ({balance} msat)")
    result = totals(pairs)
    if not result.holds:
        raise AssertionError(f"ledger invariant broken: {result.to_json()}")
    return result


# --- amounts ------------------------------------------------------------------------------------------------


def storage_cost(byte_price_sum: int, duration_ms: int) -> int:
    """msat for storing bytes for ``duration_ms`` at prices in msat per GiB-hour, given Σ(bytes × price).

    Exact integer arithmetic with one floor at the end, so the rounding costs at most 1 msat per call.
    """
    if byte_price_sum < 0 or duration_ms < 0:
        raise LedgerError("storage cost needs non-negative bytes, prices and durations")
    return byte_price_sum * duration_ms // (GIB * MS_PER_HOUR)


def credited_byte_price(bytes_proven: int, priced: Mapping[int, int], price: int) -> int:
    """Σ(bytes × price) a pass is credited for: each share at the lower of the node's price today and its price
    when the share was placed on it (``priced``: proven bytes by placement price; bytes of unknown placement
    price, from before it was recorded, go at today's). A node that raises its ask is paid the new one only for
    shares placed at it: clients were charged by prices of the day, and the mediator placed the old shares at
    the old ask."""
    known = sum(priced.values())
    return sum(size * min(price, placed) for placed, size in priced.items()) + max(0, bytes_proven - known) * price


def after_fee(gross: int, fee_bps: int) -> int:
    """What a node is credited from a gross amount after the mediator's fee (basis points, floored)."""
    return gross * (10_000 - fee_bps) // 10_000


def sat_from_msat(msat: int) -> int:
    return msat // MSAT_PER_SAT
