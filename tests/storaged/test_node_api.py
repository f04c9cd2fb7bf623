"""The storage node's API against a real daemon on 127.0.0.1: store, read, prove, release, health, metrics."""

from __future__ import annotations

import os
import stat
from dataclasses import replace

import httpx
import pytest
from storaged_peers import ACCOUNT, MediatorPeer, RunningNode, put_share, store

from fincryptfs import rpc
from fincryptfs.core.challenge import verify_share_proof
from fincryptfs.core.merkle import HASH_BYTES, LEAF_SIZE, MerkleTree, verify_range
from fincryptfs.core.messages import ProofResponse, StorageReceipt
from fincryptfs.core.wire import Envelope, b64decode
from storaged.store import WRITEBACK_BYTES


async def test_first_start_creates_identity_and_database(node: RunningNode, mediator: MediatorPeer) -> None:
    key_file = node.settings.data_dir / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (node.settings.data_dir / "storaged.sqlite3").exists()
    assert mediator.announcements[-1].node_id == node.node_id
    assert mediator.announcements[-1].url == node.url
    assert node.service.trusted[mediator.id] == mediator.key.public


async def test_store_then_read_whole_share_and_ranges(node: RunningNode, mediator: MediatorPeer,
                                                     client: httpx.AsyncClient) -> None:
    data = os.urandom(10 * LEAF_SIZE + 123)
    grant, envelope = await store(client, node, mediator, data)
    receipt = StorageReceipt.open(envelope)
    assert receipt.matches(grant) and receipt.node_id == node.node_id
    url = f"{node.url}/v1/shares/{grant.share_id}"
    whole = await rpc.call(client, "GET", url, key=ACCOUNT)
    assert whole.content == data and whole.headers["fincrypt-share-size"] == str(len(data))
    root = MerkleTree.from_data(data).root
    for first, count in ((0, 1), (3, 4), (10, 1), (0, 11)):
        part = await rpc.call(client, "GET", f"{url}?first_leaf={first}&leaf_count={count}", key=mediator.key)
        assert part.content == data[first * LEAF_SIZE:(first + count) * LEAF_SIZE]
        raw = b64decode(part.headers["fincrypt-proof"], field="proof")
        proof = [raw[i:i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)]
        leaves = [part.content[i:i + LEAF_SIZE] for i in range(0, len(part.content), LEAF_SIZE)]
        verify_range(root, len(data), first, leaves, proof)
    stranger = await client.get(url)
    assert stranger.status_code == 401
    from fincryptfs.core.identity import SigningKey
    other = SigningKey.generate()
    try:
        await rpc.call(client, "GET", url, key=other)
        raise AssertionError("a stranger read a share")
    except rpc.PeerError as exc:
        assert exc.status == 403


