"""Disk trouble on the node's side: a full disk or an I/O error while a share streams in, and share files lost or
truncated behind the node's back. Each must be a clear 4xx/5xx with a message, never a 500, and leave no files."""

from __future__ import annotations

import errno
import os

import httpx
import pytest
from storaged_peers import MediatorPeer, RunningNode, listed_files, put_share

from storaged import store as store_mod


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
