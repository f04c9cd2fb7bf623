"""kill -9 of a real mediatord process at random points of billing and payout, several times over.

The mediator runs as a subprocess (``python -m mediatord.cli --env-file F``) with one-second billing and audit
periods, four real storage nodes (in this process) and a client account funded through
``mediatord fund-test-account`` while the daemon runs. It is killed with SIGKILL at random moments and restarted
on the same port and data dir each time. Afterwards: the ledger invariant holds, every (round, node) was credited
at most once and matches its ``audit_credits`` row, and no payout batch was broadcast twice (no wallet output
spent twice, one wallet transaction per sent batch and no other transaction paying a node).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from mediator_net import make_object, start_node, upload

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from fincryptfs.devnet import free_port
from mediatord.escrow import random_test_address

pytestmark = pytest.mark.e2e
KILLS = 6


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MEDIATORD_")}


def _start(env_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "mediatord.cli", "--env-file", str(env_file)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_cli_env())


async def _wait_health(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        with trio.fail_after(60):
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if (await client.get(f"{url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.05)


async def _wait_nodes_online(url: str, count: int) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        with trio.fail_after(30):
            while True:
                listing = (await client.get(f"{url}/v1/nodes")).json()
                if sum(n["state"] == "online" for n in listing["nodes"]) >= count:
                    return
                await trio.sleep(0.1)


def _cli(env_file: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "mediatord.cli", *args, "--env-file", str(env_file)],
                          capture_output=True, text=True, timeout=120, env=_cli_env())
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def test_kill_9_during_billing_and_payouts(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"kill schedule seed {seed}")
    data = tmp_path / "mediator"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env_file = tmp_path / "mediatord.env"
    env_file.write_text("\n".join([
        f"MEDIATORD_LISTEN=127.0.0.1:{port}", f"MEDIATORD_PUBLIC_URL={url}", f"MEDIATORD_DATA_DIR={data}",
        "MEDIATORD_PRICING=fixed:100000000000000", "MEDIATORD_BILLING_PERIOD=1", "MEDIATORD_AUDIT_PERIOD=1",
        "MEDIATORD_DEPOSIT_SCAN_INTERVAL=0.2", "MEDIATORD_DEPOSIT_CONFIRMATIONS=1",
        "MEDIATORD_PAYOUT_THRESHOLD=1000", "MEDIATORD_PAYOUT_FEE_RATE=1", "MEDIATORD_NODE_OFFLINE_AFTER=3600",
        "MEDIATORD_FEE_BPS=1000", ""]))
    log = tmp_path / "mediatord.log"
    proc = _start(env_file, log)
    kills = []
    try:
        async with trio.open_nursery() as nursery, rpc.new_client() as client:
            await _wait_health(proc, url, log)
            for i in range(4):
                await start_node(nursery, tmp_path, url, i, STORAGED_PRICE="float",
                                 STORAGED_PAYOUT_ADDRESS=random_test_address(tmp_path))
            await _wait_nodes_online(url, 4)
            key = SigningKey.generate()
            funded = await trio.to_thread.run_sync(_cli, env_file, "fund-test-account", key.id, "50000000",
                                                   "--confirmations", "1")
            assert json.loads(funded)["amount_sat"] == 50_000_000
            for _ in range(2):
                await upload(client, url, key, make_object(k=2, n=4))

            for _ in range(KILLS):
                await trio.sleep(rng.uniform(0.3, 2.5))
                proc.kill()  # SIGKILL: no cleanup of any kind
                proc.wait()
                kills.append(proc.returncode)
                proc = _start(env_file, log)
                await _wait_health(proc, url, log)
            await trio.sleep(3)  # let the last life finish open batches and credit what is waiting
            _stop(proc, signal.SIGTERM)
            nursery.cancel_scope.cancel()
    finally:
        _stop(proc, signal.SIGKILL)
    assert kills == [-signal.SIGKILL] * KILLS

    report = json.loads(await trio.to_thread.run_sync(_cli, env_file, "ledger", "--json"))
    assert report["invariant_holds"]
    assert report["deposits"] == report["client_balances"] + report["node_balances"] + report["fees"] + \
        report["payouts"] + report["refunds"]
    assert report["deposits"] == 50_000_000 * 1000
    assert report["payouts"] > 0 and report["node_balances"] >= 0 and report["fees"] >= 0

    with sqlite3.connect(data / "mediator.sqlite3") as conn:
        assert conn.execute("SELECT key FROM ledger_postings GROUP BY key HAVING COUNT(*) > 1").fetchall() == []
        credits = {key: amount for key, amount in
                   conn.execute("SELECT key, amount FROM ledger_postings WHERE kind='credit'")}
        rows = {f"credit:{r}:{n}": a for r, n, a in conn.execute(
            "SELECT round_id, node_id, amount FROM audit_credits WHERE amount > 0")}
        assert credits == rows and len(credits) >= 8  # each (round, node) credited once, with its row
        assert conn.execute("SELECT COUNT(*) FROM audit_passes p LEFT JOIN audit_credits c USING (round_id, node_id)"
                            " WHERE c.round_id IS NULL").fetchone()[0] <= 4  # at most the last round waits
        batches = conn.execute("SELECT batch_id, state, txid FROM payout_batches").fetchall()
        sent = {txid for _b, state, txid in batches if state == "sent"}
        assert sent and len(sent) == sum(state == "sent" for _b, state, _t in batches)
        assert not [b for b in batches if b[1] in ("prepared", "signed")], batches
        paid_to = {a for (a,) in conn.execute("SELECT DISTINCT address FROM payout_outputs")}
        debited = conn.execute("SELECT COALESCE(SUM(o.debited), 0) FROM payout_outputs o JOIN payout_batches b"
                               " USING (batch_id) WHERE b.state = 'sent'").fetchone()[0]
        assert debited == report["payouts"]
    with sqlite3.connect(data / "wallet.sqlite3") as wallet:
        spent = wallet.execute("SELECT prev_txid, output_n, COUNT(DISTINCT transaction_id) FROM transaction_inputs"
                               " GROUP BY prev_txid, output_n HAVING COUNT(DISTINCT transaction_id) > 1").fetchall()
        assert spent == []  # no wallet output spent by two transactions
        paying = {txid.hex() if isinstance(txid, bytes) else txid for (txid,) in wallet.execute(
            "SELECT DISTINCT t.txid FROM transactions t JOIN transaction_outputs o ON o.transaction_id = t.id"
            f" WHERE o.address IN ({','.join('?' * len(paid_to))})", sorted(paid_to))}
        assert paying == sent  # one transaction per sent batch, none broadcast a second time with other bytes
    print(f"{KILLS} kills: {len(credits)} credits, {len(sent)} payout batches sent, {report['payouts']} msat paid")
