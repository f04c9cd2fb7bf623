"""The client side of payments, over a real network and a real FUSE mount: ``fincryptfs status`` shows the
prepaid account (balance, burn rate, time left, deposit address) and warns when uploads are refused; an upload
refused with 402 stays pending with a clear error, the file stays readable, and a deposit lets it go through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from netfixtures import start_network

T = TypeVar("T")

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                                  reason="needs /dev/fuse and root")]


def _run(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIATORD_", "FINCRYPT_"))}
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env=env)
    assert not check or done.returncode == 0, f"{module} {args}: {done.stdout}\n{done.stderr}"
    return done


def _status(env_file: Path) -> dict[str, Any]:
    """``fincryptfs status --json``: a JSON document, so its values are typed Any."""
    return dict(json.loads(_run("fincryptfs.cli", "status", "--json", "--env-file", str(env_file)).stdout))


async def _until(check: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await trio.to_thread.run_sync(check)
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        await trio.sleep(0.3)


async def test_status_shows_the_account_and_a_refused_upload_waits_for_a_deposit(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount: subprocess.Popen[bytes] | None = None
    try:
        async with trio.open_nursery() as nursery:
            net = await start_network(tmp_path, nursery, nodes=6, MEDIATORD_BILLING_PERIOD="1",
                                      MEDIATORD_GRACE_PERIOD="1", MEDIATORD_DEPOSIT_SCAN_INTERVAL="0.2",
                                      MEDIATORD_DEPOSIT_CONFIRMATIONS="1", MEDIATORD_PRICING="fixed:1000000000")
            env_file = tmp_path / "client.env"
            env_file.write_text(f"FINCRYPT_DATA_DIR={tmp_path / 'data'}\nFINCRYPT_CACHE_DIR={tmp_path / 'cache'}\n"
                                f"FINCRYPT_KEY_FILE={tmp_path / 'master.key'}\nFINCRYPT_PUBLISH_DELAY=0.2\n")
            await trio.to_thread.run_sync(lambda: _run("fincryptfs.cli", "init", "--env-file", str(env_file),
                                                       "--mediator", net.mediator_url, "--no-passphrase"))
            with open(tmp_path / "mount.log", "ab") as log:
                mount = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "mount", str(mnt), "--env-file",
                                          str(env_file)], stdout=log, stderr=log)
            await _until(lambda: os.path.ismount(mnt), 30, "mounted")

            # an unfunded account stores a file; the next charge finds nothing and the grace period is 1 s
            await trio.to_thread.run_sync((mnt / "first.bin").write_bytes, os.urandom(50_000))
            await trio.to_thread.run_sync(lambda: _run("fincryptfs.cli", "flush", "--env-file", str(env_file)))
            account = await _until(lambda: (_status(env_file)["account"] or {}).get("uploads_refused")
                                   and _status(env_file)["account"], 20, "uploads refused")
            assert isinstance(account, dict)
            address = account["deposit_address"]
            assert str(address).startswith("blt1") and account["balance_msat"] == 0
            assert account["burn_rate_msat_per_hour"] > 0 and account["time_left_seconds"] == 0
            assert account["low_balance"] is True
            text = (await trio.to_thread.run_sync(
                lambda: _run("fincryptfs.cli", "status", "--env-file", str(env_file)))).stdout
            assert f"deposit address (bitcoinlib_test): {address}" in text
            assert "WARNING: prepaid balance exhausted" in text and "burn rate" in text

            # a refused upload: pending, with the mediator's reason; nothing lost
            second = os.urandom(70_000)
            await trio.to_thread.run_sync((mnt / "second.bin").write_bytes, second)
            errors = await _until(lambda: _status(env_file)["upload_errors"], 20, "an upload error")
            assert isinstance(errors, list) and errors[0]["path"].endswith("second.bin")
            assert f"prepaid balance exhausted: deposit to {address}" in errors[0]["error"]
            report = await trio.to_thread.run_sync(_status, env_file)
            assert report["pending_uploads"] == 1 and report["failed_uploads"] == []
            assert {"pending_uploads", "files", "account"} <= set(report)
            assert await trio.to_thread.run_sync((mnt / "second.bin").read_bytes) == second

            # a deposit ends it: the upload goes through on its next retry
            data_dir = net.mediator_settings.data_dir
            fund_env = tmp_path / "fund.env"
            fund_env.write_text(f"MEDIATORD_DATA_DIR={data_dir}\nMEDIATORD_DEPOSIT_CONFIRMATIONS=1\n")
            import sqlite3

            with sqlite3.connect(data_dir / "mediator.sqlite3") as conn:
                (account_id,) = conn.execute("SELECT account_id FROM account_billing WHERE deposit_address=?",
                                             (address,)).fetchone()
            funded = await trio.to_thread.run_sync(lambda: _run("mediatord.cli", "fund-test-account", "--env-file",
                                                                str(fund_env), account_id, "100000"))
            assert json.loads(funded.stdout)["deposit_address"] == address
            await trio.to_thread.run_sync(lambda: _run("fincryptfs.cli", "flush", "--env-file", str(env_file),
                                                       "--timeout", "60"))
            report = await trio.to_thread.run_sync(_status, env_file)
            assert report["pending_uploads"] == 0 and report["upload_errors"] == []
            assert {f["path"].rsplit("/", 1)[-1]: f["state"] for f in report["files"]} == {
                "first.bin": "stored", "second.bin": "stored"}
            assert report["account"]["balance_msat"] > 0 and not report["account"]["uploads_refused"]
            nursery.cancel_scope.cancel()
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if mount is not None:
            if mount.poll() is None:
                mount.send_signal(signal.SIGTERM)
            try:
                mount.wait(timeout=15)
            except subprocess.TimeoutExpired:
                mount.kill()
                mount.wait()
