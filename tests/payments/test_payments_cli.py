"""`mediatord ledger`, `payouts` and `fund-test-account` as subprocesses over a real data dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fincryptfs.core.identity import SigningKey


def run(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIATORD_")}
    return subprocess.run([sys.executable, "-m", "mediatord.cli", *args, "--env-file", str(env_file)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_fund_then_ledger_and_payouts(tmp_path: Path) -> None:
    env_file = tmp_path / "m.env"
    env_file.write_text(f"MEDIATORD_DATA_DIR={tmp_path / 'data'}\nMEDIATORD_DEPOSIT_CONFIRMATIONS=1\n")
    account = SigningKey.generate().id
    funded = run(env_file, "fund-test-account", account, "25000")
    assert funded.returncode == 0, funded.stderr
    answer = json.loads(funded.stdout)
    assert answer["deposit_address"].startswith("blt1") and answer["confirmations"] == 1

    ledger = run(env_file, "ledger", "--json")
    assert ledger.returncode == 0, ledger.stderr
    report = json.loads(ledger.stdout)
    assert report["invariant_holds"] and report["deposits"] == 0  # credited by the daemon's next pass
    assert {"deposits", "client_balances", "node_balances", "fees", "payouts", "refunds"} <= set(report)

    payouts = run(env_file, "payouts", "--json")
    assert payouts.returncode == 0 and json.loads(payouts.stdout)["batches"] == []

    bad = run(env_file, "fund-test-account", "not-an-id", "5")
    assert bad.returncode != 0 and "64" in bad.stderr
    negative = run(env_file, "fund-test-account", account, "-5")
    assert negative.returncode == 2 and "positive" in negative.stderr
    # a deposit that can never reach its confirmations would stay pending forever, without a word
    unconfirmable = run(env_file, "fund-test-account", account, "5", "--confirmations", "-1")
    assert unconfirmable.returncode == 2 and "--confirmations" in unconfirmable.stderr
    for command in ("ledger", "payouts"):  # SQLite reads LIMIT -1 as "no limit": the whole ledger was printed
        unlimited = run(env_file, command, "--limit", "-1")
        assert unlimited.returncode == 2 and "number of rows from 1" in unlimited.stderr, unlimited.stderr


def test_fund_refused_off_the_test_network(tmp_path: Path) -> None:
    env_file = tmp_path / "m.env"
    env_file.write_text(f"MEDIATORD_DATA_DIR={tmp_path / 'data'}\nMEDIATORD_BITCOIN_NETWORK=testnet\n")
    refused = run(env_file, "fund-test-account", SigningKey.generate().id, "1000")
    assert refused.returncode == 2 and "only bitcoinlib_test" in refused.stderr
