"""The whole daemon: its own timers drive audits on real nodes, and the command line starts, reports and stops.

Timers run on the real clock with a 0.5 s audit period (trio's MockClock autojump would fire while real
sockets wait, making every HTTP call look instantly timed out), which keeps this under a few seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
from mediator_net import make_object, start_node, upload

from fincryptfs import rpc
from fincryptfs.core.errors import ConfigError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.settings import MediatorSettings
from mediatord.daemon import serve
from mediatord.escrow import TEST_NETWORK, Escrow


async def test_daemon_audits_on_its_own(tmp_path: Path, nursery: trio.Nursery) -> None:
    settings = MediatorSettings.from_env({"MEDIATORD_LISTEN": "127.0.0.1:0",
                                          "MEDIATORD_DATA_DIR": str(tmp_path / "m"),
                                          "MEDIATORD_AUDIT_PERIOD": "0.5"}, home=tmp_path)
    url = (await nursery.start(serve, settings)).rstrip("/")
    for i in range(4):
        await start_node(nursery, tmp_path, url, i)
    async with rpc.new_client() as client:
        with trio.fail_after(20):
            while (await client.get(f"{url}/health")).json()["nodes_online"] < 4:
                await trio.sleep(0.05)
            await upload(client, url, SigningKey.generate(), make_object())
            while True:
                status = (await client.get(f"{url}/v1/status")).json()
                if status["audits_passed"] >= 4:
                    break
                await trio.sleep(0.1)
        assert status["audits_failed"] == 0 and status["shares_healthy"] == 4
        # the CLI's status command reads the same numbers
        env_file = tmp_path / "m.env"
        env_file.write_text(f"MEDIATORD_PUBLIC_URL={url}\nMEDIATORD_DATA_DIR={tmp_path / 'm'}\n")
        result = await trio.run_process([sys.executable, "-m", "mediatord.cli", "--env-file", str(env_file),
                                         "status", "--json"], capture_stdout=True, check=False,
                                        env={k: v for k, v in os.environ.items() if not k.startswith("MEDIATORD_")})
        assert result.returncode == 0, result.stdout
        assert f'"mediator_id": "{status["mediator_id"]}"' in result.stdout.decode()
    nursery.cancel_scope.cancel()


def test_cli_runs_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env_file = tmp_path / "m.env"
    env_file.write_text(f"MEDIATORD_LISTEN=127.0.0.1:0\nMEDIATORD_DATA_DIR={tmp_path / 'm'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIATORD_")}
    proc = subprocess.Popen([sys.executable, "-m", "mediatord.cli", "--env-file", str(env_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("mediatord listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert httpx.get(f"{url}/health", trust_env=False).json()["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "m" / "identity.key").stat().st_mode & 0o777 == 0o600
    bad = tmp_path / "bad.env"
    bad.write_text("MEDIATORD_AUDIT_PERIODE=5\n")
    result = subprocess.run([sys.executable, "-m", "mediatord.cli", "--env-file", str(bad)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "MEDIATORD_AUDIT_PERIODE" in result.stderr


@pytest.mark.parametrize("name,value,said", [
    ("MEDIATORD_PRICING", "fixed", "MEDIATORD_PRICING='fixed': fixed pricing needs a price"),
    ("MEDIATORD_ACCEPT_NODES", "bogus:1", "MEDIATORD_ACCEPT_NODES='bogus:1' is unknown"),
    ("MEDIATORD_DATA_DIR", "{file}", "cannot be created (a file is in the way): fix MEDIATORD_DATA_DIR"),
    ("MEDIATORD_LISTEN", "{taken}", "cannot listen on {taken}: Address already in use")],
    ids=["pricing", "acceptance", "data folder", "port"])
def test_what_stops_the_start_is_one_line_naming_it(tmp_path: Path, name: str, value: str, said: str) -> None:
    """Settings only the starting daemon can judge (policies, folders, the port) end like any bad setting."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        where = {"file": in_the_way, "taken": f"127.0.0.1:{busy.getsockname()[1]}"}
        values = {"MEDIATORD_LISTEN": "127.0.0.1:0", "MEDIATORD_DATA_DIR": str(tmp_path / "m"),
                  name: value.format(**where)}
        env_file = tmp_path / "m.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIATORD_")}
        result = subprocess.run([sys.executable, "-m", "mediatord.cli", "--env-file", str(env_file)], env=env,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("mediatord: configuration error: ") and said.format(**where) in last, result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr, result.stderr


async def test_a_failing_pass_is_logged_and_the_loop_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error in one audit round must not end the daemon; cancelling it still stops the loop."""
    from mediatord import daemon, upkeep

    calls: list[str] = []

    async def audit_round(*_args: object) -> dict[str, object]:
        calls.append("audit")
        if len(calls) == 1:
            raise RuntimeError("one bad pass")
        return {}

    async def repair_pass(*_args: object) -> dict[str, str]:
        calls.append("repair")
        return {}

    monkeypatch.setattr(upkeep, "audit_round", audit_round)
    monkeypatch.setattr(upkeep, "repair_pass", repair_pass)
    service: Any = SimpleNamespace(settings=SimpleNamespace(audit_period=0.01),  # only what the loop reads
                                   db=SimpleNamespace(last_round_started=lambda: None))
    no_client: Any = None
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.audit_and_repair_loop, service, no_client)
            while calls.count("audit") < 3:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught, calls
    assert calls[:2] == ["audit", "repair"]  # the repair pass still ran after the failed round
    assert "audit round failed" in caplog.text and "one bad pass" in caplog.text


def _settings(data_dir: Path, **env: str) -> MediatorSettings:
    return MediatorSettings.from_env({"MEDIATORD_LISTEN": "127.0.0.1:0", "MEDIATORD_DATA_DIR": str(data_dir), **env},
                                     home=data_dir)


async def test_a_second_mediator_on_a_running_ones_data_folder_is_refused(tmp_path: Path,
                                                                           nursery: trio.Nursery) -> None:
    """Both used to run: two auditors, two billers and two payers over one ledger and one wallet."""
    url = await nursery.start(serve, _settings(tmp_path / "m"))
    with trio.fail_after(10), pytest.raises(ConfigError, match=f"another mediatord is running with the data "
                                                              f"folder {tmp_path / 'm'}"):
        await serve(_settings(tmp_path / "m"))  # ran until cancelled
    async with httpx.AsyncClient(trust_env=False) as client:  # the first one goes on
        assert (await client.get(f"{url}/health")).json()["status"] == "ok"
    nursery.cancel_scope.cancel()


async def test_a_wallet_on_another_network_stops_the_start(tmp_path: Path) -> None:
    """The wallet was opened at the first payments pass: the mediator started, took uploads, and only warned,
    once a minute, that it could not open its wallet."""
    data_dir = tmp_path / "m"
    data_dir.mkdir()
    Escrow(data_dir, TEST_NETWORK).close()  # a wallet of bitcoinlib's test network
    with trio.fail_after(10), pytest.raises(ConfigError, match="is on bitcoinlib_test, but MEDIATORD_BITCOIN_"
                                                              "NETWORK=testnet; use a new data dir"):
        await serve(_settings(data_dir, MEDIATORD_BITCOIN_NETWORK="testnet"))


async def test_the_data_folder_is_kept_to_its_user(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A folder the operator made beforehand (mkdir: 0755) was left open to every local user, and bitcoinlib
    writes the escrow wallet's database, private keys included, readable by all."""
    data_dir = tmp_path / "m"
    data_dir.mkdir(mode=0o755)
    await nursery.start(serve, _settings(data_dir))
    assert data_dir.stat().st_mode & 0o777 == 0o700
    nursery.cancel_scope.cancel()


async def test_a_client_rule_for_nodes_only_stops_the_start(tmp_path: Path) -> None:
    """Clients have no reputation: min_reputation:X for clients admitted everybody, without a word."""
    with trio.fail_after(10), pytest.raises(ConfigError, match="MEDIATORD_ACCEPT_CLIENTS=min_reputation:0.5: "
                                                              "min_reputation applies to storage nodes only"):
        await serve(_settings(tmp_path / "m", MEDIATORD_ACCEPT_CLIENTS="min_reputation:0.5"))


def test_status_asks_an_ipv6_listen_address(tmp_path: Path) -> None:
    """``mediatord status`` wrote http://::1:PORT, which is no URL: it failed with a traceback."""
    with socket.socket(socket.AF_INET6) as free:
        free.bind(("::1", 0))
        port = free.getsockname()[1]
    env_file = tmp_path / "m.env"
    env_file.write_text(f"MEDIATORD_LISTEN=[::1]:{port}\nMEDIATORD_DATA_DIR={tmp_path / 'm'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIATORD_")}
    result = subprocess.run([sys.executable, "-m", "mediatord.cli", "--env-file", str(env_file), "status"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot reach the mediator at http://[::1]:{port}" in result.stderr


async def test_a_restart_keeps_the_audit_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  nursery: trio.Nursery) -> None:
    """Each start waited a whole audit period before its first round: a mediator restarted more often than its
    period (deployments, a crash loop) never audited a node, and so never credited one. The first round after a
    restart now comes one period after the last one began."""
    from mediatord import daemon, upkeep

    rounds: list[float] = []

    async def audit_round(*_args: object) -> dict[str, object]:
        rounds.append(time.time())
        return {}

    async def repair_pass(*_args: object) -> dict[str, str]:
        return {}

    monkeypatch.setattr(upkeep, "audit_round", audit_round)
    monkeypatch.setattr(upkeep, "repair_pass", repair_pass)
    settings = _settings(tmp_path / "m", MEDIATORD_AUDIT_PERIOD="60")
    service = daemon.open_service(settings)
    try:
        service.db.start_round(service.new_round_id(), "a" * 64, b"n" * 32, time.time() - 59.5)  # before the stop
        no_client: Any = None
        with trio.move_on_after(10):
            nursery.start_soon(daemon.audit_and_repair_loop, service, no_client)
            while not rounds:
                await trio.sleep(0.05)
        assert rounds, "no audit round within 10 s of a restart, though the last began 60 s ago"
        nursery.cancel_scope.cancel()
    finally:
        service.payments.close()
        service.db.close()


@pytest.mark.parametrize("last,now,delay", [(None, 100.0, 60.0), (100.0, 130.0, 30.0), (100.0, 500.0, 0.0),
                                            (100.0, 40.0, 60.0)])  # the clock went back: at most a period
def test_first_round_delay(last: float | None, now: float, delay: float) -> None:
    from mediatord.daemon import first_round_delay

    assert first_round_delay(last, 60.0, now) == delay


def test_a_mediator_never_takes_a_new_identity_beside_its_database(tmp_path: Path) -> None:
    """With identity.key lost (a restore from a backup without it) the mediator made a new key and went on
    under a new id beside the old database: every node refuses its challenges and releases, and every share
    it placed is orphaned. A key from another mediator's folder was taken just as silently."""
    from mediatord import daemon

    settings = _settings(tmp_path / "m")
    service = daemon.open_service(settings)
    first_id = service.id
    service.db.ensure_account("c" * 64, b"k" * 32, time.time())
    service.payments.close()
    service.db.close()
    key_file = tmp_path / "m" / daemon.IDENTITY_FILE
    saved = key_file.read_bytes()

    key_file.unlink()
    with pytest.raises(ConfigError, match=f"identity file {key_file} is missing, but its database .* belongs to "
                                          f"mediator {first_id}: restore identity.key"):
        daemon.open_service(settings)
    assert not key_file.exists()

    other = daemon.open_service(_settings(tmp_path / "other"))  # another mediator's key put in its place
    other.payments.close()
    other.db.close()
    key_file.write_bytes((tmp_path / "other" / daemon.IDENTITY_FILE).read_bytes())
    with pytest.raises(ConfigError, match=f"is mediator {other.id}, but the database .* belongs to mediator "
                                          f"{first_id}"):
        daemon.open_service(settings)

    key_file.write_bytes(saved)  # the right key back: it starts as itself
    again = daemon.open_service(settings)
    assert again.id == first_id
    again.payments.close()
    again.db.close()


def test_a_database_from_before_the_owner_was_recorded_is_protected_too(tmp_path: Path) -> None:
    """A database with accounts, nodes, objects or postings but no recorded owner is refused a new key too."""
    from mediatord import daemon
    from mediatord.db import MediatorDB

    (tmp_path / "m").mkdir()
    db = MediatorDB(tmp_path / "m" / daemon.DATABASE_FILE)
    db.ensure_account("c" * 64, b"k" * 32, time.time())
    db.close()
    with pytest.raises(ConfigError, match="belongs to a mediator that has run: restore identity.key"):
        daemon.open_service(_settings(tmp_path / "m"))
