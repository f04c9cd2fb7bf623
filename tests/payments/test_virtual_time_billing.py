"""A week of the mediator's own money loop in virtual time: deposit, hourly charges, credits, a payout batch,
the low-balance warning, running out, seven days of grace and the 402, against two real storage nodes.

mediatord runs its upkeep loops (audits every 3600 s, billing every 3600 s, low-balance warning below 7 days,
grace 7 days, payout threshold 100,000 sat, fee 10 %, 3 confirmations: the defaults) on trio's MockClock (see
tests/mediatord/virtual_clock.py); nothing calls a pass. The test deposits, uploads, sleeps, and checks the
ledger at every quarter to the hour: after that hour's audit round and both payments passes of the hour.

Only the deposit scan runs every 1800 s instead of 60 s: each pass asks the bitcoinlib wallet for deposits
(about 5 ms of real time), 10,080 of them a week would take a minute; and at :30 the pass never coincides with
an audit round, so every round is credited by the next pass unless the mediator's account is short.

The story, in virtual hours: object A at 0 and a deposit worth 7 days + 36 hours of it (no warning); object B,
forty times bigger, at 3:03 (time left drops to about 5 hours: one warning, one webhook); both nodes pass the
payout threshold after three rounds with B and are paid in one batch; the account runs out at 8:00; uploads
still work in the grace period and are refused with 402 once it is over; a new deposit ends it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from mediator_net import SampleObject, make_object, object_status, start_mediator, start_node, upload, wait_online
from virtual_clock import HOUR, hour_epoch, install, new_clock

from fincryptfs import rpc
from fincryptfs.asgi import App, Request, Response, Router, json_response, serve_app
from fincryptfs.core.identity import SigningKey
from mediatord.escrow import random_test_address
from mediatord.ledger import FEES, MSAT_PER_SAT, after_fee, client_account, node_account, storage_cost

PRICE = 20_000_000_000  # msat per GiB-hour: big enough for a 2.6 MB object to earn a payout within hours
A_SIZE = 65_536
B_SIZE = 40 * A_SIZE
WEEK = 7 * 24 * HOUR


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    return new_clock()


async def start_webhook(nursery: trio.Nursery, received: list[dict[str, Any]]) -> str:
    """A real HTTP endpoint recording what the mediator posts to MEDIATORD_LOW_BALANCE_WEBHOOK."""
    async def hook(request: Request) -> Response:
        received.append(await request.json())
        return json_response({"ok": True})

    router = Router()
    router.add("POST", "/hook", hook)
    url: str = await nursery.start(serve_app, App(router), "127.0.0.1", 0)
    return url.rstrip("/") + "/hook"


def object_bytes(obj: SampleObject) -> int:
    return sum(spec.share_size for spec in obj.specs)


async def test_a_week_of_billing_on_the_daemons_own_loops(tmp_path: Path, nursery: trio.Nursery,
                                                          virtual_clock: trio.testing.MockClock,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    vt = install(monkeypatch, virtual_clock, hour_epoch())
    hooks: list[dict[str, Any]] = []
    mediator = await start_mediator(nursery, tmp_path / "m", loops=True, MEDIATORD_NODE_OFFLINE_AFTER="10800",
                                    MEDIATORD_PRICING=f"fixed:{PRICE}", MEDIATORD_DEPOSIT_SCAN_INTERVAL="1800",
                                    MEDIATORD_LOW_BALANCE_WEBHOOK=await start_webhook(nursery, hooks))
    service, db, settings = mediator.service, mediator.service.db, mediator.service.settings
    assert (settings.audit_period, settings.billing_period, settings.fee_bps, settings.deposit_confirmations,
            settings.payout_threshold_sat, settings.low_balance_warning, settings.grace_period) == (
        3600, 3600, 1000, 3, 100_000, WEEK, WEEK)
    threshold = settings.payout_threshold_sat * MSAT_PER_SAT
    nodes = [await start_node(nursery, tmp_path, mediator.url, i, STORAGED_ANNOUNCE_INTERVAL="300",
                              STORAGED_PAYOUT_ADDRESS=random_test_address(tmp_path)) for i in range(2)]
    await wait_online(mediator, 2)
    key = SigningKey.generate()
    account = client_account(key.id)

    def at(hours: float) -> float:
        return vt.epoch + hours * HOUR

    async with rpc.new_client() as client:
        async def get_account() -> dict[str, Any]:
            return await rpc.call_json(client, "GET", f"{mediator.url}/v1/account", key=key)

        # hour 0: object A, then a deposit worth 7 days + 36 hours of it (3 confirmations: credited at once)
        obj_a = make_object(k=1, n=2, padded_size=A_SIZE, segment_size=A_SIZE)
        await upload(client, mediator.url, key, obj_a)
        burn_a = (await get_account())["burn_rate_msat_per_hour"]
        assert burn_a == object_bytes(obj_a) * PRICE // 2**30
        deposit_sat = math.ceil(burn_a * (WEEK / HOUR + 36) / MSAT_PER_SAT)
        address = await service.payments.deposit_address(key.id)
        await service.payments.wallet(lambda e: e.fund_test_address(address, deposit_sat, 3))
        objects = [obj_a]

        def expected_charge(period_start: float, period_end: float) -> int:
            weighted = 0
            for obj in objects:
                created = db.object(obj.object_id).created_at  # type: ignore[union-attr]
                duration_ms = int((period_end - max(period_start, created)) * 1000)
                if duration_ms > 0:
                    weighted += object_bytes(obj) * PRICE * duration_ms
            return storage_cost(weighted, 1)

        charges_seen: dict[int, int] = {}
        batches_seen: set[int] = set()
        out_since: float | None = None
        hour = 0

        async def next_hour() -> None:
            """Sleep to the next :45 and check that hour's billing period, charge, credits and the ledger."""
            nonlocal hour, out_since
            hour += 1
            await vt.sleep_until(at(hour + 0.75))
            totals = db.ledger_totals(check=True)  # raises if a non-world balance went negative
            assert totals.holds, totals
            assert db.last_billed_period() == int(vt.epoch // HOUR) + hour - 1  # one period per hour, no gaps
            period_id, start, end, _billed, _accounts, charged, unpaid = db._conn.execute(
                "SELECT * FROM billing_periods ORDER BY period_id DESC LIMIT 1").fetchone()
            assert (start, end) == (at(hour - 1), at(hour))
            cost = expected_charge(start, end)
            posted = {p.key: p.amount for _s, p in db.postings(account, 10_000) if p.kind == "charge"}
            charge = posted.get(f"charge:{period_id}:{key.id}", 0)
            assert charge + unpaid == cost and charge == charged
            charges_seen[hour] = charge
            if unpaid and out_since is None:
                out_since = db.account_billing(key.id)[1]
                assert out_since == pytest.approx(at(hour), abs=1) and db.balance(account) == 0
            # credits: every passed round once, in order, at the node's price for the time since its last pass
            for node in nodes:
                passes = db.audit_passes(node.node_id)
                credits = db.credited_rounds(node.node_id)
                assert [r for r, _ in credits] == [p[0] for p in passes[:len(credits)]]
                keys = [p.key for _s, p in db.postings(node_account(node.node_id), 10_000) if p.kind == "credit"]
                assert len(keys) == len(set(keys)) == len(credits)
                for (round_id, amount), previous, current in zip(credits, [None, *passes], passes, strict=False):
                    covered = 3_600_000 if previous is None else min(3_600_000, int((current[4] - previous[4]) * 1000))
                    assert amount == after_fee(storage_cost(current[3] * PRICE, covered), 1000), round_id
                if out_since is None:
                    assert len(credits) == len(passes) == hour  # funded: every round credited by the :30 pass
            batches_seen.update(b[0] for b in db.payout_batches())

        await next_hour()
        account_json = await get_account()
        assert account_json["balance_msat"] == deposit_sat * MSAT_PER_SAT - charges_seen[1]
        assert not account_json["low_balance"] and account_json["time_left_seconds"] > WEEK
        await next_hour()

        # 3:03: object B, forty times A: time left drops to about five hours, one warning and one webhook
        await vt.sleep_until(at(3.05))
        obj_b = make_object(k=1, n=2, padded_size=B_SIZE, segment_size=A_SIZE)
        await upload(client, mediator.url, key, obj_b)
        objects.append(obj_b)
        assert hooks == []
        await next_hour()
        assert len(hooks) == 1 and hooks[0]["event"] == "low_balance" and hooks[0]["account_id"] == key.id
        assert hooks[0]["low_balance"] and hooks[0]["time_left_seconds"] < 6 * HOUR
        account_json = await get_account()
        assert account_json["low_balance"] and account_json["out_of_funds_since"] is None
        assert key.id in db.warned_accounts()

        # hours 4..8: charged every hour; both nodes pass the threshold together and are paid in one batch
        while out_since is None:
            await next_hour()
            assert hour < 12, "the account should have run out by now"
        assert hour == 8
        assert len(batches_seen) == 1
        (batch_id, state, _created, fee_sat, txid, _sent_at, _detail), = db.payout_batches()
        assert state == "sent" and txid
        outputs = db.payout_outputs(batch_id)
        assert sorted(o[0] for o in outputs) == sorted(n.node_id for n in nodes)  # one output per node
        assert all(debited >= threshold and sent == debited // MSAT_PER_SAT - fee_sat // 2
                   for _n, _a, debited, sent in outputs)
        assert all(db.balance(node_account(n.node_id)) < threshold for n in nodes)

        # out of funds: paid what it had, no debt; grace for 7 days, in which uploads still work
        account_json = await get_account()
        assert account_json["balance_msat"] == 0 and account_json["out_of_funds_since"] == int(out_since)
        assert account_json["grace_ends_at"] == int(out_since + WEEK) and not account_json["uploads_refused"]
        await next_hour()
        assert charges_seen[hour] == 0
        objects.append(make_object(k=1, n=2, padded_size=4000))
        await upload(client, mediator.url, key, objects[-1])
        credited_at_out = {n.node_id: len(db.credited_rounds(n.node_id)) for n in nodes}
        while at(hour + 1.75) < out_since + WEEK:
            await next_hour()
        assert not (await get_account())["uploads_refused"]
        await next_hour()  # the grace period ended during this hour
        assert vt.now() > out_since + WEEK
        account_json = await get_account()
        assert account_json["uploads_refused"] and account_json["objects"] == 3
        with pytest.raises(rpc.PeerError) as refused:
            await upload(client, mediator.url, key, make_object(k=1, n=2, padded_size=4000))
        assert refused.value.status == 402 and f"deposit to {address}" in str(refused.value)

        # a week without charges: data kept and audited every hour, but credits wait for the mediator's account
        for obj in objects:
            status = await object_status(client, mediator.url, key, obj.object_id)
            assert status["health"]["state"] == "healthy"
        for node in nodes:
            assert len(db.audit_passes(node.node_id)) == hour
            assert len(db.credited_rounds(node.node_id)) - credited_at_out[node.node_id] <= 1
        assert db.balance(FEES) >= 0 and len(hooks) == 1  # warned once in the whole story
        assert len(batches_seen) == 1

        # a deposit ends it: credited by the next pass (before it bills), uploads accepted again
        await service.payments.wallet(lambda e: e.fund_test_address(address, 1_000_000, 3))
        await next_hour()
        assert db.account_billing(key.id)[1] is None and charges_seen[hour] > 0
        assert not (await get_account())["uploads_refused"]
        objects.append(make_object(k=1, n=2, padded_size=4000))
        await upload(client, mediator.url, key, objects[-1])
    assert db.ledger_totals(check=True).holds
    nursery.cancel_scope.cancel()
