"""Money end to end with real daemons on 127.0.0.1: deposit, hourly charges, credits per passed audit, batched
payouts, low balance, running out, grace, refusal.

Hours pass by calling the audit round and the payments pass with explicit times an hour apart (the billing
function takes ``now``), starting ten hours in the past so that the mediator's own clock, which the HTTP
``place`` uses, lies after the grace period at the end. MockClock is not used: with real sockets its autojump
fires while requests wait on the network.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import trio
from mediator_net import make_object, share_data_file, start_mediator, start_node, upload, wait_online

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from mediatord import billing, upkeep
from mediatord.escrow import random_test_address
from mediatord.ledger import LedgerError
from mediatord.payments import payments_pass

HOUR = 3600.0


async def test_deposit_bill_credit_payout_warn_run_out_and_refuse(tmp_path: Path) -> None:
    base = (time.time() // HOUR - 10) * HOUR  # ten billing periods ago, on a period boundary
    async with trio.open_nursery() as nursery, rpc.new_client() as client:
        mediator = await start_mediator(
            nursery, tmp_path / "m", MEDIATORD_PRICING="fixed:100000000000", MEDIATORD_BILLING_PERIOD="3600",
            MEDIATORD_AUDIT_PERIOD="3600", MEDIATORD_FEE_BPS="1000", MEDIATORD_DEPOSIT_CONFIRMATIONS="2",
            MEDIATORD_PAYOUT_THRESHOLD="1000", MEDIATORD_PAYOUT_FEE_RATE="2",
            MEDIATORD_LOW_BALANCE_WARNING="10800", MEDIATORD_GRACE_PERIOD="7200")
        service, db = mediator.service, mediator.service.db
        payments = service.payments
        addresses = [random_test_address(tmp_path) for _ in range(4)]
        nodes = [await start_node(nursery, tmp_path, mediator.url, i, STORAGED_PAYOUT_ADDRESS=addresses[i])
                 for i in range(4)]
        await wait_online(mediator, 4)
        key = SigningKey.generate()
        obj = make_object(k=2, n=4)
        await upload(client, mediator.url, key, obj)
        db._conn.execute("UPDATE objects SET created_at=?", (base,))  # stored since the start of the story

        account = await rpc.call_json(client, "GET", f"{mediator.url}/v1/account", key=key)
        address = account["deposit_address"]
        assert address.startswith("blt1") and account["balance_msat"] == 0 and account["burn_rate_msat_per_hour"] > 0

        # an unconfirmed deposit is seen but not credited; confirmed, it is credited exactly once
        txid = payments.wallet_sync(lambda e: e.fund_test_address(address, 30_000, 0))
        await payments_pass(payments, None, base + 1)
        account = await rpc.call_json(client, "GET", f"{mediator.url}/v1/account", key=key)
        assert account["balance_msat"] == 0 and account["pending_deposits_sat"] == 30_000
        payments.wallet_sync(lambda e: e.fund_test_address(address, 30_000, 2, txid=txid))
        report = await payments_pass(payments, None, base + 2)
        assert report.deposited == 30_000_000
        with pytest.raises(LedgerError, match="already credited"):
            billing.credit_deposit(db, txid, 0, base + 3)
        assert db.balance(f"client:{key.id}") == 30_000_000

        # node 0 loses a share: its rounds fail and earn nothing, the others are credited once per round
        share_data_file(nodes[0], _share_on(service, obj, nodes[0].node_id)).unlink()
        warned_at = out_at = None
        batches: set[int] = set()
        for hour in range(1, 9):
            now = base + hour * HOUR
            await upkeep.audit_round(service, client, now - 60)
            report = await payments_pass(payments, None, now)
            totals = db.ledger_totals(check=True)
            assert totals.holds and totals.fees >= 0
            batches.update(report.batches_sent)
            if report.warned and warned_at is None:
                warned_at = now
            if report.period and report.period.ran_out and out_at is None:
                out_at = now
        assert warned_at is not None and out_at is not None and warned_at < out_at

        for node in nodes:
            credits = db.credited_rounds(node.node_id)
            passes = db.audit_passes(node.node_id)
            assert len(credits) == len(passes)  # exactly once
            keys = [p.key for _s, p in db.postings(f"node:{node.node_id}", 1000) if p.kind == "credit"]
            assert len(keys) == len(set(keys)) == sum(1 for _r, amount in credits if amount > 0)
        assert db.audit_passes(nodes[0].node_id) == [] and db.credited_rounds(nodes[0].node_id) == []

        # payouts: batched, one output per paid node, sent with a txid; the earnings endpoint agrees
        assert batches
        sent = db.payout_batches()
        assert all(b[1] == "sent" and b[4] for b in sent)
        first = db.payout_outputs(min(batches))
        assert len(first) == 3 and {o[1] for o in first} == set(addresses[1:])
        earnings = await rpc.call_json(client, "GET", f"{mediator.url}/v1/nodes/me/earnings", key=_node_key(nodes[1]))
        assert earnings["earned_msat"] == earnings["pending_msat"] + earnings["paid_msat"] > 0
        assert earnings["paid_msat"] > 0

        # out of funds: uploads allowed during the grace period, refused with 402 after it; data stays
        billing.refuse_uploads_after_grace(db, service.settings, key.id, out_at + 60)
        account = await rpc.call_json(client, "GET", f"{mediator.url}/v1/account", key=key)
        assert account["balance_msat"] == 0 and account["uploads_refused"] and account["low_balance"]
        assert account["objects"] == 1
        with pytest.raises(rpc.PeerError) as refused:
            await upload(client, mediator.url, key, make_object(k=2, n=4))
        assert refused.value.status == 402 and "deposit" in str(refused.value)
        # a new deposit ends it
        payments.wallet_sync(lambda e: e.fund_test_address(address, 10_000, 6))
        await payments_pass(payments, None, time.time())
        await upload(client, mediator.url, key, make_object(k=2, n=4))

        history = await rpc.call_json(client, "GET", f"{mediator.url}/v1/account/history", key=key)
        kinds = {p["kind"] for p in history["postings"]}
        assert kinds == {"deposit", "charge"}
        with pytest.raises(rpc.PeerError) as forbidden:
            await rpc.call_json(client, "GET", f"{mediator.url}/v1/ledger", key=key)
        assert forbidden.value.status == 403
        ledger_report = await rpc.call_json(client, "GET", f"{mediator.url}/v1/ledger", key=service.key)
        assert ledger_report["invariant_holds"] and ledger_report["deposits"] == 40_000_000
        nursery.cancel_scope.cancel()


def _share_on(service: object, obj: object, node_id: str) -> str:
    db = service.db  # type: ignore[attr-defined]
    return next(s.share_id for s in db.shares_of(obj.object_id) if s.node_id == node_id)  # type: ignore[attr-defined]


def _node_key(node: object) -> SigningKey:
    from fincryptfs.core.identity import decode_identity_file
    path = node.settings.data_dir / "node.key"  # type: ignore[attr-defined]
    return decode_identity_file(path.read_bytes(), source=str(path))


_ = httpx
