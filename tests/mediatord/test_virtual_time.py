"""Two virtual days of the mediator's own loops against six real storage nodes, in a few real seconds.

mediatord runs with its upkeep loops on and the production timings (audit every 3600 s, offline after 3 h,
3 retries, nodes announcing every 300 s); the storage nodes run their own loops too. Nothing calls an audit
round or a repair pass: the test only sleeps on trio's MockClock (see ``virtual_clock``), breaks things the way
an operator would (a flipped byte, a deleted share file, a node stopped briefly, two nodes stopped for long), and
reads the mediator's database and API at the half hour between rounds.

The story, in virtual hours (round *i* runs at hour *i*, plus the few virtual seconds earlier rounds spent
retrying unreachable nodes):

* 0: three 2-of-4 objects go to the four cheapest nodes (0-3); 4 and 5 hold nothing.
* 6.5: one share of object 0 corrupted on node 0, another deleted on node 1. Round 7 fails both nodes, the
  repair after it moves both shares to nodes 4 and 5, and the bad copies are released.
* 8.5-9.5: node 2 is stopped for an hour: round 9 finds it unreachable; it comes back online, not disqualified,
  its shares never moved.
* 10.5-16.5: nodes 2 and 3 are stopped for six hours: unreachable in rounds 11-13, unresponsive after the third
  (their shares repaired onto other nodes after round 13), offline three hours after they were last seen; back
  online with their next announcement, their stale copies are released.
* 48: every round of the 48 is recorded, passes and reputations as docs/mediatord.md says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from mediator_net import (
    Mediator,
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
from virtual_clock import HOUR, VirtualTime, hour_epoch, install, new_clock

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from mediatord.audit import reputation

HOURS = 48
NODES = 6
PRODUCTION_ANNOUNCE_INTERVAL = "300"  # storaged's default
# Not a period under test: each payments pass asks the bitcoinlib wallet for deposits (~5 ms of real time).
# Once an hour (still once per billing period, as the loop does at any setting) instead of the default once a
# minute keeps two virtual days at a few seconds. test_virtual_time_billing.py covers money.
DEPOSIT_SCAN_INTERVAL = "3600"


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    return new_clock()


@dataclass
class Story:
    vt: VirtualTime
    mediator: Mediator
    nodes: list[Node]
    root: Path
    nursery: trio.Nursery

    @property
    def db(self):  # type: ignore[no-untyped-def]
        return self.mediator.service.db

    async def at_hour(self, hours: float) -> None:
        await self.vt.sleep_until(self.vt.epoch + hours * HOUR)

    async def restart(self, index: int) -> Node:
        old = self.nodes[index]
        self.nodes[index] = await start_node(self.nursery, self.root, self.mediator.url, index,
                                             port=int(old.url.rsplit(":", 1)[1]),
                                             STORAGED_ANNOUNCE_INTERVAL=PRODUCTION_ANNOUNCE_INTERVAL)
        return self.nodes[index]

    def results(self, index: int) -> list[str]:
        return [r[1] for r in self.db.round_results(self.nodes[index].node_id)]

    def row(self, index: int):  # type: ignore[no-untyped-def]
        return self.db.node(self.nodes[index].node_id)

    def holders(self, obj: SampleObject) -> dict[int, str]:
        return {s.idx: s.node_id for s in self.db.shares_of(obj.object_id)}

    def index_of(self, node_id: str) -> int:
        return next(i for i, n in enumerate(self.nodes) if n.node_id == node_id)


@pytest.fixture
async def story(tmp_path: Path, nursery: trio.Nursery, virtual_clock: trio.testing.MockClock,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Story]:
    vt = install(monkeypatch, virtual_clock, hour_epoch())
    mediator = await start_mediator(nursery, tmp_path / "mediator", loops=True, MEDIATORD_NODE_OFFLINE_AFTER="10800",
                                    MEDIATORD_DEPOSIT_SCAN_INTERVAL=DEPOSIT_SCAN_INTERVAL)
    settings = mediator.service.settings
    assert (settings.audit_period, settings.node_offline_after, settings.audit_retries) == (3600, 3 * 3600, 3)
    nodes = [await start_node(nursery, tmp_path, mediator.url, i,
                              STORAGED_ANNOUNCE_INTERVAL=PRODUCTION_ANNOUNCE_INTERVAL) for i in range(NODES)]
    await wait_online(mediator, NODES)
    yield Story(vt, mediator, nodes, tmp_path, nursery)
    nursery.cancel_scope.cancel()


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def test_two_virtual_days_of_audits_outages_and_repairs(story: Story,
                                                             virtual_clock: trio.testing.MockClock) -> None:
    db = story.db
    account = SigningKey.generate()
    # object 0's shares are one 4 KiB leaf each, so the one leaf a round asks for is the corrupted one
    objects = [make_object(k=2, n=4, padded_size=6000)] + [make_object(k=2, n=4) for _ in range(2)]
    async with rpc.new_client() as client:
        for obj in objects:
            await upload(client, story.mediator.url, account, obj)
        cheapest = {n.node_id for n in story.nodes[:4]}
        assert all(set(story.holders(o).values()) == cheapest for o in objects)
        assert virtual_clock.current_time() < 60  # setting up spent no virtual time to speak of

        # six quiet hours: one round an hour, every holder passes each one, one billing-seam row per pass
        await story.at_hour(6.5)
        assert db.next_round_id() == 7
        for i in range(4):
            assert story.results(i) == ["passed"] * 6
            passes = db.audit_passes(story.nodes[i].node_id)
            assert [p[0] for p in passes] == [1, 2, 3, 4, 5, 6]
            gaps = [b[4] - a[4] for a, b in zip(passes, passes[1:], strict=False)]
            assert all(HOUR <= g < HOUR + 1 for g in gaps), gaps  # the loop's own 3600 s sleeps
            assert story.row(i).reputation == pytest.approx(reputation(6, 0)) == pytest.approx(7 / 8)
        assert story.results(4) == story.results(5) == []  # holding nothing, they are not challenged

        # a flipped byte and a deleted file in one object: both fail round 7, the repair after it moves both
        victim = objects[0]
        assert victim.specs[0].share_size <= 4096
        flip_byte(share_data_file(story.nodes[0], victim.specs[0].share_id))
        share_data_file(story.nodes[1], victim.specs[1].share_id).unlink()
        await story.at_hour(7.5)
        assert story.results(0)[-1] == story.results(1)[-1] == "failed"
        assert story.results(2)[-1] == story.results(3)[-1] == "passed"
        for i in (0, 1):
            row = story.row(i)
            assert (row.state, row.consecutive_failures) == ("online", 1)
            assert row.reputation == pytest.approx(reputation(6, 1))
        moved = story.holders(victim)
        assert {moved[0], moved[1]} == {story.nodes[4].node_id, story.nodes[5].node_id}
        for index in (0, 1):
            node = story.nodes[story.index_of(moved[index])]
            assert share_data_file(node, victim.specs[index].share_id).read_bytes() == victim.shares[index]
        # the bad copies were released by the housekeeping loop
        assert not share_data_file(story.nodes[0], victim.specs[0].share_id).exists()
        assert db.counts()["releases_pending"] == 0
        assert [r[1] for r in db.repairs()] == ["repaired"]

        await story.at_hour(8.5)
        assert story.results(0)[-1] == story.results(1)[-1] == "passed"  # their other shares are fine
        assert story.row(0).consecutive_failures == 0
        assert story.results(4) == story.results(5) == ["passed"]

        # node 2 stopped for an hour: unreachable once, still online, back without penalty beyond reputation
        await stop_node(story.nodes[2])
        await story.at_hour(9.5)
        assert story.results(2)[-1] == "unreachable"
        assert story.row(2).state == "online"
        await story.restart(2)
        await story.at_hour(10.5)
        row = story.row(2)
        assert story.results(2)[-2:] == ["unreachable", "passed"]
        assert (row.state, row.consecutive_failures, row.passed, row.failed) == ("online", 0, 9, 1)
        assert row.reputation == pytest.approx(reputation(9, 1))
        assert all(story.nodes[2].node_id in story.holders(o).values() for o in objects[1:])  # nothing moved
        assert len(db.repairs()) == 1

        # nodes 2 and 3 stopped for six hours: unreachable, then offline 3 h after last seen, then repaired
        stopped_at = story.vt.now()
        for i in (2, 3):
            await stop_node(story.nodes[i])
        last_seen = max(story.row(i).last_seen for i in (2, 3))
        assert stopped_at - float(PRODUCTION_ANNOUNCE_INTERVAL) <= last_seen <= stopped_at
        await story.at_hour(12.5)
        assert story.row(2).state == story.row(3).state == "online"  # two unreachable rounds: still counted
        assert len(db.repairs()) == 1
        await story.vt.sleep_until(min(story.row(i).last_seen for i in (2, 3)) + 3 * HOUR - 60)
        # round 13 was the third unreachable one in a row: unresponsive, and the repair after it moved the shares
        assert story.row(2).state == story.row(3).state == "unresponsive"
        assert len(db.repairs()) == 4
        await story.vt.sleep_until(last_seen + 3 * HOUR + 60)
        assert story.row(2).state == story.row(3).state == "offline"  # found within the 5 s housekeeping
        await story.at_hour(14.5)
        for i in (2, 3):
            assert story.results(i)[-3:] == ["unreachable"] * 3  # rounds 11-13; round 14 skips offline nodes
            assert story.row(i).consecutive_failures == 0  # outages never count towards disqualification
        assert sorted(r[1] for r in db.repairs()) == ["repaired"] * 4
        gone = {story.nodes[2].node_id, story.nodes[3].node_id}
        for obj in objects:
            status = await object_status(client, story.mediator.url, account, obj.object_id)
            assert status["health"] == {"healthy": 4, "total": 4, "state": "healthy"}
            assert not gone & {s["node_id"] for s in status["shares"]}
            for share in status["shares"]:
                node = story.nodes[story.index_of(share["node_id"])]
                assert share_data_file(node, share["share_id"]).read_bytes() == obj.shares[share["index"]]
        assert db.counts()["releases_pending"] == 6  # stale copies wait for their nodes

        # back after six hours: online with the next announcement, stale copies released, not disqualified
        await story.at_hour(16.5)
        for i in (2, 3):
            await story.restart(i)
        await wait_online(story.mediator, NODES)
        await story.at_hour(18.5)
        assert db.counts()["releases_pending"] == 0
        for i in (2, 3):
            assert story.nodes[i].share_files() == []
            assert (story.row(i).state, story.row(i).consecutive_failures) == ("online", 0)

        # the rest of the two days: one round an hour, passes recorded exactly once per (round, node)
        await story.at_hour(HOURS + 0.5)
        assert db.next_round_id() == HOURS + 1  # rounds 1..48, no more, no fewer
        expected = {  # passes, failed-or-unreachable rounds
            0: (HOURS - 1, 1), 1: (HOURS - 1, 1),
            2: (9, 4), 3: (10, 3),
            4: (HOURS - 7, 0), 5: (HOURS - 7, 0),
        }
        for i, (passed, failed) in expected.items():
            row = story.row(i)
            assert (row.passed, row.failed) == (passed, failed), i
            assert len(db.audit_passes(row.node_id)) == passed == story.results(i).count("passed")
            assert row.reputation == pytest.approx(reputation(passed, failed))
            assert row.state == "online"
        status = db.counts()
        assert status["nodes_disqualified"] == 0 and status["objects_irreparable"] == 0
        assert status["shares_healthy"] == 12
