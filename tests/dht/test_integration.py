"""Discovery wired into the daemons: real mediatord and storaged in-process, real DHT sockets on loopback.

Each DHT node binds its own 127.x address (Linux routes 127/8 to lo) so the DHT's per-IP limits see distinct
hosts. The devnet test runs ``fincryptfs devnet`` as a process, as ``make run`` does.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from netfixtures import start_network

from fincryptfs import rpc
from fincryptfs.core.crypto import new_master_key, recovery_phrase
from fincryptfs.core.identity import SigningKey
from fincryptfs.devnet import wait_for_devnet
from fincryptfs.dht.node import DhtParams, run_dht
from fincryptfs.discovery import DiscoveryError, discover_mediator, find_verified_mediators, verify_mediator

FAST = DhtParams(query_timeout=1.0, lookup_timeout=5.0)


def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _mediator_info(url: str) -> dict[str, str]:
    async with httpx.AsyncClient(trust_env=False) as client:
        return dict((await client.get(f"{url}/v1/info")).json())


async def test_storage_node_without_mediators_finds_and_registers_through_the_dht(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    dht = f"127.0.0.1:{free_udp_port('127.0.0.1')}"
    dht_node_env = {"STORAGED_MEDIATORS": "", "STORAGED_DHT_LISTEN": "127.0.2.1:0", "STORAGED_DHT_BOOTSTRAP": dht}
    # node 0 is configured as today; node 1 knows only the mediator's DHT address. start_network returns once
    # the mediator lists both as online, so node 1 must have found it and announced itself.
    net = await start_network(tmp_path, nursery, nodes=2, MEDIATORD_DHT_LISTEN=dht,
                              MEDIATORD_DHT_REGION="eu", node_env={1: dht_node_env})
    assert net.nodes[1].settings.mediators == ()
    async with httpx.AsyncClient(trust_env=False) as client:
        listed = (await client.get(f"{net.mediator_url}/v1/nodes")).json()["nodes"]
    assert {n["node_id"] for n in listed if n["state"] == "online"} == {n.node_id for n in net.nodes}
    # the node trusts the mediator it found: the identity the mediator reports
    info = await _mediator_info(net.mediator_url)
    from storaged.db import NodeDatabase

    db = NodeDatabase(net.nodes[1].settings.data_dir / "storaged.sqlite3")
    try:
        trusted = [(m.mediator_id, m.url) for m in db.trusted_mediators()]
    finally:
        db.close()
    assert trusted == [(info["mediator_id"], net.mediator_url)]


async def test_client_discovers_the_mediator_and_refuses_forged_records(tmp_path: Path,
                                                                       nursery: trio.Nursery) -> None:
    dht_port = free_udp_port("127.0.0.1")
    net = await start_network(tmp_path, nursery, nodes=0, MEDIATORD_DHT_LISTEN=f"127.0.0.1:{dht_port}")
    info = await _mediator_info(net.mediator_url)

    found = await discover_mediator([("127.0.0.1", dht_port)], params=FAST)
    assert (found.url, found.mediator_id) == (net.mediator_url, info["mediator_id"])
    assert found.public_key.to_text() == info["public_key"]

    # A forger joins and announces a record, signed with its own key, naming the real mediator's URL: the
    # server there identifies as someone else, so the record is refused wherever it is found.
    forger = await nursery.start(functools.partial(run_dht, params=FAST), SigningKey.generate(),
                                 ("127.0.2.9", 0), [("127.0.0.1", dht_port)])
    assert await forger.announce_mediator(net.mediator_url) >= 1
    async with rpc.new_client() as http:
        records = await forger.find_mediators()
        assert len(records) == 2
        forged = next(r for r in records if r.id != info["mediator_id"])
        with pytest.raises(DiscoveryError, match="refusing"):
            await verify_mediator(http, forged)
        verified = await find_verified_mediators(forger, http)
    assert [m.mediator_id for m in verified] == [info["mediator_id"]]

    # a DHT holding only a forged record yields no mediator at all
    lonely = await nursery.start(functools.partial(run_dht, params=FAST), SigningKey.generate(),
                                 ("127.0.2.10", 0), [])
    await lonely.announce_mediator(net.mediator_url)
    with pytest.raises(DiscoveryError, match="no mediator whose identity checks out"):
        await discover_mediator([lonely.address], params=FAST)
    # and nothing answering at all is a different, actionable error
    with pytest.raises(DiscoveryError, match="no DHT peer answered"):
        await discover_mediator([("127.0.2.11", free_udp_port("127.0.2.11"))], params=FAST, timeout=5)


async def test_storage_node_with_unreachable_dht_keeps_serving(tmp_path: Path, nursery: trio.Nursery) -> None:
    dead = f"127.0.2.20:{free_udp_port('127.0.2.20')}"
    net = await start_network(tmp_path, nursery, nodes=1, node_env={0: {
        "STORAGED_DHT_LISTEN": "127.0.2.21:0", "STORAGED_DHT_BOOTSTRAP": dead}})
    await trio.sleep(2.5)  # a failed bootstrap (2 s query timeout) and a retry have happened by now
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"{net.nodes[0].url}/health")).status_code == 200
    assert net.nodes[0].running
    await net.wait_listed(1)  # the configured mediator is still announced to


async def test_client_init_and_restore_write_the_discovered_mediator(tmp_path: Path, nursery: trio.Nursery) -> None:
    """``fincryptfs init`` with no mediator but a bootstrap peer finds one and writes it to the settings."""
    dht_port = free_udp_port("127.0.0.1")
    net = await start_network(tmp_path, nursery, nodes=0, MEDIATORD_DHT_LISTEN=f"127.0.0.1:{dht_port}")
    env_file = tmp_path / "client.env"
    env_file.write_text(f"FINCRYPT_DHT_BOOTSTRAP=127.0.0.1:{dht_port}\nFINCRYPT_DATA_DIR={tmp_path / 'client'}\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FINCRYPT_")}
    result = await trio.run_process(
        [sys.executable, "-m", "fincryptfs.cli", "init", "--env-file", str(env_file), "--no-passphrase"],
        env=clean, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert f"Found mediator {net.mediator_url}" in result.stdout.decode()
    assert f"FINCRYPT_MEDIATOR_URL={net.mediator_url}\n" in env_file.read_text()
    assert (tmp_path / "client" / "master.key").exists()

    # restore on a new machine: --mediator is optional when a bootstrap peer is set
    phrase_file = tmp_path / "phrase.txt"
    phrase_file.write_text(recovery_phrase(new_master_key()) + "\n")
    env2 = tmp_path / "client2.env"
    env2.write_text(f"FINCRYPT_DHT_BOOTSTRAP=127.0.0.1:{dht_port}\nFINCRYPT_DATA_DIR={tmp_path / 'client2'}\n")
    result = await trio.run_process(
        [sys.executable, "-m", "fincryptfs.cli", "restore", "--env-file", str(env2), "--no-passphrase",
         "--phrase-file", str(phrase_file)], env=clean, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert f"FINCRYPT_MEDIATOR_URL={net.mediator_url}\n" in env2.read_text()


@pytest.mark.e2e
def test_devnet_half_the_nodes_find_the_mediator_through_the_dht(tmp_path: Path) -> None:
    home = tmp_path / "devnet"
    log = open(tmp_path / "devnet.log", "wb")  # noqa: SIM115 - closed in finally
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "devnet", "--home", str(home), "--nodes", "4"],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pids: list[int] = []
    try:
        info = wait_for_devnet(home, timeout=60)
        startup = time.monotonic() - started
        mediator = info["mediator"]
        nodes = info["nodes"]
        assert isinstance(mediator, dict) and isinstance(nodes, list)
        pids = [int(mediator["pid"])] + [int(n["pid"]) for n in nodes]
        assert sorted(n["discovery"] for n in nodes) == ["configured", "configured", "dht", "dht"]
        listing = httpx.get(f"{mediator['url']}/v1/nodes", trust_env=False).json()["nodes"]
        online = {n["node_id"] for n in listing if n["state"] == "online"}
        assert online == {n["id"] for n in nodes}
        assert startup < 30, f"devnet took {startup:.1f} s to start"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
        assert not (home / "devnet.json").exists()
        for pid in pids:
            assert not _alive(pid), f"devnet child {pid} survived SIGTERM"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
