"""Audits, reputation, offline detection and repair against real storaged nodes on 127.0.0.1.

Audit rounds and repair passes are called directly (the mediator runs without its timers) so each step is
deterministic; node timing (announce every 0.2 s, offline after 1 s) is real. test_daemon.py runs the timers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import mediator_net
import pytest
import trio
from mediator_net import (
    Node,
    SampleObject,
    make_object,
    object_status,
    share_data_file,
    start_mediator,
    start_node,
    stop_node,
    upload,
    wait_online,
)

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from mediatord import audit, registry, upkeep
from mediatord.audit import UNRESPONSIVE_AFTER


@dataclass
class Net(mediator_net.Net):
    root: Path
    nursery: trio.Nursery

    @property
    def service(self):  # type: ignore[no-untyped-def]
        return self.mediator.service

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    async def restart(self, node: Node) -> Node:
        index = self.nodes.index(node)
        back = await start_node(self.nursery, self.root, self.url, index, port=int(node.url.rsplit(":", 1)[1]))
        self.nodes[index] = back
        return back

    async def round(self) -> dict[str, str]:
        outcomes = await upkeep.audit_round(self.service, self.client, time.time())
        return {node_id: o.result for node_id, o in outcomes.items()}

    async def repair(self) -> dict[str, str]:
        return await upkeep.repair_pass(self.service, self.client, time.time())

    async def upload(self, obj: SampleObject) -> dict[int, str]:
        stored = await upload(self.client, self.url, self.account, obj)
        return {i: node_id for i, (node_id, _) in stored.items()}


@pytest.fixture
async def net(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Net]:
    mediator = await start_mediator(nursery, tmp_path / "mediator", MEDIATORD_AUDIT_LEAVES_PER_SHARE="64",
                                    MEDIATORD_AUDIT_PERIOD="0.5", MEDIATORD_AUDIT_RETRIES="2",
                                    MEDIATORD_NODE_OFFLINE_AFTER="1")
    nodes = [await start_node(nursery, tmp_path, mediator.url, i) for i in range(6)]
    await wait_online(mediator, 6)
    async with rpc.new_client() as client:
        yield Net(mediator, nodes, client, SigningKey.generate(), tmp_path, nursery)
    nursery.cancel_scope.cancel()


def flip_byte(path: Path, offset: int = 5000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def wait_offline(net: Net, node_id: str) -> None:
    with trio.fail_after(10):
        while True:
            upkeep.offline_pass(net.service, time.time())
            if net.service.db.node(node_id).state == "offline":  # type: ignore[union-attr]
                return
            await trio.sleep(0.1)


async def test_round_passes_and_records_one_pass_per_round_and_node(net: Net) -> None:
    placed = await net.upload(make_object())
    await net.upload(make_object())
    results = await net.round()
    assert set(results) >= set(placed.values()) and set(results.values()) == {"passed"}
    db = net.service.db
    passes = db.audit_passes()
    assert {(r, n) for r, n, *_ in passes} == {(1, n) for n in results}
    assert all(shares >= 1 and size >= shares * 12000 for _, _, shares, size, _ in passes)
    assert db.record_pass(1, passes[0][1], 99, 99, time.time()) is False  # idempotent billing seam
    node = db.node(placed[0])
    assert node is not None and node.passed == 1 and node.reputation == pytest.approx(2 / 3)
    assert net.service.status()["audits_passed"] == len(results)
    await net.round()
    assert len(db.audit_passes()) == 2 * len(results)


async def test_corrupted_share_is_lost_then_repaired_byte_for_byte(net: Net) -> None:
    obj = make_object()
    placed = await net.upload(obj)
    victim = net.node(placed[1])
    flip_byte(share_data_file(victim, obj.specs[1].share_id))
    results = await net.round()
    assert results[victim.node_id] == "failed"
    assert [r for n, r in results.items() if n != victim.node_id] == ["passed"] * 3
    assert net.service.db.share(obj.specs[1].share_id).state == "lost"  # type: ignore[union-attr]
    row = net.service.db.node(victim.node_id)
    assert row is not None and row.consecutive_failures == 1 and row.state == "online"
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"] == {"healthy": 3, "total": 4, "state": "degraded"}
    # 3 of 4 shares left hold 1.5x the data, below the 2x minimum: repaired at once
    assert await net.repair() == {obj.object_id: "repaired"}
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"]["healthy"] == 4
    moved = {s["index"]: s["node_id"] for s in status["shares"]}
    assert len(set(moved.values())) == 4 and moved[1] not in placed.values()
    assert share_data_file(net.node(moved[1]), obj.specs[1].share_id).read_bytes() == obj.shares[1]
    prices = {c.node_id: c.price for c in registry.candidates(net.service.db, net.service.pricing, time.time())}
    assert {s.idx: s.price for s in net.service.db.shares_of(obj.object_id)} == {  # credited at most at these
        i: prices[node_id] for i, node_id in moved.items()}
    # the corrupt copy is released from the old node
    assert await upkeep.release_pass(net.service, net.client, time.time()) == 1
    assert not share_data_file(victim, obj.specs[1].share_id).exists()
    assert set((await net.round()).values()) == {"passed"}


async def test_deleted_share_file_fails_the_audit(net: Net) -> None:
    obj = make_object()
    placed = await net.upload(obj)
    victim = net.node(placed[0])
    path = share_data_file(victim, obj.specs[0].share_id)
    path.unlink()
    results = await net.round()
    assert results[victim.node_id] == "failed"
    assert net.service.db.share(obj.specs[0].share_id).state == "lost"  # type: ignore[union-attr]
    rounds = net.service.db.round_results(victim.node_id)
    assert rounds[-1][1] == "failed" and "lost" in rounds[-1][2]


async def test_repeated_failures_disqualify_and_shares_move(net: Net) -> None:
    objects = [make_object() for _ in range(3)]
    placements = [await net.upload(o) for o in objects]
    cheapest = net.nodes[0]  # asks the least, so it holds a share of every object
    held = [(o, next(i for i, n in p.items() if n == cheapest.node_id)) for o, p in zip(objects, placements,
                                                                                         strict=True)]
    for number, (obj, index) in enumerate(held, start=1):
        flip_byte(share_data_file(cheapest, obj.specs[index].share_id))
        assert (await net.round())[cheapest.node_id] == "failed"
        row = net.service.db.node(cheapest.node_id)
        assert row is not None and row.consecutive_failures == number
    assert row.state == "disqualified" and row.reputation == pytest.approx(1 / 5)
    # a disqualified node may not come back through an announcement
    await trio.sleep(0.5)
    assert net.service.db.node(cheapest.node_id).state == "disqualified"  # type: ignore[union-attr]
    actions = await net.repair()
    assert set(actions.values()) == {"repaired"}
    for obj in objects:
        status = await object_status(net.client, net.url, net.account, obj.object_id)
        assert status["health"]["healthy"] == 4
        assert cheapest.node_id not in {s["node_id"] for s in status["shares"]}


async def test_outage_lowers_reputation_then_offline_shares_move_and_node_returns(net: Net) -> None:
    obj = make_object()
    placed = await net.upload(obj)
    victim = net.node(placed[3])
    await stop_node(victim)
    results = await net.round()
    assert results[victim.node_id] == "unreachable"
    row = net.service.db.node(victim.node_id)
    assert row is not None and row.consecutive_failures == 0 and row.failed == 1 and row.state == "online"
    assert row.reputation < 0.5
    await wait_offline(net, victim.node_id)
    assert await net.repair() == {obj.object_id: "repaired"}  # 3 of 4 healthy is 1.5x, below the 2x minimum
    second = net.node(placed[2])
    await stop_node(second)
    await wait_offline(net, second.node_id)
    assert await net.repair() == {obj.object_id: "repaired"}
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"]["healthy"] == 4
    back = await net.restart(victim)
    await wait_online(net.mediator, 5)
    assert net.service.db.node(back.node_id).state == "online"  # type: ignore[union-attr]
    assert share_data_file(back, obj.specs[3].share_id).exists()
    await upkeep.release_pass(net.service, net.client, time.time())
    assert not share_data_file(back, obj.specs[3].share_id).exists()  # its stale copy is released


async def test_irreparable_sends_no_repair_traffic_and_recovers(net: Net) -> None:
    obj = make_object()
    placed = await net.upload(obj)
    holders = [net.node(placed[i]) for i in range(3)]
    for node in holders:
        await stop_node(node)
    for node in holders:
        await wait_offline(net, node.node_id)
    assert await net.repair() == {obj.object_id: "irreparable"}
    assert await net.repair() == {obj.object_id: "irreparable"}
    assert [r[1] for r in net.service.db.repairs()] == ["irreparable"]  # one alert, no fetch attempts
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"]["state"] == "irreparable"
    assert net.service.status()["objects_irreparable"] == 1
    for node in holders[:2]:
        await net.restart(node)
    await wait_online(net.mediator, 5)
    assert await net.repair() == {obj.object_id: "repaired"}  # recovered, and 3 of 4 (1.5x) is repaired
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"] == {"healthy": 4, "total": 4, "state": "healthy"}


async def test_delete_during_repair_leaves_nothing_behind(net: Net) -> None:
    obj = make_object()
    placed = await net.upload(obj)
    for index in (0, 1):
        share_data_file(net.node(placed[index]), obj.specs[index].share_id).unlink()
    await net.round()
    outcome: list[str] = []

    async def repair() -> None:
        outcome.append(await upkeep.repair_object(net.service, net.client, obj.object_id, time.time()))

    async with trio.open_nursery() as inner:
        inner.start_soon(repair)
        await trio.sleep(0)
        await rpc.call(net.client, "DELETE", f"{net.url}/v1/objects/{obj.object_id}", key=net.account)
    assert outcome[0] in ("aborted", "repaired"), outcome
    await upkeep.release_pass(net.service, net.client, time.time())
    for node in net.nodes:
        assert (await net.client.get(f"{node.url}/health")).json()["shares"] == 0
    assert net.service.db.shares_of(obj.object_id) == []
    assert await upkeep.repair_object(net.service, net.client, obj.object_id, time.time()) == "aborted"


async def test_client_report_triggers_an_audit_of_that_node(net: Net) -> None:
    obj = make_object()
    placed = await net.upload(obj)
    victim = net.node(placed[0])
    flip_byte(share_data_file(victim, obj.specs[0].share_id), offset=10)
    report = {"share_id": obj.specs[0].share_id, "node_id": victim.node_id, "problem": "merkle proof failed"}
    answer = await rpc.call_json(net.client, "POST", f"{net.url}/v1/objects/{obj.object_id}/report",
                                 key=net.account, json=report)
    assert answer == {"scheduled": True, "node_id": victim.node_id}
    results = await upkeep.requested_audits(net.service, net.client, time.time())
    assert results[victim.node_id].result == "failed"
    assert net.service.db.share(obj.specs[0].share_id).state == "lost"  # type: ignore[union-attr]
    with pytest.raises(rpc.PeerError) as info:
        await rpc.call_json(net.client, "POST", f"{net.url}/v1/objects/{obj.object_id}/report",
                            key=SigningKey.generate(), json=report)
    assert info.value.status == 403


async def test_reports_in_a_loop_get_one_out_of_turn_audit_per_gap(net: Net) -> None:
    obj = make_object()
    placed = await net.upload(obj)
    node_id = placed[1]
    report = {"share_id": obj.specs[1].share_id, "node_id": node_id, "problem": "merkle proof failed"}

    async def report_many(times: int) -> None:
        for _ in range(times):
            await rpc.call_json(net.client, "POST", f"{net.url}/v1/objects/{obj.object_id}/report",
                                key=net.account, json=report)

    gap = audit.out_of_turn_gap(net.service.settings.audit_period)
    now = time.time()
    await report_many(3)
    assert list(await upkeep.requested_audits(net.service, net.client, now)) == [node_id]  # one audit for three
    assert await upkeep.requested_audits(net.service, net.client, now + 1) == {}
    await report_many(3)
    for later in (now + 1, now + gap / 2, now + gap - 1):  # housekeeping passes within the gap audit nothing
        assert await upkeep.requested_audits(net.service, net.client, later) == {}
    assert list(await upkeep.requested_audits(net.service, net.client, now + gap)) == [node_id]
    assert await upkeep.requested_audits(net.service, net.client, now + 3 * gap) == {}  # coalesced: served
    assert len(net.service.db.round_results(node_id)) == 2


async def test_streamed_repair_swaps_a_source_found_corrupt_midway(net: Net,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Repair reads and writes one segment per step here: a source share whose last bytes are corrupt (the
    audit had not sampled them) fails its Merkle proof at the last step, is marked lost and replaced by another
    source, and the rebuilt shares still arrive byte for byte."""
    monkeypatch.setattr(upkeep, "REPAIR_STEP_BYTES", 5000)
    for index in (6, 7):  # 5 shares, 2 of them moving to nodes that held none: 7 nodes at least
        net.nodes.append(await start_node(net.nursery, net.root, net.url, index))
    await wait_online(net.mediator, 8)
    obj = make_object(k=2, n=5, padded_size=10 * 8192 + 100)
    assert obj.layout.segment_count == 11
    placed = await net.upload(obj)
    for index in (0, 1):
        share_data_file(net.node(placed[index]), obj.specs[index].share_id).unlink()
    await net.round()
    path = share_data_file(net.node(placed[2]), obj.specs[2].share_id)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert await net.repair() == {obj.object_id: "repaired"}
    assert net.service.db.share(obj.specs[2].share_id).state == "lost"  # type: ignore[union-attr]
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    moved = {s["index"]: s["node_id"] for s in status["shares"]}
    for index in (0, 1):
        assert share_data_file(net.node(moved[index]), obj.specs[index].share_id).read_bytes() == obj.shares[index]


