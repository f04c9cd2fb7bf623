"""Peers that are slow, silent or hostile: the client gives up on them in bounded time and says why.

Real daemons throughout; the misbehaving peer is a real node behind a ``Gate`` that holds or trickles its
answers, or a small fake mediator on a raw trio socket. The client's deadlines are shortened for the test
(``monkeypatch``), so a hang shows as ``fail_after`` firing, not as minutes of waiting.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from clientdata_support import open_store
from netfixtures import start_network
from test_network import make_file, stored_indices

from fincryptfs import downloader, uploader
from fincryptfs.objectstore import ReadError


async def test_a_node_trickling_its_put_answer_is_given_up_on(tmp_path: Path, nursery: trio.Nursery,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that takes the whole share, then sends its answer one byte every 0.2 s never trips a per-read
    timeout: the answer has a deadline of its own, the share goes to another node and the upload commits."""
    monkeypatch.setattr(uploader, "PUT_ANSWER_TIMEOUT", 1.0)
    net = await start_network(tmp_path, nursery, nodes=7, gated=True)
    bad = min(range(7), key=lambda i: net.nodes[i].node_id)  # placement takes nodes in id order: it gets a share
    net.gates[bad].trickle = 0.2
    async with open_store(net.mediator_url, tmp_path, segment_size=16384) as store:
        data = make_file(tmp_path / "src", 100_000, 1)
        with trio.fail_after(15):
            obj = await store.put_file(tmp_path / "src")
        assert await stored_indices(store, obj) == set(range(6))
        info = await store.mediator.object_info(obj.object_id)
        assert net.nodes[bad].node_id not in {s.node_id for s in info.shares if s.state == "stored"}
        net.gates[bad].trickle = None
        assert await store.read_range(obj, 0, len(data)) == data


async def test_a_read_from_trickling_nodes_ends_in_a_read_error(tmp_path: Path, nursery: trio.Nursery,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With only two healthy holders of a k = 3 object and four that trickle their answers, a read must fail
    (EIO at the mount) in bounded time, naming the slow nodes, instead of waiting for ever; with three healthy
    ones it is served by them."""
    monkeypatch.setattr(downloader, "GET_GRACE", 1.0)
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    async with open_store(net.mediator_url, tmp_path, segment_size=16384, hedge_after=0.3) as store:
        data = make_file(tmp_path / "src", 100_000, 2)
        obj = await store.put_file(tmp_path / "src")
        for gate in net.gates[:3]:
            gate.trickle = 0.2
        with trio.fail_after(15):
            assert await store.read_range(obj, 0, len(data)) == data
        net.gates[3].trickle = 0.2
        with trio.fail_after(15), pytest.raises(ReadError) as caught:
            await store.read_range(obj, 0, len(data))
        assert "only 2 of the 3 shares" in str(caught.value)
        assert "did not send" in str(caught.value)
        for gate in net.gates:
            gate.trickle = None