async def test_large_share_streams(node: RunningNode, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    # several times the node's writeback step (the disk starts writing every 8 MiB), plus a ragged end
    data = os.urandom(5 * 2**22 + 5)
    assert len(data) > 2 * WRITEBACK_BYTES
    grant, _ = await store(client, node, mediator, data)
    got = await rpc.call(client, "GET", f"{node.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
    assert got.content == data


async def test_open_grant_receipt_states_the_root_of_what_arrived(node: RunningNode, mediator: MediatorPeer,
                                                                    client: httpx.AsyncClient) -> None:
    """A share streamed while its client encodes it has a grant naming no root: the node takes any bytes of the
    granted size and its receipt (and later proofs) state the root of what it stored."""
    data = os.urandom(7 * LEAF_SIZE + 99)
    grant = replace(mediator.grant(node.node_id, data), merkle_root=None)
    response = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
    assert response.status_code == 201, response.text
    receipt = StorageReceipt.open(Envelope.from_json(response.json()["receipt"], kind="receipt"))
    root = MerkleTree.from_data(data).root
    assert receipt.merkle_root == root and receipt.matches(grant)
    challenge = mediator.challenge(node.node_id, [grant.share_id], leaves=2)
    answer = await rpc.call(client, "POST", f"{node.url}/v1/challenges", key=mediator.key, json=challenge.to_json())
    proof = ProofResponse.decode(answer.content, node.service.key.public, max_bytes=1 << 20).proofs[0]
    verify_share_proof(challenge.nonce, grant.share_id, root, len(data), 2, proof)
    # the size still binds: one byte short or long is refused and nothing is kept
    for wrong in (data[:-1], data + b"x"):
        again = replace(mediator.grant(node.node_id, data), merkle_root=None)
        refused = await put_share(client, node, mediator.seal(again), wrong, again.share_id)
        assert refused.status_code in (400, 413)


async def test_challenge_proves_held_and_lists_missing(node: RunningNode, mediator: MediatorPeer,
                                                      client: httpx.AsyncClient) -> None:
    shares = [os.urandom(n) for n in (1, LEAF_SIZE, 5 * LEAF_SIZE + 7, 40 * LEAF_SIZE)]
    grants = [(await store(client, node, mediator, d))[0] for d in shares]
    absent = "ab" * 32
    challenge = mediator.challenge(node.node_id, [g.share_id for g in grants] + [absent], leaves=3)
    answer = await rpc.call(client, "POST", f"{node.url}/v1/challenges", key=mediator.key,
                            json=challenge.to_json())
    assert answer.headers["content-type"] == "application/octet-stream"
    response = ProofResponse.decode(answer.content, node.service.key.public, max_bytes=1 << 24)
    assert response.missing == (absent,)
    assert response.nonce == challenge.nonce and response.round_id == challenge.round_id
    by_id = {p.share_id: p for p in response.proofs}
    for grant in grants:
        verify_share_proof(challenge.nonce, grant.share_id, grant.merkle_root, grant.share_size, 3,
                           by_id[grant.share_id])
    metrics = (await client.get(f"{node.url}/metrics")).text
    assert "storaged_challenges_answered_total 1" in metrics


async def test_release_deletes_and_frees_space(node: RunningNode, mediator: MediatorPeer,
                                              client: httpx.AsyncClient) -> None:
    data = os.urandom(100_000)
    before = (await client.get(f"{node.url}/health")).json()
    grant, _ = await store(client, node, mediator, data)
    during = (await client.get(f"{node.url}/health")).json()
    assert during["shares"] == before["shares"] + 1 and during["bytes_stored"] == before["bytes_stored"] + 100_000
    assert during["free_bytes"] < before["free_bytes"]
    url = f"{node.url}/v1/shares/{grant.share_id}"
    try:
        await rpc.call(client, "DELETE", url, key=ACCOUNT)
        raise AssertionError("an account released a share itself")
    except rpc.PeerError as exc:
        assert exc.status == 403
    assert (await rpc.call(client, "DELETE", url, key=mediator.key)).status_code == 204
    assert (await rpc.call(client, "DELETE", url, key=mediator.key)).status_code == 204
    after = (await client.get(f"{node.url}/health")).json()
    assert after["shares"] == before["shares"] and after["free_bytes"] == before["free_bytes"]
    assert not list(node.settings.share_dirs[0].path.rglob(f"{grant.share_id}*"))
    assert not list(node.settings.share_dirs[1].path.rglob(f"{grant.share_id}*"))
    try:
        await rpc.call(client, "GET", url, key=ACCOUNT)
        raise AssertionError("a released share was served")
    except rpc.PeerError as exc:
        assert exc.status == 404


async def test_scrub_marks_corrupt_share(node: RunningNode, mediator: MediatorPeer,
                                        client: httpx.AsyncClient) -> None:
    good, _ = await store(client, node, mediator, os.urandom(20_000))
    bad, _ = await store(client, node, mediator, os.urandom(20_000))
    record = node.service.db.get_share(bad.share_id)
    assert record is not None
    paths = node.service.store.paths(record.dir, bad.share_id)
    assert paths is not None
    with open(paths.data, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 1]))
    assert await node.service.scrub_once(1 << 30) == 1
    metrics = (await client.get(f"{node.url}/metrics")).text
    assert "storaged_scrub_corrupt_total 1" in metrics
    challenge = mediator.challenge(node.node_id, [good.share_id, bad.share_id])
    answer = await rpc.call(client, "POST", f"{node.url}/v1/challenges", key=mediator.key,
                            json=challenge.to_json())
    response = ProofResponse.decode(answer.content, node.service.key.public, max_bytes=1 << 24)
    assert response.missing == (bad.share_id,) and [p.share_id for p in response.proofs] == [good.share_id]
    corrupt = await client.get(f"{node.url}/v1/shares/{bad.share_id}")
    assert corrupt.status_code == 401  # unsigned: refused before anything is read
    try:
        await rpc.call(client, "GET", f"{node.url}/v1/shares/{bad.share_id}", key=ACCOUNT)
        raise AssertionError("a corrupt share was served")
    except rpc.PeerError as exc:
        assert exc.status == 404


