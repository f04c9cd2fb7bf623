"""Requests that overlap on one share or one upload slot: a release during the share's upload, an upload during
its release, and clients that go silent mid-body."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from storaged_peers import MediatorPeer, RunningNode, listed_files, node_settings, put_share, running_node

from fincryptfs import asgi, rpc
from fincryptfs.core.identity import SigningKey


async def _wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.01)


async def test_release_during_the_upload_of_that_share_is_409_then_works(
        node: RunningNode, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """A 204 while the upload is in flight would be a lie: the upload commits afterwards and the node keeps a
    share its mediator believes released (the mediator does not retry a release that succeeded)."""
    data = os.urandom(2 << 20)
    grant = mediator.grant(node.node_id, data)
    url = f"{node.url}/v1/shares/{grant.share_id}"
    go = trio.Event()
    statuses: dict[str, int] = {}

    async def body() -> AsyncIterator[bytes]:
        yield data[:65536]
        await go.wait()
        yield data[65536:]

    async def upload() -> None:
        async with httpx.AsyncClient(timeout=60) as own:
            response = await own.put(url, content=body(), headers={"fincrypt-grant": mediator.seal(grant),
                                                                    "content-length": str(len(data))})
            statuses["put"] = response.status_code

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload)
        await _wait_until(lambda: grant.share_id in node.service._shares_in_flight, "upload in flight")
        refused = await client.delete(url, headers=rpc.signed_headers(mediator.key, "DELETE", url, b""))
        assert refused.status_code == 409 and "being uploaded" in refused.json()["error"], refused.text
        stranger = await client.delete(url, headers=rpc.signed_headers(SigningKey.generate(), "DELETE", url, b""))
        assert stranger.status_code == 204  # not its share to release: nothing to tell it
        go.set()
    assert statuses["put"] == 201
    assert (await rpc.call(client, "DELETE", url, key=mediator.key)).status_code == 204
    assert node.service.db.get_share(grant.share_id) is None
    assert not any(grant.share_id in name for name in listed_files(node))


async def test_upload_during_the_release_of_that_share_is_409(
        node: RunningNode, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """The release unlinks the share's files after removing its row: an upload of the same id in between would
    commit files that the release then deletes under its new row."""
    data = os.urandom(10_000)
    first = mediator.grant(node.node_id, data)
    assert (await put_share(client, node, mediator.seal(first), data, first.share_id)).status_code == 201
    unlinking = threading.Event()
    original = node.service.store.remove

    def slow_remove(*args, **kwargs):  # type: ignore[no-untyped-def]
        unlinking.wait(10)
        original(*args, **kwargs)

    node.service.store.remove = slow_remove  # type: ignore[method-assign]
    url = f"{node.url}/v1/shares/{first.share_id}"
    async with trio.open_nursery() as nursery:
        async def release() -> None:
            assert (await rpc.call(client, "DELETE", url, key=mediator.key)).status_code == 204

        nursery.start_soon(release)
        await _wait_until(lambda: node.service.db.get_share(first.share_id) is None, "row removed")
        again = mediator.grant(node.node_id, data, share_id=first.share_id)
        refused = await put_share(client, node, mediator.seal(again), data, again.share_id)
        assert refused.status_code == 409 and "being deleted" in refused.json()["error"], refused.text
        unlinking.set()
    assert (await put_share(client, node, mediator.seal(again), data, again.share_id)).status_code == 201
    record = node.service.db.get_share(first.share_id)
    assert record is not None and node.service.store.check_files(record.dir, first.share_id, 10_000)


async def test_silent_uploader_gets_408_and_frees_its_slot_and_reservation(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that goes silent mid-body (crash without FIN, partition, or on purpose) would otherwise keep its
    upload slot and its disk reservation for as long as the connection stays open."""
    monkeypatch.setattr(asgi, "BODY_IDLE_SECONDS", 0.5)
    settings = replace(node_settings(tmp_path, (mediator.url,)), max_concurrent_uploads=1)
    async with running_node(settings) as node:
        free = node.service.store.free_bytes()
        size = 1 << 20
        grant = mediator.grant(node.node_id, b"\0" * size)
        url = httpx.URL(node.url)
        assert url.port is not None
        stream = await trio.open_tcp_stream(url.host, url.port)
        async with stream:
            head = (f"PUT /v1/shares/{grant.share_id} HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n"
                    f"fincrypt-grant: {mediator.seal(grant)}\r\n\r\n").encode()
            await stream.send_all(head + b"\0" * 4096)  # then silence, the connection left open
            received = b""
            with trio.fail_after(15):
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(4096)
            assert received.startswith(b"HTTP/1.1 408"), received[:200]
        assert node.service.store.free_bytes() == free
        assert listed_files(node) == set()
        data = os.urandom(1000)
        other = mediator.grant(node.node_id, data)
        assert (await put_share(client, node, mediator.seal(other), data, other.share_id)).status_code == 201
        retry = await put_share(client, node, mediator.seal(grant), b"\0" * size, grant.share_id)
        assert retry.status_code == 201  # the abandoned upload did not use its grant up
