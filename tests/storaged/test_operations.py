"""Operating a node: the CLI's id/status, announcing to a mediator that is down, signed-but-hostile bodies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import trio
from storaged_peers import MediatorPeer, RunningNode, node_settings, running_node, store


def run_cli(*args: str, env_file: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGED_", "FINCRYPT_", "MEDIATORD_"))}
    done = subprocess.run([sys.executable, "-m", "storaged.cli", "--env-file", str(env_file), *args],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_id_and_status(tmp_path: Path) -> None:
    env_file = tmp_path / "node.env"
    env_file.write_text(f"STORAGED_DATA_DIR={tmp_path / 'data'}\nSTORAGED_SHARE_DIRS={tmp_path / 's'}:10G\n"
                        "STORAGED_RESERVE_BYTES=0\n")
    node_id = run_cli("id", env_file=env_file).strip()
    assert len(node_id) == 64 and int(node_id, 16) >= 0
    assert (tmp_path / "data" / "node.key").stat().st_mode & 0o777 == 0o600
    status = json.loads(run_cli("status", "--json", env_file=env_file))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGED_", "FINCRYPT_", "MEDIATORD_"))}
    after = subprocess.run([sys.executable, "-m", "storaged.cli", "status", "--env-file", str(env_file), "--json"],
                           capture_output=True, text=True, env=env, timeout=60, check=False)  # as mediatord takes it
    assert after.returncode == 0 and json.loads(after.stdout) == status, after.stderr
    assert status["node_id"] == node_id and status["shares"] == 0 and status["capacity_bytes"] == 10 << 30
    bad = tmp_path / "bad.env"
    bad.write_text("STORAGED_RESERV_BYTES=1\n")
    done = subprocess.run([sys.executable, "-m", "storaged.cli", "--env-file", str(bad), "id"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "STORAGED_RESERV_BYTES" in done.stderr


async def test_mediator_down_is_retried_and_node_keeps_serving(tmp_path: Path, mediator: MediatorPeer,
                                                               client: httpx.AsyncClient) -> None:
    with trio.socket.socket() as sock:  # a port that refuses connections
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = node_settings(tmp_path, (dead, mediator.url), announce_interval=0.5)
    async with running_node(settings) as node:
        with trio.fail_after(10):
            while node.service.metrics.announce_failures < 2:  # retried with backoff, never crashed
                await trio.sleep(0.05)
        results = await node.service.announce_all(client)
        assert results == {dead: None, mediator.url: mediator.id}
        await store(client, node, mediator, os.urandom(5000))
        assert (await client.get(f"{node.url}/health")).json()["shares"] == 1
        assert "storaged_announce_failures_total" in (await client.get(f"{node.url}/metrics")).text


async def test_signed_hostile_uploads_never_5xx(node: RunningNode, mediator: MediatorPeer,
                                                client: httpx.AsyncClient) -> None:
    """Valid grants with bodies of every wrong shape: always a 4xx, never a kept file."""
    import random
    rng = random.Random(7)
    for _ in range(40):
        data = rng.randbytes(rng.randint(0, 20_000))
        grant = mediator.grant(node.node_id, data)
        body = rng.choice([data[:-1], data + b"\0", rng.randbytes(len(data)), b"", data[::-1]])
        if body == data:
            continue
        response = await client.put(f"{node.url}/v1/shares/{grant.share_id}", content=body,
                                    headers={"fincrypt-grant": mediator.seal(grant)})
        assert 400 <= response.status_code < 500, response.text
    assert (await client.get(f"{node.url}/health")).json()["shares"] == 0


async def test_status_tells_of_missing_shares(tmp_path: Path, mediator: MediatorPeer,
                                              client: httpx.AsyncClient) -> None:
    """``storaged status`` used to count a share whose files are gone as stored, without a word."""
    settings = node_settings(tmp_path, (mediator.url,))
    async with running_node(settings) as node:
        grant, _ = await store(client, node, mediator, os.urandom(30_000))
        record = node.service.db.get_share(grant.share_id)
        assert record is not None
        paths = node.service.store.paths(record.dir, grant.share_id)
        assert paths is not None
        paths.data.unlink()
    async with running_node(settings):  # the start finds it gone
        pass
    env_file = tmp_path / "node.env"
    env_file.write_text(f"STORAGED_DATA_DIR={settings.data_dir}\nSTORAGED_RESERVE_BYTES=0\nSTORAGED_SHARE_DIRS="
                        + ",".join(f"{d.path}:64M" for d in settings.share_dirs) + "\n")
    status = json.loads(run_cli("status", "--json", env_file=env_file))
    assert status["shares_missing"] == 1 and status["shares_corrupt"] == 0 and status["problems"] == []
    text = run_cli("status", env_file=env_file)
    assert "shares_missing: 1" in text and "the mediators repair them on other nodes" in text


def test_status_of_a_data_folder_without_a_node_creates_none(tmp_path: Path) -> None:
    """``storaged status`` with a mistyped STORAGED_DATA_DIR (or run where ./.env is not) created a new identity,
    database and share folder there, and printed that stranger's id and its 0 shares as this node's status."""
    env_file = tmp_path / "node.env"
    env_file.write_text(f"STORAGED_DATA_DIR={tmp_path / 'typo'}\nSTORAGED_SHARE_DIRS={tmp_path / 's'}:10G\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGED_", "FINCRYPT_", "MEDIATORD_"))}
    done = subprocess.run([sys.executable, "-m", "storaged.cli", "--env-file", str(env_file), "status"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 2, done.stdout
    assert f"no storage node has run with STORAGED_DATA_DIR={tmp_path / 'typo'}" in done.stderr
    assert not (tmp_path / "typo").exists() and not (tmp_path / "s").exists()
