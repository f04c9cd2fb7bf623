"""Disk trouble on the node's side: a full disk or an I/O error while a share streams in, and share files lost or
truncated behind the node's back. Each must be a clear 4xx/5xx with a message, never a 500, and leave no files."""

from __future__ import annotations

import errno
import os

import httpx
import pytest
from storaged_peers import ACCOUNT, MediatorPeer, RunningNode, listed_files, put_share, store

from fincryptfs import rpc
from fincryptfs.core.messages import ProofResponse
from storaged import store as store_mod
from storaged.db import STATE_MISSING


def _failing(code: int):  # type: ignore[no-untyped-def]
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize(("where", "code", "status"), [
    ("write_chunks", errno.ENOSPC, 507),
    ("write_chunks", errno.EDQUOT, 507),
    ("write_chunks", errno.EIO, 503),
    ("commit", errno.ENOSPC, 507),
    ("commit", errno.EFBIG, 507),
    ("commit", errno.EIO, 503),
])
async def test_write_error_mid_upload_is_507_or_503_and_leaves_nothing(
        node: RunningNode, mediator: MediatorPeer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
        where: str, code: int, status: int) -> None:
    monkeypatch.setattr(store_mod.ShareWriter, where, _failing(code))
    data = os.urandom(3 << 20)
    grant = mediator.grant(node.node_id, data)
    before, free = listed_files(node), node.service.store.free_bytes()
    response = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
    assert response.status_code == status, response.text
    assert errno.errorcode[code] in response.json()["error"] and "another node" in response.json()["error"]
    assert listed_files(node) == before and node.service.db.get_share(grant.share_id) is None
    assert node.service.store.free_bytes() == free  # the reservation was given back
    monkeypatch.undo()  # the disk has room again: the same grant can still be used
    assert (await put_share(client, node, mediator.seal(grant), data, grant.share_id)).status_code == 201


async def test_failure_after_the_renames_removes_the_final_files(
        node: RunningNode, mediator: MediatorPeer, client: httpx.AsyncClient,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of the fan-out folder fails after both files got their final names: no row, so no files either."""
    monkeypatch.setattr(store_mod, "_fsync_dir", _failing(errno.EIO))
    data = os.urandom(100_000)
    grant = mediator.grant(node.node_id, data)
    before = listed_files(node)
    response = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
    assert response.status_code == 503, response.text
    assert listed_files(node) == before


@pytest.mark.parametrize("size", [50_000, 3 << 20])  # answered in one piece, streamed
@pytest.mark.parametrize("damage", ["unlink data", "unlink tree", "truncate data", "truncate tree"])
async def test_read_of_a_lost_or_truncated_share_is_404_and_marks_it_missing(
        node: RunningNode, mediator: MediatorPeer, client: httpx.AsyncClient, damage: str, size: int) -> None:
    grant, _ = await store(client, node, mediator, os.urandom(size))
    record = node.service.db.get_share(grant.share_id)
    assert record is not None
    paths = node.service.store.paths(record.dir, grant.share_id)
    assert paths is not None
    action, which = damage.split()
    path = paths.data if which == "data" else paths.tree
    if action == "unlink":
        path.unlink()
    else:
        os.truncate(path, path.stat().st_size // 2)
    url = f"{node.url}/v1/shares/{grant.share_id}"
    for target in (url, f"{url}?first_leaf=0&leaf_count=1"):
        response = await client.get(target, headers=rpc.signed_headers(ACCOUNT, "GET", target, b""))
        assert response.status_code == 404, response.text
        assert "missing" in response.json()["error"]
    after = node.service.db.get_share(grant.share_id)
    assert after is not None and after.state == STATE_MISSING
    challenge = mediator.challenge(node.node_id, [grant.share_id])
    answer = await rpc.call(client, "POST", f"{node.url}/v1/challenges", key=mediator.key,
                            json=challenge.to_json())
    proof = ProofResponse.decode(answer.content, node.service.key.public, max_bytes=1 << 24)
    assert proof.missing == (grant.share_id,)
