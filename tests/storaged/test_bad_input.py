"""Hostile and broken requests against a real node: refused with the documented 4xx, nothing kept, no 5xx."""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from storaged_peers import (
    ACCOUNT,
    MediatorPeer,
    RunningNode,
    listed_files,
    node_settings,
    put_share,
    raw_request,
    running_node,
    store,
)

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import new_share_id
from fincryptfs.core.messages import ProofResponse
from fincryptfs.core.settings import ShareDir
from fincryptfs.core.wire import b64decode, b64encode


async def test_grant_problems_are_401_or_403(node: RunningNode, mediator: MediatorPeer,
                                             client: httpx.AsyncClient) -> None:
    data = os.urandom(9000)
    cases: list[tuple[str, int, str | None, str]] = []
    grant = mediator.grant(node.node_id, data)
    cases.append(("no grant", 401, None, grant.share_id))
    expired = mediator.grant(node.node_id, data, expires_in=-10)
    cases.append(("expired", 401, mediator.seal(expired), expired.share_id))
    other_node = mediator.grant("cd" * 32, data)
    cases.append(("other node", 403, mediator.seal(other_node), other_node.share_id))
    cases.append(("other share", 403, mediator.seal(grant), new_share_id()))
    stranger = SigningKey.generate()
    untrusted = mediator.grant(node.node_id, data, key=stranger)
    cases.append(("untrusted mediator", 403, mediator.seal(untrusted, stranger), untrusted.share_id))
    envelope = json.loads(b64decode(mediator.seal(grant), field="grant"))
    envelope["body"]["share_size"] += 1
    cases.append(("bad signature", 401, b64encode(json.dumps(envelope, sort_keys=True, separators=(",", ":"))
                                                  .encode()), grant.share_id))
    cases.append(("garbage header", 400, "!!notbase64", grant.share_id))
    before = listed_files(node)
    for what, status, header, share_id in cases:
        response = await put_share(client, node, header, data, share_id)
        assert response.status_code == status, (what, response.text)
        assert "error" in response.json()
    assert listed_files(node) == before
    # the good grant still works once, then is a replay
    ok = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
    assert ok.status_code == 201
    again = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
    assert again.status_code in (401, 409)
    other_share = mediator.grant(node.node_id, data)
    replay = mediator.grant(node.node_id, data)
    replay = type(replay)(**{**replay.__dict__, "grant_id": grant.grant_id})
    assert replay.share_id != other_share.share_id
    replayed = await put_share(client, node, mediator.seal(replay), data, replay.share_id)
    assert replayed.status_code == 401 and "already used" in replayed.json()["error"]


async def test_bodies_that_do_not_match_the_grant(node: RunningNode, mediator: MediatorPeer,
                                                  client: httpx.AsyncClient) -> None:
    data = os.urandom(20_000)
    before = listed_files(node)

    async def chunked(payload: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 4096):
            yield payload[i:i + 4096]

    grant = mediator.grant(node.node_id, data)
    too_big = await put_share(client, node, mediator.seal(grant), data + b"x", grant.share_id)
    assert too_big.status_code == 413
    too_big_chunked = await client.put(f"{node.url}/v1/shares/{grant.share_id}", content=chunked(data + b"xy"),
                                       headers={"fincrypt-grant": mediator.seal(grant)})
    assert too_big_chunked.status_code == 413
    too_small = await put_share(client, node, mediator.seal(grant), data[:-1], grant.share_id)
    assert too_small.status_code == 400
    too_small_chunked = await client.put(f"{node.url}/v1/shares/{grant.share_id}", content=chunked(data[:-5]),
                                         headers={"fincrypt-grant": mediator.seal(grant)})
    assert too_small_chunked.status_code == 400
    wrong = bytearray(data)
    wrong[100] ^= 1
    mismatch = await put_share(client, node, mediator.seal(grant), bytes(wrong), grant.share_id)
    assert mismatch.status_code == 400
    assert mismatch.json()["error"] == "share does not match its grant's Merkle root"
    assert listed_files(node) == before
    # failed attempts do not burn the grant
    assert (await put_share(client, node, mediator.seal(grant), data, grant.share_id)).status_code == 201


async def test_no_room_is_507_and_nothing_kept(tmp_path: Path, mediator: MediatorPeer,
                                               client: httpx.AsyncClient) -> None:
    settings = node_settings(tmp_path / "small", (mediator.url,))
    small = replace(settings, share_dirs=(ShareDir(tmp_path / "small" / "s", 100_000),))
    async with running_node(small) as node:
        await store(client, node, mediator, os.urandom(60_000))
        data = os.urandom(60_000)
        grant = mediator.grant(node.node_id, data)
        full = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
        assert full.status_code == 507
        assert len(listed_files(node)) == 2
    reserved = replace(settings, data_dir=tmp_path / "reserve-node", reserve_bytes=2**60,
                       share_dirs=(ShareDir(tmp_path / "reserve" / "s", 2**40),))
    async with running_node(reserved) as node:
        data = os.urandom(1000)
        grant = mediator.grant(node.node_id, data)
        response = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
        assert response.status_code == 507 and "reserve" in response.json()["error"]
        assert (await client.get(f"{node.url}/health")).json()["free_bytes"] == 0
        assert listed_files(node) == set()