async def test_a_node_announcing_but_never_answering_turns_unresponsive_until_it_answers(net: Net) -> None:
    """A node whose announced URL leads nowhere (a wrong public URL, a lost disk behind a proxy) keeps announcing,
    so it never goes offline: after UNRESPONSIVE_AFTER unreachable rounds its shares stop counting and are
    repaired, its announcements do not undo that, and an answered round does."""
    obj = make_object()
    placed = await net.upload(obj)
    silent = []
    for node in (net.node(placed[2]), net.node(placed[3])):
        await stop_node(node)
        index = net.nodes.index(node)
        net.nodes[index] = await start_node(net.nursery, net.root, net.url, index,
                                            port=int(node.url.rsplit(":", 1)[1]),
                                            STORAGED_PUBLIC_URL="http://127.0.0.1:1")  # nothing listens there
        silent.append(net.nodes[index])
    db = net.service.db
    with trio.fail_after(10):
        while {db.node(n.node_id).url for n in silent} != {"http://127.0.0.1:1"}:  # type: ignore[union-attr]
            await trio.sleep(0.05)
    for number in range(1, UNRESPONSIVE_AFTER + 1):
        results = await net.round()
        assert {results[n.node_id] for n in silent} == {"unreachable"}
        await trio.sleep(0.3)  # the silent nodes announce again meanwhile
        states = {db.node(n.node_id).state for n in silent}  # type: ignore[union-attr]
        assert states == ({"online"} if number < UNRESPONSIVE_AFTER else {"unresponsive"})
        if number < UNRESPONSIVE_AFTER:
            assert await net.repair() == {}
    assert await net.repair() == {obj.object_id: "repaired"}
    status = await object_status(net.client, net.url, net.account, obj.object_id)
    assert status["health"]["healthy"] == 4
    assert not {n.node_id for n in silent} & {s["node_id"] for s in status["shares"]}
    fresh = await net.upload(make_object())  # no new shares for them either: four other nodes are left
    assert not {n.node_id for n in silent} & set(fresh.values())
    assert db.counts()["nodes_unresponsive"] == 2

    fixed = silent[0]  # its operator corrects the URL: the next round asks it (holding nothing) and it answers
    await stop_node(fixed)
    back = await net.restart(fixed)
    await trio.sleep(0.3)
    assert db.node(back.node_id).state == "unresponsive"  # type: ignore[union-attr]
    await net.round()
    row = db.node(back.node_id)
    assert row is not None and row.state == "online" and row.unreachable_rounds == 0
    assert db.node(silent[1].node_id).state == "unresponsive"  # type: ignore[union-attr]


