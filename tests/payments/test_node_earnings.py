"""A storage node keeps what its mediator says it earned (announce answer) and shows it in ``storaged status``
and ``/metrics``; a node with ``STORAGED_PRICE=float`` is credited at the bid the mediator publishes in
``/v1/info`` (today's: the mediator sets it, and clients are charged by the day's price; only an asking node
is held to the ask its shares were placed at). Real mediatord and storaged daemons on 127.0.0.1, a real wallet
on bitcoinlib_test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio
from mediator_net import make_object, start_mediator, start_node, stop_node, upload, wait_online

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from mediatord import upkeep
from mediatord.escrow import random_test_address
from mediatord.ledger import after_fee, storage_cost
from mediatord.payments import payments_pass

HOUR = 3600.0
ASK = 10**12  # msat per GiB-hour: large, so a few KiB earn more than the payout threshold in hours


def _metric(text: str, name: str, mediator_id: str) -> int:
    found = re.search(rf'^{name}{{mediator="{mediator_id}"}} (\d+)$', text, re.MULTILINE)
    assert found, text
    return int(found.group(1))


def _status(node_root: Path, *args: str) -> str:
    env_file = node_root / "status.env"
    env_file.write_text(f"STORAGED_DATA_DIR={node_root}\nSTORAGED_SHARE_DIRS={node_root / 'shares'}:1G\n"
                        "STORAGED_RESERVE_BYTES=0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGED_")}
    done = subprocess.run([sys.executable, "-m", "storaged.cli", "--env-file", str(env_file), "status", *args],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_float_node_paid_the_bid_and_its_earnings_shown(tmp_path: Path) -> None:
    base = (time.time() // HOUR - 4) * HOUR
    async with trio.open_nursery() as nursery, rpc.new_client() as client:
        mediator = await start_mediator(
            nursery, tmp_path / "m", MEDIATORD_PRICING="floating", MEDIATORD_BILLING_PERIOD="3600",
            MEDIATORD_AUDIT_PERIOD="3600", MEDIATORD_FEE_BPS="1000", MEDIATORD_DEPOSIT_CONFIRMATIONS="1",
            MEDIATORD_PAYOUT_THRESHOLD="1000", MEDIATORD_PAYOUT_FEE_RATE="1")
        service, db = mediator.service, mediator.service.db
        prices = ["float", "float", str(ASK), str(2 * ASK)]
        nodes = [await start_node(nursery, tmp_path, mediator.url, i, STORAGED_PRICE=prices[i],
                                  STORAGED_PAYOUT_ADDRESS=random_test_address(tmp_path)) for i in range(4)]
        await wait_online(mediator, 4)
        info = (await client.get(f"{mediator.url}/v1/info")).json()
        assert info["pricing"] == "floating"
        bid = info["bid"]
        assert 2 * ASK <= bid < 2 * ASK * 3  # the median ask of the asking nodes, raised by the fill level
        listed = {n["node_id"]: n["price"] for n in (await client.get(f"{mediator.url}/v1/nodes")).json()["nodes"]}
        assert listed[nodes[0].node_id] == listed[nodes[1].node_id] == bid and listed[nodes[2].node_id] == ASK

        key = SigningKey.generate()
        obj = make_object(k=2, n=4)
        await upload(client, mediator.url, key, obj)
        db._conn.execute("UPDATE objects SET created_at=?", (base,))
        await trio.sleep(0.6)  # the nodes announce their new free space: the bid follows the fill level
        bid = (await client.get(f"{mediator.url}/v1/info")).json()["bid"]
        assert bid > info["bid"]
        account = await rpc.call_json(client, "GET", f"{mediator.url}/v1/account", key=key)
        service.payments.wallet_sync(lambda e: e.fund_test_address(account["deposit_address"], 10**8, 1))
        for hour in range(1, 4):
            await upkeep.audit_round(service, client, base + hour * HOUR - 60)
            await payments_pass(service.payments, None, base + hour * HOUR)
        assert db.ledger_totals(check=True).holds
        assert (await client.get(f"{mediator.url}/v1/info")).json()["bid"] == bid

        # the float node is credited at today's bid (higher than the one its share was placed at: the fill level
        # raised it since): one audit period of its proven bytes, less the 10 % fee
        share_size = obj.layout.share_size
        placed_bid = next(s.price for s in db.shares_of(obj.object_id) if s.node_id == nodes[0].node_id)
        assert placed_bid is not None and info["bid"] <= placed_bid < bid
        credits = db.credited_rounds(nodes[0].node_id)
        assert len(credits) == 3
        assert credits[0][1] == after_fee(storage_cost(share_size * bid, int(HOUR * 1000)), 1000)
        asking = db.credited_rounds(nodes[2].node_id)
        assert asking[0][1] == after_fee(storage_cost(share_size * ASK, int(HOUR * 1000)), 1000)

        # the nodes re-announce every 0.2 s and keep the mediator's answer
        expected = await rpc.call_json(client, "GET", f"{mediator.url}/v1/nodes/me/earnings",
                                       key=_node_key(nodes[0]))
        assert expected["paid_msat"] > 0 and expected["earned_msat"] == sum(a for _r, a in credits)
        async with httpx.AsyncClient(trust_env=False) as plain:
            with trio.fail_after(10):
                while True:
                    metrics = (await plain.get(f"{nodes[0].url}/metrics")).text
                    if f'storaged_paid_msat{{mediator="{service.id}"}} {expected["paid_msat"]}' in metrics:
                        break
                    await trio.sleep(0.1)
        assert _metric(metrics, "storaged_earned_msat", service.id) == expected["earned_msat"]
        assert _metric(metrics, "storaged_pending_msat", service.id) == expected["pending_msat"]
        await stop_node(nodes[0])

        status = json.loads(await trio.to_thread.run_sync(_status, nodes[0].settings.data_dir, "--json"))
        (earned,) = status["earnings"]
        assert earned["mediator_id"] == service.id and earned["url"] == mediator.url
        assert {k: earned[k] for k in expected if k != "node_id"} == {k: v for k, v in expected.items()
                                                                      if k != "node_id"}
        text = await trio.to_thread.run_sync(_status, nodes[0].settings.data_dir)
        assert f"earnings from {mediator.url}: earned {expected['earned_msat']} msat" in text
        assert f"paid {expected['paid_msat']} msat" in text
        nursery.cancel_scope.cancel()


def _node_key(node: object) -> SigningKey:
    from fincryptfs.core.identity import decode_identity_file
    path = node.settings.data_dir / "node.key"  # type: ignore[attr-defined]
    return decode_identity_file(path.read_bytes(), source=str(path))