BAD_IDS = ["../x", "..%2f..%2fetc%2fpasswd", "%2e%2e", "%2e%2e%2f%2e%2e", "/etc/passwd", "%00", "a%00b",
           "AB" * 32, "ab" * 31, "ab" * 33, "g" * 64, "..", ".", "", "ab" * 31 + "%2f%2e", "%2F" * 10,
           "x" * 5000]


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
async def test_malformed_share_ids_are_400(node: RunningNode, mediator: MediatorPeer, method: str,
                                           tmp_path: Path) -> None:
    outside = tmp_path / "outside-marker"
    outside.write_bytes(b"keep")
    before = listed_files(node)
    for bad in BAD_IDS:
        head = (f"{method} /v1/shares/{bad} HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
                "connection: close\r\n\r\n").encode()
        status = await raw_request(node.url, head, b"abcd")
        assert status == 400 or (status == 404 and bad == ""), (bad, status)
    assert listed_files(node) == before and outside.read_bytes() == b"keep"


async def test_malformed_and_oversized_requests(node: RunningNode, mediator: MediatorPeer,
                                                client: httpx.AsyncClient) -> None:
    url = f"{node.url}/v1/challenges"
    for body in (b"{", b"[]", b'{"a":1.5}', b"\xff\xfe", b'{"mediator_id": "x"}', b"null"):
        signed = rpc.signed_headers(mediator.key, "POST", url, body)
        response = await client.post(url, content=body, headers=signed)
        assert response.status_code == 400, (body, response.text)
    huge = b"{" + b" " * (9 << 20) + b"}"
    response = await client.post(url, content=huge, headers=rpc.signed_headers(mediator.key, "POST", url, huge))
    assert response.status_code == 413
    # a challenge from a key this node never announced to
    stranger = SigningKey.generate()
    challenge = mediator.challenge(node.node_id, [new_share_id()])
    try:
        await rpc.call(client, "POST", url, key=stranger, json=challenge.to_json())
        raise AssertionError("untrusted challenger answered")
    except rpc.PeerError as exc:
        assert exc.status == 403
    status = await raw_request(node.url, b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 40_000
                               + b"\r\nconnection: close\r\n\r\n")
    assert status in (400, 413, 431)
    many = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 900) for i in range(40))
    status = await raw_request(node.url, b"GET /health HTTP/1.1\r\nhost: x\r\n" + many + b"connection: close\r\n\r\n")
    assert status in (400, 431)
    for query in ("first_leaf=x&leaf_count=1", "first_leaf=1", "leaf_count=2", "first_leaf=-1&leaf_count=1",
                  "first_leaf=0&leaf_count=1&x=1", "first_leaf=0&first_leaf=1&leaf_count=1"):
        target = f"{node.url}/v1/shares/{new_share_id()}?{query}"
        bad_query = await client.get(target, headers=rpc.signed_headers(ACCOUNT, "GET", target, b""))
        assert bad_query.status_code == 400, query
    assert (await client.get(f"{node.url}/health")).status_code == 200


async def test_slow_uploads_bounded_and_challenges_still_answered(tmp_path: Path, mediator: MediatorPeer,
                                                                  client: httpx.AsyncClient) -> None:
    settings = replace(node_settings(tmp_path, (mediator.url,)), max_concurrent_uploads=8)
    async with running_node(settings) as node:
        held, _ = await store(client, node, mediator, os.urandom(30_000))
        size = 4 << 20
        release = trio.Event()
        statuses: list[int] = []

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"\0" * 65536
            await release.wait()
            yield b"\0" * (size - 65536)

        async def slow_upload() -> None:
            data_grant = mediator.grant(node.node_id, b"\0" * size)
            try:
                async with httpx.AsyncClient(timeout=60) as own:
                    response = await own.put(f"{node.url}/v1/shares/{data_grant.share_id}", content=slow_body(),
                                             headers={"fincrypt-grant": mediator.seal(data_grant),
                                                      "content-length": str(size)})
                statuses.append(response.status_code)
            except httpx.HTTPError:  # a refused upload may see its connection closed while still sending
                statuses.append(-1)

        refused = node.service.metrics.requests
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(slow_upload)
            with trio.fail_after(10):
                while refused[("/v1/shares/{share_id}", 429)] < 4:  # four beyond the limit of 8, at once
                    await trio.sleep(0.05)
            started = time.monotonic()
            challenge = mediator.challenge(node.node_id, [held.share_id])
            answer = await rpc.call(client, "POST", f"{node.url}/v1/challenges", key=mediator.key,
                                    json=challenge.to_json())
            assert ProofResponse.decode(answer.content, node.service.key.public, max_bytes=1 << 20).proofs
            assert time.monotonic() - started < 5
            release.set()
        assert statuses.count(201) == 8 and refused[("/v1/shares/{share_id}", 429)] == 4
        assert (await client.get(f"{node.url}/health")).json()["shares"] == 9
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        assert grown_kib < 200 * 1024  # 8 x 4 MiB uploads never buffered whole (client side included)
