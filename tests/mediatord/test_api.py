"""The mediator's HTTP API against real storage nodes: place, PUT, commit, status, delete, pointers, bad input."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from mediator_net import (
    Net,
    commit_body,
    make_object,
    object_status,
    place,
    put_share,
    start_mediator,
    start_node,
    upload,
    wait_online,
)

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import new_object_id, new_share_id
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.messages import (
    ManifestPointer,
    NodeAnnouncement,
    PlaceRequest,
    ShareSpec,
    StorageReceipt,
    UploadGrant,
)
from fincryptfs.core.wire import b64decode, canonical_json, origin_of, sign_request
from mediatord import upkeep


@pytest.fixture
async def net(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Net]:
    mediator = await start_mediator(nursery, tmp_path / "mediator")
    nodes = [await start_node(nursery, tmp_path, mediator.url, i) for i in range(5)]
    await wait_online(mediator, 5)
    async with rpc.new_client() as client:
        yield Net(mediator, nodes, client, SigningKey.generate())
    nursery.cancel_scope.cancel()


async def expect_error(net: Net, method: str, path: str, status: int, *, key: SigningKey | None = None,
                       json: object = None, content: bytes | None = None, fragment: str = "") -> str:
    with pytest.raises(rpc.PeerError) as info:
        await rpc.call(net.client, method, net.url + path, key=key, json=json, content=content)
    assert info.value.status == status, str(info.value)
    assert fragment in str(info.value)
    return str(info.value)


async def test_upload_commit_and_status(net: Net) -> None:
    obj = make_object()
    stored = await upload(net.client, net.url, net.account, obj)
    assert len({node for node, _ in stored.values()}) == 4
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"] == {"healthy": 4, "total": 4, "state": "healthy"}
    assert sorted(s["index"] for s in status["shares"]) == [0, 1, 2, 3]
    assert all(s["state"] == "stored" and s["node_url"].startswith("http://127.0.0.1:") for s in status["shares"])
    # cheapest first: nodes ask 100..104, so the four cheapest (nodes 0..3) hold the shares
    assert {s["node_id"] for s in status["shares"]} == {n.node_id for n in net.nodes[:4]}
    account = await rpc.call_json(net.client, "GET", f"{net.url}/v1/account", key=net.account)
    assert account["objects"] == 1 and account["objects_by_state"] == {"healthy": 1}
    assert account["bytes_stored"] == 4 * obj.layout.share_size
    health = (await net.client.get(f"{net.url}/health")).json()
    assert health["status"] == "ok" and health["nodes_online"] == 5
    metrics = (await net.client.get(f"{net.url}/metrics")).text
    assert "fincrypt_mediator_objects 1" in metrics and "fincrypt_mediator_shares_healthy 4" in metrics
    listing = (await net.client.get(f"{net.url}/v1/nodes")).json()
    assert len(listing["nodes"]) == 5 and listing["capacity_bytes"] >= 5 * 2**30 - 5 * 2**20
    info = (await net.client.get(f"{net.url}/v1/info")).json()
    assert info["min_expansion"] == "2" and info["mediator_id"] == net.mediator.service.id


async def test_redundancy_and_node_shortage_refused(net: Net) -> None:
    low = make_object(k=3, n=5)
    await expect_error(net, "POST", "/v1/objects/place", 422, key=net.account,
                       json={"object_id": low.object_id, "layout": {"padded_size": 9000, "segment_size": 8192,
                                                                     "k": 3, "n": 5},
                             "shares": [s.to_json() for s in make_object(3, 5, 9000).specs],
                             "exclude_nodes": []}, fragment="at least 2x")
    wide = make_object(k=4, n=8)
    with pytest.raises(rpc.PeerError) as info:
        await place(net.client, net.url, net.account, wide)
    assert info.value.status == 503 and "3 missing" in str(info.value)
    assert net.mediator.service.db.object(wide.object_id) is None


async def test_replacement_excludes_nodes_and_keeps_shares_apart(net: Net) -> None:
    obj = make_object()
    first = await place(net.client, net.url, net.account, obj)
    bad = next(p for p in first if p.index == 0)
    again = await place(net.client, net.url, net.account, obj, indices=[0], exclude=(bad.node_id,))
    assert len(again) == 1 and again[0].index == 0
    others = {p.node_id for p in first if p.index != 0}
    assert again[0].node_id not in others | {bad.node_id}
    assert again[0].node_id == net.nodes[4].node_id


async def test_commit_refuses_bad_receipts_and_changes_nothing(net: Net) -> None:
    obj = make_object()
    placements = await place(net.client, net.url, net.account, obj)
    stored = {p.index: (p.node_id, await put_share(net.client, p, obj)) for p in placements}
    # a receipt signed by a key that is not the node's registered key
    forger = SigningKey.generate()
    node_id, real = stored[0]
    fake = StorageReceipt.open(real)
    forged = StorageReceipt(forger.id, fake.mediator_id, fake.account_id, fake.share_id,  # type: ignore[arg-type]
                            fake.share_size, fake.merkle_root, fake.grant_id, fake.stored_at).seal(forger)
    body = commit_body(obj, {**stored, 0: (forger.id, forged)})
    await expect_error(net, "POST", "/v1/objects/commit", 401, key=net.account, json=body,
                       fragment="no grant this mediator issued")
    # a receipt from the right node for a grant id we never issued
    odd = StorageReceipt.open(stored[1][1])
    node_key_missing = commit_body(obj, {**stored, 1: (odd.node_id, StorageReceipt(
        odd.node_id, odd.mediator_id, odd.account_id, odd.share_id, odd.share_size, odd.merkle_root, "0" * 32,
        odd.stored_at).seal(forger))})
    await expect_error(net, "POST", "/v1/objects/commit", 401, key=net.account, json=node_key_missing)
    # too few receipts: happy = max(n-1, k+1) = 3
    few = commit_body(obj, {i: stored[i] for i in (0, 1)})
    await expect_error(net, "POST", "/v1/objects/commit", 422, key=net.account, json=few, fragment="at least 3")
    # another account may not commit it
    await expect_error(net, "POST", "/v1/objects/commit", 403, key=SigningKey.generate(),
                       json=commit_body(obj, stored))
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"]["state"] == "pending" and {s["state"] for s in status["shares"]} == {"placed"}
    # and the genuine commit still works (with exactly happy receipts)
    await rpc.call_json(net.client, "POST", f"{net.url}/v1/objects/commit", key=net.account,
                        json=commit_body(obj, {i: stored[i] for i in (0, 1, 2)}))
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"] == {"healthy": 3, "total": 4, "state": "degraded"}


async def test_authentication_and_malformed_input(net: Net) -> None:
    url = f"{net.url}/v1/objects/place"
    await expect_error(net, "POST", "/v1/objects/place", 401, json={"x": 1}, fragment="not signed")
    body = b'{"object_id":"00"}'
    headers = sign_request(net.account, "POST", origin_of(net.url), "/v1/objects/place", body, time.time())
    tampered = await net.client.post(url, content=body + b" ", headers=headers)
    assert tampered.status_code == 401 and "bad signature" in tampered.json()["error"]
    first = await net.client.post(url, content=body, headers=headers)
    assert first.status_code == 400  # signed fine, malformed id
    replay = await net.client.post(url, content=body, headers=headers)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]
    stale = sign_request(net.account, "POST", origin_of(net.url), "/v1/objects/place", body, time.time() - 3600)
    assert (await net.client.post(url, content=body, headers=stale)).status_code == 401
    # a request addressed to another peer (by id or by origin) is refused: it cannot be replayed here
    for audience in (SigningKey.generate().id, "http://127.0.0.1:1"):
        elsewhere = sign_request(net.account, "POST", audience, "/v1/objects/place", body, time.time())
        misaddressed = await net.client.post(url, content=body, headers=elsewhere)
        assert misaddressed.status_code == 401 and "addressed to" in misaddressed.json()["error"]
    # ... while one addressed to the mediator's id is accepted like one addressed to its origin
    by_id = sign_request(net.account, "POST", net.mediator.service.id, "/v1/objects/place", body, time.time())
    assert (await net.client.post(url, content=body, headers=by_id)).status_code == 400  # signed fine, bad id
    await expect_error(net, "POST", "/v1/objects/place", 400, key=net.account, content=b"{not json",
                       fragment="not valid JSON")
    await expect_error(net, "POST", "/v1/objects/place", 413, key=net.account, content=b" " * (2 << 20))
    await expect_error(net, "GET", "/v1/objects/..%2f..%2fetc", 400, key=net.account)
    await expect_error(net, "GET", f"/v1/objects/{new_object_id()}", 404, key=net.account)
    await expect_error(net, "POST", "/v1/objects/place", 400, key=net.account,
                       json={"object_id": new_object_id(), "layout": {"padded_size": 1, "segment_size": 4096,
                                                                       "k": 2, "n": 4},
                             "shares": [], "exclude_nodes": [], "extra": 1})
    assert net.mediator.service.db.counts()["objects"] == 0


async def test_a_restarted_mediator_still_refuses_a_request_it_served_before(tmp_path: Path,
                                                                           nursery: trio.Nursery) -> None:
    """A signed request stays fresh for minutes: a mediator restarted within them must not take it a second time."""
    account = SigningKey.generate()
    target = "/v1/account"
    async with rpc.new_client() as client:
        async with trio.open_nursery() as stopped_before_the_restart:
            first = await start_mediator(stopped_before_the_restart, tmp_path / "m")
            captured = sign_request(account, "GET", first.service.id, target, b"", time.time())
            assert (await client.get(first.url + target, headers=captured)).status_code == 200
            first.scope.cancel()
        second = await start_mediator(nursery, tmp_path / "m")
        assert second.service.id == first.service.id
        replay = await client.get(second.url + target, headers=captured)
        assert replay.status_code == 401 and "already received" in replay.json()["error"], replay.text
        fresh = sign_request(account, "GET", second.service.id, target, b"", time.time())
        assert (await client.get(second.url + target, headers=fresh)).status_code == 200
        second.scope.cancel()


async def test_object_owner_only_and_delete_releases_shares(net: Net) -> None:
    obj = make_object()
    await upload(net.client, net.url, net.account, obj)
    stranger = SigningKey.generate()
    await expect_error(net, "GET", f"/v1/objects/{obj.object_id}", 403, key=stranger)
    await expect_error(net, "DELETE", f"/v1/objects/{obj.object_id}", 403, key=stranger)
    assert sum(len(n.share_files()) for n in net.nodes) >= 4
    await rpc.call(net.client, "DELETE", f"{net.url}/v1/objects/{obj.object_id}", key=net.account)
    await expect_error(net, "GET", f"/v1/objects/{obj.object_id}", 404, key=net.account)
    released = await upkeep.release_pass(net.mediator.service, net.client, time.time())
    assert released == 4
    for node in net.nodes:
        assert (await net.client.get(f"{node.url}/health")).json()["shares"] == 0
    assert net.mediator.service.db.counts()["releases_pending"] == 0


async def test_release_retries_while_a_node_is_down(net: Net, tmp_path: Path, nursery: trio.Nursery) -> None:
    from mediator_net import stop_node
    obj = make_object()
    stored = await upload(net.client, net.url, net.account, obj)
    victim = next(n for n in net.nodes if n.node_id == stored[0][0])
    await stop_node(victim)
    await rpc.call(net.client, "DELETE", f"{net.url}/v1/objects/{obj.object_id}", key=net.account)
    assert await upkeep.release_pass(net.mediator.service, net.client, time.time()) == 3
    assert net.mediator.service.db.counts()["releases_pending"] == 1
    port = int(victim.url.rsplit(":", 1)[1])
    back = await start_node(nursery, tmp_path, net.url, net.nodes.index(victim), port=port)
    assert back.node_id == victim.node_id
    assert await upkeep.release_pass(net.mediator.service, net.client, time.time() + 10) == 1
    assert (await net.client.get(f"{back.url}/health")).json()["shares"] == 0


async def test_pointer_compare_and_set(net: Net) -> None:
    await expect_error(net, "GET", "/v1/pointer", 404, key=net.account)

    def pointer(version: int, key: SigningKey = net.account) -> dict[str, object]:
        env = ManifestPointer(key.id, version, new_object_id(), b"sealed", int(time.time())).seal(key)  # type: ignore[arg-type]
        return {"pointer": env.to_json()}

    await rpc.call_json(net.client, "PUT", f"{net.url}/v1/pointer", key=net.account, json=pointer(1))
    await expect_error(net, "PUT", "/v1/pointer", 409, key=net.account, json=pointer(1),
                       fragment="current version is 1")
    await expect_error(net, "PUT", "/v1/pointer", 409, key=net.account, json=pointer(3))
    other = SigningKey.generate()
    await expect_error(net, "PUT", "/v1/pointer", 403, key=net.account, json=pointer(2, other))
    second = pointer(2)
    await rpc.call_json(net.client, "PUT", f"{net.url}/v1/pointer", key=net.account, json=second)
    got = await rpc.call_json(net.client, "GET", f"{net.url}/v1/pointer", key=net.account)
    assert got == second
    assert ManifestPointer.open(__import__("fincryptfs.core.wire", fromlist=["Envelope"]).Envelope.from_json(
        got["pointer"], kind="pointer")).version == 2
    await expect_error(net, "GET", "/v1/pointer", 404, key=other)


async def test_a_refused_place_or_pointer_write_creates_no_account(net: Net) -> None:
    db = net.mediator.service.db
    key = SigningKey.generate()
    with pytest.raises(rpc.PeerError) as info:  # 503: more shares than nodes
        await place(net.client, net.url, key, make_object(k=4, n=8))
    assert info.value.status == 503 and not db.has_account(key.id)
    db.set_out_since(key.id, 0.0)  # out of funds long past its grace period: 402
    with pytest.raises(rpc.PeerError) as info:
        await place(net.client, net.url, key, make_object())
    assert info.value.status == 402 and not db.has_account(key.id)
    db.set_out_since(key.id, None)
    envelope = ManifestPointer(key.id, 2, new_object_id(), b"sealed", int(time.time())).seal(key)  # type: ignore[arg-type]
    await expect_error(net, "PUT", "/v1/pointer", 409, key=key, json={"pointer": envelope.to_json()})
    assert not db.has_account(key.id)
    envelope = ManifestPointer(key.id, 1, new_object_id(), b"sealed", int(time.time())).seal(key)  # type: ignore[arg-type]
    await rpc.call_json(net.client, "PUT", f"{net.url}/v1/pointer", key=key, json={"pointer": envelope.to_json()})
    assert db.has_account(key.id)
    other = SigningKey.generate()
    await place(net.client, net.url, other, make_object())
    assert db.has_account(other.id)


async def test_announce_must_be_signed_by_the_node(net: Net) -> None:
    from fincryptfs.core.messages import NodeAnnouncement
    impostor = SigningKey.generate()
    ann = NodeAnnouncement(net.nodes[0].node_id, "http://127.0.0.1:1", 1, 10, 10, "", None)  # type: ignore[arg-type]
    await expect_error(net, "POST", "/v1/nodes/announce", 403, key=impostor, json=ann.to_json(),
                       fragment="signed by the node")
    assert net.mediator.service.db.node(net.nodes[0].node_id).url == net.nodes[0].url  # type: ignore[union-attr]


async def test_a_node_with_an_unusable_url_is_refused_and_breaks_nothing(net: Net) -> None:
    """A URL the codec or the HTTP client cannot parse is a 400 at announce; a row stored before that check
    existed is placed around without a 500 and audited as unreachable, not as a crash of the round."""
    from fincryptfs.core.messages import NodeAnnouncement
    evil = SigningKey.generate()
    for url in ("http://[x", "http://[::1", "http://1.2.3.999"):
        ann = NodeAnnouncement(evil.id, url, 0, 1 << 40, 1 << 40, "evil", None)  # type: ignore[arg-type]
        await expect_error(net, "POST", "/v1/nodes/announce", 400, key=evil, json=ann.to_json(), fragment="url")
    assert net.mediator.service.db.node(evil.id) is None

    db = net.mediator.service.db
    db.upsert_node(node_id=evil.id, public_key=evil.public.raw, url="http://[::1", price=0, capacity=1 << 40,
                   free=1 << 40, operator="evil", payout_address=None, now=time.time())
    obj = make_object()
    stored = await upload(net.client, net.url, net.account, obj)  # the cheapest node is passed over: no 500
    assert evil.id not in {node_id for node_id, _ in stored.values()}
    share = db.shares_of(obj.object_id)[0]
    db.put_share(replace(share, node_id=evil.id), time.time())
    service = net.mediator.service
    service.settings = replace(service.settings, audit_period=0.5, audit_retries=0)  # no 30 s retry waits
    outcomes = await upkeep.audit_round(service, net.client, time.time())
    assert outcomes[evil.id].result == "unreachable"


async def test_streamed_upload_places_without_roots_and_commits_the_receipts_roots(net: Net) -> None:
    """A client that streams shares while encoding them places them before it knows their roots: the grants
    name none, the nodes' receipts state them, and the commit must name those very roots; a share re-placed
    later with its root known gets a grant naming it."""
    obj = make_object()
    open_obj = replace(obj, specs=tuple(replace(spec, merkle_root=None) for spec in obj.specs))
    placements = {p.index: p for p in await place(net.client, net.url, net.account, open_obj)}
    assert all(UploadGrant.open(p.grant).merkle_root is None for p in placements.values())
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert all("merkle_root" not in s for s in status["shares"]), "a placed share's root is not known yet"
    stored = {i: (p.node_id, await put_share(net.client, p, obj)) for i, p in placements.items() if i != 3}
    for i, (_, receipt) in stored.items():
        assert StorageReceipt.open(receipt).merkle_root == obj.specs[i].merkle_root
    # a commit naming another root than the one the node received and signed is refused
    wrong = replace(obj, specs=tuple(replace(s, merkle_root=bytes(32)) if s.index == 0 else s for s in obj.specs))
    await expect_error(net, "POST", "/v1/objects/commit", 400, key=net.account, json=commit_body(wrong, stored),
                       fragment="does not match the share it is attached to")
    # share 3's node failed; committing without it must name its root, or repair could never rebuild it
    await expect_error(net, "POST", "/v1/objects/commit", 422, key=net.account, json=commit_body(obj, stored),
                       fragment="must name every share's root")
    await rpc.call_json(net.client, "POST", f"{net.url}/v1/objects/commit", key=net.account,
                        json=commit_body(obj, stored, roots=True))
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert {s["index"]: b64decode(s["merkle_root"], field="root") for s in status["shares"]} == {
        spec.index: spec.merkle_root for spec in obj.specs}
    # a share re-placed with its root known gets a grant naming it
    again = (await place(net.client, net.url, net.account, obj, indices=[3], exclude=(placements[3].node_id,)))[0]
    assert UploadGrant.open(again.grant).merkle_root == obj.specs[3].merkle_root
    stored[3] = (again.node_id, await put_share(net.client, again, obj))
    await rpc.call_json(net.client, "POST", f"{net.url}/v1/objects/commit", key=net.account,
                        json=commit_body(obj, stored))
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert {s["state"] for s in status["shares"]} == {"stored"}


async def test_repair_rebuilds_a_streamed_share_that_never_landed(net: Net) -> None:
    """A streamed upload committed with n-1 shares: the missing one's root came with the commit, and repair
    rebuilds that share on another node and verifies it against that root."""
    obj = make_object()
    open_obj = replace(obj, specs=tuple(replace(spec, merkle_root=None) for spec in obj.specs))
    placements = {p.index: p for p in await place(net.client, net.url, net.account, open_obj)}
    stored = {i: (p.node_id, await put_share(net.client, p, obj)) for i, p in placements.items() if i != 2}
    await rpc.call_json(net.client, "POST", f"{net.url}/v1/objects/commit", key=net.account,
                        json=commit_body(obj, stored, roots=True))
    assert await upkeep.repair_object(net.mediator.service, net.client, obj.object_id, time.time()) == "repaired"
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"]["healthy"] == 4
    rebuilt = next(s for s in status["shares"] if s["index"] == 2)
    assert rebuilt["state"] == "stored" and b64decode(rebuilt["merkle_root"], field="root") == obj.specs[2].merkle_root


async def test_commits_never_put_two_shares_of_an_object_on_one_node(net: Net) -> None:
    obj = make_object()
    first = {p.index: p for p in await place(net.client, net.url, net.account, obj)}
    moved0 = (await place(net.client, net.url, net.account, obj, indices=[0], exclude=(first[0].node_id,)))[0]
    moved1 = (await place(net.client, net.url, net.account, obj, indices=[1], exclude=(first[1].node_id,)))[0]
    assert moved1.node_id == first[0].node_id  # free again for this object once share 0 moved away
    # the client still uses the stale grant for share 0 and the new one for share 1: both on one node
    stored = {0: (first[0].node_id, await put_share(net.client, first[0], obj)),
              1: (moved1.node_id, await put_share(net.client, moved1, obj))}
    for i in (2, 3):
        stored[i] = (first[i].node_id, await put_share(net.client, first[i], obj))
    # the stale receipt commits nothing: share 0 is placed elsewhere now
    await expect_error(net, "POST", "/v1/objects/commit", 409, key=net.account,
                       json=commit_body(obj, {i: stored[i] for i in (0, 2, 3)}), fragment="re-placed or repaired")
    await rpc.call_json(net.client, "POST", f"{net.url}/v1/objects/commit", key=net.account,
                        json=commit_body(obj, {i: stored[i] for i in (1, 2, 3)}))
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    holders = [s["node_id"] for s in status["shares"] if s["state"] == "stored"]
    assert len(holders) == len(set(holders)) == 3
    assert moved0.node_id != first[0].node_id


async def test_an_abandoned_upload_is_swept_and_its_landed_shares_released(net: Net) -> None:
    """A client placed an object, stored one share and died before committing: a day after the grants expired
    the mediator queues every granted (share, node) for release and forgets the object, so the node does not
    keep unpaid bytes forever; before that, nothing is touched (a slow upload may still commit)."""
    from mediatord.service import GRANT_LIFETIME

    kept = make_object()  # committed: none of its shares may be swept
    await upload(net.client, net.url, net.account, kept)
    obj = make_object()
    placements = await place(net.client, net.url, net.account, obj)
    landed = placements[0]
    stored = {landed.index: (landed.node_id, await put_share(net.client, landed, obj))}
    node = next(n for n in net.nodes if n.node_id == landed.node_id)
    held = (await net.client.get(f"{node.url}/health")).json()["shares"]
    service, now = net.mediator.service, time.time()
    assert upkeep.sweep_stale_uploads(service, now + GRANT_LIFETIME + 60) == (0, 0)
    later = now + GRANT_LIFETIME + upkeep.STALE_UPLOAD_AFTER + 60
    assert upkeep.sweep_stale_uploads(service, later) == (len(placements), 1)
    assert await upkeep.release_pass(service, net.client, later) == len(placements)
    assert (await net.client.get(f"{node.url}/health")).json()["shares"] == held - 1
    assert upkeep.sweep_stale_uploads(service, later) == (0, 0)
    status = await object_status(net.client, net.url, net.account, kept.object_id)
    assert status["health"]["healthy"] == kept.layout.n
    with pytest.raises(rpc.PeerError) as info:  # too late to commit: the object is gone
        await rpc.call(net.client, "POST", f"{net.url}/v1/objects/commit", key=net.account,
                       json=commit_body(obj, stored))
    assert info.value.status == 404


async def _announce_many(client: httpx.AsyncClient, url: str, count: int, capacity: int) -> None:
    for i in range(count):
        key = SigningKey.generate()
        ann = NodeAnnouncement(key.id, f"http://10.{i // 250}.{i % 250}.1:9", 1, capacity, capacity,  # type: ignore[arg-type]
                               f"big{i}", None)
        await rpc.call_json(client, "POST", f"{url}/v1/nodes/announce", key=key, json=ann.to_json())


async def test_huge_announced_capacities_keep_the_node_list_answering(tmp_path: Path, nursery: trio.Nursery
                                                                     ) -> None:
    """Each announcement may claim up to 2^60 bytes; nine of them sum past the wire's 64-bit integers, which once
    made GET /v1/nodes answer everyone 400 "integer out of the 64-bit range"."""
    mediator = await start_mediator(nursery, tmp_path / "mediator")
    async with rpc.new_client() as client:
        await _announce_many(client, mediator.url, 9, 1 << 60)
        listing = await client.get(f"{mediator.url}/v1/nodes")
    assert listing.status_code == 200, listing.text
    assert len(listing.json()["nodes"]) == 9 and listing.json()["capacity_bytes"] == 2**63 - 1


async def test_an_account_cannot_place_past_what_its_byte_count_can_hold(tmp_path: Path, nursery: trio.Nursery
                                                                         ) -> None:
    """Objects of 2^58 bytes (k=1, n=256 over 256 announced nodes), each placed fine, once summed past SQLite's
    64-bit integers and every later place of that account was a 500 (sqlite3 "integer overflow")."""
    mediator = await start_mediator(nursery, tmp_path / "mediator")
    account = SigningKey.generate()
    layout = ObjectLayout(2**50 - 2**29, 64 << 20, 1, 256)
    statuses = []
    async with rpc.new_client() as client:
        await _announce_many(client, mediator.url, 256, 1 << 60)
        for _ in range(2**63 // (layout.share_size * layout.n) + 2):
            specs = tuple(ShareSpec(i, new_share_id(), layout.share_size, os.urandom(32)) for i in range(layout.n))
            req = PlaceRequest(new_object_id(), layout, specs)  # type: ignore[arg-type]
            target = f"{mediator.url}/v1/objects/place"
            body = canonical_json(req.to_json())
            response = await client.post(target, content=body,
                                         headers=rpc.signed_headers(account, "POST", target, body))
            statuses.append(response.status_code)
            if response.status_code != 200:
                break
        assert statuses[-1] == 422 and "more than" in response.json()["error"], (statuses, response.text)
        placed = mediator.service.db.account_bytes(account.id, committed_only=False)
        assert placed == (len(statuses) - 1) * layout.share_size * layout.n  # the refused one changed nothing
        target = f"{mediator.url}/v1/account"
        account_answer = await client.get(target, headers=rpc.signed_headers(account, "GET", target, b""))
        assert account_answer.status_code == 200, account_answer.text


async def test_a_node_the_acceptance_rule_refuses_since_a_restart_gets_no_new_shares(tmp_path: Path,
                                                                                      nursery: trio.Nursery) -> None:
    """An operator who denies a node restarts the mediator with the new rule: the node's announcements are then
    refused, but its row is still online (and answered audits would keep it so), so placement itself must ask
    the rule, not only the announcement."""
    async with trio.open_nursery() as stopped_before_the_restart:
        first = await start_mediator(stopped_before_the_restart, tmp_path / "m")
        nodes = [await start_node(nursery, tmp_path, first.url, i) for i in range(5)]
        await wait_online(first, 5)
        first.scope.cancel()
    port = first.url.rsplit(":", 1)[1]
    refused = nodes[0].node_id  # the cheapest
    second = await start_mediator(nursery, tmp_path / "m", MEDIATORD_LISTEN=f"127.0.0.1:{port}",
                                  MEDIATORD_ACCEPT_NODES=f"deny:{refused}")
    assert second.url == first.url
    async with rpc.new_client() as client:
        placements = await place(client, second.url, SigningKey.generate(), make_object())
        assert refused not in {p.node_id for p in placements} and len(placements) == 4
        status = await rpc.call_json(client, "GET", f"{second.url}/v1/nodes")
    # still online: placement, not the node's state, must be what leaves it out
    assert {n["node_id"]: n["state"] for n in status["nodes"]}.get(refused) == "online"
    second.scope.cancel()
