"""The pure ledger: flows, bad amounts, overdrafts, the invariant under random postings (hypothesis), purity."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediatord import ledger
from mediatord.billing import plan_payouts
from mediatord.escrow import payout_vbytes
from mediatord.ledger import FEES, MAX_AMOUNT, WORLD_DEPOSITS, WORLD_PAYOUTS, LedgerError, Posting

A, B = "client:" + "a" * 64, "client:" + "b" * 64
N1, N2 = "node:" + "1" * 64, "node:" + "2" * 64


def p(key: str, kind: str, source: str, dest: str, amount: int) -> Posting:
    return Posting(key, kind, source, dest, amount, 0.0)


def test_flows_and_totals() -> None:
    balances = ledger.apply_postings({}, [p("d", "deposit", WORLD_DEPOSITS, A, 10_000),
                                          p("c", "charge", A, FEES, 4_000),
                                          p("r", "credit", FEES, N1, 3_000),
                                          p("o", "payout", N1, WORLD_PAYOUTS, 2_000),
                                          p("f", "refund", A, "world:refunds", 1_000)])
    totals = ledger.check_invariant(balances.items())
    assert totals.to_json() == {"deposits": 10_000, "client_balances": 5_000, "node_balances": 1_000,
                                "fees": 1_000, "payouts": 2_000, "refunds": 1_000}


@pytest.mark.parametrize("posting, message", [
    (p("x", "deposit", WORLD_DEPOSITS, A, -5), "outside"),
    (p("x", "deposit", WORLD_DEPOSITS, A, 0), "outside"),
    (p("x", "deposit", WORLD_DEPOSITS, A, MAX_AMOUNT + 1), "outside"),
    (p("x", "deposit", WORLD_DEPOSITS, A, 1.5), "integers"),  # type: ignore[arg-type]
    (p("x", "deposit", WORLD_DEPOSITS, A, True), "integers"),
    (p("x", "deposit", WORLD_DEPOSITS, N1, 5), "moves money"),
    (p("x", "payout", A, WORLD_PAYOUTS, 5), "moves money"),
    (p("x", "credit", A, N1, 5), "moves money"),
    (p("x", "steal", A, N1, 5), "unknown posting kind"),
    (p("", "deposit", WORLD_DEPOSITS, A, 5), "idempotency key"),
    (p("x", "charge", A, FEES, 1), "overdraw"),
    (p("x", "payout", N1, WORLD_PAYOUTS, 1), "overdraw"),
])
def test_bad_postings_are_refused(posting: Posting, message: str) -> None:
    with pytest.raises(LedgerError, match=message):
        ledger.apply_postings({}, [posting])


def test_duplicate_key_in_batch_and_overflowing_balance() -> None:
    with pytest.raises(LedgerError, match="twice"):
        ledger.apply_postings({}, [p("k", "deposit", WORLD_DEPOSITS, A, 1), p("k", "deposit", WORLD_DEPOSITS, A, 1)])
    with pytest.raises(LedgerError, match="above"):
        ledger.apply_postings({A: MAX_AMOUNT}, [p("k", "deposit", WORLD_DEPOSITS, A, 1)])


def test_storage_cost_is_exact_integer_arithmetic() -> None:
    # 1 GiB at 1000 msat per GiB-hour for one hour = 1000 msat; for half an hour 500; floors, never floats
    assert ledger.storage_cost((1 << 30) * 1000, 3_600_000) == 1000
    assert ledger.storage_cost((1 << 30) * 1000, 1_800_000) == 500
    assert ledger.storage_cost(1, 1) == 0
    assert ledger.after_fee(1000, 1000) == 900
    with pytest.raises(LedgerError):
        ledger.storage_cost(-1, 5)


def test_payout_plan_threshold_fee_share_and_dust() -> None:
    plan = plan_payouts([("n1", "addr1", 200_000_999), ("n2", "addr2", 50_000_000), ("n3", "addr3", 100_000_000)],
                        100_000, 10, payout_vbytes)
    assert plan is not None
    fee = 10 * payout_vbytes(2, 2)
    share = -(-fee // 2)
    assert plan.outputs == (("n1", "addr1", 200_000_000, 200_000 - share),
                            ("n3", "addr3", 100_000_000, 100_000 - share))
    assert plan.fee_sat == share * 2
    assert plan_payouts([("n1", "a", 10**6)], 1_000, 10_000, payout_vbytes) is None  # fee would eat it all


ACCOUNTS = [A, B, N1, N2, FEES]


@st.composite
def postings(draw: st.DrawFn) -> list[Posting]:
    items = []
    for i in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(sorted(ledger.FLOWS)))
        source, dest = ledger.FLOWS[kind]
        source = draw(st.sampled_from([A, B])) if source == "client:" else (
            draw(st.sampled_from([N1, N2])) if source == "node:" else source)
        dest = draw(st.sampled_from([A, B])) if dest == "client:" else (
            draw(st.sampled_from([N1, N2])) if dest == "node:" else dest)
        amount = draw(st.one_of(st.integers(-10, 10**6), st.just(MAX_AMOUNT), st.just(MAX_AMOUNT + 1)))
        items.append(Posting(f"k{draw(st.integers(0, 30))}-{i % 3}", kind, source, dest, amount, 0.0))
    return items


@settings(max_examples=300, deadline=None)
@given(postings())
def test_invariant_holds_whatever_is_posted(batch: list[Posting]) -> None:
    """Apply each posting alone (as the database does with batches): refused ones change nothing; after each
    accepted one the invariant holds and no client, node or fee balance is negative; keys never repeat."""
    balances: dict[str, int] = {}
    keys: set[str] = set()
    for posting in batch:
        before = dict(balances)
        try:
            if posting.key in keys:
                raise LedgerError("replay")
            balances.update(ledger.apply_postings(balances, [posting]))
            keys.add(posting.key)
        except LedgerError:
            assert balances == before
        totals = ledger.check_invariant(balances.items())
        assert totals.holds
        assert all(v >= 0 for k, v in balances.items() if k in ACCOUNTS)


def test_ledger_module_is_pure() -> None:
    tree = ast.parse(Path(ledger.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"trio", "httpx", "sqlite3", "bitcoinlib", "os", "socket"}


def test_only_escrow_imports_bitcoinlib() -> None:
    root = Path(ledger.__file__).parent
    users = [path.name for path in root.rglob("*.py") if "bitcoinlib" in path.read_text()
             and "import bitcoinlib" in path.read_text() or "from bitcoinlib" in path.read_text()]
    assert users == ["escrow.py"]
