"""A whole Fincrypt network on loopback: one mediator, several storage nodes, a client account, a mount.

This is the embedded default that ``make run`` starts and that scripts and end-to-end tests use. Every part
is a real process talking HTTP over 127.0.0.1 with its own folder and SQLite database; nothing is simulated.
Periods are short (audits every 10 s) so audits, repair and payments are visible within a minute.

``run_devnet`` writes ``HOME/devnet.json`` only once everything answers, and on SIGINT/SIGTERM unmounts and
stops every process it started (SIGTERM, then SIGKILL after a grace period) — by PID, never by name.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from .core.crypto import account_signing_key, decode_key_file, encode_key_file, new_master_key, recovery_phrase
from .core.errors import FincryptError
from .core.identity import SigningKey
from .mediator_client import MediatorClient
from .run_daemon import PARENT_FD_ENV
from .secretfile import write_secret_file

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
# Test coins are free, so the devnet prices storage high enough that credits and batched payouts show within
# a minute or two of copying a few hundred MiB in: 0.01 test-BTC per GiB-hour asked by the cheapest node.
DEVNET_FUNDING_SAT = 100_000_000
DEVNET_NODE_PRICE = 1_000_000_000  # msat per GiB-hour
DEVNET_PAYOUT_THRESHOLD_SAT = 1_000
STOP_GRACE = 10.0


class DevnetError(FincryptError):
    """The local network could not be started; the message says which part failed and where its log is."""


@dataclass
class Child:
    name: str
    process: trio.Process
    log_path: Path
    url: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def free_port() -> int:
    """A port nobody listens on right now (loopback only; a daemon binding it moments later is fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nobody uses right now (for the mediator's DHT socket, which the nodes must know in advance)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def dht_host(index: int) -> str:
    """Each DHT-discovering node on its own loopback address (Linux routes 127/8 to lo), so the DHT's per-IP
    limits see distinct hosts as on the internet."""
    return f"127.0.1.{index + 1}"


def write_env(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)


async def _spawn(name: str, argv: list[str], log_dir: Path, lifeline: int) -> Child:
    """Start a child in its own session, holding the read end ``lifeline`` of the devnet's lifeline pipe: the
    child stops by itself if the devnet dies without stopping it (run_daemon.exit_with_parent)."""
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed when we close
    try:
        process = await trio.lowlevel.open_process(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                                   pass_fds=(lifeline,),
                                                   env={**os.environ, PARENT_FD_ENV: str(lifeline)})
    finally:
        log_file.close()
    return Child(name, process, log_path)


async def _wait_http(child: Child, url: str, client: httpx.AsyncClient, deadline: float) -> dict[str, object]:
    while True:
        if child.process.poll() is not None:
            raise DevnetError(f"{child.name} exited with status {child.process.returncode} during start-up; "
                              f"see {child.log_path}")
        try:
            response = await client.get(url)
            if response.status_code == 200:
                return dict(response.json())
        except httpx.HTTPError:
            pass
        if trio.current_time() > deadline:
            raise DevnetError(f"{child.name} did not answer {url} within {STARTUP_TIMEOUT:.0f} s; "
                              f"see {child.log_path}")
        await trio.sleep(0.1)


async def stop_children(children: list[Child]) -> None:
    """SIGTERM every child, wait up to STOP_GRACE, SIGKILL what is left. Shielded: runs even when cancelled."""
    with trio.CancelScope(shield=True):
        for child in reversed(children):
            if child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            for child in children:
                await child.process.wait()
        for child in children:
            if child.process.returncode is None:
                log.warning("%s did not stop within %.0f s; killing it", child.name, STOP_GRACE)
                child.process.kill()
                await child.process.wait()


def unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)


async def run_devnet(home: Path, *, nodes: int = 6, mount: Path | None = None, audit_period: float = 10.0,
                     node_capacity: str = "2G", ready: trio.Event | None = None) -> None:
    """Start the network, write devnet.json, and keep running until cancelled (SIGINT/SIGTERM at the CLI)."""
    if nodes < 2:
        raise DevnetError("a devnet needs at least 2 storage nodes")
    if mount is not None:  # a folder the mount would refuse fails now, not in the mount's log once all is up
        from .mount import check_mountpoint

        mount = mount.resolve()
        if not mount.exists():
            mount.mkdir(parents=True)
        check_mountpoint(mount)
    home = home.resolve()
    log_dir = home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    (home / "devnet.json").unlink(missing_ok=True)
    python = sys.executable
    children: list[Child] = []
    mounted: Path | None = None
    lifeline, lifeline_end = os.pipe()  # only this process holds lifeline_end: it closes when we die
    try:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            deadline = trio.current_time() + STARTUP_TIMEOUT
            mediator_port = free_port()
            mediator_url = f"http://127.0.0.1:{mediator_port}"
            mediator_dht = f"127.0.0.1:{free_udp_port()}"
            mediator_env = home / "mediator" / "mediatord.env"
            mediator_env.parent.mkdir(parents=True, exist_ok=True)
            write_env(mediator_env, {
                "MEDIATORD_LISTEN": f"127.0.0.1:{mediator_port}",
                "MEDIATORD_PUBLIC_URL": mediator_url,
                "MEDIATORD_DATA_DIR": str(mediator_env.parent / "data"),
                "MEDIATORD_AUDIT_PERIOD": str(audit_period),
                "MEDIATORD_NODE_OFFLINE_AFTER": str(max(30.0, 6 * audit_period)),
                "MEDIATORD_BILLING_PERIOD": str(max(5.0, audit_period)),
                "MEDIATORD_PAYOUT_THRESHOLD": str(DEVNET_PAYOUT_THRESHOLD_SAT),
                "MEDIATORD_DEPOSIT_SCAN_INTERVAL": "2",
                "MEDIATORD_DHT_LISTEN": mediator_dht,
            })
            payout_addresses = await _payout_addresses(python, mediator_env, nodes, log_dir)
            mediator = await _spawn("mediatord", [python, "-m", "mediatord.cli", "--env-file", str(mediator_env)],
                                    log_dir, lifeline)
            children.append(mediator)
            mediator.url = mediator_url
            await _wait_http(mediator, mediator_url + "/health", client, deadline)

            for i in range(nodes):
                port = free_port()
                node_dir = home / f"node-{i}"
                share_dir = node_dir / "shares"
                env_path = node_dir / "storaged.env"
                node_dir.mkdir(parents=True, exist_ok=True)
                # odd nodes are given no mediator: they find it through the DHT, so discovery runs end to end
                via_dht = i % 2 == 1
                if via_dht:
                    mediators = {"STORAGED_DHT_LISTEN": f"{dht_host(i)}:0", "STORAGED_DHT_BOOTSTRAP": mediator_dht}
                else:
                    mediators = {"STORAGED_MEDIATORS": mediator_url}
                write_env(env_path, {
                    "STORAGED_LISTEN": f"127.0.0.1:{port}",
                    "STORAGED_PUBLIC_URL": f"http://127.0.0.1:{port}",
                    "STORAGED_DATA_DIR": str(node_dir / "data"),
                    "STORAGED_SHARE_DIRS": f"{share_dir}:{node_capacity}",
                    "STORAGED_RESERVE_BYTES": "64M",
                    "STORAGED_PRICE": str(DEVNET_NODE_PRICE + DEVNET_NODE_PRICE // 20 * i),
                    "STORAGED_PAYOUT_ADDRESS": payout_addresses[i],
                    **mediators,
                    "STORAGED_ANNOUNCE_INTERVAL": "5",
                    "STORAGED_OPERATOR": f"devnet-operator-{i}",
                })
                child = await _spawn(f"storaged-{i}", [python, "-m", "storaged.cli", "--env-file", str(env_path)],
                                     log_dir, lifeline)
                child.url = f"http://127.0.0.1:{port}"
                child.extra["share_dirs"] = [str(share_dir)]
                child.extra["discovery"] = "dht" if via_dht else "configured"
                children.append(child)
            node_ids: dict[str, str] = {}
            for child in children[1:]:
                assert child.url is not None
                health = await _wait_http(child, child.url + "/health", client, deadline)
                node_ids[child.url] = str(health.get("node_id", ""))
            while True:
                listing = (await client.get(mediator_url + "/v1/nodes")).json()
                online = [n for n in listing.get("nodes", []) if n.get("state") == "online"]
                if len(online) >= nodes:
                    break
                if trio.current_time() > deadline:
                    raise DevnetError(f"only {len(online)} of {nodes} storage nodes registered with the "
                                      f"mediator; see the logs in {log_dir}")
                await trio.sleep(0.2)

            client_env, account_key = _make_client(home, mediator_url)
            account_id = account_key.id
            await _fund_account(python, mediator_env, account_id, log_dir)
            await _wait_funded(mediator_url, account_key, client, deadline)
            if mount is not None:
                child = await _spawn("fincryptfs-mount", [python, "-m", "fincryptfs.cli", "mount", str(mount),
                                                          "--env-file", str(client_env)], log_dir, lifeline)
                children.append(child)
                while not os.path.ismount(mount):
                    if child.process.poll() is not None:
                        raise DevnetError(f"the mount exited with status {child.process.returncode}; "
                                          f"see {child.log_path}")
                    if trio.current_time() > deadline:
                        raise DevnetError(f"{mount} was not mounted within {STARTUP_TIMEOUT:.0f} s; "
                                          f"see {child.log_path}")
                    await trio.sleep(0.1)
                mounted = mount

            info = {
                "mediator": {"url": mediator_url, "pid": mediator.process.pid, "dht": mediator_dht},
                "nodes": [{"id": node_ids[c.url or ""], "url": c.url, "pid": c.process.pid,
                           "share_dirs": c.extra["share_dirs"], "discovery": c.extra["discovery"]}
                          for c in children[1:nodes + 1]],
                "client_env": str(client_env),
                "mount": str(mounted) if mounted else None,
                "mount_pid": children[-1].process.pid if mounted else None,
                "account_id": account_id,
                "logs": str(log_dir),
            }
            tmp = home / "devnet.json.tmp"
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            tmp.rename(home / "devnet.json")
            if ready is not None:
                ready.set()
            while True:
                for child in children:
                    if child.process.poll() is not None:
                        log.warning("%s exited with status %s; see %s", child.name, child.process.returncode,
                                    child.log_path)
                        children.remove(child)
                        break
                await trio.sleep(1.0)
    finally:
        if mounted is not None:
            unmount(mounted)
        await stop_children(children)
        (home / "devnet.json").unlink(missing_ok=True)
        os.close(lifeline)
        os.close(lifeline_end)




async def _payout_addresses(python: str, mediator_env: Path, count: int, log_dir: Path) -> list[str]:
    """A payout address on the test network for each node, so that the devnet pays its nodes (run before the
    mediator starts: both would set up bitcoinlib's folder in the mediator's data dir)."""
    with open(log_dir / "funding.log", "ab") as err:
        result = await trio.run_process(
            [python, "-m", "mediatord.cli", "test-addresses", "--env-file", str(mediator_env), str(count)],
            capture_stdout=True, stderr=err, check=False)
    addresses = result.stdout.decode().split()
    if result.returncode != 0 or len(addresses) != count:
        raise DevnetError(f"making the nodes' payout addresses failed; see {log_dir / 'funding.log'}")
    return addresses


async def _fund_account(python: str, mediator_env: Path, account_id: str, log_dir: Path) -> None:
    """Give the devnet account a confirmed deposit on bitcoinlib's offline test network."""
    with open(log_dir / "funding.log", "ab") as out:
        result = await trio.run_process(
            [python, "-m", "mediatord.cli", "fund-test-account", "--env-file", str(mediator_env), account_id,
             str(DEVNET_FUNDING_SAT)], stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise DevnetError(f"funding the devnet account failed; see {log_dir / 'funding.log'}")


async def _wait_funded(mediator_url: str, account_key: SigningKey, client: httpx.AsyncClient,
                       deadline: float) -> None:
    """Until the mediator has credited the deposit (its next scan): the network is announced ready with a
    funded account, so a first ``fincryptfs status`` does not warn of an empty balance."""
    account = MediatorClient(url=mediator_url, account_key=account_key, http=client)
    while (await account.account()).get("balance_msat", 0) <= 0:
        if trio.current_time() > deadline:
            raise DevnetError("the mediator did not credit the devnet account's deposit in time; see its log")
        await trio.sleep(0.2)


def _make_client(home: Path, mediator_url: str) -> tuple[Path, SigningKey]:
    """The devnet client account: an unprotected key file (0600), its recovery phrase (0600), client.env."""
    client_dir = home / "client"
    client_dir.mkdir(parents=True, exist_ok=True)
    client_dir.chmod(0o700)
    key_file = client_dir / "master.key"
    if key_file.exists():
        master = decode_key_file(key_file.read_bytes(), None)
    else:
        master = new_master_key()
        # 0600 from the first byte: written, then chmod-ed, the phrase (the master key itself) was readable by
        # anyone for a moment in HOME, which is not private
        write_secret_file(key_file, encode_key_file(master, None))
        write_secret_file(home / "recovery-phrase.txt", (recovery_phrase(master) + "\n").encode())
    client_env = home / "client.env"
    write_env(client_env, {
        "FINCRYPT_MEDIATOR_URL": mediator_url,
        "FINCRYPT_DATA_DIR": str(client_dir / "data"),
        "FINCRYPT_KEY_FILE": str(key_file),
        "FINCRYPT_CACHE_DIR": str(client_dir / "cache"),
    })
    return client_env, account_signing_key(master)


def wait_for_devnet(home: Path, timeout: float = STARTUP_TIMEOUT) -> dict[str, object]:
    """For scripts and tests: block until ``HOME/devnet.json`` exists and return it."""
    path = home / "devnet.json"
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise DevnetError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.1)
    return dict(json.loads(path.read_text()))
