"""Fastest first: a node that answers slowly is overtaken by another, not waited for.

The slow node is a real storaged behind a real TCP relay that can hold back its answers; the node announces
the relay's address, so every client request to it goes through the relay.
"""

from __future__ import annotations

from pathlib import Path

import trio
from clientdata_support import open_store
from netfixtures import start_network

from fincryptfs.downloader import ObjectReader


class SlowRelay:
    """Forwards TCP connections to ``target_port``; answers are held back ``delay`` seconds per chunk."""

    def __init__(self) -> None:
        self.target_port = 0
        self.delay = 0.0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server, \
                trio.open_nursery() as nursery:
            async def pump(src: trio.SocketStream, dst: trio.SocketStream, slow: bool) -> None:
                try:
                    async for chunk in src:
                        if slow and self.delay:
                            await trio.sleep(self.delay)
                        await dst.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, server, False)
            nursery.start_soon(pump, server, client, True)


async def test_slow_node_is_overtaken(tmp_path: Path, nursery: trio.Nursery) -> None:
    relay = SlowRelay()
    port = await nursery.start(relay.serve)
    net = await start_network(tmp_path, nursery, nodes=6,
                              node_env={0: {"STORAGED_PUBLIC_URL": f"http://127.0.0.1:{port}"}})
    relay.target_port = int(net.nodes[0].url.rsplit(":", 1)[1])
    async with open_store(net.mediator_url, tmp_path, segment_size=16384, hedge_after=0.3) as store:
        src = tmp_path / "f"
        data = bytes(range(256)) * 400
        src.write_bytes(data)
        obj = await store.put_file(src)
        info = await store.mediator.object_info(obj.object_id)
        assert f"http://127.0.0.1:{port}" in {s.node_url for s in info.shares}
        slow_index = next(s.index for s in info.shares if s.node_id == net.nodes[0].node_id)
        relay.delay = 30.0
        reader = await ObjectReader.open(store, obj)
        # make the slow node one of the k asked first
        reader.order.sort(key=lambda s: s.index != slow_index)
        got: list[bytes] = []

        async def keep(index: int, plaintext: bytes) -> None:
            got.append(plaintext)

        with trio.fail_after(10):
            await reader.each_segment(obj.layout.segments_for_range(0, obj.size), keep)
        assert b"".join(got)[:obj.size] == data
        assert reader.bad == set() and slow_index not in [s.index for s in reader.order[:3]]
        relay.delay = 0.0
