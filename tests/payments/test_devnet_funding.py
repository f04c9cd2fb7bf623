"""The devnet's funded account: funding runs in another process than the daemon, and both use one wallet.

Regression for the devnet showing ``balance_msat`` 0 and no deposit address: bitcoinlib is not safe across
processes (two that open a fresh wallet together make two wallets of one name, or fail), and the account's
recorded deposit address was hidden until the account had placed an object.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from netfixtures import pid_alive

from fincryptfs import rpc
from fincryptfs.core.crypto import account_signing_key, decode_key_file
from fincryptfs.devnet import DEVNET_FUNDING_SAT

OPEN_WALLET = """
import sys
from pathlib import Path
from fincryptfs.core.settings import MediatorSettings
from mediatord.db import MediatorDB
from mediatord.payments import Payments
from mediatord.policies import pricing_scheme
settings = MediatorSettings.from_env({"MEDIATORD_DATA_DIR": sys.argv[1]}, home=Path(sys.argv[1]))
db = MediatorDB(Path(sys.argv[1]) / "m.sqlite3")
payments = Payments(settings, db, pricing_scheme(settings.pricing))
try:
    print(payments.wallet_sync(lambda e: e.new_deposit_address(sys.argv[2])))
finally:
    payments.close()
    db.close()
"""


def test_processes_opening_a_fresh_wallet_together_share_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_WALLET, str(data), f"account-{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _out, err in results]
    addresses = {out.strip() for out, _err in results}
    assert len(addresses) == 3 and all(a.startswith("blt1") for a in addresses)  # three distinct keys
    import sqlite3

    with sqlite3.connect(data / "wallet.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM wallets").fetchone()[0] == 1


async def _account(url: str, home: Path) -> dict[str, object]:
    master = decode_key_file((home / "client" / "master.key").read_bytes(), None)
    async with rpc.new_client() as http:
        return await rpc.call_json(http, "GET", f"{url}/v1/account", key=account_signing_key(master))


@pytest.mark.e2e
def test_devnet_account_is_funded_and_all_children_stop(tmp_path: Path) -> None:
    home = tmp_path / "devnet"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIATORD_", "STORAGED_", "FINCRYPT_"))}
    started = time.monotonic()
    devnet = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "devnet", "--home", str(home), "--nodes", "3"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    pids: list[int] = []
    try:
        info_path = home / "devnet.json"
        while not info_path.exists():
            assert devnet.poll() is None, devnet.stderr.read().decode()[-2000:] if devnet.stderr else ""
            assert time.monotonic() - started < 90, "the devnet did not start within 90 s"
            time.sleep(0.2)
        info = json.loads(info_path.read_text())
        pids = [info["mediator"]["pid"], *(n["pid"] for n in info["nodes"])]
        # funded by the time the network says it is ready: a first `status` shows the balance, not a warning
        account = trio.run(_account, info["mediator"]["url"], home)
        assert account["balance_msat"] == DEVNET_FUNDING_SAT * 1000, account
        assert str(account["deposit_address"]).startswith("blt1") and account["uploads_refused"] is False
        # every node has a payout address of its own on the test network, so the devnet pays them
        payout = [line.split("=", 1)[1] for i in range(3)
                  for line in (home / f"node-{i}" / "storaged.env").read_text().splitlines()
                  if line.startswith("STORAGED_PAYOUT_ADDRESS=")]
        assert len(set(payout)) == 3 and all(a.startswith("blt1") for a in payout), payout
        print(f"ready and funded {time.monotonic() - started:.1f} s after start")
    finally:
        if devnet.poll() is None:
            devnet.send_signal(signal.SIGTERM)
        try:
            devnet.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(devnet.pid, signal.SIGKILL)
            devnet.wait()
        for pid in pids:  # a failed test must not leave daemons behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert devnet.returncode == 0
    assert pids and not [p for p in pids if pid_alive(p)]
    assert not (home / "devnet.json").exists()