async def test_health_and_metrics(node: RunningNode, client: httpx.AsyncClient) -> None:
    health = (await client.get(f"{node.url}/health")).json()
    assert health["status"] == "ok" and health["node_id"] == node.node_id
    text = (await client.get(f"{node.url}/metrics")).text
    for name in ("storaged_bytes_stored", "storaged_shares", "storaged_free_bytes",
                 "storaged_challenges_answered_total", "storaged_scrub_corrupt_total"):
        assert f"\n{name} " in "\n" + text
    assert 'storaged_requests_total{route="/health",status="200"} 1' in text


async def test_restart_keeps_shares_and_trust(tmp_path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    from storaged_peers import node_settings, running_node
    settings = node_settings(tmp_path, (mediator.url,))
    async with running_node(settings) as first:
        grant, _ = await store(client, first, mediator, os.urandom(50_000))
        node_id = first.node_id
    async with running_node(settings) as second:
        assert second.node_id == node_id
        got = await rpc.call(client, "GET", f"{second.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
        assert len(got.content) == 50_000
    settings_no_mediator = node_settings(tmp_path, ())
    async with running_node(settings_no_mediator) as third:
        assert mediator.id in third.service.trusted  # trust persisted in the database


async def test_request_signed_for_one_node_is_refused_by_another(tmp_path, mediator: MediatorPeer,
                                                                client: httpx.AsyncClient) -> None:
    """Repair reuses a share id on a new node, then releases the old copy: the old node must not be able to replay
    that signed DELETE to the new node (the request names its audience, by node id or by origin)."""
    from storaged_peers import node_settings, running_node
    data = os.urandom(20_000)
    async with running_node(node_settings(tmp_path / "a", (mediator.url,))) as a, \
            running_node(node_settings(tmp_path / "b", (mediator.url,))) as b:
        old = mediator.grant(a.node_id, data)
        assert (await put_share(client, a, mediator.seal(old), data, old.share_id)).status_code == 201
        new = mediator.grant(b.node_id, data, share_id=old.share_id)
        assert (await put_share(client, b, mediator.seal(new), data, new.share_id)).status_code == 201
        url_a, url_b = f"{a.url}/v1/shares/{old.share_id}", f"{b.url}/v1/shares/{old.share_id}"
        for audience in (a.node_id, None):  # None: the origin of a's URL
            headers = rpc.signed_headers(mediator.key, "DELETE", url_a, b"", audience)
            replay = await client.delete(url_b, headers=headers)
            assert replay.status_code == 401 and "addressed to" in replay.json()["error"], replay.text
        assert b.service.db.get_share(old.share_id) is not None
        headers = rpc.signed_headers(mediator.key, "DELETE", url_a, b"", a.node_id)
        assert (await client.delete(url_a, headers=headers)).status_code == 204
        assert (await client.delete(url_b, headers=headers)).status_code == 401
        assert a.service.db.get_share(old.share_id) is None and b.service.db.get_share(old.share_id) is not None
        # the mediator addresses a node by its id; a client that knows only the URL, by its origin
        assert (await rpc.call(client, "GET", url_b, key=ACCOUNT, audience=b.node_id)).content == data
        assert (await rpc.call(client, "GET", url_b, key=ACCOUNT)).content == data


async def test_a_restarted_node_still_refuses_a_request_it_served_before(tmp_path, mediator: MediatorPeer,
                                                                       client: httpx.AsyncClient) -> None:
    """A captured signed request stays fresh for minutes; a node restarted meanwhile must not take it again (the
    mediator's DELETE of a share id that a later grant reused would delete the new copy)."""
    from storaged_peers import node_settings, running_node
    settings = node_settings(tmp_path, (mediator.url,))
    data = os.urandom(20_000)
    async with running_node(settings) as node:
        grant, _ = await store(client, node, mediator, data)
        url = f"{node.url}/v1/shares/{grant.share_id}"
        captured = rpc.signed_headers(mediator.key, "DELETE", url, b"", node.node_id)
        assert (await client.delete(url, headers=captured)).status_code == 204
        again = mediator.grant(node.node_id, data, share_id=grant.share_id)  # the id given to a new copy
        assert (await put_share(client, node, mediator.seal(again), data, grant.share_id)).status_code == 201
    async with running_node(settings) as node:
        url = f"{node.url}/v1/shares/{grant.share_id}"
        replay = await client.delete(url, headers=captured)
        assert replay.status_code == 401 and "already received" in replay.json()["error"], replay.text
        assert (await rpc.call(client, "GET", url, key=ACCOUNT, audience=node.node_id)).content == data
        fresh = rpc.signed_headers(mediator.key, "DELETE", url, b"", node.node_id)
        assert (await client.delete(url, headers=fresh)).status_code == 204


async def test_strangers_cannot_fill_the_replay_guard_and_lock_out_the_mediator(
        node: RunningNode, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """Nonces are recorded only for signers allowed the request, and each signer has its own quota: neither a
    stranger with throwaway keys nor one account can make the node refuse its mediator's challenges."""
    from fincryptfs.core.identity import SigningKey
    from fincryptfs.core.ids import new_share_id
    from fincryptfs.core.wire import ReplayGuard
    node.service.guard = ReplayGuard(capacity=60, per_signer=20)
    grant, _ = await store(client, node, mediator, os.urandom(10_000))
    held = f"{node.url}/v1/shares/{grant.share_id}"
    for _ in range(30):
        stranger = SigningKey.generate()
        for method, url in (("GET", f"{node.url}/v1/shares/{new_share_id()}"), ("GET", held), ("DELETE", held)):
            r = await client.request(method, url, headers=rpc.signed_headers(stranger, method, url, b""))
            assert r.status_code in (403, 404), r.text
        unheld = f"{node.url}/v1/shares/{new_share_id()}"
        r = await client.delete(unheld, headers=rpc.signed_headers(stranger, "DELETE", unheld, b""))
        assert r.status_code == 204  # nothing to release: nothing done, nothing recorded
        challenge = mediator.challenge(node.node_id, [grant.share_id])
        with pytest.raises(rpc.PeerError, match="403"):
            await rpc.call(client, "POST", f"{node.url}/v1/challenges", key=stranger, json=challenge.to_json())
    assert len(node.service.guard) == 0
    for _ in range(20):
        await rpc.call(client, "GET", held, key=ACCOUNT)
    try:
        await rpc.call(client, "GET", held, key=ACCOUNT)
        raise AssertionError("one account went past its replay-guard quota")
    except rpc.PeerError as exc:
        assert exc.status == 429 and "more than 20 requests" in str(exc)
    challenge = mediator.challenge(node.node_id, [grant.share_id])
    answer = await rpc.call(client, "POST", f"{node.url}/v1/challenges", key=mediator.key, json=challenge.to_json())
    assert answer.status_code == 200
