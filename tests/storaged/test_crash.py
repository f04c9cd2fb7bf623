"""kill -9 a real storaged process mid-upload, repeatedly: every receipted share survives intact, and nothing torn
or unreceipted is ever served or proven (leftovers are cleaned at start)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from storaged_peers import ACCOUNT, MediatorPeer, start_mediator

from fincryptfs import rpc
from fincryptfs.core.challenge import verify_share_proof
from fincryptfs.core.identity import decode_identity_file
from fincryptfs.core.messages import ProofResponse, UploadGrant

REPO = Path(__file__).resolve().parents[2]


def write_env(tmp_path: Path, mediator_url: str) -> Path:
    env_file = tmp_path / "node.env"
    env_file.write_text("\n".join([
        "STORAGED_LISTEN=127.0.0.1:0",
        f"STORAGED_DATA_DIR={tmp_path / 'data'}",
        f"STORAGED_SHARE_DIRS={tmp_path / 'a'}:1G,{tmp_path / 'b'}:1G",
        "STORAGED_RESERVE_BYTES=0",
        f"STORAGED_MEDIATORS={mediator_url}",
        "STORAGED_ANNOUNCE_INTERVAL=60",
        "STORAGED_MAX_CONCURRENT_UPLOADS=32",
    ]) + "\n")
    return env_file


class NodeProcess:
    """``python -m storaged.cli --env-file F`` as a child process whose log goes to a file."""

    def __init__(self, env_file: Path, log_file: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGED_", "FINCRYPT_", "MEDIATORD_"))}
        self.log_file = log_file
        self.offset = log_file.stat().st_size if log_file.exists() else 0
        with open(log_file, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "storaged.cli", "--env-file", str(env_file)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    async def wait_url(self) -> str:
        with trio.fail_after(30):
            while True:
                text = self.log_file.read_bytes()[self.offset:].decode(errors="replace")
                found = re.search(r"storaged listening on (http://\S+)", text)
                if found:
                    return found.group(1)
                assert self.proc.poll() is None, text[-3000:]
                await trio.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


async def upload_forever(client: httpx.AsyncClient, url: str, node_id: str, mediator: MediatorPeer,
                         attempted: dict[str, tuple[UploadGrant, bytes]], receipted: set[str],
                         rng: random.Random) -> None:
    while True:
        data = rng.randbytes(rng.randint(1, 300_000))
        grant = mediator.grant(node_id, data)
        attempted[grant.share_id] = (grant, data)
        try:
            response = await client.put(f"{url}/v1/shares/{grant.share_id}", content=data,
                                        headers={"fincrypt-grant": mediator.seal(grant)})
        except httpx.HTTPError:
            await trio.sleep(0.01)
            continue
        assert response.status_code == 201, response.text
        receipted.add(grant.share_id)


@pytest.mark.e2e
async def test_kill_9_never_loses_receipted_or_exposes_torn_shares(tmp_path: Path, nursery: trio.Nursery) -> None:
    mediator = await start_mediator(nursery)
    env_file = write_env(tmp_path, mediator.url)
    log_file = tmp_path / "node.log"
    rng = random.Random(1234)
    attempted: dict[str, tuple[UploadGrant, bytes]] = {}
    receipted: set[str] = set()
    node: NodeProcess | None = None
    try:
        async with rpc.new_client() as client:
            for _ in range(5):
                announced = len(mediator.announcements)
                node = NodeProcess(env_file, log_file)
                url = await node.wait_url()
                with trio.fail_after(10):
                    while len(mediator.announcements) == announced:
                        await trio.sleep(0.02)
                node_id = mediator.announcements[-1].node_id
                async with trio.open_nursery() as uploads:
                    for _ in range(8):
                        uploads.start_soon(upload_forever, client, url, node_id, mediator, attempted, receipted,
                                           rng)
                    await trio.sleep(rng.uniform(0.3, 1.2))
                    node.kill()  # SIGKILL at a random moment of the upload storm
                    uploads.cancel_scope.cancel()

            node = NodeProcess(env_file, log_file)
            url = await node.wait_url()
            node_key = decode_identity_file((tmp_path / "data" / "node.key").read_bytes()).public
            assert len(receipted) > 20, "the storm should have stored a fair number of shares"

            # every receipted share is whole; an unreceipted one is either absent or whole, never torn
            for share_id, (_grant, data) in attempted.items():
                target = f"{url}/v1/shares/{share_id}"
                response = await client.get(target, headers=rpc.signed_headers(ACCOUNT, "GET", target, b""))
                if share_id in receipted:
                    assert response.status_code == 200 and response.content == data
                else:
                    assert response.status_code == 404 or response.content == data
            ids = list(attempted)
            challenge = mediator.challenge(node_id, ids)
            answer = await rpc.call(client, "POST", f"{url}/v1/challenges", key=mediator.key,
                                    json=challenge.to_json())
            proofs = ProofResponse.decode(answer.content, node_key, max_bytes=1 << 28)
            proven = {p.share_id: p for p in proofs.proofs}
            assert receipted <= set(proven)
            print(f"attempted={len(attempted)} receipted={len(receipted)} proven={len(proven)}")
            for share_id, proof in proven.items():
                grant = attempted[share_id][0]
                assert grant.merkle_root is not None
                verify_share_proof(challenge.nonce, share_id, grant.merkle_root, grant.share_size, 1, proof)

            # no leftovers: temp folders are empty and every share file belongs to a held share
            health = (await client.get(f"{url}/health")).json()
            for folder in (tmp_path / "a", tmp_path / "b"):
                assert not any((folder / ".tmp").iterdir())
            data_files = {p.stem for f in (tmp_path / "a", tmp_path / "b") for p in f.rglob("*.data")}
            assert data_files == set(proven) and health["shares"] == len(proven)

            node.proc.send_signal(signal.SIGTERM)  # and a clean stop on SIGTERM
            assert node.proc.wait(timeout=15) == 0
    finally:
        if node is not None:
            node.kill()