async def test_a_replayed_commit_cannot_move_a_share_back_or_revive_a_lost_one(net: Net) -> None:
    """A receipt commits its share once: repeating the same commit is harmless, but an old receipt can neither
    mark a share found lost as stored again nor point a repaired share back at the node it left (which released
    it, and would then fail audits for a share it was told to delete)."""
    obj = make_object()
    stored = await mediator_net.upload(net.client, net.url, net.account, obj)
    original = mediator_net.commit_body(obj, stored)
    commit_url = f"{net.url}/v1/objects/commit"
    await rpc.call_json(net.client, "POST", commit_url, key=net.account, json=original)  # the same state again
    db = net.service.db
    assert {s.state for s in db.shares_of(obj.object_id)} == {"stored"}

    old_holder = net.node(stored[0][0])
    flip_byte(share_data_file(old_holder, obj.specs[0].share_id))
    assert (await net.round())[old_holder.node_id] == "failed"
    with pytest.raises(rpc.PeerError) as info:
        await rpc.call_json(net.client, "POST", commit_url, key=net.account, json=original)
    assert info.value.status == 401 and "already committed" in str(info.value)
    assert db.shares_of(obj.object_id)[0].state == "lost"

    assert await net.repair() == {obj.object_id: "repaired"}
    moved_to = db.shares_of(obj.object_id)[0].node_id
    assert moved_to != old_holder.node_id
    await upkeep.release_pass(net.service, net.client, time.time())
    with pytest.raises(rpc.PeerError) as info:
        await rpc.call_json(net.client, "POST", commit_url, key=net.account, json=original)
    assert info.value.status == 401
    row = db.shares_of(obj.object_id)[0]
    assert (row.node_id, row.state) == (moved_to, "stored")
    assert set((await net.round()).values()) == {"passed"}
    assert db.node(old_holder.node_id).consecutive_failures == 1  # type: ignore[union-attr]


async def test_a_node_trickling_its_answers_holds_up_neither_the_audit_round_nor_the_releases(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that answers a byte every 0.2 s never pauses long enough for a per-read timeout. The round waits
    for every node and the releases go one after another, so before each exchange had a deadline of its own,
    one such node stopped audits (hence payments and repairs) and releases for everyone."""
    from netfixtures import Gate
    monkeypatch.setattr(upkeep.UpkeepSettings, "exchange_deadline", property(lambda self: 2.0))
    monkeypatch.setattr(upkeep, "MIN_TRANSFER_RATE", 1 << 20)
    obj = make_object()
    placed = await net.upload(obj)
    node = net.node(placed[0])
    await stop_node(node)
    gate = Gate()
    gate_url = f"http://127.0.0.1:{await net.nursery.start(gate.serve)}"
    index = net.nodes.index(node)
    back = net.nodes[index] = await start_node(net.nursery, net.root, net.url, index,
                                               port=int(node.url.rsplit(":", 1)[1]), STORAGED_PUBLIC_URL=gate_url)
    gate.target = back.settings.listen
    db = net.service.db
    with trio.fail_after(10):
        while db.node(back.node_id).url != gate_url:  # type: ignore[union-attr]
            await trio.sleep(0.05)
    gate.trickle = 0.2
    with trio.fail_after(30):
        results = await net.round()
    assert results[back.node_id] == "unreachable"
    assert {results[n] for n in placed.values() if n != back.node_id} == {"passed"}
    await rpc.call(net.client, "DELETE", f"{net.url}/v1/objects/{obj.object_id}", key=net.account)
    with trio.fail_after(30):
        done = await upkeep.release_pass(net.service, net.client, time.time())
    assert done == len(placed) - 1  # every other holder released; the trickling one is retried later


async def test_a_node_announces_a_share_it_found_lost_and_is_audited_out_of_turn(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that finds a share gone (here on a read) says so in an announcement made soon after, not at its
    next regular one: the mediator audits it out of turn and repair can start at once, instead of up to a period
    later at the next round. Its word only schedules the audit; the audit finds the share lost."""
    from storaged import service as node_service
    monkeypatch.setattr(node_service, "LOSS_ANNOUNCE_GAP", 0.3)
    obj = make_object()
    placed = await net.upload(obj)
    node = net.node(placed[1])
    await stop_node(node)
    index = net.nodes.index(node)
    back = net.nodes[index] = await start_node(net.nursery, net.root, net.url, index,
                                               port=int(node.url.rsplit(":", 1)[1]), STORAGED_ANNOUNCE_INTERVAL="60")
    await trio.sleep(0.5)  # its first announcement after the start (no losses) is in
    assert back.node_id not in net.service.out_of_turn.requested
    share_id = obj.specs[1].share_id
    share_data_file(back, share_id).unlink()
    with pytest.raises(rpc.PeerError) as info:
        await rpc.call(net.client, "GET", f"{back.url}/v1/shares/{share_id}", key=net.account, audience=back.node_id)
    assert info.value.status == 404
    with trio.fail_after(5):  # the regular announcement would come a minute later
        while back.node_id not in net.service.out_of_turn.requested:
            await trio.sleep(0.05)
    results = await upkeep.requested_audits(net.service, net.client, time.time())
    assert results[back.node_id].result == "failed"
    assert net.service.db.share(share_id).state == "lost"  # type: ignore[union-attr]
    assert await net.repair() == {obj.object_id: "repaired"}


async def test_an_audit_judged_after_its_share_moved_blames_neither_node(net: Net) -> None:
    """An audit asks a node about the shares it held when the audit started; an out-of-turn audit of a slow
    node can outlast a repair that moves one of them away (and the release that deletes the old copy). The
    node then rightly says it no longer holds that share: that must neither fail the node nor mark the new,
    healthy copy on the other node lost."""
    obj = make_object()
    placed = await net.upload(obj)
    db = net.service.db
    old = net.node(placed[0])
    asked = db.audit_shares(old.node_id)  # what the audit asks, fixed when it starts
    await stop_node(old)
    await wait_offline(net, old.node_id)
    assert await net.repair() == {obj.object_id: "repaired"}
    share_id = obj.specs[0].share_id
    new_holder = db.share(share_id).node_id  # type: ignore[union-attr]
    back = await net.restart(old)
    await wait_online(net.mediator, 6)
    await upkeep.release_pass(net.service, net.client, time.time())
    assert not share_data_file(back, share_id).exists()
    row = db.node(back.node_id)
    assert row is not None
    result = await upkeep.audit_node(net.service, net.client, row, net.service.new_round_id(), asked, time.time())
    assert result.result == "passed" and not result.lost
    assert (db.share(share_id).node_id, db.share(share_id).state) == (new_holder, "stored")  # type: ignore[union-attr]
    assert db.node(back.node_id).consecutive_failures == 0  # type: ignore[union-attr]


async def test_repair_skips_a_node_whose_stale_copy_is_still_to_be_released(net: Net) -> None:
    """A node that went offline keeps its copy of a share repaired elsewhere until the release reaches it, which
    after its outage may be up to an hour later (backoff). Repair must not pick it for that object meanwhile:
    it would refuse the share it still holds (409) and every pass would download k shares for nothing, and a
    copy of another share of the object would sit on it next to the stale one."""
    obj = make_object()
    placed = await net.upload(obj)
    db = net.service.db
    away = net.node(placed[0])  # the cheapest node: placement prefers it whenever it may
    await stop_node(away)
    await wait_offline(net, away.node_id)
    assert await net.repair() == {obj.object_id: "repaired"}
    share_id = obj.specs[0].share_id
    first_move = db.share(share_id).node_id  # type: ignore[union-attr]
    assert await upkeep.release_pass(net.service, net.client, time.time()) == 0  # it is down: retried later
    back = await net.restart(away)
    await wait_online(net.mediator, 6)
    await stop_node(net.node(first_move))
    await wait_offline(net, first_move)
    assert share_data_file(back, share_id).exists()  # the release is not due yet
    assert await net.repair() == {obj.object_id: "repaired"}
    holders = [s.node_id for s in db.shares_of(obj.object_id)]
    assert back.node_id not in holders and len(set(holders)) == 4
    assert await upkeep.release_pass(net.service, net.client, time.time() + 10) >= 1
    assert not share_data_file(back, share_id).exists()


async def test_a_late_release_never_deletes_the_copy_the_record_names(net: Net) -> None:
    """A release is queued when a share leaves a node and retried (for up to a day) while the node is away. If
    the share is recorded on that node again by the time the release is sent (placement now avoids such nodes,
    but a release queued by the sweep or left by an older mediator can still meet one), the release must be
    dropped instead of deleting the copy the record names."""
    obj = make_object()
    placed = await net.upload(obj)
    db = net.service.db
    holder = net.node(placed[0])
    share_id = obj.specs[0].share_id
    db.queue_release(share_id, holder.node_id, time.time())
    assert net.service.status()["releases_pending"] == 1
    await upkeep.release_pass(net.service, net.client, time.time())
    assert share_data_file(holder, share_id).read_bytes() == obj.shares[0]
    assert net.service.status()["releases_pending"] == 0
    assert (await net.round())[holder.node_id] == "passed"


async def test_re_placing_a_share_found_lost_never_puts_it_back_on_the_node_that_lost_it(net: Net) -> None:
    """A client re-placing a share that an audit found lost need not know where it was: the node that failed
    that share (here it still holds the corrupt copy, so it would refuse the upload with 409) is not chosen."""
    obj = make_object()
    placed = await net.upload(obj)
    loser = net.node(placed[0])  # the cheapest node, which placement prefers
    flip_byte(share_data_file(loser, obj.specs[0].share_id))
    assert (await net.round())[loser.node_id] == "failed"
    again = await mediator_net.place(net.client, net.url, net.account, obj, indices=[0])
    assert again[0].node_id not in set(placed.values())
    await mediator_net.put_share(net.client, again[0], obj)
